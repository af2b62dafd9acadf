//! Fault tests with real processes over real UCX (P-1, P-3, P-4 of docs/semantics.md).
//!
//! The ranks are this test binary re-executed: `rank_process` is a no-op test in the parent
//! and the rank's main loop in a child (selected by the `PHX_DP_RANK` environment variable), so
//! no extra binary target is needed. A rank runs allreduces and broadcasts in a loop with the default
//! configuration (2 s deadline), prints one line per event on stderr (`DP ...`; libtest keeps
//! a child test's stdout), and follows
//! commands on stdin (`REBUILD <addr> <rank> <world> <generation>`, `EXIT`).

use phalanx_runtime::dataplane::{BootstrapServer, TcpBootstrap, UcxConfig, UcxGroup};
use phalanx_runtime::{Generation, Rank, RuntimeError};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const LEN: usize = 256 * 1024;
const BCAST_LEN: usize = 3 * 1024 * 1024 + 5;

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

fn describe(e: &RuntimeError) -> (String, String) {
    match e {
        RuntimeError::PeerFailed { rank, .. } => ("PeerFailed".into(), rank.to_string()),
        RuntimeError::Timeout { .. } => ("Timeout".into(), "-".into()),
        RuntimeError::GroupBroken { .. } => ("GroupBroken".into(), "-".into()),
        other => (
            format!("{other:?}")
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .into(),
            "-".into(),
        ),
    }
}

/// Runs allreduces, each followed by a broadcast (several chunks, root rotating, so the
/// shared-memory window path runs too), until one fails (or `limit` rounds succeed); checks
/// every result.
fn run_loop(g: &UcxGroup, limit: Option<usize>) -> Result<usize, RuntimeError> {
    let n = g.world() as usize;
    let want = (n * (n + 1) / 2) as f32;
    let mut buf = vec![0f32; LEN];
    let mut bc = vec![0u8; BCAST_LEN];
    // PHX_DP_OPS=broadcast: broadcasts only, all from rank 0 (a fault hits one mid-broadcast).
    let bcast_only = std::env::var("PHX_DP_OPS").as_deref() == Ok("broadcast");
    let mut i = 0;
    loop {
        if !bcast_only {
            buf.iter_mut().for_each(|x| *x = (g.rank().0 + 1) as f32);
            g.allreduce(&mut buf)?;
            assert!(
                buf.iter().all(|&x| x == want),
                "wrong allreduce result in generation {}",
                g.generation()
            );
        }
        let root = if bcast_only { 0 } else { (i % n) as u32 };
        let fill = (i % 251) as u8;
        bc.iter_mut()
            .for_each(|x| *x = if g.rank().0 == root { fill } else { 0xEE });
        g.broadcast(&mut bc, Rank(root))?;
        assert!(
            bc.len() == BCAST_LEN && bc.iter().all(|&x| x == fill),
            "wrong broadcast result in generation {}",
            g.generation()
        );
        i += 1;
        if i == 1 {
            eprintln!("DP LOOPING {}", g.generation());
        }
        if limit == Some(i) {
            return Ok(i);
        }
    }
}

fn connect(addr: &str, rank: u32, world: u32, generation: u64) -> Result<UcxGroup, RuntimeError> {
    let boot = Box::new(TcpBootstrap {
        server: addr.to_string(),
    });
    // PHX_ERR_MODE=none runs the same scenarios without UCX's peer error mode.
    let cfg = UcxConfig {
        peer_error_mode: std::env::var("PHX_ERR_MODE").as_deref() != Ok("none"),
        ..UcxConfig::default()
    };
    UcxGroup::connect(Rank(rank), world, Generation(generation), cfg, boot)
}

#[test]
fn rank_process() {
    let Ok(spec) = std::env::var("PHX_DP_RANK") else {
        return;
    };
    let f: Vec<&str> = spec.split_whitespace().collect();
    let (addr, rank, world, generation) = (
        f[0],
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
        f[3].parse().unwrap(),
    );
    let g = connect(addr, rank, world, generation).unwrap();
    let e = run_loop(&g, None).unwrap_err();
    let (kind, who) = describe(&e);
    eprintln!("DP ERR {} {generation} {kind} {who} {e}", now_us());
    // A broken group stays broken: the next call fails at once instead of touching peers.
    let again = g.allreduce(&mut vec![1.0f32; 8]).unwrap_err();
    eprintln!("DP AGAIN {}", describe(&again).0);
    let mut old = Some(g);
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let c: Vec<&str> = line.split_whitespace().collect();
        match c.first().copied() {
            Some("REBUILD") => {
                drop(old.take());
                let (r, w, gen) = (
                    c[2].parse().unwrap(),
                    c[3].parse().unwrap(),
                    c[4].parse().unwrap(),
                );
                let g = connect(c[1], r, w, gen).unwrap();
                match run_loop(&g, Some(200)) {
                    Ok(k) => eprintln!(
                        "DP REBUILT_OK {gen} {k} dropped_stale={}",
                        g.stats().unwrap().dropped_stale
                    ),
                    Err(e) => eprintln!("DP REBUILT_ERR {gen} {e}"),
                }
                old = Some(g);
            }
            _ => break,
        }
    }
}

struct Rank_ {
    child: Child,
    stdin: ChildStdin,
}

/// Spawns `world` rank processes of `generation` and a bootstrap server for them.
fn spawn(world: u32, generation: u64, tx: &mpsc::Sender<(u32, u128, String)>) -> Vec<Rank_> {
    spawn_ops(world, generation, tx, "mixed")
}

/// `ops`: `mixed` (allreduce + broadcast per round) or `broadcast` (broadcasts from rank 0).
fn spawn_ops(
    world: u32,
    generation: u64,
    tx: &mpsc::Sender<(u32, u128, String)>,
    ops: &str,
) -> Vec<Rank_> {
    let srv = BootstrapServer::bind("127.0.0.1:0").unwrap();
    let addr = srv.local_addr().to_string();
    std::thread::spawn(move || srv.serve(world, Generation(generation), Duration::from_secs(60)));
    (0..world)
        .map(|r| {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["rank_process", "--exact", "--nocapture", "--test-threads=1"])
                .env("PHX_DP_RANK", format!("{addr} {r} {world} {generation}"))
                .env("PHX_DP_OPS", ops)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let out = child.stderr.take().unwrap();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    match line.strip_prefix("DP ") {
                        Some(rest) => drop(tx.send((r, now_us(), rest.to_string()))),
                        // Panics and UCX diagnostics of the rank: keep them visible.
                        None => eprintln!("[rank {r} g{generation}] {line}"),
                    }
                }
            });
            let stdin = child.stdin.take().unwrap();
            Rank_ { child, stdin }
        })
        .collect()
}

/// The ranks' event lines; lines not yet asked for are kept for later questions.
struct Lines {
    rx: mpsc::Receiver<(u32, u128, String)>,
    pending: Vec<(u32, u128, String)>,
}

impl Lines {
    /// Waits for the first line matching `pred` from each rank of `ranks`.
    fn collect(
        &mut self,
        ranks: &[u32],
        within: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<(u32, u128, String)> {
        let deadline = Instant::now() + within;
        let mut got: Vec<(u32, u128, String)> = Vec::new();
        let take = |got: &mut Vec<(u32, u128, String)>, l: &(u32, u128, String)| {
            let want = ranks.contains(&l.0) && pred(&l.2) && !got.iter().any(|g| g.0 == l.0);
            if want {
                got.push(l.clone());
            }
            want
        };
        let mut keep = Vec::new();
        for l in std::mem::take(&mut self.pending) {
            if !take(&mut got, &l) {
                keep.push(l);
            }
        }
        self.pending = keep;
        while ranks.iter().any(|r| !got.iter().any(|g| g.0 == *r)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    if !take(&mut got, &l) {
                        self.pending.push(l);
                    }
                }
                Err(_) => panic!(
                    "ranks {ranks:?}: only {got:?} within {within:?}; other lines {:?}",
                    self.pending
                ),
            }
        }
        got
    }
}

/// Rebuilds `survivors` (old ranks, in order) as generation `generation`; returns their lines.
fn rebuild(
    ranks: &mut [Rank_],
    survivors: &[u32],
    generation: u64,
    lines: &mut Lines,
) -> Vec<(u32, u128, String)> {
    let srv = BootstrapServer::bind("127.0.0.1:0").unwrap();
    let addr = srv.local_addr().to_string();
    let world = survivors.len() as u32;
    let h = std::thread::spawn(move || {
        srv.serve(world, Generation(generation), Duration::from_secs(30))
    });
    for (new, old) in survivors.iter().enumerate() {
        writeln!(
            ranks[*old as usize].stdin,
            "REBUILD {addr} {new} {world} {generation}"
        )
        .unwrap();
    }
    let out = lines.collect(survivors, Duration::from_secs(30), |l| {
        l.starts_with("REBUILT")
    });
    h.join().unwrap().unwrap();
    out
}

fn finish(ranks: Vec<Rank_>) {
    for mut r in ranks {
        let _ = writeln!(r.stdin, "EXIT");
        drop(r.stdin);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = r.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
}

/// P-3 and P-4: `kill -9` of one rank of four turns into `PeerFailed` naming it on every
/// survivor within 1 s; the survivors rebuild a 3-rank group in the same processes and its
/// allreduces are exact.
#[test]
fn kill9_is_detected_by_every_survivor_within_1s_and_survivors_rebuild() {
    let (tx, rx) = mpsc::channel();
    let mut ranks = spawn(4, 1, &tx);
    let mut lines = Lines {
        rx,
        pending: Vec::new(),
    };
    lines.collect(&[0, 1, 2, 3], Duration::from_secs(60), |l| {
        l.starts_with("LOOPING")
    });
    std::thread::sleep(Duration::from_millis(300));
    let t_kill = now_us();
    ranks[2].child.kill().unwrap();
    let errs = lines.collect(&[0, 1, 3], Duration::from_secs(5), |l| l.starts_with("ERR"));
    for (r, t, line) in &errs {
        let took_ms = (t.saturating_sub(t_kill)) as f64 / 1000.0;
        eprintln!("kill -9: rank {r} detected after {took_ms:.1} ms: {line}");
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((f[3], f[4]), ("PeerFailed", "2"), "rank {r}: {line}");
        assert!(took_ms < 1000.0, "rank {r} took {took_ms} ms");
    }
    lines.collect(&[0, 1, 3], Duration::from_secs(5), |l| {
        l == "AGAIN GroupBroken"
    });
    for (r, _, line) in rebuild(&mut ranks, &[0, 1, 3], 2, &mut lines) {
        assert!(line.starts_with("REBUILT_OK 2 200"), "rank {r}: {line}");
    }
    finish(ranks);
}

/// P-1, P-3, P-4: SIGSTOP of one rank turns into an error on every survivor within the default
/// 2 s deadline; the survivors rebuild a 3-rank group; the stopped rank, woken with SIGCONT
/// while the new group runs, only gets errors of its old generation, and the new group's
/// results stay exact.
#[test]
fn sigstop_times_out_within_the_deadline_and_the_woken_rank_stays_fenced() {
    let (tx, rx) = mpsc::channel();
    let mut ranks = spawn(4, 1, &tx);
    let mut lines = Lines {
        rx,
        pending: Vec::new(),
    };
    lines.collect(&[0, 1, 2, 3], Duration::from_secs(60), |l| {
        l.starts_with("LOOPING")
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = ranks[1].child.id() as i32;
    let t_stop = now_us();
    signal("-STOP", &pid.to_string());
    let errs = lines.collect(&[0, 2, 3], Duration::from_secs(6), |l| l.starts_with("ERR"));
    for (r, t, line) in &errs {
        let took_ms = (t.saturating_sub(t_stop)) as f64 / 1000.0;
        eprintln!("SIGSTOP: rank {r} got an error after {took_ms:.1} ms: {line}");
        // The deadline counts from the last progress, which is just before the stop; the
        // margin is the wake-up granularity (1 ms) plus scheduling on a busy machine.
        assert!(
            took_ms < 2200.0,
            "rank {r} took {took_ms} ms (deadline 2 s)"
        );
    }
    // Rebuild the survivors, and wake the stopped rank while the new group is running.
    let srv = BootstrapServer::bind("127.0.0.1:0").unwrap();
    let addr = srv.local_addr().to_string();
    let h = std::thread::spawn(move || srv.serve(3, Generation(2), Duration::from_secs(30)));
    for (new, old) in [0u32, 2, 3].iter().enumerate() {
        writeln!(ranks[*old as usize].stdin, "REBUILD {addr} {new} 3 2").unwrap();
    }
    lines.collect(&[0, 2, 3], Duration::from_secs(30), |l| l == "LOOPING 2");
    signal("-CONT", &pid.to_string());
    let woke = lines.collect(&[1], Duration::from_secs(10), |l| l.starts_with("ERR"));
    eprintln!("SIGCONT: rank 1 reports: {}", woke[0].2);
    assert_eq!(
        woke[0].2.split_whitespace().nth(2),
        Some("1"),
        "its error is of generation 1"
    );
    let done = lines.collect(&[0, 2, 3], Duration::from_secs(60), |l| {
        l.starts_with("REBUILT")
    });
    h.join().unwrap().unwrap();
    for (r, _, line) in done {
        assert!(line.starts_with("REBUILT_OK 2 200"), "rank {r}: {line}");
    }
    finish(ranks);
}

/// P-3 in the shared-memory broadcast: the root is killed, or a receiver stopped, while the
/// ranks run nothing but 3 MiB broadcasts from rank 0 (so the fault lands mid-broadcast, with
/// receivers copying out of the root's window). Every survivor fails: `PeerFailed` naming the
/// root within 1 s, or an error within the 2 s deadline.
#[test]
fn faults_during_window_broadcasts_fail_every_survivor_in_time() {
    for (victim, stop) in [(0u32, false), (2, true)] {
        let (tx, rx) = mpsc::channel();
        let ranks = spawn_ops(4, 1, &tx, "broadcast");
        let mut lines = Lines {
            rx,
            pending: Vec::new(),
        };
        lines.collect(&[0, 1, 2, 3], Duration::from_secs(60), |l| {
            l.starts_with("LOOPING")
        });
        std::thread::sleep(Duration::from_millis(300));
        let pid = ranks[victim as usize].child.id().to_string();
        let signal = if stop { "-STOP" } else { "-KILL" };
        let t0 = now_us();
        self::signal(signal, &pid);
        let survivors: Vec<u32> = (0..4).filter(|&r| r != victim).collect();
        let errs = lines.collect(&survivors, Duration::from_secs(6), |l| l.starts_with("ERR"));
        for (r, t, line) in &errs {
            let took_ms = (t.saturating_sub(t0)) as f64 / 1000.0;
            eprintln!(
                "broadcast {signal} of rank {victim}: rank {r} after {took_ms:.1} ms: {line}"
            );
            let f: Vec<&str> = line.split_whitespace().collect();
            if stop {
                assert!(
                    took_ms < 2200.0,
                    "rank {r} took {took_ms} ms (deadline 2 s)"
                );
                assert!(matches!(f[3], "Timeout" | "PeerFailed"), "rank {r}: {line}");
            } else {
                assert!(took_ms < 1000.0, "rank {r} took {took_ms} ms");
                assert_eq!((f[3], f[4]), ("PeerFailed", "0"), "rank {r}: {line}");
            }
        }
        if stop {
            self::signal("-KILL", &pid);
        }
        finish(ranks);
    }
}

/// Sends a signal through kill(1) (the tests need no unsafe code) and asserts it was delivered.
fn signal(sig: &str, pid: &str) {
    let ok = Command::new("kill").args([sig, pid]).status();
    assert!(ok.is_ok_and(|s| s.success()), "kill {sig} {pid} failed");
}
