//! What a decision says: who is removed and why, the next generation, straggler actions.

use super::*;

/// Why a member leaves the current generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Removal {
    /// Its session stream closed (process died, connection reset).
    Crashed,
    /// No heartbeat within the timeout (stopped, hung, or partitioned).
    Silent {
        silent_for: Duration,
    },
    /// Heartbeats arrive but the step counter does not move.
    Stalled {
        stalled_for: Duration,
    },
    /// A majority of the other ranks reported it in failed collectives.
    Reported {
        by: Vec<MemberId>,
    },
    /// Re-registration after a coordinator restart did not come in time.
    NotRejoined,
    /// Slow for longer than the cheap remedies could fix; every figure is non-zero.
    Straggler {
        own_ms: f64,
        peers_ms: f64,
        flagged_for_ms: u64,
        /// It was still slow after the global batch was rebalanced away from it.
        after_rebalance: bool,
    },
    Drained,
    /// Scale-down: it goes back to being a spare.
    ScaledDown,
}

impl Removal {
    /// Failures (as opposed to removals on purpose) fence the member out for good.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Removal::Crashed
                | Removal::Silent { .. }
                | Removal::Stalled { .. }
                | Removal::Reported { .. }
                | Removal::NotRejoined
        )
    }

    /// Failures the coordinator infers from silence, which a partition of the coordinator
    /// itself would also produce.
    pub(super) fn is_silence(&self) -> bool {
        matches!(self, Removal::Silent { .. } | Removal::NotRejoined)
    }

    pub fn describe(&self) -> String {
        match self {
            Removal::Crashed => "session stream closed (process exited or connection reset)".into(),
            Removal::Silent { silent_for } => {
                format!("no heartbeat for {} ms", silent_for.as_millis())
            }
            Removal::Stalled { stalled_for } => {
                format!("no progress for {} ms", stalled_for.as_millis())
            }
            Removal::Reported { by } => format!("reported by members {by:?}"),
            Removal::NotRejoined => "did not re-register after a coordinator restart".into(),
            Removal::Straggler {
                own_ms,
                peers_ms,
                flagged_for_ms,
                after_rebalance,
            } => format!(
                "straggler: {own_ms:.1} ms per micro-batch vs a median of {peers_ms:.1} ms for \
                 its peers, flagged for {:.1} s{}",
                *flagged_for_ms as f64 / 1e3,
                if *after_rebalance {
                    ", still slow after a rebalance"
                } else {
                    ", and no rebalance helps"
                }
            ),
            Removal::Drained => "drained on request".into(),
            Removal::ScaledDown => "scaled down; back to spare".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Regroup {
    pub generation: Generation,
    /// Members of the new generation in rank order.
    pub ranks: Vec<MemberId>,
    /// Micro-batches per rank; empty for the even split.
    pub shares: Vec<u32>,
    pub removed: Vec<(MemberId, Removal)>,
    pub promoted: Vec<MemberId>,
    /// The highest step any survivor committed; the new generation resumes there.
    pub resume_step: Step,
    /// Members that must fetch the committed state, and the new rank to fetch it from.
    pub heal: Vec<(MemberId, Rank)>,
    pub reason: String,
    /// The straggler action this regroup carries out, if any (at most one at a time).
    pub straggler: Option<StragglerAct>,
    /// When it was decided (cool-down and the eviction budget count from here).
    pub at: Instant,
    /// Made by the progress watchdog (K-13): a second one without progress halts.
    pub watchdog: bool,
}

/// A straggler action: the cheap, reversible one first (K-10).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", content = "member", rename_all = "snake_case")]
pub enum StragglerAct {
    Rebalanced(MemberId),
    Evicted(MemberId),
    EvenedOut,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Steady,
    Regroup(Regroup),
    /// Something is wrong but acting would be unsafe; keep the generation and say why.
    Hold {
        reason: String,
    },
    /// Not enough ranks to go on: stop the job cleanly.
    Halt {
        reason: String,
    },
}
