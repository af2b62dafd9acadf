//! Carrying a decision out on the state.

use super::*;

/// Carries out a decision. Returns the generation in force afterwards.
pub fn apply(s: &mut State, d: &Decision) -> Generation {
    match d {
        Decision::Steady | Decision::Hold { .. } => {}
        Decision::Halt { reason } => s.halted = Some(reason.clone()),
        Decision::Regroup(r) => apply_regroup(s, r),
    }
    s.generation
}

pub(super) fn apply_regroup(s: &mut State, r: &Regroup) {
    for (id, why) in &r.removed {
        if let Some(m) = s.members.get_mut(id) {
            m.rank = None;
            m.state = match why {
                Removal::ScaledDown => MemberState::Spare,
                w if w.is_failure() => MemberState::Dead,
                _ => MemberState::Evicted,
            };
            m.judge = Judge::default();
            m.drain_requested = false;
        }
    }
    let uneven = !r.shares.is_empty();
    let nothing_committed = r.resume_step == Step(0) && s.newest_step == Step(0);
    for (i, id) in r.ranks.iter().enumerate() {
        // Survivors listed for a heal only lag in what their heartbeats said; a promoted
        // spare has nothing of the job until its heal is done.
        let joining = r.promoted.contains(id);
        if let Some(m) = s.members.get_mut(id) {
            m.state = MemberState::Active;
            m.rank = Some(Rank(i as u32));
            m.suspected_by.clear();
            m.regroup_requested = false;
            m.reported_at = None;
            // A new generation starts with heals, a fresh prefetch and cold caches on
            // joiners: its first steps are not evidence of a straggler.
            m.judge.restart_window();
            m.judge.rebalanced = uneven && m.judge.straggler;
            if joining {
                // It holds the committed state once it reports the resume step (K-9), unless
                // nothing was ever committed: then the state is the seed's initial model, which
                // every member has, and a rank that has not reported yet (its steps are
                // milliseconds, its heartbeats are not) holds it as surely as its peers.
                m.holds_state = nothing_committed;
            } else {
                m.step = r.resume_step.max(m.step);
            }
        }
    }
    match r.straggler {
        Some(StragglerAct::Evicted(_)) => {
            s.straggler_evictions.push(r.at);
            s.straggler_acted_at = Some(r.at);
        }
        Some(_) => s.straggler_acted_at = Some(r.at),
        None => {}
    }
    s.peers = Peers::default();
    s.shares = r.shares.clone();
    s.ranks = r.ranks.clone();
    s.generation = r.generation;
    s.committed_step = r.resume_step;
    // Only commits move the progress clock (a job that regroups in a loop commits nothing),
    // except that the first generation and a watchdog regroup each get a full timeout.
    if r.watchdog || s.progress_at.is_none() {
        s.progress_at = Some(r.at);
    }
    if r.watchdog {
        s.watchdog_step = Some(s.newest_step);
    }
    s.regroups_since_progress = s.regroups_since_progress.saturating_add(1);
    s.last_regroup_at = Some(r.at);
    s.rebuild_live();
}
