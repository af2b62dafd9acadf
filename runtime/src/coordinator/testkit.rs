//! Helpers for the decision core's tests: a job of registered members and heartbeats with
//! chosen step times, in simulated time.

use super::core::*;
use crate::ids::{Generation, Step};
use std::time::{Duration, Instant};

/// The defaults, without the start-up grace (the tests' members all register at once).
pub fn cfg() -> CoreConfig {
    CoreConfig {
        straggler: StragglerConfig {
            startup_grace: Duration::ZERO,
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn reg(role: Role) -> Registration {
    Registration {
        job_id: "job".into(),
        host: "h".into(),
        pid: 1,
        addr: vec![1, 2, 3],
        role,
        config_hash: "c".into(),
        rejoin: None,
        committed_step: Step(0),
        secret_digest: String::new(),
    }
}

/// A job with `n` active ranks in generation 1, plus `spares` connected spares.
pub fn job(now: Instant, n: usize, spares: usize, cfg: &CoreConfig) -> State {
    let mut s = State::new("job", n);
    for _ in 0..n {
        let r = s.register(now, reg(Role::Active), cfg).unwrap();
        s.session_opened(now, r.id).unwrap();
    }
    let d = decide(now, &s, cfg);
    assert!(matches!(d, Decision::Regroup(_)), "{d:?}");
    apply(&mut s, &d);
    for _ in 0..spares {
        let r = s.register(now, reg(Role::Spare), cfg).unwrap();
        s.session_opened(now, r.id).unwrap();
    }
    assert_eq!(s.generation, Generation(1));
    s
}

pub fn beat(
    s: &mut State,
    now: Instant,
    id: MemberId,
    step: u64,
    ms: u64,
    cfg: &CoreConfig,
) -> Vec<FlagChange> {
    let hb = HeartbeatMsg {
        generation: s.generation,
        step: Step(step),
        collective_seq: step,
        phase: Phase::Training,
        last_step_time: Duration::from_millis(ms),
        last_compute_time: Duration::from_millis(ms),
        ..Default::default()
    };
    s.heartbeat(now, id, &hb, cfg).unwrap()
}

/// A heartbeat carrying several steps, each with its compute time and micro-batches.
pub fn beat_steps(
    s: &mut State,
    now: Instant,
    id: MemberId,
    steps: &[(u64, u64, u32)],
    cfg: &CoreConfig,
) -> Vec<FlagChange> {
    let last = steps.last().map_or(0, |x| x.0 + 1);
    let hb = HeartbeatMsg {
        generation: s.generation,
        step: Step(last),
        collective_seq: last,
        phase: Phase::Training,
        recent: steps
            .iter()
            .map(|&(step, ms, mbs)| StepSample {
                step: Step(step),
                compute: Duration::from_millis(ms),
                fixed: Duration::ZERO,
                micro_batches: mbs,
            })
            .collect(),
        ..Default::default()
    };
    s.heartbeat(now, id, &hb, cfg).unwrap()
}

pub fn all_beat(s: &mut State, now: Instant, step: u64, cfg: &CoreConfig) {
    let ids: Vec<_> = s
        .members
        .values()
        .filter(|m| !m.is_fenced())
        .map(|m| m.id)
        .collect();
    for id in ids {
        beat(s, now, id, step, 50, cfg);
    }
}

pub fn regroup(d: Decision) -> Regroup {
    match d {
        Decision::Regroup(r) => r,
        other => panic!("expected a regroup, got {other:?}"),
    }
}
