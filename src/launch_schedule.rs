//! The launcher's fault schedule, as a pure function from the time and the job's status (as the
//! coordinator reports it) to the faults due now. The launcher carries the actions out and
//! records them; the schedule only decides, so it is tested without processes or sleeps.

use crate::launch_load::Periodic;
use crate::launch_placed::{Placed, PlacedFault};
use std::time::{Duration, Instant};

/// The faults a launch asks for (`phalanx launch --kill-at ...`).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// SIGKILL rank R once step S is committed, for each (S, R): ranks given the same step are
    /// killed at once.
    pub kill: Vec<(u64, u32)>,
    /// SIGSTOP rank R once step S is committed, SIGCONT `stop_for` later.
    pub stop_at: Option<(u64, u32)>,
    pub stop_for: Duration,
    /// Once step S is committed, cap rank R at `slow_cpu_pct`% of a core ...
    pub slow_at: Option<(u64, u32)>,
    pub slow_cpu_pct: u32,
    /// ... and lift the quota this many committed steps later (0: never).
    pub slow_steps: u64,
    /// SIGKILL an active rank (ranks in turn) every so often.
    pub kill_every: Option<Duration>,
    /// Restart a spare process every so often.
    pub restart_spare_every: Option<Duration>,
    /// Ask the coordinator for N active ranks once step S is committed (S, N) ...
    pub scale_at: Option<(u64, u32)>,
    /// ... and to drain rank R once step S is committed (S, R).
    pub drain_at: Option<(u64, u32)>,
    /// SIGKILL the coordinator once step S is committed, and start it again from its journal
    /// `coordinator_down` later (the launcher then runs it as a process of its own).
    pub kill_coordinator_at: Option<u64>,
    pub coordinator_down: Duration,
    /// Once step S is committed, flip a byte in the newest committed checkpoint ...
    pub corrupt_checkpoint_at: Option<u64>,
    /// ... and SIGKILL every worker once step S is committed: the job dies whole (its next
    /// job resumes, C-6).
    pub kill_job_at: Option<u64>,
    /// Once step S is committed, fill the checkpoint disk (a tmpfs the launcher mounts), and
    /// empty it again once both `disk_full_steps` committed steps and `disk_full_min` have
    /// passed (a save's write retries must run out while it is full, whatever the step time).
    pub fill_disk_at: Option<u64>,
    pub disk_full_steps: u64,
    pub disk_full_min: Duration,
    /// Faults placed one by one, at steps or times (a scenario file, a soak).
    pub placed: Vec<PlacedFault>,
}

/// A process of the job as the coordinator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Proc {
    pub rank: Option<u32>,
    pub pid: u32,
    pub active: bool,
    pub spare: bool,
}

/// The job's status at one poll.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub committed_step: u64,
    pub world: u32,
    pub procs: Vec<Proc>,
}

impl Status {
    pub fn active(&self, rank: u32) -> Option<u32> {
        self.procs
            .iter()
            .find(|p| p.active && p.rank == Some(rank))
            .map(|p| p.pid)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// SIGKILL; `replaced` when the plan kills over and over (`kill_every`, a scenario's placed
    /// or drawn kills): the launcher's budget of restarted workers grows by one for it.
    Kill {
        rank: u32,
        pid: u32,
        replaced: bool,
    },
    Stop {
        rank: u32,
        pid: u32,
    },
    Cont {
        pid: u32,
    },
    Quota {
        rank: u32,
        pid: u32,
        pct: u32,
    },
    LiftQuota,
    RestartSpare {
        pid: u32,
    },
    /// Admin requests, sent to the coordinator as `phalanx scale` / `drain` send them.
    Scale {
        target: u32,
    },
    Drain {
        rank: u32,
    },
    KillCoordinator,
    RestartCoordinator,
    CorruptCheckpoint,
    KillJob,
    FillDisk,
    FreeDisk,
}

/// The plan and what of it has happened.
pub struct Schedule {
    plan: Plan,
    /// Which of the plan's kills have fired.
    killed: Vec<bool>,
    stopped: Option<(u32, Instant)>,
    stop_done: bool,
    /// The step the quota came at, and whether it has been lifted.
    slowed: Option<(u64, bool)>,
    kill_every: Option<Periodic>,
    spare_every: Option<Periodic>,
    scaled: bool,
    drained: bool,
    /// When the coordinator was killed, and whether it has been started again.
    coordinator_killed: Option<(Instant, bool)>,
    corrupted: bool,
    job_killed: bool,
    /// The step and time the disk was filled at, and whether it has been emptied again.
    disk_filled: Option<(u64, Instant, bool)>,
    placed: Placed,
}

impl Schedule {
    pub fn new(plan: Plan, start: Instant) -> Self {
        Schedule {
            kill_every: plan.kill_every.map(|e| Periodic::new(e, start)),
            spare_every: plan.restart_spare_every.map(|e| Periodic::new(e, start)),
            killed: vec![false; plan.kill.len()],
            placed: Placed::new(plan.placed.clone()),
            plan,
            stopped: None,
            stop_done: false,
            slowed: None,
            scaled: false,
            drained: false,
            coordinator_killed: None,
            corrupted: false,
            job_killed: false,
            disk_filled: None,
        }
    }

    /// A fault waits for a step: the launcher polls the coordinator often, so that it lands
    /// within a few steps of the one asked for even when steps take milliseconds.
    pub fn waiting_for_a_step(&self, now: Instant) -> bool {
        let p = &self.plan;
        self.killed.iter().any(|k| !k)
            || self.placed.due_soon(now)
            || (p.scale_at.is_some() && !self.scaled)
            || (p.drain_at.is_some() && !self.drained)
            || (p.stop_at.is_some() && !self.stop_done && self.stopped.is_none())
            || (p.slow_at.is_some() && self.slowed.is_none())
            || (p.kill_coordinator_at.is_some() && self.coordinator_killed.is_none())
            || (p.corrupt_checkpoint_at.is_some() && !self.corrupted)
            || (p.kill_job_at.is_some() && !self.job_killed)
            || (p.fill_disk_at.is_some() && !matches!(self.disk_filled, Some((_, _, true))))
            || self
                .slowed
                .is_some_and(|(_, lifted)| !lifted && p.slow_steps > 0)
    }

    /// The faults due given the job's status at `now`, in the order they are carried out. A
    /// fault whose rank is not active now stays due.
    pub fn due(&mut self, now: Instant, st: &Status) -> Vec<Action> {
        let mut out = Vec::new();
        let step = st.committed_step;
        let p = self.plan.clone();
        if let Some((at, rank)) = p.stop_at {
            if !self.stop_done && self.stopped.is_none() && step >= at {
                if let Some(pid) = st.active(rank) {
                    self.stopped = Some((pid, now));
                    out.push(Action::Stop { rank, pid });
                }
            }
        }
        if let Some((at, rank)) = p.slow_at {
            if self.slowed.is_none() && step >= at {
                if let Some(pid) = st.active(rank) {
                    self.slowed = Some((step, false));
                    out.push(Action::Quota {
                        rank,
                        pid,
                        pct: p.slow_cpu_pct,
                    });
                }
            }
        }
        if let Some((from, lifted)) = &mut self.slowed {
            if !*lifted && p.slow_steps > 0 && step >= *from + p.slow_steps {
                *lifted = true;
                out.push(Action::LiftQuota);
            }
        }
        for (i, &(at, rank)) in p.kill.iter().enumerate() {
            if !self.killed[i] && step >= at {
                if let Some(pid) = st.active(rank) {
                    self.killed[i] = true;
                    out.push(Action::Kill {
                        rank,
                        pid,
                        replaced: false,
                    });
                }
            }
        }
        if let Some(at) = p.kill_coordinator_at {
            if self.coordinator_killed.is_none() && step >= at {
                self.coordinator_killed = Some((now, false));
                out.push(Action::KillCoordinator);
            }
        }
        // The job killed first, then its newest committed checkpoint corrupted: no commit can
        // land between the two (one in flight once made a newer checkpoint the resume's).
        if p.kill_job_at
            .is_some_and(|at| !self.job_killed && step >= at)
        {
            self.job_killed = true;
            out.push(Action::KillJob);
        }
        if p.corrupt_checkpoint_at
            .is_some_and(|at| !self.corrupted && step >= at)
        {
            self.corrupted = true;
            out.push(Action::CorruptCheckpoint);
        }
        if p.fill_disk_at
            .is_some_and(|at| self.disk_filled.is_none() && step >= at)
        {
            self.disk_filled = Some((step, now, false));
            out.push(Action::FillDisk);
        } else if let Some((at, since, freed @ false)) = &mut self.disk_filled {
            if step >= *at + p.disk_full_steps
                && now.saturating_duration_since(*since) >= p.disk_full_min
            {
                *freed = true;
                out.push(Action::FreeDisk);
            }
        }
        out.extend(self.admin(st));
        out.extend(self.periodic(now, st));
        out.extend(self.placed.due(now, st));
        out
    }

    /// The scale and drain requests due at the job's step; a drain waits for its rank.
    fn admin(&mut self, st: &Status) -> Vec<Action> {
        let mut out = Vec::new();
        let step = st.committed_step;
        if let Some((at, target)) = self.plan.scale_at {
            if !self.scaled && step >= at {
                self.scaled = true;
                out.push(Action::Scale { target });
            }
        }
        if let Some((at, rank)) = self.plan.drain_at {
            if !self.drained && step >= at && st.active(rank).is_some() {
                self.drained = true;
                out.push(Action::Drain { rank });
            }
        }
        out
    }

    /// A SIGKILL of an active rank (ranks in turn) and a spare restarted, when their period is up.
    fn periodic(&mut self, now: Instant, st: &Status) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(k) = self.kill_every.as_mut().filter(|_| st.committed_step > 0) {
            if k.due(now) {
                let rank = (k.fired - 1) % st.world.max(1);
                if let Some(pid) = st.active(rank) {
                    out.push(Action::Kill {
                        rank,
                        pid,
                        replaced: true,
                    });
                }
            }
        }
        if let Some(s) = self.spare_every.as_mut() {
            if s.due(now) {
                if let Some(p) = st.procs.iter().find(|p| p.spare) {
                    out.push(Action::RestartSpare { pid: p.pid });
                }
            }
        }
        out
    }

    /// Faults that end with time, whatever the job's status (there is none while the
    /// coordinator is down): the SIGCONT of a stopped rank, the coordinator started again.
    pub fn timed(&mut self, now: Instant) -> Vec<Action> {
        let mut out = self.placed.timed(now);
        if let Some((pid, at)) = self.stopped {
            if now.saturating_duration_since(at) >= self.plan.stop_for {
                self.stopped = None;
                self.stop_done = true;
                out.push(Action::Cont { pid });
            }
        }
        if let Some((at, restarted @ false)) = &mut self.coordinator_killed {
            if now.saturating_duration_since(*at) >= self.plan.coordinator_down {
                *restarted = true;
                out.push(Action::RestartCoordinator);
            }
        }
        out
    }

    /// What must be undone when the launch ends early: a rank left stopped, a coordinator left
    /// down.
    pub fn on_exit(&mut self) -> Vec<Action> {
        let mut out: Vec<Action> = self
            .stopped
            .take()
            .map(|(pid, _)| Action::Cont { pid })
            .into_iter()
            .collect();
        out.extend(self.placed.on_exit());
        if let Some((_, restarted @ false)) = &mut self.coordinator_killed {
            *restarted = true;
            out.push(Action::RestartCoordinator);
        }
        if let Some((_, _, freed @ false)) = &mut self.disk_filled {
            *freed = true;
            out.push(Action::FreeDisk);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(step: u64) -> Status {
        Status {
            committed_step: step,
            world: 2,
            procs: vec![
                Proc {
                    rank: Some(0),
                    pid: 100,
                    active: true,
                    spare: false,
                },
                Proc {
                    rank: Some(1),
                    pid: 101,
                    active: true,
                    spare: false,
                },
                Proc {
                    rank: None,
                    pid: 102,
                    active: false,
                    spare: true,
                },
            ],
        }
    }

    // A one-off fault fires once, at the first poll at or past its step, and only on an active
    // rank; until then the launcher is told to poll often.
    #[test]
    fn a_kill_fires_once_at_its_step_on_an_active_rank() {
        let t = Instant::now();
        let mut s = Schedule::new(
            Plan {
                kill: vec![(10, 1)],
                ..Plan::default()
            },
            t,
        );
        assert!(s.waiting_for_a_step(t));
        assert!(s.due(t, &status(9)).is_empty());
        let mut gone = status(12);
        gone.procs[1].active = false;
        assert!(
            s.due(t, &gone).is_empty(),
            "rank 1 is not active: still due"
        );
        assert_eq!(
            s.due(t, &status(12)),
            vec![Action::Kill {
                rank: 1,
                pid: 101,
                replaced: false
            }]
        );
        assert!(s.due(t, &status(13)).is_empty());
        assert!(!s.waiting_for_a_step(t));
    }

    // The coordinator is killed at its step and started again `coordinator_down` later, with no
    // status in between (nobody answers while it is down); once each.
    #[test]
    fn the_coordinator_is_killed_at_its_step_and_restarted_after_its_time() {
        let t = Instant::now();
        let mut s = Schedule::new(
            Plan {
                kill_coordinator_at: Some(20),
                coordinator_down: Duration::from_secs(2),
                ..Plan::default()
            },
            t,
        );
        assert!(s.waiting_for_a_step(t));
        assert!(s.due(t, &status(19)).is_empty());
        assert_eq!(s.due(t, &status(20)), vec![Action::KillCoordinator]);
        assert!(!s.waiting_for_a_step(t));
        assert!(s.due(t, &status(21)).is_empty());
        assert!(s.timed(t + Duration::from_secs(1)).is_empty());
        assert_eq!(
            s.timed(t + Duration::from_secs(2)),
            vec![Action::RestartCoordinator]
        );
        assert!(s.timed(t + Duration::from_secs(9)).is_empty());
        assert!(s.on_exit().is_empty(), "restarted already");
    }

    // The disk fills at its step and is emptied once its steps and its time have passed, or
    // when the launch ends.
    #[test]
    fn a_full_disk_is_emptied_after_its_steps_or_at_the_end() {
        let t = Instant::now();
        let plan = Plan {
            fill_disk_at: Some(10),
            disk_full_steps: 30,
            disk_full_min: Duration::from_secs(2),
            ..Plan::default()
        };
        let mut s = Schedule::new(plan.clone(), t);
        let later = t + Duration::from_secs(2);
        assert_eq!(s.due(t, &status(10)), vec![Action::FillDisk]);
        assert!(s.waiting_for_a_step(t));
        assert!(s.due(later, &status(39)).is_empty(), "not enough steps");
        assert!(s.due(t, &status(45)).is_empty(), "not long enough");
        assert_eq!(s.due(later, &status(40)), vec![Action::FreeDisk]);
        assert!(!s.waiting_for_a_step(t));
        assert!(s.due(t, &status(41)).is_empty());
        assert!(s.on_exit().is_empty());
        let mut s = Schedule::new(plan, t);
        assert_eq!(s.due(t, &status(11)), vec![Action::FillDisk]);
        assert_eq!(s.on_exit(), vec![Action::FreeDisk]);
    }

    // A whole-job kill and a corruption at one step come in that order, once each.
    #[test]
    fn the_job_is_killed_before_its_checkpoint_is_corrupted() {
        let t = Instant::now();
        let mut s = Schedule::new(
            Plan {
                corrupt_checkpoint_at: Some(30),
                kill_job_at: Some(30),
                ..Plan::default()
            },
            t,
        );
        assert!(s.due(t, &status(29)).is_empty());
        assert!(s.waiting_for_a_step(t));
        assert_eq!(
            s.due(t, &status(31)),
            vec![Action::KillJob, Action::CorruptCheckpoint]
        );
        assert!(s.due(t, &status(32)).is_empty());
        assert!(!s.waiting_for_a_step(t));
    }

    // A launch that ends while the coordinator is down starts it again (its journal and events
    // end cleanly), once.
    #[test]
    fn a_coordinator_left_down_is_restarted_on_exit() {
        let t = Instant::now();
        let mut s = Schedule::new(
            Plan {
                kill_coordinator_at: Some(1),
                coordinator_down: Duration::from_secs(60),
                ..Plan::default()
            },
            t,
        );
        assert_eq!(s.due(t, &status(1)), vec![Action::KillCoordinator]);
        assert_eq!(s.on_exit(), vec![Action::RestartCoordinator]);
        assert!(s.on_exit().is_empty());
    }

    // SIGSTOP at its step, SIGCONT `stop_for` later whatever the status; never twice.
    #[test]
    fn a_stop_is_continued_after_its_time() {
        let t = Instant::now();
        let mut s = Schedule::new(
            Plan {
                stop_at: Some((5, 0)),
                stop_for: Duration::from_secs(3),
                ..Plan::default()
            },
            t,
        );
        assert_eq!(
            s.due(t, &status(5)),
            vec![Action::Stop { rank: 0, pid: 100 }]
        );
        assert!(s.timed(t + Duration::from_secs(2)).is_empty());
        assert_eq!(
            s.timed(t + Duration::from_secs(3)),
            vec![Action::Cont { pid: 100 }]
        );
        assert!(s.due(t, &status(50)).is_empty());
        assert!(s.on_exit().is_empty());
    }

    // A launch that ends while a rank is stopped continues it.
    #[test]
    fn a_rank_left_stopped_is_continued_on_exit() {
        let t = Instant::now();
        let mut s = Schedule::new(
            Plan {
                stop_at: Some((1, 1)),
                stop_for: Duration::from_secs(60),
                ..Plan::default()
            },
            t,
        );
        s.due(t, &status(1));
        assert_eq!(s.on_exit(), vec![Action::Cont { pid: 101 }]);
    }

    // The quota comes at its step and is lifted `slow_steps` committed steps after the step it
    // came at.
    #[test]
    fn a_quota_is_lifted_after_its_steps() {
        let t = Instant::now();
        let mut s = Schedule::new(
            Plan {
                slow_at: Some((100, 1)),
                slow_cpu_pct: 12,
                slow_steps: 250,
                ..Plan::default()
            },
            t,
        );
        assert_eq!(
            s.due(t, &status(102)),
            vec![Action::Quota {
                rank: 1,
                pid: 101,
                pct: 12
            }]
        );
        assert!(s.waiting_for_a_step(t));
        assert!(s.due(t, &status(351)).is_empty());
        assert_eq!(s.due(t, &status(352)), vec![Action::LiftQuota]);
        assert!(s.due(t, &status(400)).is_empty());
        assert!(!s.waiting_for_a_step(t));
    }

    // A scale request goes at its step; a drain waits until its rank is active (after the
    // scale-up that makes it).
    #[test]
    fn scale_then_drain_at_their_steps() {
        let t = Instant::now();
        let mut s = Schedule::new(
            Plan {
                scale_at: Some((5, 3)),
                drain_at: Some((8, 2)),
                ..Plan::default()
            },
            t,
        );
        assert!(s.waiting_for_a_step(t));
        assert!(s.due(t, &status(4)).is_empty());
        assert_eq!(s.due(t, &status(5)), vec![Action::Scale { target: 3 }]);
        assert!(s.due(t, &status(9)).is_empty(), "no rank 2 yet");
        let mut grown = status(10);
        grown.procs[2].rank = Some(2);
        grown.procs[2].active = true;
        assert_eq!(s.due(t, &grown), vec![Action::Drain { rank: 2 }]);
        assert!(!s.waiting_for_a_step(t));
    }

    // Two kills at one step fire in the same poll: two ranks lost at once.
    #[test]
    fn kills_at_one_step_fire_together() {
        let t = Instant::now();
        let mut s = Schedule::new(
            Plan {
                kill: vec![(10, 0), (10, 1)],
                ..Plan::default()
            },
            t,
        );
        let kills: Vec<u32> = s
            .due(t, &status(10))
            .into_iter()
            .filter_map(|a| match a {
                Action::Kill { rank, .. } => Some(rank),
                _ => None,
            })
            .collect();
        assert_eq!(kills, vec![0, 1]);
        assert!(!s.waiting_for_a_step(t));
        assert!(s.due(t, &status(11)).is_empty());
    }

    // Periodic kills take the ranks in turn, only once training has begun; spare restarts take
    // a spare, when there is one.
    #[test]
    fn periodic_faults_take_ranks_in_turn() {
        let t = Instant::now();
        let every = Duration::from_secs(10);
        let mut s = Schedule::new(
            Plan {
                kill_every: Some(every),
                restart_spare_every: Some(every),
                ..Plan::default()
            },
            t,
        );
        assert!(
            s.due(t + every, &status(0)).len() == 1,
            "only the spare restart"
        );
        let a = s.due(t + 2 * every, &status(5));
        assert_eq!(
            a,
            vec![
                Action::Kill {
                    rank: 0,
                    pid: 100,
                    replaced: true
                },
                Action::RestartSpare { pid: 102 }
            ]
        );
        let b = s.due(t + 3 * every, &status(9));
        assert_eq!(
            b[0],
            Action::Kill {
                rank: 1,
                pid: 101,
                replaced: true
            }
        );
        assert!(
            s.due(t + 3 * every, &status(9)).is_empty(),
            "not twice a period"
        );
    }
}
