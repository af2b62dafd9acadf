//! Fuzzing (issue "Trust and restarts", item 8) with fixed budgets: protobuf messages from
//! untrusted bytes, and arbitrary sequences of the events the decision core sees. Nothing
//! panics, and the core's invariants hold after every step.

use super::core::*;
use super::observed;
use super::testkit::{cfg, reg};
use crate::ids::{Generation, Rank, Step};
use phalanx_proto::pb;
use proptest::prelude::*;
use prost::Message;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    // Any bytes decode to a message or an error; what decodes passes the service's checks or
    // is refused, without a panic.
    #[test]
    fn protobuf_from_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = pb::RegisterRequest::decode(bytes.as_slice());
        let _ = pb::FaultReport::decode(bytes.as_slice());
        let _ = pb::RendezvousRequest::decode(bytes.as_slice());
        if let Ok(m) = pb::RankMessage::decode(bytes.as_slice()) {
            if let Some(pb::rank_message::Msg::Heartbeat(h)) = m.msg {
                let _ = h.links.as_ref().map(|g| observed::from_pb(&g.links));
            }
        }
    }
}

/// One event the core can see.
#[derive(Debug, Clone)]
enum Ev {
    Register(bool),
    Open(u8),
    Close(u8),
    Beat { who: u8, step: u8, ms: u16 },
    Report { who: u8, suspect: u8 },
    Scale(u8),
    Drain(u8),
    Advance(u16),
    Decide,
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        any::<bool>().prop_map(Ev::Register),
        any::<u8>().prop_map(Ev::Open),
        any::<u8>().prop_map(Ev::Close),
        (any::<u8>(), any::<u8>(), any::<u16>()).prop_map(|(who, step, ms)| Ev::Beat {
            who,
            step,
            ms
        }),
        (any::<u8>(), any::<u8>()).prop_map(|(who, suspect)| Ev::Report { who, suspect }),
        (0u8..8).prop_map(Ev::Scale),
        any::<u8>().prop_map(Ev::Drain),
        any::<u16>().prop_map(Ev::Advance),
        Just(Ev::Decide),
        Just(Ev::Decide),
    ]
}

/// What must hold after every event: generations only move forward, a generation's ranks are
/// distinct active members that know their place, and it is never larger than the job allows.
fn check(s: &State, before: Generation, c: &CoreConfig) -> Result<(), TestCaseError> {
    prop_assert!(s.generation >= before);
    let distinct: BTreeSet<_> = s.ranks.iter().collect();
    prop_assert_eq!(distinct.len(), s.ranks.len());
    prop_assert!(s.ranks.len() <= c.max_world);
    for (r, id) in s.ranks.iter().enumerate() {
        let m = &s.members[id];
        prop_assert_eq!(m.state, MemberState::Active);
        prop_assert_eq!(m.rank, Some(Rank(r as u32)));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn core_event_sequences_keep_the_invariants(events in proptest::collection::vec(ev(), 1..120)) {
        let c = CoreConfig { max_world: 6, ..cfg() };
        let mut s = State::new("job", 3);
        let mut now = Instant::now();
        let mut ids: Vec<MemberId> = Vec::new();
        let pick = |ids: &[MemberId], i: u8| ids.get(i as usize % ids.len().max(1)).copied();
        for e in events {
            let before = s.generation;
            match e {
                Ev::Register(spare) => {
                    let role = if spare { Role::Spare } else { Role::Active };
                    if let Ok(r) = s.register(now, reg(role), &c) {
                        ids.push(r.id);
                    }
                }
                Ev::Open(i) => if let Some(id) = pick(&ids, i) { let _ = s.session_opened(now, id); },
                Ev::Close(i) => if let Some(id) = pick(&ids, i) { s.session_closed(now, id); },
                Ev::Beat { who, step, ms } => if let Some(id) = pick(&ids, who) {
                    let hb = HeartbeatMsg {
                        generation: s.generation,
                        step: Step(step as u64),
                        collective_seq: step as u64,
                        phase: Phase::Training,
                        last_step_time: Duration::from_millis(ms as u64),
                        last_compute_time: Duration::from_millis(ms as u64 / 2),
                        recent: vec![StepSample {
                            step: Step(step as u64),
                            compute: Duration::from_millis(ms as u64 / 2),
                            fixed: Duration::from_millis(1),
                            micro_batches: 1,
                        }],
                    };
                    let _ = s.heartbeat(now, id, &hb, &c);
                },
                Ev::Report { who, suspect } => if let Some(id) = pick(&ids, who) {
                    let _ = s.report_fault(now, id, s.generation, Rank(suspect as u32 % 8));
                },
                Ev::Scale(n) => { let _ = s.scale(n as usize, &c); },
                Ev::Drain(r) => { let _ = s.drain(Rank(r as u32 % 8), &c); },
                Ev::Advance(ms) => now += Duration::from_millis(ms as u64),
                Ev::Decide => {
                    let d = decide(now, &s, &c);
                    apply(&mut s, &d);
                }
            }
            check(&s, before, &c)?;
        }
    }
}
