//! The next generation: who is removed, who is promoted, and the split-brain and K-9 guards.

use super::*;

/// The next generation under `p`: who leaves, who is promoted, the split, the reason.
pub(super) fn regroup_for(now: Instant, s: &State, cfg: &CoreConfig, p: Pressures) -> Decision {
    let Pressures {
        mut removed,
        target,
        any_straggler,
        even_out,
        regroup,
        stuck,
        world,
    } = p;
    // Only now scan for spares: the steady path above stays O(world) with no allocation.
    let mut spares = s.available_spares(now, cfg);
    let mut act = None;
    // Failures and requests first: a straggler is acted on only in a tick with nothing else.
    if any_straggler && removed.is_empty() && regroup.is_empty() && stuck.is_none() {
        act = straggler_step(now, s, cfg, spares.len());
    }
    let mut rebalance: Option<(Vec<u32>, String)> = None;
    let mut straggler = None;
    match act {
        Some(StragglerStep::Evict(id, why)) => {
            removed.push((id, why));
            straggler = Some(StragglerAct::Evicted(id));
        }
        Some(StragglerStep::Rebalance(id, shares, why)) => {
            rebalance = Some((shares, why));
            straggler = Some(StragglerAct::Rebalanced(id));
        }
        None => {}
    }
    let mut survivors: Vec<MemberId> = s
        .ranks
        .iter()
        .copied()
        .filter(|id| !removed.iter().any(|(r, _)| r == id))
        .collect();
    // Scale down: the highest ranks go back to being spares.
    while survivors.len() > target {
        let id = survivors.pop().expect("non-empty");
        removed.push((id, Removal::ScaledDown));
    }
    // K-9: never a generation without the committed state.
    if let Err(reason) = keep_a_holder(s, &mut removed, &mut survivors) {
        return Decision::Halt { reason };
    }
    let want = target.saturating_sub(survivors.len());
    spares.truncate(want);
    if removed.is_empty()
        && spares.is_empty()
        && regroup.is_empty()
        && stuck.is_none()
        && rebalance.is_none()
        && !even_out
    {
        return Decision::Steady;
    }
    let new_world = survivors.len() + spares.len();
    if new_world < cfg.min_world.max(1) {
        return below_min_world(new_world, &removed, cfg);
    }
    let mut why: Vec<String> = removed
        .iter()
        .map(|(id, r)| format!("member {id} out: {}", r.describe()))
        .collect();
    if !spares.is_empty() {
        why.push(format!("promoted {spares:?}"));
    }
    for id in &regroup {
        why.push(format!(
            "member {id} restarted its compute and asked for a regroup"
        ));
    }
    // The split changes only in a generation with the same members; any other regroup evens it
    // out (a straggler still flagged in it is rebalanced again once its times are in).
    let same_members = removed.is_empty() && spares.is_empty();
    let shares = match &rebalance {
        Some((shares, reason)) if same_members => {
            why.push(format!("rebalance: {reason}"));
            shares.clone()
        }
        _ => {
            if same_members && even_out {
                why.push(
                    "the straggler recovered or left: the global batch is split evenly again"
                        .into(),
                );
                straggler = Some(StragglerAct::EvenedOut);
            }
            Vec::new()
        }
    };
    if let Some(n) = stuck {
        why.push(format!(
            "{n} of {world} ranks reported failed collectives with no agreed suspect and none \
             missed the heartbeat deadline: regrouping with the same members"
        ));
    }
    let (ranks, resume_step, heal) = place(s, survivors, &spares);
    Decision::Regroup(Regroup {
        generation: Generation(s.generation.0 + 1),
        ranks,
        shares,
        removed,
        promoted: spares,
        resume_step,
        heal,
        reason: why.join("; "),
        straggler,
        at: now,
        watchdog: false,
    })
}

pub(super) fn below_min_world(
    new_world: usize,
    removed: &[(MemberId, Removal)],
    cfg: &CoreConfig,
) -> Decision {
    Decision::Halt {
        reason: format!(
            "{} rank(s) left ({}) and no spare: below min_world = {}",
            new_world,
            removed
                .iter()
                .map(|(id, r)| format!("member {id}: {}", r.describe()))
                .collect::<Vec<_>>()
                .join("; "),
            cfg.min_world.max(1)
        ),
    }
}

/// The current ranks that failed or asked to leave; or why to hold when most went silent at
/// once (split-brain guard: the coordinator is more likely the one cut off, and evicting them
/// would leave it with a minority; crashes seen as stream resets are not ambiguous).
pub(super) fn removals(
    now: Instant,
    cuts: &Cuts,
    s: &State,
    cfg: &CoreConfig,
) -> Result<Vec<(MemberId, Removal)>, String> {
    let world = s.ranks.len();
    let mut removed: Vec<(MemberId, Removal)> = Vec::new();
    for l in &s.live {
        if let Some(f) = failure(now, cuts, l, s, world, cfg) {
            removed.push((l.id, f));
        } else if l.drain {
            removed.push((l.id, Removal::Drained));
        }
    }
    let silent = removed.iter().filter(|(_, r)| r.is_silence()).count();
    if silent * 2 > world {
        return Err(format!(
            "{silent} of {world} ranks are silent at once; refusing to evict a majority \
             (split-brain guard) until they return or an operator intervenes"
        ));
    }
    Ok(removed)
}

/// The new generation's ranks (survivors, then promoted spares), the step it resumes at (the
/// highest any survivor committed), and who heals from whom: the leader is the survivor with
/// that step, lowest rank.
pub(super) fn place(
    s: &State,
    survivors: Vec<MemberId>,
    spares: &[MemberId],
) -> (Vec<MemberId>, Step, Vec<(MemberId, Rank)>) {
    let resume_step = survivors
        .iter()
        .filter_map(|id| s.members.get(id))
        .map(|m| m.step)
        .max()
        .unwrap_or(s.committed_step)
        .max(s.committed_step);
    let leader = survivors
        .iter()
        .position(|id| s.members.get(id).is_some_and(|m| m.step == resume_step));
    let mut ranks = survivors;
    ranks.extend(spares.iter().copied());
    let heal = match leader {
        Some(l) => ranks
            .iter()
            .enumerate()
            .filter(|(i, id)| {
                *i != l
                    && (spares.contains(id)
                        || s.members.get(id).is_some_and(|m| m.step < resume_step))
            })
            .map(|(_, id)| (*id, Rank(l as u32)))
            .collect(),
        None => Vec::new(),
    };
    (ranks, resume_step, heal)
}

/// K-9: a job that has committed steps never forms a generation in which no member holds them.
/// A holder removed on purpose (straggler, drain, scale-down) stays instead; if every holder
/// failed, the job halts with the reason rather than train on from step 0.
pub(super) fn keep_a_holder(
    s: &State,
    removed: &mut Vec<(MemberId, Removal)>,
    survivors: &mut Vec<MemberId>,
) -> Result<(), String> {
    if s.newest_step == Step(0) && s.committed_step == Step(0) {
        return Ok(());
    }
    let holds = |id: &MemberId| s.members.get(id).is_some_and(|m| m.holds_state);
    if survivors.iter().any(holds) {
        return Ok(());
    }
    if let Some(i) = removed
        .iter()
        .position(|(id, r)| !r.is_failure() && holds(id))
    {
        let (id, _) = removed.remove(i);
        // Back at its place in rank order.
        let at = |x: &MemberId| s.ranks.iter().position(|r| r == x).unwrap_or(usize::MAX);
        let pos = survivors
            .iter()
            .position(|x| at(x) > at(&id))
            .unwrap_or(survivors.len());
        survivors.insert(pos, id);
        return Ok(());
    }
    let lost: Vec<String> = removed
        .iter()
        .filter(|(id, _)| holds(id))
        .map(|(id, r)| format!("member {id}: {}", r.describe()))
        .collect();
    Err(format!(
        "no member left holds the committed state (step {}): every rank that held it is gone \
         ({}); the rest would start again from step 0. Restart the job from the newest \
         checkpoint",
        s.newest_step.max(s.committed_step),
        if lost.is_empty() {
            "none of the current ranks has reported it".to_string()
        } else {
            lost.join("; ")
        }
    ))
}
