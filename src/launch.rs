//! `phalanx launch`: a local job: the coordinator (in this process) and N (+K spare) worker
//! processes; one progress display; a dead worker process is restarted as a new spare without
//! stopping the others; optional fault injection; the run directory and its report.

use crate::cgroup::CpuQuota;
use crate::config::TrainConfig;
use crate::hosts::{self, SimHosts};
use crate::launch_coordinator::{Coordinator, CoordinatorJob};
use crate::launch_hosts::{HostArgs, HostFaults};
use crate::launch_load::{self, Noise};
use crate::launch_schedule::{Action, Plan, Proc, Schedule, Status};
use crate::launch_storage;
use crate::progress::Watch;
use crate::report;
use crate::run_dir::unix_ms;
use crate::signals::{self, Signal};
use crate::worker::{EXIT_DONE, EXIT_HALTED, EXIT_PREEMPTED};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use phalanx_proto::pb;
use phalanx_runtime::coordinator::client;
use phalanx_runtime::events::{
    append_lines, Cleared, Event, FaultKind, Injected, LaunchedHost, Record,
};
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
    /// The faults and admin requests at steps or periods (the schedule's plan).
    pub plan: Plan,
    /// A noisy neighbour taking one core in bursts.
    pub noise: Option<Noise>,
    /// Simulated hosts and the faults across them.
    pub hosts: HostArgs,
    pub progress: bool,
    /// Start over in a run directory that holds a model or checkpoints (they are deleted).
    pub force: bool,
    /// Environment for every worker process (a chaos scenario's in-rank faults).
    pub worker_env: Vec<(String, String)>,
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
    let mut f = append_lines(&run_dir.join("events.jsonl"))?;
    // One write per line: the coordinator appends to the same file.
    f.write_all(format!("{line}\n").as_bytes())?;
    Ok(())
}

/// Sends SIG`signal` to `pid` (rank `rank`) and records the injected fault.
fn signal(
    run_dir: &Path,
    step: u64,
    rank: u32,
    pid: u32,
    signal: Signal,
    bar: &ProgressBar,
) -> Result<()> {
    let t = unix_ms();
    let ok = signals::send(signal, &[pid]);
    let kind = if signal == Signal::Stop {
        FaultKind::Sigstop
    } else {
        FaultKind::Sigkill
    };
    let mut f = Injected::of(kind, ok);
    f.rank = Some(rank);
    f.pid = Some(pid);
    f.step = Some(step);
    f.injected_unix_ms = t;
    append_event(run_dir, Event::FaultInjected(f))?;
    bar.suspend(|| info!(rank, pid, step, "injected: SIG{}", signal.name()));
    Ok(())
}

/// The job's config, checked, and its run directory, emptied of the last run's records.
struct Job {
    cfg: TrainConfig,
    run_dir: PathBuf,
    max_world: usize,
    /// libtorch threads per rank.
    threads: usize,
    /// Parameters of the model.
    params: u64,
}

fn prepare(a: &LaunchArgs) -> Result<Job> {
    let cfg = TrainConfig::load(Some(&a.config), &a.overrides)?;
    let max_world = cfg.train.global_batch / cfg.train.micro_batch;
    if a.nproc == 0 {
        bail!("--world 0: a job needs at least one rank");
    }
    if a.nproc > max_world {
        bail!(
            "--world {}: a global batch of {} sequences in micro-batches of {} has only {max_world} \
             micro-batches, so at most {max_world} ranks can share it; lower --world or raise \
             train.global_batch",
            a.nproc,
            cfg.train.global_batch,
            cfg.train.micro_batch
        );
    }
    // Fail here, not in N workers at once, if the dataset or model is wrong.
    let params = crate::train::setup(&cfg)?.trainer.model.num_params().max(0) as u64;
    let run_dir = cfg.run.dir.clone();
    if cfg.run.resume {
        crate::run_dir::ensure(&run_dir)?;
        crate::run_dir::archive_job(&run_dir)?;
    } else {
        crate::run_dir::claim(&run_dir, a.force, "pass --resume to continue from them, ")?;
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
    Ok(Job {
        threads: (budget / a.nproc).max(1),
        params,
        cfg,
        run_dir,
        max_world,
    })
}

/// Starts worker processes of the job.
struct Spawner<'a> {
    a: &'a LaunchArgs,
    job: &'a Job,
    sim: Option<&'a SimHosts>,
    exe: PathBuf,
    url: String,
    job_token: String,
}

impl Spawner<'_> {
    fn spawn(&self, i: usize, spare: bool, host: usize) -> Result<Worker> {
        let run_dir = &self.job.run_dir;
        let log = std::fs::File::create(run_dir.join("logs").join(format!("worker-{i}.log")))?;
        let mut cmd = match self.sim {
            Some(s) => s.command(host, &self.exe),
            None => Command::new(&self.exe),
        };
        cmd.arg("worker")
            .args(["--coordinator", &self.url])
            .arg("--config")
            .arg(&self.a.config)
            .args(&self.a.overrides)
            .arg(format!("train.threads={}", self.job.threads))
            .arg(format!("run.dir={}", run_dir.display()))
            .env("PHALANX_JOB_TOKEN", &self.job_token)
            .env("PHALANX_PARENT_PID", std::process::id().to_string())
            .env(
                "PHALANX_LOG",
                std::env::var("PHALANX_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.a.worker_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log);
        if spare {
            cmd.arg("--spare");
        }
        Ok(Worker {
            child: cmd.spawn().context("cannot start a worker process")?,
            host,
            spare,
            done: false,
            code: None,
        })
    }
}

/// A scale or drain request, as `phalanx scale` / `drain` send it; the coordinator's answer.
async fn admin_request(
    c: Option<&mut client::Client>,
    act: &Action,
    copts: &client::ClientOpts,
) -> Result<String> {
    let c = c.context("no connection to the coordinator")?;
    let answer = match *act {
        Action::Scale { target } => {
            let req = pb::ScaleRequest {
                target_world: target,
            };
            c.scale(client::request(req, copts))
                .await?
                .into_inner()
                .message
        }
        Action::Drain { rank } => {
            let who = Some(pb::drain_request::Who::Rank(rank));
            c.drain(client::request(pb::DrainRequest { who }, copts))
                .await?
                .into_inner()
                .message
        }
        _ => String::new(),
    };
    Ok(answer)
}

fn launch_event(
    a: &LaunchArgs,
    threads: usize,
    sim: Option<&SimHosts>,
    workers: &[Worker],
) -> Event {
    Event::Launch {
        nproc: a.nproc,
        spares: a.spares,
        threads_per_rank: threads,
        hosts: sim.map(|s| {
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
    }
}

/// The progress display of a run: hidden when stderr is not a terminal.
pub(crate) fn progress_bar(show: bool, max_steps: u64) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(max_steps)
    } else {
        ProgressBar::with_draw_target(Some(max_steps), ProgressDrawTarget::hidden())
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar
}

/// How a launch ended.
#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Completed,
    /// Stopped on request with a committed checkpoint of the last step (C-8).
    Preempted,
    Interrupted,
    Halted,
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Preempted => "preempted",
            Outcome::Interrupted => "interrupted",
            Outcome::Halted => "halted",
            Outcome::Failed => "failed",
        }
    }
}

/// The launcher's loop: it supervises the worker processes, polls the coordinator and carries
/// out the fault schedule.
struct Supervision<'a> {
    sp: Spawner<'a>,
    run_dir: PathBuf,
    max_steps: u64,
    /// Steps between plain progress lines when the bar is hidden.
    log_interval: u64,
    bar: ProgressBar,
    workers: Vec<Worker>,
    schedule: Schedule,
    host_faults: HostFaults,
    /// The quota's cgroup; it goes with its guard (also on every error path).
    quota: Option<CpuQuota>,
    /// Restarts so far, and processes killed on purpose (restarted without counting against
    /// the limit on lost workers).
    restarts: usize,
    planned: usize,
    world: u32,
    /// How long a stop request may take before the launcher stops the job at once.
    preempt_grace: Duration,
    /// Scale and drain requests due, sent with the status poll's client.
    admin: Vec<Action>,
    coord: Coordinator,
    /// The plan killed the whole job: nothing is restarted, the launch ends.
    job_killed: bool,
    /// The checkpoint disk the plan fills, and whether it is full now (kept full: what the job
    /// deletes is taken again).
    disk: Option<launch_storage::CheckpointDisk>,
    disk_full: bool,
}

impl Supervision<'_> {
    fn run(
        &mut self,
        stop: &AtomicBool,
        rt: &tokio::runtime::Runtime,
        copts: &client::ClientOpts,
    ) -> Result<Outcome> {
        let mut final_seen: Option<(Instant, bool)> = None;
        let mut stopping: Option<Instant> = None;
        // A resumed job's metrics hold the earlier jobs' lines, their final lines too (C-6):
        // the watch reads from where they end.
        let mut watch = Watch::new(&self.run_dir);
        let mut last_status = Instant::now() - Duration::from_secs(1);
        let mut status_client = None;
        loop {
            if stop.load(Ordering::SeqCst) && stopping.is_none() {
                stopping = Some(Instant::now());
                self.ask_to_stop();
            }
            if stopping.is_some_and(|t| t.elapsed() > self.preempt_grace) && final_seen.is_none() {
                warn!(
                    grace_s = self.preempt_grace.as_secs(),
                    "the job did not stop within run.preempt_grace_s; stopping it now"
                );
                return Ok(Outcome::Interrupted);
            }
            if self.job_killed {
                return Ok(Outcome::Failed);
            }
            let (lost, halted) = self.reap()?;
            // Rank 0 writes the `final` metrics line after saving the model (or, preempted,
            // after the checkpoint of the last step is committed): the job is done. The other
            // ranks leave right after it; anything still running then (spares) is stopped.
            if final_seen.is_none() {
                let polled = watch.poll();
                self.show(&mut watch, polled.news);
                if let Some(f) = polled.final_line {
                    final_seen = Some((Instant::now(), f.preempted));
                }
            }
            if let Some((t, preempted)) = final_seen {
                let finished = self
                    .workers
                    .iter()
                    .filter(|w| matches!(w.code, Some(EXIT_DONE | EXIT_PREEMPTED)))
                    .count();
                if (finished as u32 >= self.world) || t.elapsed() > Duration::from_secs(5) {
                    return Ok(if preempted {
                        Outcome::Preempted
                    } else {
                        Outcome::Completed
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            if halted {
                return Ok(Outcome::Halted);
            }
            if stopping.is_none() {
                self.respawn(lost)?;
            }
            if self.workers.iter().all(|w| w.done) {
                return Ok(if stopping.is_some() {
                    Outcome::Interrupted
                } else {
                    Outcome::Failed
                });
            }
            let fast =
                self.schedule.waiting_for_a_step(Instant::now()) || self.host_faults.pending();
            let poll = Duration::from_millis(if fast { 20 } else { 200 });
            if last_status.elapsed() >= poll {
                last_status = Instant::now();
                let st: Option<pb::StatusResponse> = rt.block_on(async {
                    if status_client.is_none() {
                        status_client = client::connect(copts).await.ok();
                    }
                    let c = status_client.as_mut()?;
                    let answer = c
                        .status(client::request(pb::StatusRequest {}, copts))
                        .await
                        .ok()
                        .map(|r| r.into_inner());
                    // A coordinator that restarted is reached on a new connection.
                    if answer.is_none() {
                        status_client = None;
                    }
                    answer
                });
                if let Some(st) = st {
                    self.on_status(&st)?;
                }
                for act in std::mem::take(&mut self.admin) {
                    let said = rt.block_on(admin_request(status_client.as_mut(), &act, copts));
                    match said {
                        Ok(m) => self.bar.suspend(|| info!(?act, "{m}")),
                        Err(e) => self.bar.suspend(|| warn!(?act, error = %e, "refused")),
                    }
                }
            }
            if let Some(s) = self.sp.sim {
                self.host_faults.heal(s, &self.run_dir, false)?;
            }
            if let Some(d) = self.disk.as_ref().filter(|_| self.disk_full) {
                d.fill()?;
            }
            for act in self.schedule.timed(Instant::now()) {
                self.carry_out(act, None)?;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The worker processes still running.
    fn running(&self) -> Vec<u32> {
        self.workers
            .iter()
            .filter(|w| !w.done)
            .map(|w| w.child.id())
            .collect()
    }

    /// C-8: SIGTERM or Ctrl-C reached the launcher (Slurm and PBS signal it, or every task;
    /// the terminal signals the whole process group). Every worker is asked, once: the ranks
    /// stop together after the next step, with a committed checkpoint of it.
    fn ask_to_stop(&self) {
        warn!(
            grace_s = self.preempt_grace.as_secs(),
            "asked to stop: the job saves a checkpoint after the next step and exits (again to stop at once)"
        );
        signals::send(Signal::Term, &self.running());
    }

    /// Workers that exited: recorded; the hosts of the lost ones (a new spare starts where each
    /// ran), and whether one halted the job.
    fn reap(&mut self) -> Result<(Vec<usize>, bool)> {
        let (mut lost, mut halted) = (Vec::new(), false);
        for w in self.workers.iter_mut().filter(|w| !w.done) {
            if let Some(st) = w.child.try_wait()? {
                w.done = true;
                let code = st.code();
                w.code = code;
                append_event(
                    &self.run_dir,
                    Event::WorkerExit {
                        pid: w.child.id(),
                        code,
                        spare: w.spare,
                    },
                )?;
                if !matches!(code, Some(EXIT_DONE | EXIT_HALTED | EXIT_PREEMPTED)) {
                    lost.push(w.host);
                }
                halted |= code == Some(EXIT_HALTED);
            }
        }
        Ok((lost, halted))
    }

    /// A dead worker is replaced by a fresh spare, up to a limit.
    fn respawn(&mut self, hosts: Vec<usize>) -> Result<()> {
        let a = self.sp.a;
        for host in hosts {
            if self.restarts >= 4 * (a.nproc + a.spares) + self.planned {
                warn!("too many worker restarts; not restarting any more");
                break;
            }
            self.restarts += 1;
            let i = self.workers.len();
            info!(worker = i, "restarting a lost worker as a spare");
            let w = self.sp.spawn(i, true, host)?;
            self.workers.push(w);
        }
        Ok(())
    }

    /// The progress line: the bar's message on a terminal, else a plain line now and then.
    fn show(&self, watch: &mut Watch, news: bool) {
        let line = watch.progress.line(self.max_steps);
        if self.bar.is_hidden() {
            if watch.plain_due(self.log_interval, news) {
                info!("{line}");
            }
        } else {
            self.bar.set_message(line);
        }
    }

    fn on_status(&mut self, st: &pb::StatusResponse) -> Result<()> {
        self.world = st.world.max(1);
        self.bar.set_position(st.committed_step.min(self.max_steps));
        let view = Status {
            committed_step: st.committed_step,
            world: st.world,
            procs: st
                .ranks
                .iter()
                .map(|r| Proc {
                    rank: r.rank,
                    pid: r.pid,
                    active: r.state() == pb::MemberState::Active,
                    spare: r.state() == pb::MemberState::Spare,
                })
                .collect(),
        };
        for act in self.schedule.due(Instant::now(), &view) {
            self.carry_out(act, Some(st.committed_step))?;
        }
        if let Some(s) = self.sp.sim {
            let pids: Vec<u32> = self
                .workers
                .iter()
                .filter(|w| !w.done)
                .map(|w| w.child.id())
                .collect();
            self.planned += self.host_faults.poll(s, st, &pids, &self.run_dir)?;
        }
        Ok(())
    }

    fn carry_out(&mut self, act: Action, step: Option<u64>) -> Result<()> {
        let (run_dir, bar) = (&self.run_dir, &self.bar);
        let at = step.unwrap_or(0);
        match act {
            Action::Kill {
                rank,
                pid,
                replaced,
            } => {
                signal(run_dir, at, rank, pid, Signal::Kill, bar)?;
                self.planned += usize::from(replaced);
            }
            Action::Stop { rank, pid } => {
                signal(run_dir, at, rank, pid, Signal::Stop, bar)?;
                // Woken, the rank is fenced and its process started again as a spare.
                self.planned += 1;
            }
            Action::Cont { pid } => {
                signals::send(Signal::Cont, &[pid]);
                let mut c = Cleared::of(FaultKind::Sigstop);
                c.pid = Some(pid);
                append_event(run_dir, Event::FaultCleared(c))?;
            }
            Action::Quota { rank, pid, pct } => {
                self.quota = Some(CpuQuota::apply(pid, pct)?);
                let mut f = Injected::of(FaultKind::CpuQuota, true);
                f.cpu_pct = Some(pct);
                f.rank = Some(rank);
                f.pid = Some(pid);
                f.step = step;
                append_event(run_dir, Event::FaultInjected(f))?;
                bar.suspend(|| info!(rank, pid, pct, "injected: CPU quota"));
            }
            Action::LiftQuota => {
                if let Some(q) = &self.quota {
                    q.lift()?;
                }
                let mut c = Cleared::of(FaultKind::CpuQuota);
                c.step = step;
                append_event(run_dir, Event::FaultCleared(c))?;
                bar.suspend(|| info!(step = at, "CPU quota lifted"));
            }
            Action::Scale { .. } | Action::Drain { .. } => self.admin.push(act),
            Action::RestartSpare { pid } => {
                self.planned += usize::from(launch_load::restart_spare(run_dir, pid)?);
            }
            Action::KillCoordinator => self.kill_coordinator(step)?,
            Action::RestartCoordinator => self.restart_coordinator()?,
            Action::CorruptCheckpoint => {
                let part = launch_storage::corrupt_newest(run_dir)?;
                let mut f = Injected::of(FaultKind::CheckpointCorrupt, part.is_some());
                f.step = step;
                f.path = part.map(|p| p.display().to_string());
                bar.suspend(|| info!(path = ?f.path, "injected: a bit flipped in a checkpoint"));
                append_event(run_dir, Event::FaultInjected(f))?;
            }
            Action::KillJob => self.kill_job(step)?,
            Action::FillDisk => self.fill_disk(step)?,
            Action::FreeDisk => {
                self.disk_full = false;
                if let Some(d) = &self.disk {
                    d.free()?;
                    let mut c = Cleared::of(FaultKind::DiskFull);
                    c.step = step;
                    c.cleared_unix_ms = Some(unix_ms());
                    append_event(run_dir, Event::FaultCleared(c))?;
                    bar.suspend(|| info!("the checkpoint disk has room again"));
                }
            }
        }
        Ok(())
    }

    /// The checkpoint disk filled to its last byte.
    fn fill_disk(&mut self, step: Option<u64>) -> Result<()> {
        let Some(d) = &self.disk else {
            bail!("the plan fills the checkpoint disk but none was mounted");
        };
        let bytes = d.fill()?;
        self.disk_full = true;
        let mut f = Injected::of(FaultKind::DiskFull, true);
        f.step = step;
        f.path = Some(d.dir().display().to_string());
        append_event(&self.run_dir, Event::FaultInjected(f))?;
        self.bar.suspend(|| {
            info!(
                ?step,
                mib = bytes >> 20,
                "injected: the checkpoint disk is full"
            )
        });
        Ok(())
    }

    /// Every worker SIGKILLed at once and reaped, as when a job's nodes lose power.
    fn kill_job(&mut self, step: Option<u64>) -> Result<()> {
        let pids = self.running();
        let ok = signals::send(Signal::Kill, &pids);
        let mut f = Injected::of(FaultKind::JobKilled, ok);
        f.step = step;
        f.pids = pids.clone();
        append_event(&self.run_dir, Event::FaultInjected(f))?;
        for w in self.workers.iter_mut().filter(|w| !w.done) {
            w.code = w.child.wait()?.code();
            w.done = true;
            let exit = Event::WorkerExit {
                pid: w.child.id(),
                code: w.code,
                spare: w.spare,
            };
            append_event(&self.run_dir, exit)?;
        }
        self.job_killed = true;
        self.bar
            .suspend(|| warn!(?step, "injected: every worker SIGKILLed; the job is over"));
        Ok(())
    }

    /// SIGKILL of the coordinator process; the ranks train on without it (K-5).
    fn kill_coordinator(&mut self, step: Option<u64>) -> Result<()> {
        let Some(p) = self.coord.process() else {
            bail!("the plan kills the coordinator but it runs inside the launcher");
        };
        let pid = p.pid();
        let mut f = Injected::of(FaultKind::CoordinatorKill, false);
        f.ok = p.kill();
        f.pid = pid;
        f.step = step;
        append_event(&self.run_dir, Event::FaultInjected(f))?;
        self.bar
            .suspend(|| info!(?pid, ?step, "injected: SIGKILL of the coordinator"));
        Ok(())
    }

    /// The coordinator started again on its address, from its journal.
    fn restart_coordinator(&mut self) -> Result<()> {
        let Some(p) = self.coord.process() else {
            return Ok(());
        };
        let pid = p.start()?;
        let mut c = Cleared::of(FaultKind::CoordinatorKill);
        c.pid = Some(pid);
        append_event(&self.run_dir, Event::FaultCleared(c))?;
        self.bar
            .suspend(|| info!(pid, "the coordinator started again from its journal"));
        Ok(())
    }

    /// Undoes what the schedule left (a stopped rank), heals simulated hosts, stops every
    /// process still running.
    fn wind_down(&mut self) -> Result<()> {
        for act in self.schedule.on_exit() {
            self.carry_out(act, None)?;
        }
        if let Some(s) = self.sp.sim {
            self.host_faults.heal(s, &self.run_dir, true)?;
        }
        self.bar.finish_and_clear();
        // Workers take SIGTERM as a request to stop after a checkpoint (C-8); one that has
        // not left within a few seconds of it is killed.
        signals::send(Signal::Term, &self.running());
        let deadline = Instant::now() + Duration::from_secs(5);
        for w in self.workers.iter_mut().filter(|w| !w.done) {
            while w.child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.quota = None;
        Ok(())
    }
}

pub fn run(a: &LaunchArgs, stop: Arc<AtomicBool>) -> Result<i32> {
    let wall = Instant::now();
    // Before anything else: never a silent fallback to one host.
    let mut host_faults = HostFaults::new(a.hosts.faults()?);
    if a.hosts.hosts.is_some() {
        hosts::check_can_simulate()?;
    }
    let job = prepare(a)?;
    let sim = match a.hosts.hosts {
        Some(h) => Some(SimHosts::create(h, "phalanx")?),
        None => None,
    };
    let disk = match a.plan.fill_disk_at {
        Some(_) => Some(launch_storage::CheckpointDisk::mount(
            &job.run_dir,
            launch_storage::disk_mib_for(job.params, job.cfg.run.keep_checkpoints),
        )?),
        None => None,
    };
    let coord = Coordinator::start(
        &CoordinatorJob {
            cfg: &job.cfg,
            config: &a.config,
            overrides: &a.overrides,
            world: a.nproc,
            max_world: job.max_world,
            run_dir: &job.run_dir,
            bind_ip: sim
                .as_ref()
                .map_or_else(|| "127.0.0.1".to_string(), |s| s.gateway().to_string()),
        },
        a.plan.kill_coordinator_at.is_some(),
    )?;
    let exe = std::env::current_exe()?;
    if let Some(s) = sim.as_ref() {
        host_faults.prepare(s, &exe)?;
    }
    let sp = Spawner {
        a,
        job: &job,
        sim: sim.as_ref(),
        exe,
        url: coord.url.clone(),
        job_token: coord.job_token.clone(),
    };
    let n_hosts = sim.as_ref().map_or(1, |s| s.len());
    let workers = (0..a.nproc + a.spares)
        .map(|i| sp.spawn(i, i >= a.nproc, hosts::place(i, a.nproc, n_hosts)))
        .collect::<Result<Vec<_>>>()?;
    append_event(
        &job.run_dir,
        launch_event(a, job.threads, sim.as_ref(), &workers),
    )?;
    coord.write_access(&job.run_dir)?;
    let url = coord.url.clone();
    info!(nproc = a.nproc, spares = a.spares, %url, "job started");
    info!(
        "admin: phalanx status --run-dir {dir}   (also scale --target N, drain --rank R)",
        dir = job.run_dir.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut copts = client::ClientOpts::new(&url);
    copts.token = Some(coord.admin_token.clone());
    let noise_stop = Arc::new(AtomicBool::new(false));
    let noise = match a.noise {
        Some(n) => Some(launch_load::start_noise(
            n,
            job.run_dir.clone(),
            noise_stop.clone(),
        )?),
        None => None,
    };
    let mut sup = Supervision {
        sp,
        run_dir: job.run_dir.clone(),
        max_steps: job.cfg.train.max_steps,
        log_interval: job.cfg.train.log_interval,
        bar: {
            let bar = progress_bar(a.progress, job.cfg.train.max_steps);
            // The line says the step and the ETA (from the recent commits' rate).
            bar.set_style(
                ProgressStyle::with_template("{bar:30} [{elapsed_precise}] {msg}")
                    .expect("valid template"),
            );
            bar
        },
        workers,
        schedule: Schedule::new(a.plan.clone(), wall),
        host_faults,
        quota: None,
        restarts: 0,
        planned: 0,
        world: a.nproc as u32,
        preempt_grace: Duration::from_secs(job.cfg.run.preempt_grace_s),
        admin: Vec::new(),
        coord,
        job_killed: false,
        disk,
        disk_full: false,
    };
    let outcome = sup.run(&stop, &rt, &copts);
    let wound = sup.wind_down();
    noise_stop.store(true, Ordering::SeqCst);
    if let Some(h) = noise {
        let _ = h.join();
    }
    sup.coord.stop();
    // Its checkpoints back on the disk below, before the report and the checks read them.
    let released = sup.disk.as_mut().map_or(Ok(()), |d| d.release());
    let outcome = outcome?;
    wound?;
    released?;
    let r = report::build(
        &job.run_dir,
        wall.elapsed(),
        outcome.as_str(),
        job.cfg.train.max_steps,
    )?;
    std::fs::write(
        job.run_dir.join("report.json"),
        serde_json::to_vec_pretty(&r)?,
    )?;
    report::print(&r);
    // The run's picture beside its report (loss, throughput, world, faults).
    if let Err(e) = crate::plot::run(&job.run_dir, None) {
        warn!(error = %e, "no report.png for this run");
    }
    Ok(match outcome {
        Outcome::Completed => 0,
        Outcome::Preempted => EXIT_PREEMPTED,
        Outcome::Interrupted => 130,
        _ => 1,
    })
}
