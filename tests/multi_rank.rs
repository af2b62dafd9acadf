//! Multi-rank training with real processes, real UCX and real libtorch, through
//! `phalanx launch` and its fault injection.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

fn launch(dir: &Path, args: &[&str]) -> Launched {
    launch_env(Hosts::One, dir, args, &[])
}

fn launch_on(hosts: Hosts, dir: &Path, args: &[&str]) -> Launched {
    launch_env(hosts, dir, args, &[])
}

fn launch_env(hosts: Hosts, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Launched {
    let _one_at_a_time = serial();
    let data = dataset(dir);
    let cfg = job_config(dir, &data);
    let r = launch_job(dir, &cfg, hosts, args, env);
    if !r.report.is_null() {
        assert_ledger_exactly_once(&r.report);
    }
    if hosts == Hosts::Two {
        let tcp = assert_links_follow_hosts(&r.events());
        assert!(tcp > 0, "no rank talked over TCP across the hosts");
    }
    r
}

fn losses(run: &Path) -> Vec<f64> {
    let mut by_step = std::collections::BTreeMap::new();
    for m in read_jsonl(&run.join("metrics.jsonl")) {
        if let (Some(s), Some(l)) = (m["step"].as_u64(), m["loss"].as_f64()) {
            if m["final"] != true {
                by_step.insert(s, l);
            }
        }
    }
    by_step.into_values().collect()
}

// G-1, G-2: SIGKILL of a rank mid-training; a spare takes its place, the world stays 4, at most
// the step in flight is redone, and all ranks end bitwise equal. On one host and on two.
#[test]
fn kill_one_rank_with_a_spare() {
    kill_one_rank_with_a_spare_on(Hosts::One);
}

#[test]
fn kill_one_rank_with_a_spare_across_hosts() {
    if Hosts::Two.available() {
        kill_one_rank_with_a_spare_on(Hosts::Two);
    }
}

fn kill_one_rank_with_a_spare_on(hosts: Hosts) {
    let d = test_dir();
    let r = launch_on(
        hosts,
        d.path(),
        &[
            "--world",
            "4",
            "--spares",
            "1",
            "--kill-at",
            "20:1",
            "train.max_steps=300",
            "optim.decay_steps=300",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.report["status"], "completed", "{}", r.report);
    assert_eq!(r.report["steps"], 300);
    let faults = r.report["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 1, "{}", r.report);
    let f = &faults[0];
    eprintln!("fault: {f}");
    // The survivors' reports (UCX peer failure) and the closed session race; either is a crash.
    assert!(f["cause"] == "crashed" || f["cause"] == "reported", "{f}");
    assert!(f["detection_ms"].as_u64().unwrap() < 500, "{f}");
    assert!(
        f["recovery_ms"].as_u64().unwrap() < 1000,
        "next committed step took too long: {f}"
    );
    assert!(f["lost_steps"].as_u64().unwrap() <= 1, "{f}");
    assert_eq!(f["world_after"], 4, "{f}");
    assert_identical_final_state(&r.run, 4);
}

// Without a spare the job shrinks to the survivors and goes on.
#[test]
fn kill_one_rank_shrinks_to_three() {
    kill_one_rank_shrinks_to_three_on(Hosts::One);
}

#[test]
fn kill_one_rank_shrinks_to_three_across_hosts() {
    if Hosts::Two.available() {
        kill_one_rank_shrinks_to_three_on(Hosts::Two);
    }
}

fn kill_one_rank_shrinks_to_three_on(hosts: Hosts) {
    let d = test_dir();
    let r = launch_on(
        hosts,
        d.path(),
        &[
            "--world",
            "4",
            "--kill-at",
            "20:2",
            "train.max_steps=300",
            "optim.decay_steps=300",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let f = &r.report["faults"][0];
    eprintln!("fault: {f}");
    assert!(f["recovery_ms"].as_u64().unwrap() < 1000, "{f}");
    assert!(f["world_after"] == 3 || f["world_after"] == 4, "{f}"); // the restarted process may rejoin
    assert_identical_final_state(
        &r.run,
        r.report["world_size_final"].as_u64().unwrap() as usize,
    );
    // The workers' logs are files: plain text, no terminal colour codes.
    for e in std::fs::read_dir(r.run.join("logs")).unwrap() {
        let p = e.unwrap().path();
        let log = std::fs::read_to_string(&p).unwrap();
        assert!(!log.contains('\x1b'), "{} has colour codes", p.display());
    }
}

// G-1, P-10: a stopped rank is fenced out within the heartbeat deadline and its peers go on at
// once; woken up 2.5 s after the stop it cannot rejoin its old generation (it exits as fenced and
// comes back as a new spare).
#[test]
fn sigstop_rank_is_fenced() {
    sigstop_rank_is_fenced_on(Hosts::One);
}

#[test]
fn sigstop_rank_is_fenced_across_hosts() {
    if Hosts::Two.available() {
        sigstop_rank_is_fenced_on(Hosts::Two);
    }
}

fn sigstop_rank_is_fenced_on(hosts: Hosts) {
    let d = test_dir();
    let r = launch_on(
        hosts,
        d.path(),
        &[
            "--world",
            "3",
            "--stop-at",
            "20:1",
            "--stop-for-ms",
            "2500",
            // Long enough that the job still runs when the stopped rank wakes (2.5 s in): two
            // ranks of this model took 1.2-1.7 ms a step here, 1500 steps ended before it.
            "train.max_steps=5000",
            "optim.decay_steps=5000",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let f = &r.report["faults"][0];
    eprintln!("fault: {f}");
    assert!(f["recovery_ms"].as_u64().unwrap() < 3000, "{f}");
    // P-10: the peers give up the stopped rank's generation when the coordinator replaces it
    // (detection at the 0.8 s heartbeat deadline), not at the 2 s collective deadline.
    let logs: String = std::fs::read_dir(r.run.join("logs"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        logs.contains("gave up generation"),
        "no survivor gave up the stopped rank's generation: {f}"
    );
    let events = r.events();
    let stopped_pid = events
        .iter()
        .find(|e| e["kind"] == "fault_injected")
        .unwrap()["pid"]
        .clone();
    let exit = events
        .iter()
        .find(|e| e["kind"] == "worker_exit" && e["pid"] == stopped_pid)
        .expect("the stopped worker exits after it wakes up");
    assert_eq!(
        exit["code"], 3,
        "a woken, fenced rank exits as fenced: {exit}"
    );
    assert_identical_final_state(
        &r.run,
        r.report["world_size_final"].as_u64().unwrap() as usize,
    );
}

// The loss curve of a 4-rank run matches a 1-rank run of the same global batch: the same samples,
// the same gradient up to float summation order (allreduce of 4 partial sums vs one sum).
#[test]
fn four_ranks_match_one_rank() {
    let d1 = test_dir();
    let one = launch(d1.path(), &["--world", "1", "train.max_steps=25"]);
    assert_eq!(one.code, Some(0), "{}", one.stderr);
    let d4 = test_dir();
    let four = launch(d4.path(), &["--world", "4", "train.max_steps=25"]);
    assert_eq!(four.code, Some(0), "{}", four.stderr);
    let (a, b) = (losses(&one.run), losses(&four.run));
    assert_eq!(a.len(), 25);
    assert_eq!(b.len(), 25);
    // Step 0 sees identical weights: only summation order differs (~1e-7 relative). Later steps
    // compound that through AdamW; 1e-3 relative is still far below a real divergence (one step
    // of training changes the loss by ~1e-2 here).
    assert!((a[0] - b[0]).abs() < 1e-5, "{} vs {}", a[0], b[0]);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() / x < 1e-3, "step {i}: {x} vs {y}");
    }
}

// T-7: a multi-rank run validates at train.eval_interval, in metrics.jsonl and on the progress
// line, over a fixed number of sequences: the loss does not depend on the micro-batch. The
// learning rate is all but zero, so the parameters hold still and every validation of both runs
// (the ranks' shares summed at steps 10 and 20, rank 0's alone at the end) sees one model.
#[test]
fn validation_runs_at_the_interval_whatever_the_micro_batch() {
    let vals = |micro_batch: &str| {
        let d = test_dir();
        let mb = format!("train.micro_batch={micro_batch}");
        let r = launch_env(
            Hosts::One,
            d.path(),
            &[
                "--world",
                "2",
                "train.max_steps=21",
                "train.global_batch=32",
                &mb,
                "train.eval_interval=10",
                "train.eval_sequences=24",
                "train.log_interval=10",
                "optim.lr=1e-9",
                "optim.min_lr=0",
                "optim.decay_steps=21",
            ],
            &[("PHALANX_LOG", "info")],
        );
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        let line = r
            .stderr
            .lines()
            .find(|l| l.contains("step 2") && l.contains("| val "))
            .unwrap_or_else(|| panic!("no progress line with a validation loss: {}", r.stderr));
        assert!(
            line.contains("tok/s") && line.contains("world 2 gen 1"),
            "{line}"
        );
        let at = |s: u64| {
            r.metrics()
                .iter()
                .find(|m| m["step"] == s && m["final"] != true)
                .and_then(|m| m["val_loss"].as_f64())
        };
        let final_val = r.metrics().iter().find(|m| m["final"] == true).unwrap()["val_loss"]
            .as_f64()
            .unwrap();
        assert_eq!(at(9), None, "validation only at the interval");
        (at(10).unwrap(), at(20).unwrap(), final_val)
    };
    let (four, sixteen) = (vals("4"), vals("16"));
    for (a, b) in [
        (four.0, sixteen.0),
        (four.0, four.1),
        (four.0, four.2),
        (sixteen.1, sixteen.2),
    ] {
        assert!((a - b).abs() < 1e-4, "{four:?} vs {sixteen:?}");
    }
}

#[test]
fn bad_launch_input() {
    let d = test_dir();
    let r = launch(d.path(), &["--world", "0"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("at least one rank"), "{}", r.stderr);
    let r = launch(d.path(), &["--world", "5"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("at most 4 ranks"), "{}", r.stderr);
    let r = launch(d.path(), &["--world", "2", "--kill-at", "x"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("STEP:RANK"), "{}", r.stderr);
    // A file where the run directory should be: one message that names it.
    let file = d.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let r = launch(
        d.path(),
        &["--world", "2", &format!("run.dir={}", file.display())],
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("cannot create the run directory") && r.stderr.contains("a-file"),
        "{}",
        r.stderr
    );
}

// Below min_world the job stops cleanly: the committed model is saved and the report says why.
#[test]
fn below_min_world_halts_with_a_saved_model() {
    let d = test_dir();
    let r = launch(
        d.path(),
        &[
            "--world",
            "2",
            "--kill-at",
            "20:1",
            "coordinator.min_world=2",
            "train.max_steps=400",
            "optim.decay_steps=400",
        ],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert_eq!(r.report["status"], "halted", "{}", r.report);
    assert!(
        r.report["halt_reason"]
            .as_str()
            .unwrap()
            .contains("min_world = 2"),
        "{}",
        r.report
    );
    let v = bin()
        .args([
            "checkpoint",
            "verify",
            r.run.join("model").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    assert!(r.run.join("halted.txt").is_file());
}

// A worker with the wrong job token, or a config that differs from the job's, is refused with
// a clear error and does not disturb the job.
#[test]
fn mismatched_workers_are_refused() {
    let _one_at_a_time = serial();
    let d = test_dir();
    let data = dataset(d.path());
    let cfg = job_config(d.path(), &data);
    let (_coord, url) = standalone_coordinator(&cfg, 1, &[("PHALANX_JOB_TOKEN", "job-token")]);
    let worker = |token: &str, extra: &[&str]| {
        bin()
            .args(["worker", "--coordinator", &url, "--config"])
            .arg(&cfg)
            .args(extra)
            .env("PHALANX_JOB_TOKEN", token)
            .output()
            .unwrap()
    };
    let out = worker("wrong", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Unauthenticated"), "{err}");
    // A simulated rank fixes the job's config hash; a worker with a real config differs.
    let mut sim = Proc::spawn(
        bin()
            .args(["sim-rank", "--coordinator", &url])
            .env("PHALANX_JOB_TOKEN", "job-token")
            .stdout(std::process::Stdio::null()),
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let out = worker("job-token", &["model.n_embd=64"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("model config or dataset is not the job's"),
        "{err}"
    );
    assert!(sim.try_wait().is_none(), "the running rank was disturbed");
}

fn worker_log(run: &Path, i: usize) -> String {
    std::fs::read_to_string(run.join("logs").join(format!("worker-{i}.log"))).unwrap_or_default()
}

fn generations(run: &Path) -> std::collections::BTreeSet<u64> {
    read_jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter_map(|m| m["generation"].as_u64())
        .collect()
}

// S-1, S-2: a data loader that panics, and a control agent that panics, are restarted in place by
// the rank's supervisor: the job never regroups (one generation), and the replicas stay equal.
#[test]
fn loader_and_control_agent_restart_in_place() {
    let d = test_dir();
    let r = launch_env(
        Hosts::One,
        d.path(),
        // The control-agent panic fires at a heartbeat tick once step 40 is passed: steps of a
        // few ms need a few hundred more for every rank's agent to tick before the job ends
        // (with 80 steps, one rank once finished first).
        &[
            "--world",
            "2",
            "train.max_steps=400",
            "optim.decay_steps=400",
        ],
        // With backtraces asked for, a panic's must be named off the log's path (S-4).
        &[
            ("PHALANX_TEST_FAULT", "loader-panic@20:1,control-panic@40"),
            ("RUST_BACKTRACE", "1"),
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.report["status"], "completed", "{}", r.report);
    assert_eq!(r.report["steps"], 400);
    // Worker i is not necessarily rank i: look at both.
    let (w0, w1) = (worker_log(&r.run, 0), worker_log(&r.run, 1));
    let one = |s: &str| [&w0, &w1].iter().filter(|w| w.contains(s)).count();
    assert_eq!(one("data-loader failed"), 1, "{w0}\n{w1}");
    assert_eq!(one("restarting data-loader"), 1, "{w0}\n{w1}");
    // Naming the frames takes a fraction of a second at least; the restart must not wait on it.
    let panicked = if w0.contains("data-loader failed") {
        &w0
    } else {
        &w1
    };
    let at = |s: &str| panicked.find(s).unwrap_or(usize::MAX);
    assert!(
        at("restarting data-loader") < at("stack backtrace of the panic"),
        "the restart waited for the backtrace:\n{panicked}"
    );
    assert_eq!(one("control-agent failed"), 2, "{w0}\n{w1}");
    assert_eq!(generations(&r.run).len(), 1, "no regroup expected");
    assert_eq!(
        r.report["faults"].as_array().map_or(0, |f| f.len()),
        0,
        "{}",
        r.report
    );
    assert_identical_final_state(&r.run, 2);
}

// S-4, R-4: the compute actor of rank 1 panics mid-step; its supervisor restarts it (with the
// checkpointer after it), it asks for a regroup under its own name, and the job goes on with the
// same two members and equal replicas, at most the step in flight redone.
#[test]
fn compute_panic_restarts_and_rejoins() {
    let d = test_dir();
    let r = launch_env(
        Hosts::One,
        d.path(),
        &["--world", "2", "train.max_steps=80", "optim.decay_steps=80"],
        &[("PHALANX_TEST_FAULT", "compute-panic@30:1")],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.report["status"], "completed", "{}", r.report);
    let w = worker_log(&r.run, 0) + &worker_log(&r.run, 1);
    assert_eq!(w.matches("compute failed").count(), 1, "{w}");
    assert!(w.contains("restarting compute, checkpointer"), "{w}");
    let events = r.events();
    // The same process stays in the job: no worker exited before the end, none was restarted.
    assert!(
        !events
            .iter()
            .any(|e| e["kind"] == "worker_exit" && e["code"] != 0),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.to_string().contains("asked for a regroup")),
        "{events:?}"
    );
    assert!(generations(&r.run).len() >= 2);
    assert_eq!(r.report["world_size_final"], 2, "{}", r.report);
    let steps: Vec<u64> = r
        .metrics()
        .iter()
        .filter(|m| m["final"] != true)
        .filter_map(|m| m["step"].as_u64())
        .collect();
    // Every step committed once, except at most the one in flight, done again.
    let mut uniq = steps.clone();
    uniq.dedup();
    assert_eq!(uniq, (0..80).collect::<Vec<_>>());
    assert!(steps.len() <= 81, "{steps:?}");
    assert_identical_final_state(&r.run, 2);
}

// S-6: a compute thread stuck inside a step (it never returns) is caught by the watchdog; the
// rank gives up (exit 5) and the job replaces it with the spare, like a crash.
#[test]
fn stuck_compute_gives_the_rank_up() {
    let d = test_dir();
    let r = launch_env(
        Hosts::One,
        d.path(),
        &[
            "--world",
            "2",
            "--spares",
            "1",
            // Long enough that the job is still running when the watchdog gives the rank up.
            "train.max_steps=1500",
            "optim.decay_steps=1500",
            "run.watchdog_timeout_ms=3000",
        ],
        &[("PHALANX_TEST_FAULT", "compute-hang@30:1")],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.report["status"], "completed", "{}", r.report);
    assert_eq!(r.report["world_size_final"], 2, "{}", r.report);
    let events = r.events();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "worker_exit" && e["code"] == 5),
        "the stuck rank exits with code 5: {events:?}"
    );
    assert_identical_final_state(&r.run, 2);
}

// G-1 with standalone workers (no launcher): a rank stopped past the heartbeat deadline is fenced
// out and the job goes on without it; woken up, it cannot rejoin its old generation, registers
// again as a spare by itself, and is promoted back into the job, which ends with two equal ranks.
#[test]
fn woken_worker_rejoins_as_a_spare() {
    let _one_at_a_time = serial();
    let d = test_dir();
    let data = dataset(d.path());
    let cfg = job_config(d.path(), &data);
    let run = d.path().join("run");
    let (coord, url) = standalone_coordinator(&cfg, 2, &[]);
    let worker = |name: &str| {
        Proc::spawn(
            bin()
                .args(["worker", "--coordinator", &url, "--config"])
                .arg(&cfg)
                // The survivor alone must still be training when the spare comes back (its
                // micro-batches side by side, 550 steps took 0.8 s here).
                .args(["train.max_steps=3000", "optim.decay_steps=3000"])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(d.path().join(format!("{name}.log"))).unwrap()),
        )
    };
    let mut a = worker("a");
    let mut b = worker("b");
    let metrics = run.join("metrics.jsonl");
    let wait_for = |what: &dyn Fn(&[Value]) -> bool, secs: u64| jsonl_until(&metrics, what, secs);
    assert!(wait_for(&|m| m.len() >= 30, 60), "training did not start");
    let pid = b.pid();
    signal(pid, "STOP");
    // Fenced after heartbeat_timeout_ms (0.8 s); the survivor trains on alone.
    assert!(
        wait_for(&|m| m.iter().any(|x| x["world_size"] == 1), 20),
        "the stopped rank was not fenced out"
    );
    std::thread::sleep(std::time::Duration::from_millis(1000));
    signal(pid, "CONT");
    // Woken: it registers again as a spare and is promoted back (target world 2).
    let rejoined = jsonl_until(
        &run.join("events.jsonl"),
        &|events| {
            events.iter().any(|e| {
                e["kind"] == "registered"
                    && e["pid"].as_str().is_none()
                    && e["pid"].as_u64() == Some(pid as u64)
                    && e["role"] == "spare"
            })
        },
        30,
    );
    assert!(
        rejoined,
        "the woken worker did not register again as a spare"
    );
    assert!(
        wait_for(
            &|m| {
                let last_one = m.iter().rposition(|x| x["world_size"] == 1);
                m.iter()
                    .enumerate()
                    .any(|(i, x)| x["world_size"] == 2 && last_one.is_some_and(|l| i > l))
            },
            60
        ),
        "the spare was not promoted back into the job"
    );
    let (sa, sb) = (a.wait(), b.wait());
    drop(coord);
    assert_eq!((sa.code(), sb.code()), (Some(0), Some(0)));
    assert_identical_final_state(&run, 2);
    // D-4 here too: `phalanx report` builds the report of a job run without the launcher.
    let report = make_report(&run);
    assert_eq!(report["status"], "completed", "{report}");
    assert_ledger_exactly_once(&report);
}

// T-2 across ranks: a NaN injected into rank 1's gradient at step 20 is caught before the commit;
// step 20 is skipped on every rank (no NaN reaches the parameters), the report names rank 1 and
// step 20, and training goes on to the end with equal, finite replicas.
#[test]
fn nan_in_one_rank_is_skipped_and_named() {
    let d = test_dir();
    let r = launch_env(
        Hosts::One,
        d.path(),
        &["--world", "2", "train.max_steps=60", "optim.decay_steps=60"],
        &[("PHALANX_TEST_FAULT", "nan@20:1")],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.report["status"], "completed", "{}", r.report);
    assert_eq!(
        r.report["numerics"],
        serde_json::json!([{"step": 20, "ranks": [1], "action": "skipped"}]),
        "{}",
        r.report
    );
    let l = losses(&r.run);
    assert!(l[21..].iter().all(|x| x.is_finite()), "{l:?}");
    assert!(
        r.report["final_val_loss"]
            .as_f64()
            .is_some_and(f64::is_finite),
        "{}",
        r.report
    );
    assert_identical_final_state(&r.run, 2);
}

// T-4 rollback: with run.on_nonfinite = "rollback", a NaN injected into rank 1's gradient at
// step 25 sends every rank back to the newest checkpoint rank 0 saved (every 10 steps; the one of
// step 20 unless its background write was not finished yet). The steps after it are trained
// again, the report names rank 1, step 25 and the step rolled back to, the ledger counts the
// redone steps once, and the job ends with equal, finite replicas.
#[test]
fn nan_with_rollback_returns_to_the_last_checkpoint() {
    let d = test_dir();
    let r = launch_env(
        Hosts::One,
        d.path(),
        &[
            "--world",
            "2",
            "train.max_steps=60",
            "optim.decay_steps=60",
            "run.checkpoint_interval=10",
            "run.on_nonfinite=rollback",
        ],
        &[("PHALANX_TEST_FAULT", "nan@25:1")],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let n = &r.report["numerics"];
    let to = n[0]["to_step"].as_u64().unwrap_or(0);
    assert!(to == 10 || to == 20, "{n}");
    assert_eq!(
        *n,
        serde_json::json!([{"step": 25, "ranks": [1], "action": "rolled back", "to_step": to}]),
        "{}",
        r.report
    );
    assert_eq!(
        r.report["ledger"]["redone_steps"],
        serde_json::json!((to..25).collect::<Vec<u64>>()),
        "{}",
        r.report
    );
    let l = losses(&r.run);
    assert!(l.iter().all(|x| x.is_finite()), "{l:?}");
    assert_identical_final_state(&r.run, 2);
}

// SDC: one bit of one parameter flipped on rank 2 after step 24; the replica check after step 30
// finds that rank 2 differs from the majority, names it, heals it from the majority, and the
// job ends with equal replicas.
#[test]
fn corrupted_replica_is_named_and_healed() {
    let d = test_dir();
    let r = launch_env(
        Hosts::One,
        d.path(),
        &[
            "--world",
            "3",
            "train.max_steps=50",
            "optim.decay_steps=50",
            "train.global_batch=24",
            "run.fingerprint_interval=10",
        ],
        &[("PHALANX_TEST_FAULT", "sdc@24:2")],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        r.report["replica_mismatches"],
        serde_json::json!([{"step": 29, "ranks": [2], "action": "healed from the majority"}]),
        "{}",
        r.report
    );
    assert_identical_final_state(&r.run, 3);
}

/// A standalone `phalanx coordinator` of the job in `cfg` on a free port, and its URL.
fn standalone_coordinator(cfg: &Path, world: usize, env: &[(&str, &str)]) -> (Proc, String) {
    let (coord, addr) = start_coordinator(
        coordinator("127.0.0.1:0", world)
            .arg("--config")
            .arg(cfg)
            .envs(env.iter().copied()),
    );
    (coord, format!("http://{addr}"))
}

// Elastic: a 2-rank job grows to 4 live (`phalanx scale`; the two spares receive the state
// striped over both holders), then rank 3 is drained (`phalanx drain`). No step is lost or done
// twice, and the three remaining ranks end with equal state.
#[test]
fn scale_up_then_drain_loses_no_step() {
    scale_up_then_drain_loses_no_step_on(Hosts::One);
}

#[test]
fn scale_up_then_drain_loses_no_step_across_hosts() {
    if Hosts::Two.available() {
        scale_up_then_drain_loses_no_step_on(Hosts::Two);
    }
}

fn scale_up_then_drain_loses_no_step_on(hosts: Hosts) {
    let _one_at_a_time = serial();
    let d = test_dir();
    let data = dataset(d.path());
    let cfg = job_config(d.path(), &data);
    let run = d.path().join("run");
    let mut job = Proc::spawn(
        bin()
            .args(["launch", "--world", "2", "--spares", "2", "--config"])
            .arg(&cfg)
            .args(hosts.args())
            .args(["train.max_steps=2500", "optim.decay_steps=2500"])
            .env("PHALANX_JOB_TOKEN", "elastic")
            // The workers' "joined generation" lines say how each was healed.
            .env("PHALANX_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let metrics = run.join("metrics.jsonl");
    let wait_for = |what: &dyn Fn(&[Value]) -> bool, secs: u64| jsonl_until(&metrics, what, secs);
    assert!(wait_for(&|m| m.len() >= 100, 60), "training did not start");
    let url = std::fs::read_to_string(run.join("coordinator.url")).unwrap();
    let admin_token = std::fs::read_to_string(run.join("admin-token")).unwrap();
    let admin = |args: &[&str]| {
        let out = bin()
            .args(args)
            .args(["--coordinator", url.trim()])
            .env("PHALANX_JOB_TOKEN", "elastic")
            .env("PHALANX_ADMIN_TOKEN", admin_token.trim())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    admin(&["scale", "--target", "4"]);
    assert!(
        wait_for(&|m| m.iter().any(|x| x["world_size"] == 4), 30),
        "did not grow to 4"
    );
    // P-7, P-8: status shows each rank's address and the transports of its group (reported
    // with the first heartbeat after the group is built).
    let mut status = admin(&["status", "--json"]);
    for _ in 0..50 {
        if hosts == Hosts::One || status.contains("\"tcp\"") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        status = admin(&["status", "--json"]);
    }
    let st: Value = serde_json::from_str(&status).unwrap();
    let active: Vec<&Value> = st["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "active")
        .collect();
    assert!(
        active
            .iter()
            .all(|r| r["address"].as_str().is_some_and(|a| !a.is_empty())),
        "{status}"
    );
    if hosts == Hosts::Two {
        assert!(
            active
                .iter()
                .all(|r| !r["address"].as_str().unwrap().starts_with("127.")),
            "{status}"
        );
        assert!(
            status.contains("\"tcp\""),
            "no TCP link in status: {status}"
        );
    }
    admin(&["drain", "--rank", "3"]);
    assert!(
        wait_for(
            &|m| {
                let grown = m.iter().position(|x| x["world_size"] == 4);
                grown.is_some_and(|g| m[g..].iter().any(|x| x["world_size"] == 3))
            },
            30
        ),
        "did not drain to 3"
    );
    let st = job.wait();
    assert_eq!(st.code(), Some(0));
    let report = read_json(&run.join("report.json"));
    assert_eq!(report["status"], "completed", "{report}");
    assert_ledger_exactly_once(&report);
    // Every step committed exactly once (a resize loses no step and repeats none).
    let mut steps: Vec<u64> = read_jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|m| m["final"] != true)
        .filter_map(|m| m["step"].as_u64())
        .collect();
    steps.sort();
    assert_eq!(steps, (0..2500).collect::<Vec<_>>());
    let logs: String = (0..8).map(|i| worker_log(&run, i)).collect();
    let joined: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("joined generation"))
        .collect();
    assert!(
        logs.contains("Striped([0, 1])"),
        "the joiners were not healed by striped transfer: {joined:#?}"
    );
    assert_identical_final_state(&run, 3);
}

// Deterministic mode: a 1-rank run, a 4-rank run and a 4-rank run with rank 1 killed at step 20
// (shrinking to 3) end with bitwise-identical parameters and optimizer state after 60 steps; the
// 4-rank runs on one host, or on two.
#[test]
fn deterministic_mode_is_bitwise_identical_across_worlds_and_failures() {
    deterministic_mode_on(Hosts::One);
}

#[test]
fn deterministic_mode_is_bitwise_identical_across_hosts() {
    if Hosts::Two.available() {
        deterministic_mode_on(Hosts::Two);
    }
}

fn deterministic_mode_on(hosts: Hosts) {
    let final_state = |args: &[&str]| {
        let on = if args == ["--world", "1"] {
            Hosts::One
        } else {
            hosts
        };
        let d = test_dir();
        // Long enough that the kill (when the launcher hears of step 20, on a heartbeat) lands
        // mid-job: a deterministic step of this model takes a few ms.
        let mut a = vec![
            "train.max_steps=400",
            "optim.decay_steps=400",
            "train.deterministic=true",
        ];
        a.extend_from_slice(args);
        let r = launch_on(on, d.path(), &a);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        let world = r.report["world_size_final"].as_u64().unwrap() as usize;
        assert_identical_final_state(&r.run, world);
        let fps = read_jsonl(&r.run.join("fingerprints.jsonl"));
        // What the faults were made from, for a failure to say why.
        let timeline: Vec<Value> = r
            .events()
            .into_iter()
            .filter(|e| {
                [
                    "fault_injected",
                    "rank_failed",
                    "generation",
                    "run_finished",
                ]
                .contains(&e["kind"].as_str().unwrap_or(""))
            })
            .collect();
        (
            fps.last().unwrap()["state_sha256"].clone(),
            world,
            (r.report["faults"].clone(), timeline),
        )
    };
    let (one, w1, _) = final_state(&["--world", "1"]);
    let (four, w4, _) = final_state(&["--world", "4"]);
    let (killed, wk, faults) = final_state(&["--world", "4", "--kill-at", "20:1"]);
    assert_eq!((w1, w4), (1, 4));
    // The killed process is restarted as a spare; when it registers before the 400 steps are
    // over (across hosts the steps are slower) it is promoted back: 3 or 4 ranks at the end,
    // bitwise equal either way.
    assert!(wk == 3 || wk == 4, "world after the kill: {wk}");
    let (faults, timeline) = faults;
    assert_eq!(
        faults.as_array().map_or(0, |f| f.len()),
        1,
        "{faults}; events: {timeline:?}"
    );
    assert_eq!(one, four, "1 rank vs 4 ranks");
    assert_eq!(one, killed, "1 rank vs 4 ranks with a kill");
}

// P-11 and P-2 with real processes: the same job ends in the same bits whether its ranks sum
// through each other's shared memory or over the ring (the mesh adds in the ring's order).
#[test]
fn shared_memory_collectives_train_bitwise_as_the_ring() {
    let final_state = |mesh: &str| {
        let d = test_dir();
        let mesh = format!("dataplane.mesh={mesh}");
        let args = [
            "--world",
            "3",
            "train.max_steps=40",
            "optim.decay_steps=40",
            &mesh,
        ];
        let r = launch_on(Hosts::One, d.path(), &args);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert_identical_final_state(&r.run, 3);
        read_jsonl(&r.run.join("fingerprints.jsonl"))
            .last()
            .unwrap()["state_sha256"]
            .clone()
    };
    let (mesh, ring) = (final_state("true"), final_state("false"));
    assert!(mesh.is_string(), "{mesh}");
    assert_eq!(mesh, ring);
}

/// Steps long enough (tens of ms) that a CPU quota shows against scheduling noise.
const STRAGGLER_MODEL: [&str; 3] = ["model.n_layer=2", "model.n_embd=128", "model.block_size=64"];

/// Mean wall time per committed step over steps `[from, to)`, from the commits' timestamps, so
/// that time lost between steps (regroups, redone steps) counts.
fn mean_step_ms(run: &Path, from: u64, to: u64) -> f64 {
    let mut at: std::collections::BTreeMap<u64, u64> = Default::default();
    for m in read_jsonl(&run.join("metrics.jsonl")) {
        if let (Some(s), Some(t)) = (m["step"].as_u64(), m["unix_ms"].as_u64()) {
            at.insert(s, t);
        }
    }
    (at[&to] - at[&from]) as f64 / (to - from) as f64
}

fn median_step_ms(run: &Path, from: u64, to: u64) -> f64 {
    median(
        read_jsonl(&run.join("metrics.jsonl"))
            .iter()
            .filter(|m| m["step"].as_u64().is_some_and(|s| (from..to).contains(&s)))
            .filter_map(|m| m["step_ms"].as_f64())
            .collect(),
    )
}

fn need_cgroup_cpu() {
    if std::fs::metadata("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").is_err()
        && std::fs::metadata("/sys/fs/cgroup/cgroup.controllers").is_err()
    {
        panic!("this test needs a cgroup CPU controller (v1 cpu or v2) at /sys/fs/cgroup");
    }
}

/// The step at which the CPU quota went on, and the member id of the process it went on.
fn quota_target(events: &[Value]) -> (u64, Value) {
    let injected = events.iter().find(|e| e["fault"] == "cpu_quota").unwrap();
    let member = events
        .iter()
        .find(|e| e["kind"] == "registered" && e["pid"] == injected["pid"])
        .unwrap()["member"]
        .clone();
    (injected["step"].as_u64().unwrap(), member)
}

/// The step at which the CPU quota was lifted (`--slow-steps`).
fn quota_lifted(events: &[Value]) -> u64 {
    events
        .iter()
        .find(|e| e["kind"] == "fault_cleared" && e["fault"] == "cpu_quota")
        .unwrap()["step"]
        .as_u64()
        .unwrap()
}

/// The straggler's CPU quota: a quarter of what the rank has without it. Four ranks on two cores
/// have half a core each, so that is 12% of a core. (A quota of 25% of a core is only a 2x
/// slowdown where the cores are fast enough that a rank's compute fits in half a core (a CI run
/// measured 2.0-2.2x), and K-7 deliberately judges a 2x slowdown as mild, to be flagged only
/// after 2 s of it, because starting a worker beside a rank does the same for about a second.)
const QUOTA_PCT: &str = "12";

/// K-7: the slowed rank is flagged, by name, within 5 steps of its first slowed step. A quota
/// bites only once the rank has used its budget for the current period, a step or a few after it
/// is set; the flag's window of per-step times shows where the slowdown began. A flag before the
/// quota is this shared machine's noise, which K-7 allows (a burst past the time bound) and
/// which must not have been acted on (the callers check every removal).
fn assert_flagged_within_five_steps(events: &[Value]) -> Value {
    let (at, member) = quota_target(events);
    let flagged = |e: &&Value| e["kind"] == "straggler_flagged";
    let step = |e: &Value| e["at_step"].as_u64().unwrap_or(0);
    for noise in events.iter().filter(flagged).filter(|e| step(e) < at) {
        eprintln!("flagged before the quota (noise): {noise}");
    }
    let flag = events
        .iter()
        .filter(flagged)
        .find(|e| step(e) >= at)
        .expect("the slowed rank is flagged")
        .clone();
    assert_eq!(flag["member"], member, "the wrong rank was flagged: {flag}");
    let flagged_at = flag["at_step"].as_u64().unwrap();
    let peers = flag["peers_mb_ms"].as_f64().unwrap();
    let window: Vec<f64> = flag["recent_mb_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    // The recent steps' last entry is the flagged step; the slowdown began at their first slow
    // step under the quota.
    let first = flagged_at + 1 - window.len() as u64;
    // A step under the quota (12% of a core) takes 4-5x its peers'; this shared machine's noise
    // alone has reached 1.8x (a CI run took such a step, just after the quota was set but before
    // it bit, for the onset), so the onset is the first step past 2.5x.
    let onset = (0..window.len())
        .find(|&i| first + i as u64 >= at && window[i] > 2.5 * peers)
        .map(|i| first + i as u64)
        .unwrap_or_else(|| panic!("no slow step under the quota in the flag's window: {flag}"));
    // Recent steps that open on a slow step after the quota may not hold the slowdown's start.
    assert!(
        onset > first || first <= at,
        "the slowdown began before the flag's window: {flag}"
    );
    // K-7's "within 5 steps": a quota that bites every other step (it refills each period)
    // reaches straggler_severe_after_ms with its third slow step, the fifth after the first
    // (a CI run: slow at steps 107, 110 and 112, flagged at 112).
    assert!(
        flagged_at - onset <= 5,
        "slowed from step {onset}, flagged at step {flagged_at}: {flag}"
    );
    assert!(
        flagged_at <= at + 10,
        "quota at step {at}, flagged at step {flagged_at}: {flag}"
    );
    eprintln!("quota at step {at}, first slowed step {onset}, flagged at step {flagged_at}");
    flag
}

// K-7: rank 2 capped at a quarter of its CPU (a cgroup CPU quota, QUOTA_PCT) at step 100 is flagged by the
// coordinator's detector within 5 steps and replaced by the spare; the event gives the step
// times that triggered it, and the job stops waiting on a slow rank: rank 0's step time over its
// own compute comes back to within 15% of the fault-free ratio.
#[test]
fn cpu_quota_straggler_is_replaced_by_the_spare() {
    cpu_quota_straggler_is_replaced_by_the_spare_on(Hosts::One);
}

#[test]
fn cpu_quota_straggler_is_replaced_by_the_spare_across_hosts() {
    if Hosts::Two.available() {
        cpu_quota_straggler_is_replaced_by_the_spare_on(Hosts::Two);
    }
}

fn cpu_quota_straggler_is_replaced_by_the_spare_on(hosts: Hosts) {
    need_cgroup_cpu();
    let d = test_dir();
    let mut args = vec![
        "--world",
        "4",
        "--spares",
        "1",
        "--slow-at",
        "100:2",
        "--slow-cpu-pct",
        QUOTA_PCT,
        "train.max_steps=800",
        "optim.decay_steps=800",
        "coordinator.evict_stragglers=true",
    ];
    args.extend(STRAGGLER_MODEL);
    let r = launch_on(hosts, d.path(), &args);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let events = r.events();
    let injected = events.iter().find(|e| e["fault"] == "cpu_quota").unwrap();
    let removed = events
        .iter()
        .find(|e| e["kind"] == "rank_removed" && e["cause"] == "straggler")
        .expect("the slowed rank is evicted as a straggler");
    assert_eq!(
        removed["pid"], injected["pid"],
        "the wrong rank was evicted: {removed}"
    );
    assert!(
        removed["reason"]
            .as_str()
            .unwrap()
            .contains("per micro-batch"),
        "{removed}"
    );
    let flag = assert_flagged_within_five_steps(&events);
    eprintln!(
        "flagged at step {} (quota at step {}): {:.1} ms per micro-batch vs {:.1} ms, window {}",
        flag["at_step"],
        injected["step"],
        flag["mb_ms"].as_f64().unwrap(),
        flag["peers_mb_ms"].as_f64().unwrap(),
        flag["window_mb_ms"]
    );
    let regroup = events
        .iter()
        .find(|e| e["kind"] == "generation" && e["generation"] == 2)
        .unwrap();
    assert_eq!(regroup["world"], 4, "the spare replaces it: {regroup}");
    let resumed = regroup["resume_step"].as_u64().unwrap();
    let flagged_ms =
        removed["unix_ms"].as_u64().unwrap() - injected["injected_unix_ms"].as_u64().unwrap();
    let slowed = median_step_ms(&r.run, injected["step"].as_u64().unwrap() + 2, resumed);
    let (before, after) = (
        median_step_ms(&r.run, 20, 100),
        median_step_ms(&r.run, resumed + 50, 800),
    );
    // Rank 0's step time over its own forward and backward: how long the job waits on its
    // slowest rank, whatever the machine's other load does to every rank alike.
    let (waits_before, waits_after) = (
        median_ratio_to_compute(&r.run, 20, 100),
        median_ratio_to_compute(&r.run, resumed + 50, 800),
    );
    eprintln!(
        "evicted {flagged_ms} ms ({} steps) after the quota; step {before:.1} ms before, \
         {slowed:.1} ms slowed, {after:.1} ms after; step over compute {waits_before:.2} \
         before, {waits_after:.2} after",
        resumed - injected["step"].as_u64().unwrap()
    );
    assert!(
        flagged_ms < 15_000,
        "evicted {flagged_ms} ms after the quota"
    );
    // Within 15%: the evicted process is restarted as a spare beside the job (a libtorch start
    // costs ~0.7 s of CPU), and 2 shared cores move a median by ~10% between runs.
    assert!(
        waits_after <= waits_before * 1.15,
        "step over compute {waits_before:.2} before, {waits_after:.2} after: the job still \
         waits on a slow rank"
    );
    // The raw step time too, with room for a shared machine whose load changed during the run
    // (a CI run measured 36.7 ms before and 50.1 ms after with no straggler left).
    assert!(
        after <= before * 1.5 && after < slowed / 2.0,
        "step {before:.1} ms before, {slowed:.1} ms slowed, {after:.1} ms after"
    );
}

/// Median of rank 0's step time over its forward and backward time, steps `[from, to)`.
fn median_ratio_to_compute(run: &Path, from: u64, to: u64) -> f64 {
    median(
        read_jsonl(&run.join("metrics.jsonl"))
            .iter()
            .filter(|m| m["step"].as_u64().is_some_and(|s| (from..to).contains(&s)))
            .filter_map(|m| Some(m["step_ms"].as_f64()? / m["compute_ms"].as_f64()?.max(1e-3)))
            .collect(),
    )
}

// K-8: without a spare, rank 2 capped at a quarter of its CPU at step 100 is flagged within 5 steps
// and the global batch (16 micro-batches) is rebalanced away from it in a generation with the
// same members; when the quota is lifted 250 steps later it recovers and the split evens out.
// The same job with stragglers left alone gives the unbalanced slowed step time: the rebalanced
// one must be at least 30% below it.
#[test]
fn cpu_quota_straggler_without_spare_is_rebalanced() {
    need_cgroup_cpu();
    let run = |act: bool| {
        let d = test_dir();
        // Left alone, the job is only measured while slowed (80 steps of ~4x): it ends soon
        // after the lift.
        let (slowed, steps) = if act { ("250", 550) } else { ("80", 200) };
        let (max, decay) = (
            format!("train.max_steps={steps}"),
            format!("optim.decay_steps={steps}"),
        );
        let act = format!("coordinator.evict_stragglers={act}");
        let mut args = vec![
            "--world",
            "4",
            "--slow-at",
            "100:2",
            "--slow-cpu-pct",
            QUOTA_PCT,
            "--slow-steps",
            slowed,
            "train.micro_batch=1",
            &max,
            &decay,
            &act,
        ];
        args.extend(STRAGGLER_MODEL);
        let r = launch(d.path(), &args);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        (d, r)
    };
    let (_d, r) = run(true);
    let events = r.events();
    let (at, member) = quota_target(&events);
    let flag = assert_flagged_within_five_steps(&events);
    let gens: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "generation")
        .collect();
    let members = gens[0]["members"].clone();
    let slow_rank = members
        .as_array()
        .unwrap()
        .iter()
        .position(|m| *m == member)
        .unwrap();
    // One rebalance, the same members, fewer micro-batches for the slowed rank.
    let split = gens[1];
    assert_eq!(split["members"], members, "{split}");
    let shares: Vec<u64> = split["shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(shares.iter().sum::<u64>(), 16, "{split}");
    assert!(shares[slow_rank] < 4, "{split}");
    assert!(
        r.report["faults"].as_array().unwrap().is_empty(),
        "{}",
        r.report
    );
    // The job ends evenly split, with the same members throughout. While the quota is on, the
    // rank may look fine at its small share (the quota binds only under load), be cleared, get
    // its even share back and be flagged again: each relapse doubles the normal steps the next
    // clear needs, which bounds the number of regroups.
    let lifted = quota_lifted(&events);
    let last = gens.last().unwrap();
    let flags: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["kind"]
                .as_str()
                .is_some_and(|k| k.starts_with("straggler"))
        })
        .collect();
    assert!(
        last["shares"].as_array().unwrap().is_empty(),
        "the split evens out: {last}; quota lifted at step {lifted}; straggler events {flags:?}"
    );
    assert!(gens.iter().all(|g| g["members"] == members), "{gens:?}");
    assert!(gens.len() <= 12, "{} generations: {gens:?}", gens.len());
    let evened_at = last["resume_step"].as_u64().unwrap().max(lifted);
    let rebalanced_from = split["resume_step"].as_u64().unwrap();
    let fault_free = median_step_ms(&r.run, 20, at);
    let rebalanced = median_step_ms(&r.run, rebalanced_from + 5, lifted);
    let rebalanced_mean = mean_step_ms(&r.run, rebalanced_from, lifted);
    let evened = median_step_ms(&r.run, evened_at + 5, 550);
    let (_d0, r0) = run(false);
    let events0 = r0.events();
    let (at0, _) = quota_target(&events0);
    let lifted0 = quota_lifted(&events0);
    assert_eq!(
        events0.iter().filter(|e| e["kind"] == "generation").count(),
        1,
        "left alone, the straggler keeps its share"
    );
    let unbalanced = median_step_ms(&r0.run, at0 + 10, lifted0);
    let unbalanced_mean = mean_step_ms(&r0.run, at0, lifted0);
    eprintln!(
        "flagged at step {} (quota at {at}); shares {shares:?} from step {rebalanced_from}, even again \
         from step {evened_at} (quota lifted at {lifted}); median step: fault-free {fault_free:.1} ms, \
         unbalanced slowed {unbalanced:.1} ms, rebalanced {rebalanced:.1} ms ({:.0}% below), \
         evened out {evened:.1} ms; mean step while slowed (regroups included): unbalanced \
         {unbalanced_mean:.1} ms, rebalanced {rebalanced_mean:.1} ms; {} generations",
        flag["at_step"],
        (1.0 - rebalanced / unbalanced) * 100.0,
        gens.len()
    );
    let splits: Vec<String> = gens
        .iter()
        .map(|g| format!("{}@{}", g["shares"], g["resume_step"]))
        .collect();
    assert!(
        rebalanced <= 0.7 * unbalanced,
        "rebalanced {rebalanced:.1} ms vs unbalanced {unbalanced:.1} ms; splits {splits:?}"
    );
}

// K-7, K-8: no false alarm acted on. A fault-free 4-rank run of 500 steps on this shared machine
// rebalances and evicts nobody (one generation). A flag is allowed only as K-7 allows it: backed
// by at least the severe time bound of slow steps (on a loaded 2-core machine a rank can be
// descheduled for a quarter of a second), cleared again before the end, and rare.
#[test]
fn fault_free_run_acts_on_no_straggler() {
    let d = test_dir();
    let mut args = vec![
        "--world",
        "4",
        "train.max_steps=500",
        "optim.decay_steps=500",
        "coordinator.evict_stragglers=true",
    ];
    args.extend(STRAGGLER_MODEL);
    let r = launch(d.path(), &args);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.report["generation_final"], 1, "{}", r.report);
    let events = r.events();
    let kind = |k: &str| -> Vec<&Value> { events.iter().filter(|e| e["kind"] == k).collect() };
    let (flags, cleared) = (kind("straggler_flagged"), kind("straggler_cleared"));
    assert!(flags.len() <= 2, "{flags:?}");
    for f in &flags {
        let slow_ms = f["slow_for_ms"].as_f64().unwrap_or(0.0);
        assert!(slow_ms >= 200.0, "a burst shorter than the bound: {f}");
        let at = |e: &Value| e["unix_ms"].as_u64().unwrap_or(0);
        let later = cleared
            .iter()
            .any(|c| c["member"] == f["member"] && at(c) >= at(f));
        assert!(later, "never cleared: {f}");
    }
}

// K-13: a rank lost after the last committed step (its process exits at the final barrier)
// ends nothing: the job completes, rank 0 saves the final model and names the lost peer in the
// final metrics line, and no generation is formed to train again or halt (before, the job
// regrouped, promoted a fresh spare, and halted because "no member holds the committed state").
#[test]
fn a_rank_lost_after_the_last_step_ends_nothing() {
    let d = test_dir();
    let r = launch_env(
        Hosts::One,
        d.path(),
        &["--world", "2", "train.max_steps=30", "optim.decay_steps=30"],
        &[("PHALANX_TEST_FAULT", "exit-at-final-barrier@30:1")],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.report["status"], "completed", "{}", r.report);
    let events = r.events();
    let kinds = |k: &str| events.iter().filter(|e| e["kind"] == k).count();
    assert_eq!(kinds("halt"), 0, "{events:?}");
    // The lost rank's exit may race the ranks' "done" to the coordinator: at most a regroup of
    // the finished survivors, never a promotion.
    assert!(kinds("generation") <= 2, "{events:?}");
    assert!(
        events
            .iter()
            .filter(|e| e["kind"] == "generation")
            .skip(1)
            .all(|e| e["promoted"].as_array().is_none_or(|p| p.is_empty())),
        "{events:?}"
    );
    let metrics = r.metrics();
    let last = metrics.last().unwrap();
    assert_eq!(last["final"], true, "{last}");
    assert_eq!(last["step"], 30, "{last}");
    let lost = last["peer_lost_at_end"].as_str().unwrap_or("");
    assert!(lost.contains("rank 1"), "{last}");
    assert!(r.run.join("model/model.safetensors").exists());
}

// C-4: every background checkpoint write takes 1.5 s longer (a slow disk) while one is due every
// 2 steps: the job is not held up and does not queue snapshots; the ones due while a write is
// in flight are skipped with a warning.
#[test]
fn a_slow_disk_skips_checkpoints_instead_of_queueing_them() {
    let d = test_dir();
    let r = launch_env(
        Hosts::One,
        d.path(),
        &[
            "--world",
            "2",
            "train.max_steps=60",
            "optim.decay_steps=60",
            "run.checkpoint_interval=2",
        ],
        &[("PHALANX_TEST_FAULT", "slow-checkpoint@1500")],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.report["status"], "completed", "{}", r.report);
    // Every rank writes its part of each checkpoint (C-5) and skips the ones due while its
    // previous part is still being written.
    for i in 0..2 {
        let log = std::fs::read_to_string(r.run.join(format!("logs/worker-{i}.log"))).unwrap();
        let skipped = log.matches("still being written").count();
        eprintln!("worker {i}: 30 parts due, {skipped} skipped");
        assert!((10..30).contains(&skipped), "{skipped} of 30 skipped");
    }
    let committed = r
        .events()
        .iter()
        .filter(|e| e["kind"] == "checkpoint_committed")
        .count();
    assert!(committed >= 1, "no checkpoint committed at all");
}
