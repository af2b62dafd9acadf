//! `phalanx bench train --torch SCRIPT`: phalanx's training against PyTorch's on the same model,
//! batch, micro-batches, threads per rank, steps and learning-rate schedule, in turns in one
//! run. One rank against PyTorch eager (`python SCRIPT`), N ranks against DDP over gloo
//! (`torchrun --nproc-per-node N SCRIPT`). SCRIPT is a nanoGPT reference that takes nanoGPT's
//! hyperparameters as flags and prints `tokens_per_s_median T final_train_loss L` last.

use crate::config::TrainConfig;
use crate::train::median;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::launched::median_of;
use super::train::launch_failed;

/// What one run reported: tokens/s over its median step, and its last training loss.
#[derive(Debug, Clone, Copy)]
struct Figures {
    tokens_per_s: f64,
    loss: f64,
}

/// The comparison, as the command line gave it.
pub struct Versus<'a> {
    pub cfg: &'a TrainConfig,
    pub config: &'a Path,
    pub overrides: &'a [String],
    pub script: &'a Path,
    pub world: usize,
    pub steps: u64,
    pub runs: usize,
}

fn venv(tool: &str) -> PathBuf {
    let p = Path::new(".venv/bin").join(tool);
    if p.exists() {
        p
    } else {
        PathBuf::from(tool)
    }
}

impl Versus<'_> {
    fn threads(&self) -> usize {
        let budget = match self.cfg.train.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        };
        (budget / self.world).max(1)
    }

    /// The model as the job resolves it (the vocabulary does not change its shape's flags).
    fn model(&self) -> Result<phalanx_model::config::ModelConfig> {
        self.cfg.model.resolve(256).context("resolving the model")
    }

    /// The reference's flags for the job phalanx runs.
    fn torch_args(&self) -> Result<Vec<String>> {
        let t = &self.cfg.train;
        let m = self.model()?;
        Ok([
            ("--iters", self.steps.to_string()),
            ("--threads", self.threads().to_string()),
            ("--batch", t.global_batch.to_string()),
            ("--micro-batch", t.micro_batch.to_string()),
            ("--block", m.block_size.to_string()),
            ("--n-layer", m.n_layer.to_string()),
            ("--n-head", m.n_head.to_string()),
            ("--n-embd", m.n_embd.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect())
    }

    /// The reference's figures. torchrun's ranks sometimes abort at start-up here (SIGABRT
    /// before the first step, about one run in five at 4 ranks on 2 cores): such a run is said
    /// and made once more.
    fn torch(&self) -> Result<Figures> {
        self.torch_once().or_else(|e| {
            outln!("# {e:#}; running it once more");
            self.torch_once()
        })
    }

    fn torch_once(&self) -> Result<Figures> {
        let mut cmd = if self.world == 1 {
            Command::new(venv("python"))
        } else {
            let mut c = Command::new(venv("torchrun"));
            // A free port of its own, not 29500, which another job may hold.
            c.arg("--standalone");
            c.args(["--nproc-per-node", &self.world.to_string()]);
            c
        };
        let out = cmd
            .arg(self.script)
            .arg(&self.cfg.data.dir)
            .args(self.torch_args()?)
            .output()
            .with_context(|| format!("running {}", self.script.display()))?;
        if !out.status.success() {
            return Err(launch_failed("the PyTorch reference", &out));
        }
        parse_reference(&String::from_utf8_lossy(&out.stdout))
    }

    fn phalanx(&self) -> Result<Figures> {
        let tmp = tempfile::tempdir()?;
        let run_dir = tmp.path().join("run");
        let out = Command::new(std::env::current_exe()?)
            .arg("launch")
            .args(["--world", &self.world.to_string(), "--config"])
            .arg(self.config)
            .args(self.overrides)
            .arg(format!("train.max_steps={}", self.steps))
            // The reference's cosine ends at its last step.
            .arg(format!("optim.decay_steps={}", self.steps))
            .arg(format!("train.threads={}", self.threads() * self.world))
            .args(["run.checkpoint_interval=0", "run.progress=false"])
            .arg(format!("run.dir={}", run_dir.display()))
            .stdout(std::process::Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(launch_failed("the launched job", &out));
        }
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let mut steps: Vec<f64> = lines.iter().filter_map(|m| m["step_ms"].as_f64()).collect();
        let loss = lines
            .iter()
            .rev()
            .find_map(|m| m["loss"].as_f64())
            .ok_or_else(|| anyhow!("the launched job recorded no loss"))?;
        let tokens = (self.cfg.train.global_batch * self.model()?.block_size) as f64;
        Ok(Figures {
            tokens_per_s: tokens / (median(&mut steps) / 1e3),
            loss,
        })
    }
}

/// `tokens_per_s_median T final_train_loss L` from the reference's output.
fn parse_reference(out: &str) -> Result<Figures> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with("tokens_per_s_median"))
        .ok_or_else(|| anyhow!("the reference printed no tokens_per_s_median line:\n{out}"))?;
    let w: Vec<&str> = line.split_whitespace().collect();
    match (w.get(1).map(|s| s.parse()), w.get(3).map(|s| s.parse())) {
        (Some(Ok(tokens_per_s)), Some(Ok(loss))) => Ok(Figures { tokens_per_s, loss }),
        _ => bail!("cannot read the reference's figures from {line:?}"),
    }
}

/// Runs both in turns (phalanx first in odd runs) and prints each run and the medians.
pub fn run(v: &Versus) -> Result<()> {
    let what = if v.world == 1 {
        "PyTorch eager"
    } else {
        "PyTorch DDP over gloo"
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for r in 0..v.runs {
        let (a, b) = if r % 2 == 0 {
            let a = v.phalanx()?;
            (a, v.torch()?)
        } else {
            let b = v.torch()?;
            (v.phalanx()?, b)
        };
        outln!(
            "run {}: phalanx {:.0} tokens/s (loss {:.4}), {what} {:.0} tokens/s (loss {:.4}): {:.2}x",
            r + 1,
            a.tokens_per_s,
            a.loss,
            b.tokens_per_s,
            b.loss,
            a.tokens_per_s / b.tokens_per_s
        );
        ours.push(a);
        theirs.push(b);
    }
    let med = median_of::<Figures>;
    let (ot, tt) = (
        med(&ours, |f| f.tokens_per_s),
        med(&theirs, |f| f.tokens_per_s),
    );
    let (ol, tl) = (med(&ours, |f| f.loss), med(&theirs, |f| f.loss));
    // Each run's two sides ran back to back: the median of their ratios is blind to the
    // machine's speed drifting between runs, which moves both medians here by up to a fifth.
    let pairs: Vec<(&Figures, &Figures)> = ours.iter().zip(&theirs).collect();
    let paired = median_of(&pairs, |(a, b)| a.tokens_per_s / b.tokens_per_s);
    outln!(
        "median over {} runs of {} steps on {} rank(s), {} thread(s) each: phalanx {ot:.0} \
         tokens/s, {what} {tt:.0}: {:.2}x (median of the runs' ratios {paired:.2}x); final \
         train loss {ol:.4} vs {tl:.4} ({:+.4})",
        v.runs,
        v.steps,
        v.world,
        v.threads(),
        ot / tt,
        ol - tl
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_references_last_line_is_read_and_garbage_is_an_error() {
        let f = parse_reference(
            "step 500 val_loss 2.1\ntokens_per_s_median 15998 final_train_loss 1.8927\n",
        )
        .unwrap();
        assert_eq!((f.tokens_per_s, f.loss), (15998.0, 1.8927));
        assert!(parse_reference("nothing here").is_err());
        assert!(parse_reference("tokens_per_s_median x final_train_loss y").is_err());
    }
}
