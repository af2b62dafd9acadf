//! `phalanx bench checkpoint`: what a sharded checkpoint (C-5) costs a job of `--world` ranks.
//! The state of the preset (parameters and AdamW moments) is built once; each save stages
//! every rank's part, then writes the parts at once, one writer thread per rank, each fsynced,
//! and commits the manifest (the drain). The stage is measured as a job's loop meets it: rank
//! 0's copy runs beside the next step's forward and backward, and the stage is what the loop
//! spends starting it plus what it waits for it after the backward; the copy alone (not
//! overlapped, the slowest rank) is given beside it. As in a job, the stage thread then seals
//! the part (its header and SHA-256) while the step runs on, so the drain only writes; the
//! seal's time is given too. The disk's sequential write bandwidth is measured in the same run
//! and place (the state's size written and fdatasynced, in one file and in one file per rank
//! at once; the better counts) right before and right after each drain, since a shared disk's
//! bandwidth drifts by 2x within minutes and a burst of writes slows the next one: the drain
//! is compared with the mean of the two, and the figure is the median of the per-save ratios.
//! One training step of the preset times the stage against a step. With `--dcp`, PyTorch DCP
//! on the same state size runs beside it (`torchrun ... dcp_ref.py`).

use anyhow::{bail, Context, Result};
use phalanx_checkpoint::sharded::{self, Part, Sealed, Shards};
use phalanx_checkpoint::FileEntry;
use phalanx_model::config::ModelConfig;
use phalanx_model::gpt::Gpt;
use phalanx_model::io as model_io;
use phalanx_model::optim::OptimConfig;
use phalanx_model::trainer::Trainer;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct Opts {
    /// Model preset whose parameters and AdamW state are saved: tiny or gpt2-124m.
    #[arg(long, default_value = "gpt2-124m")]
    pub preset: String,
    /// Ranks of the job: the state is cut into this many parts, written at once.
    #[arg(long, default_value_t = 4)]
    pub world: u32,
    /// Saves measured; the figures are medians.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Where the checkpoints (and the disk measurement) go; removed afterwards.
    #[arg(long, default_value = "runs/bench-checkpoint")]
    pub dir: PathBuf,
    /// Micro-batches one rank computes per step (the step the stage is compared with).
    #[arg(long, default_value_t = 1)]
    pub micro_batches: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// Run PyTorch DCP beside it: the path of dcp_ref.py (under torchrun, --world ranks).
    #[arg(long, value_name = "SCRIPT")]
    pub dcp: Option<PathBuf>,
    /// Also measure training throughput with saves against none: `launch` of this many steps
    /// of --train-config (0: not measured).
    #[arg(long, default_value_t = 0)]
    pub train_steps: u64,
    /// The config of that training comparison.
    #[arg(long, default_value = "configs/shakespeare-char.toml")]
    pub train_config: PathBuf,
    /// A save every this many steps in it.
    #[arg(long, default_value_t = 50)]
    pub save_every: u64,
    /// Runs of each kind in that comparison, alternated (the figures are medians).
    #[arg(long, default_value_t = 3)]
    pub train_runs: usize,
}

/// One save's figures.
struct Save {
    /// What the loop waits for (rank 0, its copy overlapped with the next forward and backward).
    stage: Duration,
    /// The slowest rank's copy on its own.
    copy: Duration,
    /// The slowest rank's seal (on the stage thread; the loop does not wait for it).
    seal: Duration,
    drain: Duration,
    bytes: u64,
    /// The disk's sequential write bandwidth measured right before and right after the drain
    /// (their mean), bytes/s.
    disk: f64,
}

impl Save {
    fn throughput(&self) -> f64 {
        self.bytes as f64 / self.drain.as_secs_f64()
    }
}

pub fn run(o: &Opts) -> Result<()> {
    if o.world == 0 || o.reps == 0 {
        bail!("--world and --reps must be at least 1");
    }
    let mut cfg = ModelConfig::preset(&o.preset)?;
    // GPT-2's vocabulary, padded as nanoGPT pads it; the char presets' size does not matter here.
    cfg.vocab_size = if o.preset.starts_with("gpt2") {
        50304
    } else {
        65
    };
    tch::manual_seed(0);
    let model = Gpt::new(&cfg, Device::Cpu, 0)?;
    let mut trainer = Trainer::new(model, OptimConfig::default());
    let n = trainer.model.num_params() as u64;
    println!(
        "{}: {n} parameters, {:.2} GB of parameters and AdamW moments (fp32), {} ranks, {} saves",
        o.preset,
        (n * 12) as f64 / 1e9,
        o.world,
        o.reps
    );
    std::fs::create_dir_all(&o.dir)
        .with_context(|| format!("cannot create {} (--dir)", o.dir.display()))?;
    let step = time_step(&mut trainer, &cfg, o)?;
    let next_step = || random_batches(&cfg, o);
    let mut saves = Vec::new();
    // Each rank's host buffers, handed back after its write as in a job (C-5).
    let mut pools: Vec<Vec<Vec<f32>>> = vec![Vec::new(); o.world as usize];
    for rep in 0..o.reps {
        let disk = || disk_bandwidth(&o.dir, n * 12, o.world);
        let s = save(
            &mut trainer,
            &next_step(),
            &o.dir,
            rep as u64 + 1,
            o.world,
            &mut pools,
            disk,
        )?;
        println!(
            "  save {}: stage {:.1} ms (copy alone {:.1} ms; seal beside the step {:.0} ms), \
             drain {:.2} s, {:.2} GB/s = {:.0}% of the disk around it",
            rep + 1,
            s.stage.as_secs_f64() * 1e3,
            s.copy.as_secs_f64() * 1e3,
            s.seal.as_secs_f64() * 1e3,
            s.drain.as_secs_f64(),
            s.throughput() / 1e9,
            100.0 * s.throughput() / s.disk
        );
        saves.push(s);
    }
    let _ = std::fs::remove_dir_all(o.dir.join("checkpoints"));
    summarize(&saves, step);
    if o.train_steps > 0 {
        with_and_without_saves(o)?;
    }
    if let Some(script) = &o.dcp {
        dcp(script, o.world)?;
    }
    Ok(())
}

/// One rank's micro-batches of random tokens.
fn random_batches(cfg: &ModelConfig, o: &Opts) -> Vec<(Tensor, Tensor)> {
    (0..o.micro_batches)
        .map(|_| {
            let x = Tensor::randint(
                cfg.vocab_size as i64,
                [o.micro_batch as i64, cfg.block_size as i64],
                (Kind::Int64, Device::Cpu),
            );
            let y = x.shallow_clone();
            (x, y)
        })
        .collect()
}

/// One training step of one rank (its micro-batches, forward, backward, AdamW), the median of 3.
fn time_step(trainer: &mut Trainer, cfg: &ModelConfig, o: &Opts) -> Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..3 {
        let batches = random_batches(cfg, o);
        let t = Instant::now();
        trainer.train_step(&batches, 1e-4);
        times.push(t.elapsed());
    }
    times.sort();
    let step = times[1];
    println!(
        "  one step of a rank ({} of {}x{} tokens): {:.2} s",
        crate::output::count(o.micro_batches as u64, "micro-batch"),
        o.micro_batch,
        cfg.block_size,
        step.as_secs_f64()
    );
    Ok(step)
}

/// Sequential write bandwidth where the checkpoints go, as `dd conv=fdatasync` measures it,
/// of incompressible bytes like a checkpoint's (a virtual disk may store zeros or a repeated
/// pattern faster than data): `bytes` in one stream, then in `streams` files written at once
/// (as the ranks write their parts). The better of the two is the disk's bandwidth here.
fn disk_bandwidth(dir: &Path, bytes: u64, streams: u32) -> Result<f64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let block: Vec<u8> = (0..(1usize << 20))
        .flat_map(|_| {
            // xorshift64: cheap bytes no disk can compress.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let one = timed_writes(dir, bytes, 1, &block)?;
    let many = timed_writes(dir, bytes, streams, &block)?;
    println!(
        "  disk: {:.2} GB/s in one stream, {:.2} GB/s in {streams} at once (write + fdatasync, \
         {:.2} GB)",
        one / 1e9,
        many / 1e9,
        bytes as f64 / 1e9
    );
    Ok(one.max(many))
}

/// `bytes` written as `streams` files at once, each fdatasynced at its end: bytes/s.
fn timed_writes(dir: &Path, bytes: u64, streams: u32, block: &[u8]) -> Result<f64> {
    let each = bytes / streams as u64;
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let writers: Vec<_> = (0..streams)
            .map(|i| {
                let path = dir.join(format!("disk-bandwidth-{i}.tmp"));
                s.spawn(move || -> Result<()> {
                    let mut f = std::fs::File::create(&path)
                        .with_context(|| format!("cannot write in {}", path.display()))?;
                    let mut left = each;
                    while left > 0 {
                        let k = left.min(block.len() as u64) as usize;
                        f.write_all(&block[..k])?;
                        left -= k as u64;
                    }
                    f.sync_data()?;
                    Ok(())
                })
            })
            .collect();
        for w in writers {
            w.join().expect("a disk writer panicked")?;
        }
        Ok(())
    })?;
    let bw = (each * streams as u64) as f64 / t.elapsed().as_secs_f64();
    for i in 0..streams {
        let _ = std::fs::remove_file(dir.join(format!("disk-bandwidth-{i}.tmp")));
    }
    Ok(bw)
}

/// Rank 0's stage as its loop meets it: the copy starts, the next step's forward and backward
/// run beside it, and the loop waits for the copy before its update; the same thread then
/// seals the part. The sealed part, the time the loop spent, and the seal's time.
fn overlapped_stage(
    trainer: &mut Trainer,
    next_step: &[(Tensor, Tensor)],
    range: &std::ops::Range<u64>,
    buffers: Vec<Vec<f32>>,
) -> Result<(Sealed, Duration, Duration)> {
    let t = Instant::now();
    let src = model_io::PartSource::of(trainer);
    let r = range.clone();
    let (tell, copied) = std::sync::mpsc::sync_channel(1);
    let stage = std::thread::spawn(move || -> Result<(Sealed, Duration)> {
        let copy = src.snapshot_into(&r, buffers);
        drop(src);
        let _ = tell.send(());
        let t = Instant::now();
        Ok((Sealed::seal(copy?)?, t.elapsed()))
    });
    let start = t.elapsed();
    trainer.local_step(next_step, next_step.len());
    trainer.model.params.zero_grads();
    let t = Instant::now();
    let _ = copied.recv();
    let waited = start + t.elapsed();
    let (sealed, seal) = stage.join().expect("the stage thread panicked")?;
    Ok((sealed, waited, seal))
}

/// One sharded save as a job makes it: every rank's stage, the parallel writes, the commit;
/// the disk measured right before and right after the drain.
fn save(
    trainer: &mut Trainer,
    next_step: &[(Tensor, Tensor)],
    dir: &Path,
    step: u64,
    world: u32,
    pools: &mut [Vec<Vec<f32>>],
    disk: impl Fn() -> Result<f64>,
) -> Result<Save> {
    let total = trainer.model.num_params() as u64;
    let mut parts = Vec::new();
    let (mut copy, mut seal) = (Duration::ZERO, Duration::ZERO);
    let mut stage = Duration::ZERO;
    for r in 0..world {
        let range = sharded::part_range(total, world, r);
        let buffers = std::mem::take(&mut pools[r as usize]);
        let t = Instant::now();
        let tensors = model_io::part_snapshot_into(trainer, &range, buffers)?;
        copy = copy.max(t.elapsed());
        let sealed = if r == 0 {
            let buffers = tensors.into_iter().map(|t| t.data).collect();
            let (sealed, waited, took) = overlapped_stage(trainer, next_step, &range, buffers)?;
            stage = waited;
            seal = seal.max(took);
            sealed
        } else {
            let t = Instant::now();
            let sealed = Sealed::seal(tensors)?;
            seal = seal.max(t.elapsed());
            sealed
        };
        parts.push((r, range, sealed));
    }
    let out = dir.join("checkpoints").join(format!("step-{step}"));
    let disk_before = disk()?;
    let t = Instant::now();
    let written: Vec<Result<(FileEntry, Part)>> = std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .map(|(r, range, sealed)| {
                let out = &out;
                s.spawn(move || -> Result<(FileEntry, Part)> {
                    let name = sharded::part_name(*r, world);
                    let f = sharded::write_part(out, &name, sealed)?;
                    let p = Part {
                        rank: *r,
                        file: name,
                        start: range.start,
                        len: range.end - range.start,
                    };
                    Ok((f, p))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a writer thread panicked"))
            .collect()
    });
    let mut files = Vec::new();
    let mut plan = Vec::new();
    for w in written {
        let (f, p) = w?;
        files.push(f);
        plan.push(p);
    }
    let shards = Shards {
        world,
        generation: 1,
        job: "bench".into(),
        config_hash: String::new(),
        total,
        parts: plan,
    };
    let bytes = files.iter().map(|f| f.bytes).sum();
    sharded::commit(&out, step, files, shards)?;
    let drain = t.elapsed();
    let disk_after = disk()?;
    for (r, _, sealed) in parts {
        pools[r as usize] = sealed.into_tensors().into_iter().map(|t| t.data).collect();
    }
    Ok(Save {
        stage,
        copy,
        seal,
        drain,
        bytes,
        disk: (disk_before + disk_after) / 2.0,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn summarize(saves: &[Save], step: Duration) {
    let stage = median(saves.iter().map(|s| s.stage.as_secs_f64()).collect());
    let copy = median(saves.iter().map(|s| s.copy.as_secs_f64()).collect());
    let seal = median(saves.iter().map(|s| s.seal.as_secs_f64()).collect());
    let drain = median(saves.iter().map(|s| s.drain.as_secs_f64()).collect());
    let bw = median(saves.iter().map(Save::throughput).collect());
    let disk = median(saves.iter().map(|s| s.disk).collect());
    let ratio = median(saves.iter().map(|s| s.throughput() / s.disk).collect());
    println!("median over the saves:");
    println!(
        "  stage (the training loop waits; overlapped with the next forward and backward): \
         {:.1} ms = {:.2}% of one step (the copy alone: {:.1} ms = {:.2}%)",
        stage * 1e3,
        100.0 * stage / step.as_secs_f64(),
        copy * 1e3,
        100.0 * copy / step.as_secs_f64()
    );
    println!(
        "  seal (a part's header and SHA-256, on the stage thread beside the step; the loop \
         does not wait for it): {:.0} ms",
        seal * 1e3
    );
    println!("  drain (background write, fsync, commit): {drain:.2} s");
    println!(
        "  write throughput {:.2} GB/s, the disk {:.2} GB/s: {:.0}% (the median of each save's \
         throughput over the disk's around it)",
        bw / 1e9,
        disk / 1e9,
        100.0 * ratio
    );
    // Not a measurement of training with saves: the drain's share of the cores and the disk
    // while training is not in it.
    println!(
        "  estimate: a save every 50 steps stalls the loop for {:.3}% of its time (stage only)",
        100.0 * stage / (50.0 * step.as_secs_f64())
    );
}

/// Tokens per second of training time of a `launch` with saves every `save_every` steps and
/// without, alternated twice (the medians): what the saves cost a real job on these cores.
fn with_and_without_saves(o: &Opts) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..2 * o.train_runs.max(1) {
        let every = if round % 2 == 0 { 0 } else { o.save_every };
        let dir = o.dir.join(format!("train-{round}"));
        let out = Command::new(&exe)
            .args([
                "launch",
                "--force",
                "--world",
                &o.world.to_string(),
                "--config",
            ])
            .arg(&o.train_config)
            .arg(format!("train.max_steps={}", o.train_steps))
            .arg(format!("run.checkpoint_interval={every}"))
            .arg(format!("run.dir={}", dir.display()))
            .env("PHALANX_LOG", "warn")
            .output()
            .context("cannot run phalanx launch")?;
        if !out.status.success() {
            bail!(
                "the training run failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("report.json"))?)?;
        let rate = report["tokens_per_s_train"].as_f64().unwrap_or(f64::NAN);
        rates[usize::from(every > 0)].push(rate);
        println!(
            "  training run {}: {rate:.0} tokens/s over training time, {}",
            round + 1,
            match every {
                0 => "no saves".to_string(),
                k => format!("a save every {k} steps"),
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (none, with) = (median(rates[0].clone()), median(rates[1].clone()));
    println!(
        "training ({}, {} ranks, {} steps; median of {} alternated runs each): {:.0} tokens/s \
         without saves, {:.0} with a save every {} steps = {:.1}%",
        o.train_config.display(),
        o.world,
        o.train_steps,
        o.train_runs.max(1),
        none,
        with,
        o.save_every,
        100.0 * with / none
    );
    Ok(())
}

/// PyTorch DCP on 4 ranks with the same state size, beside (its own table).
fn dcp(script: &Path, world: u32) -> Result<()> {
    if !script.exists() {
        bail!(
            "--dcp {}: no such script; pass the path of dcp_ref.py",
            script.display()
        );
    }
    let torchrun = Path::new(".venv/bin/torchrun");
    if !torchrun.exists() {
        bail!("--dcp needs .venv/bin/torchrun: run scripts/setup from the repository root");
    }
    println!(
        "PyTorch DCP, {world} ranks (torchrun {}):",
        script.display()
    );
    let st = Command::new(torchrun)
        .arg("--nproc-per-node")
        .arg(world.to_string())
        .arg(script)
        .status()
        .context("cannot run torchrun")?;
    if !st.success() {
        bail!("the DCP reference failed ({st})");
    }
    Ok(())
}
