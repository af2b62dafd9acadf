//! The JSON-lines files of a run (`events.jsonl`, `metrics.jsonl`, `fingerprints.jsonl`), read
//! once a job has ended or while it is still writing them.

use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// The lines of a finished JSONL file: it must exist and every line must parse (an empty one,
/// left where a writer ended a line another was writing, is not a line).
pub fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The lines of a JSONL file that another process is writing: none yet if it does not exist,
/// and a line still being written is skipped.
pub fn read_jsonl_now(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Polls a JSONL file that another process is writing until `what` holds of its lines (true)
/// or `secs` pass (false).
pub fn jsonl_until(p: &Path, what: &dyn Fn(&[Value]) -> bool, secs: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if what(&read_jsonl_now(p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The first event of `kind` in an `events.jsonl` being written, waited for up to `timeout`.
pub fn wait_event(events: &Path, kind: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(e) = read_jsonl_now(events)
            .into_iter()
            .find(|e| e["kind"] == kind)
        {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} event; events: {:?}",
            read_jsonl_now(events)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
