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
    /// Every process a fault was sent to: a killed one may still be listed by the coordinator
    /// for a moment, and signalling a dead process would count as a fault that struck.
    struck: Vec<u32>,
}

impl Placed {
    pub fn new(faults: Vec<PlacedFault>) -> Self {
        Placed {
            fired: vec![false; faults.len()],
            faults,
            ..Placed::default()
        }
    }

    /// A fault is waiting for a step, or is due within a second: the launcher polls often
    /// (a soak's faults a minute apart do not keep it polling every 20 ms for its whole run,
    /// which the fault-free run it is compared with does not do).
    pub fn due_soon(&self, now: Instant) -> bool {
        self.faults.iter().zip(&self.fired).any(|(f, fired)| {
            !fired
                && match f.at {
                    Trigger::Step(_) => true,
                    Trigger::After(d) => self.trained_from.is_none_or(|t| {
                        now + Duration::from_secs(1) >= t.checked_add(d).unwrap_or(now)
                    }),
                }
        })
    }

    /// The faults due now. A fault whose rank has no active process now stays due.
    pub fn due(&mut self, now: Instant, st: &Status) -> Vec<Action> {
        if st.committed_step > 0 {
            self.trained_from.get_or_insert(now);
        }
        let mut out = Vec::new();
        let mut ranks_struck = Vec::new();
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
            // One fault per rank and poll, and none on a process already struck: the next one
            // waits for whichever process holds the rank next.
            if ranks_struck.contains(&f.rank) {
                continue;
            }
            let Some(pid) = st.active(f.rank).filter(|p| !self.struck.contains(p)) else {
                continue;
            };
            self.fired[i] = true;
            self.struck.push(pid);
            ranks_struck.push(f.rank);
            out.push(match f.kind {
                PlacedKind::Kill => Action::Kill {
                    rank: f.rank,
                    pid,
                    replaced: true,
                },
                PlacedKind::Hang { for_ } => {
                    self.hung.push((pid, now.checked_add(for_).unwrap_or(now)));
                    Action::Stop { rank: f.rank, pid }
                }
            });
        }
        out
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
                    replaced: true
                },
                Action::Kill {
                    rank: 0,
                    pid: 10,
                    replaced: true
                }
            ]
        );
        assert!(!p.due_soon(t1 + s5));
        assert!(p.due(t1 + s5 * 9, &status(90, [12, 13])).is_empty());
    }

    // A hang stops the rank's process and continues it after its time; a second fault on the
    // same rank waits for another process to hold it (a woken one is fenced).
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
        assert!(
            p.due(t, &status(13, [10, 11])).is_empty(),
            "woken, but struck once already"
        );
        assert_eq!(
            p.due(t + Duration::from_secs(4), &status(20, [10, 14])),
            vec![Action::Stop { rank: 1, pid: 14 }]
        );
        assert_eq!(p.on_exit(), vec![Action::Cont { pid: 14 }]);
        assert!(p.timed(t + Duration::from_secs(60)).is_empty());
    }

    // Two kills of one rank due in the same poll strike one process, not the same one twice;
    // the second waits for the process that takes the rank over, even while the coordinator
    // still lists the killed one. A soak's faults far ahead do not keep the launcher polling.
    #[test]
    fn a_process_is_struck_once_and_far_faults_are_not_due_soon() {
        let t = Instant::now();
        let kill = |at| PlacedFault {
            at,
            rank: 1,
            kind: PlacedKind::Kill,
        };
        let minute = Duration::from_secs(60);
        let mut p = Placed::new(vec![
            kill(Trigger::Step(5)),
            kill(Trigger::Step(5)),
            kill(Trigger::After(minute)),
        ]);
        let st = |pid| Status {
            committed_step: 6,
            world: 2,
            procs: vec![Proc {
                rank: Some(1),
                pid,
                active: true,
                spare: false,
            }],
        };
        assert_eq!(p.due(t, &st(20)).len(), 1);
        assert!(p.due(t, &st(20)).is_empty(), "20 is dead, still listed");
        assert_eq!(
            p.due(t, &st(21)),
            vec![Action::Kill {
                rank: 1,
                pid: 21,
                replaced: true
            }]
        );
        assert!(!p.due_soon(t), "the next fault is a minute away");
        assert!(p.due_soon(t + minute - Duration::from_millis(500)));
    }
}
