//! `phalanx worker`: one rank of a multi-rank job.
//!
//! The rank itself (a supervision tree of a control agent, a data loader, a communicator, the
//! compute loop and a checkpointer) is in `phalanx-actors`; this module reads the job's config
//! and the launcher's environment and hands them over.

use crate::config::TrainConfig;
use crate::control::{client_opts, hostname};
use crate::train;
use anyhow::{bail, Result};
use phalanx_actors::policy::Intensity;
use phalanx_actors::rank::{self, RankParams, SetupFn};
use phalanx_proto::pb;
use phalanx_runtime::dataplane::{advertised_ip, AddressSettings};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

pub use phalanx_actors::rank::{EXIT_DONE, EXIT_FENCED, EXIT_HALTED, EXIT_PREEMPTED};

pub struct WorkerArgs {
    pub url: String,
    pub tls_ca: String,
    pub spare: bool,
    /// Exit (code 3) when fenced instead of registering again as a spare.
    pub no_rejoin: bool,
    pub cfg: TrainConfig,
    pub run_dir: PathBuf,
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
pub fn coordinator_url(arg: Option<String>, tls: bool) -> Result<String> {
    if let Some(u) = arg {
        return Ok(u);
    }
    if let Ok(host) = std::env::var("MASTER_ADDR") {
        // torchrun's MASTER_PORT names the rendezvous port; PHALANX_COORDINATOR_PORT wins.
        let port = std::env::var("PHALANX_COORDINATOR_PORT")
            .or_else(|_| std::env::var("MASTER_PORT"))
            .unwrap_or_else(|_| "7070".into());
        if port.trim().parse::<u16>().is_err() {
            bail!(
                "MASTER_PORT / PHALANX_COORDINATOR_PORT = {port:?} is not a port number (1-65535)"
            );
        }
        // With a CA to check the coordinator against, discovery speaks TLS too.
        let scheme = if tls { "https" } else { "http" };
        return Ok(format!("{scheme}://{host}:{port}"));
    }
    bail!("no coordinator: pass --coordinator URL (or set MASTER_ADDR, as torchrun does)")
}

/// The hash a worker of `cfg` will have, for a coordinator to pin before any worker registers.
/// `None` when the dataset cannot be read (the workers then stop with the dataset's own error).
pub fn config_hash_of(cfg: &TrainConfig) -> Option<String> {
    let ds = phalanx_model::data::Dataset::open(&cfg.data.dir).ok()?;
    let meta = serde_json::to_string(&ds.meta.sources).unwrap_or_default();
    Some(config_hash(cfg, &meta))
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
    // C-8: SIGTERM (a scheduler's notice before the time limit) and SIGINT (Ctrl-C at the
    // terminal) ask the job to stop after the next step with a committed checkpoint.
    ctrlc::set_handler(phalanx_actors::preempt::request)
        .map_err(|e| anyhow::anyhow!("cannot install the SIGTERM/SIGINT handler: {e}"))?;
    let mut cfg = a.cfg.clone();
    if cfg.train.deterministic {
        // libtorch's reductions may group differently with another thread count.
        cfg.train.threads = 1;
    }
    let (mut first, params) = off_thread(|| {
        let mut first = train::setup(&cfg)?;
        let mut params = rank_params(&a, &cfg, &first)?;
        if cfg.run.resume {
            params.resumed = crate::resume::load_newest(&a.run_dir, &mut first)?;
        }
        Ok((first, params))
    })?;
    let mut params = params;
    // A rank fenced out of the job (evicted while hung, then woken) comes back as a spare:
    // with fresh state, which it receives from a peer if it is promoted. Under `phalanx
    // launch` the launcher restarts it as a new process instead.
    loop {
        let code = rank::run(params.clone(), first)?;
        if code != EXIT_FENCED || std::env::var_os("PHALANX_PARENT_PID").is_some() || a.no_rejoin {
            return Ok(code);
        }
        warn!("fenced out of the job; registering again as a spare");
        first = off_thread(|| Ok(train::setup(&cfg)?))?;
        params.register.role = pb::Role::Spare as i32;
        params.register.member_id = 0;
    }
}

/// Runs libtorch work of the worker's start on a thread that then exits. libgomp keeps a team
/// of OpenMP threads for every thread that ran a parallel region, and once a process holds more
/// of them than it has cores it stops spinning at its barriers and sleeps instead: the compute
/// thread's kernels then leave a fifth of the cores idle (measured: 17,000 against 24,500
/// tokens/s on one rank of 2 threads). A thread that exits takes its team with it.
fn off_thread<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the worker's setup panicked")))
    })
}

/// A rank's parameters from the job's config, the launcher's environment and the worker's
/// arguments; `first` is its first state (whose dataset names the sources in the config hash).
pub fn rank_params(
    a: &WorkerArgs,
    cfg: &TrainConfig,
    first: &phalanx_actors::Setup,
) -> Result<RankParams> {
    let meta = serde_json::to_string(&first.ds.meta.sources).unwrap_or_default();
    let hash = config_hash(cfg, &meta);
    info!(config_hash = %hash, "the coordinator's --config-hash for this config");
    let hints = launcher_hints();
    if !hints.is_empty() {
        info!(hints = ?hints, "launcher environment");
    }
    let mut opts = client_opts(&a.url, &a.tls_ca)?;
    if let Some(t) = cfg.coordinator.token() {
        opts.token = Some(t);
    }
    // Every listener a peer dials is advertised at an address other hosts reach.
    let settings = AddressSettings::from_env_and(&cfg.dataplane.address, &cfg.dataplane.interface);
    let choice = advertised_ip(&settings, &a.url)?;
    info!(address = %choice, "data-plane address");
    let register = pb::RegisterRequest {
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
        address: choice.ip.to_string(),
        ..Default::default()
    };
    let c = cfg.clone();
    let setup: SetupFn = Arc::new(move || Ok(train::setup(&c)?));
    let r = &cfg.run;
    let params = RankParams {
        url: a.url.clone(),
        advertise_ip: choice.ip.to_string(),
        client: opts,
        register,
        setup,
        run_dir: a.run_dir.clone(),
        max_steps: cfg.train.max_steps,
        global_batch: cfg.train.global_batch,
        micro_batch: cfg.train.micro_batch,
        eval_interval: cfg.train.eval_interval,
        eval_sequences: cfg.train.eval_sequences,
        optim: cfg.optim.clone(),
        heartbeat_interval: Duration::from_millis(cfg.coordinator.heartbeat_interval_ms),
        checkpoint_interval: r.checkpoint_interval,
        keep_checkpoints: r.keep_checkpoints,
        keep_every: r.keep_every,
        fingerprint_interval: r.fingerprint_interval,
        rollback_on_nonfinite: r.on_nonfinite == crate::config::OnNonfinite::Rollback,
        deterministic: cfg.train.deterministic,
        zero: cfg.train.zero == 1,
        zero_replicas: cfg.zero.replicas,
        zero_replica_interval: cfg.zero.replica_interval,
        seed: cfg.train.seed,
        collective_timeout: Duration::from_millis(cfg.dataplane.collective_timeout_ms),
        mesh: cfg.dataplane.mesh,
        watchdog: Duration::from_millis(r.watchdog_timeout_ms),
        intensity: Intensity {
            max_restarts: r.max_restarts,
            within: Duration::from_millis(r.restart_window_ms),
        },
        prefetch: r.prefetch_steps,
        data_plane: phalanx_actors::comm::ucx(),
        resumed: None,
    };
    Ok(params)
}
