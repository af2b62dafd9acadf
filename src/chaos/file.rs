//! A chaos scenario written as a TOML file: the job's shape, faults placed at a step or a time,
//! and faults drawn by the seed (every so often, or after random gaps of a given mean, from a
//! mix of kinds). `scenarios/soak.toml` is one; `phalanx chaos --scenario FILE` runs any.
//!
//! ```toml
//! about = "what it shows"
//! world = 4          # active ranks
//! spares = 2
//! hosts = 2          # simulated hosts it needs (root); 0 or absent: any
//!
//! [[fault]]          # placed: at a committed step or a time into training
//! kind = "kill"      # "kill" (SIGKILL) or "hang" (SIGSTOP, then SIGCONT after hang_ms)
//! step = 120         # or after_s = 30
//! rank = 2           # absent: drawn by the seed
//!
//! [draw]             # drawn: a fault every every_s (or after gaps of mean mean_every_s)
//! every_s = 60       # for for_min minutes of training
//! for_min = 10
//! mix = { kill = 2, hang = 1 }   # weights of the kinds
//! hang_ms = 3000
//! ```

use crate::launch_placed::{PlacedFault, PlacedKind, Trigger};
use phalanx_model::sampler::mix64;
use serde::Deserialize;
use std::time::Duration;

/// More faults than a run could take in: a typo in a period, not a plan.
const MAX_FAULTS: usize = 10_000;
/// Thirty days: no time in a scenario is longer (and none overflows a clock).
const MAX_SECONDS: f64 = 30.0 * 86_400.0;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    #[serde(default)]
    pub about: String,
    pub world: usize,
    #[serde(default)]
    pub spares: usize,
    #[serde(default)]
    pub hosts: usize,
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultSpec>,
    pub draw: Option<DrawSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KindName {
    Kill,
    Hang,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub kind: KindName,
    pub step: Option<u64>,
    pub after_s: Option<f64>,
    pub rank: Option<u32>,
    pub hang_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrawSpec {
    pub every_s: Option<f64>,
    pub mean_every_s: Option<f64>,
    pub for_min: f64,
    pub mix: Mix,
    pub hang_ms: Option<u64>,
}

/// Weights of the kinds a draw picks from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mix {
    #[serde(default)]
    pub kill: u32,
    #[serde(default)]
    pub hang: u32,
}

const DEFAULT_HANG_MS: u64 = 3000;

impl ScenarioFile {
    /// Parses and checks a scenario; the message says what to change.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: ScenarioFile = toml::from_str(text).map_err(|e| e.to_string())?;
        f.check()?;
        Ok(f)
    }

    fn check(&self) -> Result<(), String> {
        if self.world == 0 {
            return Err("world = 0: a job needs at least one rank".into());
        }
        if self.faults.is_empty() && self.draw.is_none() {
            return Err("no faults: add a [[fault]] or a [draw] section".into());
        }
        for (i, f) in self.faults.iter().enumerate() {
            let which = format!("fault {} ({:?})", i + 1, f.kind);
            match (f.step, f.after_s) {
                (Some(_), None) => {}
                (None, Some(s)) if (0.0..=MAX_SECONDS).contains(&s) => {}
                (None, Some(s)) => {
                    return Err(format!(
                        "{which}: after_s = {s}: use seconds from 0 to {MAX_SECONDS} (30 days)"
                    ))
                }
                _ => return Err(format!("{which}: give either step or after_s")),
            }
            if f.kind == KindName::Kill && f.hang_ms.is_some() {
                return Err(format!(
                    "{which}: hang_ms is for a hang; a kill has no length (remove it)"
                ));
            }
            if let Some(r) = f.rank.filter(|&r| r as usize >= self.world) {
                return Err(format!(
                    "{which}: rank {r} is not a rank of a world of {} (0..{})",
                    self.world,
                    self.world - 1
                ));
            }
            check_hang(&which, f.hang_ms)?;
        }
        if let Some(d) = &self.draw {
            d.check()?;
        }
        if self.count() > MAX_FAULTS {
            return Err(format!(
                "{} faults planned, more than {MAX_FAULTS}: lengthen [draw] every_s or shorten for_min",
                self.count()
            ));
        }
        Ok(())
    }

    fn count(&self) -> usize {
        let drawn = self.draw.as_ref().map_or(0, |d| {
            let gap = d.every_s.or(d.mean_every_s).unwrap_or(1.0);
            (d.for_min * 60.0 / gap) as usize
        });
        self.faults.len() + drawn
    }

    /// The faults of a run with `seed`: the placed ones (ranks left open drawn by the seed),
    /// then the drawn ones in time order.
    pub fn placed(&self, seed: u64) -> Vec<PlacedFault> {
        let pick = |salt: u64, n: u64| mix64(seed ^ mix64(salt)) % n.max(1);
        // Rank 0 writes the metrics: a hang there is one of the job, not of a rank; spared.
        let rank = |salt: u64, kind: KindName| {
            let skip = u64::from(kind == KindName::Hang && self.world > 1);
            (skip + pick(salt, self.world as u64 - skip)) as u32
        };
        let mut out: Vec<PlacedFault> = self
            .faults
            .iter()
            .enumerate()
            .map(|(i, f)| PlacedFault {
                at: match (f.step, f.after_s) {
                    (Some(s), _) => Trigger::Step(s),
                    (_, s) => Trigger::After(Duration::from_secs_f64(s.unwrap_or(0.0))),
                },
                rank: f.rank.unwrap_or_else(|| rank(1000 + i as u64, f.kind)),
                kind: kind_of(f.kind, f.hang_ms),
            })
            .collect();
        if let Some(d) = &self.draw {
            for (i, at) in d.times(seed).into_iter().enumerate() {
                let salt = 2000 + 3 * i as u64;
                let k = d.mix.pick(pick(salt, d.mix.total()));
                out.push(PlacedFault {
                    at: Trigger::After(at),
                    rank: rank(salt + 1, k),
                    kind: kind_of(k, d.hang_ms),
                });
            }
        }
        out
    }
}

fn kind_of(k: KindName, hang_ms: Option<u64>) -> PlacedKind {
    match k {
        KindName::Kill => PlacedKind::Kill,
        KindName::Hang => PlacedKind::Hang {
            for_: Duration::from_millis(hang_ms.unwrap_or(DEFAULT_HANG_MS)),
        },
    }
}

fn check_hang(which: &str, hang_ms: Option<u64>) -> Result<(), String> {
    match hang_ms {
        Some(ms) if !(100..=3_600_000).contains(&ms) => Err(format!(
            "{which}: hang_ms = {ms}: use 100 to 3600000 (an hour)"
        )),
        _ => Ok(()),
    }
}

impl DrawSpec {
    fn check(&self) -> Result<(), String> {
        let gap = match (self.every_s, self.mean_every_s) {
            (Some(g), None) | (None, Some(g)) => g,
            _ => return Err("[draw]: give either every_s or mean_every_s".into()),
        };
        if !(gap > 0.0 && gap <= MAX_SECONDS) {
            return Err(format!(
                "[draw]: a gap of {gap} s: use seconds > 0 and at most {MAX_SECONDS} (30 days)"
            ));
        }
        if !(self.for_min > 0.0 && self.for_min * 60.0 <= MAX_SECONDS) {
            return Err(format!(
                "[draw]: for_min = {}: use minutes > 0 and at most 43200 (30 days)",
                self.for_min
            ));
        }
        if self.mix.total() == 0 {
            return Err("[draw]: mix gives every kind weight 0: e.g. mix = { kill = 1 }".into());
        }
        check_hang("[draw]", self.hang_ms)
    }

    /// When the drawn faults strike, counted from the first committed step.
    fn times(&self, seed: u64) -> Vec<Duration> {
        let end = self.for_min * 60.0;
        let mut out = Vec::new();
        let mut t = 0.0;
        for i in 0..=MAX_FAULTS as u64 {
            t += match (self.every_s, self.mean_every_s) {
                (Some(g), _) => g,
                // Exponential gaps: faults that come as a Poisson process would.
                (_, Some(mean)) => {
                    let u = (mix64(seed ^ mix64(5000 + i)) >> 11) as f64 / (1u64 << 53) as f64;
                    -mean * (1.0 - u).ln()
                }
                _ => return out,
            };
            if t > end {
                break;
            }
            out.push(Duration::from_secs_f64(t));
        }
        out
    }
}

impl Mix {
    fn total(&self) -> u64 {
        u64::from(self.kill) + u64::from(self.hang)
    }

    /// The kind at `x` in 0..total.
    fn pick(&self, x: u64) -> KindName {
        if x < u64::from(self.kill) {
            KindName::Kill
        } else {
            KindName::Hang
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOAK: &str = include_str!("../../scenarios/soak.toml");

    // The shipped soak: a fault every 60 s for 10 minutes, both kinds drawn, hangs never on
    // rank 0, the same faults for the same seed and others for another.
    #[test]
    fn the_soak_draws_ten_faults_a_minute_apart() {
        let s = ScenarioFile::parse(SOAK).unwrap();
        let f = s.placed(1);
        assert_eq!(f.len(), 10);
        for (i, p) in f.iter().enumerate() {
            assert_eq!(
                p.at,
                Trigger::After(Duration::from_secs(60 * (i as u64 + 1)))
            );
            assert!((p.rank as usize) < s.world);
            if matches!(p.kind, PlacedKind::Hang { .. }) {
                assert_ne!(p.rank, 0);
            }
        }
        let kinds = |seed| -> Vec<bool> {
            s.placed(seed)
                .iter()
                .map(|p| p.kind == PlacedKind::Kill)
                .collect()
        };
        assert!((0..10).any(|seed| kinds(seed).contains(&true)));
        assert!((0..10).any(|seed| kinds(seed).contains(&false)));
        assert_eq!(format!("{:?}", s.placed(3)), format!("{:?}", s.placed(3)));
        assert_ne!(format!("{:?}", s.placed(3)), format!("{:?}", s.placed(4)));
    }

    // Gaps drawn with a mean: their average is near it, and they stop at for_min.
    #[test]
    fn random_gaps_have_their_mean() {
        let s = ScenarioFile::parse(
            "world = 3\n[draw]\nmean_every_s = 2.0\nfor_min = 100\nmix = { kill = 1 }\n",
        )
        .unwrap();
        let f = s.placed(9);
        let n = f.len() as f64;
        assert!((2500.0..3500.0).contains(&n), "{n} faults in 6000 s");
        let Some(Trigger::After(last)) = f.last().map(|p| p.at) else {
            panic!("{f:?}")
        };
        assert!(last.as_secs_f64() <= 6000.0);
        assert!(f.iter().all(|p| p.kind == PlacedKind::Kill));
    }

    // Placed faults keep their step or time, rank and hang length; a rank left open is drawn.
    #[test]
    fn placed_faults_keep_what_they_say() {
        let s = ScenarioFile::parse(
            "world = 4\n[[fault]]\nkind = \"kill\"\nstep = 120\nrank = 2\n\
             [[fault]]\nkind = \"hang\"\nafter_s = 1.5\nhang_ms = 500\n",
        )
        .unwrap();
        let f = s.placed(1);
        assert_eq!(
            f[0],
            PlacedFault {
                at: Trigger::Step(120),
                rank: 2,
                kind: PlacedKind::Kill
            }
        );
        assert_eq!(f[1].at, Trigger::After(Duration::from_millis(1500)));
        assert_eq!(
            f[1].kind,
            PlacedKind::Hang {
                for_: Duration::from_millis(500)
            }
        );
        assert!((1..4).contains(&f[1].rank));
    }

    // Bad files are refused with what to change.
    #[test]
    fn bad_files_say_what_to_change() {
        let err = |t: &str| ScenarioFile::parse(t).unwrap_err();
        assert!(
            err("world = 0\n[draw]\nevery_s = 1\nfor_min = 1\nmix = { kill = 1 }")
                .contains("at least one rank")
        );
        assert!(err("world = 2\n").contains("add a [[fault]]"));
        assert!(err("world = 2\n[[fault]]\nkind = \"kill\"\n").contains("either step or after_s"));
        assert!(
            err("world = 2\n[[fault]]\nkind = \"kill\"\nstep = 3\nrank = 2\n")
                .contains("not a rank")
        );
        assert!(
            err("world = 2\n[[fault]]\nkind = \"melt\"\nstep = 3\n").contains("unknown variant")
        );
        assert!(err("world = 2\nwrold = 3\n").contains("unknown field"));
        assert!(err(
            "world = 2\n[draw]\nevery_s = 1\nmean_every_s = 1\nfor_min = 1\nmix = { kill = 1 }"
        )
        .contains("either every_s or mean_every_s"));
        assert!(
            err("world = 2\n[draw]\nevery_s = 0\nfor_min = 1\nmix = { kill = 1 }")
                .contains("seconds > 0")
        );
        assert!(
            err("world = 2\n[draw]\nevery_s = 1\nfor_min = 1\nmix = { kill = 0 }")
                .contains("weight 0")
        );
        assert!(
            err("world = 2\n[draw]\nevery_s = 0.001\nfor_min = 60\nmix = { kill = 1 }")
                .contains("more than")
        );
        let hang =
            |ms: &str| format!("world = 2\n[[fault]]\nkind = \"hang\"\nstep = 3\nhang_ms = {ms}\n");
        assert!(err(&hang("5")).contains("use 100 to"));
        assert!(err(&hang("18446744073709551615")).contains("use 100 to"));
        assert!(
            err("world = 2\n[[fault]]\nkind = \"kill\"\nstep = 3\nhang_ms = 500\n")
                .contains("a kill has no length")
        );
        assert!(err("world = 2\n[[fault]]\nkind = \"kill\"\nafter_s = 1e30\n").contains("30 days"));
        assert!(
            err("world = 2\n[draw]\nevery_s = 1e28\nfor_min = 1e30\nmix = { kill = 1 }")
                .contains("30 days")
        );
        // Weights at the top of their range are summed without overflow.
        assert!(ScenarioFile::parse(
            "world = 2\n[draw]\nevery_s = 60\nfor_min = 1\nmix = { kill = 4294967295, hang = 4294967295 }"
        )
        .is_ok());
    }
}
