//! `phalanx bench train --world N train.deterministic=true`: what deterministic mode costs,
//! side by side in one run: the same job launched on N local ranks with `train.deterministic`
//! false and true in alternating order, both with one libtorch thread per rank (deterministic
//! mode's), and the median step time of each.

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
    let mut common = common(overrides, "train.deterministic", steps);
    // One thread per rank on both sides: deterministic mode's, whatever the config says
    // (`train.threads` is the whole job's budget, shared by its ranks).
    common.retain(|o| !o.starts_with("train.threads="));
    common.push(format!("train.threads={world}"));
    let skip = 10usize.min(steps as usize / 2);
    let job = (config, common.as_slice(), world, skip);
    let modes = ("train.deterministic", ["false", "true"]);
    let by_mode = in_turns(job, modes, runs, |r, d, run: &Run| {
        outln!(
            "run {r} train.deterministic={}: median step {:.2} ms, final train loss {:.4}",
            d == 1,
            run.step_ms,
            run.loss
        );
    })?;
    let med = |d: usize, f: fn(&Run) -> f64| median_of(&by_mode[d], f);
    let (default, det) = (med(0, |r| r.step_ms), med(1, |r| r.step_ms));
    outln!(
        "median over {runs} runs of {steps} steps on {world} ranks, 1 thread each: default \
         {default:.2} ms per step, deterministic {det:.2} ms ({:+.1}%); final train loss {:.4} vs \
         {:.4}",
        (det / default - 1.0) * 100.0,
        med(0, |r| r.loss),
        med(1, |r| r.loss)
    );
    Ok(())
}
