//! The decision core's knobs.

use super::*;

/// Detection and policy settings. Defaults and the reason for each are in docs/control-plane.md.
#[derive(Debug, Clone, PartialEq)]
pub struct CoreConfig {
    pub heartbeat_interval: Duration,
    /// A member with no heartbeat for this long is hung (or stopped, or partitioned).
    pub heartbeat_timeout: Duration,
    /// After a coordinator restart, journaled members get this long to re-register.
    pub rejoin_grace: Duration,
    /// Below this many active ranks the job stops instead of shrinking.
    pub min_world: usize,
    /// The most ranks a generation may have (micro-batches per global batch).
    pub max_world: usize,
    /// Micro-batches per global batch, split over the ranks by every assignment (D-2). Zero
    /// when the coordinator does not know them: it then sends only a rebalanced split.
    pub micro_batches: usize,
    /// A rank whose step counter has not moved for max(hang_floor, hang_k x its median step
    /// time) while training is hung even if its heartbeats still arrive.
    pub hang_floor: Duration,
    pub hang_k: f64,
    pub straggler: StragglerConfig,
    /// No step committed for this long while ranks are assigned: regroup with the same
    /// members, then halt with the reason (K-13). Zero: off.
    pub progress_timeout: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_millis(800),
            rejoin_grace: Duration::from_secs(10),
            min_world: 1,
            max_world: usize::MAX,
            micro_batches: 0,
            hang_floor: Duration::from_secs(10),
            hang_k: 10.0,
            straggler: StragglerConfig::default(),
            progress_timeout: Duration::from_secs(600),
        }
    }
}

/// The most live members a job keeps: enough spares for any world it can run.
pub fn member_cap(cfg: &CoreConfig) -> usize {
    cfg.max_world.saturating_mul(4).saturating_add(64)
}
