//! A campaign under a real Slurm (Debian 12's slurmctld, slurmd and munge: Slurm 22.05), a
//! private one-node cluster started for the test: `examples/slurm.sbatch` with 4 ranks and a
//! hot spare in 5 tasks, stopped by its time limit's notice and continued by the next job.
//! Needs root (slurmd runs jobs as their user); elsewhere it says it was skipped.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/slurm.sbatch")
}

/// `sbatch SBATCH_ARGS examples/slurm.sbatch OVERRIDES` from `dir` with the test's phalanx and
/// config, 4 ranks and a spare; the job's output in `dir/job-<id>.out`.
fn submit(
    slurm: &SlurmCluster,
    dir: &Path,
    cfg: &Path,
    sbatch_args: &[&str],
    overrides: &[String],
) -> u32 {
    let mut cmd = slurm.command("sbatch");
    cmd.current_dir(dir)
        .env("PHALANX", env!("CARGO_BIN_EXE_phalanx"))
        .env("CONFIG", cfg)
        .env("MASTER_PORT", free_port().to_string())
        .env("PHALANX_LOG", "warn")
        .env("SPARES", "1");
    let mut args: Vec<String> = sbatch_args.iter().map(|a| a.to_string()).collect();
    args.push("--ntasks=5".into());
    args.push(format!("--output={}", dir.join("job-%j.out").display()));
    args.push(script().display().to_string());
    args.extend(overrides.iter().cloned());
    slurm.sbatch(&mut cmd, args)
}

fn output(dir: &Path, id: u32) -> String {
    std::fs::read_to_string(dir.join(format!("job-{id}.out"))).unwrap_or_default()
}

// C-8, C-6: job 1 can only end by its time limit. Slurm's notice (--signal=B:TERM) reaches the
// batch script, which passes it to the workers: they save the next step, commit it and exit 6,
// a clean stop (no failure, no new generation, the spare not promoted), and the job exits 6.
// Job 2, chained with --dependency=afterany and run.resume=true, starts at exactly that step
// on 4 ranks, runs to its end and exits 0; across both jobs no step is lost or redone and every
// sample is consumed exactly once.
#[test]
fn a_campaign_of_two_slurm_jobs_goes_on_across_a_time_limit() {
    if !is_root() {
        eprintln!(
            "skipped: the private Slurm cluster needs root (slurmd starts jobs as their user)"
        );
        return;
    }
    let t = Instant::now();
    let d = test_dir();
    let dir = d.path();
    let data = dataset(dir);
    let cfg = job_config(dir, &data);
    let run = dir.join("run");
    let metrics = run.join("metrics.jsonl");
    let slurm = SlurmCluster::start(&dir.join("slurm"));
    // Five workers share two cores: libtorch's default of a thread per core each would make
    // a step of this model a hundred times slower.
    let both = [
        "optim.decay_steps=1000".to_string(),
        "train.threads=1".into(),
    ];

    // Slurm checks time limits every 30 s and sends the notice once the limit is within the
    // lead time and one check: with --time=1 and a lead of 30 s, at its first check, a whole
    // check before the limit itself.
    let mut overrides = vec!["train.max_steps=100000000".to_string()];
    overrides.extend(both.iter().cloned());
    let job1 = submit(
        &slurm,
        dir,
        &cfg,
        &["--time=1", "--signal=B:TERM@30"],
        &overrides,
    );
    let end1 = slurm.wait_end(job1, Duration::from_secs(150), || {
        format!("{}\n{}", output(dir, job1), slurm.logs())
    });
    assert_eq!(
        (end1.state.as_str(), end1.exit_code),
        ("FAILED", 6),
        "job 1 did not end preempted (exit code 6, which Slurm counts as FAILED; TIMEOUT is \
         the limit's kill): {end1:?}\n{}",
        output(dir, job1)
    );
    let fin = read_jsonl(&metrics).last().cloned().unwrap();
    assert_eq!(fin["preempted"], true, "{fin}");
    let stopped_at = fin["step"].as_u64().unwrap();
    assert!(stopped_at > 0, "job 1 was stopped before its first step");
    assert!(
        run.join(format!("checkpoints/step-{stopped_at}/manifest.json"))
            .is_file(),
        "no committed checkpoint of step {stopped_at}"
    );
    let events = read_jsonl(&run.join("events.jsonl"));
    let bad = failures_or_regroups(&events);
    assert!(bad.is_empty(), "the stop was taken for failures: {bad:#?}");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "registered" && e["role"] == "spare"),
        "the fifth task did not join as a spare"
    );

    // A lead of 30 s with --time=2: no notice within the first minute, while 100 steps take
    // seconds.
    let until = stopped_at + 100;
    let mut overrides = vec![
        "run.resume=true".to_string(),
        format!("train.max_steps={until}"),
    ];
    overrides.extend(both.iter().cloned());
    let after = format!("--dependency=afterany:{job1}");
    let job2 = submit(
        &slurm,
        dir,
        &cfg,
        &["--time=2", "--signal=B:TERM@30", &after],
        &overrides,
    );
    let done = |m: &[Value]| {
        m.last()
            .is_some_and(|l| l["final"] == true && l["step"] == until && l["preempted"] != true)
    };
    let context = || format!("{}\n{}", output(dir, job2), slurm.logs());
    assert!(
        jsonl_until(&metrics, &done, 60),
        "job 2 did not train to step {until}: {:?}\n{}",
        read_jsonl_now(&metrics).last(),
        context()
    );
    // Its end is the workers' end: every one of them, the spare too, leaves once the run is
    // complete.
    let end2 = slurm.wait_end(job2, Duration::from_secs(20), || {
        format!(
            "the run is complete but a worker is still running\n{}",
            context()
        )
    });
    assert_eq!(
        (end2.state.as_str(), end2.exit_code),
        ("COMPLETED", 0),
        "{end2:?}\n{}",
        output(dir, job2)
    );
    let metrics = read_jsonl(&metrics);
    let resumed = metrics
        .iter()
        .find(|m| m["resume"] == true)
        .unwrap_or_else(|| panic!("job 2 wrote no resume line"));
    assert_eq!(resumed["step"], stopped_at, "{resumed}");
    assert_eq!(resumed["world_size"], 4, "{resumed}");

    let report = make_report(&run);
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["steps"], until, "{report}");
    assert_ledger_exactly_once(&report);
    assert_eq!(
        report["ledger"]["redone_steps"],
        serde_json::json!([]),
        "a step was lost to the time limit: {}",
        report["ledger"]
    );
    eprintln!(
        "job 1 stopped at step {stopped_at}, job 2 completed step {until}; {:.0?} in all",
        t.elapsed()
    );
}
