//! `phalanx launch`: a local job: the coordinator (in this process) and N (+K spare) worker
//! processes; one progress display; a dead worker process is restarted as a new spare without
//! stopping the others; optional fault injection; the run directory and its report.

use crate::cgroup::CpuQuota;
use crate::config::TrainConfig;
use crate::control::{self, CoordinatorArgs};
use crate::hosts::{self, SimHosts};
use crate::launch_hosts::{HostArgs, HostFaults};
use crate::launch_load::{self, Noise, Periodic};
use crate::report;
use crate::run_dir::unix_ms;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use phalanx_proto::pb;
use phalanx_runtime::coordinator::client;
use phalanx_runtime::events::{Cleared, Event, FaultKind, Injected, LaunchedHost, Record};
use phalanx_runtime::metrics::MetricLine;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub struct LaunchArgs {
    pub nproc: usize,
    pub spares: usize,
    pub config: PathBuf,
    pub overrides: Vec<String>,
    /// Fault injection: SIGKILL rank R once step S is committed.
    pub kill: Option<(u64, u32)>,
    /// Fault injection: SIGSTOP rank R once step S is committed, SIGCONT `stop_for` later.
    pub stop_at: Option<(u64, u32)>,
    pub stop_for: Duration,
    /// Fault injection: once step S is committed, cap rank R at `slow_cpu_pct`% of a core.
    pub slow_at: Option<(u64, u32)>,
    pub slow_cpu_pct: u32,
    /// ... and lift the quota this many committed steps later (0: never).
    pub slow_steps: u64,
    /// Periodic faults: SIGKILL an active rank (ranks in turn) every so often ...
    pub kill_every: Option<Duration>,
    /// ... restart a spare process every so often ...
    pub restart_spare_every: Option<Duration>,
    /// ... and a noisy neighbour taking one core in bursts.
    pub noise: Option<Noise>,
    /// Simulated hosts and the faults across them.
    pub hosts: HostArgs,
    pub progress: bool,
}

struct Worker {
    child: Child,
    /// The simulated host it runs on (0 without --hosts).
    host: usize,
    spare: bool,
    done: bool,
    code: Option<i32>,
}

pub(crate) fn append_event(run_dir: &Path, event: Event) -> Result<()> {
    let line = Record::now(event).to_line();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("events.jsonl"))?;
    // One write per line: the coordinator appends to the same file.
    f.write_all(format!("{line}\n").as_bytes())?;
    Ok(())
}

/// Sends SIG`signal` to the process of `rank` (if it is active) and records the injected fault.
fn inject(
    run_dir: &Path,
    st: &pb::StatusResponse,
    rank: u32,
    signal: &str,
    bar: &ProgressBar,
) -> Result<Option<u32>> {
    let Some(r) = st
        .ranks
        .iter()
        .find(|r| r.rank == Some(rank) && r.state == "active")
    else {
        return Ok(None);
    };
    let t = unix_ms();
    let ok = Command::new("kill")
        .args([format!("-{signal}"), r.pid.to_string()])
        .status()?
        .success();
    let kind = if signal == "STOP" {
        FaultKind::Sigstop
    } else {
        FaultKind::Sigkill
    };
    let mut f = Injected::of(kind, ok);
    f.rank = Some(rank);
    f.pid = Some(r.pid);
    f.step = Some(st.committed_step);
    f.injected_unix_ms = t;
    append_event(run_dir, Event::FaultInjected(f))?;
    bar.suspend(|| {
        info!(
            rank,
            pid = r.pid,
            step = st.committed_step,
            "injected: SIG{signal}"
        )
    });
    Ok(Some(r.pid))
}

/// The periodic faults that are due: a SIGKILL of an active rank (ranks in turn) and a spare
/// process restarted. Returns how many processes were killed on purpose.
fn periodic_faults(
    run_dir: &Path,
    st: &pb::StatusResponse,
    kill_every: Option<&mut Periodic>,
    spare_every: Option<&mut Periodic>,
    bar: &ProgressBar,
) -> Result<usize> {
    let now = Instant::now();
    let mut planned = 0;
    if let Some(p) = kill_every.filter(|_| st.committed_step > 0) {
        if p.due(now) {
            let rank = (p.fired - 1) % st.world.max(1);
            planned += usize::from(inject(run_dir, st, rank, "KILL", bar)?.is_some());
        }
    }
    if let Some(p) = spare_every {
        if p.due(now) {
            if let Some(r) = st.ranks.iter().find(|r| r.state == "spare") {
                planned += usize::from(launch_load::restart_spare(run_dir, r.pid)?);
            }
        }
    }
    Ok(planned)
}

/// Whether rank 0 wrote its `final` metrics line. Reads only what was appended since the last
/// call (`seen` bytes), so that a long run's growing file is not read again every tick.
fn metrics_has_final(run_dir: &Path, seen: &mut u64) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(run_dir.join("metrics.jsonl")) else {
        return false;
    };
    let len = f.metadata().map_or(0, |m| m.len());
    if len <= *seen {
        return false;
    }
    // Back up a little so that a line split across two reads is still seen whole.
    let from = seen.saturating_sub(256);
    let mut tail = String::new();
    if f.seek(SeekFrom::Start(from)).is_err() || f.read_to_string(&mut tail).is_err() {
        return false;
    }
    *seen = len;
    tail.lines().any(|l| {
        matches!(
            serde_json::from_str::<MetricLine>(l),
            Ok(MetricLine::Final(_))
        )
    })
}

pub fn run(a: &LaunchArgs, stop: Arc<AtomicBool>) -> Result<i32> {
    let wall = Instant::now();
    // Before anything else: never a silent fallback to one host.
    let mut host_faults = HostFaults::new(a.hosts.faults()?);
    if a.hosts.hosts.is_some() {
        hosts::check_can_simulate()?;
    }
    let cfg = TrainConfig::load(Some(&a.config), &a.overrides)?;
    let max_world = cfg.train.global_batch / cfg.train.micro_batch;
    if a.nproc == 0 {
        bail!("--nproc 0: a job needs at least one rank");
    }
    if a.nproc > max_world {
        bail!(
            "--nproc {}: a global batch of {} sequences in micro-batches of {} has only {max_world} \
             micro-batches, so at most {max_world} ranks can share it; lower --nproc or raise \
             train.global_batch",
            a.nproc,
            cfg.train.global_batch,
            cfg.train.micro_batch
        );
    }
    // Fail here, not in N workers at once, if the dataset or model is wrong.
    crate::train::setup(&cfg)?;
    let run_dir = cfg.run.dir.clone();
    std::fs::create_dir_all(&run_dir)?;
    for f in [
        "metrics.jsonl",
        "events.jsonl",
        "report.json",
        "coordinator-journal.json",
    ] {
        let _ = std::fs::remove_file(run_dir.join(f));
    }
    std::fs::create_dir_all(run_dir.join("logs"))?;
    std::fs::write(run_dir.join("config.toml"), toml::to_string_pretty(&cfg)?)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // train.threads is the job's budget on this machine (0 = every core), shared by its ranks:
    // oversubscribing cores makes libtorch's OpenMP teams spin against each other.
    let budget = if cfg.train.threads == 0 {
        cores
    } else {
        cfg.train.threads
    };
    let threads = (budget / a.nproc).max(1);
    let job_token = match cfg.coordinator.token() {
        Some(t) => t,
        None => control::random_token()?,
    };

    let sim = match a.hosts.hosts {
        Some(h) => Some(SimHosts::create(h, "phalanx")?),
        None => None,
    };
    // The coordinator, in this process; with simulated hosts, on the bridge they all reach.
    let bind_ip = sim
        .as_ref()
        .map_or_else(|| "127.0.0.1".to_string(), |s| s.gateway().to_string());
    let listener = std::net::TcpListener::bind(format!("{bind_ip}:0"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    let mut ccfg = cfg.coordinator.clone();
    ccfg.token = job_token.clone();
    let opts = control::service_opts(
        &ccfg,
        &CoordinatorArgs {
            bind: None,
            world: a.nproc,
            max_world,
            run_dir: run_dir.clone(),
            insecure: false,
            config_hash: crate::worker::config_hash_of(&cfg),
        },
    )?;
    let admin_token = opts.admin_token.clone().unwrap_or_default();
    let (shut_tx, shut_rx) = tokio::sync::oneshot::channel::<()>();
    let coord = std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener)?;
                phalanx_runtime::coordinator::service::run(opts, l, async {
                    let _ = shut_rx.await;
                })
                .await?;
                Ok(())
            })
        })?;

    let exe = std::env::current_exe()?;
    let spawn = |i: usize, spare: bool, host: usize| -> Result<Child> {
        let log = std::fs::File::create(run_dir.join("logs").join(format!("worker-{i}.log")))?;
        let mut cmd = match &sim {
            Some(s) => s.command(host, &exe),
            None => Command::new(&exe),
        };
        cmd.arg("worker")
            .args(["--coordinator", &url])
            .arg("--config")
            .arg(&a.config)
            .args(&a.overrides)
            .arg(format!("train.threads={threads}"))
            .arg(format!("run.dir={}", run_dir.display()))
            .env("PHALANX_JOB_TOKEN", &job_token)
            .env("PHALANX_PARENT_PID", std::process::id().to_string())
            .env(
                "PHALANX_LOG",
                std::env::var("PHALANX_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log);
        if spare {
            cmd.arg("--spare");
        }
        cmd.spawn().context("cannot start a worker process")
    };
    let mut workers: Vec<Worker> = Vec::new();
    let n_hosts = sim.as_ref().map_or(1, |s| s.len());
    for i in 0..a.nproc + a.spares {
        let spare = i >= a.nproc;
        let host = hosts::place(i, a.nproc, n_hosts);
        workers.push(Worker {
            child: spawn(i, spare, host)?,
            host,
            spare,
            done: false,
            code: None,
        });
    }
    append_event(
        &run_dir,
        Event::Launch {
            nproc: a.nproc,
            spares: a.spares,
            threads_per_rank: threads,
            hosts: sim.as_ref().map(|s| {
                (0..s.len())
                    .map(|h| LaunchedHost {
                        host: s.name(h).to_string(),
                        address: s.addr(h).to_string(),
                        pids: workers
                            .iter()
                            .filter(|w| w.host == h)
                            .map(|w| w.child.id())
                            .collect(),
                    })
                    .collect()
            }),
        },
    )?;
    // Operators (and `phalanx scale` / `drain` / `status`) need the address and the token: both
    // go to the run directory, the token readable by this user only.
    std::fs::write(run_dir.join("coordinator.url"), format!("{url}\n"))?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(run_dir.join("job-token"))?;
        control::write_secret(&run_dir.join("admin-token"), &admin_token)?;
        f.write_all(job_token.as_bytes())?;
    }
    info!(nproc = a.nproc, spares = a.spares, %url, "job started");
    info!(
        "admin: PHALANX_ADMIN_TOKEN=$(cat {dir}/admin-token) phalanx status --coordinator {url}   (also scale --target N, drain --rank R)",
        dir = run_dir.display()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut copts = client::ClientOpts::new(&url);
    copts.token = Some(admin_token.clone());
    let mut status_client = None;
    let pb_bar = if a.progress {
        ProgressBar::new(cfg.train.max_steps)
    } else {
        ProgressBar::with_draw_target(Some(cfg.train.max_steps), ProgressDrawTarget::hidden())
    };
    pb_bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let mut killed = false;
    // The quota's cgroup, the step it was applied at, and whether it has been lifted.
    let mut slowed: Option<(CpuQuota, u64, bool)> = None;
    let mut final_seen: Option<Instant> = None;
    let mut metrics_seen = 0u64;
    let mut stopped: Option<(u32, Instant)> = None;
    let mut stop_done = false;
    let mut last_status = Instant::now() - Duration::from_secs(1);
    let mut restarts = 0usize;
    let started = Instant::now();
    let mut kill_every = a.kill_every.map(|e| Periodic::new(e, started));
    let mut spare_every = a.restart_spare_every.map(|e| Periodic::new(e, started));
    let noise_stop = Arc::new(AtomicBool::new(false));
    let noise = match a.noise {
        Some(n) => Some(launch_load::start_noise(
            n,
            run_dir.clone(),
            noise_stop.clone(),
        )?),
        None => None,
    };
    // Processes the launcher killed on purpose are restarted without counting against the
    // limit on lost workers.
    let mut planned = 0usize;
    let mut world = a.nproc as u32;
    let mut outcome = "completed";
    loop {
        if stop.load(Ordering::SeqCst) {
            outcome = "interrupted";
            break;
        }
        // Children: a finished rank is done; a dead one is replaced by a fresh spare.
        // The hosts of the lost workers: a new spare starts where each ran.
        let mut respawn: Vec<usize> = Vec::new();
        for w in workers.iter_mut().filter(|w| !w.done) {
            if let Some(st) = w.child.try_wait()? {
                w.done = true;
                let code = st.code();
                w.code = code;
                append_event(
                    &run_dir,
                    Event::WorkerExit {
                        pid: w.child.id(),
                        code,
                        spare: w.spare,
                    },
                )?;
                if code != Some(crate::worker::EXIT_DONE)
                    && code != Some(crate::worker::EXIT_HALTED)
                {
                    respawn.push(w.host);
                }
                if code == Some(crate::worker::EXIT_HALTED) {
                    outcome = "halted";
                }
            }
        }
        // Rank 0 writes the `final` metrics line after saving the model: the job is done. The
        // other ranks leave right after it; anything still running then (spares) is stopped.
        if final_seen.is_none() && metrics_has_final(&run_dir, &mut metrics_seen) {
            final_seen = Some(Instant::now());
        }
        let finished = workers.iter().filter(|w| w.code == Some(0)).count();
        if let Some(t) = final_seen {
            if (finished as u32 >= world) || t.elapsed() > Duration::from_secs(5) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if outcome == "halted" {
            break;
        }
        for host in respawn {
            if restarts >= 4 * (a.nproc + a.spares) + planned {
                warn!("too many worker restarts; not restarting any more");
                break;
            }
            restarts += 1;
            let i = workers.len();
            info!(worker = i, "restarting a lost worker as a spare");
            workers.push(Worker {
                child: spawn(i, true, host)?,
                host,
                spare: true,
                done: false,
                code: None,
            });
        }
        if workers.iter().all(|w| w.done) {
            outcome = "failed";
            break;
        }
        // A pending fault injection polls the coordinator 10x as often, so that it lands within
        // a few steps of the one asked for even when steps take milliseconds.
        let pending = (a.kill.is_some() && !killed)
            || (a.stop_at.is_some() && !stop_done && stopped.is_none())
            || (a.slow_at.is_some() && slowed.is_none())
            || host_faults.pending()
            || slowed
                .as_ref()
                .is_some_and(|(_, _, lifted)| !lifted && a.slow_steps > 0);
        let poll = Duration::from_millis(if pending { 20 } else { 200 });
        if last_status.elapsed() >= poll {
            last_status = Instant::now();
            let st: Option<pb::StatusResponse> = rt.block_on(async {
                if status_client.is_none() {
                    status_client = client::connect(&copts).await.ok();
                }
                let c = status_client.as_mut()?;
                c.status(client::request(pb::StatusRequest {}, &copts))
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            });
            if let Some(st) = st {
                world = st.world.max(1);
                pb_bar.set_position(st.committed_step.min(cfg.train.max_steps));
                pb_bar.set_message(format!("generation {} | world {}", st.generation, st.world));
                if let Some((at, rank)) = a.stop_at {
                    if !stop_done && stopped.is_none() && st.committed_step >= at {
                        if let Some(pid) = inject(&run_dir, &st, rank, "STOP", &pb_bar)? {
                            stopped = Some((pid, Instant::now()));
                        }
                    }
                }
                if let Some((at, rank)) = a.slow_at {
                    if slowed.is_none() && st.committed_step >= at {
                        if let Some(r) = st
                            .ranks
                            .iter()
                            .find(|r| r.rank == Some(rank) && r.state == "active")
                        {
                            let dir = CpuQuota::apply(r.pid, a.slow_cpu_pct)?;
                            let mut f = Injected::of(FaultKind::CpuQuota, true);
                            f.cpu_pct = Some(a.slow_cpu_pct);
                            f.rank = Some(rank);
                            f.pid = Some(r.pid);
                            f.step = Some(st.committed_step);
                            append_event(&run_dir, Event::FaultInjected(f))?;
                            pb_bar.suspend(|| {
                                info!(
                                    rank,
                                    pid = r.pid,
                                    pct = a.slow_cpu_pct,
                                    "injected: CPU quota"
                                )
                            });
                            slowed = Some((dir, st.committed_step, false));
                        }
                    }
                }
                if let Some((dir, from, lifted)) = &mut slowed {
                    if !*lifted && a.slow_steps > 0 && st.committed_step >= *from + a.slow_steps {
                        dir.lift()?;
                        *lifted = true;
                        append_event(
                            &run_dir,
                            Event::FaultCleared(Cleared {
                                fault: FaultKind::CpuQuota,
                                pid: None,
                                host: None,
                                step: Some(st.committed_step),
                                cleared_unix_ms: Some(unix_ms()),
                            }),
                        )?;
                        pb_bar.suspend(|| info!(step = st.committed_step, "CPU quota lifted"));
                    }
                }
                if let Some((at, rank)) = a.kill {
                    if !killed && st.committed_step >= at {
                        killed = inject(&run_dir, &st, rank, "KILL", &pb_bar)?.is_some();
                    }
                }
                if let Some(s) = &sim {
                    let pids: Vec<u32> = workers
                        .iter()
                        .filter(|w| !w.done)
                        .map(|w| w.child.id())
                        .collect();
                    planned += host_faults.poll(s, &st, &pids, &run_dir)?;
                }
                planned += periodic_faults(
                    &run_dir,
                    &st,
                    kill_every.as_mut(),
                    spare_every.as_mut(),
                    &pb_bar,
                )?;
            }
        }
        if let Some(s) = &sim {
            host_faults.heal(s, &run_dir, false)?;
        }
        if let Some((pid, at)) = stopped {
            if at.elapsed() >= a.stop_for {
                let _ = Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
                append_event(
                    &run_dir,
                    Event::FaultCleared(Cleared {
                        fault: FaultKind::Sigstop,
                        pid: Some(pid),
                        host: None,
                        step: None,
                        cleared_unix_ms: Some(unix_ms()),
                    }),
                )?;
                stopped = None;
                stop_done = true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some((pid, _)) = stopped {
        let _ = Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status();
    }
    if let Some(s) = &sim {
        host_faults.heal(s, &run_dir, true)?;
    }
    noise_stop.store(true, Ordering::SeqCst);
    if let Some(h) = noise {
        let _ = h.join();
    }
    pb_bar.finish_and_clear();
    for w in workers.iter_mut().filter(|w| !w.done) {
        let _ = Command::new("kill")
            .args(["-TERM", &w.child.id().to_string()])
            .status();
        let _ = w.child.wait();
    }
    // The quota's cgroup goes with its guard (also on every error path above).
    drop(slowed);
    let _ = shut_tx.send(());
    let _ = coord.join();
    let r = report::build(&run_dir, wall.elapsed(), outcome, cfg.train.max_steps)?;
    std::fs::write(run_dir.join("report.json"), serde_json::to_vec_pretty(&r)?)?;
    report::print(&r);
    Ok(match outcome {
        "completed" => 0,
        "interrupted" => 130,
        _ => 1,
    })
}
