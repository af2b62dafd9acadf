//! The report of a multi-rank run, built from the run directory: every fault with its
//! detection time, recovery time (fault -> next committed step) and lost steps; ETTR.

use anyhow::{Context, Result};
use phalanx_runtime::coordinator::core::StragglerAct;
use phalanx_runtime::events::{self, Cause, Event, FaultKind, Record};
use phalanx_runtime::metrics::{self, FinalLine, MetricLine, RollbackCause, StepLine};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The records of a run directory's event log that parse.
pub(crate) fn events_in(run_dir: &Path) -> Vec<Record> {
    let text = std::fs::read_to_string(run_dir.join("events.jsonl")).unwrap_or_default();
    events::read(&text).0
}

/// The lines of a run directory's metrics log that parse.
pub(crate) fn metrics_in(run_dir: &Path) -> Vec<MetricLine> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
    metrics::read(&text).0
}

/// The last final line: a campaign's earlier jobs (C-6) ended with their own.
fn final_line(metrics: &[MetricLine]) -> Option<&FinalLine> {
    metrics.iter().rev().find_map(|m| match m {
        MetricLine::Final(f) => Some(f),
        _ => None,
    })
}

/// `phalanx report`: the report the job wrote, read, never rebuilt from less; else one built
/// from the records, written only when asked (`write`), and over an existing one only with
/// `force`.
pub fn for_cli(run_dir: &Path, write: bool, force: bool) -> Result<Value> {
    let path = run_dir.join("report.json");
    if path.exists() && !(write && force) {
        if write {
            anyhow::bail!(
                "{} exists (the job wrote it); `phalanx report {}` prints it, and --write \
                 --force rebuilds it from metrics.jsonl and events.jsonl",
                path.display(),
                run_dir.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a report; `phalanx report {} --write --force` rebuilds it",
                path.display(),
                run_dir.display()
            )
        });
    }
    let r = from_run_dir(run_dir)?;
    if write {
        std::fs::write(&path, serde_json::to_vec_pretty(&r)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(r)
}

/// When the run directory's last job started: its resume line (C-6), else the beginning.
fn job_start_ms(metrics: &[MetricLine]) -> u64 {
    metrics
        .iter()
        .rev()
        .find_map(|m| match m {
            MetricLine::Resume(r) => Some(r.unix_ms),
            _ => None,
        })
        .unwrap_or(0)
}

/// The report of a finished or stopped run directory, without the launcher that ran it: the
/// wall time is taken from the first to the last commit of its last job, the status from rank
/// 0's final line.
pub fn from_run_dir(run_dir: &Path) -> Result<Value> {
    let path = run_dir.join("metrics.jsonl");
    if !path.exists() {
        anyhow::bail!(
            "no metrics.jsonl in {}: pass a job's run directory (its run.dir)",
            run_dir.display()
        );
    }
    let metrics = metrics_in(run_dir);
    let started = job_start_ms(&metrics);
    let times: Vec<u64> = metrics
        .iter()
        .filter_map(|m| match m {
            MetricLine::Step(s) => s.unix_ms,
            MetricLine::Final(f) => Some(f.unix_ms),
            MetricLine::Rollback(r) => Some(r.unix_ms),
            MetricLine::Resume(r) => Some(r.unix_ms),
        })
        .filter(|&t| t >= started)
        .collect();
    let wall = match (times.iter().min(), times.iter().max()) {
        (Some(a), Some(b)) => Duration::from_millis(b - a),
        _ => Duration::ZERO,
    };
    let (status, max_steps) = match final_line(&metrics) {
        Some(f) if f.preempted => ("preempted", f.step),
        Some(f) => ("completed", f.step),
        None => (
            "incomplete",
            metrics
                .iter()
                .filter_map(|m| match m {
                    MetricLine::Step(s) => Some(s.step),
                    _ => None,
                })
                .max()
                .map_or(0, |s| s + 1),
        ),
    };
    build(run_dir, wall, status, max_steps)
}

pub fn build(run_dir: &Path, wall: Duration, status: &str, max_steps: u64) -> Result<Value> {
    let metrics = metrics_in(run_dir);
    let text = std::fs::read_to_string(run_dir.join("events.jsonl")).unwrap_or_default();
    let (events, unreadable) = events::read(&text);
    let mut r = summarize(run_dir, &metrics, &events, wall, status, max_steps)?;
    r["unreadable_event_lines"] = json!(unreadable);
    r["memory"] = json!(memory(run_dir));
    Ok(r)
}

/// Z-5: each rank's training-state memory, as it last recorded it (at the end of the job, or
/// when it last joined a generation): the newest generation's ranks only.
pub fn memory(run_dir: &Path) -> Vec<metrics::MemoryLine> {
    let text = std::fs::read_to_string(run_dir.join("memory.jsonl")).unwrap_or_default();
    let lines: Vec<metrics::MemoryLine> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let Some(last) = lines.iter().map(|m| m.generation).max() else {
        return Vec::new();
    };
    let mut by_rank: BTreeMap<u32, metrics::MemoryLine> = BTreeMap::new();
    for m in lines.into_iter().filter(|m| m.generation == last) {
        by_rank.insert(m.rank, m);
    }
    by_rank.into_values().collect()
}

/// The last commit of each step (a step redone after a failure may appear twice; a restated
/// commit, D-4, only fills a step nobody recorded).
fn last_commits(metrics: &[MetricLine]) -> BTreeMap<u64, &StepLine> {
    let mut steps: BTreeMap<u64, &StepLine> = BTreeMap::new();
    for m in metrics {
        if let MetricLine::Step(s) = m {
            if !s.restated || !steps.contains_key(&s.step) {
                steps.insert(s.step, s);
            }
        }
    }
    steps
}

/// Every rank failure before the end, with its detection time, recovery time (fault -> next
/// committed step) and lost steps.
fn faults(
    steps: &BTreeMap<u64, &StepLine>,
    events: &[Record],
    ended_at: Option<u64>,
) -> Vec<Value> {
    let injected: Vec<u64> = events
        .iter()
        .filter_map(|e| match &e.event {
            // Faults that fail no rank are no rank failure's cause.
            Event::FaultInjected(f)
                if !matches!(
                    f.fault,
                    FaultKind::CpuQuota
                        | FaultKind::CoordinatorKill
                        | FaultKind::DiskFull
                        | FaultKind::CheckpointCorrupt
                        | FaultKind::SlowLink
                ) =>
            {
                Some(f.injected_unix_ms)
            }
            _ => None,
        })
        .collect();
    // Once the final model is saved the job is over: processes that leave after it (a joiner
    // still healing, a spare stopped by the launcher) cost no step and are no fault of the run.
    let failed = events.iter().filter_map(|e| match &e.event {
        Event::RankFailed(f) if ended_at.is_none_or(|end| e.unix_ms <= end) => Some((e.unix_ms, f)),
        _ => None,
    });
    let mut out = Vec::new();
    for (i, (detected, e)) in failed.enumerate() {
        let gen = e.generation.0;
        // The fault happened when it was injected, if it was; else detect_ms before detection.
        let fault_at = injected
            .get(i)
            .copied()
            .filter(|&t| t <= detected)
            .unwrap_or_else(|| detected.saturating_sub(e.detect_ms.unwrap_or(0.0) as u64));
        let before = steps
            .values()
            .filter(|m| m.generation == gen)
            .map(|m| m.step)
            .max();
        let after = steps
            .values()
            .filter(|m| m.generation > gen)
            .min_by_key(|m| m.unix_ms.unwrap_or(u64::MAX));
        let recovery_ms = after
            .and_then(|m| m.unix_ms)
            .map(|t| t.saturating_sub(fault_at));
        let first_after = after.map(|m| m.step);
        // Committed steps that had to be computed again (0 when only the step in flight was lost).
        let lost = match (before, first_after) {
            (Some(b), Some(f)) => (b + 1).saturating_sub(f),
            _ => 0,
        };
        out.push(json!({
            "rank": e.rank, "member": e.member, "pid": e.pid, "cause": e.cause,
            "reason": e.reason, "generation": gen,
            "detection_ms": detected.saturating_sub(fault_at),
            "recovery_ms": recovery_ms,
            "last_step_before": before, "first_step_after": first_after,
            "lost_steps": lost, "in_flight_step_redone": true,
            "world_after": after.map(|m| m.world_size),
        }));
    }
    out
}

/// From the start of the job's first committed step to its last commit: the stretch in which
/// time is either training or lost to what interrupts it, without the start (processes, libtorch,
/// the first group) and the end (evaluation, the model's save), whose share of a short run
/// changes with the machine's speed.
fn training_window_ms(this_job: &[&StepLine]) -> Option<f64> {
    let first = this_job.first()?;
    let start = first.unix_ms? as f64 - first.step_ms?;
    let end = this_job.last()?.unix_ms? as f64;
    (end > start).then_some(end - start)
}

fn summarize(
    run_dir: &Path,
    metrics: &[MetricLine],
    events: &[Record],
    wall: Duration,
    status: &str,
    max_steps: u64,
) -> Result<Value> {
    let steps = last_commits(metrics);
    let final_line = final_line(metrics);
    // A resumed job's metrics hold the campaign's earlier jobs too (C-6): its time and tokens
    // are the steps it committed itself, after its resume line.
    let started = job_start_ms(metrics);
    let this_job: Vec<&StepLine> = steps
        .values()
        .copied()
        .filter(|m| m.unix_ms.is_none_or(|t| t >= started))
        .collect();
    let productive_ms: f64 = this_job.iter().filter_map(|m| m.step_ms).sum();
    let window_ms = training_window_ms(&this_job);
    let mut tps: Vec<f64> = this_job.iter().filter_map(|m| m.tokens_per_s).collect();
    tps.sort_by(f64::total_cmp);
    // Every step trains the same global batch: its tokens are any committed step's rate times
    // its time. Counted over committed steps, so a redone step counts once.
    let tokens: f64 = this_job
        .iter()
        .filter(|m| !m.skipped)
        .filter_map(|m| Some(m.tokens_per_s? * m.step_ms? / 1e3))
        .sum();
    let faults = faults(&steps, events, final_line.map(|f| f.unix_ms));
    // T-2, T-4: steps with a non-finite loss or gradient, the ranks that had it, and what was
    // done: the step skipped, or every rank rolled back to the last checkpoint.
    let mut numerics: Vec<Value> = steps
        .values()
        .filter(|m| m.skipped)
        .map(|m| json!({"step": m.step, "ranks": m.nonfinite_ranks, "action": "skipped"}))
        .collect();
    numerics.extend(metrics.iter().filter_map(|m| match m {
        MetricLine::Rollback(r) if r.cause == RollbackCause::Nonfinite => {
            Some(json!({"step": r.step, "ranks": r.nonfinite_ranks,
                        "action": "rolled back", "to_step": r.to_step}))
        }
        _ => None,
    }));
    numerics.sort_by_key(|n| n["step"].as_u64());
    // Z-3: returns to the last checkpoint because optimizer moments were lost with every
    // rank that held them.
    let shard_losses: Vec<Value> = metrics
        .iter()
        .filter_map(|m| match m {
            MetricLine::Rollback(r) if r.cause != RollbackCause::Nonfinite => Some(json!({
                "step": r.step, "to_step": r.to_step, "generation": r.generation,
                "restored_from": if r.cause == RollbackCause::ShardFromReplica {
                    "replicas in memory" } else { "checkpoint" }})),
            _ => None,
        })
        .collect();
    // Replica checks that found ranks differing from the majority (healed from it).
    let sdc: Vec<Value> = steps
        .values()
        .filter(|m| !m.replica_mismatch.is_empty())
        .map(|m| json!({"step": m.step, "ranks": m.replica_mismatch, "action": "healed from the majority"}))
        .collect();
    let stragglers: Vec<Value> = events
        .iter()
        .filter_map(|e| straggler_line(&e.event))
        .collect();
    let ledger = ledger(metrics, &resume_steps(events));
    let last = steps.values().next_back();
    let halt_reason = events.iter().find_map(|e| match &e.event {
        Event::Halt { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    Ok(json!({
        "status": status,
        "halt_reason": halt_reason,
        "steps": steps.keys().next_back().map_or(0, |s| s + 1),
        "max_steps": max_steps,
        "final_train_loss": last.and_then(|m| m.loss),
        "final_val_loss": final_line.and_then(|m| m.val_loss),
        "peer_lost_at_end": final_line.and_then(|m| m.peer_lost_at_end.clone()),
        "tokens_per_s": tps.get(tps.len() / 2).copied(),
        "tokens": tokens,
        "tokens_per_s_wall": tokens / wall.as_secs_f64().max(1e-9),
        "tokens_per_s_train": tokens / (productive_ms / 1e3).max(1e-9),
        "wall_s": wall.as_secs_f64(),
        "productive_s": productive_ms / 1e3,
        "ettr": productive_ms / 1e3 / wall.as_secs_f64().max(1e-9),
        "training_window_s": window_ms.map(|w| w / 1e3),
        "ettr_in_training": window_ms.map(|w| (productive_ms / w.max(1e-9)).min(1.0)),
        "world_size_final": last.map(|m| m.world_size),
        "generation_final": last.map(|m| m.generation),
        "faults": faults,
        "coordinator_outages": coordinator_outages(&steps, events),
        "numerics": numerics,
        "optimizer_shards_lost": shard_losses,
        "replica_mismatches": sdc,
        "stragglers": stragglers,
        "ledger": ledger,
        // Only a model that was written (a stopped job saved none; its checkpoint is listed).
        "model_dir": run_dir.join("model").join(phalanx_checkpoint::MANIFEST).is_file().then(|| run_dir.join("model")),
        "last_checkpoint": phalanx_checkpoint::sharded::saves(&run_dir.join("checkpoints"))
            .into_iter()
            .find(|s| s.2)
            .map(|s| s.1),
    }))
}

/// K-5: each time the coordinator was killed: how long it was down (to its restart from the
/// journal), the steps the ranks committed meanwhile, and how many rejoined in their places.
fn coordinator_outages(steps: &BTreeMap<u64, &StepLine>, events: &[Record]) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let Event::FaultInjected(f) = &e.event else {
            continue;
        };
        if f.fault != FaultKind::CoordinatorKill {
            continue;
        }
        let killed = f.injected_unix_ms;
        let later = &events[i + 1..];
        let restarted = later.iter().find_map(|r| match r.event {
            Event::CoordinatorRestarted(_) => Some(r.unix_ms),
            _ => None,
        });
        let rejoined = later
            .iter()
            .filter(|r| matches!(r.event, Event::Rejoined(_)))
            .filter(|r| restarted.is_some_and(|t| r.unix_ms >= t && r.unix_ms < t + 30_000))
            .count();
        let committed_while_down = steps
            .values()
            .filter_map(|m| m.unix_ms)
            .filter(|&t| t > killed && restarted.is_none_or(|r| t < r))
            .count();
        out.push(json!({
            "killed_unix_ms": killed,
            "down_ms": restarted.map(|r| r.saturating_sub(killed)),
            "steps_committed_while_down": committed_while_down,
            "ranks_rejoined": rejoined,
        }));
    }
    out
}

/// K-7, K-8: a straggler flag, and what was done about it (replaced, or the global batch
/// rebalanced away from it and evened out again), read from the events' types.
fn straggler_line(e: &Event) -> Option<Value> {
    match e {
        Event::StragglerFlagged(f) => Some(json!({
            "event": "flagged", "member": f.member, "at_step": f.at_step,
            "mb_ms": f.mb_ms, "peers_mb_ms": f.peers_mb_ms, "window_mb_ms": f.window_mb_ms,
        })),
        Event::StragglerCleared {
            member,
            mb_ms,
            peers_mb_ms,
        } => Some(json!({
            "event": "cleared", "member": member, "mb_ms": mb_ms, "peers_mb_ms": peers_mb_ms,
        })),
        Event::RankRemoved(r) if r.cause == Cause::Straggler => Some(json!({
            "event": "evicted", "member": r.member, "rank": r.rank, "reason": r.reason,
        })),
        Event::Generation(g) => {
            let event = match g.straggler? {
                StragglerAct::Rebalanced(_) => "rebalanced",
                StragglerAct::EvenedOut => "evened_out",
                StragglerAct::Evicted(_) => return None,
            };
            Some(json!({
                "event": event, "generation": g.generation, "resume_step": g.resume_step,
                "shares": g.shares, "reason": g.reason,
            }))
        }
        _ => None,
    }
}

/// The step each generation resumed at.
fn resume_steps(events: &[Record]) -> BTreeMap<u64, u64> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::Generation(g) => Some((g.generation.0, g.resume_step.0)),
            _ => None,
        })
        .collect()
}

/// D-4, the sample ledger: from rank 0's commit lines (step, generation, the step's sample
/// positions in its epoch, every rank's share of micro-batches) and the coordinator's
/// generations (the step each resumed at), whether every committed step's samples were
/// consumed exactly once by the lineage of the final model.
///
/// A step committed again in a later generation that resumed at or before it was redone: the
/// ranks that held the first commit were all lost, so the final model saw its samples once.
/// Committed again without such a resume, it is repeated. A step whose shares do not tile the
/// global batch, or whose positions overlap another step's in the same epoch, is a violation.
fn ledger(metrics: &[MetricLine], resume: &BTreeMap<u64, u64>) -> Value {
    let mut committed: BTreeMap<u64, (u64, u64, [u64; 2])> = BTreeMap::new();
    let (mut redone, mut repeated, mut bad_shares) = (Vec::new(), Vec::new(), Vec::new());
    let mut micro_batches = None;
    // T-4: the step each committed step was last committed after, by the order of the lines,
    // and the rollbacks seen so far (line index, step rolled back to).
    let mut line_of: BTreeMap<u64, usize> = BTreeMap::new();
    let mut rollbacks: Vec<(usize, u64)> = Vec::new();
    let mut restated: BTreeMap<u64, (u64, u64, [u64; 2])> = BTreeMap::new();
    for (i, m) in metrics.iter().enumerate() {
        let m = match m {
            MetricLine::Rollback(r) => {
                rollbacks.push((i, r.to_step));
                continue;
            }
            // A job resumed from a checkpoint goes back to its step, as a rollback does.
            MetricLine::Resume(r) => {
                rollbacks.push((i, r.step));
                continue;
            }
            MetricLine::Final(_) => continue,
            MetricLine::Step(s) => s,
        };
        let (k, g) = (m.step, m.generation);
        let (Some(epoch), Some(pos)) = (m.epoch, m.positions) else {
            continue;
        };
        // A commit restated by the next rank 0 (D-4) only fills a step nobody recorded: if
        // the step is recorded, it is that commit or a later redo of it.
        if m.restated && committed.contains_key(&k) {
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
        let shares = &m.shares;
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
        if m.restated {
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

/// One line for the ranks' training-state memory (Z-5), when the run recorded it.
fn print_memory(r: &Value) {
    let Ok(m) = serde_json::from_value::<Vec<metrics::MemoryLine>>(r["memory"].clone()) else {
        return;
    };
    let Some(first) = m.first() else {
        return;
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let most = |f: fn(&metrics::MemoryLine) -> u64| m.iter().map(f).max().unwrap_or(0);
    outln!(
        "  memory per rank: parameters {:.2} MiB, gradients {:.2} MiB, optimizer up to {:.2} MiB, replicas up to {:.2} MiB, peak RSS up to {} MiB",
        mib(first.params_bytes),
        mib(first.grads_bytes),
        mib(most(|l| l.optimizer_bytes)),
        mib(most(|l| l.replica_bytes)),
        most(|l| l.peak_rss_kib.unwrap_or(0)) / 1024
    );
}

pub fn print(r: &Value) {
    let num = |k: &str, digits: usize| {
        r[k].as_f64()
            .map_or("-".into(), |v| format!("{v:.digits$}"))
    };
    outln!(
        "{} {} / {} steps in {:.1} s: train loss {}, val loss {}, ETTR {:.3}",
        r["status"].as_str().unwrap_or(""),
        r["steps"],
        r["max_steps"],
        r["wall_s"].as_f64().unwrap_or(0.0),
        num("final_train_loss", 4),
        num("final_val_loss", 4),
        r["ettr"].as_f64().unwrap_or(0.0),
    );
    outln!(
        "  tokens/s: {} over the wall time, {} over training time, {} in the median step",
        num("tokens_per_s_wall", 0),
        num("tokens_per_s_train", 0),
        num("tokens_per_s", 0),
    );
    let l = &r["ledger"];
    if l["exactly_once"] == true {
        outln!(
            "  sample ledger: {} samples of {} committed steps consumed exactly once ({} redone after a failure or rollback)",
            l["samples"],
            l["steps"],
            crate::output::count(l["redone_steps"].as_array().map_or(0, |a| a.len()) as u64, "step")
        );
    } else if !l.is_null() {
        outln!("  sample ledger: NOT exactly once: {l}");
    }
    print_memory(r);
    if let Some(h) = r["halt_reason"].as_str() {
        outln!("  halted: {h}");
    }
    for n in r["numerics"].as_array().into_iter().flatten() {
        if n["action"] == "rolled back" {
            outln!(
                "  bad numerics: at step {} rolled back to the checkpoint of step {} (non-finite loss or gradient on ranks {})",
                n["step"], n["to_step"], n["ranks"]
            );
        } else {
            outln!(
                "  bad numerics: step {} skipped (non-finite loss or gradient on ranks {})",
                n["step"],
                n["ranks"]
            );
        }
    }
    for n in r["replica_mismatches"].as_array().into_iter().flatten() {
        outln!(
            "  replicas differ after step {}: ranks {} healed from the majority",
            n["step"],
            n["ranks"]
        );
    }
    for s in r["stragglers"].as_array().into_iter().flatten() {
        match s["event"].as_str() {
            Some("flagged") => outln!(
                "  straggler: member {} flagged at step {}: {:.1} ms per micro-batch vs {:.1} ms",
                s["member"],
                s["at_step"],
                s["mb_ms"].as_f64().unwrap_or(0.0),
                s["peers_mb_ms"].as_f64().unwrap_or(0.0)
            ),
            Some("cleared") => outln!("  straggler: member {} recovered", s["member"]),
            Some("evicted") => outln!("  straggler: member {} evicted", s["member"]),
            Some(_) => outln!(
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
    for o in r["coordinator_outages"].as_array().into_iter().flatten() {
        outln!(
            "  coordinator: down {} ms (killed, started again from its journal); {} steps committed meanwhile, {} ranks rejoined",
            o["down_ms"], o["steps_committed_while_down"], o["ranks_rejoined"]
        );
    }
    for f in r["faults"].as_array().into_iter().flatten() {
        outln!(
            "  fault: rank {} ({}) in generation {}: detected in {} ms, next committed step after {} ms, lost steps {}, world after {}",
            f["rank"], f["cause"].as_str().unwrap_or(""), f["generation"], f["detection_ms"],
            f["recovery_ms"], f["lost_steps"], f["world_after"]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::ledger;
    use phalanx_runtime::metrics::{MetricLine, RollbackCause, RollbackLine, StepLine};
    use serde_json::json;
    use std::collections::BTreeMap;

    fn line(step: u64, gen: u64, world: u64) -> StepLine {
        // 4 micro-batches of 4 samples per step, 10 steps per epoch.
        StepLine {
            step,
            generation: gen,
            world_size: world as usize,
            epoch: Some(step / 10),
            positions: Some([(step % 10) * 16, (step % 10 + 1) * 16]),
            shares: (0..world)
                .map(|r| [r * 4 / world, (r + 1) * 4 / world])
                .collect(),
            ..StepLine::default()
        }
    }

    /// A one-rank step of 1 s committed at `t` ms.
    fn at(step: u64, t: u64) -> MetricLine {
        let mut l = line(step, 1, 1);
        l.unix_ms = Some(t);
        l.step_ms = Some(1000.0);
        l.tokens_per_s = Some(100.0);
        MetricLine::Step(l)
    }

    fn commit(step: u64, gen: u64, world: u64) -> MetricLine {
        MetricLine::Step(line(step, gen, world))
    }

    /// The step each generation resumed at.
    fn resumed(at: &[(u64, u64)]) -> BTreeMap<u64, u64> {
        at.iter().copied().collect()
    }

    // D-4: a step redone after its first commit was lost is consumed once; across a resize the
    // shares still tile the global batch; across the epoch boundary positions start again.
    // C-6: a resumed job's report counts its own time and steps, not the campaign's: the first
    // job's 10 s of steps are not this job's (a report once said ETTR 1.032).
    #[test]
    fn a_resumed_job_reports_its_own_time() {
        let d = tempfile::tempdir().unwrap();
        let mut m: Vec<MetricLine> = (0..10).map(|k| at(k, 1_000 * (k + 1))).collect();
        m.push(MetricLine::Resume(phalanx_runtime::metrics::ResumeLine {
            resume: true,
            step: 8,
            checkpoint: "step-8".into(),
            world_size: 1,
            skipped: vec![],
            unix_ms: 20_000,
        }));
        m.extend((8..12).map(|k| at(k, 20_000 + 1_000 * (k - 7))));
        let wall = std::time::Duration::from_secs(5);
        let r = super::summarize(d.path(), &m, &[], wall, "completed", 12).unwrap();
        assert_eq!(r["productive_s"], 4.0, "{r}");
        assert_eq!(r["ettr"], 0.8, "{r}");
        assert_eq!(r["steps"], 12, "{r}");
        // Its steps ran back to back from 20 s to 24 s: all of its training window is steps.
        assert_eq!(r["training_window_s"], 4.0, "{r}");
        assert_eq!(r["ettr_in_training"], 1.0, "{r}");
    }

    // What a fault costs between two steps counts against the training window; what the job
    // spends before its first step and after its last (start, evaluation, save) does not.
    #[test]
    fn the_training_window_holds_the_gaps_between_steps_not_the_start() {
        let d = tempfile::tempdir().unwrap();
        // Steps end at 11, 12, 13 s; a 2 s outage; steps end at 16, 17 s.
        let m: Vec<MetricLine> = [11, 12, 13, 16, 17]
            .iter()
            .enumerate()
            .map(|(k, t)| at(k as u64, t * 1000))
            .collect();
        let wall = std::time::Duration::from_secs(20);
        let r = super::summarize(d.path(), &m, &[], wall, "completed", 5).unwrap();
        assert_eq!(r["ettr"], 0.25, "{r}");
        assert_eq!(r["training_window_s"], 7.0, "{r}");
        assert_eq!(r["ettr_in_training"], 5.0 / 7.0, "{r}");
    }

    #[test]
    fn ledger_accepts_redone_steps_and_resizes() {
        let mut m: Vec<MetricLine> = (0..6).map(|k| commit(k, 1, 4)).collect();
        m.extend((5..14).map(|k| commit(k, 2, 3)));
        let l = ledger(&m, &resumed(&[(1, 0), (2, 5)]));
        assert_eq!(l["exactly_once"], true, "{l}");
        assert_eq!(l["redone_steps"], json!([5]));
        assert_eq!(l["samples"], 14 * 16);
    }

    // T-4 + D-4: steps undone by a rollback and trained again are consumed once by the final
    // model; a step committed twice with no rollback past it is still repeated.
    #[test]
    fn ledger_accepts_steps_redone_after_a_rollback() {
        let mut m: Vec<MetricLine> = (0..8).map(|k| commit(k, 1, 2)).collect();
        m.push(MetricLine::Rollback(RollbackLine {
            rollback: true,
            step: 8,
            generation: 1,
            to_step: 5,
            nonfinite_ranks: vec![1],
            unix_ms: 0,
            cause: RollbackCause::Nonfinite,
        }));
        m.extend((5..12).map(|k| commit(k, 1, 2)));
        let l = ledger(&m, &resumed(&[(1, 0)]));
        assert_eq!(l["exactly_once"], true, "{l}");
        assert_eq!(l["redone_steps"], json!([5, 6, 7]));
        m.push(commit(3, 1, 2));
        let l = ledger(&m, &resumed(&[(1, 0)]));
        assert_eq!(l["repeated_steps"], json!([3]), "{l}");
    }

    // D-4: rank 0 stopped after a step's allreduce, fenced, and woken records that step after
    // the next rank 0 restated it; the late original is the same commit, not a repeat. The
    // same line twice more is still a repeat.
    #[test]
    fn a_late_original_of_a_restated_commit_is_one_commit() {
        let mut m: Vec<MetricLine> = (0..30).map(|k| commit(k, 1, 2)).collect();
        m.push(MetricLine::Step(StepLine {
            restated: true,
            ..line(30, 1, 2)
        }));
        m.extend((31..40).map(|k| commit(k, 2, 1)));
        m.push(commit(30, 1, 2));
        let l = ledger(&m, &resumed(&[(1, 0), (2, 31)]));
        assert_eq!(l["exactly_once"], true, "{l}");
        m.push(commit(30, 1, 2));
        let l = ledger(&m, &resumed(&[(1, 0), (2, 31)]));
        assert_eq!(l["repeated_steps"], json!([30]), "{l}");
    }

    // D-4 violations are named: a step committed twice without a resume before it, a step
    // missing, and shares that leave a micro-batch out.
    #[test]
    fn ledger_names_repeated_missing_and_partial_steps() {
        let mut m: Vec<MetricLine> = (0..6).map(|k| commit(k, 1, 2)).collect();
        m.push(commit(4, 2, 2));
        m.push(commit(7, 2, 2));
        m.push(MetricLine::Step(StepLine {
            shares: vec![[0, 1], [2, 4]],
            ..line(8, 2, 2)
        }));
        let l = ledger(&m, &resumed(&[(1, 0), (2, 6)]));
        assert_eq!(l["exactly_once"], false);
        assert_eq!(l["repeated_steps"], json!([4]));
        assert_eq!(l["missing_steps"], json!([6]));
        assert_eq!(l["bad_partition_steps"], json!([8]));
    }
}
