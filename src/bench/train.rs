//! `phalanx bench train`: tokens/s of the full `train` path against a bare tch loop on the same
//! model, batch size and threads, in the same process.

use crate::config::TrainConfig;
use crate::train::{self, median};
use anyhow::{Context, Result};
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
    cfg.train.eval_sequences = 4;
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
        outln!(
            "run {}: phalanx train {:.0} tok/s, bare tch loop {:.0} tok/s",
            r + 1,
            full[r],
            bare[r]
        );
    }
    let (f, b) = (median(&mut full), median(&mut bare));
    outln!(
        "median over {runs} runs of {steps} steps: phalanx train {f:.0} tok/s, bare tch loop {b:.0} tok/s, overhead {:+.2}%",
        (b / f - 1.0) * 100.0
    );
    Ok(())
}

/// `phalanx bench train --world N`: the per-step cost of phalanx's fault tolerance. The same
/// data-parallel job runs twice per round on N local processes: once through `phalanx launch`
/// (coordinator, sessions and heartbeats, the supervision tree with its data loader and
/// watchdog, generations, metrics) and once as bare ranks that only build a UCX group from a
/// TCP bootstrap and loop over sample, forward/backward, allreduce and update, the same code
/// for the step itself. The median step time of each is compared.
pub fn run_world(
    cfg: &TrainConfig,
    config: &std::path::Path,
    overrides: &[String],
    world: usize,
    steps: u64,
    runs: usize,
) -> Result<()> {
    if !(2..=16).contains(&world) {
        anyhow::bail!(
            "--world {world}: use 2..=16 local processes (1 is `bench train` without --world)"
        );
    }
    let exe = std::env::current_exe().context("locating the phalanx binary")?;
    let budget = if cfg.train.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.train.threads
    };
    let threads = (budget / world).max(1);
    let mut common: Vec<String> = overrides.to_vec();
    common.extend([
        format!("train.max_steps={steps}"),
        "train.eval_sequences=4".into(),
        "run.checkpoint_interval=0".into(),
        "run.progress=false".into(),
        // Both sides run the same job; step times on a shared 2-core machine are noise-prone
        // and no side may evict or rebalance a rank mid-measurement.
        "coordinator.evict_stragglers=false".into(),
    ]);
    let skip = 10usize.min(steps as usize / 2);
    let (mut ft, mut bare) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for with_ft in order {
            let tmp = tempfile::tempdir()?;
            let run_dir = tmp.path().join("run");
            let mut args = common.clone();
            args.push(format!("run.dir={}", run_dir.display()));
            let t = if with_ft {
                let out = std::process::Command::new(&exe)
                    .arg("launch")
                    .args(["--world", &world.to_string(), "--config"])
                    .arg(config)
                    .args(&args)
                    .stdout(std::process::Stdio::null())
                    .output()?;
                if !out.status.success() {
                    return Err(launch_failed("the launched job", &out));
                }
                let mut v: Vec<f64> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter_map(|m| m["step_ms"].as_f64())
                    .skip(skip)
                    .collect();
                median(&mut v)
            } else {
                bare_job(&exe, config, &args, world, threads, &run_dir, skip)?
            };
            if with_ft {
                ft.push(t);
            } else {
                bare.push(t);
            }
        }
        outln!(
            "run {}: {world} ranks, median step {:.2} ms with fault tolerance, {:.2} ms bare",
            r + 1,
            ft[r],
            bare[r]
        );
    }
    let (f, b) = (median(&mut ft), median(&mut bare));
    outln!(
        "median over {runs} runs of {steps} steps on {world} ranks ({threads} threads each): \
         {f:.2} ms per step with fault tolerance, {b:.2} ms bare: cost {:+.2}%",
        (f / b - 1.0) * 100.0
    );
    Ok(())
}

/// Runs the bare job: N `bench train-rank` processes and their bootstrap. Returns rank 0's
/// median step time in ms.
fn bare_job(
    exe: &std::path::Path,
    config: &std::path::Path,
    args: &[String],
    world: usize,
    threads: usize,
    run_dir: &std::path::Path,
    skip: usize,
) -> Result<f64> {
    use phalanx_runtime::dataplane::BootstrapServer;
    use phalanx_runtime::Generation;
    std::fs::create_dir_all(run_dir)?;
    let srv = BootstrapServer::bind("127.0.0.1:0")?;
    let addr = srv.local_addr().to_string();
    let server = std::thread::spawn(move || {
        srv.serve(
            world as u32,
            Generation(1),
            std::time::Duration::from_secs(120),
        )
    });
    let times = run_dir.join("bare-steps.txt");
    let mut kids = Vec::new();
    for r in 0..world {
        kids.push(
            std::process::Command::new(exe)
                .args(["bench", "train-rank", "--bootstrap", &addr])
                .args(["--rank", &r.to_string(), "--world", &world.to_string()])
                .arg("--out")
                .arg(&times)
                .arg("--config")
                .arg(config)
                .args(args)
                .arg(format!("train.threads={threads}"))
                .stdout(std::process::Stdio::null())
                .spawn()?,
        );
    }
    for mut k in kids {
        let st = k.wait()?;
        if !st.success() {
            anyhow::bail!("a bare rank failed ({st})");
        }
    }
    server
        .join()
        .map_err(|_| anyhow::anyhow!("bootstrap thread panicked"))??;
    let mut v: Vec<f64> = std::fs::read_to_string(&times)?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .skip(skip)
        .collect();
    Ok(median(&mut v))
}

/// One bare rank: setup, a UCX group, and the data-parallel step with nothing around it.
pub fn bare_rank(
    cfg: &TrainConfig,
    bootstrap: &str,
    rank: u32,
    world: u32,
    out: &std::path::Path,
) -> Result<()> {
    use phalanx_actors::loader::{self, LoaderData};
    use phalanx_runtime::dataplane::{TcpBootstrap, UcxConfig, UcxGroup};
    use phalanx_runtime::{Generation, Rank};
    use std::io::Write;
    let mut s = train::setup(cfg)?;
    let group = UcxGroup::connect(
        Rank(rank),
        world,
        Generation(1),
        UcxConfig::default(),
        Box::new(TcpBootstrap {
            server: bootstrap.to_string(),
        }),
    )?;
    let data = LoaderData {
        dir: s.ds.dir.clone(),
        sampler: s.sampler.clone(),
        win: s.win,
        device: s.trainer.model.device(),
    };
    let mbs = s.sampler.micro_batches_per_step();
    let even = phalanx_runtime::coordinator::core::even_shares(mbs, world as usize);
    let mut lines = String::new();
    while s.trainer.step < cfg.train.max_steps {
        let t0 = Instant::now();
        let step = s.trainer.step;
        let lr = phalanx_model::optim::lr_at(&cfg.optim, step);
        let batches = loader::build(
            &data,
            &s.ds,
            s.sampler
                .rank_micro_batches(&even, world as usize, rank as usize)
                .context("the even split does not fit the batch")?,
            step,
        );
        let loss = s.trainer.accumulate(&batches, mbs);
        let mut buf = Vec::<f32>::try_from(&s.trainer.flat_grads().view([-1]))?;
        buf.push(loss as f32);
        group.allreduce(&mut buf)?;
        buf.pop();
        let dev = s.trainer.model.device();
        if s.trainer
            .apply_flat(Tensor::from_slice(&buf).to_device(dev), lr)
            .is_none()
        {
            s.trainer.step += 1;
        }
        lines.push_str(&format!("{}\n", t0.elapsed().as_secs_f64() * 1e3));
    }
    group.barrier()?;
    if rank == 0 {
        std::fs::File::create(out)?.write_all(lines.as_bytes())?;
    }
    Ok(())
}

/// A launched job that failed, with the last lines it wrote to stderr.
pub fn launch_failed(what: &str, out: &std::process::Output) -> anyhow::Error {
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = err.lines().rev().take(3).collect();
    anyhow::anyhow!(
        "{what} failed ({}): {}",
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}
