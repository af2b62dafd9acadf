//! Faults placed one by one, at a committed step or at a time into training: what a chaos
//! scenario file lists and what a soak draws. Like the rest of the schedule, a pure function
//! of the time and the job's status; the launcher carries the actions out.

use crate::launch_schedule::{Action, Status};
use std::time::{Duration, Instant};

/// When a placed fault strikes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trigger {
    /// Once this step is committed.
    Step(u64),
    /// This long after the first committed step (startup is no training time to fault).
    After(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PlacedKind {
    /// SIGKILL; the launcher starts a new spare in its place.
    Kill,
    /// SIGSTOP, SIGCONT this long later: the woken rank is fenced and comes back a spare.
    Hang { for_: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlacedFault {
    pub at: Trigger,
    /// The rank it strikes: whichever process holds that rank when it is due.
    pub rank: u32,
    pub kind: PlacedKind,
}

/// The placed faults and what of them has happened.
#[derive(Debug, Default)]
pub struct Placed {
    faults: Vec<PlacedFault>,
    fired: Vec<bool>,
    /// When training started (the first poll with a committed step).
    trained_from: Option<Instant>,
    /// Stopped processes and when each is to be continued.
    hung: Vec<(u32, Instant)>,
}

impl Placed {
    pub fn new(faults: Vec<PlacedFault>) -> Self {
        Placed {
            fired: vec![false; faults.len()],
            faults,
            ..Placed::default()
        }
    }

    /// Some fault has yet to strike: the launcher polls often.
    pub fn pending(&self) -> bool {
        self.fired.iter().any(|f| !f)
    }

    /// The faults due now. A fault whose rank has no active process now stays due.
    pub fn due(&mut self, now: Instant, st: &Status) -> Vec<Action> {
        if st.committed_step > 0 {
            self.trained_from.get_or_insert(now);
        }
        let mut out = Vec::new();
        for (i, f) in self.faults.iter().enumerate() {
            let struck = match f.at {
                Trigger::Step(s) => st.committed_step >= s,
                Trigger::After(d) => self
                    .trained_from
                    .is_some_and(|t| now.saturating_duration_since(t) >= d),
            };
            if self.fired[i] || !struck {
                continue;
            }
            // One fault per rank at a time: a rank still stopped is no target yet.
            let Some(pid) = st.active(f.rank).filter(|p| !self.is_hung(*p)) else {
                continue;
            };
            self.fired[i] = true;
            out.push(match f.kind {
                PlacedKind::Kill => Action::Kill {
                    rank: f.rank,
                    pid,
                    periodic: true,
                },
                PlacedKind::Hang { for_ } => {
                    self.hung.push((pid, now + for_));
                    Action::Stop { rank: f.rank, pid }
                }
            });
        }
        out
    }

    fn is_hung(&self, pid: u32) -> bool {
        self.hung.iter().any(|&(p, _)| p == pid)
    }

    /// The SIGCONTs due, whatever the job's status.
    pub fn timed(&mut self, now: Instant) -> Vec<Action> {
        let (due, keep): (Vec<_>, Vec<_>) = self.hung.drain(..).partition(|&(_, t)| now >= t);
        self.hung = keep;
        due.into_iter()
            .map(|(pid, _)| Action::Cont { pid })
            .collect()
    }

    /// Every process left stopped, continued (the launch is ending).
    pub fn on_exit(&mut self) -> Vec<Action> {
        self.hung
            .drain(..)
            .map(|(pid, _)| Action::Cont { pid })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch_schedule::Proc;

    fn status(step: u64, pids: [u32; 2]) -> Status {
        Status {
            committed_step: step,
            world: 2,
            procs: (0..2)
                .map(|r| Proc {
                    rank: Some(r),
                    pid: pids[r as usize],
                    active: true,
                    spare: false,
                })
                .collect(),
        }
    }

    // A fault in time counts from the first committed step, not from the launch; a fault at a
    // step fires at the first poll at or past it; each once.
    #[test]
    fn time_counts_from_training_and_each_fault_fires_once() {
        let t = Instant::now();
        let s5 = Duration::from_secs(5);
        let mut p = Placed::new(vec![
            PlacedFault {
                at: Trigger::After(s5),
                rank: 1,
                kind: PlacedKind::Kill,
            },
            PlacedFault {
                at: Trigger::Step(40),
                rank: 0,
                kind: PlacedKind::Kill,
            },
        ]);
        assert!(
            p.due(t + s5 * 2, &status(0, [10, 11])).is_empty(),
            "no step yet"
        );
        let t1 = t + s5 * 2;
        assert!(p.due(t1, &status(3, [10, 11])).is_empty());
        assert!(p.due(t1 + s5 / 2, &status(39, [10, 11])).is_empty());
        assert_eq!(
            p.due(t1 + s5, &status(40, [10, 11])),
            vec![
                Action::Kill {
                    rank: 1,
                    pid: 11,
                    periodic: true
                },
                Action::Kill {
                    rank: 0,
                    pid: 10,
                    periodic: true
                }
            ]
        );
        assert!(!p.pending());
        assert!(p.due(t1 + s5 * 9, &status(90, [12, 13])).is_empty());
    }

    // A hang stops the rank's process and continues it after its time; a second hang of the
    // same rank waits for the first to end, then strikes whichever process holds the rank.
    #[test]
    fn hangs_are_continued_after_their_time_and_do_not_stack() {
        let t = Instant::now();
        let h = |s| PlacedFault {
            at: Trigger::Step(s),
            rank: 1,
            kind: PlacedKind::Hang {
                for_: Duration::from_secs(3),
            },
        };
        let mut p = Placed::new(vec![h(10), h(11)]);
        assert_eq!(
            p.due(t, &status(12, [10, 11])),
            vec![Action::Stop { rank: 1, pid: 11 }]
        );
        assert!(p.timed(t + Duration::from_secs(2)).is_empty());
        assert!(p.due(t, &status(12, [10, 11])).is_empty(), "still stopped");
        assert_eq!(
            p.timed(t + Duration::from_secs(3)),
            vec![Action::Cont { pid: 11 }]
        );
        assert_eq!(
            p.due(t + Duration::from_secs(4), &status(20, [10, 14])),
            vec![Action::Stop { rank: 1, pid: 14 }]
        );
        assert_eq!(p.on_exit(), vec![Action::Cont { pid: 14 }]);
        assert!(p.timed(t + Duration::from_secs(60)).is_empty());
    }
}
