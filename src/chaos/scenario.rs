//! The chaos scenarios: each a job shape and a set of faults, placed by a seed (which step,
//! which rank, which host), so a failing run is replayed exactly with its `--seed`.

use super::file::ScenarioFile;
use crate::launch_placed::PlacedKind;
use crate::launch_schedule::Plan;
use crate::link_proxy::Slowness;
use phalanx_model::sampler::mix64;
use phalanx_runtime::events::FaultKind;
use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

/// The faults of one chaos run: the launcher's plan (signals, quota, admin requests at steps),
/// the faults across simulated hosts, and those the ranks inject into themselves.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub plan: Plan,
    /// Every process of host H killed at once, or H cut off by a firewall rule, at step S.
    pub kill_host_at: Option<(u64, usize)>,
    pub cut_host_at: Option<(u64, usize)>,
    pub cut_for: Duration,
    /// The links of host H to the others slow from step S, for a while, this slow.
    pub slow_link_at: Option<(u64, usize)>,
    pub slow_link_for: Duration,
    pub slow_link: Slowness,
    /// `PHALANX_TEST_FAULT` entries, e.g. a NaN gradient on one rank at one step.
    pub in_rank: Vec<String>,
}

/// A scenario: the job it runs and where its faults go.
#[derive(Clone)]
pub struct Scenario {
    pub name: Cow<'static, str>,
    pub about: Cow<'static, str>,
    pub world: usize,
    pub spares: usize,
    /// Simulated hosts it needs (0: any, the ranks may share this host).
    pub hosts: usize,
    /// The faults end the job whole: a second job resumes the campaign (C-6) and runs to the
    /// end, and the checks read both.
    pub resume_after: bool,
    faults: Source,
}

/// Where a scenario's faults come from: code placing them by the seed, or a scenario file.
#[derive(Clone)]
enum Source {
    Code(fn(&Draw) -> Faults),
    File(Box<ScenarioFile>),
}

impl Scenario {
    pub fn faults(&self, seed: u64, max_steps: u64) -> Faults {
        match &self.faults {
            Source::Code(f) => f(&Draw { seed, max_steps }),
            Source::File(s) => Faults::of(Plan {
                placed: s.placed(seed),
                ..Plan::default()
            }),
        }
    }

    fn of_file(name: String, f: ScenarioFile) -> Scenario {
        Scenario {
            name: Cow::Owned(name),
            about: Cow::Owned(f.about.clone()),
            world: f.world,
            spares: f.spares,
            hosts: f.hosts,
            resume_after: false,
            faults: Source::File(Box::new(f)),
        }
    }
}

/// Where a seed puts a fault: a step in the middle of the run, a rank, a host.
pub struct Draw {
    seed: u64,
    max_steps: u64,
}

impl Draw {
    fn pick(&self, salt: u64, n: u64) -> u64 {
        mix64(self.seed ^ mix64(salt)) % n.max(1)
    }

    /// A step between 30% and 60% of the run: after training settled, with room to recover.
    pub fn step(&self, salt: u64) -> u64 {
        let lo = (self.max_steps * 3 / 10).max(2);
        let hi = (self.max_steps * 6 / 10).max(lo + 1);
        lo + self.pick(salt, hi - lo)
    }

    /// A step between 10% and 30% of the run: for a fault that lasts a while (a fifth of the
    /// run and at least seconds) and must end with room for a save before the end, also when
    /// the whole run is a few seconds of fast steps.
    pub fn early_step(&self, salt: u64) -> u64 {
        let lo = (self.max_steps / 10).max(2);
        let hi = (self.max_steps * 3 / 10).max(lo + 1);
        lo + self.pick(salt, hi - lo)
    }

    /// A rank of `world`, never rank 0 when `spare_zero` (the one that writes the metrics).
    pub fn rank(&self, salt: u64, world: usize, spare_zero: bool) -> u32 {
        let skip = u64::from(spare_zero && world > 1);
        (skip + self.pick(salt, world as u64 - skip)) as u32
    }
}

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: Cow::Borrowed("kill-one"),
        about: Cow::Borrowed("SIGKILL one rank mid-run; a hot spare takes its place"),
        world: 4,
        spares: 1,
        hosts: 0,
        resume_after: false,
        faults: Source::Code(|d| {
            Faults::of(Plan {
                kill: vec![(d.step(1), d.rank(2, 4, false))],
                ..Plan::default()
            })
        }),
    },
    Scenario {
        name: Cow::Borrowed("kill-two"),
        about: Cow::Borrowed(
            "SIGKILL two ranks at the same step; one spare, so the job shrinks to 3",
        ),
        world: 4,
        spares: 1,
        hosts: 0,
        resume_after: false,
        faults: Source::Code(|d| {
            let (step, a) = (d.step(1), d.rank(2, 4, false));
            let b = (a + 1 + d.rank(3, 3, false)) % 4;
            Faults::of(Plan {
                kill: vec![(step, a), (step, b)],
                ..Plan::default()
            })
        }),
    },
    Scenario {
        name: Cow::Borrowed("hang-wake"),
        about: Cow::Borrowed(
            "SIGSTOP one rank, SIGCONT it 5 s later: it is fenced out and comes back a spare",
        ),
        world: 3,
        spares: 1,
        hosts: 0,
        resume_after: false,
        faults: Source::Code(|d| {
            Faults::of(Plan {
                stop_at: Some((d.step(1), d.rank(2, 3, true))),
                stop_for: Duration::from_secs(5),
                ..Plan::default()
            })
        }),
    },
    Scenario {
        name: Cow::Borrowed("straggler"),
        about: Cow::Borrowed(
            "a CPU quota of 20% of a core on one rank for 30 steps: rebalanced, then lifted",
        ),
        world: 3,
        spares: 1,
        hosts: 0,
        resume_after: false,
        faults: Source::Code(|d| {
            Faults::of(Plan {
                slow_at: Some((d.step(1), d.rank(2, 3, true))),
                slow_cpu_pct: 20,
                slow_steps: 30,
                ..Plan::default()
            })
        }),
    },
    Scenario {
        name: Cow::Borrowed("nan"),
        about: Cow::Borrowed(
            "a NaN in one rank's gradient: the step is skipped on every rank, the rank named",
        ),
        world: 3,
        spares: 0,
        hosts: 0,
        resume_after: false,
        faults: Source::Code(|d| Faults {
            in_rank: vec![format!("nan@{}:{}", d.step(1), d.rank(2, 3, false))],
            ..Faults::default()
        }),
    },
    Scenario {
        name: Cow::Borrowed("scale-drain"),
        about: Cow::Borrowed("scale 2 ranks up to 4 (spares promoted and healed), then drain one"),
        world: 2,
        spares: 2,
        hosts: 0,
        resume_after: false,
        faults: Source::Code(|d| {
            // Both early: a drain asked for near the end can be accepted and then outrun by
            // the job's last step, and the run would show no drain at all.
            let up = d.early_step(1);
            Faults::of(Plan {
                scale_at: Some((up, 4)),
                drain_at: Some((up + d.max_steps / 10, d.rank(2, 4, true))),
                ..Plan::default()
            })
        }),
    },
    Scenario {
        name: Cow::Borrowed("host-loss"),
        about: Cow::Borrowed("every process of one of 2 simulated hosts killed at once (root)"),
        world: 4,
        spares: 2,
        hosts: 2,
        resume_after: false,
        faults: Source::Code(|d| Faults {
            kill_host_at: Some((d.step(1), 1)),
            ..Faults::default()
        }),
    },
    Scenario {
        name: Cow::Borrowed("partition"),
        about: Cow::Borrowed("one of 2 simulated hosts cut off by a firewall rule for 8 s (root)"),
        world: 4,
        spares: 2,
        hosts: 2,
        resume_after: false,
        faults: Source::Code(|d| Faults {
            cut_host_at: Some((d.step(1), 1)),
            cut_for: Duration::from_secs(8),
            ..Faults::default()
        }),
    },
    Scenario {
        name: Cow::Borrowed("slow-link"),
        about: Cow::Borrowed(
            "the links of one of 2 simulated hosts slow for 4 s: 20 ms more each way, 100 Mbit/s \
                (a proxy on their path, root); the steps slow down, nobody is evicted",
        ),
        world: 4,
        spares: 1,
        hosts: 2,
        resume_after: false,
        faults: Source::Code(|d| Faults {
            slow_link_at: Some((d.step(1), 1)),
            slow_link_for: Duration::from_secs(4),
            slow_link: Slowness {
                delay: Duration::from_millis(20),
                rate_mbit_s: 100,
            },
            ..Faults::default()
        }),
    },
    Scenario {
        name: Cow::Borrowed("coordinator-restart"),
        about: Cow::Borrowed(
            "SIGKILL the coordinator, start it again 2 s later from its journal: the ranks \
                train on and rejoin in their places",
        ),
        world: 3,
        spares: 1,
        hosts: 0,
        resume_after: false,
        faults: Source::Code(|d| {
            Faults::of(Plan {
                kill_coordinator_at: Some(d.step(1)),
                coordinator_down: Duration::from_secs(2),
                ..Plan::default()
            })
        }),
    },
    Scenario {
        name: Cow::Borrowed("corrupt-checkpoint"),
        about: Cow::Borrowed(
            "a bit flipped in the newest committed checkpoint, then the whole job killed: \
                the next job names it, resumes from the one before, and loses no sample",
        ),
        world: 3,
        spares: 0,
        hosts: 0,
        resume_after: true,
        faults: Source::Code(|d| {
            let at = d.step(1);
            Faults::of(Plan {
                corrupt_checkpoint_at: Some(at),
                kill_job_at: Some(at),
                ..Plan::default()
            })
        }),
    },
    Scenario {
        name: Cow::Borrowed("disk-full"),
        about: Cow::Borrowed(
            "the checkpoint disk (a tmpfs) full for a fifth of the run and 2 s (root): the saves \
                meanwhile fail with an event, none is committed partial, training goes on and \
                saves again",
        ),
        world: 3,
        spares: 0,
        hosts: 0,
        resume_after: false,
        faults: Source::Code(|d| {
            Faults::of(Plan {
                fill_disk_at: Some(d.early_step(1)),
                // Longer than the save interval chaos sets (an eighth of the run), and than a
                // save's write retries (0.6 s): a save fails; a later one commits.
                disk_full_steps: d.max_steps / 5,
                disk_full_min: Duration::from_secs(2),
                ..Plan::default()
            })
        }),
    },
];

impl Faults {
    fn of(plan: Plan) -> Faults {
        Faults {
            plan,
            ..Faults::default()
        }
    }

    /// The faults the launcher injects, by the kind its events record.
    pub fn injected_kinds(&self) -> Vec<FaultKind> {
        let p = &self.plan;
        let mut out = vec![FaultKind::Sigkill; p.kill.len()];
        let mut one = |on: bool, k| {
            if on {
                out.push(k);
            }
        };
        one(p.stop_at.is_some(), FaultKind::Sigstop);
        one(p.slow_at.is_some(), FaultKind::CpuQuota);
        one(self.kill_host_at.is_some(), FaultKind::HostLost);
        one(self.cut_host_at.is_some(), FaultKind::HostPartition);
        one(self.slow_link_at.is_some(), FaultKind::SlowLink);
        one(p.kill_coordinator_at.is_some(), FaultKind::CoordinatorKill);
        one(
            p.corrupt_checkpoint_at.is_some(),
            FaultKind::CheckpointCorrupt,
        );
        one(p.kill_job_at.is_some(), FaultKind::JobKilled);
        one(p.fill_disk_at.is_some(), FaultKind::DiskFull);
        out.extend(p.placed.iter().map(|f| match f.kind {
            PlacedKind::Kill => FaultKind::Sigkill,
            PlacedKind::Hang { .. } => FaultKind::Sigstop,
        }));
        out
    }

    /// The faults for the report: placed ones counted, not listed, past a few (a soak draws
    /// up to thousands).
    pub fn summary(&self) -> String {
        if self.plan.placed.len() <= 20 {
            return format!("{self:?}");
        }
        let mut short = self.clone();
        let n = short.plan.placed.len();
        short.plan.placed.truncate(20);
        format!("{short:?} (and {} more placed faults)", n - 20)
    }

    /// The shortest hang placed, if any: it must outlast the coordinator's detection.
    pub fn shortest_hang(&self) -> Option<Duration> {
        self.plan
            .placed
            .iter()
            .filter_map(|f| match f.kind {
                PlacedKind::Hang { for_ } => Some(for_),
                PlacedKind::Kill => None,
            })
            .min()
    }

    /// Scale and drain requests (the coordinator records each it accepts).
    pub fn admin(&self) -> usize {
        usize::from(self.plan.scale_at.is_some()) + usize::from(self.plan.drain_at.is_some())
    }

    pub fn nans(&self) -> usize {
        self.in_rank
            .iter()
            .filter(|f| f.starts_with("nan@"))
            .count()
    }
}

/// The soak, shipped as a scenario file (copy it to change its period, length or mix).
const SOAK: &str = include_str!("../../scenarios/soak.toml");

/// Every built-in scenario, the soak last.
pub fn builtin() -> Vec<Scenario> {
    let mut all = SCENARIOS.to_vec();
    // Shipped with the binary and parsed by a unit test: it cannot fail here.
    let soak = ScenarioFile::parse(SOAK).expect("scenarios/soak.toml parses");
    all.push(Scenario::of_file("soak".into(), soak));
    all
}

/// A built-in scenario by name, or a scenario file by path.
pub fn resolve(name: &str) -> Result<Scenario, String> {
    if let Some(s) = builtin().into_iter().find(|s| s.name == name) {
        return Ok(s);
    }
    let path = Path::new(name);
    if !path.is_file() {
        return Err(format!(
            "no scenario {name:?}: `phalanx chaos --scenario list` lists them, or give a \
             scenario file (TOML, e.g. scenarios/soak.toml)"
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the scenario file {name}: {e}"))?;
    let f = ScenarioFile::parse(&text).map_err(|e| format!("scenario file {name}: {e}"))?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    Ok(Scenario::of_file(stem.unwrap_or_else(|| name.into()), f))
}

#[cfg(test)]
pub fn find(name: &str) -> Option<Scenario> {
    builtin().into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A seed places a scenario's faults the same way every time; other seeds move them.
    #[test]
    fn a_seed_replays_its_faults_and_others_move_them() {
        let s = find("kill-two").unwrap();
        let placed = |seed| format!("{:?}", s.faults(seed, 100));
        assert_eq!(placed(7), placed(7));
        let placed: std::collections::BTreeSet<_> = (0..20).map(placed).collect();
        assert!(placed.len() > 5, "{placed:?}");
        for seed in 0..50 {
            let k = s.faults(seed, 100).plan.kill;
            assert_eq!(k[0].0, k[1].0, "at one step");
            assert_ne!(k[0].1, k[1].1, "two different ranks");
            assert!((30..60).contains(&k[0].0), "{k:?}");
            assert!(k.iter().all(|&(_, r)| r < 4));
        }
        let h = find("hang-wake").unwrap();
        assert!((0..50).all(|seed| h.faults(seed, 100).plan.stop_at.unwrap().1 != 0));
    }
}
