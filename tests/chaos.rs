//! `phalanx chaos` as a user runs it: each scenario with a fixed seed on a tiny model, its
//! faults real (signals, cgroup quotas, namespaces, NaN in a rank), its invariants checked by
//! the command itself and recorded in `report.json`, which the test reads back.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

/// A chaos run's report (with the chaos section), the command's stdout and the run's events.
struct Ran {
    report: Value,
    stdout: String,
    events: Vec<Value>,
}

/// Runs a scenario for 150 steps.
fn chaos(scenario: &str, seed: u64) -> Ran {
    chaos_for(scenario, seed, 150)
}

fn chaos_for(scenario: &str, seed: u64, steps: u64) -> Ran {
    let _one_at_a_time = serial();
    let d = test_dir();
    let data = dataset(d.path());
    let cfg = job_config(d.path(), &data);
    let run = d.path().join("chaos");
    let out = bin()
        .args(["chaos", "--scenario", scenario, "--seed", &seed.to_string()])
        .arg("--config")
        .arg(&cfg)
        .arg(format!("run.dir={}", run.display()))
        // Steps of a few ms: enough of them that a fault placed mid-run lands before the end
        // (the launcher polls the job's step every 20 ms).
        .arg(format!("train.max_steps={steps}"))
        .arg(format!("optim.decay_steps={steps}"))
        .current_dir(d.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = read_json(&run.join("report.json"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(Path::new(&run).join("report.png").exists());
    // The heat map's input: every rank's own time in its steps.
    let times = read_jsonl(&run.join("step_times.jsonl"));
    assert!(
        times.iter().any(|t| t["rank"] == 1) && times.iter().all(|t| t["compute_ms"].is_f64()),
        "{} step_times lines",
        times.len()
    );
    Ran {
        report,
        stdout,
        events: read_jsonl(&run.join("events.jsonl")),
    }
}

/// Every invariant held, a fault-free run was compared, and the faults are in the report.
fn assert_held(report: &Value, faults: usize) {
    assert_held_with(report, faults..=faults)
}

fn assert_held_with(report: &Value, faults: std::ops::RangeInclusive<usize>) {
    let c = &report["chaos"];
    assert_eq!(c["passed"], true, "{c}");
    let checks = c["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 11, "{c}");
    assert!(c["baseline_val_loss"].as_f64().is_some(), "{c}");
    let f = report["faults"].as_array().unwrap();
    assert!(faults.contains(&f.len()), "{}", report["faults"]);
    for f in f {
        assert!(f["detection_ms"].as_u64().is_some(), "{f}");
        assert!(f["recovery_ms"].as_u64().is_some(), "{f}");
    }
}

#[test]
fn kill_one() {
    let ran = chaos("kill-one", 3);
    assert_held(&ran.report, 1);
    assert!(
        ran.stdout.contains("11 of 11 invariants hold"),
        "{}",
        ran.stdout
    );
}

#[test]
fn kill_two_at_once() {
    let r = chaos("kill-two", 3).report;
    assert_held(&r, 2);
    // One spare for two losses: the job goes on with 3 ranks.
    assert_eq!(r["faults"][1]["world_after"], 3, "{}", r["faults"]);
}

#[test]
fn hang_and_wake() {
    let r = chaos("hang-wake", 3).report;
    assert_held(&r, 1);
}

#[test]
fn a_straggler() {
    let ran = chaos("straggler", 3);
    assert_held(&ran.report, 0);
    let quota: Vec<&Value> = ran
        .events
        .iter()
        .filter(|e| e["kind"] == "fault_injected" && e["fault"] == "cpu_quota")
        .collect();
    assert_eq!(quota.len(), 1, "the quota was put on");
}

#[test]
fn scale_up_then_drain() {
    // More steps than the others: the launcher acts on a step it polled (every 20 ms), and
    // under load a drain could land so late that the job ends before its regroup.
    let ran = chaos_for("scale-drain", 3, 300);
    assert_held(&ran.report, 0);
    let worlds: Vec<u64> = ran
        .events
        .iter()
        .filter(|e| e["kind"] == "generation")
        .map(|e| e["world"].as_u64().unwrap())
        .collect();
    assert_eq!(worlds, vec![2, 4, 3], "grown to 4, drained to 3");
}

#[test]
fn nan_in_one_rank() {
    let r = chaos("nan", 3).report;
    assert_held(&r, 0);
    // T-4: the step was skipped on every rank and the rank that produced the NaN named.
    let n = r["numerics"].as_array().unwrap();
    assert_eq!(n.len(), 1, "{r}");
    assert_eq!(n[0]["action"], "skipped");
    assert_eq!(n[0]["ranks"].as_array().unwrap().len(), 1, "{r}");
}

// K-5 under chaos: the coordinator process SIGKILLed and started again 2 s later from its
// journal; the ranks train on (steps committed while it is down), every one rejoins in its
// place and nobody is evicted. 4000 steps of a few ms: the outage and the rejoins land well
// before the end (the ranks commit ~250 steps a second while it is down).
#[test]
fn coordinator_kill_and_restart() {
    let ran = chaos_for("coordinator-restart", 3, 4000);
    assert_held(&ran.report, 0);
    let o = &ran.report["coordinator_outages"];
    assert_eq!(o.as_array().map(Vec::len), Some(1), "{o}");
    assert!(o[0]["down_ms"].as_u64().unwrap() >= 2000, "{o}");
    assert!(
        o[0]["steps_committed_while_down"].as_u64().unwrap() > 0,
        "the ranks stopped with the coordinator: {o}"
    );
    assert!(o[0]["ranks_rejoined"].as_u64().unwrap() >= 3, "{o}");
}

// C-6 under chaos: a bit flipped in the newest committed checkpoint, then every worker
// SIGKILLed; the next job names the corrupt checkpoint, resumes from the one before, and the
// campaign's ledger holds every sample exactly once.
#[test]
fn a_corrupt_checkpoint_then_the_whole_job_lost() {
    let ran = chaos("corrupt-checkpoint", 3);
    assert_held(&ran.report, 0);
    assert!(
        ran.stdout.contains("the next job resumes the campaign"),
        "{}",
        ran.stdout
    );
    let checks = ran.report["chaos"]["checks"].as_array().unwrap();
    let verify = checks
        .iter()
        .find(|c| c["name"] == "committed_checkpoints_verify")
        .unwrap();
    assert!(
        verify["detail"]
            .as_str()
            .unwrap()
            .contains("corrupted on purpose"),
        "{verify}"
    );
}

// C-4 under chaos: the checkpoint disk (a tmpfs the launcher mounts) full for a fifth of the
// run and at least 2 s: a save fails with the system's reason, none is committed partial, the
// job goes on and a later save commits. 3000 steps of a few ms: a save about every second.
#[test]
fn the_checkpoint_disk_fills_up() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs as the checkpoint disk needs root");
        return;
    }
    let ran = chaos_for("disk-full", 3, 3000);
    assert_held(&ran.report, 0);
    assert_a_save_failed_for_space(&ran.events);
}

#[test]
fn host_loss_and_partition_on_two_hosts() {
    if !Hosts::Two.available() {
        return;
    }
    // The host held two ranks and a spare; the spare may have been promoted before its own
    // death was seen, a third rank lost.
    let r = chaos("host-loss", 3).report;
    assert_held_with(&r, 2..=3);
    let r = chaos("partition", 3).report;
    assert_eq!(r["chaos"]["passed"], true, "{}", r["chaos"]);
}

// A slow link is no failure: with a proxy on the path between the 2 simulated hosts (root),
// 20 ms more each way for 4 s. The check itself fails a link that did not slow the steps by at
// least its latency, or a rank lost while it was slow.
#[test]
fn a_slow_link_slows_the_steps_and_evicts_nobody() {
    if !Hosts::Two.available() {
        return;
    }
    let ran = chaos_for("slow-link", 3, 300);
    let c = &ran.report["chaos"];
    assert_eq!(c["passed"], true, "{c}");
    let slow = c["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "slow_link_slows_and_evicts_nobody")
        .unwrap_or_else(|| panic!("{c}"));
    assert!(
        slow["detail"].as_str().unwrap().contains("while slow"),
        "{slow}"
    );
    let injected = ran
        .events
        .iter()
        .find(|e| e["kind"] == "fault_injected" && e["fault"] == "slow_link")
        .unwrap_or_else(|| panic!("{:?}", ran.events));
    assert_eq!(injected["delay_ms"], 20, "{injected}");
    assert!(ran
        .events
        .iter()
        .any(|e| e["kind"] == "fault_cleared" && e["fault"] == "slow_link"));
}

#[test]
fn scenarios_are_listed_and_an_unknown_one_is_named() {
    let d = test_dir();
    let list = run(&["chaos", "--scenario", "list"], d.path());
    assert!(list.ok(), "{}", list.stderr());
    for s in [
        "kill-one",
        "kill-two",
        "hang-wake",
        "straggler",
        "nan",
        "scale-drain",
        "host-loss",
        "partition",
        "slow-link",
        "coordinator-restart",
        "corrupt-checkpoint",
        "disk-full",
        "soak",
    ] {
        assert!(list.stdout().contains(s), "{}", list.stdout());
    }
    let bad = run(&["chaos", "--scenario", "kil-one"], d.path());
    assert_eq!(bad.out.status.code(), Some(1));
    assert!(bad.stderr().contains("--scenario list"), "{}", bad.stderr());
    // A scenario file with a mistake is named with what to change, before any job runs.
    let f = d.path().join("mine.toml");
    std::fs::write(
        &f,
        "world = 3\n[[fault]]\nkind = \"kill\"\nstep = 5\nrank = 3\n",
    )
    .unwrap();
    let bad = run(&["chaos", "--scenario", f.to_str().unwrap()], d.path());
    bad.assert_user_error("mine.toml");
    bad.assert_user_error("rank 3 is not a rank of a world of 3");
}

// The soak in small, from a scenario file: faults drawn every 2.5 s for 12 s of training (a
// SIGKILL or a hang of 1.5 s) plus one kill placed at a step, on 2 simulated hosts where there
// are (root). Every invariant holds, every fault struck, goodput and memory are reported.
#[test]
fn a_soak_from_a_scenario_file() {
    let d = test_dir();
    let hosts = if Hosts::Two.available() { 2 } else { 0 };
    let f = d.path().join("soak-small.toml");
    std::fs::write(
        &f,
        format!(
            "about = \"the soak in small\"\nworld = 4\nspares = 2\nhosts = {hosts}\n\
             [[fault]]\nkind = \"kill\"\nstep = 200\nrank = 3\n\
             [draw]\nevery_s = 2.5\nfor_min = 0.2\nmix = {{ kill = 1, hang = 1 }}\nhang_ms = 1500\n"
        ),
    )
    .unwrap();
    // Long enough that the last fault drawn (about 12 s in) strikes before the end: steps of
    // this model take a few ms, fewer since ranks sum through shared memory.
    let ran = chaos_for(f.to_str().unwrap(), 3, 6000);
    let c = &ran.report["chaos"];
    assert_eq!(c["passed"], true, "{c}");
    assert_eq!(c["scenario"], "soak-small", "{c}");
    // Each fault struck a process of its own (planned_faults_struck counted all five).
    let mut pids: Vec<u64> = ran
        .events
        .iter()
        .filter(|e| e["kind"] == "fault_injected" && e["ok"] == true)
        .filter_map(|e| e["pid"].as_u64())
        .collect();
    assert_eq!(pids.len(), 5, "1 placed + 4 drawn: {:?}", ran.events);
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 5, "a process struck twice: {:?}", ran.events);
    // Five faults in some 20 s of training cost time, but far from all of it.
    let g = c["goodput"].as_f64().unwrap();
    eprintln!(
        "goodput {g:.3}, tokens/s {} of the fault-free run's",
        c["throughput_vs_fault_free"]
    );
    assert!(g > 0.4 && g < 1.0, "{c}");
    assert!(ran.stdout.contains("goodput"), "{}", ran.stdout);
}
