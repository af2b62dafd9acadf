//! Campaigns that outlive a job (issue "Campaigns that outlive any job"): sharded checkpoints
//! committed through the coordinator, a whole job SIGKILLed and resumed at another world size,
//! a corrupt newest checkpoint skipped, a rank lost while a save drains, and deterministic mode
//! bitwise across a stop and a resize. Real `phalanx launch` processes, real signals.

mod common;
use common::*;
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

struct Campaign {
    dir: TestDir,
    cfg: PathBuf,
}

impl Campaign {
    fn new() -> Campaign {
        let dir = test_dir();
        let data = dataset(dir.path());
        let cfg = job_config(dir.path(), &data);
        Campaign { dir, cfg }
    }

    fn run(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn launch(&self, args: &[&str]) -> Launched {
        let r = launch_job(self.dir.path(), &self.cfg, Hosts::One, args, &[]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert_eq!(r.report["status"], "completed", "{}", r.report);
        r
    }

    /// The steps of the committed checkpoints on disk (those with a manifest).
    fn committed(&self) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(self.run().join("checkpoints"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().join("manifest.json").is_file())
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v
    }
}

/// The resume line of the campaign's metrics (the last one).
fn resume_line(metrics: &[Value]) -> Value {
    metrics
        .iter()
        .rev()
        .find(|m| m["resume"] == true)
        .cloned()
        .unwrap_or_else(|| panic!("no resume line in the metrics"))
}

/// The loss of `step` in the metrics lines from `from` on.
fn loss_at(metrics: &[Value], from: usize, step: u64) -> f64 {
    metrics[from..]
        .iter()
        .find(|m| m["step"] == step && m["loss"].is_number())
        .and_then(|m| m["loss"].as_f64())
        .unwrap_or_else(|| panic!("no loss of step {step}"))
}

/// C-1: every file a committed checkpoint's manifest lists is there with its size.
fn assert_committed_are_whole(run: &Path) {
    for e in std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
    {
        let m = e.path().join("manifest.json");
        if !m.is_file() {
            continue;
        }
        let manifest = read_json(&m);
        let files = manifest["files"].as_array().unwrap();
        let world = manifest["shards"]["world"].as_u64().unwrap();
        let parts = files
            .iter()
            .filter(|f| f["name"].as_str().unwrap().starts_with("part-"))
            .count();
        assert_eq!(parts as u64, world, "{manifest}");
        for f in files {
            let p = e.path().join(f["name"].as_str().unwrap());
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            assert_eq!(Some(len), f["bytes"].as_u64(), "{}", p.display());
        }
    }
}

// C-5, C-6, D-4: the whole 4-rank job (launcher and every worker) is SIGKILLed mid-run; `launch
// --resume` on 3 ranks continues from the last committed checkpoint: the loss of that step is
// the one the killed job computed, the job completes, and the sample ledger is exactly-once
// across both jobs (the steps the killed job committed after the checkpoint are redone).
#[test]
fn a_job_killed_whole_resumes_on_three_ranks_from_its_last_commit() {
    let _one_at_a_time = serial();
    let c = Campaign::new();
    // Steps of a few ms: enough of them that the kill, made once step 60's checkpoint is seen
    // committed, lands before the end also when the test's polling is slowed by load.
    let steps = ["train.max_steps=1200", "optim.decay_steps=1200"];
    let log = std::fs::File::create(c.dir.path().join("first.log")).unwrap();
    let mut first = Proc::spawn(
        bin()
            .args(["launch", "--world", "4", "--config"])
            .arg(&c.cfg)
            .args(steps)
            .arg("run.checkpoint_interval=20")
            .current_dir(c.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0),
    );
    let events = c.run().join("events.jsonl");
    let committed = |ev: &[Value]| {
        ev.iter()
            .any(|e| e["kind"] == "checkpoint_committed" && e["step"].as_u64() >= Some(60))
    };
    assert!(
        jsonl_until(&events, &committed, 120),
        "no checkpoint of step 60 or later committed; see {}",
        c.dir.path().display()
    );
    // Every process of the job at once, as a lost allocation would.
    let group = format!("-{}", first.pid());
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &group])
        .status();
    first.wait();
    std::thread::sleep(Duration::from_millis(500));
    let before = read_jsonl(&c.run().join("metrics.jsonl"));
    let last = *c.committed().last().expect("a committed checkpoint");
    let killed_at = before
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .max()
        .unwrap();
    assert!(killed_at < 1199, "the first job finished before the kill");
    assert_committed_are_whole(&c.run());

    let r = c.launch(&[
        "--world",
        "3",
        "--resume",
        steps[0],
        steps[1],
        "run.checkpoint_interval=20",
    ]);
    let metrics = r.metrics();
    let resumed = resume_line(&metrics);
    assert_eq!(resumed["step"], last, "{resumed}");
    assert_eq!(resumed["world_size"], 3, "{resumed}");
    // The loss curve goes on: the first step trained again is the killed job's, up to the
    // order of the sum over 3 ranks instead of 4.
    let (a, b) = (
        loss_at(&metrics, 0, last),
        loss_at(&metrics, before.len(), last),
    );
    assert!((a - b).abs() < 1e-4, "loss of step {last}: {a} then {b}");
    assert_eq!(r.report["world_size_final"], 3, "{}", r.report);
    assert_ledger_exactly_once(&r.report);
    let redone = r.report["ledger"]["redone_steps"].as_array().unwrap().len() as u64;
    assert_eq!(redone, killed_at + 1 - last, "{}", r.report["ledger"]);
    assert_identical_final_state(&c.run(), 3);
    assert!(
        std::fs::read_dir(c.run().join("history")).unwrap().count() == 1,
        "the killed job's events are not kept in history/"
    );
}

// C-6: a flipped byte in the newest committed checkpoint: the resumed job names the part and
// the checkpoint it skipped, and loads the one before.
#[test]
fn a_corrupt_newest_checkpoint_is_named_and_the_one_before_is_loaded() {
    let _one_at_a_time = serial();
    let c = Campaign::new();
    c.launch(&[
        "--world",
        "2",
        "train.max_steps=60",
        "optim.decay_steps=80",
        "run.checkpoint_interval=20",
    ]);
    // The job's last step is committed before it ends (the campaign's next job starts there).
    assert_eq!(c.committed(), vec![20, 40, 60]);
    let part = c
        .run()
        .join("checkpoints/step-60/part-00001-of-00002.safetensors");
    let mut bytes = std::fs::read(&part).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&part, bytes).unwrap();
    // What the user sees before resuming: which checkpoint is damaged, where --resume starts.
    let list = run(&["checkpoint", "list", "run"], c.dir.path());
    assert!(list.ok(), "{}", list.stderr());
    let out = list.stdout();
    assert!(
        out.contains("DOES NOT VERIFY") && out.contains("part-00001-of-00002"),
        "{out}"
    );
    assert!(out.contains("--resume would start at step 40"), "{out}");
    // A sharded checkpoint is a model like any other for `sample`.
    let sample = run(
        &[
            "sample",
            "--checkpoint",
            "run/checkpoints/step-40",
            "--prompt",
            "ALL:",
            "--max-new-tokens",
            "20",
        ],
        c.dir.path(),
    );
    assert!(sample.ok(), "{}", sample.stderr());
    let r = c.launch(&[
        "--world",
        "2",
        "--resume",
        "train.max_steps=80",
        "optim.decay_steps=80",
        "run.checkpoint_interval=20",
    ]);
    let resumed = resume_line(&r.metrics());
    assert_eq!(resumed["step"], 40, "{resumed}");
    let skipped = &resumed["skipped"][0];
    assert!(
        skipped["checkpoint"].as_str().unwrap().ends_with("step-60"),
        "{resumed}"
    );
    assert!(
        skipped["why"]
            .as_str()
            .unwrap()
            .contains("part-00001-of-00002.safetensors"),
        "{resumed}"
    );
    assert_ledger_exactly_once(&r.report);
}

// C-5: every rank's save takes 1.5 s longer, and rank 1 is SIGKILLed while the save of step 20
// drains: that save is aborted (never committed), a later one commits, and every committed
// checkpoint is whole.
#[test]
fn a_rank_lost_while_a_save_drains_never_commits_a_partial_checkpoint() {
    let _one_at_a_time = serial();
    let c = Campaign::new();
    let r = launch_job(
        c.dir.path(),
        &c.cfg,
        Hosts::One,
        &[
            "--world",
            "3",
            "--kill-at",
            "21:1",
            "train.max_steps=400",
            "optim.decay_steps=400",
            "run.checkpoint_interval=20",
        ],
        &[("PHALANX_TEST_FAULT", "slow-checkpoint@1500")],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let events = r.events();
    let aborted: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "checkpoint_aborted")
        .collect();
    assert!(
        aborted
            .iter()
            .any(|e| e["step"] == 20 && e["voted"].as_u64() < e["world"].as_u64()),
        "the save in flight when rank 1 died was not aborted: {aborted:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["kind"] == "checkpoint_committed" && e["step"] == 20),
        "the save of step 20 was committed without rank 1's part"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "checkpoint_committed" && e["step"].as_u64() > Some(20)),
        "no later save committed"
    );
    assert_committed_are_whole(&r.run);
    assert_ledger_exactly_once(&r.report);
}

// C-6, D-1: deterministic mode is bitwise across a stop and a resize: 60 steps in one job on 4
// ranks end in the same state as 30 steps on 4 ranks, then a job resumed on 3 for 30 more.
#[test]
fn deterministic_mode_is_bitwise_across_a_stop_and_a_resize() {
    let _one_at_a_time = serial();
    let common = [
        "optim.decay_steps=60",
        "run.checkpoint_interval=30",
        "train.deterministic=true",
    ];
    let one = Campaign::new();
    let mut args = vec!["--world", "4", "train.max_steps=60"];
    args.extend(common);
    one.launch(&args);
    let two = Campaign::new();
    let mut args = vec!["--world", "4", "train.max_steps=30"];
    args.extend(common);
    two.launch(&args);
    let mut args = vec!["--world", "3", "--resume", "train.max_steps=60"];
    args.extend(common);
    let r = two.launch(&args);
    assert_eq!(resume_line(&r.metrics())["step"], 30);
    let last = |run: &Path| {
        let fps = read_jsonl(&run.join("fingerprints.jsonl"));
        let f = fps.last().unwrap().clone();
        assert_eq!(f["step"], 60, "{f}");
        f["state_sha256"].clone()
    };
    assert_eq!(last(&one.run()), last(&two.run()));
    assert_eq!(
        read_report(&one.run())["final_val_loss"],
        r.report["final_val_loss"]
    );
}

/// Starts a long job in its own process group; returns it once `steps` steps are committed.
fn long_job(c: &Campaign, steps: usize) -> Proc {
    let log = std::fs::File::create(c.dir.path().join("first.log")).unwrap();
    let p = Proc::spawn(
        bin()
            .args(["launch", "--world", "3", "--spares", "1", "--config"])
            .arg(&c.cfg)
            .args(["train.max_steps=100000", "optim.decay_steps=2000"])
            .current_dir(c.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0),
    );
    let metrics = c.run().join("metrics.jsonl");
    assert!(
        jsonl_until(&metrics, &|m| m.len() >= steps, 120),
        "only {} steps committed; see {}",
        read_jsonl_now(&metrics).len(),
        c.dir.path().display()
    );
    p
}

/// C-8: the stopped job saved its last step and said so; the next job resumes there and
/// loses no step (nothing redone), with exactly-once samples across both.
fn assert_stopped_and_resumed(c: &Campaign, mut job: Proc, signalled: std::time::Instant) {
    let code = job.wait_exit(Duration::from_secs(60));
    let took = signalled.elapsed();
    assert_eq!(code, Some(6), "the launcher's exit code is not 'preempted'");
    assert!(took < Duration::from_secs(50), "stopping took {took:?}");
    let report = read_report(&c.run());
    assert_eq!(report["status"], "preempted", "{report}");
    let events = read_jsonl(&c.run().join("events.jsonl"));
    let bad = failures_or_regroups(&events);
    assert!(bad.is_empty(), "the stop was taken for failures: {bad:#?}");
    let metrics = read_jsonl(&c.run().join("metrics.jsonl"));
    let fin = metrics.last().unwrap();
    assert_eq!(fin["preempted"], true, "{fin}");
    let stopped_at = fin["step"].as_u64().unwrap();
    assert_eq!(c.committed().last(), Some(&stopped_at));
    let until = format!("train.max_steps={}", stopped_at + 40);
    let r = c.launch(&["--world", "2", "--resume", &until, "optim.decay_steps=2000"]);
    assert_eq!(resume_line(&r.metrics())["step"], stopped_at);
    assert_ledger_exactly_once(&r.report);
    assert_eq!(
        r.report["ledger"]["redone_steps"],
        serde_json::json!([]),
        "a step was lost to the stop: {}",
        r.report["ledger"]
    );
}

// C-8: SIGTERM to the launcher (what a scheduler sends before the time limit): the ranks stop
// together after the next step with a committed checkpoint of it, no rank counts as failed and
// no spare is promoted, the report says `preempted`, the exit code is 6, and `--resume` goes on
// from that step.
#[test]
fn sigterm_to_the_launcher_saves_and_the_next_job_loses_no_step() {
    let _one_at_a_time = serial();
    let c = Campaign::new();
    let job = long_job(&c, 100);
    let t = std::time::Instant::now();
    signal(job.pid(), "TERM");
    assert_stopped_and_resumed(&c, job, t);
}

// C-8: Ctrl-C at the terminal signals the launcher and every worker at once (one process
// group): the same orderly stop.
#[test]
fn ctrl_c_to_the_whole_job_saves_and_the_next_job_loses_no_step() {
    let _one_at_a_time = serial();
    let c = Campaign::new();
    let job = long_job(&c, 100);
    let t = std::time::Instant::now();
    let group = format!("-{}", job.pid());
    let _ = std::process::Command::new("kill")
        .args(["-INT", "--", &group])
        .status();
    assert_stopped_and_resumed(&c, job, t);
}

// C-6: a run directory holding a campaign's checkpoints or model is resumed or refused, never
// overwritten: a new `launch` or `train` there says how to go on and leaves it as it was;
// `--force` starts over.
#[test]
fn a_run_dir_with_saved_work_is_resumed_or_refused() {
    let _one_at_a_time = serial();
    let c = Campaign::new();
    let args = [
        "--world",
        "2",
        "train.max_steps=20",
        "optim.decay_steps=20",
        "run.checkpoint_interval=10",
    ];
    c.launch(&args);
    let manifest = c.run().join("model/manifest.json");
    let before = std::fs::read(&manifest).unwrap();
    let again = run(
        &[
            &["launch", "--config", c.cfg.to_str().unwrap()][..],
            &args[..],
        ]
        .concat(),
        c.dir.path(),
    );
    again.assert_user_error("--resume");
    assert!(again.stderr().contains("--force"), "{}", again.stderr());
    let train = run(
        &[
            "train",
            "--config",
            c.cfg.to_str().unwrap(),
            "train.max_steps=5",
        ],
        c.dir.path(),
    );
    train.assert_user_error("--force");
    assert_eq!(
        std::fs::read(&manifest).unwrap(),
        before,
        "the model was touched"
    );
    assert_eq!(c.committed(), vec![10, 20]);
    let mut forced = vec!["--force"];
    forced.extend(args);
    c.launch(&forced);
    assert_eq!(c.committed(), vec![10, 20]);
    assert!(resume_line_absent(&read_jsonl(
        &c.run().join("metrics.jsonl")
    )));
}

fn resume_line_absent(metrics: &[Value]) -> bool {
    metrics.iter().all(|m| m["resume"] != true)
}

/// A mount that goes with the test, even a failed one.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

// C-5, C-4: the checkpoint disk fills up (a 256 KiB tmpfs holds one save of this model): the
// saves that do not fit fail after their retries, each said in a `checkpoint_failed` event
// with the system's reason, none is committed partial, and training goes on to its end.
#[test]
fn a_full_disk_fails_saves_with_an_event_and_training_goes_on() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs as the checkpoint disk needs root");
        return;
    }
    let _one_at_a_time = serial();
    let c = Campaign::new();
    let disk = c.run().join("checkpoints");
    std::fs::create_dir_all(&disk).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(ok.success(), "cannot mount a tmpfs at {}", disk.display());
    let _mounted = Mounted(disk.clone());
    let r = c.launch(&[
        "--world",
        "2",
        "train.max_steps=100",
        "optim.decay_steps=100",
        "run.checkpoint_interval=10",
        "run.keep_checkpoints=1",
    ]);
    let events = r.events();
    assert_a_save_failed_for_space(&events);
    assert!(
        events.iter().any(|e| e["kind"] == "checkpoint_committed"),
        "not even the first save was committed"
    );
    assert_committed_are_whole(&r.run);
    assert_ledger_exactly_once(&r.report);
}
