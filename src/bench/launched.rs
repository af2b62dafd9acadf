//! One job run under `phalanx launch` for a benchmark that compares variants of it, and the
//! figures it recorded: median step time, final loss, each rank's training-state memory.

use crate::train::median;
use anyhow::Result;
use phalanx_runtime::metrics::MemoryLine;
use std::path::Path;

/// One launched run's figures.
pub struct Run {
    pub step_ms: f64,
    /// The last training loss recorded.
    pub loss: f64,
    /// The largest over the ranks of each (bytes; KiB for RSS).
    pub optimizer: u64,
    pub replicas: u64,
    pub rss_kib: u64,
    pub params: u64,
}

/// Launches the job of `config` with the `common` overrides and then the `variant`'s on `world`
/// local ranks, and reads its figures; the first `skip` steps (start-up) are left out of the
/// median.
pub fn launch(
    config: &Path,
    common: &[String],
    variant: &[String],
    world: usize,
    skip: usize,
) -> Result<Run> {
    let tmp = tempfile::tempdir()?;
    let run_dir = tmp.path().join("run");
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("launch")
        .args(["--world", &world.to_string(), "--config"])
        .arg(config)
        .args(common)
        .args(variant)
        .arg(format!("run.dir={}", run_dir.display()))
        .stdout(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        let what = format!("the launched job ({})", variant.join(" "));
        return Err(super::train::launch_failed(&what, &out));
    }
    let jsonl = |name: &str| std::fs::read_to_string(run_dir.join(name)).unwrap_or_default();
    let metrics: Vec<serde_json::Value> = jsonl("metrics.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut steps: Vec<f64> = metrics
        .iter()
        .filter_map(|m| m["step_ms"].as_f64())
        .skip(skip)
        .collect();
    let loss = metrics
        .iter()
        .rev()
        .find_map(|m| m["loss"].as_f64())
        .unwrap_or(f64::NAN);
    let mem: Vec<MemoryLine> = jsonl("memory.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let most = |f: fn(&MemoryLine) -> u64| mem.iter().map(f).max().unwrap_or(0);
    Ok(Run {
        step_ms: median(&mut steps),
        loss,
        optimizer: most(|m| m.optimizer_bytes),
        replicas: most(|m| m.replica_bytes),
        rss_kib: most(|m| m.peak_rss_kib.unwrap_or(0)),
        params: most(|m| m.params_bytes),
    })
}

/// The overrides every variant of a comparison shares: the caller's (less the compared key),
/// the steps, and no checkpoints, progress lines or straggler actions to blur the figures.
pub fn common(overrides: &[String], compared: &str, steps: u64) -> Vec<String> {
    let mut common: Vec<String> = overrides
        .iter()
        .filter(|o| !o.starts_with(&format!("{compared}=")))
        .cloned()
        .collect();
    common.extend([
        format!("train.max_steps={steps}"),
        "run.checkpoint_interval=0".into(),
        "run.progress=false".into(),
        "coordinator.evict_stragglers=false".into(),
    ]);
    common
}

/// Runs the job with the `key=value0` and `key=value1` variants `runs` times each, in
/// alternating order (value0 first in odd runs) so that the machine's drift falls on both,
/// saying each run with `say(run, variant, figures)`. Every run's figures, by variant.
pub fn in_turns(
    (config, common, world, skip): (&Path, &[String], usize, usize),
    (key, values): (&str, [&str; 2]),
    runs: usize,
    mut say: impl FnMut(usize, usize, &Run),
) -> Result<[Vec<Run>; 2]> {
    let mut by: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for r in 0..runs {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for v in order {
            let run = launch(
                config,
                common,
                &[format!("{key}={}", values[v])],
                world,
                skip,
            )?;
            say(r + 1, v, &run);
            by[v].push(run);
        }
    }
    Ok(by)
}

/// The median over `runs` of one figure.
pub fn median_of<T>(runs: &[T], f: fn(&T) -> f64) -> f64 {
    crate::train::median(&mut runs.iter().map(f).collect::<Vec<f64>>())
}
