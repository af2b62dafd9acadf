//! `phalanx chaos`: a local job with a scenario's faults placed by a seed, its invariants
//! checked from the run directory, and a `chaos` section in its `report.json`: each check
//! with pass or fail, beside the report's faults (detection, recovery, lost steps) and ETTR.
//! A fault-free run of the same config and seed comes first, for the validation loss to be
//! compared with.

pub mod invariants;
pub mod scenario;

use crate::config::TrainConfig;
use crate::launch::{self, LaunchArgs};
use crate::launch_hosts::HostArgs;
use anyhow::{bail, Context, Result};
use invariants::{Check, Evidence};
use scenario::{Faults, Scenario, SCENARIOS};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct ChaosCli {
    /// The scenario to run; `list` lists them.
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
        for s in SCENARIOS {
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
    let Some(sc) = scenario::find(&c.scenario) else {
        bail!(
            "no scenario {:?}; `phalanx chaos --scenario list` lists them",
            c.scenario
        );
    };
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
    let mut code = launch::run(&a, stop.clone())?;
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
    e.baseline_val_loss = baseline;
    e.val_tolerance = c.val_tolerance;
    e.planned = faults.injected_kinds();
    e.planned_nans = faults.nans();
    e.planned_admin = faults.admin();
    let checks = invariants::checks(&e);
    record(&run_dir, sc, c.seed, code, &faults, &e, &checks)?;
    print(sc, c.seed, &checks);
    Ok(if checks.iter().all(|c| c.pass) { 0 } else { 1 })
}

/// The same job without faults: its final validation loss.
fn fault_free(
    c: &ChaosCli,
    sc: &Scenario,
    hosts: Option<usize>,
    overrides: &[String],
    run_dir: &Path,
    stop: Arc<AtomicBool>,
) -> Result<f64> {
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
        (0, Some(v)) => Ok(v),
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

/// The chaos section of `report.json`.
fn record(
    run_dir: &Path,
    sc: &Scenario,
    seed: u64,
    code: i32,
    faults: &Faults,
    e: &Evidence,
    checks: &[Check],
) -> Result<()> {
    let mut report = e.report.clone();
    report["chaos"] = json!({
        "scenario": sc.name,
        "seed": seed,
        "launch_exit_code": code,
        "faults_planned": format!("{faults:?}"),
        "baseline_val_loss": e.baseline_val_loss,
        "checks": checks,
        "passed": checks.iter().all(|c| c.pass),
    });
    let path = run_dir.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn print(sc: &Scenario, seed: u64, checks: &[Check]) {
    let held = checks.iter().filter(|c| c.pass).count();
    outln!(
        "chaos {} (seed {seed}): {held} of {} invariants hold",
        sc.name,
        checks.len()
    );
    for c in checks {
        let mark = if c.pass { "ok  " } else { "FAIL" };
        outln!("  {mark} {}: {}", c.name, c.detail);
    }
}
