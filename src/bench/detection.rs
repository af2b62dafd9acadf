//! `phalanx bench detection`: how soon the coordinator, with its default settings, declares a
//! crashed rank (SIGKILL) and a hung one (SIGSTOP) failed, over many faults, and that it
//! declares nobody failed in a fault-free stretch of the same job, beside a CPU load if asked.
//!
//! Real processes: a `phalanx coordinator` and `phalanx sim-rank` processes (real gRPC
//! sessions and heartbeats; their training is a step counter), struck with real signals. A
//! round strikes several ranks at once (fewer than half, which the split-brain guard would
//! hold), waits for the coordinator's `rank_failed` event of each, then starts as many new
//! spares and waits for the world to be whole again. Detection is the event's time minus the
//! signal's, both from this machine's clock.

use crate::signals::{self, Signal};
use anyhow::{bail, Context, Result};
use phalanx_model::sampler::mix64;
use phalanx_proto::pb;
use phalanx_runtime::coordinator::client::{self, ClientOpts};
use phalanx_runtime::events::unix_ms;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const JOB_TOKEN: &str = "bench-detection";
const ADMIN_TOKEN: &str = "bench-detection-admin";

#[derive(clap::Args)]
pub struct Opts {
    /// SIGKILLs to inject.
    #[arg(long, default_value_t = 1000)]
    pub kills: usize,
    /// SIGSTOPs (hangs) to inject.
    #[arg(long, default_value_t = 1000)]
    pub hangs: usize,
    /// Ranks of the job (simulated rank processes).
    #[arg(long, default_value_t = 16)]
    pub ranks: usize,
    /// Ranks struck at once in a round (fewer than half the ranks).
    #[arg(long, default_value_t = 4)]
    pub at_once: usize,
    /// Minutes of the job with no fault, counting false detections (0: skipped).
    #[arg(long, default_value_t = 0.0)]
    pub fault_free_min: f64,
    /// Busy threads beside the job for the whole run (a CPU load on the same cores).
    #[arg(long, default_value_t = 0)]
    pub load: usize,
    /// Places the struck ranks.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Coordinator overrides (e.g. coordinator.heartbeat_timeout_ms=1500); default: the
    /// defaults a job gets.
    pub overrides: Vec<String>,
}

/// A struck rank's process and when the signal went.
struct Struck {
    pid: u32,
    signalled_ms: u64,
}

pub fn run(o: &Opts) -> Result<()> {
    if o.ranks < 3 || o.at_once == 0 || o.at_once * 2 >= o.ranks {
        bail!(
            "--ranks {} --at-once {}: strike at least one and fewer than half the ranks (e.g. \
             --ranks 16 --at-once 4)",
            o.ranks,
            o.at_once
        );
    }
    if !(o.fault_free_min.is_finite() && o.fault_free_min >= 0.0) {
        bail!("--fault-free-min {}: use minutes >= 0", o.fault_free_min);
    }
    let stop_load = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..o.load).map(|_| busy(stop_load.clone())).collect();
    let dir = tempfile::tempdir()?;
    // The job's processes are stopped when `job` drops, whatever ends the bench.
    let result = Job::start(dir.path(), o).and_then(|mut job| measure(&mut job, o));
    stop_load.store(true, Ordering::SeqCst);
    for t in load {
        let _ = t.join();
    }
    result
}

fn busy(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut x = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..100_000 {
                x = std::hint::black_box(mix64(x));
            }
        }
    })
}

fn measure(job: &mut Job, o: &Opts) -> Result<()> {
    outln!(
        "detection bench: {} ranks + {} spares (simulated rank processes), heartbeat every {} ms, \
         timeout {} ms, decisions every {} ms{}",
        o.ranks,
        o.at_once,
        job.settings.heartbeat_interval_ms,
        job.settings.heartbeat_timeout_ms,
        job.settings.tick_ms,
        if o.load > 0 {
            format!(", {} busy threads beside it", o.load)
        } else {
            String::new()
        }
    );
    job.wait_whole(Duration::from_secs(120))?;
    let mut round = 0u64;
    for (kind, n) in [(Signal::Kill, o.kills), (Signal::Stop, o.hangs)] {
        if n == 0 {
            continue;
        }
        let mut detect = Vec::new();
        let mut missed = 0;
        let started = Instant::now();
        while detect.len() + missed < n {
            round += 1;
            let k = o.at_once.min(n - detect.len() - missed);
            let (got, lost) = job.strike(kind, k, o.seed ^ round)?;
            detect.extend(got);
            missed += lost;
            job.replace(k)?;
            if round % 25 == 0 {
                outln!(
                    "  {}: {} of {n} ({:.0} s)",
                    what(kind),
                    detect.len() + missed,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        summary(kind, &mut detect, missed);
    }
    if o.fault_free_min > 0.0 {
        fault_free(job, o.fault_free_min)?;
    }
    Ok(())
}

/// The signal sent straight away (no `kill` process between the time taken and the signal).
fn signal(pid: u32, kind: Signal) -> Result<()> {
    use rustix::process::{kill_process, Pid, Signal as S};
    let sig = if kind == Signal::Kill {
        S::KILL
    } else {
        S::STOP
    };
    let pid = Pid::from_raw(pid as i32).context("pid 0")?;
    kill_process(pid, sig).with_context(|| format!("cannot signal process {pid:?}"))
}

fn what(kind: Signal) -> &'static str {
    if kind == Signal::Kill {
        "crash (SIGKILL)"
    } else {
        "hang (SIGSTOP)"
    }
}

fn summary(kind: Signal, ms: &mut [u64], missed: usize) {
    if ms.is_empty() {
        outln!(
            "{}: none detected, {missed} missed (none within 10 s)",
            what(kind)
        );
        return;
    }
    ms.sort_unstable();
    let q = |p: f64| {
        ms.get(((ms.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0)
    };
    outln!(
        "{}: {} detected, {missed} missed (none within 10 s); ms from the signal to rank_failed: \
         p50 {} p90 {} p99 {} max {}",
        what(kind),
        ms.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        ms.last().copied().unwrap_or(0)
    );
}

/// The job runs untouched; every rank declared failed meanwhile is a false detection.
fn fault_free(job: &mut Job, minutes: f64) -> Result<()> {
    let before = job.failed_events()?.len();
    let until = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let started = Instant::now();
    let mut next_note = Instant::now() + Duration::from_secs(300);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_secs(1));
        if Instant::now() >= next_note {
            next_note += Duration::from_secs(300);
            let n = job.failed_events()?.len() - before;
            outln!(
                "  fault-free: {:.0} of {minutes} min, {n} false detection(s) so far",
                started.elapsed().as_secs_f64() / 60.0
            );
        }
    }
    let failed = job.failed_events()?;
    let false_ones = &failed[before..];
    outln!(
        "fault-free: {minutes} min, {} false detection(s){}",
        false_ones.len(),
        false_ones
            .iter()
            .map(|e| format!(" [{}]", e["reason"].as_str().unwrap_or("")))
            .collect::<String>()
    );
    Ok(())
}

/// The coordinator process, the simulated ranks, and a client for its status.
struct Job {
    coordinator: Child,
    url: String,
    ranks: Vec<Child>,
    events: PathBuf,
    /// How far `events` has been read, and a line not yet complete.
    read_to: u64,
    partial: String,
    world: usize,
    spares: usize,
    rt: tokio::runtime::Runtime,
    settings: Settings,
}

/// The detection settings the coordinator runs with.
struct Settings {
    heartbeat_interval_ms: u64,
    heartbeat_timeout_ms: u64,
    tick_ms: u64,
}

impl Job {
    fn start(dir: &Path, o: &Opts) -> Result<Job> {
        let mut overrides = vec![
            format!("train.global_batch={}", o.ranks),
            "train.micro_batch=1".to_string(),
        ];
        overrides.extend(o.overrides.iter().cloned());
        let cfg = crate::config::TrainConfig::load(None, &overrides)?;
        let c = &cfg.coordinator;
        let settings = Settings {
            heartbeat_interval_ms: c.heartbeat_interval_ms,
            heartbeat_timeout_ms: c.heartbeat_timeout_ms,
            tick_ms: c.tick_ms,
        };
        let mut coordinator = Command::new(std::env::current_exe()?)
            .args(["coordinator", "--bind", "127.0.0.1:0", "--world"])
            .arg(o.ranks.to_string())
            .arg("--run-dir")
            .arg(dir)
            .args(&overrides)
            .env("PHALANX_LOG", "warn")
            .env("PHALANX_JOB_TOKEN", JOB_TOKEN)
            .env("PHALANX_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the coordinator")?;
        let mut first = String::new();
        BufReader::new(coordinator.stdout.take().context("stdout")?).read_line(&mut first)?;
        if !first.contains("listening on") {
            let _ = coordinator.kill();
            let _ = coordinator.wait();
            bail!("the coordinator did not start; its error is above");
        }
        let addr = first.trim().rsplit(' ').next().unwrap_or("").to_string();
        let mut job = Job {
            coordinator,
            url: format!("http://{addr}"),
            ranks: Vec::new(),
            events: dir.join("events.jsonl"),
            read_to: 0,
            partial: String::new(),
            world: o.ranks,
            spares: o.at_once,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            settings,
        };
        for _ in 0..o.ranks {
            job.spawn(false)?;
        }
        for _ in 0..o.at_once {
            job.spawn(true)?;
        }
        Ok(job)
    }

    fn spawn(&mut self, spare: bool) -> Result<()> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["sim-rank", "--coordinator", &self.url, "--step-ms", "50"])
            .env("PHALANX_LOG", "warn")
            .env("PHALANX_JOB_TOKEN", JOB_TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if spare {
            cmd.arg("--spare");
        }
        self.ranks
            .push(cmd.spawn().context("cannot start a simulated rank")?);
        Ok(())
    }

    fn status(&self) -> Result<pb::StatusResponse> {
        let mut opts = ClientOpts::new(&self.url);
        opts.token = Some(ADMIN_TOKEN.into());
        self.rt.block_on(async {
            let mut c = client::connect(&opts).await?;
            Ok(c.status(client::request(pb::StatusRequest {}, &opts))
                .await?
                .into_inner())
        })
    }

    /// Waits until the world is at its target and every spare is connected.
    fn wait_whole(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status()?;
            let spares = s
                .ranks
                .iter()
                .filter(|r| r.state() == pb::MemberState::Spare)
                .count();
            if s.world as usize == self.world && spares >= self.spares {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the job did not become whole again ({} ranks of {}, {spares} spares of {}) \
                     within {within:?}",
                    s.world,
                    self.world,
                    self.spares
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Strikes `k` active ranks at once with `kind`; the detection times (ms) of those the
    /// coordinator declared failed within 10 s, and how many it did not.
    fn strike(&mut self, kind: Signal, k: usize, seed: u64) -> Result<(Vec<u64>, usize)> {
        let s = self.status()?;
        let mut active: Vec<u32> = s
            .ranks
            .iter()
            .filter(|r| r.state() == pb::MemberState::Active)
            .map(|r| r.pid)
            .collect();
        if active.len() < k {
            bail!(
                "only {} active ranks to strike {k} of (the job did not stay whole)",
                active.len()
            );
        }
        let mut struck = Vec::new();
        for i in 0..k {
            let pid = active.remove((mix64(seed ^ mix64(i as u64)) % active.len() as u64) as usize);
            let signalled_ms = unix_ms();
            signal(pid, kind)?;
            struck.push(Struck { pid, signalled_ms });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut found: BTreeMap<u32, u64> = BTreeMap::new();
        while found.len() < struck.len() && Instant::now() < deadline {
            for e in self.new_failed()? {
                if let (Some(pid), Some(at)) = (e["pid"].as_u64(), e["unix_ms"].as_u64()) {
                    found.insert(pid as u32, at);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // A stopped process is of no more use: killed, like a crashed one, and reaped.
        let pids: Vec<u32> = struck.iter().map(|s| s.pid).collect();
        signals::send(Signal::Kill, &pids);
        self.reap();
        let got: Vec<u64> = struck
            .iter()
            .filter_map(|s| {
                found
                    .get(&s.pid)
                    .map(|&at| at.saturating_sub(s.signalled_ms))
            })
            .collect();
        let missed = struck.len() - got.len();
        Ok((got, missed))
    }

    /// Starts `k` new spares and waits for the job to be whole again.
    fn replace(&mut self, k: usize) -> Result<()> {
        for _ in 0..k {
            self.spawn(true)?;
        }
        self.wait_whole(Duration::from_secs(60))
    }

    fn reap(&mut self) {
        self.ranks
            .retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
    }

    fn failed_events(&self) -> Result<Vec<serde_json::Value>> {
        Ok(rank_failed(
            &std::fs::read_to_string(&self.events).unwrap_or_default(),
        ))
    }

    /// The `rank_failed` events written since the last call: only the new bytes are read (the
    /// file grows by every round's events, and it is polled every few ms).
    fn new_failed(&mut self) -> Result<Vec<serde_json::Value>> {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.events) else {
            return Ok(Vec::new());
        };
        f.seek(SeekFrom::Start(self.read_to))?;
        let mut text = std::mem::take(&mut self.partial);
        self.read_to += f.read_to_string(&mut text)? as u64;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        self.partial = text[complete..].to_string();
        Ok(rank_failed(&text[..complete]))
    }
}

/// The coordinator's `rank_failed` events among `lines` of events.jsonl.
fn rank_failed(lines: &str) -> Vec<serde_json::Value> {
    lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["kind"] == "rank_failed")
        .collect()
}

impl Drop for Job {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.ranks.iter().map(Child::id).collect();
        signals::send(Signal::Kill, &pids);
        for c in &mut self.ranks {
            let _ = c.wait();
        }
        signals::send(Signal::Term, &[self.coordinator.id()]);
        let _ = self.coordinator.wait();
    }
}
