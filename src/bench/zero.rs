//! `phalanx bench train --world N train.zero=1`: ZeRO-1 against replicated data parallel, side
//! by side in one run: the same job launched on N local ranks with `train.zero = 0` and `= 1`
//! in alternating order, each rank's training-state memory (what it recorded in
//! `memory.jsonl`), its peak RSS, and the median step time.

use super::launched::{common, in_turns, median_of, Run};
use anyhow::Result;
use std::path::Path;

/// Runs the comparison `runs` times and prints each run and the medians.
pub fn compare(
    config: &Path,
    overrides: &[String],
    world: usize,
    steps: u64,
    runs: usize,
) -> Result<()> {
    let common = common(overrides, "train.zero", steps);
    let skip = 10usize.min(steps as usize / 2);
    let job = (config, common.as_slice(), world, skip);
    let by_zero = in_turns(job, ("train.zero", ["0", "1"]), runs, |r, z, run: &Run| {
        outln!(
            "run {r} train.zero={z}: median step {:.2} ms; per rank: optimizer {} KiB, replicas {} KiB, peak RSS {} MiB",
            run.step_ms,
            run.optimizer / 1024,
            run.replicas / 1024,
            run.rss_kib / 1024
        );
    })?;
    let med = |z: usize, f: fn(&Run) -> f64| median_of(&by_zero[z], f);
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
