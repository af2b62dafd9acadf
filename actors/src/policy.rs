//! The supervisor's decisions, as pure functions of `(now, state, config)`.
//!
//! ractor has no restart strategies; these functions are them. The supervisor actor only
//! feeds them events and carries out what they decide, so every rule here is unit-tested
//! without actors, threads or sleeps (docs/semantics.md, S-1..S-6).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What else restarts when a child dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Only the child that died (the data loader: nothing depends on its incarnation).
    OneForOne,
    /// The child and every child started after it, which depend on it (the communicator
    /// dies: the compute loop that borrows its group and the checkpointer restart too).
    RestForOne,
}

/// What the watchdog does with a child that makes no progress past its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStuck {
    /// Kill the actor and restart it by its strategy: its thread, if stuck, is abandoned
    /// and its late output is dropped (it is tagged with the incarnation).
    Restart,
    /// Give the rank up: a thread stuck inside libtorch or a collective cannot be
    /// cancelled, and a second incarnation would share the model with it. The process
    /// exits and the job replaces the rank.
    EscalateRank,
}

#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub name: &'static str,
    pub strategy: Strategy,
    pub on_stuck: OnStuck,
    /// No progress for this long while busy is a fault; `None`: not watched.
    pub deadline: Option<Duration>,
}

/// Restart intensity: more than `max_restarts` restarts within `within` escalates to the
/// rank (the process exits; the coordinator replaces it, which is the job's level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    pub max_restarts: u32,
    pub within: Duration,
}

impl Default for Intensity {
    fn default() -> Self {
        Self {
            max_restarts: 3,
            within: Duration::from_secs(60),
        }
    }
}

/// How a child ended, as the supervisor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildExit {
    /// The child finished the rank's work and asks the rank to exit with this code
    /// (training done, fenced, halted by the coordinator).
    Finished { code: i32, reason: String },
    /// It returned an error or panicked (`ActorFailed`).
    Failed(String),
    /// It was killed or stopped without finishing (`ActorTerminated`): a kill is a fault
    /// like a failure, not a clean exit.
    Terminated(Option<String>),
    /// The watchdog found it stuck.
    Stuck { idle: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Restart these children (indices in start order), after stopping the live ones.
    Restart {
        children: Vec<usize>,
        reason: String,
    },
    /// The rank stops with this exit code.
    Exit { code: i32, reason: String },
}

/// Exit code of a rank whose supervisor gave up (restart intensity, stuck compute).
pub const EXIT_ESCALATED: i32 = 5;

/// The restarts the supervisor has done, for the intensity rule.
#[derive(Debug, Default, Clone)]
pub struct RestartLog {
    times: VecDeque<Instant>,
}

impl RestartLog {
    pub fn record(&mut self, now: Instant) {
        self.times.push_back(now);
    }

    /// Restarts within the window ending at `now`.
    pub fn recent(&self, now: Instant, within: Duration) -> usize {
        self.times
            .iter()
            .filter(|&&t| now.saturating_duration_since(t) <= within)
            .count()
    }

    pub fn prune(&mut self, now: Instant, within: Duration) {
        while let Some(&t) = self.times.front() {
            if now.saturating_duration_since(t) > within {
                self.times.pop_front();
            } else {
                break;
            }
        }
    }
}

/// What to do when child `idx` of `specs` ended with `exit`.
pub fn decide(
    now: Instant,
    log: &RestartLog,
    specs: &[ChildSpec],
    idx: usize,
    exit: &ChildExit,
    intensity: Intensity,
) -> Decision {
    let Some(spec) = specs.get(idx) else {
        return Decision::Exit {
            code: EXIT_ESCALATED,
            reason: format!("unknown child #{idx} ended: {exit:?}"),
        };
    };
    let what = match exit {
        ChildExit::Finished { code, reason } => {
            return Decision::Exit {
                code: *code,
                reason: format!("{} finished: {reason}", spec.name),
            }
        }
        ChildExit::Failed(e) => format!("{} failed: {e}", spec.name),
        ChildExit::Terminated(r) => format!(
            "{} was terminated ({})",
            spec.name,
            r.as_deref().unwrap_or("killed")
        ),
        ChildExit::Stuck { idle } => {
            let w = format!(
                "{} made no progress for {} ms (deadline {} ms)",
                spec.name,
                idle.as_millis(),
                spec.deadline.unwrap_or_default().as_millis()
            );
            if spec.on_stuck == OnStuck::EscalateRank {
                return Decision::Exit {
                    code: EXIT_ESCALATED,
                    reason: format!("{w}; a stuck {} cannot be cancelled", spec.name),
                };
            }
            w
        }
    };
    let recent = log.recent(now, intensity.within);
    if recent >= intensity.max_restarts as usize {
        return Decision::Exit {
            code: EXIT_ESCALATED,
            reason: format!(
                "{what}; {recent} restarts within {} s already (intensity {} in {} s): escalating to the rank",
                intensity.within.as_secs(),
                intensity.max_restarts,
                intensity.within.as_secs()
            ),
        };
    }
    let children: Vec<usize> = match spec.strategy {
        Strategy::OneForOne => vec![idx],
        Strategy::RestForOne => (idx..specs.len()).collect(),
    };
    let names: Vec<&str> = children.iter().map(|&i| specs[i].name).collect();
    Decision::Restart {
        reason: format!(
            "{what}; restarting {} ({:?}, restart {} of {} within {} s)",
            names.join(", "),
            spec.strategy,
            recent + 1,
            intensity.max_restarts,
            intensity.within.as_secs()
        ),
        children,
    }
}

/// A child's progress, as the watchdog reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// Doing work that must progress (false while it waits for a directive or the job).
    pub busy: bool,
    /// The last time it said it made progress.
    pub last: Instant,
}

/// The first watched child that is busy and has not progressed within its deadline.
pub fn overdue(
    now: Instant,
    specs: &[ChildSpec],
    beats: &[Option<Beat>],
) -> Option<(usize, Duration)> {
    specs.iter().zip(beats).enumerate().find_map(|(i, (s, b))| {
        let (deadline, beat) = (s.deadline?, (*b)?);
        let idle = now.saturating_duration_since(beat.last);
        (beat.busy && idle > deadline).then_some((i, idle))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<ChildSpec> {
        let c = |name, strategy, on_stuck, ms: Option<u64>| ChildSpec {
            name,
            strategy,
            on_stuck,
            deadline: ms.map(Duration::from_millis),
        };
        vec![
            c("control", Strategy::OneForOne, OnStuck::Restart, None),
            c("loader", Strategy::OneForOne, OnStuck::Restart, Some(1000)),
            c("communicator", Strategy::RestForOne, OnStuck::Restart, None),
            c(
                "compute",
                Strategy::RestForOne,
                OnStuck::EscalateRank,
                Some(5000),
            ),
            c("checkpointer", Strategy::OneForOne, OnStuck::Restart, None),
        ]
    }

    fn intensity() -> Intensity {
        Intensity {
            max_restarts: 3,
            within: Duration::from_secs(10),
        }
    }

    // S-1: a data loader failure restarts the data loader only.
    #[test]
    fn one_for_one_restarts_only_the_child() {
        let now = Instant::now();
        let d = decide(
            now,
            &RestartLog::default(),
            &specs(),
            1,
            &ChildExit::Failed("boom".into()),
            intensity(),
        );
        match d {
            Decision::Restart { children, reason } => {
                assert_eq!(children, vec![1]);
                assert!(reason.contains("loader failed: boom"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    // S-2: the communicator dies -> it and everything started after it restart.
    #[test]
    fn rest_for_one_restarts_the_dependents() {
        let now = Instant::now();
        let d = decide(
            now,
            &RestartLog::default(),
            &specs(),
            2,
            &ChildExit::Failed("ucx".into()),
            intensity(),
        );
        assert!(
            matches!(d, Decision::Restart { ref children, .. } if children == &vec![2, 3, 4]),
            "{d:?}"
        );
    }

    // S-3: a killed child (ActorTerminated) is a fault like a failed one.
    #[test]
    fn a_killed_child_is_restarted_not_ignored() {
        let now = Instant::now();
        let d = decide(
            now,
            &RestartLog::default(),
            &specs(),
            3,
            &ChildExit::Terminated(None),
            intensity(),
        );
        match d {
            Decision::Restart { children, reason } => {
                assert_eq!(children, vec![3, 4]);
                assert!(reason.contains("terminated (killed)"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    // S-4: the restart intensity escalates to the rank, and old restarts age out.
    #[test]
    fn intensity_escalates_then_ages_out() {
        let t0 = Instant::now();
        let mut log = RestartLog::default();
        for i in 0..3 {
            log.record(t0 + Duration::from_secs(i));
        }
        let now = t0 + Duration::from_secs(3);
        let d = decide(
            now,
            &log,
            &specs(),
            1,
            &ChildExit::Failed("x".into()),
            intensity(),
        );
        assert!(
            matches!(d, Decision::Exit { code: EXIT_ESCALATED, ref reason } if reason.contains("escalating")),
            "{d:?}"
        );
        // 12 s later the first restarts are outside the 10 s window.
        let later = t0 + Duration::from_secs(12);
        log.prune(later, intensity().within);
        let d = decide(
            later,
            &log,
            &specs(),
            1,
            &ChildExit::Failed("x".into()),
            intensity(),
        );
        assert!(matches!(d, Decision::Restart { .. }), "{d:?}");
    }

    // S-5: a finished child ends the rank with its code (done, fenced, halted).
    #[test]
    fn finished_child_exits_with_its_code() {
        let d = decide(
            Instant::now(),
            &RestartLog::default(),
            &specs(),
            3,
            &ChildExit::Finished {
                code: 3,
                reason: "fenced".into(),
            },
            intensity(),
        );
        assert_eq!(
            d,
            Decision::Exit {
                code: 3,
                reason: "compute finished: fenced".into()
            }
        );
    }

    // S-6: the watchdog: busy past the deadline is stuck; idle (not busy) never is; a stuck
    // compute escalates to the rank, a stuck loader restarts.
    #[test]
    fn watchdog_flags_only_busy_children_past_deadline() {
        let t0 = Instant::now();
        let s = specs();
        let beat = |busy, ms| {
            Some(Beat {
                busy,
                last: t0 + Duration::from_millis(ms),
            })
        };
        let now = t0 + Duration::from_millis(6000);
        // control unwatched, loader fresh, compute idle-waiting for a long time: nothing.
        assert_eq!(
            overdue(
                now,
                &s,
                &[beat(true, 0), beat(true, 5500), None, beat(false, 0), None]
            ),
            None
        );
        // compute busy since 0: 6 s > 5 s deadline.
        let o = overdue(
            now,
            &s,
            &[None, beat(true, 5500), None, beat(true, 0), None],
        );
        assert_eq!(o, Some((3, Duration::from_millis(6000))));
        let d = decide(
            now,
            &RestartLog::default(),
            &s,
            3,
            &ChildExit::Stuck { idle: o.unwrap().1 },
            intensity(),
        );
        assert!(
            matches!(d, Decision::Exit { code: EXIT_ESCALATED, ref reason } if reason.contains("cannot be cancelled")),
            "{d:?}"
        );
        // loader busy and 1.5 s idle: restarted.
        let o = overdue(now, &s, &[None, beat(true, 4500), None, None, None]).unwrap();
        assert_eq!(o.0, 1);
        let d = decide(
            now,
            &RestartLog::default(),
            &s,
            1,
            &ChildExit::Stuck { idle: o.1 },
            intensity(),
        );
        assert!(
            matches!(d, Decision::Restart { ref children, .. } if children == &vec![1]),
            "{d:?}"
        );
    }
}
