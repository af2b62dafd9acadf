//! The README's commands, run as written: the quick tour's lines in order (with small step
//! counts), and the admin commands against a live job. A README that drifts from the command
//! line fails here, not in a newcomer's terminal.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The lines of the first ```sh block after `heading`.
fn sh_block(text: &str, heading: &str) -> Vec<String> {
    let from = text
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let body = &text[from..];
    let start = body.find("```sh\n").expect("a sh block") + 6;
    let end = start + body[start..].find("```").expect("the block ends");
    body[start..end].lines().map(str::to_string).collect()
}

/// A README line with its step counts made small; `launches` counts the `launch` lines so far
/// (a resumed job must train further than the one it continues).
fn small(line: &str, launches: usize) -> String {
    let mut words: Vec<String> = Vec::new();
    let mut it = line.split(' ').peekable();
    while let Some(w) = it.next() {
        match w {
            w if w.starts_with("train.max_steps=") => words.push("train.max_steps=20".into()),
            "--steps" | "--runs" => {
                it.next();
                words.push(w.into());
                words.push(if w == "--steps" { "4" } else { "1" }.into());
            }
            w => words.push(w.into()),
        }
    }
    if line.contains(" launch ") {
        words.push(format!("train.max_steps={}", 20 * launches));
    }
    words.join(" ")
}

/// Runs `line` with bash in `dir`, `$phalanx` and a leading `phalanx` being the binary.
fn sh(dir: &Path, line: &str) -> std::process::Output {
    let bin = env!("CARGO_BIN_EXE_phalanx");
    let line = match line.strip_prefix("phalanx ") {
        Some(rest) => format!("$phalanx {rest}"),
        None => line.to_string(),
    };
    Command::new("bash")
        .arg("-c")
        .arg(format!("set -e; phalanx={bin}; {line}"))
        .env("PHALANX_LOG", "warn")
        .current_dir(dir)
        .output()
        .unwrap()
}

/// A folder laid out like a checkout: the configs and the corpus the commands name.
fn checkout_like() -> TestDir {
    let d = test_dir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in ["configs", "corpus"] {
        std::os::unix::fs::symlink(root.join(f), d.path().join(f)).unwrap();
    }
    d
}

#[test]
fn the_quick_tour_runs_as_written() {
    let _one_at_a_time = serial();
    let d = checkout_like();
    let mut launches = 0;
    let mut ran = 0;
    for line in sh_block(&readme(), "## Quick tour") {
        let line = line.split(" #").next().unwrap().trim();
        // The first two lines set up a shell for cargo and name the binary; here the binary is
        // the one under test.
        if !line.starts_with("$phalanx ") {
            continue;
        }
        launches += usize::from(line.contains(" launch "));
        let cmd = small(line, launches);
        let out = sh(d.path(), &cmd);
        assert!(
            out.status.success(),
            "README line failed: {line}\nran: {cmd}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    assert!(ran >= 8, "only {ran} commands in the quick tour");
    // The campaign went on from the first job: the resumed one trained its steps on 3 ranks.
    let report = read_json(&d.path().join("runs/campaign/report.json"));
    assert_eq!(report["steps"], 40, "{report}");
    assert_ledger_exactly_once(&report);
}

#[test]
fn the_admin_commands_run_as_written_against_a_live_job() {
    let _one_at_a_time = serial();
    let d = checkout_like();
    let admin: Vec<String> = sh_block(&readme(), "you can watch and resize a running job")
        .into_iter()
        .map(|l| l.split(" #").next().unwrap().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(admin.len(), 3, "{admin:?}");
    let prep = sh(
        d.path(),
        "$phalanx prepare --tokenizer char --out data/shakespeare-char",
    );
    assert!(
        prep.status.success(),
        "{}",
        String::from_utf8_lossy(&prep.stderr)
    );
    // A job the commands can act on: 3 ranks and a spare, so that `scale --target 4` promotes it
    // and `drain --rank 3` has a rank 3.
    let mut job = Proc::spawn(
        bin()
            .args(["launch", "--world", "3", "--spares", "1", "--config"])
            .arg("configs/shakespeare-char.toml")
            .args(["run.dir=runs/demo", "train.max_steps=100000"])
            .current_dir(d.path()),
    );
    let url = d.path().join("runs/demo/coordinator.url");
    let t = Instant::now();
    while !url.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the job never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let world_is = |n: &str| {
        let t = Instant::now();
        loop {
            let out = sh(d.path(), "$phalanx status --run-dir runs/demo --json");
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            if s.contains(&format!("\"world\": {n}")) || s.contains(&format!("\"world\":{n}")) {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "world never {n}: {s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    world_is("3");
    for (line, world_after) in admin.iter().zip(["3", "4", "3"]) {
        let out = sh(d.path(), line);
        assert!(
            out.status.success(),
            "README line failed: {line}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        world_is(world_after);
    }
    signal(job.pid(), "TERM");
    assert_eq!(
        job.wait_exit(Duration::from_secs(90)),
        Some(6),
        "preempted on SIGTERM"
    );
}
