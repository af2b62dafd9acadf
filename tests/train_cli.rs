//! `phalanx prepare`, `train`, `sample` and `checkpoint verify` as a user runs them.

mod common;
use common::*;

#[test]
fn prepare_train_sample_end_to_end() {
    let d = test_dir();
    let data = dataset(d.path());
    let meta = read_json(&data.join("meta.json"));
    assert_eq!(meta["tokenizer"], "char");
    assert_eq!(meta["split"], "whole-files");
    let run_dir = d.path().join("run");
    let r = train(d.path(), &small(&data, &run_dir));
    assert!(r.ok(), "train failed: {}", r.stderr());

    let mut metrics = read_jsonl(&run_dir.join("metrics.jsonl"));
    // One schema with multi-rank runs: the last line is the final one, with the validation loss.
    let last = metrics.pop().unwrap();
    assert_eq!(last["final"], true, "{last}");
    assert_eq!(last["step"], 30);
    assert!(last["val_loss"].as_f64().unwrap() > 0.0, "{last}");
    assert!(last["unix_ms"].as_u64().is_some(), "{last}");
    assert_eq!(metrics.len(), 30);
    // T-7: validation at train.eval_interval (10), in the step's own line.
    let vals: Vec<u64> = metrics
        .iter()
        .filter(|m| m["val_loss"].as_f64().is_some())
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(vals, vec![10, 20]);
    for (i, m) in metrics.iter().enumerate() {
        assert_eq!(m["step"], i as u64);
        for k in [
            "loss",
            "lr",
            "tokens_per_s",
            "step_ms",
            "world_size",
            "generation",
            "unix_ms",
        ] {
            assert!(m.get(k).is_some(), "metrics line lacks {k}: {m}");
        }
    }
    let first = metrics[0]["loss"].as_f64().unwrap();
    let last = metrics[29]["loss"].as_f64().unwrap();
    assert!(last < first, "loss did not fall: {first} -> {last}");

    let events = read_jsonl(&run_dir.join("events.jsonl"));
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"run_started"));
    assert_eq!(kinds.last(), Some(&"run_finished"));
    assert!(kinds.contains(&"eval"));

    let report = read_json(&run_dir.join("report.json"));
    assert_eq!(report["status"], "completed");
    assert_eq!(report["steps"], 30);
    assert!(report["final_val_loss"].as_f64().unwrap() > 0.0);
    assert!(report["tokens_per_s"].as_f64().unwrap() > 0.0);
    // Throughput named three ways: over the wall time (start-up and validation included) it
    // is never above the rate over training time; tokens are the committed steps' (30 steps of
    // a global batch of 8 sequences of 32 tokens).
    let (wall, train) = (
        report["tokens_per_s_wall"].as_f64().unwrap(),
        report["tokens_per_s_train"].as_f64().unwrap(),
    );
    assert!(wall > 0.0 && wall <= train, "{report}");
    assert_eq!(report["tokens"].as_f64().unwrap(), 30.0 * 8.0 * 32.0);
    // `phalanx report` prints the report the run wrote and leaves it as it is; --write does not
    // replace it unless forced.
    let before = std::fs::read(run_dir.join("report.json")).unwrap();
    let r = run(&["report", run_dir.to_str().unwrap()], d.path());
    assert!(r.ok(), "{}", r.stderr());
    assert!(
        r.stdout().contains("completed 30 / 30 steps"),
        "{}",
        r.stdout()
    );
    run(&["report", run_dir.to_str().unwrap(), "--write"], d.path())
        .assert_user_error("--write --force");
    assert_eq!(std::fs::read(run_dir.join("report.json")).unwrap(), before);

    let model = run_dir.join("model");
    let v = run(&["checkpoint", "verify", model.to_str().unwrap()], d.path());
    assert!(v.ok(), "{}", v.stderr());
    let s = run(
        &[
            "sample",
            "--checkpoint",
            model.to_str().unwrap(),
            "--prompt",
            "ALL:",
            "--max-new-tokens",
            "40",
            "--device",
            "cpu",
        ],
        d.path(),
    );
    assert!(s.ok(), "{}", s.stderr());
    let text = s.stdout();
    assert!(
        text.starts_with("ALL:") && text.chars().count() >= 44,
        "{text:?}"
    );
}

#[test]
fn same_seed_same_run() {
    let d = test_dir();
    let data = dataset(d.path());
    let losses = |name: &str| {
        let run_dir = d.path().join(name);
        let mut o = small(&data, &run_dir);
        o.push("train.max_steps=8".into());
        let r = train(d.path(), &o);
        assert!(r.ok(), "{}", r.stderr());
        read_jsonl(&run_dir.join("metrics.jsonl"))
            .iter()
            .filter(|m| m["final"] != true)
            .map(|m| m["loss"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(losses("a"), losses("b"));
}

#[test]
fn ctrl_c_stops_after_saving() {
    let d = test_dir();
    let data = dataset(d.path());
    let run_dir = d.path().join("run");
    let mut o = small(&data, &run_dir);
    o.push("train.max_steps=100000".into());
    let cfg = config_file(d.path());
    let mut child = Proc::spawn(
        bin()
            .arg("train")
            .arg("--config")
            .arg(&cfg)
            .args(&o)
            .current_dir(d.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    );
    let metrics = run_dir.join("metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // metrics.jsonl is buffered: wait until training has clearly begun.
    while std::fs::metadata(&metrics).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "training never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    signal(child.pid(), "INT");
    let (status, stderr) = child.wait_with_stderr();
    assert_eq!(status.code(), Some(130), "{stderr}");
    let report = read_json(&run_dir.join("report.json"));
    assert_eq!(report["status"], "interrupted");
    let steps = report["steps"].as_u64().unwrap();
    assert!(steps > 0 && steps < 100000);
    // Every step's line, then the final one, which says the run stopped before its end.
    let lines = read_jsonl(&metrics);
    assert_eq!(lines.len() as u64, steps + 1);
    assert_eq!(
        lines.last().unwrap()["preempted"],
        true,
        "{:?}",
        lines.last()
    );
    let v = run(
        &[
            "checkpoint",
            "verify",
            run_dir.join("model").to_str().unwrap(),
        ],
        d.path(),
    );
    assert!(v.ok(), "{}", v.stderr());
}
