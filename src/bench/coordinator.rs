//! `phalanx bench coordinator`: the cost of the control plane at scale.
//!
//! 1. The decision core alone, in this process with simulated time: N ranks heartbeating at
//!    1 Hz, the decision function every 50 ms tick; CPU per heartbeat and share of one core,
//!    the detection latency of a rank that stops, and the time to form an assignment.
//! 2. The real gRPC service: a `phalanx coordinator` child process and M simulated rank
//!    sessions from this process heartbeating at 1 Hz; the coordinator's CPU use (from
//!    /proc), and the detection latency of a rank that goes silent and of one whose stream drops.

use anyhow::{bail, Context, Result};
use phalanx_proto::pb;
use phalanx_runtime::coordinator::client::{self, ClientOpts, RankSession};
use phalanx_runtime::coordinator::core::{
    apply, decide, CoreConfig, Decision, HeartbeatMsg, Phase, Registration, Role, State,
};
use phalanx_runtime::events::unix_ms;
use phalanx_runtime::ids::{Generation, Step};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(50);

fn bench_cfg(n: usize) -> CoreConfig {
    CoreConfig {
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(3),
        max_world: n,
        ..CoreConfig::default()
    }
}

fn core_bench(n: usize, seconds: u64) -> Result<()> {
    let cfg = bench_cfg(n);
    let t0 = Instant::now();
    let mut s = State::new("bench", n);
    for i in 0..n {
        let r = s.register(
            t0,
            Registration {
                job_id: "bench".into(),
                host: format!("node{}", i / 8),
                pid: i as u32,
                addr: vec![0; 64],
                role: Role::Active,
                config_hash: "h".into(),
                rejoin: None,
                committed_step: Step(0),
                secret_digest: String::new(),
            },
            &cfg,
        )?;
        s.session_opened(t0, r.id)?;
    }
    let real = Instant::now();
    let d = decide(t0, &s, &cfg);
    apply(&mut s, &d);
    let form = real.elapsed();
    if s.world() != n {
        bail!("the first generation has {} ranks, expected {n}", s.world());
    }
    let ids = s.ranks.clone();
    let ticks_per_s = (1000 / TICK.as_millis()) as usize;
    let mut now = t0;
    let mut heartbeats = 0u64;
    let mut busy = Duration::ZERO;
    let victim = ids[n / 2];
    let mut victim_last = now;
    let mut detected = None;
    let mut regroup_time = Duration::ZERO;
    let total_ticks = seconds as usize * ticks_per_s;
    let mut hb = HeartbeatMsg {
        generation: Generation(1),
        phase: Phase::Training,
        ..HeartbeatMsg::default()
    };
    for tick in 0..total_ticks + 8 * ticks_per_s {
        now += TICK;
        let step = (tick / ticks_per_s) as u64 + 1;
        let slice = tick % ticks_per_s;
        let start = Instant::now();
        for &id in &ids[slice * n / ticks_per_s..(slice + 1) * n / ticks_per_s] {
            // The victim stops heartbeating after the measured period.
            if id == victim && tick >= total_ticks {
                continue;
            }
            if id == victim {
                victim_last = now;
            }
            hb.step = Step(step);
            hb.collective_seq = step;
            hb.last_step_time = Duration::from_millis(100 + (id % 7));
            hb.last_compute_time = Duration::from_millis(90 + (id % 7));
            s.heartbeat(now, id, &hb, &cfg)?;
            heartbeats += 1;
        }
        if tick % 10 == 0 {
            s.refresh_reference();
        }
        let t = Instant::now();
        let d = decide(now, &s, &cfg);
        if let Decision::Regroup(r) = &d {
            apply(&mut s, &d);
            regroup_time = t.elapsed();
            if r.removed.iter().any(|(id, _)| *id == victim) {
                detected = Some(now.saturating_duration_since(victim_last));
                break;
            }
        }
        if tick < total_ticks {
            busy += start.elapsed();
        }
    }
    let measured_hb = (n as u64) * seconds;
    outln!(
        "decision core, {n} ranks at 1 Hz, {seconds} s simulated, tick {} ms:",
        TICK.as_millis()
    );
    outln!(
        "  CPU {:.2}% of one core, {:.0} ns per heartbeat (decide every tick included), {heartbeats} heartbeats",
        busy.as_secs_f64() / seconds as f64 * 100.0,
        busy.as_nanos() as f64 / measured_hb as f64
    );
    outln!(
        "  first assignment of {n} ranks: {:.2} ms",
        form.as_secs_f64() * 1e3
    );
    match detected {
        Some(d) => outln!(
            "  a rank that stops is detected {:.0} ms after its last heartbeat (timeout {} ms + one tick of {} ms); regroup to {} ranks took {:.2} ms",
            d.as_secs_f64() * 1e3,
            cfg.heartbeat_timeout.as_millis(),
            TICK.as_millis(),
            s.world(),
            regroup_time.as_secs_f64() * 1e3
        ),
        None => bail!("the stopped rank was never detected"),
    }
    Ok(())
}

fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("utime")?.parse()?;
    let stime: u64 = f.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

struct SimHandle {
    silent: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

async fn sim_session(
    opts: ClientOpts,
    chan: client::Client,
    silent: Arc<AtomicBool>,
    offset: Duration,
) {
    let reg = pb::RegisterRequest {
        job_id: "phalanx".into(),
        host: "bench".into(),
        dataplane_address: vec![1; 64],
        role: pb::Role::Active as i32,
        config_hash: "bench".into(),
        ..Default::default()
    };
    let Ok(sess) = RankSession::open(chan, &opts, reg).await else {
        return;
    };
    let (tx, mut inbound) = (sess.tx, sess.inbound);
    let gen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let g = gen.clone();
    tokio::spawn(async move {
        while let Ok(Some(d)) = inbound.message().await {
            if let Some(pb::directive::Kind::Assign(a)) = d.kind {
                g.store(a.generation, Ordering::Relaxed);
            }
        }
    });
    tokio::time::sleep(offset).await;
    let mut iv = tokio::time::interval(Duration::from_secs(1));
    let mut step = 0;
    loop {
        iv.tick().await;
        if silent.load(Ordering::Relaxed) {
            continue;
        }
        let generation = gen.load(Ordering::Relaxed);
        if generation > 0 {
            step += 1;
        }
        let hb = pb::RankMessage {
            msg: Some(pb::rank_message::Msg::Heartbeat(pb::Heartbeat {
                generation,
                step,
                collective_seq: step,
                phase: pb::Phase::Training as i32,
                last_step_time_us: 100_000,
                last_compute_time_us: 90_000,
                ..Default::default()
            })),
        };
        if tx.send(hb).await.is_err() {
            return;
        }
    }
}

fn grpc_bench(m: usize, seconds: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "coordinator",
            "--bind",
            "127.0.0.1:0",
            "--world",
            &m.to_string(),
        ])
        .arg("--run-dir")
        .arg(dir.path())
        .args([
            format!("train.global_batch={m}"),
            "train.micro_batch=1".into(),
            "coordinator.heartbeat_interval_ms=1000".into(),
            "coordinator.heartbeat_timeout_ms=3000".into(),
        ])
        .env("PHALANX_LOG", "warn")
        .env("PHALANX_JOB_TOKEN", "bench-token")
        .env("PHALANX_ADMIN_TOKEN", "bench-admin-token")
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut first = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut first)?;
    let addr = first.trim().rsplit(' ').next().unwrap_or("").to_string();
    let url = format!("http://{addr}");
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async {
        let mut opts = ClientOpts::new(&url);
        opts.token = Some("bench-token".into());
        opts.rpc_timeout = Duration::from_secs(30);
        // This process and the coordinator share two cores with 10k sessions: give pings room.
        opts.keepalive_timeout = Duration::from_secs(10);
        // Many sessions share each HTTP/2 connection, as ranks behind one proxy would not; the
        // coordinator's cost is per message, not per connection.
        let conns = m.div_ceil(250);
        let mut chans = Vec::new();
        for _ in 0..conns {
            chans.push(client::connect(&opts).await?);
        }
        let mut sims = Vec::new();
        for i in 0..m {
            let silent = Arc::new(AtomicBool::new(false));
            let offset = Duration::from_millis((i as u64 * 1000) / m as u64);
            let task = tokio::spawn(sim_session(opts.clone(), chans[i % conns].clone(), silent.clone(), offset));
            sims.push(SimHandle { silent, task });
        }
        // Status is an admin call: the ranks' token does not open it.
        let mut admin_opts = opts.clone();
        admin_opts.token = Some("bench-admin-token".into());
        let opts = admin_opts;
        let mut admin = client::connect(&opts).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = admin.status(client::request(pb::StatusRequest {}, &opts)).await?.into_inner();
            if s.world as usize == m {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {} of {m} ranks formed a generation", s.world);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Let the first-assignment burst pass, then measure steady state.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let hz = 100.0; // USER_HZ on Linux
        let c0 = proc_cpu_ticks(pid)?;
        let w0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let cpu = (proc_cpu_ticks(pid)? - c0) as f64 / hz / w0.elapsed().as_secs_f64();
        outln!("gRPC coordinator (separate process), {m} ranks at 1 Hz over {seconds} s:");
        outln!(
            "  coordinator CPU {:.1}% of one core ({:.1} us per heartbeat)",
            cpu * 100.0,
            cpu * 1e6 / m as f64
        );
        // A rank that goes silent (stopped): detected by the heartbeat deadline.
        let events = dir.path().join("events.jsonl");
        sims[m / 3].silent.store(true, Ordering::Relaxed);
        let silent_from = unix_ms();
        let ev = wait_failed(&events, 1, Duration::from_secs(15)).await?;
        outln!(
            "  silent rank detected {:.0} ms after its last heartbeat (timeout 3000 ms + one 50 ms tick), {} ms after it went quiet",
            ev["detect_ms"].as_f64().unwrap_or(f64::NAN),
            ev["unix_ms"].as_u64().unwrap_or(0).saturating_sub(silent_from)
        );
        // A rank whose session drops (killed): detected from the stream error.
        sims[2 * m / 3].task.abort();
        let killed_at = unix_ms();
        let ev = wait_failed(&events, 2, Duration::from_secs(15)).await?;
        outln!(
            "  killed rank (session dropped) detected in {} ms",
            ev["unix_ms"].as_u64().unwrap_or(0).saturating_sub(killed_at)
        );
        Ok(())
    });
    // Close the simulated sessions first so that the coordinator can shut down.
    rt.shutdown_timeout(Duration::from_secs(1));
    crate::signals::send(crate::signals::Signal::Term, &[pid]);
    let _ = child.wait();
    result
}

/// Waits for the `n`-th rank_failed event and returns its time.
async fn wait_failed(
    events: &std::path::Path,
    n: usize,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(events).unwrap_or_default();
        let failed: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|e: &serde_json::Value| e["kind"] == "rank_failed")
            .collect();
        if failed.len() >= n {
            return Ok(failed[n - 1].clone());
        }
        if Instant::now() > deadline {
            bail!("no rank_failed event #{n} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn run(ranks: usize, seconds: u64, grpc_ranks: usize, grpc_seconds: u64) -> Result<()> {
    if ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    core_bench(ranks, seconds)?;
    if grpc_ranks > 0 {
        grpc_bench(grpc_ranks, grpc_seconds)?;
    }
    Ok(())
}
