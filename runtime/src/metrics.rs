//! The job's metrics log (`metrics.jsonl`): one line per committed step (rank 0's, with the
//! sample ledger's fields, D-4), a line per rollback, and the final line. Written by the
//! multi-rank loop and the single-process trainer, read by the launcher, the report and the
//! tests: one definition, so a renamed field is a compile error, not a wrong report.

use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`. Lines carry no tag of their own (the files predate one): a final
/// line has `"final": true`, a rollback `"rollback": true`, anything else is a step.
// Most lines are steps: boxing them would cost an allocation per line for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricLine {
    Final(FinalLine),
    Rollback(RollbackLine),
    Resume(ResumeLine),
    Step(StepLine),
}

/// The end of training: rank 0 evaluated and saved the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalLine {
    /// Always true; it tells this line from the others.
    #[serde(rename = "final")]
    pub is_final: bool,
    pub step: u64,
    pub val_loss: Option<f64>,
    /// A peer lost after the last commit (at the final barrier), which ended nothing (K-13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_lost_at_end: Option<String>,
    /// The job stopped on request before its last step, after a committed checkpoint (C-8).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preempted: bool,
    pub unix_ms: u64,
}

/// Every rank went back to the last checkpoint: after a non-finite step (T-4), or because
/// some of ZeRO-1's optimizer moments were lost with every rank that held them (Z-3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackLine {
    /// Always true; it tells this line from the others.
    pub rollback: bool,
    pub step: u64,
    pub generation: u64,
    pub to_step: u64,
    pub nonfinite_ranks: Vec<u32>,
    pub unix_ms: u64,
    #[serde(default)]
    pub cause: RollbackCause,
}

/// One rank's memory for training state (Z-5), a line of `memory.jsonl` written when the rank
/// joins a generation and when the job ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryLine {
    pub rank: u32,
    pub world: u32,
    pub generation: u64,
    pub step: u64,
    pub params_bytes: u64,
    pub grads_bytes: u64,
    /// AdamW moments this rank holds: all of them, or its ZeRO-1 shard's.
    pub optimizer_bytes: u64,
    /// ZeRO-1 snapshots: this rank's own and its copies of other ranks' shards (Z-4).
    pub replica_bytes: u64,
    /// The process's peak resident memory so far (Linux `VmHWM`).
    pub peak_rss_kib: Option<u64>,
    pub unix_ms: u64,
}

/// Why the job went back to its last checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackCause {
    /// A non-finite loss or gradient (T-4).
    #[default]
    Nonfinite,
    /// Optimizer moments lost with their owner and every copy (Z-3).
    ShardLost,
    /// Optimizer moments lost with their owner, restored from the buddy replicas' step (Z-4,
    /// no disk read).
    ShardFromReplica,
}

/// A job of the campaign started from a committed checkpoint (C-6): the steps after `step`
/// recorded by earlier jobs are not the final model's lineage (like a rollback's, T-4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeLine {
    /// Always true; it tells this line from the others.
    pub resume: bool,
    /// The checkpoint's step: the first step this job trains.
    pub step: u64,
    pub checkpoint: String,
    pub world_size: usize,
    /// Newer committed checkpoints that did not verify, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedCheckpoint>,
    pub unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedCheckpoint {
    pub checkpoint: String,
    pub why: String,
}

/// A committed step. The ledger's fields (epoch, positions, shares) come from the multi-rank
/// loop; a restated commit (D-4) carries only them; the figures are rank 0's.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepLine {
    pub step: u64,
    pub generation: u64,
    pub world_size: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// The step's sample positions in its epoch's permutation: [start, end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<[u64; 2]>,
    /// Each rank's micro-batches of the global batch: [start, end), in rank order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<[u64; 2]>,
    /// Restated by the next lowest holder of the committed state (D-4).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// The validation loss of the parameters the step started from (at `train.eval_interval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_ms: Option<f64>,
    /// None: the step was skipped (non-finite gradients, T-2).
    #[serde(default)]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nonfinite_ranks: Vec<u32>,
    /// Ranks whose replica differed from the majority's (healed from it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_mismatch: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<u64>,
}

impl MetricLine {
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Reads a metrics log: the lines it holds, and how many were not metric lines (a torn last
/// line after a crash).
/// One rank's own time in one step, as its heartbeat reported it (`step_times.jsonl`, written by
/// the coordinator): what the per-rank heat map of a run is drawn from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankStepLine {
    pub unix_ms: u64,
    pub member: u64,
    pub rank: u32,
    pub generation: u64,
    pub step: u64,
    /// Forward and backward passes (scales with the micro-batches) ...
    pub compute_ms: f64,
    /// ... and the rest of the rank's own time in the step.
    pub fixed_ms: f64,
    pub micro_batches: u32,
}

impl RankStepLine {
    /// The rank's own time per micro-batch of its own share (the straggler detector spreads
    /// the fixed part over the even share instead, K-7).
    pub fn ms_per_micro_batch(&self) -> f64 {
        (self.compute_ms + self.fixed_ms) / f64::from(self.micro_batches.max(1))
    }
}

pub fn read(text: &str) -> (Vec<MetricLine>, usize) {
    crate::events::read_lines(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each kind of line reads back as itself; the final and rollback markers decide the kind.
    #[test]
    fn lines_read_back_as_their_kind() {
        let step = MetricLine::Step(StepLine {
            step: 3,
            generation: 1,
            world_size: 2,
            epoch: Some(0),
            positions: Some([48, 64]),
            shares: vec![[0, 2], [2, 4]],
            loss: Some(2.5),
            grad_norm: Some(1.0),
            ..StepLine::default()
        });
        let fin = MetricLine::Final(FinalLine {
            is_final: true,
            step: 4,
            val_loss: Some(2.4),
            peer_lost_at_end: None,
            preempted: false,
            unix_ms: 5,
        });
        let back = MetricLine::Rollback(RollbackLine {
            rollback: true,
            step: 8,
            generation: 1,
            to_step: 5,
            nonfinite_ranks: vec![1],
            unix_ms: 6,
            cause: RollbackCause::Nonfinite,
        });
        let resumed = MetricLine::Resume(ResumeLine {
            resume: true,
            step: 30,
            checkpoint: "runs/x/checkpoints/step-30".into(),
            world_size: 3,
            skipped: vec![SkippedCheckpoint {
                checkpoint: "runs/x/checkpoints/step-40".into(),
                why: "corrupt".into(),
            }],
            unix_ms: 7,
        });
        let text = [&step, &fin, &back, &resumed]
            .iter()
            .map(|l| l.to_line())
            .collect::<Vec<_>>()
            .join("\n")
            + "\n{\"step\":";
        let (lines, bad) = read(&text);
        assert_eq!(lines, vec![step, fin, back, resumed]);
        assert_eq!(bad, 1);
        let v: serde_json::Value = serde_json::from_str(&lines[1].to_line()).unwrap();
        assert_eq!(v["final"], true);
    }
}
