//! A job's inputs (datasets, configs), how it is launched, and what its run directory must hold
//! at the end.

use super::{bin, read_jsonl, run, Hosts, Run};
use serde_json::Value;
use std::path::{Path, PathBuf};

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
        "train.eval_sequences=8".into(),
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
eval_sequences = 8
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

/// C-8: what a clean stop must not show: a rank counted as failed or removed, or a new
/// generation (a spare promoted).
pub fn failures_or_regroups(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| {
            ["rank_failed", "rank_removed"].contains(&e["kind"].as_str().unwrap_or(""))
                || (e["kind"] == "generation" && e["generation"] != 1)
        })
        .collect()
}

/// D-4: every committed step's samples were consumed exactly once by the final model's lineage.
pub fn assert_ledger_exactly_once(report: &Value) {
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
    let fin: Vec<&Value> = fps.iter().filter(|f| f["generation"] == last_gen).collect();
    assert_eq!(fin.len(), world, "{fps:?}");
    assert!(
        fin.iter()
            .all(|f| f["state_sha256"] == fin[0]["state_sha256"]),
        "ranks differ: {fin:?}"
    );
}

/// Across simulated hosts, every group's pairs of ranks talk as on real machines: shared memory
/// within a host, TCP between hosts (the `group_links` events, checked against each rank's host).
/// Returns how many TCP links the job's groups had.
pub fn assert_links_follow_hosts(events: &[Value]) -> usize {
    use std::collections::HashMap;
    let links: Vec<&Value> = events
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

/// A JSON file, which must exist and parse.
pub fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// The report in a run directory, or null if the job wrote none (or is writing it).
pub fn read_report(run: &Path) -> Value {
    std::fs::read(run.join("report.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// `phalanx report` on the run directory of a job run without the launcher; the report it wrote.
pub fn make_report(run: &Path) -> Value {
    let out = bin()
        .arg("report")
        .arg(run)
        .arg("--write")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    read_json(&run.join("report.json"))
}

/// A `phalanx launch` run to its end.
pub struct Launched {
    pub code: Option<i32>,
    pub stderr: String,
    /// Null if the launcher wrote none.
    pub report: Value,
    pub run: PathBuf,
}

impl Launched {
    pub fn events(&self) -> Vec<Value> {
        read_jsonl(&self.run.join("events.jsonl"))
    }
    pub fn metrics(&self) -> Vec<Value> {
        read_jsonl(&self.run.join("metrics.jsonl"))
    }
}

/// `phalanx launch --config cfg` from `dir` (whose config puts the run in `dir/run`). The caller
/// holds `serial()`: a job's timing must not be another's noise.
pub fn launch_job(
    dir: &Path,
    cfg: &Path,
    hosts: Hosts,
    args: &[&str],
    env: &[(&str, &str)],
) -> Launched {
    let out = bin()
        .arg("launch")
        .arg("--config")
        .arg(cfg)
        .args(hosts.args())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap();
    let run = dir.join("run");
    Launched {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        report: read_report(&run),
        run,
    }
}
