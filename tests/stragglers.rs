//! No false evictions (K-7, K-9, K-10), with real processes on this shared 2-core machine: the
//! character-level Shakespeare job a new user runs first, left alone, under a noisy neighbour,
//! beside restarting spare processes, and with a rank killed every minute.
//!
//! Each job runs `PHALANX_SOAK_S` seconds (default 45, at least 70 where a kill every 60 s must
//! come; the acceptance runs use 180) and is then stopped with SIGINT, as a user's Ctrl-C.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn soak() -> Duration {
    let s = std::env::var("PHALANX_SOAK_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(45u64);
    Duration::from_secs(s)
}

/// Long enough for a kill every 60 s to come at least once.
fn soak_with_a_kill() -> Duration {
    soak().max(Duration::from_secs(70))
}

struct Job {
    code: Option<i32>,
    stderr: String,
    report: Value,
    events: Vec<Value>,
    metrics: Vec<Value>,
}

impl Job {
    fn of(kind: &str, e: &[Value]) -> Vec<Value> {
        e.iter().filter(|x| x["kind"] == kind).cloned().collect()
    }
    fn generations(&self) -> Vec<Value> {
        Self::of("generation", &self.events)
    }
    fn straggler_evictions(&self) -> Vec<Value> {
        Self::of("rank_removed", &self.events)
            .into_iter()
            .filter(|e| e["cause"] == "straggler")
            .collect()
    }
    fn flags(&self) -> Vec<Value> {
        Self::of("straggler_flagged", &self.events)
    }
    /// (step, unix_ms) of every committed step rank 0 recorded, in file order.
    fn commits(&self) -> Vec<(u64, u64)> {
        self.metrics
            .iter()
            .filter(|m| m["final"] != true)
            .filter_map(|m| Some((m["step"].as_u64()?, m["unix_ms"].as_u64()?)))
            .collect()
    }
    /// Committed steps per second between the first and the last commit.
    fn steps_per_s(&self) -> f64 {
        self.steps_per_s_until(u64::MAX)
    }
    /// ... of the commits made before `unix_ms`.
    fn steps_per_s_until(&self, unix_ms: u64) -> f64 {
        let c: Vec<(u64, u64)> = self
            .commits()
            .into_iter()
            .filter(|x| x.1 < unix_ms)
            .collect();
        let (first, last) = (c[0], *c.last().unwrap());
        (last.0 - first.0) as f64 / ((last.1 - first.1) as f64 / 1e3)
    }
    fn summary(&self) -> String {
        format!(
            "{} generations, {} flags, {} straggler evictions, {:.1} steps/s",
            self.generations().len(),
            self.flags().len(),
            self.straggler_evictions().len(),
            self.steps_per_s()
        )
    }
}

/// `phalanx launch` of the Shakespeare config (micro-batches of 4) for `for_`, then SIGINT.
fn launch_for(dir: &Path, args: &[&str], for_: Duration) -> Job {
    let _one_at_a_time = serial();
    let data = shakespeare_char(dir);
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/shakespeare-char.toml");
    let run_dir = dir.join("run");
    let mut launcher = Proc::spawn(
        bin()
            .arg("launch")
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .args([
                format!("data.dir={}", data.display()),
                format!("run.dir={}", run_dir.display()),
                "train.micro_batch=4".into(),
                "train.max_steps=1000000".into(),
                "optim.decay_steps=1000000".into(),
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let t = Instant::now();
    while t.elapsed() < for_ {
        if launcher.try_wait().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // What the launcher does on Ctrl-C (stop its workers after a checkpoint) is not part of
    // the run.
    let stopped_ms = unix_ms();
    send_signal(launcher.pid(), "INT");
    let (status, stderr) = launcher.wait_with_stderr();
    Job {
        code: status.code(),
        stderr,
        report: read_report(&run_dir),
        events: read_jsonl(&run_dir.join("events.jsonl"))
            .into_iter()
            .filter(|e| e["unix_ms"].as_u64().is_some_and(|t| t < stopped_ms))
            .collect(),
        metrics: read_jsonl(&run_dir.join("metrics.jsonl")),
    }
}

/// K-9 in a real job: the run ended as asked (Ctrl-C: preempted after a checkpoint of its
/// last step, C-8), the ledger holds, and no commit ever went back to an earlier step than one
/// before it minus one (a redo).
fn assert_no_restart_from_scratch(j: &Job) {
    assert_eq!(j.code, Some(6), "{}", j.stderr);
    assert_eq!(j.report["status"], "preempted", "{}", j.report);
    assert_eq!(
        j.report["ledger"]["exactly_once"], true,
        "{}",
        j.report["ledger"]
    );
    let mut newest = 0;
    for (step, _) in j.commits() {
        assert!(step + 1 >= newest, "step {step} after step {newest}");
        newest = newest.max(step);
    }
}

// K-10, K-9: the 2-rank + spare job a new user runs, on a quiet machine: no generation change
// at all. Then
// the same job with a SIGKILL of an active rank every 60 s: exactly one generation change per
// kill, and goodput (committed steps per second with kills / without) of at least 0.97.
#[test]
fn two_ranks_and_a_spare_quiet_then_killed_every_minute() {
    let d = test_dir();
    let quiet = launch_for(d.path(), &["--world", "2", "--spares", "1"], soak());
    eprintln!("quiet: {}", quiet.summary());
    assert_no_restart_from_scratch(&quiet);
    assert_eq!(quiet.generations().len(), 1, "{:?}", quiet.generations());
    let d2 = test_dir();
    let killed = launch_for(
        d2.path(),
        &["--world", "2", "--spares", "1", "--kill-every", "60"],
        soak_with_a_kill(),
    );
    eprintln!("killed every 60 s: {}", killed.summary());
    assert_no_restart_from_scratch(&killed);
    let kills = killed
        .events
        .iter()
        .filter(|e| e["kind"] == "fault_injected" && e["fault"] == "sigkill")
        .count();
    assert!(kills >= 1, "no kill in {:?}", soak_with_a_kill());
    assert_eq!(
        killed.generations().len(),
        1 + kills,
        "{kills} kills: {:?}",
        killed.generations()
    );
    // Goodput: committed steps per second with kills over without. Two runs one after the
    // other on this shared machine differ by up to ~10% on their own, so the figure asserted
    // compares the killed run with its own fault-free first minute; the quiet run's is reported.
    let first_kill = killed
        .events
        .iter()
        .find(|e| e["fault"] == "sigkill")
        .and_then(|e| e["unix_ms"].as_u64())
        .unwrap();
    let goodput = killed.steps_per_s() / killed.steps_per_s_until(first_kill);
    eprintln!(
        "goodput with a kill every 60 s: {goodput:.3} (vs its first minute), {:.3} (vs the quiet run)",
        killed.steps_per_s() / quiet.steps_per_s()
    );
    assert!(goodput >= 0.97, "goodput {goodput:.3}");
}

/// A noisy neighbour: a busy loop on one core for 2 s every 10 s.
fn noisy(nproc: &str) {
    let d = test_dir();
    let j = launch_for(
        d.path(),
        &["--world", nproc, "--spares", "1", "--noise", "2000:10000"],
        soak(),
    );
    let bursts = Job::of("noise_burst", &j.events).len();
    eprintln!("{nproc} ranks, {bursts} noise bursts: {}", j.summary());
    assert_no_restart_from_scratch(&j);
    assert!(
        bursts * 10 >= soak().as_secs() as usize / 2,
        "{bursts} bursts"
    );
    assert!(
        j.straggler_evictions().is_empty(),
        "{:?}",
        j.straggler_evictions()
    );
    // Every rebalance reverts: the job ends evenly split with the members it started with.
    let gens = j.generations();
    if let Some(last) = gens.last() {
        assert_eq!(last["members"], gens[0]["members"], "{gens:?}");
    }
}

// K-7, K-10: a noisy neighbour evicts nobody at 2 ranks ...
#[test]
fn noisy_neighbour_evicts_nobody_at_two_ranks() {
    noisy("2");
}

// ... nor at 4 (one micro-batch per rank: no rebalance can help there, so eviction is the
// only action, and it must not come).
#[test]
fn noisy_neighbour_evicts_nobody_at_four_ranks() {
    noisy("4");
}

// K-7: a spare process restarted every 15 s (its start takes a core for a while) flags nobody
// and changes no generation.
#[test]
fn restarting_spares_disturb_nobody() {
    let d = test_dir();
    let j = launch_for(
        d.path(),
        &[
            "--world",
            "2",
            "--spares",
            "1",
            "--restart-spare-every",
            "15",
        ],
        soak(),
    );
    let restarts = j
        .events
        .iter()
        .filter(|e| e["fault"] == "spare_restart")
        .count();
    eprintln!("{restarts} spare restarts: {}", j.summary());
    assert_no_restart_from_scratch(&j);
    assert!(restarts >= 2, "{restarts} spare restarts");
    assert_eq!(j.generations().len(), 1, "{:?}", j.generations());
}

// K-9 in a real job: the only rank that holds the committed state is killed and the spare has
// nothing: the job halts and says why, and never trains on from step 0.
#[test]
fn losing_the_last_holder_halts_instead_of_restarting_from_step_0() {
    let d = test_dir();
    let _one_at_a_time = serial();
    let data = shakespeare_char(d.path());
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/shakespeare-char.toml");
    let data_arg = format!("data.dir={}", data.display());
    let run_arg = format!("run.dir={}", d.path().join("run").display());
    let r = launch_job(
        d.path(),
        &cfg,
        Hosts::One,
        &[
            "--world",
            "1",
            "--spares",
            "1",
            "--kill-at",
            "30:0",
            &data_arg,
            &run_arg,
            "train.micro_batch=4",
            "train.max_steps=3000",
        ],
        &[],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let report = &r.report;
    assert_eq!(report["status"], "halted", "{report}");
    let reason = report["halt_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("holds the committed state"), "{reason}");
    let steps: Vec<u64> = r
        .metrics()
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .collect();
    // Step k is the (k+1)-th commit; the kill comes once 30 are committed.
    let last = steps.iter().copied().max().unwrap();
    assert!(last + 1 >= 30, "{steps:?}");
    // Nothing committed after the kill started again below it.
    let first_drop = steps.windows(2).find(|w| w[1] + 1 < w[0]);
    assert!(first_drop.is_none(), "went back: {first_drop:?}");
    let events = r.events();
    assert!(
        events.iter().any(|e| e["kind"] == "halt"),
        "no halt event: {events:?}"
    );
}
