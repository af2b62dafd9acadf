//! Helpers for tests that run the real `phalanx` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_phalanx"));
    c.env("PHALANX_LOG", "warn");
    c
}

pub struct Run {
    pub out: Output,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.out.status.success()
    }
    pub fn code(&self) -> Option<i32> {
        self.out.status.code()
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    /// A user error: exit code 1 with an `error:` line, never a panic.
    pub fn assert_user_error(&self, needle: &str) {
        let err = self.stderr();
        assert_eq!(self.code(), Some(1), "expected exit 1, stderr:\n{err}");
        assert!(err.contains("error:"), "no error line:\n{err}");
        assert!(!err.contains("panicked"), "panicked:\n{err}");
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
}

pub fn run(args: &[&str], cwd: &Path) -> Run {
    let out = bin()
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("phalanx runs");
    Run { out }
}

/// A small corpus of three "plays" and its char-tokenized dataset.
pub fn dataset(dir: &Path) -> PathBuf {
    let src = dir.join("plays");
    std::fs::create_dir_all(&src).unwrap();
    let line =
        "FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n\nALL:\nSpeak, speak.\n\n";
    for (i, name) in ["coriolanus", "tempest", "lear"].iter().enumerate() {
        std::fs::write(src.join(format!("{name}.txt")), line.repeat(150 + 40 * i)).unwrap();
    }
    let out = dir.join("data");
    let r = run(
        &[
            "prepare",
            "--input",
            src.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        dir,
    );
    assert!(r.ok(), "prepare failed: {}", r.stderr());
    out
}

/// Overrides for a model small enough to train in a second.
pub fn small(data: &Path, run_dir: &Path) -> Vec<String> {
    vec![
        format!("data.dir={}", data.display()),
        format!("run.dir={}", run_dir.display()),
        "model.n_layer=1".into(),
        "model.n_head=2".into(),
        "model.n_embd=32".into(),
        "model.block_size=32".into(),
        "train.global_batch=8".into(),
        "train.micro_batch=4".into(),
        "train.max_steps=30".into(),
        "train.threads=1".into(),
        "train.device=cpu".into(),
        "train.eval_interval=10".into(),
        "train.eval_batches=2".into(),
        "optim.warmup_steps=5".into(),
        "optim.decay_steps=30".into(),
    ]
}

pub fn config_file(dir: &Path) -> PathBuf {
    let p = dir.join("job.toml");
    std::fs::write(&p, "[model]\npreset = \"tiny\"\n").unwrap();
    p
}

pub fn train(dir: &Path, extra: &[String]) -> Run {
    let cfg = config_file(dir);
    let mut args = vec![
        "train".to_string(),
        "--config".into(),
        cfg.display().to_string(),
    ];
    args.extend(extra.iter().cloned());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&a, dir)
}

pub fn read_jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The bundled Shakespeare corpus, tokenized by characters, into `dir/data`.
pub fn shakespeare_char(dir: &Path) -> PathBuf {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/shakespeare");
    let out = dir.join("data");
    let r = run(
        &[
            "prepare",
            "--tokenizer",
            "char",
            "--input",
            corpus.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        dir,
    );
    assert!(r.ok(), "prepare failed: {}", r.stderr());
    out
}
