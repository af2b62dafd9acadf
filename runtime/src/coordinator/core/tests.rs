//! The decision core's unit tests.

use super::*;

use crate::coordinator::testkit::*;

// Registrations are capped (a client registering in a loop is refused, not remembered);
// fenced members do not count.
#[test]
fn live_members_are_capped() {
    let c = CoreConfig {
        max_world: 2,
        ..cfg()
    };
    let t = Instant::now();
    let mut s = State::new("job", 2);
    let cap = member_cap(&c);
    for _ in 0..cap {
        s.register(t, reg(Role::Spare), &c).unwrap();
    }
    let e = s.register(t, reg(Role::Spare), &c).unwrap_err();
    assert!(e.to_string().contains("live members"), "{e}");
    let some = *s.members.keys().next().unwrap();
    s.session_closed(t, some);
    s.register(t, reg(Role::Spare), &c).unwrap();
}

// K-9 with K-4: in the first generation a rank that has not sent a heartbeat since it was
// formed (its steps took milliseconds) still holds the state its peers committed (they
// commit in lockstep): when the only rank that reported is lost, the job stops for
// min_world, not because "no member holds the committed state" (a CI run did that).
#[test]
fn a_first_generation_rank_that_has_not_reported_still_holds_the_state() {
    let c = CoreConfig {
        min_world: 2,
        ..cfg()
    };
    let t = Instant::now();
    let mut s = job(t, 2, 0, &c);
    let (quiet, reported) = (s.ranks[0], s.ranks[1]);
    beat(&mut s, t, reported, 31, 1, &c);
    s.session_closed(t, reported);
    let d = decide(t, &s, &c);
    let Decision::Halt { reason } = &d else {
        panic!("{d:?}")
    };
    assert!(reason.contains("min_world = 2"), "{reason}");
    assert!(s.members[&quiet].holds_state);
    // With min_world 1 the quiet rank goes on alone, from the committed step.
    let c = cfg();
    let mut s = job(t, 2, 0, &c);
    let reported = s.ranks[1];
    beat(&mut s, t, reported, 31, 1, &c);
    s.session_closed(t, reported);
    let d = decide(t, &s, &c);
    assert!(
        matches!(&d, Decision::Regroup(r) if r.ranks.len() == 1),
        "{d:?}"
    );
}

// Members who left are forgotten beyond the newest DEPARTED_KEPT: a client that registers
// and leaves in a loop (or months of replaced workers) does not grow the state; a forgotten
// member stays shut out, and the active ranks are untouched.
#[test]
fn members_who_left_are_forgotten() {
    let c = cfg();
    let t = Instant::now();
    let mut s = job(t, 2, 0, &c);
    let ranks = s.ranks.clone();
    let first = s.register(t, reg(Role::Spare), &c).unwrap().id;
    s.session_closed(t, first);
    for _ in 0..1000 {
        let id = s.register(t, reg(Role::Spare), &c).unwrap().id;
        s.session_closed(t, id);
    }
    let fenced = s.members.values().filter(|m| m.is_fenced()).count();
    assert!(fenced <= DEPARTED_KEPT + 1, "{fenced} fenced members kept");
    assert!(s.members.len() <= DEPARTED_KEPT + 3, "{}", s.members.len());
    assert!(!s.members.contains_key(&first));
    assert!(s.session_opened(t, first).is_err());
    assert_eq!(s.ranks, ranks);
    assert!(ranks.iter().all(|id| !s.members[id].is_fenced()));
}

// A drain retried (the admin's client timed out and asked again) lowers the target once.
#[test]
fn a_retried_drain_changes_nothing() {
    let c = cfg();
    let t = Instant::now();
    let mut s = job(t, 4, 0, &c);
    s.drain(Rank(3), &c).unwrap();
    assert_eq!(s.target_world, 3);
    s.drain(Rank(3), &c).unwrap();
    s.drain(Rank(3), &c).unwrap();
    assert_eq!(s.target_world, 3);
}

#[test]
fn first_generation_waits_for_the_target_world() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = State::new("job", 2);
    let a = s.register(t, reg(Role::Active), &cfg).unwrap().id;
    s.session_opened(t, a).unwrap();
    assert_eq!(decide(t, &s, &cfg), Decision::Steady);
    let b = s.register(t, reg(Role::Active), &cfg).unwrap().id;
    s.session_opened(t, b).unwrap();
    let r = regroup(decide(t, &s, &cfg));
    assert_eq!((r.generation, r.ranks), (Generation(1), vec![a, b]));
}

// A closed stream is a crash, seen at once (no timeout), and the survivors regroup.
#[test]
fn crash_is_detected_immediately() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 3, 0, &cfg);
    let dead = s.ranks[1];
    s.session_closed(t, dead);
    let r = regroup(decide(t, &s, &cfg));
    assert_eq!(r.generation, Generation(2));
    assert_eq!(r.removed, vec![(dead, Removal::Crashed)]);
    assert_eq!(r.ranks.len(), 2);
    apply(&mut s, &Decision::Regroup(r));
    assert_eq!(s.members[&dead].state, MemberState::Dead);
}

// A stopped rank sends nothing: it is caught by the heartbeat deadline, not before.
#[test]
fn hang_is_detected_at_the_heartbeat_timeout() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 3, 0, &cfg);
    let hung = s.ranks[2];
    let later = t + cfg.heartbeat_timeout;
    for &id in &s.ranks.clone() {
        if id != hung {
            beat(&mut s, later, id, 1, 50, &cfg);
        }
    }
    assert_eq!(decide(later, &s, &cfg), Decision::Steady);
    let r = regroup(decide(later + Duration::from_millis(1), &s, &cfg));
    assert!(matches!(r.removed[..], [(id, Removal::Silent { .. })] if id == hung));
}

#[test]
fn stalled_progress_is_a_hang_even_with_heartbeats() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 2, 0, &cfg);
    let stuck = s.ranks[0];
    let mut now = t;
    for step in 1..=20 {
        now = t + Duration::from_millis(50 * step);
        all_beat(&mut s, now, step, &cfg);
    }
    // The stuck rank keeps heartbeating at step 20; the other goes on.
    let mut step = 20;
    while now < t + Duration::from_secs(12) {
        now += Duration::from_millis(200);
        step += 1;
        beat(&mut s, now, stuck, 20, 50, &cfg);
        let other = s.ranks[1];
        beat(&mut s, now, other, step, 50, &cfg);
    }
    let r = regroup(decide(now, &s, &cfg));
    assert!(matches!(r.removed[..], [(id, Removal::Stalled { .. })] if id == stuck));
}

// K-8: the split minimises the slowest rank's compute time; it always covers the batch.
#[test]
fn weighted_shares_are_optimal_and_cover_the_batch() {
    assert_eq!(weighted_shares(16, &[1.0, 1.0, 1.0, 1.0]), vec![4, 4, 4, 4]);
    assert_eq!(weighted_shares(16, &[1.0, 1.0, 1.0, 3.0]), vec![5, 5, 5, 1]);
    assert_eq!(weighted_shares(16, &[1.0, 1.0, 1.0, 2.0]), vec![5, 5, 4, 2]);
    assert_eq!(even_shares(10, 4), vec![3, 3, 2, 2]);
    assert!(weighted_shares(3, &[1.0; 4]).is_empty());
    // Brute force over every split of 8 micro-batches on 3 ranks.
    let speeds = [[1.0, 2.0, 3.5], [0.2, 0.9, 0.25], [1.0, 1.0, 7.0]];
    for t in speeds {
        let w = weighted_shares(8, &t);
        assert_eq!(w.iter().sum::<u32>(), 8);
        let mut best = f64::MAX;
        for a in 1..=6u32 {
            for b in 1..=(7 - a) {
                best = best.min(makespan(&[a, b, 8 - a - b], &t));
            }
        }
        assert!((makespan(&w, &t) - best).abs() < 1e-12, "{w:?} for {t:?}");
    }
}

#[test]
fn spare_is_promoted_and_healed_from_the_leader() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 3, 1, &cfg);
    all_beat(&mut s, t, 7, &cfg);
    let spare = *s
        .members
        .values()
        .find(|m| m.state == MemberState::Spare)
        .map(|m| &m.id)
        .unwrap();
    let dead = s.ranks[0];
    s.session_closed(t, dead);
    let r = regroup(decide(t, &s, &cfg));
    assert_eq!(r.ranks.len(), 3);
    assert_eq!(r.promoted, vec![spare]);
    assert_eq!(r.resume_step, Step(7));
    assert_eq!(r.heal, vec![(spare, Rank(0))]);
    apply(&mut s, &Decision::Regroup(r));
    assert_eq!(s.members[&spare].rank, Some(Rank(2)));
}

#[test]
fn shrink_stops_at_min_world() {
    let cfg = CoreConfig {
        min_world: 2,
        ..cfg()
    };
    let t = Instant::now();
    let mut s = job(t, 3, 0, &cfg);
    let a = s.ranks[0];
    s.session_closed(t, a);
    let d = decide(t, &s, &cfg);
    apply(&mut s, &d);
    assert_eq!(s.world(), 2);
    let b = s.ranks[0];
    s.session_closed(t, b);
    match decide(t, &s, &cfg) {
        Decision::Halt { reason } => assert!(reason.contains("min_world = 2"), "{reason}"),
        d => panic!("{d:?}"),
    }
}

#[test]
fn split_brain_majority_silence_is_held() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 5, 0, &cfg);
    let later = t + cfg.heartbeat_timeout + Duration::from_millis(10);
    // Only two of five ranks are heard from.
    for &id in &s.ranks.clone()[..2] {
        beat(&mut s, later, id, 1, 50, &cfg);
    }
    match decide(later, &s, &cfg) {
        Decision::Hold { reason } => assert!(reason.contains("split-brain"), "{reason}"),
        d => panic!("{d:?}"),
    }
    // Crashes seen as closed streams are not ambiguous: three of five crashing regroups.
    let mut s = job(t, 5, 0, &cfg);
    for &id in &s.ranks.clone()[..3] {
        s.session_closed(t, id);
    }
    assert_eq!(regroup(decide(t, &s, &cfg)).ranks.len(), 2);
}

// G-1: a fenced member's heartbeats and reports are refused; generations only increase.
#[test]
fn stale_generation_is_refused() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 3, 0, &cfg);
    let hung = s.ranks[2];
    let later = t + cfg.heartbeat_timeout * 2;
    for &id in &s.ranks.clone()[..2] {
        beat(&mut s, later, id, 1, 50, &cfg);
    }
    let d = decide(later, &s, &cfg);
    let g = apply(&mut s, &d);
    assert_eq!(g, Generation(2));
    // The hung rank wakes up and heartbeats for generation 1.
    let hb = HeartbeatMsg {
        generation: Generation(1),
        step: Step(1),
        ..Default::default()
    };
    assert!(matches!(
        s.heartbeat(later, hung, &hb, &cfg),
        Err(RuntimeError::Fenced { .. })
    ));
    assert!(matches!(
        s.session_opened(later, hung),
        Err(RuntimeError::Fenced { .. })
    ));
    let alive = s.ranks[0];
    assert!(matches!(
        s.report_fault(t, alive, Generation(1), Rank(1)),
        Err(RuntimeError::StaleGeneration { .. })
    ));
    let future = HeartbeatMsg {
        generation: Generation(9),
        ..Default::default()
    };
    assert!(s.heartbeat(later, alive, &future, &cfg).is_err());
}

#[test]
fn majority_of_fault_reports_evicts_the_suspect() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 4, 0, &cfg);
    let (a, b, c, d) = (s.ranks[0], s.ranks[1], s.ranks[2], s.ranks[3]);
    s.report_fault(t, a, Generation(1), Rank(3)).unwrap();
    assert_eq!(decide(t, &s, &cfg), Decision::Steady);
    s.report_fault(t, b, Generation(1), Rank(3)).unwrap();
    let r = regroup(decide(t, &s, &cfg));
    assert!(
        matches!(&r.removed[..], [(id, Removal::Reported { by })] if *id == d && by.len() == 2)
    );
    let _ = c;
}

// every rank reported a different suspect (no majority): nothing happens until the
// heartbeat deadline has passed with everyone alive, then the same members regroup.
#[test]
fn reports_without_a_majority_regroup_after_the_heartbeat_deadline() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 4, 0, &cfg);
    let ids = s.ranks.clone();
    for (i, id) in ids.iter().enumerate() {
        s.report_fault(t, *id, Generation(1), Rank(((i + 1) % 4) as u32))
            .unwrap();
    }
    assert_eq!(decide(t, &s, &cfg), Decision::Steady);
    let later = t + cfg.heartbeat_timeout + Duration::from_millis(1);
    all_beat(&mut s, later, 10, &cfg);
    let r = regroup(decide(later, &s, &cfg));
    assert!(r.removed.is_empty(), "{r:?}");
    assert_eq!(r.ranks, ids);
    assert!(r.reason.contains("no agreed suspect"), "{}", r.reason);
    apply(&mut s, &Decision::Regroup(r));
    assert_eq!(decide(later, &s, &cfg), Decision::Steady);
}

// a rank that restarted its compute reports itself; the job regroups with the same
// members, and the other ranks' reports of it do not evict it.
#[test]
fn self_report_regroups_without_evicting() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 3, 0, &cfg);
    let (a, b, c) = (s.ranks[0], s.ranks[1], s.ranks[2]);
    s.report_fault(t, c, Generation(1), Rank(2)).unwrap();
    s.report_fault(t, a, Generation(1), Rank(2)).unwrap();
    s.report_fault(t, b, Generation(1), Rank(2)).unwrap();
    let r = regroup(decide(t, &s, &cfg));
    assert!(r.removed.is_empty(), "{r:?}");
    assert_eq!(r.ranks, vec![a, b, c]);
    assert_eq!(r.generation, Generation(2));
    assert!(r.reason.contains("asked for a regroup"), "{}", r.reason);
    apply(&mut s, &Decision::Regroup(r));
    assert_eq!(decide(t, &s, &cfg), Decision::Steady);
}

#[test]
fn rejoin_after_restart_keeps_the_generation() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 2, 0, &cfg);
    let (a, b) = (s.ranks[0], s.ranks[1]);
    // The coordinator restarts from its journal.
    s.await_rejoin(t, &cfg);
    let mut ra = reg(Role::Active);
    ra.rejoin = Some((a, Generation(1), Rank(0)));
    assert!(s.register(t, ra, &cfg).unwrap().rejoined);
    s.session_opened(t, a).unwrap();
    let mut rb = reg(Role::Active);
    rb.rejoin = Some((b, Generation(1), Rank(1)));
    assert!(s.register(t, rb, &cfg).unwrap().rejoined);
    s.session_opened(t, b).unwrap();
    assert_eq!(
        decide(t + cfg.heartbeat_timeout / 2, &s, &cfg),
        Decision::Steady
    );
    assert_eq!(s.generation, Generation(1));
    // A member that never comes back is removed once the grace has passed.
    let mut s2 = job(t, 2, 0, &cfg);
    s2.await_rejoin(t, &cfg);
    let mut ra = reg(Role::Active);
    ra.rejoin = Some((s2.ranks[0], Generation(1), Rank(0)));
    s2.register(t, ra, &cfg).unwrap();
    s2.session_opened(t, s2.ranks[0]).unwrap();
    let late = t + cfg.rejoin_grace + Duration::from_millis(1);
    let first = s2.ranks[0];
    beat(&mut s2, late, first, 1, 50, &cfg);
    let r = regroup(decide(late, &s2, &cfg));
    assert_eq!(r.removed[0].1, Removal::NotRejoined);
}

// K-11: a coordinator waking from a stall may read a rank's re-registration before the end of
// the stream it replaces; the rank keeps its member id and place (the suite once saw it
// registered as a new member, and its old self removed as "did not re-register").
#[test]
fn a_member_re_registering_before_its_stream_end_is_read_keeps_its_place() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 2, 0, &cfg);
    let a = s.ranks[0];
    let mut ra = reg(Role::Active);
    ra.rejoin = Some((a, Generation(1), Rank(0)));
    let r = s.register(t, ra, &cfg).unwrap();
    assert!(r.rejoined);
    assert_eq!(r.id, a);
    s.session_opened(t, a).unwrap();
    assert_eq!(decide(t, &s, &cfg), Decision::Steady);
    // A retry of a registration whose answer was lost while a regroup went on names the
    // generation before it: the same member, kept in its place (the suite once saw every rank
    // of a job registered anew this way, their old selves silent, and the job held).
    let mut stale = reg(Role::Active);
    stale.rejoin = Some((a, Generation(0), Rank(0)));
    let r = s.register(t, stale, &cfg).unwrap();
    assert!(r.rejoined);
    assert_eq!(r.id, a);
    assert_eq!(s.members.len(), 2);
}

// K-11: after a stall the coordinator awaits the ranks; one rejoins and asks for a regroup,
// which forms before the other is back. The other names the generation it knew: it missed a
// regroup that kept it, so it keeps its id (not refused as stale, its process replaced and its
// old self removed 10 s later), and so does a retry of that registration.
#[test]
fn a_rejoin_across_a_regroup_keeps_the_member() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 2, 0, &cfg);
    let (a, b) = (s.ranks[0], s.ranks[1]);
    s.await_rejoin(t, &cfg);
    let mut rb = reg(Role::Active);
    rb.rejoin = Some((b, Generation(1), Rank(1)));
    assert_eq!(s.register(t, rb, &cfg).unwrap().id, b);
    s.session_opened(t, b).unwrap();
    s.report_fault(t, b, Generation(1), Rank(1)).unwrap();
    let r = regroup(decide(t, &s, &cfg));
    apply(&mut s, &Decision::Regroup(r));
    assert_eq!(s.generation, Generation(2));
    for _ in 0..2 {
        let mut ra = reg(Role::Active);
        ra.rejoin = Some((a, Generation(1), Rank(0)));
        let again = s.register(t, ra, &cfg).unwrap();
        assert_eq!((again.id, again.rejoined), (a, true));
    }
    s.session_opened(t, a).unwrap();
    let later = t + Duration::from_millis(100);
    all_beat(&mut s, later, 1, &cfg);
    assert_eq!(decide(later, &s, &cfg), Decision::Steady);
    assert_eq!(s.members.len(), 2);
}

// K-5: a spare that registered before the first generation (it knows generation 0) rejoins a
// restarted coordinator at generation 1 as the spare it was, under its id.
#[test]
fn a_spare_from_an_earlier_generation_rejoins_as_itself() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = State::new("job", 2);
    for _ in 0..2 {
        let r = s.register(t, reg(Role::Active), &cfg).unwrap();
        s.session_opened(t, r.id).unwrap();
    }
    let spare = s.register(t, reg(Role::Spare), &cfg).unwrap().id;
    s.session_opened(t, spare).unwrap();
    let d = decide(t, &s, &cfg);
    apply(&mut s, &d);
    assert_eq!(s.generation, Generation(1));
    assert!(!s.ranks.contains(&spare));
    s.await_rejoin(t, &cfg);
    let mut again = reg(Role::Spare);
    again.rejoin = Some((spare, Generation(0), Rank(0)));
    let r = s.register(t, again, &cfg).unwrap();
    assert!(r.rejoined, "{r:?}");
    assert_eq!(r.id, spare);
}

#[test]
fn scale_and_drain_bounds() {
    let cfg = CoreConfig {
        max_world: 8,
        ..cfg()
    };
    let t = Instant::now();
    let mut s = job(t, 2, 2, &cfg);
    assert!(s.scale(0, &cfg).is_err());
    assert!(s.scale(9, &cfg).is_err());
    s.scale(4, &cfg).unwrap();
    let r = regroup(decide(t, &s, &cfg));
    assert_eq!(r.ranks.len(), 4);
    assert_eq!(r.heal.len(), 2);
    apply(&mut s, &Decision::Regroup(r));
    s.drain(Rank(3), &cfg).unwrap();
    let r = regroup(decide(t, &s, &cfg));
    assert_eq!(r.ranks.len(), 3);
    assert_eq!(r.removed[0].1, Removal::Drained);
    apply(&mut s, &Decision::Regroup(r));
    // The last rank cannot be drained.
    let mut one = job(t, 1, 0, &cfg);
    assert!(one.drain(Rank(0), &cfg).is_err());
    assert!(s.drain(Rank(7), &cfg).is_err());
}

#[test]
fn wrong_job_and_config_are_refused() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 1, 0, &cfg);
    let mut r = reg(Role::Spare);
    r.job_id = "other".into();
    assert!(matches!(
        s.register(t, r, &cfg),
        Err(RuntimeError::WrongJob { .. })
    ));
    let mut r = reg(Role::Spare);
    r.config_hash = "different".into();
    assert!(matches!(
        s.register(t, r, &cfg),
        Err(RuntimeError::ConfigMismatch { .. })
    ));
}

// K-13: spares are released once every rank of the generation finished, not before (under srun
// or mpiexec a spare left waiting would hold the batch job until its time limit).
#[test]
fn spares_are_released_once_every_rank_finished() {
    let cfg = cfg();
    let t = Instant::now();
    let mut s = job(t, 2, 1, &cfg);
    assert!(s.spares_after_the_end().is_empty());
    let done = |s: &mut State, id| {
        let hb = HeartbeatMsg {
            generation: s.generation,
            step: Step(10),
            collective_seq: 10,
            phase: Phase::Done,
            ..Default::default()
        };
        s.heartbeat(t, id, &hb, &cfg).unwrap();
    };
    let (a, b) = (s.ranks[0], s.ranks[1]);
    done(&mut s, a);
    assert!(
        s.spares_after_the_end().is_empty(),
        "one rank is still training"
    );
    done(&mut s, b);
    let spare = s
        .members
        .values()
        .find(|m| m.state == MemberState::Spare)
        .map(|m| m.id)
        .unwrap();
    assert_eq!(s.spares_after_the_end(), vec![spare]);
}
