//! The one decision function: who has failed, and whether to regroup, stop or wait.

use super::*;

/// Why a current rank has failed, if it has. Reads only the compact `Live` mirror, except to
/// list the reporters of a rank that a majority reported.
pub(super) fn failure(
    now: Instant,
    cuts: &Cuts,
    l: &Live,
    s: &State,
    world: usize,
    cfg: &CoreConfig,
) -> Option<Removal> {
    if l.done {
        return None;
    }
    if let Some(deadline) = l.rejoin_deadline {
        return (now > deadline).then_some(Removal::NotRejoined);
    }
    if !l.connected {
        return Some(Removal::Crashed);
    }
    // Compare instants against precomputed cut-offs: this runs for every rank every tick.
    if cuts.heartbeat.is_some_and(|c| l.last_heartbeat < c) {
        let silent_for = now.saturating_duration_since(l.last_heartbeat);
        return Some(Removal::Silent { silent_for });
    }
    if l.training && cuts.progress.is_some_and(|c| l.last_progress < c) {
        let stalled_for = now.saturating_duration_since(l.last_progress);
        let limit = l
            .median_s
            .map(|t| Duration::from_secs_f64(t * cfg.hang_k))
            .unwrap_or(Duration::ZERO)
            .max(cfg.hang_floor);
        if stalled_for > limit {
            return Some(Removal::Stalled { stalled_for });
        }
    }
    // A strict majority of the other ranks saw it fail in a collective.
    if world > 1 && !l.regroup && (l.suspects as usize) * 2 > world - 1 {
        let by = s
            .members
            .get(&l.id)
            .map(|m| m.suspected_by.iter().copied().collect())
            .unwrap_or_default();
        return Some(Removal::Reported { by });
    }
    None
}

/// `now - timeout` for the per-rank checks (None early in the process's life).
pub(super) struct Cuts {
    heartbeat: Option<Instant>,
    progress: Option<Instant>,
}

/// The decision: what the coordinator should do now, and why.
pub fn decide(now: Instant, s: &State, cfg: &CoreConfig) -> Decision {
    let cuts = Cuts {
        heartbeat: now.checked_sub(cfg.heartbeat_timeout),
        progress: now.checked_sub(cfg.hang_floor),
    };
    if s.halted.is_some() {
        return Decision::Steady;
    }
    if s.ranks.is_empty() {
        return form_first(now, s, cfg);
    }
    // K-13: a job that commits nothing is regrouped once, then halted with the reason; this
    // comes before the "finished" check (one rank done and another stuck is no finish).
    match crate::coordinator::watchdog::watch(now, s, cfg) {
        Watch::Fine => {}
        Watch::Halt(reason) => return Decision::Halt { reason },
        Watch::Regroup(reason) => return same_members(now, s, reason),
    }
    // The job is over once its ranks finished: nothing to regroup or promote any more.
    if s.live.iter().any(|l| l.done) {
        return Decision::Steady;
    }
    let p = match pressures(now, &cuts, s, cfg) {
        Ok(p) => p,
        Err(reason) => return Decision::Hold { reason },
    };
    if p.calm() {
        return Decision::Steady;
    }
    regroup_for(now, s, cfg, p)
}

/// What may call for a new generation in this tick.
pub(super) struct Pressures {
    pub(super) removed: Vec<(MemberId, Removal)>,
    pub(super) target: usize,
    /// A flagged straggler may be acted on (not cooling down after the last action).
    pub(super) any_straggler: bool,
    /// A rebalanced split whose straggler is gone or recovered is evened out again.
    pub(super) even_out: bool,
    /// Members that asked for a regroup (a restarted compute, a group that could not be built).
    pub(super) regroup: Vec<MemberId>,
    /// Most ranks reported failed collectives with no agreed suspect; their count.
    pub(super) stuck: Option<usize>,
    pub(super) world: usize,
}

impl Pressures {
    fn calm(&self) -> bool {
        self.removed.is_empty()
            && !self.any_straggler
            && !self.even_out
            && self.world == self.target
            && self.regroup.is_empty()
            && self.stuck.is_none()
    }
}

pub(super) fn pressures(
    now: Instant,
    cuts: &Cuts,
    s: &State,
    cfg: &CoreConfig,
) -> Result<Pressures, String> {
    let world = s.ranks.len();
    // A hold (a report that cannot be judged yet) waits for the next tick.
    let removed = removals(now, cuts, s, cfg)?;
    let target = s.target_world.min(cfg.max_world).max(1);
    // One straggler action at a time, then a cool-down (K-10).
    let cooling = s
        .straggler_acted_at
        .is_some_and(|t| now.saturating_duration_since(t) < cfg.straggler.cooldown);
    let any_straggler = cfg.straggler.evict && !cooling && s.live.iter().any(|l| l.straggler);
    let even_out = !cooling && !s.shares.is_empty() && !s.live.iter().any(|l| l.straggler);
    // Regroups asked for by ranks back off while they bring no committed step: a cause that
    // fails every new group at once must not churn generations (K-13 then decides).
    let regroup: Vec<MemberId> = if crate::coordinator::watchdog::regroup_allowed(now, s) {
        s.live.iter().filter(|l| l.regroup).map(|l| l.id).collect()
    } else {
        Vec::new()
    };
    // A generation most of whose ranks reported failed collectives, with no suspect agreed by a
    // majority and nobody found dead or hung by the heartbeat deadline since, cannot make
    // progress: every rank waits for the next generation. Regroup with the same members.
    let reports: Vec<Instant> = s.live.iter().filter_map(|l| l.reported_at).collect();
    let stuck = (removed.is_empty()
        && world > 1
        && reports.len() * 2 > world
        && reports
            .iter()
            .min()
            .is_some_and(|&first| now.saturating_duration_since(first) > cfg.heartbeat_timeout))
    .then_some(reports.len());
    Ok(Pressures {
        removed,
        target,
        any_straggler,
        even_out,
        regroup,
        stuck,
        world,
    })
}

/// The progress watchdog's regroup (K-13): the same members in a fresh generation.
pub(super) fn same_members(now: Instant, s: &State, reason: String) -> Decision {
    let (ranks, resume_step, heal) = place(s, s.ranks.clone(), &[]);
    Decision::Regroup(Regroup {
        generation: Generation(s.generation.0 + 1),
        ranks,
        shares: s.shares.clone(),
        removed: Vec::new(),
        promoted: Vec::new(),
        resume_step,
        heal,
        reason,
        straggler: None,
        at: now,
        watchdog: true,
    })
}

/// The first generation forms when `target_world` members that asked to be active are connected.
pub(super) fn form_first(now: Instant, s: &State, cfg: &CoreConfig) -> Decision {
    let mut ready: Vec<MemberId> = s
        .members
        .values()
        .filter(|m| {
            m.state == MemberState::Spare
                && m.role == Role::Active
                && m.connected
                && now.saturating_duration_since(m.last_heartbeat) <= cfg.heartbeat_timeout
        })
        .map(|m| m.id)
        .collect();
    let target = s.target_world.min(cfg.max_world).max(1);
    if ready.len() < target {
        return Decision::Steady;
    }
    ready.sort_unstable();
    ready.truncate(target);
    // A job resumed from a checkpoint (C-6) starts at the step its members loaded; one that
    // loaded an older one (or none) heals from the first that holds the newest.
    let (ranks, resume_step, heal) = place(s, ready, &[]);
    Decision::Regroup(Regroup {
        generation: Generation(s.generation.0 + 1),
        reason: format!("first generation: {} ranks registered", ranks.len()),
        promoted: ranks.clone(),
        ranks,
        shares: Vec::new(),
        removed: Vec::new(),
        resume_step,
        heal,
        straggler: None,
        at: now,
        watchdog: false,
    })
}
