//! Straggler actions: rebalance the split first, evict only on evidence (K-8, K-10).

use super::*;

/// What to do about the flagged stragglers now: one action at most.
pub(super) enum StragglerStep {
    Evict(MemberId, Removal),
    Rebalance(MemberId, Vec<u32>, String),
}

/// K-10: rebalancing (cheap, reversible) comes first; a rank is evicted only once its slowness
/// persisted past it (`Judge::persisted`), within the job's eviction budget, when a spare
/// replaces it or the job stays at or above min_world, and never if it is the last rank that
/// holds the committed state.
pub(super) fn straggler_step(
    now: Instant,
    s: &State,
    cfg: &CoreConfig,
    spares: usize,
) -> Option<StragglerStep> {
    let sc = &cfg.straggler;
    let world = s.ranks.len();
    let can_split = cfg.max_world != usize::MAX && cfg.max_world > world;
    let recent = s
        .straggler_evictions
        .iter()
        .filter(|&&t| now.saturating_duration_since(t) < sc.eviction_window)
        .count();
    let budget = (recent as u32) < sc.max_evictions;
    let holders = s.live.iter().filter(|l| l.holds_state).count();
    for l in s.live.iter().filter(|l| l.straggler) {
        let m = s.members.get(&l.id)?;
        let j = &m.judge;
        if !j.held(now, sc) {
            continue;
        }
        // Without a spare, evicting a rank a split can work around only slows the job.
        let room = spares > 0 || (!can_split && world > cfg.min_world.max(1));
        let last_holder = m.holds_state && holders <= 1;
        if j.persisted(now, can_split, sc) && budget && room && !last_holder {
            let own = j.level.unwrap_or(j.flag_level);
            let peers = s.peers.excluding(j.level_at_refresh);
            if let Some(peers) = peers.filter(|&p| p > 0.0 && own > 0.0) {
                let flagged_for = j
                    .flagged_at
                    .map_or(0, |t| now.saturating_duration_since(t).as_millis() as u64);
                return Some(StragglerStep::Evict(
                    l.id,
                    Removal::Straggler {
                        own_ms: own * 1e3,
                        peers_ms: peers * 1e3,
                        flagged_for_ms: flagged_for.max(1),
                        after_rebalance: can_split,
                    },
                ));
            }
        }
        // A rank already given less is planned again from the times at its new share (a CPU
        // quota does not slow work in proportion): a better split is taken if it gains
        // min_gain, which also keeps the split from oscillating.
        if let Rebalance::To(shares, why) = plan_rebalance(s, cfg) {
            return Some(StragglerStep::Rebalance(
                l.id,
                shares,
                format!("member {} is a straggler: {why}", l.id),
            ));
        }
        return None;
    }
    None
}

pub(super) enum Rebalance {
    /// Not every rank has a window of step times yet.
    Wait,
    /// No split is enough faster than the current one.
    Useless,
    To(Vec<u32>, String),
}

/// The split of the global batch that evens out the ranks' measured speeds, if it is worth a
/// regroup: its predicted step compute time must be `min_gain` below the current split's.
pub(super) fn plan_rebalance(s: &State, cfg: &CoreConfig) -> Rebalance {
    let world = s.live.len();
    let m = cfg.max_world;
    if m == usize::MAX || m <= world {
        return Rebalance::Useless;
    }
    // Only flagged ranks are taken at their measured speed; the others at the reference, so
    // that noise among healthy ranks does not tilt the split between them.
    let Some(reference) = s.peers.excluding(None) else {
        return Rebalance::Wait;
    };
    // A rank flagged on its last steps, before its median caught up, is planned at the level
    // that flagged it; once rebalanced, at its median at the new share.
    let flagged = |l: &Live| {
        let j = &s.members.get(&l.id)?.judge;
        let median = l.median_s?;
        Some(if j.rebalanced {
            median
        } else {
            median.max(j.flag_level)
        })
    };
    let Some(per_mb) = s
        .live
        .iter()
        .map(|l| {
            if l.straggler {
                flagged(l)
            } else {
                Some(reference)
            }
        })
        .collect::<Option<Vec<f64>>>()
    else {
        return Rebalance::Wait;
    };
    let current = if s.shares.len() == world {
        s.shares.clone()
    } else {
        even_shares(m, world)
    };
    let next = weighted_shares(m, &per_mb);
    let (before, after) = (makespan(&current, &per_mb), makespan(&next, &per_mb));
    if next == current || after > before * (1.0 - cfg.straggler.min_gain) {
        return Rebalance::Useless;
    }
    // A flagged rank's share only shrinks while it is flagged: at a reduced share a CPU quota
    // may not bind, and its times there say nothing of its speed at a larger one. It grows back
    // when the flag clears (with backoff on relapses).
    let grows = s
        .live
        .iter()
        .zip(current.iter().zip(&next))
        .any(|(l, (c, n))| l.straggler && n > c);
    if grows {
        return Rebalance::Useless;
    }
    let ms: Vec<String> = per_mb.iter().map(|t| format!("{:.1}", t * 1e3)).collect();
    Rebalance::To(
        next.clone(),
        format!(
            "micro-batches per rank {current:?} -> {next:?} for [{}] ms per micro-batch; \
             predicted compute per step {:.1} -> {:.1} ms",
            ms.join(", "),
            before * 1e3,
            after * 1e3
        ),
    )
}
