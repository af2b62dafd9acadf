//! `phalanx bench train --world N train.zero=1`: ZeRO-1 against replicated data parallel, side
//! by side in one run: the same job launched on N local ranks with `train.zero = 0` and `= 1`
//! in alternating order, each rank's training-state memory (what it recorded in
//! `memory.jsonl`), its peak RSS, and the median step time.

use crate::train::median;
use anyhow::Result;
use phalanx_runtime::metrics::MemoryLine;
use std::path::Path;

/// One launched run's figures.
struct Run {
    step_ms: f64,
    /// The largest over the ranks of each (bytes; KiB for RSS).
    optimizer: u64,
    replicas: u64,
    rss_kib: u64,
    params: u64,
}

fn launch(
    exe: &Path,
    config: &Path,
    common: &[String],
    world: usize,
    zero: u8,
    skip: usize,
) -> Result<Run> {
    let tmp = tempfile::tempdir()?;
    let run_dir = tmp.path().join("run");
    let out = std::process::Command::new(exe)
        .arg("launch")
        .args(["--world", &world.to_string(), "--config"])
        .arg(config)
        .args(common)
        .arg(format!("train.zero={zero}"))
        .arg(format!("run.dir={}", run_dir.display()))
        .stdout(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        let what = format!("the launched job (train.zero={zero})");
        return Err(super::train::launch_failed(&what, &out));
    }
    let jsonl = |name: &str| std::fs::read_to_string(run_dir.join(name)).unwrap_or_default();
    let mut steps: Vec<f64> = jsonl("metrics.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|m| m["step_ms"].as_f64())
        .skip(skip)
        .collect();
    let mem: Vec<MemoryLine> = jsonl("memory.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let most = |f: fn(&MemoryLine) -> u64| mem.iter().map(f).max().unwrap_or(0);
    Ok(Run {
        step_ms: median(&mut steps),
        optimizer: most(|m| m.optimizer_bytes),
        replicas: most(|m| m.replica_bytes),
        rss_kib: most(|m| m.peak_rss_kib.unwrap_or(0)),
        params: most(|m| m.params_bytes),
    })
}

/// Runs the comparison `runs` times and prints each run and the medians.
pub fn compare(
    config: &Path,
    overrides: &[String],
    world: usize,
    steps: u64,
    runs: usize,
) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut common: Vec<String> = overrides
        .iter()
        .filter(|o| !o.starts_with("train.zero="))
        .cloned()
        .collect();
    common.extend([
        format!("train.max_steps={steps}"),
        "run.checkpoint_interval=0".into(),
        "run.progress=false".into(),
        "coordinator.evict_stragglers=false".into(),
    ]);
    let skip = 10usize.min(steps as usize / 2);
    let mut by_zero: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for r in 0..runs {
        let order = if r % 2 == 0 { [0u8, 1] } else { [1, 0] };
        for z in order {
            let run = launch(&exe, config, &common, world, z, skip)?;
            outln!(
                "run {} train.zero={z}: median step {:.2} ms; per rank: optimizer {} KiB, replicas {} KiB, peak RSS {} MiB",
                r + 1,
                run.step_ms,
                run.optimizer / 1024,
                run.replicas / 1024,
                run.rss_kib / 1024
            );
            by_zero[z as usize].push(run);
        }
    }
    let med =
        |z: usize, f: fn(&Run) -> f64| median(&mut by_zero[z].iter().map(f).collect::<Vec<f64>>());
    let (rep, zero) = (med(0, |r| r.step_ms), med(1, |r| r.step_ms));
    let kib = |z: usize, f: fn(&Run) -> u64| by_zero[z].first().map_or(0, f) / 1024;
    outln!(
        "{world} ranks, {runs} runs of {steps} steps, parameters {} KiB per rank:",
        kib(0, |r| r.params)
    );
    outln!(
        "  replicated (train.zero=0): {rep:.2} ms per step; optimizer {} KiB per rank; peak RSS {:.0} MiB",
        kib(0, |r| r.optimizer),
        med(0, |r| r.rss_kib as f64) / 1024.0
    );
    outln!(
        "  ZeRO-1     (train.zero=1): {zero:.2} ms per step ({:+.1}%); optimizer shard {} KiB per rank ({:.3} of replicated) plus replicas {} KiB; peak RSS {:.0} MiB",
        (zero / rep - 1.0) * 100.0,
        kib(1, |r| r.optimizer),
        kib(1, |r| r.optimizer) as f64 / kib(0, |r| r.optimizer).max(1) as f64,
        kib(1, |r| r.replicas),
        med(1, |r| r.rss_kib as f64) / 1024.0
    );
    Ok(())
}
