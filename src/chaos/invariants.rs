//! What a chaos run must show, checked from its run directory alone (the records every job
//! writes), so that a run of a user's own job is checked the same way: the final step reached,
//! generations only growing, no commit from a fenced generation, replicas equal at the end,
//! every sample consumed exactly once, every committed checkpoint verifying, and the final
//! validation loss close to a fault-free run's.

use phalanx_runtime::events::{Event, FaultKind, Record};
use phalanx_runtime::metrics::MetricLine;
use serde::Serialize;
use serde_json::Value;

/// What the checks read.
#[derive(Debug, Default)]
pub struct Evidence {
    pub metrics: Vec<MetricLine>,
    pub records: Vec<Record>,
    /// `report.json` as the job wrote it.
    pub report: Value,
    /// `fingerprints.jsonl`: every rank's digest of its final state.
    pub fingerprints: Vec<Value>,
    /// Every committed checkpoint, and why it does not verify if it does not.
    pub checkpoints: Vec<(String, Option<String>)>,
    pub max_steps: u64,
    /// The final validation loss of the fault-free run with the same seed, if it was run.
    pub baseline_val_loss: Option<f64>,
    /// Relative difference allowed from it.
    pub val_tolerance: f64,
    /// What the scenario planned: faults the launcher injects, by kind, and NaNs inside ranks.
    pub planned: Vec<FaultKind>,
    pub planned_nans: usize,
    /// Scale and drain requests planned.
    pub planned_admin: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub pass: bool,
    pub detail: String,
}

fn check(name: &'static str, pass: bool, detail: String) -> Check {
    Check { name, pass, detail }
}

pub fn checks(e: &Evidence) -> Vec<Check> {
    vec![
        faults_struck(e),
        final_step(e),
        generations_grow(e),
        no_fenced_commit(e),
        replicas_equal(e),
        ledger(e),
        checkpoints_verify(e),
        val_loss_close(e),
        coordinator_restart_evicts_nobody(e),
        full_disk_fails_saves_not_the_job(e),
        super::slow_link::slow_link_slows_and_evicts_nobody(e),
    ]
}

/// C-4: while the checkpoint disk is full a save fails (said in an event) and the job goes on;
/// once there is room again a later save is committed.
fn full_disk_fails_saves_not_the_job(e: &Evidence) -> Check {
    let (mut full, mut freed) = (None, None);
    for r in &e.records {
        match &r.event {
            Event::FaultInjected(f) if f.fault == FaultKind::DiskFull => {
                full.get_or_insert(f.injected_unix_ms);
            }
            Event::FaultCleared(c) if c.fault == FaultKind::DiskFull => {
                freed.get_or_insert(c.cleared_unix_ms.unwrap_or(r.unix_ms));
            }
            _ => {}
        }
    }
    let Some(full) = full else {
        return check(
            "full_disk_fails_saves_not_the_job",
            true,
            "no full disk in this run".into(),
        );
    };
    let freed = freed.unwrap_or(u64::MAX);
    let failed = e
        .records
        .iter()
        .filter(|r| matches!(r.event, Event::CheckpointFailed { .. }))
        // While full, or reported within a second of its end (the last write try's report).
        .filter(|r| r.unix_ms >= full && r.unix_ms <= freed.saturating_add(1_000))
        .count();
    let after = e.records.iter().find_map(|r| match r.event {
        Event::CheckpointCommitted { step, .. } if r.unix_ms > freed => Some(step),
        _ => None,
    });
    check(
        "full_disk_fails_saves_not_the_job",
        failed > 0 && after.is_some(),
        match after {
            Some(step) if failed > 0 => format!(
                "{failed} part write(s) failed on the full disk; step {step} committed once it \
                 had room"
            ),
            _ if failed == 0 => "no save failed while the disk was full: the fault missed".into(),
            None if freed != u64::MAX && freed > last_step_ms(e) => format!(
                "the disk had room again only after the last step ({:.1} s after it filled): \
                 the run was too short to show a save committed after a full disk; give the job \
                 more steps (train.max_steps)",
                freed.saturating_sub(full) as f64 / 1e3
            ),
            _ => "no checkpoint committed once the disk had room again".into(),
        },
    )
}

/// When the last step was committed (0 if none was).
fn last_step_ms(e: &Evidence) -> u64 {
    e.metrics
        .iter()
        .filter_map(|m| match m {
            MetricLine::Step(s) => s.unix_ms,
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// K-5: the coordinator's outage is its own, not the ranks': from its SIGKILL until 10 s after
/// it started again (every rank rejoins within the grace), nobody is failed or removed.
fn coordinator_restart_evicts_nobody(e: &Evidence) -> Check {
    let mut windows = Vec::new();
    for r in &e.records {
        match &r.event {
            Event::FaultInjected(f) if f.fault == FaultKind::CoordinatorKill => {
                windows.push((f.injected_unix_ms, u64::MAX));
            }
            Event::FaultCleared(c) if c.fault == FaultKind::CoordinatorKill => {
                if let Some(w) = windows.last_mut() {
                    w.1 = c.cleared_unix_ms.unwrap_or(r.unix_ms) + 10_000;
                }
            }
            _ => {}
        }
    }
    let lost: Vec<String> = e
        .records
        .iter()
        .filter_map(|r| match &r.event {
            Event::RankFailed(x) | Event::RankRemoved(x)
                if windows.iter().any(|&(a, b)| (a..=b).contains(&r.unix_ms)) =>
            {
                Some(format!("member {} ({:?})", x.member, x.cause))
            }
            _ => None,
        })
        .collect();
    check(
        "coordinator_restart_evicts_nobody",
        lost.is_empty(),
        match (windows.len(), lost.is_empty()) {
            (0, _) => "no coordinator restart in this run".into(),
            (n, true) => format!("{n} coordinator restart(s), no rank lost around them"),
            (_, false) => format!("lost around a coordinator restart: {}", lost.join(", ")),
        },
    )
}

/// A run whose faults never struck (the job ended first) proves nothing: each planned fault
/// must have been injected, and each NaN named by the report.
fn faults_struck(e: &Evidence) -> Check {
    let mut injected: Vec<FaultKind> = e
        .records
        .iter()
        .filter_map(|r| match &r.event {
            // A fault that did not take effect (nothing to corrupt yet) did not strike.
            Event::FaultInjected(f) if f.ok => Some(f.fault),
            _ => None,
        })
        .collect();
    let mut missing = Vec::new();
    for want in &e.planned {
        match injected.iter().position(|k| k == want) {
            Some(i) => {
                injected.remove(i);
            }
            None => missing.push(format!("{want:?}")),
        }
    }
    let accepted = e
        .records
        .iter()
        .filter(|r| matches!(r.event, Event::Scale { .. } | Event::Drain { .. }))
        .count();
    if accepted < e.planned_admin {
        missing.push(format!(
            "{} of {} scale/drain requests accepted",
            accepted, e.planned_admin
        ));
    }
    let named = e.report["numerics"].as_array().map_or(0, Vec::len);
    if named < e.planned_nans {
        missing.push(format!("{} NaN(s) named", e.planned_nans - named));
    }
    check(
        "planned_faults_struck",
        missing.is_empty(),
        if missing.is_empty() {
            format!(
                "{} injected, {} NaN(s) named",
                e.planned.len(),
                e.planned_nans
            )
        } else {
            format!("never struck: {}", missing.join(", "))
        },
    )
}

fn final_line(e: &Evidence) -> Option<(u64, Option<f64>)> {
    e.metrics.iter().rev().find_map(|m| match m {
        MetricLine::Final(f) if !f.preempted => Some((f.step, f.val_loss)),
        _ => None,
    })
}

fn final_step(e: &Evidence) -> Check {
    let done = final_line(e).map(|f| f.0);
    check(
        "final_step_reached",
        done == Some(e.max_steps),
        match done {
            Some(s) => format!("the final line says step {s} of {}", e.max_steps),
            None => "no final metrics line: the job did not finish".into(),
        },
    )
}

/// G-1: each new generation's number is above every earlier one.
fn generations_grow(e: &Evidence) -> Check {
    // Each job of a campaign (C-6) counts its own generations from 1; a job begins where a
    // coordinator starts (a restart from the journal goes on counting).
    let mut gens: Vec<u64> = Vec::new();
    let mut bad = None;
    let mut newest = 0;
    for r in &e.records {
        match &r.event {
            Event::CoordinatorStarted(_) => newest = 0,
            Event::Generation(g) => {
                let g = g.generation.0;
                if g <= newest && bad.is_none() {
                    bad = Some([newest, g]);
                }
                newest = g;
                gens.push(g);
            }
            _ => {}
        }
    }
    check(
        "generations_only_grow",
        !gens.is_empty() && bad.is_none(),
        match bad {
            Some(w) => format!("generation {} formed after {}", w[1], w[0]),
            None => format!("{} generations, increasing within each job", gens.len()),
        },
    )
}

/// G-1, R-1: once a newer generation committed a step, no older one commits again (a fenced
/// rank's group is never heard from).
fn no_fenced_commit(e: &Evidence) -> Check {
    let mut newest = 0;
    let mut bad = None;
    for m in &e.metrics {
        // A resumed job's generations start again from 1 (C-6).
        if let MetricLine::Resume(_) = m {
            newest = 0;
        }
        if let MetricLine::Step(s) = m {
            if s.loss.is_none() {
                continue;
            }
            if s.generation < newest && bad.is_none() {
                bad = Some((s.step, s.generation, newest));
            }
            newest = newest.max(s.generation);
        }
    }
    check(
        "no_commit_from_a_fenced_generation",
        bad.is_none(),
        match bad {
            Some((step, g, n)) => {
                format!("step {step} committed by generation {g} after generation {n} had")
            }
            None => "every commit came from the newest generation".into(),
        },
    )
}

/// G-2: the ranks of the last generation end with bitwise equal state.
fn replicas_equal(e: &Evidence) -> Check {
    let last = e
        .fingerprints
        .iter()
        .filter_map(|f| f["generation"].as_u64())
        .max();
    let fin: Vec<&Value> = e
        .fingerprints
        .iter()
        .filter(|f| f["generation"].as_u64() == last)
        .collect();
    let same = fin
        .iter()
        .all(|f| f["state_sha256"] == fin[0]["state_sha256"]);
    check(
        "replicas_equal_at_the_end",
        !fin.is_empty() && same,
        format!(
            "{} ranks of generation {} {}",
            fin.len(),
            last.unwrap_or(0),
            if same { "agree" } else { "DIFFER" }
        ),
    )
}

/// D-4: the report's ledger.
fn ledger(e: &Evidence) -> Check {
    let l = &e.report["ledger"];
    check(
        "ledger_exactly_once",
        l["exactly_once"] == true,
        format!(
            "{} samples of {} steps; exactly once: {}",
            l["samples"], l["steps"], l["exactly_once"]
        ),
    )
}

/// C-5, C-6: every committed checkpoint verifies, but one the scenario corrupted, which must
/// not, and which the next job's resume must have skipped.
fn checkpoints_verify(e: &Evidence) -> Check {
    let struck = corrupted(e);
    let saved_again = recommitted(e);
    let skipped: Vec<&str> = e
        .metrics
        .iter()
        .filter_map(|m| match m {
            MetricLine::Resume(r) => Some(r),
            _ => None,
        })
        .flat_map(|r| r.skipped.iter().map(|s| s.checkpoint.as_str()))
        .collect();
    let mut bad: Vec<String> = Vec::new();
    for (c, why) in &e.checkpoints {
        // The resumed job redoes the steps after the checkpoint it loaded and may commit the
        // corrupted one's step again: that newer one must verify like any other.
        let dir = step_dir(c);
        let broken = struck.contains(&dir) && !saved_again.contains(&dir);
        match (broken, why) {
            (false, Some(w)) => bad.push(format!("{c}: {w}")),
            (true, None) => bad.push(format!("{c} was corrupted but verifies")),
            _ => {}
        }
    }
    // Named by the resume whatever retention did with it since.
    for name in &struck {
        if !skipped.iter().any(|s| step_dir(s) == *name) {
            bad.push(format!(
                "{name} was corrupted and no resume named and skipped it"
            ));
        }
    }
    check(
        "committed_checkpoints_verify",
        bad.is_empty(),
        if bad.is_empty() && struck.is_empty() {
            format!("{} committed, all verify", e.checkpoints.len())
        } else if bad.is_empty() {
            format!(
                "{} committed; all verify but the {} corrupted on purpose, which the resume \
                 named and skipped{}",
                e.checkpoints.len(),
                struck.join(", "),
                if saved_again.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (saved again since, and verifies: {})",
                        saved_again.join(", ")
                    )
                }
            )
        } else {
            bad.join("; ")
        },
    )
}

/// The `step-N` folder a checkpoint path or a part's path names.
fn step_dir(path: &str) -> String {
    std::path::Path::new(path)
        .ancestors()
        .filter_map(|p| p.file_name()?.to_str())
        .find(|n| n.starts_with("step-"))
        .unwrap_or(path)
        .to_string()
}

/// The checkpoints the scenario corrupted (their `step-N` folders).
fn corrupted(e: &Evidence) -> Vec<String> {
    e.records
        .iter()
        .filter_map(|r| match &r.event {
            Event::FaultInjected(f) if f.fault == FaultKind::CheckpointCorrupt => {
                f.path.as_deref().map(step_dir)
            }
            _ => None,
        })
        .collect()
}

/// The `step-N` folders committed again after a corruption of that folder.
fn recommitted(e: &Evidence) -> Vec<String> {
    let mut corrupted_so_far = Vec::new();
    let mut again = Vec::new();
    for r in &e.records {
        match &r.event {
            Event::FaultInjected(f) if f.fault == FaultKind::CheckpointCorrupt => {
                corrupted_so_far.extend(f.path.as_deref().map(step_dir));
            }
            Event::CheckpointCommitted { step, .. } => {
                let dir = format!("step-{step}");
                if corrupted_so_far.contains(&dir) {
                    again.push(dir);
                }
            }
            _ => {}
        }
    }
    again
}

fn val_loss_close(e: &Evidence) -> Check {
    let val = final_line(e).and_then(|f| f.1);
    let (pass, detail) = match (val, e.baseline_val_loss) {
        (Some(v), Some(b)) => {
            let rel = (v - b).abs() / b.abs().max(1e-9);
            (
                rel <= e.val_tolerance,
                format!(
                    "{v:.4} against {b:.4} without faults: {:.2}% apart (at most {:.2}%)",
                    100.0 * rel,
                    100.0 * e.val_tolerance
                ),
            )
        }
        (Some(v), None) => (true, format!("{v:.4}; no fault-free run to compare with")),
        (None, _) => (false, "no final validation loss".into()),
    };
    check("val_loss_close_to_a_fault_free_run", pass, detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_runtime::events::GenerationFormed;
    use phalanx_runtime::ids::{Generation, Step};
    use phalanx_runtime::metrics::{FinalLine, StepLine};
    use serde_json::json;

    fn step(step: u64, generation: u64) -> MetricLine {
        MetricLine::Step(StepLine {
            step,
            generation,
            world_size: 2,
            loss: Some(2.0),
            ..StepLine::default()
        })
    }

    fn generation(g: u64) -> Record {
        Record {
            unix_ms: g,
            t_ms: None,
            event: Event::Generation(GenerationFormed {
                generation: Generation(g),
                world: 2,
                members: vec![],
                promoted: vec![],
                resume_step: Step(0),
                heal: vec![],
                reason: String::new(),
                shares: vec![],
                straggler: None,
            }),
        }
    }

    fn injected(fault: FaultKind) -> Record {
        let v = json!({"unix_ms": 1, "kind": "fault_injected", "fault": fault,
                       "injected_unix_ms": 1, "ok": true});
        serde_json::from_value(v).unwrap()
    }

    fn rank_failed(member: u64) -> Record {
        let v = json!({"unix_ms": 2, "kind": "rank_failed", "member": member, "rank": 1,
                       "generation": 1, "cause": "crashed", "reason": "x",
                       "host": "h", "pid": 1});
        serde_json::from_value(v).unwrap()
    }

    fn record(v: Value) -> Record {
        serde_json::from_value(v).unwrap()
    }

    // C-4: a full disk must fail a save, and a save must commit once it has room.
    #[test]
    fn a_full_disk_must_fail_a_save_and_a_later_one_must_commit() {
        let full = record(
            json!({"unix_ms": 10, "kind": "fault_injected", "fault": "disk_full",
                                  "injected_unix_ms": 10, "ok": true}),
        );
        let failed_save = record(
            json!({"unix_ms": 11, "kind": "checkpoint_failed", "step": 5,
                                         "rank": 0, "error": "No space left on device"}),
        );
        let freed = record(
            json!({"unix_ms": 12, "kind": "fault_cleared", "fault": "disk_full",
                                   "cleared_unix_ms": 12}),
        );
        let committed = record(
            json!({"unix_ms": 13, "kind": "checkpoint_committed", "step": 6,
                                       "world": 2, "bytes": 1, "stage_ms": 0.0, "drain_ms": 0.0}),
        );
        let mut e = good();
        e.records
            .extend([full.clone(), freed.clone(), committed.clone()]);
        assert_eq!(
            failed(&e),
            ["full_disk_fails_saves_not_the_job"],
            "nothing failed"
        );
        let mut e = good();
        e.records
            .extend([full.clone(), failed_save.clone(), freed.clone()]);
        assert_eq!(
            failed(&e),
            ["full_disk_fails_saves_not_the_job"],
            "nothing after"
        );
        let mut e = good();
        e.records.extend([full, failed_save, freed, committed]);
        assert!(failed(&e).is_empty(), "{:?}", checks(&e));
    }

    fn corrupt(path: &str) -> Record {
        let v = json!({"unix_ms": 1, "kind": "fault_injected", "fault": "checkpoint_corrupt",
                       "path": path, "injected_unix_ms": 1, "ok": true});
        serde_json::from_value(v).unwrap()
    }

    fn committed(step: u64) -> Record {
        let v = json!({"unix_ms": 3, "kind": "checkpoint_committed", "step": step, "world": 2,
                       "bytes": 1, "stage_ms": 0.1, "drain_ms": 1.0});
        serde_json::from_value(v).unwrap()
    }

    fn started() -> Record {
        let v = json!({"unix_ms": 1, "kind": "coordinator_started", "job": "j",
                       "generation": 0, "target_world": 2});
        serde_json::from_value(v).unwrap()
    }

    fn resumed_skipping(checkpoint: &str) -> MetricLine {
        let v = json!({"resume": true, "step": 1, "checkpoint": "r/checkpoints/step-1",
                       "world_size": 2, "unix_ms": 1,
                       "skipped": [{"checkpoint": checkpoint, "why": "corrupt"}]});
        serde_json::from_value(v).unwrap()
    }

    // A campaign of two jobs (C-6): the second counts generations from 1 again, and a
    // checkpoint corrupted on purpose must fail to verify and be skipped by the resume.
    #[test]
    fn a_corrupted_checkpoint_must_be_caught_and_a_new_job_may_count_again() {
        let mut e = good();
        e.records.push(started());
        e.records.push(generation(1));
        e.metrics
            .insert(2, resumed_skipping("r/checkpoints/step-2"));
        e.metrics.insert(3, step(2, 1));
        assert!(failed(&e).is_empty(), "{:?}", checks(&e));
        e.records.push(corrupt(
            "r/checkpoints/step-2/part-00000-of-00002.safetensors",
        ));
        assert_eq!(failed(&e), ["committed_checkpoints_verify"], "it verifies");
        e.checkpoints[0].1 = Some("part-00000 does not match".into());
        assert!(failed(&e).is_empty(), "{:?}", checks(&e));
        // Saved again by the resumed job after the corruption: the new one verifies, as it
        // must (the suite once saw this and called it a corruption missed).
        e.checkpoints[0].1 = None;
        e.records.push(committed(2));
        assert!(failed(&e).is_empty(), "{:?}", checks(&e));
        e.checkpoints[0].1 = Some("part-00000 does not match".into());
        assert_eq!(
            failed(&e),
            ["committed_checkpoints_verify"],
            "the new one must verify"
        );
        e.checkpoints[0].1 = None;
        e.metrics[2] = resumed_skipping("r/checkpoints/step-1");
        assert_eq!(
            failed(&e),
            ["committed_checkpoints_verify"],
            "never skipped"
        );
    }

    fn good() -> Evidence {
        Evidence {
            metrics: vec![
                step(0, 1),
                step(1, 2),
                MetricLine::Final(FinalLine {
                    is_final: true,
                    step: 2,
                    val_loss: Some(2.5),
                    peer_lost_at_end: None,
                    preempted: false,
                    unix_ms: 1,
                }),
            ],
            records: vec![generation(1), injected(FaultKind::Sigkill), generation(2)],
            report: json!({"ledger": {"exactly_once": true, "samples": 4, "steps": 2}}),
            fingerprints: vec![
                json!({"generation": 2, "state_sha256": "a"}),
                json!({"generation": 2, "state_sha256": "a"}),
            ],
            checkpoints: vec![("step-2".into(), None)],
            max_steps: 2,
            baseline_val_loss: Some(2.51),
            val_tolerance: 0.02,
            planned: vec![FaultKind::Sigkill],
            planned_nans: 0,
            planned_admin: 0,
        }
    }

    fn failed(e: &Evidence) -> Vec<&'static str> {
        checks(e)
            .into_iter()
            .filter(|c| !c.pass)
            .map(|c| c.name)
            .collect()
    }

    // Every check passes on a good run and fails on the record that breaks it.
    #[test]
    fn each_check_fails_on_what_breaks_it() {
        assert!(failed(&good()).is_empty(), "{:?}", checks(&good()));
        let mut e = good();
        e.metrics.pop();
        assert_eq!(
            failed(&e),
            ["final_step_reached", "val_loss_close_to_a_fault_free_run"]
        );
        let mut e = good();
        e.records.push(generation(2));
        assert_eq!(failed(&e), ["generations_only_grow"]);
        let mut e = good();
        e.metrics.insert(2, step(2, 1));
        assert_eq!(failed(&e), ["no_commit_from_a_fenced_generation"]);
        let mut e = good();
        e.fingerprints[1]["state_sha256"] = json!("b");
        assert_eq!(failed(&e), ["replicas_equal_at_the_end"]);
        let mut e = good();
        e.report["ledger"]["exactly_once"] = json!(false);
        assert_eq!(failed(&e), ["ledger_exactly_once"]);
        let mut e = good();
        e.checkpoints
            .push(("step-1".into(), Some("part-00001 corrupt".into())));
        assert_eq!(failed(&e), ["committed_checkpoints_verify"]);
        let mut e = good();
        e.baseline_val_loss = Some(2.7);
        assert_eq!(failed(&e), ["val_loss_close_to_a_fault_free_run"]);
        let mut e = good();
        e.planned.push(FaultKind::Sigkill);
        assert_eq!(
            failed(&e),
            ["planned_faults_struck"],
            "two planned, one struck"
        );
        let mut e = good();
        e.planned_nans = 1;
        assert_eq!(failed(&e), ["planned_faults_struck"], "no NaN named");
        let mut e = good();
        e.records.push(injected(FaultKind::CoordinatorKill));
        e.records.push(rank_failed(2));
        assert_eq!(failed(&e), ["coordinator_restart_evicts_nobody"]);
        let mut e = good();
        e.records.push(rank_failed(2));
        assert!(failed(&e).is_empty(), "a rank lost with no restart near");
        let mut e = good();
        e.planned_admin = 1;
        assert_eq!(
            failed(&e),
            ["planned_faults_struck"],
            "no scale request accepted"
        );
    }
}
