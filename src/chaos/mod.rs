//! `phalanx chaos`: a local job with a scenario's faults placed by a seed, its invariants
//! checked from the run directory, and a `chaos` section in its `report.json`: each check
//! with pass or fail, beside the report's faults (detection, recovery, lost steps) and ETTR.
//! A fault-free run of the same config and seed comes first, for the validation loss to be
//! compared with.

pub mod file;
pub mod invariants;
pub mod rss;
pub mod scenario;
mod slow_link;

use crate::config::TrainConfig;
use crate::launch::{self, LaunchArgs};
use crate::launch_hosts::HostArgs;
use anyhow::{bail, Context, Result};
use invariants::{Check, Evidence};
use scenario::{Faults, Scenario};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct ChaosCli {
    /// The scenario to run: a name, or a scenario file (TOML, e.g. scenarios/soak.toml);
    /// `list` lists the named ones.
    #[arg(long)]
    pub scenario: String,
    /// Places the faults (which step, rank, host) and seeds training (train.seed): a run is
    /// replayed exactly with the same seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Simulated hosts (needs root). Default: what the scenario needs (none, or 2).
    #[arg(long, value_name = "H")]
    pub hosts: Option<usize>,
    /// The job config (TOML).
    #[arg(long, default_value = "configs/shakespeare-char.toml")]
    pub config: PathBuf,
    /// Relative difference allowed between the final validation loss and the fault-free run's.
    #[arg(long, default_value_t = 0.02)]
    pub val_tolerance: f64,
    /// Skip the fault-free run (the validation loss is then not compared).
    #[arg(long)]
    pub no_baseline: bool,
    /// Overrides: section.key=value (e.g. train.max_steps=100). Default run.dir:
    /// runs/chaos/SCENARIO-seedS.
    pub overrides: Vec<String>,
}

pub fn run(c: &ChaosCli, stop: Arc<AtomicBool>) -> Result<i32> {
    if c.scenario == "list" {
        for s in scenario::builtin() {
            let hosts = match s.hosts {
                0 => String::new(),
                h => format!(", {h} simulated hosts"),
            };
            outln!(
                "{:<10} {} ({} ranks, {}{hosts})",
                s.name,
                s.about,
                s.world,
                crate::output::count(s.spares as u64, "spare")
            );
        }
        return Ok(0);
    }
    let sc = &scenario::resolve(&c.scenario).map_err(anyhow::Error::msg)?;
    if !(c.val_tolerance.is_finite() && c.val_tolerance >= 0.0) {
        bail!(
            "--val-tolerance {}: use a fraction such as 0.02",
            c.val_tolerance
        );
    }
    let hosts = c.hosts.or((sc.hosts > 0).then_some(sc.hosts));
    if hosts.unwrap_or(0) < sc.hosts {
        bail!("scenario {} needs --hosts {} or more", sc.name, sc.hosts);
    }
    let mut overrides = vec![format!("train.seed={}", c.seed)];
    overrides.extend(c.overrides.iter().cloned());
    let mut cfg = TrainConfig::load(Some(&c.config), &overrides)?;
    if cfg.run.checkpoint_interval == 0 {
        // Saves during the faults, so that "every committed checkpoint verifies" is tested on
        // saves a fault may have cut short.
        let every = (cfg.train.max_steps / 8).max(1);
        overrides.insert(1, format!("run.checkpoint_interval={every}"));
        cfg = TrainConfig::load(Some(&c.config), &overrides)?;
    }
    let run_dir = if c.overrides.iter().any(|o| o.starts_with("run.dir=")) {
        cfg.run.dir.clone()
    } else {
        PathBuf::from(format!("runs/chaos/{}-seed{}", sc.name, c.seed))
    };
    let max_steps = cfg.train.max_steps;
    let faults = sc.faults(c.seed, max_steps);
    check_hangs(&faults, &cfg)?;
    let baseline = if c.no_baseline {
        None
    } else {
        Some(fault_free(
            c,
            sc,
            hosts,
            &overrides,
            &run_dir,
            stop.clone(),
        )?)
    };
    outln!(
        "the run with the faults of {} (seed {}), in {}:",
        sc.name,
        c.seed,
        run_dir.display()
    );
    let a = launch_args(c, sc, hosts, &overrides, &run_dir, &faults)?;
    let sampler = rss::Sampler::start(&run_dir, rss::EVERY);
    let mut code = launch::run(&a, stop.clone())?;
    drop(sampler);
    // Only a job that died (not one that finished before its fault, or was stopped by Ctrl-C).
    if sc.resume_after && code == 1 && !stop.load(std::sync::atomic::Ordering::SeqCst) {
        outln!(
            "the job died whole (exit {code}); the next job resumes the campaign from the newest \
             checkpoint that verifies:"
        );
        let mut resumed = overrides.clone();
        resumed.push("run.resume=true".into());
        let a = launch_args(c, sc, hosts, &resumed, &run_dir, &Faults::default())?;
        code = launch::run(&a, stop)?;
    }
    let mut e = evidence(&run_dir, max_steps)?;
    e.baseline_val_loss = baseline.map(|b| b.val_loss);
    e.val_tolerance = c.val_tolerance;
    e.planned = faults.injected_kinds();
    e.planned_nans = faults.nans();
    e.planned_admin = faults.admin();
    let checks = invariants::checks(&e);
    let (goodput, throughput) = baseline.map_or((None, None), |b| goodput(&e.report, &b));
    let memory = rss::spans(&rss::read(&run_dir));
    let outcome = Outcome {
        code,
        goodput,
        throughput,
        memory: &memory,
    };
    record(&run_dir, sc, c.seed, &outcome, &faults, &e, &checks)?;
    print(sc, c.seed, &checks, (goodput, throughput));
    print_memory(&memory);
    Ok(if checks.iter().all(|c| c.pass) { 0 } else { 1 })
}

/// What the fault-free run of the same job and seed gives to compare with.
#[derive(Clone, Copy)]
struct Baseline {
    val_loss: f64,
    /// Its share of the training window in committed steps, and its tokens over wall time.
    ettr: Option<f64>,
    tokens_per_s_wall: Option<f64>,
}

/// Goodput: the share of the training window in committed steps with the faults, over the same
/// share without them; the time the faults cost (detection, regroups, redone steps, heals).
/// The window leaves out the start and the end, whose share of a short run grows as the
/// machine speeds up. Between two runs this machine's speed drifts by up to a third (other
/// jobs on the cores), so a ratio of tokens/s (also given) says less about the faults.
fn goodput(report: &Value, b: &Baseline) -> (Option<f64>, Option<f64>) {
    let ratio = |with: Option<f64>, without: Option<f64>| {
        without.filter(|&w| w > 0.0).and_then(|w| Some(with? / w))
    };
    (
        ratio(report["ettr_in_training"].as_f64(), b.ettr),
        ratio(report["tokens_per_s_wall"].as_f64(), b.tokens_per_s_wall),
    )
}

/// A hang the coordinator cannot see (it ends before the heartbeat deadline and a tick) would
/// be a fault that never struck: refused before any job runs.
fn check_hangs(f: &Faults, cfg: &TrainConfig) -> Result<()> {
    let c = &cfg.coordinator;
    let seen_after = std::time::Duration::from_millis(c.heartbeat_timeout_ms + 2 * c.tick_ms);
    match f.shortest_hang() {
        Some(h) if h < seen_after => bail!(
            "a hang of {} ms ends before the coordinator can see it (coordinator.heartbeat_timeout_ms \
             = {} plus two ticks of {} ms): use hang_ms of at least {} in the scenario",
            h.as_millis(),
            c.heartbeat_timeout_ms,
            c.tick_ms,
            seen_after.as_millis()
        ),
        _ => Ok(()),
    }
}

/// The same job without faults.
fn fault_free(
    c: &ChaosCli,
    sc: &Scenario,
    hosts: Option<usize>,
    overrides: &[String],
    run_dir: &Path,
    stop: Arc<AtomicBool>,
) -> Result<Baseline> {
    let dir = PathBuf::from(format!("{}-fault-free", run_dir.display()));
    outln!(
        "fault-free run of the same job and seed (for the validation loss), in {}:",
        dir.display()
    );
    let a = launch_args(c, sc, hosts, overrides, &dir, &Faults::default())?;
    let code = launch::run(&a, stop)?;
    let e = evidence(&dir, 0)?;
    let val = e.metrics.iter().rev().find_map(|m| match m {
        phalanx_runtime::metrics::MetricLine::Final(f) => f.val_loss,
        _ => None,
    });
    match (code, val) {
        (0, Some(val_loss)) => Ok(Baseline {
            val_loss,
            ettr: e.report["ettr_in_training"].as_f64(),
            tokens_per_s_wall: e.report["tokens_per_s_wall"].as_f64(),
        }),
        _ => bail!(
            "the fault-free run in {} did not finish (exit {code}); see its logs",
            dir.display()
        ),
    }
}

fn launch_args(
    c: &ChaosCli,
    sc: &Scenario,
    hosts: Option<usize>,
    overrides: &[String],
    run_dir: &Path,
    f: &Faults,
) -> Result<LaunchArgs> {
    let mut overrides = overrides.to_vec();
    overrides.push(format!("run.dir={}", run_dir.display()));
    let at = |x: Option<(u64, usize)>| x.map(|(s, h)| format!("{s}:{h}"));
    let host_faults = HostArgs {
        hosts,
        kill_host_at: at(f.kill_host_at),
        cut_host_at: at(f.cut_host_at),
        cut_for: f.cut_for.as_secs_f64().max(1.0),
        slow_link_at: at(f.slow_link_at),
        slow_link_for: f.slow_link_for.as_secs_f64().max(1.0),
        slow_link_ms: f.slow_link.delay.as_millis() as u64,
        slow_link_mbit: f.slow_link.rate_mbit_s,
    };
    let worker_env = match f.in_rank.is_empty() {
        true => Vec::new(),
        false => vec![("PHALANX_TEST_FAULT".to_string(), f.in_rank.join(","))],
    };
    Ok(LaunchArgs {
        nproc: sc.world,
        spares: sc.spares,
        config: c.config.clone(),
        overrides,
        plan: f.plan.clone(),
        noise: None,
        hosts: host_faults,
        progress: std::io::stderr().is_terminal(),
        // A chaos run's folder is its own: the same scenario and seed replace it.
        force: true,
        worker_env,
    })
}

/// The run directory's records, as the checks read them.
fn evidence(run_dir: &Path, max_steps: u64) -> Result<Evidence> {
    let read = |f: &str| std::fs::read_to_string(run_dir.join(f)).unwrap_or_default();
    let report: Value = serde_json::from_str(&read("report.json"))
        .with_context(|| format!("{} has no readable report.json", run_dir.display()))?;
    let checkpoints = phalanx_checkpoint::sharded::saves(&run_dir.join("checkpoints"))
        .into_iter()
        .filter(|s| s.2)
        .map(|(_, dir, _)| {
            let why = phalanx_checkpoint::verify(&dir)
                .err()
                .map(|e| e.to_string());
            (dir.display().to_string(), why)
        })
        .collect();
    Ok(Evidence {
        metrics: crate::report::metrics_in(run_dir),
        records: campaign_records(run_dir),
        report,
        fingerprints: read("fingerprints.jsonl")
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        checkpoints,
        max_steps,
        ..Evidence::default()
    })
}

/// The events of every job in the run directory, oldest first: the earlier jobs' as a resume
/// archived them (`history/job-<unix_ms>/`), then the last job's.
fn campaign_records(run_dir: &Path) -> Vec<phalanx_runtime::events::Record> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(run_dir.join("history"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().join("events.jsonl"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.push(run_dir.join("events.jsonl"));
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| phalanx_runtime::events::read(&text).0)
        .collect()
}

/// What the run with faults measured, beside its checks.
struct Outcome<'a> {
    code: i32,
    goodput: Option<f64>,
    /// Tokens/s over wall time against the fault-free run's.
    throughput: Option<f64>,
    memory: &'a [rss::RssSpan],
}

/// The chaos section of `report.json`.
fn record(
    run_dir: &Path,
    sc: &Scenario,
    seed: u64,
    o: &Outcome,
    faults: &Faults,
    e: &Evidence,
    checks: &[Check],
) -> Result<()> {
    let mut report = e.report.clone();
    report["chaos"] = json!({
        "scenario": sc.name,
        "goodput": o.goodput,
        "throughput_vs_fault_free": o.throughput,
        "memory": o.memory,
        "seed": seed,
        "launch_exit_code": o.code,
        "faults_planned": faults.summary(),
        "baseline_val_loss": e.baseline_val_loss,
        "checks": checks,
        "passed": checks.iter().all(|c| c.pass),
    });
    let path = run_dir.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn print(sc: &Scenario, seed: u64, checks: &[Check], kept: (Option<f64>, Option<f64>)) {
    let held = checks.iter().filter(|c| c.pass).count();
    let kept = match kept {
        (Some(g), Some(t)) => {
            format!("; goodput {g:.3} (time in steps over the training window, against the fault-free run's), tokens/s {t:.3} of its")
        }
        _ => String::new(),
    };
    outln!(
        "chaos {} (seed {seed}): {held} of {} invariants hold{kept}",
        sc.name,
        checks.len()
    );
    for c in checks {
        let mark = if c.pass { "ok  " } else { "FAIL" };
        outln!("  {mark} {}: {}", c.name, c.detail);
    }
}

/// Resident memory of the long-lived processes, from after the warm-up to the end.
fn print_memory(spans: &[rss::RssSpan]) {
    if spans.is_empty() {
        return;
    }
    let mib = |k: u64| k as f64 / 1024.0;
    let each: Vec<String> = spans
        .iter()
        .map(|s| {
            let who = if s.launcher { "launcher" } else { "pid" };
            format!(
                "{who} {} {:.0} -> {:.0} MiB",
                s.pid,
                mib(s.start_kib),
                mib(s.end_kib)
            )
        })
        .collect();
    outln!(
        "  memory (a third into the run, then at the end): {}",
        each.join("; ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch_placed::{PlacedFault, PlacedKind, Trigger};

    // A hang shorter than the heartbeat deadline plus two ticks is refused, saying the least
    // that would do; one that long is taken.
    #[test]
    fn a_hang_nobody_could_see_is_refused() {
        let cfg = TrainConfig::default();
        let hang = |ms| Faults {
            plan: crate::launch_schedule::Plan {
                placed: vec![PlacedFault {
                    at: Trigger::Step(1),
                    rank: 1,
                    kind: PlacedKind::Hang {
                        for_: std::time::Duration::from_millis(ms),
                    },
                }],
                ..Default::default()
            },
            ..Faults::default()
        };
        let least = cfg.coordinator.heartbeat_timeout_ms + 2 * cfg.coordinator.tick_ms;
        let err = check_hangs(&hang(least - 1), &cfg).unwrap_err().to_string();
        assert!(err.contains(&format!("at least {least}")), "{err}");
        assert!(check_hangs(&hang(least), &cfg).is_ok());
        assert!(check_hangs(&Faults::default(), &cfg).is_ok());
    }
}
