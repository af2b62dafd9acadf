//! `phalanx bench train`: tokens/s of the full `train` path against a bare tch loop on the same
//! model, batch size and threads, in the same process.

use crate::config::TrainConfig;
use crate::train::{self, median};
use anyhow::Result;
use phalanx_model::gpt::Gpt;
use std::sync::atomic::AtomicBool;
use std::time::Instant;
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

/// The loop a tch user would write by hand: a fixed batch, tch's own AdamW (C++), no sampler,
/// no run directory, no metrics. Returns the median step time in seconds over `steps`.
fn bare_loop(cfg: &TrainConfig, steps: u64) -> Result<f64> {
    let s = train::setup(cfg)?;
    let model: &Gpt = &s.trainer.model;
    let vs = nn::VarStore::new(model.device());
    for spec in &model.params.specs {
        let group = if spec.decay { 0 } else { 1 };
        let _ = vs.root().set_group(group).add(
            &spec.name.replace('.', "_"),
            model.params.get(&spec.name).shallow_clone(),
            true,
        );
    }
    let o = &cfg.optim;
    let mut opt = nn::AdamW {
        beta1: o.beta1,
        beta2: o.beta2,
        wd: o.weight_decay,
        eps: o.eps,
        amsgrad: false,
    }
    .build(&vs, o.lr)?;
    opt.set_weight_decay_group(1, 0.0);
    let (b, t) = (cfg.train.micro_batch as i64, model.cfg.block_size as i64);
    let mbs = cfg.train.global_batch / cfg.train.micro_batch;
    let v = model.cfg.vocab_size as i64;
    let x = Tensor::randint(v, [b, t], (Kind::Int64, model.device()));
    let y = Tensor::randint(v, [b, t], (Kind::Int64, model.device()));
    let mut times = Vec::new();
    for step in 0..steps {
        let t0 = Instant::now();
        opt.set_lr(phalanx_model::optim::lr_at(o, step));
        opt.zero_grad();
        for _ in 0..mbs {
            (model.loss(&x, &y, true) / mbs as f64).backward();
        }
        opt.clip_grad_norm(o.grad_clip);
        opt.step();
        times.push(t0.elapsed().as_secs_f64());
    }
    let mut measured: Vec<f64> = times.into_iter().skip(10).collect();
    Ok(median(&mut measured))
}

pub fn run(cfg: &TrainConfig, steps: u64, runs: usize) -> Result<()> {
    let mut cfg = cfg.clone();
    cfg.train.max_steps = steps;
    cfg.train.eval_interval = 0;
    cfg.train.eval_batches = 1;
    cfg.run.checkpoint_interval = 0;
    let tmp = tempfile::tempdir()?;
    cfg.run.dir = tmp.path().join("run");
    let tokens = (cfg.train.global_batch * cfg.model.resolve(1)?.block_size) as f64;
    let stop = AtomicBool::new(false);
    let (mut full, mut bare) = (Vec::new(), Vec::new());
    for r in 0..runs {
        // Alternate the order so that neither side always runs on a warmer machine.
        let mut one = |first_full: bool| -> Result<()> {
            for which in if first_full {
                [true, false]
            } else {
                [false, true]
            } {
                if which {
                    let out = train::run(&cfg, &stop, false)?;
                    full.push(out.report["tokens_per_s"].as_f64().unwrap_or(0.0));
                } else {
                    bare.push(tokens / bare_loop(&cfg, steps)?);
                }
            }
            Ok(())
        };
        one(r % 2 == 0)?;
        println!(
            "run {}: phalanx train {:.0} tok/s, bare tch loop {:.0} tok/s",
            r + 1,
            full[r],
            bare[r]
        );
    }
    let (f, b) = (median(&mut full), median(&mut bare));
    println!(
        "median over {runs} runs of {steps} steps: phalanx train {f:.0} tok/s, bare tch loop {b:.0} tok/s, overhead {:+.2}%",
        (b / f - 1.0) * 100.0
    );
    Ok(())
}
