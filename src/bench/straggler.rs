//! `phalanx bench straggler`: the straggler detector's trade-off, measured with real jobs on
//! this machine. For each setting: false flags per 10,000 rank-steps of a fault-free job
//! under a noisy neighbour (a busy loop on one core, 2 s every 10 s), against the steps it takes
//! to flag a rank capped at 25% of a core. Detection only (`evict_stragglers = false`), so that
//! no regroup changes what is measured.

use crate::report::{events_in, metrics_in};
use anyhow::{bail, Context, Result};
use phalanx_runtime::events::{Event, FaultKind, Record};
use phalanx_runtime::metrics::MetricLine;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A detector setting: a name and its coordinator overrides.
struct Setting {
    name: &'static str,
    overrides: &'static [&'static str],
}

const SETTINGS: [Setting; 3] = [
    Setting {
        name: "defaults",
        overrides: &[],
    },
    Setting {
        // No time bound, the severe bar of wave 1: three slow steps flag.
        name: "eager",
        overrides: &[
            "coordinator.straggler_flag_after_ms=0",
            "coordinator.straggler_severe_after_ms=0",
            "coordinator.straggler_severe_ratio=2.0",
        ],
    },
    Setting {
        name: "cautious",
        overrides: &[
            "coordinator.straggler_flag_after_ms=4000",
            "coordinator.straggler_severe_after_ms=800",
            "coordinator.straggler_severe_ratio=2.5",
        ],
    },
];

const QUOTA_RUNS: usize = 3;

/// Runs `phalanx launch` with `args` for at most `secs`, or until `done` holds of its events,
/// then Ctrl-C; returns its run dir.
fn launch(
    config: &Path,
    dir: &Path,
    args: &[String],
    secs: u64,
    done: &dyn Fn(&[Record]) -> bool,
) -> Result<PathBuf> {
    let run_dir = dir.join("run");
    let _ = std::fs::remove_dir_all(&run_dir);
    let mut child = Command::new(std::env::current_exe()?)
        .arg("launch")
        .arg("--config")
        .arg(config)
        .args(args)
        .arg(format!("run.dir={}", run_dir.display()))
        .env("PHALANX_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start phalanx launch")?;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if child.try_wait()?.is_some() {
            return Ok(run_dir);
        }
        if done(&events_in(&run_dir)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    crate::signals::send(crate::signals::Signal::Int, &[child.id()]);
    child.wait()?;
    Ok(run_dir)
}

/// False flags per 10,000 rank-steps, and the rank-steps, of a fault-free noisy run.
fn noisy(config: &Path, dir: &Path, s: &Setting, world: usize, secs: u64) -> Result<(f64, u64)> {
    let args = job_args(world, &["--noise", "2000:10000"], s);
    let run = launch(config, dir, &args, secs, &|_| false)?;
    let steps = metrics_in(&run)
        .iter()
        .filter_map(|m| match m {
            MetricLine::Step(s) => Some(s.step),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let flags = events_in(&run)
        .iter()
        .filter(|e| matches!(e.event, Event::StragglerFlagged(_)))
        .count();
    let rank_steps = steps * world as u64;
    if rank_steps == 0 {
        bail!("the noisy run committed no step; see {}", run.display());
    }
    Ok((flags as f64 * 1e4 / rank_steps as f64, rank_steps))
}

/// Steps from the quota to the flag, and from the first slowed step the flag's window shows.
fn quota(
    config: &Path,
    dir: &Path,
    s: &Setting,
    world: usize,
) -> Result<(Option<u64>, Option<u64>)> {
    let slow_at = format!("100:{}", slow_rank(world));
    let args = job_args(world, &["--slow-at", &slow_at], s);
    let flagged = |e: &[Record]| {
        e.iter()
            .any(|x| matches!(x.event, Event::StragglerFlagged(_)))
    };
    let run = launch(config, dir, &args, 60, &flagged)?;
    let events = events_in(&run);
    let Some(at) = events.iter().find_map(|e| match &e.event {
        Event::FaultInjected(f) if f.fault == FaultKind::CpuQuota => f.step,
        _ => None,
    }) else {
        bail!("the quota was never applied; see {}", run.display());
    };
    let Some(flag) = events.iter().find_map(|e| match &e.event {
        Event::StragglerFlagged(f) if f.at_step >= at => Some(f),
        _ => None,
    }) else {
        return Ok((None, None));
    };
    let flagged = flag.at_step;
    let peers = flag.peers_mb_ms;
    let window = &flag.recent_mb_ms;
    let first = (flagged + 1).saturating_sub(window.len() as u64);
    let onset = (0..window.len())
        .find(|&i| first + i as u64 >= at && window[i] > 1.75 * peers)
        .map(|i| flagged - (first + i as u64));
    Ok((Some(flagged - at), onset))
}

/// The rank the quota goes on: rank 2, or the last one of a smaller world.
fn slow_rank(world: usize) -> usize {
    2.min(world - 1)
}

/// The job both runs use: the Shakespeare model a new user runs, four micro-batches, no
/// straggler actions, long enough for the run time; then the fault and the setting.
fn job_args(world: usize, fault: &[&str], s: &Setting) -> Vec<String> {
    let nproc = world.to_string();
    ["--world", nproc.as_str()]
        .iter()
        .chain(fault)
        .chain(&[
            "train.micro_batch=4",
            "train.max_steps=1000000",
            "optim.decay_steps=1000000",
            "coordinator.evict_stragglers=false",
        ])
        .chain(s.overrides)
        .map(|x| x.to_string())
        .collect()
}

pub fn run(config: &Path, world: usize, secs: u64) -> Result<()> {
    if !config.is_file() {
        bail!(
            "no config at {}: pass --config (the default is configs/shakespeare-char.toml, \
             relative to the repository)",
            config.display()
        );
    }
    let tmp = tempfile::tempdir()?;
    outln!(
        "straggler detection: {world} ranks; noisy neighbour 2 s busy every 10 s for {secs} s; \
         25% CPU quota on rank {} at step 100",
        slow_rank(world)
    );
    outln!(
        "{:<10} {:>16} {:>10} {:>22} {:>22}",
        "setting",
        "false flags/10k",
        "rank-steps",
        "quota: steps to flag",
        "from first slowed step"
    );
    outln!("(false flags per 10,000 rank-steps; quota: 3 runs each, - = not flagged in 60 s)");
    for s in &SETTINGS {
        eprintln!("[bench] {}: noisy run ({secs} s)", s.name);
        let (false_rate, rank_steps) = noisy(config, tmp.path(), s, world, secs)?;
        // The quota bites a step or a few after it is set, differently each time: three runs.
        let mut to_flag = Vec::new();
        let mut from_onset = Vec::new();
        for i in 1..=QUOTA_RUNS {
            eprintln!("[bench] {}: quota run {i}/{QUOTA_RUNS}", s.name);
            let (a, b) = quota(config, tmp.path(), s, world)?;
            to_flag.push(a);
            from_onset.push(b);
        }
        let show = |x: &[Option<u64>]| {
            x.iter()
                .map(|v| v.map_or("-".to_string(), |v| v.to_string()))
                .collect::<Vec<_>>()
                .join(",")
        };
        outln!(
            "{:<10} {:>16.2} {:>10} {:>22} {:>22}",
            s.name,
            false_rate,
            rank_steps,
            show(&to_flag),
            show(&from_onset)
        );
        if !s.overrides.is_empty() {
            outln!("{:<10} {}", "", s.overrides.join(" "));
        }
    }
    Ok(())
}
