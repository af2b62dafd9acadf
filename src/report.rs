//! The report of a multi-rank run, built from the run directory: every fault with its
//! detection time, recovery time (fault -> next committed step) and lost steps; ETTR.

use anyhow::Result;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The lines of a JSON-lines file that parse (a torn last line is skipped).
pub(crate) fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The report of a finished or stopped run directory, without the launcher that ran it: the
/// wall time is taken from the first to the last commit, the status from rank 0's final line.
pub fn from_run_dir(run_dir: &Path) -> Result<Value> {
    let path = run_dir.join("metrics.jsonl");
    if !path.exists() {
        anyhow::bail!(
            "no metrics.jsonl in {}: pass a job's run directory (its run.dir)",
            run_dir.display()
        );
    }
    let metrics = jsonl(&path);
    let times: Vec<u64> = metrics
        .iter()
        .filter_map(|m| m["unix_ms"].as_u64())
        .collect();
    let wall = match (times.iter().min(), times.iter().max()) {
        (Some(a), Some(b)) => Duration::from_millis(b - a),
        _ => Duration::ZERO,
    };
    let fin = metrics.iter().find(|m| m["final"] == true);
    let (status, max_steps) = match fin.and_then(|m| m["step"].as_u64()) {
        Some(s) => ("completed", s),
        None => (
            "incomplete",
            metrics
                .iter()
                .filter_map(|m| m["step"].as_u64())
                .max()
                .map_or(0, |s| s + 1),
        ),
    };
    let events = jsonl(&run_dir.join("events.jsonl"));
    summarize(run_dir, &metrics, &events, wall, status, max_steps)
}

pub fn build(run_dir: &Path, wall: Duration, status: &str, max_steps: u64) -> Result<Value> {
    let metrics = jsonl(&run_dir.join("metrics.jsonl"));
    let events = jsonl(&run_dir.join("events.jsonl"));
    summarize(run_dir, &metrics, &events, wall, status, max_steps)
}

fn summarize(
    run_dir: &Path,
    metrics: &[Value],
    events: &[Value],
    wall: Duration,
    status: &str,
    max_steps: u64,
) -> Result<Value> {
    // A step redone after a failure may appear twice; the last commit of a step counts.
    let mut steps: BTreeMap<u64, &Value> = BTreeMap::new();
    let mut final_line = None;
    for m in metrics {
        if m["final"] == true {
            final_line = Some(m);
        } else if m["rollback"] == true {
            // A rollback is not a commit; the steps it undid are committed again after it.
        } else if let Some(s) = m["step"].as_u64() {
            // A restated commit (D-1) carries only the ledger's fields.
            if m["restated"] != true || !steps.contains_key(&s) {
                steps.insert(s, m);
            }
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
        .filter(|e| e["kind"] == "fault_injected" && e["fault"] != "cpu_quota")
        .collect();
    let mut faults = Vec::new();
    // Once the final model is saved the job is over: processes that leave after it (a joiner
    // still healing, a spare stopped by the launcher) cost no step and are no fault of the run.
    let ended_at = final_line.and_then(|f| f["unix_ms"].as_u64());
    for (i, e) in events
        .iter()
        .filter(|e| e["kind"] == "rank_failed")
        .filter(|e| ended_at.is_none_or(|end| e["unix_ms"].as_u64().is_some_and(|t| t <= end)))
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
    // T-2, T-4: steps with a non-finite loss or gradient, the ranks that had it, and what was
    // done: the step skipped, or every rank rolled back to the last checkpoint.
    let mut numerics: Vec<Value> = steps
        .values()
        .filter(|m| m["skipped"] == true)
        .map(|m| json!({"step": m["step"], "ranks": m["nonfinite_ranks"], "action": "skipped"}))
        .collect();
    numerics.extend(metrics.iter().filter(|m| m["rollback"] == true).map(|m| {
        json!({"step": m["step"], "ranks": m["nonfinite_ranks"], "action": "rolled back",
               "to_step": m["to_step"]})
    }));
    numerics.sort_by_key(|n| n["step"].as_u64());
    // Replica checks that found ranks differing from the majority (healed from it).
    let sdc: Vec<Value> = steps
        .values()
        .filter(|m| m["replica_mismatch"].as_array().is_some_and(|a| !a.is_empty()))
        .map(|m| json!({"step": m["step"], "ranks": m["replica_mismatch"], "action": "healed from the majority"}))
        .collect();
    // K-7, K-8: straggler flags, and what was done about them (replaced, or the global batch
    // rebalanced away from them and evened out again).
    let stragglers: Vec<Value> = events
        .iter()
        .filter_map(|e| match e["kind"].as_str() {
            Some("straggler_flagged") => Some(json!({
                "event": "flagged", "member": e["member"], "at_step": e["at_step"],
                "mb_ms": e["mb_ms"], "peers_mb_ms": e["peers_mb_ms"], "window_mb_ms": e["window_mb_ms"],
            })),
            Some("straggler_cleared") => Some(json!({
                "event": "cleared", "member": e["member"], "mb_ms": e["mb_ms"],
                "peers_mb_ms": e["peers_mb_ms"],
            })),
            Some("rank_removed") if e["cause"] == "straggler" => Some(json!({
                "event": "evicted", "member": e["member"], "rank": e["rank"], "reason": e["reason"],
            })),
            Some("generation")
                if e["reason"].as_str().is_some_and(|r| {
                    r.contains("rebalance:") || r.contains("split evenly again")
                }) =>
            {
                Some(json!({
                    "event": if e["shares"].as_array().is_some_and(|a| !a.is_empty()) { "rebalanced" } else { "evened_out" },
                    "generation": e["generation"], "resume_step": e["resume_step"],
                    "shares": e["shares"], "reason": e["reason"],
                }))
            }
            _ => None,
        })
        .collect();
    let ledger = ledger(metrics, events);
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
        "stragglers": stragglers,
        "ledger": ledger,
        "model_dir": run_dir.join("model"),
    }))
}

/// D-1, the sample ledger: from rank 0's commit lines (step, generation, the step's sample
/// positions in its epoch, every rank's share of micro-batches) and the coordinator's
/// generations (the step each resumed at), whether every committed step's samples were
/// consumed exactly once by the lineage of the final model.
///
/// A step committed again in a later generation that resumed at or before it was redone: the
/// ranks that held the first commit were all lost, so the final model saw its samples once.
/// Committed again without such a resume, it is repeated. A step whose shares do not tile the
/// global batch, or whose positions overlap another step's in the same epoch, is a violation.
fn ledger(metrics: &[Value], events: &[Value]) -> Value {
    let resume: BTreeMap<u64, u64> = events
        .iter()
        .filter(|e| e["kind"] == "generation")
        .filter_map(|e| Some((e["generation"].as_u64()?, e["resume_step"].as_u64()?)))
        .collect();
    let mut committed: BTreeMap<u64, (u64, u64, [u64; 2])> = BTreeMap::new();
    let (mut redone, mut repeated, mut bad_shares) = (Vec::new(), Vec::new(), Vec::new());
    let mut micro_batches = None;
    // T-4: the step each committed step was last committed after, by the order of the lines,
    // and the rollbacks seen so far (line index, step rolled back to).
    let mut line_of: BTreeMap<u64, usize> = BTreeMap::new();
    let mut rollbacks: Vec<(usize, u64)> = Vec::new();
    let mut restated: BTreeMap<u64, (u64, u64, [u64; 2])> = BTreeMap::new();
    for (i, m) in metrics
        .iter()
        .enumerate()
        .filter(|(_, m)| m["final"] != true)
    {
        if m["rollback"] == true {
            if let Some(to) = m["to_step"].as_u64() {
                rollbacks.push((i, to));
            }
            continue;
        }
        let (Some(k), Some(g)) = (m["step"].as_u64(), m["generation"].as_u64()) else {
            continue;
        };
        let (Some(epoch), Some(pos)) = (
            m["epoch"].as_u64(),
            m["positions"]
                .as_array()
                .and_then(|p| Some([p.first()?.as_u64()?, p.get(1)?.as_u64()?])),
        ) else {
            continue;
        };
        // A commit restated by the next rank 0 (D-1) only fills a step nobody recorded: if
        // the step is recorded, it is that commit or a later redo of it.
        if m["restated"] == true && committed.contains_key(&k) {
            continue;
        }
        // The original of a commit restated before it: a rank 0 that was stopped, fenced and
        // woken records the step it had committed with the others after the next rank 0
        // restated it. One commit, whichever line came first.
        if restated.get(&k) == Some(&(g, epoch, pos)) {
            restated.remove(&k);
            continue;
        }
        if let Some(&(g0, _, _)) = committed.get(&k) {
            // Rolled back past it since its last commit: the final model saw it once.
            let rolled_back = rollbacks
                .iter()
                .any(|&(at, to)| at > line_of[&k] && to <= k);
            if rolled_back || (g > g0 && resume.get(&g).is_some_and(|&r| r <= k)) {
                redone.push(k);
            } else {
                repeated.push(k);
            }
        }
        // The shares must tile 0..micro-batches, in rank order, without gap or overlap.
        let shares: Vec<[u64; 2]> = m["shares"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some([s.get(0)?.as_u64()?, s.get(1)?.as_u64()?]))
            .collect();
        let tiles = !shares.is_empty()
            && shares[0][0] == 0
            && shares
                .windows(2)
                .all(|w| w[0][1] == w[1][0] && w[0][0] <= w[0][1]);
        let end = shares.last().map(|s| s[1]);
        if !tiles || micro_batches.is_some_and(|n| Some(n) != end) {
            bad_shares.push(k);
        }
        micro_batches = micro_batches.or(end);
        committed.insert(k, (g, epoch, pos));
        line_of.insert(k, i);
        if m["restated"] == true {
            restated.insert(k, (g, epoch, pos));
        } else {
            restated.remove(&k);
        }
    }
    let last = committed.keys().next_back().copied();
    let missing: Vec<u64> = last
        .map(|l| (0..=l).filter(|k| !committed.contains_key(k)).collect())
        .unwrap_or_default();
    // Within an epoch, steps' sample positions must not overlap.
    let mut overlapping = Vec::new();
    let mut by_epoch: BTreeMap<u64, Vec<([u64; 2], u64)>> = BTreeMap::new();
    for (k, (_, e, p)) in &committed {
        by_epoch.entry(*e).or_default().push((*p, *k));
    }
    for v in by_epoch.values_mut() {
        v.sort();
        for w in v.windows(2) {
            if w[1].0[0] < w[0].0[1] {
                overlapping.push(w[1].1);
            }
        }
    }
    let samples: u64 = committed.values().map(|(_, _, p)| p[1] - p[0]).sum();
    json!({
        "exactly_once": missing.is_empty() && repeated.is_empty() && bad_shares.is_empty() && overlapping.is_empty(),
        "steps": committed.len(),
        "samples": samples,
        "redone_steps": redone,
        "missing_steps": missing,
        "repeated_steps": repeated,
        "bad_partition_steps": bad_shares,
        "overlapping_steps": overlapping,
    })
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
    let l = &r["ledger"];
    if l["exactly_once"] == true {
        println!(
            "  sample ledger: {} samples of {} committed steps consumed exactly once ({} step(s) redone after a failure or rollback)",
            l["samples"], l["steps"], l["redone_steps"].as_array().map_or(0, |a| a.len())
        );
    } else if !l.is_null() {
        println!("  sample ledger: NOT exactly once: {l}");
    }
    if let Some(h) = r["halt_reason"].as_str() {
        println!("  halted: {h}");
    }
    for n in r["numerics"].as_array().into_iter().flatten() {
        if n["action"] == "rolled back" {
            println!(
                "  bad numerics: at step {} rolled back to the checkpoint of step {} (non-finite loss or gradient on ranks {})",
                n["step"], n["to_step"], n["ranks"]
            );
        } else {
            println!(
                "  bad numerics: step {} skipped (non-finite loss or gradient on ranks {})",
                n["step"], n["ranks"]
            );
        }
    }
    for n in r["replica_mismatches"].as_array().into_iter().flatten() {
        println!(
            "  replicas differ after step {}: ranks {} healed from the majority",
            n["step"], n["ranks"]
        );
    }
    for s in r["stragglers"].as_array().into_iter().flatten() {
        match s["event"].as_str() {
            Some("flagged") => println!(
                "  straggler: member {} flagged at step {}: {:.1} ms per micro-batch vs {:.1} ms",
                s["member"],
                s["at_step"],
                s["mb_ms"].as_f64().unwrap_or(0.0),
                s["peers_mb_ms"].as_f64().unwrap_or(0.0)
            ),
            Some("cleared") => println!("  straggler: member {} recovered", s["member"]),
            Some("evicted") => println!("  straggler: member {} evicted", s["member"]),
            Some(_) => println!(
                "  global batch split {} from step {}: micro-batches per rank {}",
                if s["event"] == "rebalanced" {
                    "rebalanced"
                } else {
                    "evened out"
                },
                s["resume_step"],
                s["shares"]
            ),
            None => {}
        }
    }
    for f in r["faults"].as_array().into_iter().flatten() {
        println!(
            "  fault: rank {} ({}) in generation {}: detected in {} ms, next committed step after {} ms, lost steps {}, world after {}",
            f["rank"], f["cause"].as_str().unwrap_or(""), f["generation"], f["detection_ms"],
            f["recovery_ms"], f["lost_steps"], f["world_after"]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::ledger;
    use serde_json::{json, Value};

    fn commit(step: u64, gen: u64, world: u64) -> Value {
        // 4 micro-batches of 4 samples per step, 10 steps per epoch.
        let shares: Vec<[u64; 2]> = (0..world)
            .map(|r| [r * 4 / world, (r + 1) * 4 / world])
            .collect();
        json!({"step": step, "generation": gen, "epoch": step / 10,
               "positions": [(step % 10) * 16, (step % 10 + 1) * 16], "shares": shares})
    }

    fn generation(gen: u64, resume: u64) -> Value {
        json!({"kind": "generation", "generation": gen, "resume_step": resume})
    }

    // D-1: a step redone after its first commit was lost is consumed once; across a resize the
    // shares still tile the global batch; across the epoch boundary positions start again.
    #[test]
    fn ledger_accepts_redone_steps_and_resizes() {
        let mut m: Vec<Value> = (0..6).map(|k| commit(k, 1, 4)).collect();
        m.extend((5..14).map(|k| commit(k, 2, 3)));
        let l = ledger(&m, &[generation(1, 0), generation(2, 5)]);
        assert_eq!(l["exactly_once"], true, "{l}");
        assert_eq!(l["redone_steps"], json!([5]));
        assert_eq!(l["samples"], 14 * 16);
    }

    // T-4 + D-1: steps undone by a rollback and trained again are consumed once by the final
    // model; a step committed twice with no rollback past it is still repeated.
    #[test]
    fn ledger_accepts_steps_redone_after_a_rollback() {
        let mut m: Vec<Value> = (0..8).map(|k| commit(k, 1, 2)).collect();
        m.push(json!({"step": 8, "generation": 1, "rollback": true, "to_step": 5}));
        m.extend((5..12).map(|k| commit(k, 1, 2)));
        let l = ledger(&m, &[generation(1, 0)]);
        assert_eq!(l["exactly_once"], true, "{l}");
        assert_eq!(l["redone_steps"], json!([5, 6, 7]));
        m.push(commit(3, 1, 2));
        let l = ledger(&m, &[generation(1, 0)]);
        assert_eq!(l["repeated_steps"], json!([3]), "{l}");
    }

    // D-1: rank 0 stopped after a step's allreduce, fenced, and woken records that step after
    // the next rank 0 restated it; the late original is the same commit, not a repeat. The
    // same line twice more is still a repeat.
    #[test]
    fn a_late_original_of_a_restated_commit_is_one_commit() {
        let mut m: Vec<Value> = (0..30).map(|k| commit(k, 1, 2)).collect();
        let mut restated = commit(30, 1, 2);
        restated["restated"] = json!(true);
        m.push(restated);
        m.extend((31..40).map(|k| commit(k, 2, 1)));
        m.push(commit(30, 1, 2));
        let l = ledger(&m, &[generation(1, 0), generation(2, 31)]);
        assert_eq!(l["exactly_once"], true, "{l}");
        m.push(commit(30, 1, 2));
        let l = ledger(&m, &[generation(1, 0), generation(2, 31)]);
        assert_eq!(l["repeated_steps"], json!([30]), "{l}");
    }

    // D-1 violations are named: a step committed twice without a resume before it, a step
    // missing, and shares that leave a micro-batch out.
    #[test]
    fn ledger_names_repeated_missing_and_partial_steps() {
        let mut m: Vec<Value> = (0..6).map(|k| commit(k, 1, 2)).collect();
        m.push(commit(4, 2, 2));
        m.push(commit(7, 2, 2));
        let mut bad = commit(8, 2, 2);
        bad["shares"] = json!([[0, 1], [2, 4]]);
        m.push(bad);
        let l = ledger(&m, &[generation(1, 0), generation(2, 6)]);
        assert_eq!(l["exactly_once"], false);
        assert_eq!(l["repeated_steps"], json!([4]));
        assert_eq!(l["missing_steps"], json!([6]));
        assert_eq!(l["bad_partition_steps"], json!([8]));
    }
}
