//! The report of a multi-rank run, built from the run directory: every fault with its
//! detection time, recovery time (fault -> next committed step) and lost steps; ETTR.

use anyhow::Result;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn build(run_dir: &Path, wall: Duration, status: &str, max_steps: u64) -> Result<Value> {
    let metrics = jsonl(&run_dir.join("metrics.jsonl"));
    let events = jsonl(&run_dir.join("events.jsonl"));
    // A step redone after a failure may appear twice; the last commit of a step counts.
    let mut steps: BTreeMap<u64, &Value> = BTreeMap::new();
    let mut final_line = None;
    for m in &metrics {
        if m["final"] == true {
            final_line = Some(m);
        } else if let Some(s) = m["step"].as_u64() {
            steps.insert(s, m);
        }
    }
    let productive_ms: f64 = steps.values().filter_map(|m| m["step_ms"].as_f64()).sum();
    let mut tps: Vec<f64> = steps
        .values()
        .filter_map(|m| m["tokens_per_s"].as_f64())
        .collect();
    tps.sort_by(f64::total_cmp);
    let injected: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "fault_injected")
        .collect();
    let mut faults = Vec::new();
    for (i, e) in events
        .iter()
        .filter(|e| e["kind"] == "rank_failed")
        .enumerate()
    {
        let detected = e["unix_ms"].as_u64().unwrap_or(0);
        let gen = e["generation"].as_u64().unwrap_or(0);
        // The fault happened when it was injected, if it was; else detect_ms before detection.
        let fault_at = injected
            .get(i)
            .and_then(|x| x["injected_unix_ms"].as_u64())
            .filter(|&t| t <= detected)
            .unwrap_or_else(|| {
                detected.saturating_sub(e["detect_ms"].as_f64().unwrap_or(0.0) as u64)
            });
        let before = steps
            .values()
            .filter(|m| m["generation"].as_u64() == Some(gen))
            .filter_map(|m| m["step"].as_u64())
            .max();
        let after = steps
            .values()
            .filter(|m| m["generation"].as_u64().is_some_and(|g| g > gen))
            .min_by_key(|m| m["unix_ms"].as_u64().unwrap_or(u64::MAX));
        let recovery_ms = after
            .and_then(|m| m["unix_ms"].as_u64())
            .map(|t| t.saturating_sub(fault_at));
        let first_after = after.and_then(|m| m["step"].as_u64());
        // Committed steps that had to be computed again (0 when only the step in flight was lost).
        let lost = match (before, first_after) {
            (Some(b), Some(f)) => (b + 1).saturating_sub(f),
            _ => 0,
        };
        faults.push(json!({
            "rank": e["rank"], "member": e["member"], "pid": e["pid"], "cause": e["cause"],
            "reason": e["reason"], "generation": gen,
            "detection_ms": detected.saturating_sub(fault_at),
            "recovery_ms": recovery_ms,
            "last_step_before": before, "first_step_after": first_after,
            "lost_steps": lost, "in_flight_step_redone": true,
            "world_after": after.and_then(|m| m["world_size"].as_u64()),
        }));
    }
    // T-2: steps skipped for a non-finite loss or gradient, and the ranks that had it.
    let numerics: Vec<Value> = steps
        .values()
        .filter(|m| m["skipped"] == true)
        .map(|m| json!({"step": m["step"], "ranks": m["nonfinite_ranks"], "action": "skipped"}))
        .collect();
    // Replica checks that found ranks differing from the majority (healed from it).
    let sdc: Vec<Value> = steps
        .values()
        .filter(|m| m["replica_mismatch"].as_array().is_some_and(|a| !a.is_empty()))
        .map(|m| json!({"step": m["step"], "ranks": m["replica_mismatch"], "action": "healed from the majority"}))
        .collect();
    let last = steps.values().next_back();
    let halt_reason = events
        .iter()
        .find(|e| e["kind"] == "halt")
        .map(|e| e["reason"].clone());
    Ok(json!({
        "status": status,
        "halt_reason": halt_reason,
        "steps": steps.keys().next_back().map_or(0, |s| s + 1),
        "max_steps": max_steps,
        "final_train_loss": last.and_then(|m| m["loss"].as_f64()),
        "final_val_loss": final_line.and_then(|m| m["val_loss"].as_f64()),
        "tokens_per_s": tps.get(tps.len() / 2).copied(),
        "wall_s": wall.as_secs_f64(),
        "productive_s": productive_ms / 1e3,
        "ettr": productive_ms / 1e3 / wall.as_secs_f64().max(1e-9),
        "world_size_final": last.and_then(|m| m["world_size"].as_u64()),
        "generation_final": last.and_then(|m| m["generation"].as_u64()),
        "faults": faults,
        "numerics": numerics,
        "replica_mismatches": sdc,
        "model_dir": run_dir.join("model"),
    }))
}

pub fn print(r: &Value) {
    println!(
        "{} {} / {} steps in {:.1} s: train loss {}, val loss {}, {} tokens/s, ETTR {:.3}",
        r["status"].as_str().unwrap_or(""),
        r["steps"],
        r["max_steps"],
        r["wall_s"].as_f64().unwrap_or(0.0),
        r["final_train_loss"]
            .as_f64()
            .map_or("-".into(), |v| format!("{v:.4}")),
        r["final_val_loss"]
            .as_f64()
            .map_or("-".into(), |v| format!("{v:.4}")),
        r["tokens_per_s"]
            .as_f64()
            .map_or("-".into(), |v| format!("{v:.0}")),
        r["ettr"].as_f64().unwrap_or(0.0),
    );
    if let Some(h) = r["halt_reason"].as_str() {
        println!("  halted: {h}");
    }
    for n in r["numerics"].as_array().into_iter().flatten() {
        println!(
            "  bad numerics: step {} skipped (non-finite loss or gradient on ranks {})",
            n["step"], n["ranks"]
        );
    }
    for n in r["replica_mismatches"].as_array().into_iter().flatten() {
        println!(
            "  replicas differ after step {}: ranks {} healed from the majority",
            n["step"], n["ranks"]
        );
    }
    for f in r["faults"].as_array().into_iter().flatten() {
        println!(
            "  fault: rank {} ({}) in generation {}: detected in {} ms, next committed step after {} ms, lost steps {}, world after {}",
            f["rank"], f["cause"].as_str().unwrap_or(""), f["generation"], f["detection_ms"],
            f["recovery_ms"], f["lost_steps"], f["world_after"]
        );
    }
}
