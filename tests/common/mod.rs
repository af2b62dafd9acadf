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

/// The multi-rank tests' job: a tiny model on `dataset`, 16 sequences in 4 micro-batches.
pub fn job_config(dir: &Path, data: &Path) -> PathBuf {
    let p = dir.join("job.toml");
    std::fs::write(
        &p,
        format!(
            r#"[data]
dir = "{}"
[model]
preset = "tiny"
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32
[train]
global_batch = 16
micro_batch = 4
max_steps = 40
device = "cpu"
eval_batches = 2
[optim]
warmup_steps = 5
decay_steps = 40
[run]
dir = "{}"
# These tests are about crashes and hangs. Steps of a few ms on a shared 2-core machine are
# noisy enough to look like stragglers; straggler policy is covered by the coordinator's tests.
[coordinator]
evict_stragglers = false
"#,
            data.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    p
}

/// These tests each run a whole job of 4-5 processes on a 2-core machine; run them one at a
/// time so that one job's timing is not another's noise.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// D-4: every committed step's samples were consumed exactly once by the final model's lineage.
pub fn assert_ledger_exactly_once(report: &serde_json::Value) {
    let l = &report["ledger"];
    assert_eq!(l["exactly_once"], true, "sample ledger: {l}");
    assert_eq!(l["steps"], report["steps"], "sample ledger: {l}");
}

/// G-2: every rank that finished holds the same parameters and optimizer state.
pub fn assert_identical_final_state(run: &Path, world: usize) {
    let fps = read_jsonl(&run.join("fingerprints.jsonl"));
    let last_gen = fps
        .iter()
        .filter_map(|f| f["generation"].as_u64())
        .max()
        .unwrap();
    let fin: Vec<&serde_json::Value> = fps.iter().filter(|f| f["generation"] == last_gen).collect();
    assert_eq!(fin.len(), world, "{fps:?}");
    assert!(
        fin.iter()
            .all(|f| f["state_sha256"] == fin[0]["state_sha256"]),
        "ranks differ: {fin:?}"
    );
}

/// Where a job's ranks run: this host, or two simulated hosts (`phalanx launch --hosts 2`:
/// network, IPC and UTS namespaces on a bridge; needs root).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hosts {
    One,
    Two,
}

impl Hosts {
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Hosts::One => &[],
            Hosts::Two => &["--hosts", "2"],
        }
    }

    /// Whether this machine can place ranks so; a scenario that needs root says it was skipped.
    pub fn available(self) -> bool {
        if self == Hosts::Two && !is_root() {
            eprintln!("skipped: simulated hosts need root (network namespaces, veth, a bridge)");
            return false;
        }
        true
    }
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Across simulated hosts, every group's pairs of ranks talk as on real machines: shared memory
/// within a host, TCP between hosts (the `group_links` events, checked against each rank's host).
/// Returns how many TCP links the job's groups had.
pub fn assert_links_follow_hosts(events: &[serde_json::Value]) -> usize {
    use std::collections::HashMap;
    let links: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "group_links")
        .collect();
    assert!(!links.is_empty(), "no group_links event");
    let host: HashMap<(u64, u64), &str> = links
        .iter()
        .filter_map(|e| {
            Some((
                (e["generation"].as_u64()?, e["rank"].as_u64()?),
                e["host"].as_str()?,
            ))
        })
        .collect();
    let mut tcp = 0;
    for e in &links {
        let g = e["generation"].as_u64().unwrap();
        for l in e["links"].as_array().unwrap() {
            let peer = l["peer"].as_u64().unwrap();
            // A peer that died before it reported its own links has no host here.
            let Some(other) = host.get(&(g, peer)) else {
                continue;
            };
            let want = if Some(*other) == e["host"].as_str() {
                "shared_memory"
            } else {
                tcp += 1;
                "tcp"
            };
            assert_eq!(l["link"], want, "rank {} to rank {peer}: {e}", e["rank"]);
        }
    }
    tcp
}

/// A port free on loopback now (for a process that must bind a known port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends SIG`sig` ("KILL", "STOP", "CONT", "INT") to `pid`; whether it was delivered.
pub fn send_signal(pid: u32, sig: &str) -> bool {
    std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}
