//! `phalanx train`: single-process training with the run directory, progress and Ctrl-C.

use crate::config::TrainConfig;
use crate::run_dir::RunDir;
use anyhow::{Context, Result};

use phalanx_model::data::Dataset;
use phalanx_model::device::device_name;
use phalanx_model::io as model_io;
use phalanx_model::optim::lr_at;
use phalanx_model::sampler::Sampler;
use phalanx_model::setup::SetupSpec;
use phalanx_model::trainer::{Trainer, Windows};
use phalanx_runtime::events::Event;
use phalanx_runtime::metrics::{FinalLine, MetricLine, StepLine};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub struct Outcome {
    pub report: Value,
    pub interrupted: bool,
}

pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub use phalanx_model::Setup;

/// The run's model, data and sampler, as its config describes them.
pub fn setup(cfg: &TrainConfig) -> phalanx_model::Result<Setup> {
    let spec = SetupSpec {
        data_dir: &cfg.data.dir,
        device: &cfg.train.device,
        threads: cfg.train.threads,
        lanes: cfg.train.lanes,
        seed: cfg.train.seed,
        global_batch: cfg.train.global_batch,
        micro_batch: cfg.train.micro_batch,
        optim: cfg.optim.clone(),
    };
    Setup::build(&spec, |vocab| cfg.model.resolve(vocab))
}

pub fn run(cfg: &TrainConfig, stop: &AtomicBool, progress: bool) -> Result<Outcome> {
    let wall = Instant::now();
    let Setup {
        ds,
        mut trainer,
        sampler,
        win,
        threads,
    } = setup(cfg)?;
    let device = trainer.model.device();
    let mut rd = RunDir::create(&cfg.run.dir)?;
    announce(cfg, &mut rd, &trainer, &ds, &sampler, threads)?;
    let tokens_per_step = (cfg.train.global_batch * win.block) as f64;
    let pb = crate::launch::progress_bar(progress, cfg.train.max_steps);
    let eval = |trainer: &Trainer| {
        trainer.evaluate(
            &ds.val,
            win,
            cfg.train.eval_sequences,
            cfg.train.micro_batch,
        )
    };
    let mbs = sampler.micro_batches_per_step();
    let mut step_secs = Vec::with_capacity(cfg.train.max_steps as usize);
    let mut train_time = Duration::ZERO;
    let mut last_loss = f64::NAN;
    let mut last_val = None;
    let mut skipped = 0u64;
    let mut interrupted = false;
    while trainer.step < cfg.train.max_steps {
        let step = trainer.step;
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let mut val_now = None;
        if cfg.train.eval_interval > 0 && step % cfg.train.eval_interval == 0 && step > 0 {
            if let Some(v) = eval(&trainer) {
                last_val = Some(v);
                val_now = Some(v);
                pb.suspend(|| info!(step, val_loss = format!("{v:.4}"), "validation"));
                rd.event(Event::Eval { step, val_loss: v })?;
            }
        }
        let lr = lr_at(&cfg.optim, step);
        let t0 = Instant::now();
        let batches = step_batches(&ds, &sampler, win, device, step);
        let local = trainer.local_step(&batches, mbs);
        let loss = local.loss;
        let applied = trainer.apply_local(local, lr);
        let dt = t0.elapsed();
        train_time += dt;
        let Some(grad_norm) = applied else {
            skipped += 1;
            trainer.step += 1;
            skip_step(&mut rd, step, loss, skipped)?;
            continue;
        };
        last_loss = loss;
        let secs = dt.as_secs_f64();
        step_secs.push(secs);
        let tps = tokens_per_step / secs;
        rd.metric(&MetricLine::Step(StepLine {
            step,
            generation: 0,
            world_size: 1,
            unix_ms: Some(phalanx_runtime::events::unix_ms()),
            loss: Some(loss),
            val_loss: val_now,
            lr: Some(lr),
            tokens_per_s: Some(tps),
            step_ms: Some(secs * 1e3),
            grad_norm: Some(grad_norm),
            ..StepLine::default()
        }))?;
        pb.set_message(format!("loss {loss:.4} | {tps:.0} tok/s"));
        pb.inc(1);
        if !progress && cfg.train.log_interval > 0 && (step + 1) % cfg.train.log_interval == 0 {
            // The step's index, as in metrics.jsonl.
            info!(
                step,
                loss = format!("{loss:.4}"),
                tokens_per_s = format!("{tps:.0}"),
                lr
            );
        }
        if cfg.run.checkpoint_interval > 0 && trainer.step % cfg.run.checkpoint_interval == 0 {
            checkpoint(cfg, &mut rd, &trainer, &ds)?;
        }
    }
    pb.finish_and_clear();
    if interrupted {
        warn!(
            step = trainer.step,
            "interrupted: saving the model and the report"
        );
        rd.event(Event::Interrupted { step: trainer.step })?;
    }
    if trainer.step > 0 {
        last_val = final_validation(&mut rd, trainer.step, eval(&trainer))?.or(last_val);
    }
    let model_dir = save_final(cfg, &mut rd, &trainer, &ds, last_val, interrupted)?;
    let wall_s = wall.elapsed().as_secs_f64();
    let report = summary(&Summary {
        status: if interrupted {
            "interrupted"
        } else {
            "completed"
        },
        trainer: &trainer,
        skipped,
        last_loss,
        last_val,
        tokens_per_step,
        max_steps: cfg.train.max_steps,
        step_secs: &step_secs,
        wall_s,
        train_s: train_time.as_secs_f64(),
        threads,
        model_dir: &model_dir,
    });
    rd.event(Event::RunFinished {
        status: if interrupted {
            "interrupted"
        } else {
            "completed"
        }
        .into(),
        steps: trainer.step,
    })?;
    rd.write_report(&report)?;
    Ok(Outcome {
        report,
        interrupted,
    })
}

/// The final model's validation loss, said and recorded.
fn final_validation(rd: &mut RunDir, step: u64, val: Option<f64>) -> Result<Option<f64>> {
    if let Some(v) = val {
        info!(step, val_loss = format!("{v:.4}"), "validation");
        rd.event(Event::Eval { step, val_loss: v })?;
    }
    Ok(val)
}

/// The model saved, then the final metrics line (the same a multi-rank job writes); the model's
/// folder.
fn save_final(
    cfg: &TrainConfig,
    rd: &mut RunDir,
    trainer: &Trainer,
    ds: &Dataset,
    val_loss: Option<f64>,
    interrupted: bool,
) -> Result<std::path::PathBuf> {
    let model_dir = cfg.run.dir.join("model");
    model_io::save(
        &model_dir,
        trainer,
        &ds.meta.tokenizer,
        ds.meta.vocab.clone(),
    )?;
    rd.metric(&MetricLine::Final(FinalLine {
        is_final: true,
        step: trainer.step,
        val_loss,
        peer_lost_at_end: None,
        // Stopped on request after a step, with the model saved: what a multi-rank job calls
        // preempted (C-8), so a report rebuilt from this log never says "completed".
        preempted: interrupted,
        unix_ms: phalanx_runtime::events::unix_ms(),
    }))?;
    Ok(model_dir)
}

/// The micro-batches of `step`, from its place in its epoch's permutation.
fn step_batches(
    ds: &Dataset,
    sampler: &Sampler,
    win: Windows,
    device: tch::Device,
    step: u64,
) -> Vec<(tch::Tensor, tch::Tensor)> {
    let (epoch, s) = sampler.locate(step);
    (0..sampler.micro_batches_per_step())
        .map(|mb| {
            win.batch(
                &ds.train,
                epoch,
                &sampler.micro_batch_ids(epoch, s, mb),
                device,
            )
        })
        .collect()
}

/// A checkpoint of the model at its current step, with the time it stalled training.
fn checkpoint(cfg: &TrainConfig, rd: &mut RunDir, trainer: &Trainer, ds: &Dataset) -> Result<()> {
    let dir = cfg
        .run
        .dir
        .join("checkpoints")
        .join(format!("step-{}", trainer.step));
    let t = Instant::now();
    model_io::save(&dir, trainer, &ds.meta.tokenizer, ds.meta.vocab.clone())?;
    rd.event(Event::Checkpoint {
        step: trainer.step,
        dir,
        stall_ms: t.elapsed().as_secs_f64() * 1e3,
    })?;
    Ok(())
}

/// The median step time once warmed up (the first 10 steps left out when there are more).
fn steady_step_secs(step_secs: &[f64]) -> f64 {
    let mut m: Vec<f64> = step_secs
        .iter()
        .skip(step_secs.len().min(10))
        .copied()
        .collect();
    if m.is_empty() {
        m = step_secs.to_vec();
    }
    median(&mut m)
}

/// What `phalanx train`'s report is made of.
struct Summary<'a> {
    status: &'static str,
    trainer: &'a Trainer,
    skipped: u64,
    last_loss: f64,
    last_val: Option<f64>,
    tokens_per_step: f64,
    max_steps: u64,
    step_secs: &'a [f64],
    wall_s: f64,
    train_s: f64,
    threads: usize,
    model_dir: &'a std::path::Path,
}

fn summary(x: &Summary) -> Value {
    let med = steady_step_secs(x.step_secs);
    // Throughput three ways, each named: `tokens_per_s` is the median step's rate (the
    // machine's speed), the others what the run did over its wall and training time.
    let tokens = x.step_secs.len() as f64 * x.tokens_per_step;
    json!({
        "status": x.status,
        "steps": x.trainer.step,
        "max_steps": x.max_steps,
        "skipped_steps": x.skipped,
        "final_train_loss": x.last_loss,
        "final_val_loss": x.last_val,
        "tokens_per_s": if med > 0.0 { x.tokens_per_step / med } else { 0.0 },
        "tokens": tokens,
        "tokens_per_s_wall": tokens / x.wall_s.max(1e-9),
        "tokens_per_s_train": tokens / x.train_s.max(1e-9),
        "step_ms_median": med * 1e3,
        "wall_s": x.wall_s,
        "train_s": x.train_s,
        "ettr": x.train_s / x.wall_s,
        "world_size": 1,
        "params": x.trainer.model.num_params(),
        "device": device_name(x.trainer.model.device()),
        "threads": x.threads,
        "model_dir": x.model_dir,
        "faults": [],
    })
}

/// Non-finite gradients: the update was not applied (the parameters are untouched). Ten such
/// steps end the run with what to do.
fn skip_step(rd: &mut RunDir, step: u64, loss: f64, skipped: u64) -> Result<()> {
    warn!(step, loss, "non-finite loss or gradient: step skipped");
    rd.event(Event::StepSkipped {
        step,
        loss: loss.to_string(),
        reason: "non-finite loss or gradient".into(),
    })?;
    // The same line a multi-rank run writes for a skipped step (one schema for both).
    rd.metric(&MetricLine::Step(StepLine {
        step,
        world_size: 1,
        unix_ms: Some(phalanx_runtime::events::unix_ms()),
        loss: Some(loss),
        grad_norm: None,
        skipped: true,
        ..StepLine::default()
    }))?;
    if skipped >= 10 {
        anyhow::bail!("{skipped} steps had non-finite gradients; lower optim.lr or check the data");
    }
    Ok(())
}

/// The run's config in its directory, and what is about to be trained, said and recorded.
fn announce(
    cfg: &TrainConfig,
    rd: &mut RunDir,
    trainer: &Trainer,
    ds: &Dataset,
    sampler: &Sampler,
    threads: usize,
) -> Result<()> {
    std::fs::write(
        cfg.run.dir.join("config.toml"),
        toml::to_string_pretty(cfg).context("config serializes")?,
    )?;
    let device = trainer.model.device();
    info!(
        params = trainer.model.num_params(),
        device = %device_name(device),
        threads,
        train_tokens = ds.train.len(),
        samples = sampler.num_samples(),
        steps_per_epoch = sampler.steps_per_epoch(),
        "training {}",
        crate::output::count(cfg.train.max_steps, "step")
    );
    rd.event(Event::RunStarted {
        world_size: 1,
        params: trainer.model.num_params(),
        device: device_name(device),
        threads,
        max_steps: cfg.train.max_steps,
    })?;
    Ok(())
}
