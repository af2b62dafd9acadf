//! The coordinator restarted or stalled under real workers (standalone coordinator, `phalanx
//! worker` processes, real UCX and libtorch): the job goes on with every rank in its place. And
//! a job whose data plane cannot be built ends with a decision, not an idle wait.

mod common;
use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

struct Job {
    dir: TestDir,
    cfg: PathBuf,
    port: u16,
    steps: u64,
}

impl Job {
    fn new(steps: u64) -> Job {
        let dir = test_dir();
        let data = dataset(dir.path());
        let cfg = job_config(dir.path(), &data);
        Job {
            dir,
            cfg,
            port: free_port(),
            steps,
        }
    }

    fn run(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn overrides(&self) -> Vec<String> {
        vec![
            format!("train.max_steps={}", self.steps),
            format!("optim.decay_steps={}", self.steps),
        ]
    }

    /// The coordinator on a fixed port, so that a restarted one is found at the same address.
    fn coordinator(&self, world: usize) -> Proc {
        self.coordinator_with(world, &[])
    }

    fn coordinator_with(&self, world: usize, extra: &[&str]) -> Proc {
        Proc::spawn(
            coordinator(&format!("127.0.0.1:{}", self.port), world)
                .arg("--config")
                .arg(&self.cfg)
                .args(self.overrides())
                .args(extra)
                .env("PHALANX_JOB_TOKEN", "restarts")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.dir.path().join("coordinator.log")).unwrap()),
        )
    }

    fn worker(&self, i: usize) -> Proc {
        self.worker_env(i, &[])
    }

    fn worker_env(&self, i: usize, env: &[(&str, &str)]) -> Proc {
        Proc::spawn(
            bin()
                .args([
                    "worker",
                    "--coordinator",
                    &format!("http://127.0.0.1:{}", self.port),
                ])
                .arg("--config")
                .arg(&self.cfg)
                .args(self.overrides())
                .env("PHALANX_JOB_TOKEN", "restarts")
                .env("PHALANX_LOG", "info")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.dir.path().join(format!("w{i}.log"))).unwrap()),
        )
    }

    fn wait_committed(&self, n: usize, secs: u64) {
        let metrics = self.run().join("metrics.jsonl");
        assert!(
            jsonl_until(&metrics, &|m| m.len() >= n, secs),
            "only {} steps committed after {secs} s",
            read_jsonl_now(&metrics).len()
        );
    }

    /// Waits for the workers, builds the report and checks what every test here needs: the
    /// job completed at world 4, every step once, nobody evicted or fenced.
    fn finish(&self, workers: Vec<Proc>) -> Vec<Value> {
        for mut w in workers {
            let st = w.wait();
            assert_eq!(
                st.code(),
                Some(0),
                "a worker failed; see {}",
                self.dir.path().display()
            );
        }
        let report = make_report(&self.run());
        assert_eq!(report["status"], "completed", "{report}");
        assert_eq!(report["world_size_final"], 4, "{report}");
        assert_ledger_exactly_once(&report);
        let events = read_jsonl(&self.run().join("events.jsonl"));
        let removed: Vec<&Value> = events
            .iter()
            .filter(|e| {
                ["rank_failed", "rank_removed", "register_refused"]
                    .contains(&e["kind"].as_str().unwrap_or(""))
            })
            .collect();
        assert!(
            removed.is_empty(),
            "ranks were evicted or refused: {removed:#?}"
        );
        assert_identical_final_state(&self.run(), 4);
        events
    }
}

// K-5 with real workers: the coordinator is killed (SIGKILL) mid-job and started again from its
// journal on the same address. Every rank re-registers in its place (rank and generation), so
// the job finishes at world 4 with nobody evicted or fenced.
#[test]
fn coordinator_restart_under_real_workers_evicts_nobody() {
    let _one_at_a_time = serial();
    let job = Job::new(400);
    let mut coord = job.coordinator(4);
    let workers: Vec<Proc> = (0..4).map(|i| job.worker(i)).collect();
    job.wait_committed(150, 90);
    signal(coord.pid(), "KILL");
    coord.wait();
    std::thread::sleep(Duration::from_millis(300));
    let _coord = job.coordinator(4);
    let events = job.finish(workers);
    let restarted = events.iter().any(|e| e["kind"] == "coordinator_restarted");
    assert!(
        restarted,
        "the coordinator did not restart from its journal"
    );
    let rejoined = events.iter().filter(|e| e["kind"] == "rejoined").count();
    assert_eq!(rejoined, 4, "every rank rejoins in its place");
}

// K-3 / K-5: the coordinator stopped (SIGSTOP) for 3 s mid-job, then woken: the silence and the
// closed streams it finds are its own stall, not deaths. No rank is evicted.
#[test]
fn a_stalled_coordinator_evicts_nobody() {
    let _one_at_a_time = serial();
    let job = Job::new(450);
    let coord = job.coordinator(4);
    let workers: Vec<Proc> = (0..4).map(|i| job.worker(i)).collect();
    job.wait_committed(150, 90);
    signal(coord.pid(), "STOP");
    std::thread::sleep(Duration::from_secs(3));
    signal(coord.pid(), "CONT");
    let events = job.finish(workers);
    assert!(
        events.iter().any(|e| e["kind"] == "coordinator_stalled"),
        "the coordinator did not notice its own stall"
    );
    drop(coord);
}

// K-3 / S-4: rank 1's compute panics while the coordinator is stopped for longer than the RPC
// timeout (5 s). Its report of itself is retried until the coordinator answers, so the
// coordinator regroups and keeps it rather than evict it on the peers' reports (or wait for
// progress that cannot come).
#[test]
fn a_compute_restart_during_a_coordinator_stall_keeps_the_rank() {
    let _one_at_a_time = serial();
    let job = Job::new(350);
    let coord = job.coordinator(4);
    let fault = [("PHALANX_TEST_FAULT", "compute-panic@200:1")];
    let workers: Vec<Proc> = (0..4).map(|i| job.worker_env(i, &fault)).collect();
    job.wait_committed(150, 90);
    signal(coord.pid(), "STOP");
    let stopped = Instant::now();
    let logs = || {
        (0..4)
            .map(|i| {
                std::fs::read_to_string(job.dir.path().join(format!("w{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<String>()
    };
    while !logs().contains("restarting compute") && stopped.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let panicked_after = stopped.elapsed();
    // Past the RPC timeout from the panic on: the first report cannot be answered.
    std::thread::sleep(Duration::from_millis(6500));
    signal(coord.pid(), "CONT");
    assert!(
        panicked_after < Duration::from_secs(5),
        "rank 1 did not panic while the coordinator was stopped"
    );
    let events = job.finish(workers);
    assert!(
        events
            .iter()
            .any(|e| e.to_string().contains("asked for a regroup")),
        "the restarted rank's report never reached the coordinator"
    );
    drop(coord);
}

/// K-13: waits until every worker exits; the coordinator's halt event.
fn halted_within(job: &Job, workers: Vec<Proc>, secs: u64) -> (Value, Vec<Option<i32>>) {
    let t = Instant::now();
    let mut codes = Vec::new();
    for mut w in workers {
        loop {
            if let Some(st) = w.try_wait() {
                codes.push(st.code());
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "the job still idles after {secs} s; see {}",
                job.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let events = read_jsonl(&job.run().join("events.jsonl"));
    let halt = events
        .iter()
        .find(|e| e["kind"] == "halted" || e["kind"] == "halt")
        .cloned()
        .unwrap_or_else(|| panic!("no halt decision: {events:#?}"));
    // Within the progress timeout (8 s here) of the first generation, the last progress there
    // was: half of it for the regroup, half for the generation that makes (and a tick or two).
    let formed = events
        .iter()
        .find(|e| e["kind"] == "generation")
        .and_then(|e| e["unix_ms"].as_u64())
        .expect("a first generation");
    let took = halt["unix_ms"].as_u64().unwrap().saturating_sub(formed);
    assert!(
        took <= 8_500,
        "halted {took} ms after the first generation: {halt}"
    );
    (halt, codes)
}

// K-13: one rank's UCX is given a transport that does not exist. Its group cannot be built;
// the job does not idle: within the progress timeout it is regrouped, then halted with a reason
// that says no step was committed (before, the halt came at twice the timeout).
#[test]
fn a_group_that_cannot_be_built_ends_in_a_decision() {
    let _one_at_a_time = serial();
    let job = Job::new(200);
    let _coord = job.coordinator_with(2, &["coordinator.progress_timeout_ms=8000"]);
    let workers = vec![
        job.worker(0),
        job.worker_env(1, &[("UCX_TLS", "no_such_transport")]),
    ];
    let (halt, codes) = halted_within(&job, workers, 90);
    eprintln!("halt: {halt}\nworker exits: {codes:?}");
    assert!(
        halt["reason"]
            .as_str()
            .unwrap_or("")
            .contains("no step committed"),
        "{halt}"
    );
}

// K-13: a rank advertises an address its peers cannot reach (a blackholed one): the job ends in
// a decision with a reason instead of waiting.
#[test]
fn an_unreachable_rank_address_ends_in_a_decision() {
    let _one_at_a_time = serial();
    let job = Job::new(200);
    let _coord = job.coordinator_with(2, &["coordinator.progress_timeout_ms=8000"]);
    let workers = vec![
        job.worker(0),
        job.worker_env(1, &[("PHALANX_ADDRESS", "192.0.2.1")]),
    ];
    let (halt, codes) = halted_within(&job, workers, 120);
    eprintln!("halt: {halt}\nworker exits: {codes:?}");
    assert!(!halt["reason"].as_str().unwrap_or("").is_empty(), "{halt}");
}
