//! K-13: no job idles forever. Detection covers ranks that die, hang while training or lag;
//! a job can still stop moving with every rank alive and idle: a data-plane group that cannot
//! be built (a bad `UCX_TLS`, a peer address nobody reaches), a rendezvous that never completes,
//! one rank done while another is stuck. Whatever the cause, no step committed while ranks are
//! assigned is a decision: after half of `progress_timeout` a regroup with the same members (a
//! transient cause clears), then, if that generation commits nothing in the other half, a halt
//! whose reason says what was seen. So the job ends within `progress_timeout` of its last step.

use super::core::{CoreConfig, State};
use std::time::{Duration, Instant};

/// Whether a regroup a rank asked for may happen now: at once after a committed step, then
/// after 1, 2, 4 ... 60 s while regroups commit nothing.
pub fn regroup_allowed(now: Instant, s: &State) -> bool {
    let k = s.regroups_since_progress;
    let Some(last) = s.last_regroup_at else {
        return true;
    };
    if k <= 1 {
        return true;
    }
    let wait = Duration::from_secs(1u64 << (k - 2).min(6)).min(Duration::from_secs(60));
    now.saturating_duration_since(last) >= wait
}

#[derive(Debug, Clone, PartialEq)]
pub enum Watch {
    Fine,
    Regroup(String),
    Halt(String),
}

pub fn watch(now: Instant, s: &State, cfg: &CoreConfig) -> Watch {
    // Half for the regroup, half for the generation it makes: both fit in the timeout.
    let limit = cfg.progress_timeout / 2;
    let Some(since) = s.progress_at.map(|t| now.saturating_duration_since(t)) else {
        return Watch::Fine;
    };
    if limit.is_zero() || s.ranks.is_empty() || s.halted.is_some() || since < limit {
        return Watch::Fine;
    }
    let last = s.newest_step.max(s.committed_step);
    let phases = phases(s);
    if s.watchdog_step == Some(s.newest_step) {
        return Watch::Halt(format!(
            "no step committed for {} ms after the last step {last}, and a regroup with the same \
             members did not help (ranks: {phases}); check the ranks' logs for the data plane \
             (UCX_TLS, addresses peers cannot reach) and raise coordinator.progress_timeout_ms \
             if steps are this slow",
            since.as_millis()
        ));
    }
    Watch::Regroup(format!(
        "no step committed for {} ms after the last step {last} (ranks: {phases}): regrouping \
         with the same members",
        since.as_millis()
    ))
}

/// `rank 0 training, rank 1 idle`: what each rank said it was doing.
fn phases(s: &State) -> String {
    s.ranks
        .iter()
        .enumerate()
        .map(|(r, id)| {
            let phase = s.members.get(id).map_or("gone", |m| m.phase.as_str());
            format!("rank {r} {phase}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::core::{apply, decide, Decision};
    use crate::coordinator::testkit::{beat, cfg, job};
    use std::time::Duration;

    fn short() -> CoreConfig {
        CoreConfig {
            progress_timeout: Duration::from_secs(5),
            hang_floor: Duration::from_secs(3600),
            ..cfg()
        }
    }

    // K-13: ranks that heartbeat but commit nothing (a group that cannot be built) are
    // regrouped once after half of progress_timeout, then the job halts with a reason, within
    // progress_timeout of its last progress.
    #[test]
    fn a_job_that_commits_nothing_is_regrouped_then_halted() {
        let cfg = short();
        let t0 = Instant::now();
        let mut s = job(t0, 3, 0, &cfg);
        let ids = s.ranks.clone();
        let mut t = t0;
        let tick = |s: &mut State, t: Instant| {
            for &id in &ids {
                beat(s, t, id, 0, 0, &cfg);
            }
            decide(t, s, &cfg)
        };
        let half = Duration::from_millis(2500);
        let step = Duration::from_millis(100);
        while t + step < t0 + half {
            t += step;
            assert_eq!(tick(&mut s, t), Decision::Steady);
        }
        t += step;
        let d = tick(&mut s, t);
        let Decision::Regroup(r) = &d else {
            panic!("{d:?}")
        };
        assert!(
            r.watchdog && r.removed.is_empty() && r.ranks == ids,
            "{r:?}"
        );
        apply(&mut s, &d);
        let regrouped = t;
        let halted = loop {
            t += step;
            match tick(&mut s, t) {
                Decision::Steady => assert!(t < regrouped + half + step, "no halt yet"),
                Decision::Halt { reason } => {
                    assert!(reason.contains("no step committed"), "{reason}");
                    break t;
                }
                d => panic!("{d:?}"),
            }
        };
        assert!(
            halted.duration_since(t0) <= cfg.progress_timeout + 2 * step,
            "halted {:?} after the last progress",
            halted.duration_since(t0)
        );
    }

    // A rank whose groups fail at once asks for a regroup each time: after the first two the
    // requests wait 1, 2, 4 ... s, so generations do not churn; a commit resets the backoff.
    #[test]
    fn regroups_without_progress_back_off() {
        let c = cfg();
        let t0 = Instant::now();
        let mut s = job(t0, 2, 0, &c);
        let id = s.ranks[1];
        let mut t = t0;
        let mut generations = 0;
        for _ in 0..200 {
            t += Duration::from_millis(100);
            for &m in &s.ranks.clone() {
                beat(&mut s, t, m, 0, 0, &c);
            }
            let g = s.generation;
            let _ = s.report_fault(t, id, g, crate::ids::Rank(1));
            let d = decide(t, &s, &c);
            if matches!(d, Decision::Regroup(_)) {
                generations += 1;
            }
            apply(&mut s, &d);
        }
        // 20 s of immediate failures: 2 at once, then at 1, 2, 4, 8 s.
        assert!(
            (4..=8).contains(&generations),
            "{generations} regroups in 20 s"
        );
        beat(&mut s, t, id, 5, 10, &c);
        assert_eq!(s.regroups_since_progress, 0);
    }

    // Progress resets it: a slow but moving job is never touched.
    #[test]
    fn a_moving_job_is_left_alone() {
        let cfg = short();
        let t0 = Instant::now();
        let mut s = job(t0, 2, 0, &cfg);
        let ids = s.ranks.clone();
        for k in 1..30u64 {
            let t = t0 + Duration::from_secs(4 * k);
            for &id in &ids {
                beat(&mut s, t, id, k, 4000, &cfg);
            }
            assert_eq!(decide(t, &s, &cfg), Decision::Steady);
        }
    }
}
