//! `phalanx worker`: one rank of a multi-rank job.
//!
//! Two halves joined by channels and atomics:
//! - the control agent (async, on a small tokio runtime): registers with the coordinator, keeps
//!   the session (heartbeats carrying progress up, directives down), reconnects with backoff,
//!   reports collective faults, and does the data-plane address rendezvous;
//! - the compute loop (this process's main thread; libtorch never runs on a tokio worker): for
//!   each generation it builds the UCX group, brings every rank to the same committed state,
//!   and runs data-parallel steps until the job ends or a collective fails, in which case the
//!   step in flight is redone in the next generation with the same global batch.

use crate::config::TrainConfig;
use crate::control::{client_opts, hostname};
use crate::model_io;
use crate::run_dir::unix_ms;
use crate::train::{self, Setup};
use anyhow::{bail, Context, Result};
use phalanx_model::optim::lr_at;
use phalanx_proto::pb;
use phalanx_runtime::coordinator::client::{self, Client, ClientOpts};
use phalanx_runtime::dataplane::{AddressExchange, UcxConfig, UcxGroup};
use phalanx_runtime::{Generation, Rank, RuntimeError};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc as smpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

/// Exit codes of a worker, for the launcher.
pub const EXIT_DONE: i32 = 0;
pub const EXIT_FENCED: i32 = 3;
pub const EXIT_HALTED: i32 = 4;

pub struct WorkerArgs {
    pub url: String,
    pub tls_ca: String,
    pub spare: bool,
    pub cfg: TrainConfig,
    pub run_dir: PathBuf,
}

/// Progress the compute loop publishes and the control agent heartbeats.
#[derive(Default)]
pub struct Progress {
    step: AtomicU64,
    seq: AtomicU64,
    generation: AtomicU64,
    step_us: AtomicU32,
    compute_us: AtomicU32,
    loss_bits: AtomicU32,
    /// 0 idle, 1 training, 2 healing.
    phase: AtomicU8,
}

#[derive(Debug)]
enum Directive {
    Assign(pb::Assign),
    Evict(String),
    Drain,
    Shutdown(String),
}

/// Where a rank learned what it knows from the hints of common launchers, for logs and events.
pub fn launcher_hints() -> Vec<String> {
    let mut v = Vec::new();
    for (k, label) in [
        ("SLURM_PROCID", "slurm rank"),
        ("SLURM_NTASKS", "slurm world"),
        ("PMI_RANK", "pmi rank"),
        ("PMI_SIZE", "pmi world"),
        ("OMPI_COMM_WORLD_RANK", "ompi rank"),
        ("OMPI_COMM_WORLD_SIZE", "ompi world"),
        ("RANK", "torchrun rank"),
        ("WORLD_SIZE", "torchrun world"),
        ("MASTER_ADDR", "torchrun master"),
    ] {
        if let Ok(val) = std::env::var(k) {
            v.push(format!("{label}={val}"));
        }
    }
    v
}

/// The coordinator, given by --coordinator or derived from torchrun's MASTER_ADDR.
pub fn coordinator_url(arg: Option<String>) -> Result<String> {
    if let Some(u) = arg {
        return Ok(u);
    }
    if let Ok(host) = std::env::var("MASTER_ADDR") {
        let port = std::env::var("PHALANX_COORDINATOR_PORT").unwrap_or_else(|_| "7070".into());
        return Ok(format!("http://{host}:{port}"));
    }
    bail!("no coordinator: pass --coordinator URL (or set MASTER_ADDR, as torchrun does)")
}

/// A digest of what must be identical on every rank: model, data, batch, optimizer.
/// SHA-256, not std's hasher, whose output may differ between builds of phalanx.
pub fn config_hash(cfg: &TrainConfig, data_meta: &str) -> String {
    use sha2::{Digest, Sha256};
    let t = &cfg.train;
    let parts = [
        toml::to_string(&cfg.model).unwrap_or_default(),
        toml::to_string(&cfg.optim).unwrap_or_default(),
        format!("{} {} {}", t.global_batch, t.micro_batch, t.seed),
        data_meta.to_string(),
    ];
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Address exchange through the coordinator's Rendezvous (called on the UCX thread).
struct CoordExchange {
    handle: tokio::runtime::Handle,
    client: Client,
    member: u64,
}

impl AddressExchange for CoordExchange {
    fn exchange(
        &mut self,
        rank: Rank,
        _world: u32,
        generation: Generation,
        local: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, RuntimeError> {
        let mut req = tonic::Request::new(pb::RendezvousRequest {
            member_id: self.member,
            generation: generation.0,
            rank: rank.0,
            address: local.to_vec(),
        });
        req.set_timeout(timeout);
        let mut c = self.client.clone();
        self.handle
            .block_on(async move { c.rendezvous(req).await })
            .map(|r| r.into_inner().addresses)
            .map_err(|s| RuntimeError::Bootstrap {
                addr: "coordinator".into(),
                reason: format!("{:?}: {}", s.code(), s.message()),
            })
    }
}

struct Control {
    member: u64,
    client: Client,
}

/// Registers and keeps the session; forwards directives. Returns when told to stop.
#[allow(clippy::too_many_arguments)]
async fn control_agent(
    opts: ClientOpts,
    reg: pb::RegisterRequest,
    progress: Arc<Progress>,
    directives: smpsc::Sender<Directive>,
    ready: tokio::sync::oneshot::Sender<Result<Control, String>>,
    mut faults: mpsc::UnboundedReceiver<pb::FaultReport>,
) {
    let mut ready = Some(ready);
    let mut member = 0u64;
    let mut backoff = Duration::from_millis(100);
    let started = Instant::now();
    loop {
        let mut c = match client::connect(&opts).await {
            Ok(c) => c,
            Err(e) => {
                if member == 0 && started.elapsed() > Duration::from_secs(10) {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Err(e.to_string()));
                    }
                    return;
                }
                warn!(error = %e, "coordinator unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let mut r = reg.clone();
        r.member_id = member;
        r.generation = progress.generation.load(Ordering::Relaxed);
        r.committed_step = progress.step.load(Ordering::Relaxed);
        let out = match c.register(client::request(r, &opts)).await {
            Ok(o) => o.into_inner(),
            Err(s) => {
                let msg = format!("{:?}: {}", s.code(), s.message());
                if matches!(
                    s.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::InvalidArgument
                        | tonic::Code::FailedPrecondition
                ) {
                    if let Some(rd) = ready.take() {
                        let _ = rd.send(Err(msg));
                    } else {
                        let _ = directives.send(Directive::Evict(msg));
                    }
                    return;
                }
                warn!(error = %msg, "registration failed; retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        member = out.member_id;
        backoff = Duration::from_millis(100);
        if let Some(rd) = ready.take() {
            let _ = rd.send(Ok(Control {
                member,
                client: c.clone(),
            }));
        }
        let (tx, rx) = mpsc::channel(16);
        let _ = tx
            .send(pb::RankMessage {
                msg: Some(pb::rank_message::Msg::Hello(pb::SessionHello {
                    member_id: member,
                })),
            })
            .await;
        let mut inbound = match c.session(ReceiverStream::new(rx)).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                if s.code() == tonic::Code::FailedPrecondition {
                    let _ = directives.send(Directive::Evict(s.message().to_string()));
                    return;
                }
                continue;
            }
        };
        let mut hb = tokio::time::interval(Duration::from_millis(
            out.heartbeat_interval_ms.max(20) as u64,
        ));
        loop {
            tokio::select! {
                _ = hb.tick() => {
                    let p = &progress;
                    let m = pb::RankMessage { msg: Some(pb::rank_message::Msg::Heartbeat(pb::Heartbeat {
                        generation: p.generation.load(Ordering::Relaxed),
                        step: p.step.load(Ordering::Relaxed),
                        collective_seq: p.seq.load(Ordering::Relaxed),
                        phase: match p.phase.load(Ordering::Relaxed) { 1 => "training", 2 => "healing", 3 => "done", _ => "idle" }.into(),
                        last_step_time_us: p.step_us.load(Ordering::Relaxed),
                        last_compute_time_us: p.compute_us.load(Ordering::Relaxed),
                        loss: f32::from_bits(p.loss_bits.load(Ordering::Relaxed)),
                        stats: None,
                    }))};
                    if tx.send(m).await.is_err() { break; }
                }
                Some(f) = faults.recv() => {
                    let mut cc = c.clone();
                    let o = opts.clone();
                    tokio::spawn(async move { let _ = cc.report_fault(client::request(f, &o)).await; });
                }
                msg = inbound.message() => match msg {
                    Ok(Some(d)) => {
                        let d = match d.kind {
                            Some(pb::directive::Kind::Assign(a)) => Directive::Assign(a),
                            Some(pb::directive::Kind::Evict(e)) => Directive::Evict(e.reason),
                            Some(pb::directive::Kind::Drain(_)) => Directive::Drain,
                            Some(pb::directive::Kind::Shutdown(s)) => Directive::Shutdown(s.reason),
                            _ => continue,
                        };
                        let stop = matches!(d, Directive::Evict(_) | Directive::Shutdown(_));
                        if directives.send(d).is_err() || stop { return; }
                    }
                    Ok(None) => break,
                    Err(s) => {
                        if s.code() == tonic::Code::FailedPrecondition {
                            let _ = directives.send(Directive::Evict(s.message().to_string()));
                            return;
                        }
                        warn!(code = ?s.code(), "session with the coordinator broke; reconnecting");
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

fn tensor_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu).view([-1])).unwrap_or_default()
}

/// Brings every rank of a new generation to the committed state of the most advanced one:
/// the ranks learn each other's step (an allreduce of one-hot steps), and if they differ the
/// lowest-ranked holder of the highest step broadcasts parameters, optimizer state and step.
fn sync_state(
    group: &UcxGroup,
    s: &mut Setup,
    progress: &Progress,
) -> Result<Option<u32>, RuntimeError> {
    let world = group.world() as usize;
    let mut steps = vec![0f32; world * 2];
    // Steps up to 2^24 are exact in f32; split into high and low halves beyond that.
    let st = s.trainer.step;
    steps[group.rank().0 as usize * 2] = (st >> 20) as f32;
    steps[group.rank().0 as usize * 2 + 1] = (st & 0xF_FFFF) as f32;
    group.allreduce(&mut steps)?;
    let all: Vec<u64> = (0..world)
        .map(|r| ((steps[2 * r] as u64) << 20) | steps[2 * r + 1] as u64)
        .collect();
    let max = *all.iter().max().unwrap_or(&0);
    if all.iter().all(|&x| x == max) {
        return Ok(None);
    }
    let leader = all.iter().position(|&x| x == max).unwrap_or(0) as u32;
    progress.phase.store(2, Ordering::Relaxed);
    let t = &mut s.trainer;
    let mut buf: Vec<u8> = Vec::new();
    if group.rank().0 == leader {
        let mut floats = tensor_vec(&t.model.params.flat);
        floats.extend(tensor_vec(&t.opt.m));
        floats.extend(tensor_vec(&t.opt.v));
        buf = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
        buf.extend(t.step.to_le_bytes());
        buf.extend(t.opt.t.to_le_bytes());
    }
    let n = t.model.num_params() as usize;
    let need = 3 * n * 4 + 16;
    if group.rank().0 != leader {
        // Every rank passes a buffer of the broadcast's size.
        buf = vec![0u8; need];
    }
    group.broadcast(&mut buf, Rank(leader))?;
    if group.rank().0 != leader {
        if buf.len() != need {
            return Err(RuntimeError::InvalidArgument {
                op: "state transfer",
                reason: format!("received {} bytes, expected {need}", buf.len()),
            });
        }
        let floats: Vec<f32> = buf[..3 * n * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tch::no_grad(|| {
            let dev = t.model.device();
            t.model
                .params
                .flat
                .shallow_clone()
                .copy_(&Tensor::from_slice(&floats[..n]).to_device(dev));
            t.opt
                .m
                .copy_(&Tensor::from_slice(&floats[n..2 * n]).to_device(dev));
            t.opt
                .v
                .copy_(&Tensor::from_slice(&floats[2 * n..]).to_device(dev));
        });
        let tail = &buf[3 * n * 4..];
        t.step = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes"));
        t.opt.t = u64::from_le_bytes(tail[8..16].try_into().expect("8 bytes"));
        t.model.params.zero_grads();
    }
    Ok(Some(leader))
}

fn suspect_of(e: &RuntimeError, me: Rank, world: u32) -> u32 {
    match e {
        RuntimeError::PeerFailed { rank, .. } => rank.0,
        // A timeout does not say who; name the ring neighbour we wait on.
        _ => (me.0 + world - 1) % world.max(1),
    }
}

/// The job was halted (too few ranks left): the rank that was rank 0 saves the committed model,
/// so that the run can be resumed or sampled, and says why next to it.
fn save_on_halt(a: &WorkerArgs, s: &Setup, last_rank: Option<u32>, reason: &str) -> Result<()> {
    if last_rank != Some(0) || s.trainer.step == 0 {
        return Ok(());
    }
    let dir = a.run_dir.join("model");
    model_io::save(
        &dir,
        &s.trainer,
        &s.ds.meta.tokenizer,
        s.ds.meta.vocab.clone(),
    )?;
    std::fs::write(a.run_dir.join("halted.txt"), format!("{reason}\n"))?;
    warn!(step = s.trainer.step, dir = %dir.display(), "saved the committed model before stopping");
    Ok(())
}

/// Under `phalanx launch`, a worker must not outlive its launcher (which also hosts the
/// coordinator): it watches its parent and leaves when the parent is gone.
fn watch_parent() {
    let Some(want) = std::env::var("PHALANX_PARENT_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return;
    };
    std::thread::spawn(move || loop {
        if std::os::unix::process::parent_id() != want {
            eprintln!("phalanx worker: the launcher (pid {want}) is gone; exiting");
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(200));
    });
}

pub fn run(a: WorkerArgs) -> Result<i32> {
    watch_parent();
    let cfg = a.cfg.clone();
    let mut s = train::setup(&cfg)?;
    let meta = serde_json::to_string(&s.ds.meta.sources).unwrap_or_default();
    let hash = config_hash(&cfg, &meta);
    let hints = launcher_hints();
    if !hints.is_empty() {
        info!(hints = ?hints, "launcher environment");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut opts = client_opts(&a.url, &a.tls_ca)?;
    if let Some(t) = cfg.coordinator.token() {
        opts.token = Some(t);
    }
    let progress = Arc::new(Progress::default());
    let (dtx, drx) = smpsc::channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (fault_tx, fault_rx) = mpsc::unbounded_channel();
    let reg = pb::RegisterRequest {
        job_id: cfg.coordinator.job_id.clone(),
        host: hostname(),
        dataplane_address: Vec::new(),
        role: if a.spare {
            pb::Role::Spare
        } else {
            pb::Role::Active
        } as i32,
        capabilities: hints,
        config_hash: hash,
        pid: std::process::id(),
        ..Default::default()
    };
    rt.spawn(control_agent(
        opts.clone(),
        reg,
        progress.clone(),
        dtx,
        ready_tx,
        fault_rx,
    ));
    let ctl = rt
        .block_on(ready_rx)
        .context("the control agent stopped")?
        .map_err(|e| anyhow::anyhow!("the coordinator at {} refused this worker: {e}", a.url))?;
    info!(member = ctl.member, "registered");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.run_dir.join("metrics.jsonl"))
        .with_context(|| format!("cannot open {}/metrics.jsonl", a.run_dir.display()))?;
    let mut ucx = UcxConfig::default();
    ucx.coll.timeout = Duration::from_millis(2000);
    let mbs = s.sampler.micro_batches_per_step();
    let tokens_per_step = (cfg.train.global_batch * s.win.block) as f64;
    let device = s.trainer.model.device();
    let mut pending: Option<pb::Assign> = None;
    let mut last_rank: Option<u32> = None;
    'generations: loop {
        progress.phase.store(0, Ordering::Relaxed);
        // Wait for an assignment newer than the generation we hold.
        let assign = match pending.take() {
            Some(a) => a,
            None => match drx.recv() {
                Ok(Directive::Assign(x)) => x,
                Ok(Directive::Drain) => continue,
                Ok(Directive::Evict(reason)) => {
                    warn!(%reason, "evicted");
                    return Ok(EXIT_FENCED);
                }
                Ok(Directive::Shutdown(reason)) => {
                    warn!(%reason, "shut down by the coordinator");
                    save_on_halt(&a, &s, last_rank, &reason)?;
                    return Ok(EXIT_HALTED);
                }
                Err(_) => bail!("lost the control agent"),
            },
        };
        if assign.generation <= progress.generation.load(Ordering::Relaxed) {
            continue;
        }
        let generation = Generation(assign.generation);
        let (rank, world) = (Rank(assign.rank), assign.world);
        last_rank = Some(rank.0);
        progress.generation.store(generation.0, Ordering::Relaxed);
        let t0 = Instant::now();
        let exchange = CoordExchange {
            handle: rt.handle().clone(),
            client: ctl.client.clone(),
            member: ctl.member,
        };
        let group = match UcxGroup::connect(
            rank,
            world,
            generation,
            ucx.clone(),
            Box::new(exchange),
        ) {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %e, %generation, "could not build the data-plane group; waiting for the next generation");
                continue;
            }
        };
        let healed = match sync_state(&group, &mut s, &progress) {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "state sync failed; waiting for the next generation");
                let _ = fault_tx.send(pb::FaultReport {
                    member_id: ctl.member,
                    generation: generation.0,
                    suspect_rank: suspect_of(&e, rank, world),
                    kind: "peer_failed".into(),
                    detail: e.to_string(),
                    step: s.trainer.step,
                });
                continue;
            }
        };
        progress.step.store(s.trainer.step, Ordering::Relaxed);
        info!(%generation, %rank, world, step = s.trainer.step, healed_from = ?healed,
              ready_ms = t0.elapsed().as_millis() as u64, "joined generation");
        progress.phase.store(1, Ordering::Relaxed);
        while s.trainer.step < cfg.train.max_steps {
            // Directives between steps: a newer generation, eviction, shutdown, drain.
            match drx.try_recv() {
                Ok(Directive::Assign(x)) if x.generation > generation.0 => {
                    pending = Some(x);
                    continue 'generations;
                }
                Ok(Directive::Evict(reason)) => {
                    warn!(%reason, "evicted");
                    return Ok(EXIT_FENCED);
                }
                Ok(Directive::Shutdown(reason)) => {
                    warn!(%reason, "shut down by the coordinator");
                    save_on_halt(&a, &s, Some(rank.0), &reason)?;
                    return Ok(EXIT_HALTED);
                }
                Ok(Directive::Drain) => continue 'generations,
                _ => {}
            }
            let step = s.trainer.step;
            let lr = lr_at(&cfg.optim, step);
            let t_step = Instant::now();
            let (epoch, st) = s.sampler.locate(step);
            let mine = s
                .sampler
                .rank_micro_batches(world as usize, rank.0 as usize);
            let batches: Vec<_> = mine
                .clone()
                .map(|mb| {
                    s.win.batch(
                        &s.ds.train,
                        epoch,
                        &s.sampler.micro_batch_ids(epoch, st, mb),
                        device,
                    )
                })
                .collect();
            let local_loss = s.trainer.accumulate(&batches, mbs);
            let compute = t_step.elapsed();
            let mut buf = tensor_vec(s.trainer.flat_grads());
            // The global mean loss rides along as one more element of the sum.
            buf.push((local_loss * mine.len() as f64 / mbs as f64) as f32);
            if let Err(e) = group.allreduce(&mut buf) {
                warn!(error = %e, step, "gradient allreduce failed; the step will be redone in the next generation");
                s.trainer.model.params.zero_grads();
                let _ = fault_tx.send(pb::FaultReport {
                    member_id: ctl.member,
                    generation: generation.0,
                    suspect_rank: suspect_of(&e, rank, world),
                    kind: if matches!(e, RuntimeError::Timeout { .. }) {
                        "timeout"
                    } else {
                        "peer_failed"
                    }
                    .into(),
                    detail: e.to_string(),
                    step,
                });
                continue 'generations;
            }
            let loss = buf.pop().unwrap_or(f32::NAN) as f64;
            let grad_norm = s
                .trainer
                .apply_flat(&Tensor::from_slice(&buf).to_device(device), lr);
            if grad_norm.is_none() {
                // Every rank sees the same summed gradient, so every rank skips the same step.
                s.trainer.step += 1;
            }
            let dt = t_step.elapsed();
            progress.step.store(s.trainer.step, Ordering::Relaxed);
            progress.seq.fetch_add(1, Ordering::Relaxed);
            progress
                .step_us
                .store(dt.as_micros() as u32, Ordering::Relaxed);
            progress
                .compute_us
                .store(compute.as_micros() as u32, Ordering::Relaxed);
            progress
                .loss_bits
                .store((loss as f32).to_bits(), Ordering::Relaxed);
            if rank.0 == 0 {
                let line = json!({
                    "step": step, "loss": loss, "lr": lr,
                    "tokens_per_s": tokens_per_step / dt.as_secs_f64(),
                    "step_ms": dt.as_secs_f64() * 1e3, "compute_ms": compute.as_secs_f64() * 1e3, "grad_norm": grad_norm,
                    "world_size": world, "generation": generation.0, "unix_ms": unix_ms(),
                    "skipped": grad_norm.is_none(),
                });
                let _ = metrics.write_all(format!("{line}\n").as_bytes());
            }
        }
        // Done: every rank records a fingerprint of its final state (G-2: they must be equal),
        // rank 0 evaluates and saves the final model; everyone leaves together.
        {
            use sha2::{Digest, Sha256};
            let t = &s.trainer;
            let mut h = Sha256::new();
            for x in [&t.model.params.flat, &t.opt.m, &t.opt.v] {
                for f in tensor_vec(x) {
                    h.update(f.to_le_bytes());
                }
            }
            let fp: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(a.run_dir.join("fingerprints.jsonl"))?;
            // One write per line: every rank appends to this file at the same moment.
            let line = json!({"member": ctl.member, "rank": rank.0, "generation": generation.0,
                              "step": t.step, "state_sha256": fp});
            f.write_all(format!("{line}\n").as_bytes())?;
        }
        let _ = group.barrier();
        if rank.0 == 0 {
            let val = s.trainer.evaluate(
                &s.ds.val,
                s.win,
                cfg.train.eval_batches,
                cfg.train.micro_batch,
            );
            model_io::save(
                &a.run_dir.join("model"),
                &s.trainer,
                &s.ds.meta.tokenizer,
                s.ds.meta.vocab.clone(),
            )?;
            let line = json!({"final": true, "step": s.trainer.step, "val_loss": val, "unix_ms": unix_ms()});
            let _ = metrics.write_all(format!("{line}\n").as_bytes());
        }
        // Tell the coordinator this rank is done (so its exit is not a fault), then leave.
        progress.phase.store(3, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(
            3 * cfg.coordinator.heartbeat_interval_ms.max(50),
        ));
        return Ok(EXIT_DONE);
    }
}
