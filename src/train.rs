//! `phalanx train`: single-process training with the run directory, progress and Ctrl-C.

use crate::config::TrainConfig;
use crate::run_dir::RunDir;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use phalanx_actors::model_io;
use phalanx_model::data::Dataset;
use phalanx_model::device::{device_name, resolve_device};
use phalanx_model::gpt::Gpt;
use phalanx_model::optim::lr_at;
use phalanx_model::sampler::Sampler;
use phalanx_model::trainer::{Trainer, Windows};
use phalanx_runtime::events::Event;
use phalanx_runtime::metrics::{MetricLine, StepLine};
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

pub fn set_threads(threads: usize) -> usize {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    tch::set_num_threads(n as i32);
    n
}

pub use phalanx_actors::Setup;

pub fn setup(cfg: &TrainConfig) -> Result<Setup> {
    let threads = set_threads(cfg.train.threads);
    let device = resolve_device(&cfg.train.device)?;
    let ds = Dataset::open(&cfg.data.dir)?;
    let mcfg = cfg.model.resolve(ds.meta.vocab_size)?;
    let win = Windows {
        block: mcfg.block_size,
        seed: cfg.train.seed,
    };
    let n = win.count(ds.train.len());
    if n == 0 {
        anyhow::bail!(
            "the training split of {} has {} tokens, too few for model.block_size = {}; use more \
             text or a smaller block size",
            cfg.data.dir.display(),
            ds.train.len(),
            mcfg.block_size
        );
    }
    let sampler = Sampler::new(
        cfg.train.seed,
        n,
        cfg.train.global_batch,
        cfg.train.micro_batch,
    )?;
    let model = Gpt::new(&mcfg, device, cfg.train.seed as i64)?;
    let trainer = Trainer::new(model, cfg.optim.clone());
    Ok(Setup {
        ds,
        trainer,
        sampler,
        win,
        threads,
    })
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
    std::fs::write(
        cfg.run.dir.join("config.toml"),
        toml::to_string_pretty(cfg).context("config serializes")?,
    )?;
    let tokens_per_step = (cfg.train.global_batch * win.block) as f64;
    info!(
        params = trainer.model.num_params(),
        device = %device_name(device),
        threads,
        train_tokens = ds.train.len(),
        samples = sampler.num_samples(),
        steps_per_epoch = sampler.steps_per_epoch(),
        "training {} steps",
        cfg.train.max_steps
    );
    rd.event(Event::RunStarted {
        world_size: 1,
        params: trainer.model.num_params(),
        device: device_name(device),
        threads,
        max_steps: cfg.train.max_steps,
    })?;

    let pb = if progress {
        ProgressBar::new(cfg.train.max_steps)
    } else {
        ProgressBar::with_draw_target(Some(cfg.train.max_steps), ProgressDrawTarget::hidden())
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let eval = |trainer: &Trainer| {
        trainer.evaluate(&ds.val, win, cfg.train.eval_batches, cfg.train.micro_batch)
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
        if cfg.train.eval_interval > 0 && step % cfg.train.eval_interval == 0 && step > 0 {
            if let Some(v) = eval(&trainer) {
                last_val = Some(v);
                pb.suspend(|| info!(step, val_loss = format!("{v:.4}"), "validation"));
                rd.event(Event::Eval { step, val_loss: v })?;
            }
        }
        let lr = lr_at(&cfg.optim, step);
        let t0 = Instant::now();
        let (epoch, s) = sampler.locate(step);
        let batches: Vec<_> = (0..mbs)
            .map(|mb| {
                win.batch(
                    &ds.train,
                    epoch,
                    &sampler.micro_batch_ids(epoch, s, mb),
                    device,
                )
            })
            .collect();
        let loss = trainer.accumulate(&batches, mbs);
        let applied = trainer.apply_checked(lr);
        let dt = t0.elapsed();
        train_time += dt;
        let Some(grad_norm) = applied else {
            // Non-finite gradients: the update was not applied (the parameters are untouched).
            skipped += 1;
            trainer.step += 1;
            warn!(step, loss, "non-finite loss or gradient: step skipped");
            rd.event(Event::StepSkipped {
                step,
                loss: loss.to_string(),
                reason: "non-finite loss or gradient".into(),
            })?;
            if skipped >= 10 {
                anyhow::bail!(
                    "{skipped} steps had non-finite gradients; lower optim.lr or check the data"
                );
            }
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
            lr: Some(lr),
            tokens_per_s: Some(tps),
            step_ms: Some(secs * 1e3),
            grad_norm: Some(grad_norm),
            ..StepLine::default()
        }))?;
        pb.set_message(format!("loss {loss:.4} | {tps:.0} tok/s"));
        pb.inc(1);
        if !progress && cfg.train.log_interval > 0 && (step + 1) % cfg.train.log_interval == 0 {
            info!(
                step = step + 1,
                loss = format!("{loss:.4}"),
                tokens_per_s = format!("{tps:.0}"),
                lr
            );
        }
        if cfg.run.checkpoint_interval > 0 && trainer.step % cfg.run.checkpoint_interval == 0 {
            let dir = cfg
                .run
                .dir
                .join("checkpoints")
                .join(format!("step-{}", trainer.step));
            let t = Instant::now();
            model_io::save(&dir, &trainer, &ds.meta.tokenizer, ds.meta.vocab.clone())?;
            rd.event(Event::Checkpoint {
                step: trainer.step,
                dir: dir.clone(),
                stall_ms: t.elapsed().as_secs_f64() * 1e3,
            })?;
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
        if let Some(v) = eval(&trainer) {
            last_val = Some(v);
            info!(
                step = trainer.step,
                val_loss = format!("{v:.4}"),
                "validation"
            );
            rd.event(Event::Eval {
                step: trainer.step,
                val_loss: v,
            })?;
        }
    }
    let model_dir = cfg.run.dir.join("model");
    model_io::save(
        &model_dir,
        &trainer,
        &ds.meta.tokenizer,
        ds.meta.vocab.clone(),
    )?;
    let measured: Vec<f64> = step_secs
        .iter()
        .skip(step_secs.len().min(10))
        .copied()
        .collect();
    let mut m = if measured.is_empty() {
        step_secs.clone()
    } else {
        measured
    };
    let med = median(&mut m);
    let wall_s = wall.elapsed().as_secs_f64();
    let report = json!({
        "status": if interrupted { "interrupted" } else { "completed" },
        "steps": trainer.step,
        "skipped_steps": skipped,
        "final_train_loss": last_loss,
        "final_val_loss": last_val,
        "tokens_per_s": if med > 0.0 { tokens_per_step / med } else { 0.0 },
        "step_ms_median": med * 1e3,
        "wall_s": wall_s,
        "train_s": train_time.as_secs_f64(),
        "ettr": train_time.as_secs_f64() / wall_s,
        "world_size": 1,
        "params": trainer.model.num_params(),
        "device": device_name(device),
        "threads": threads,
        "model_dir": model_dir,
        "faults": [],
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
