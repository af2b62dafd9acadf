//! The coordinator's own stalls (K-11). A coordinator that was stopped, starved of CPU or cut
//! off finds, when it runs again, every member silent and perhaps every stream closed: that is
//! its own absence, not the members' deaths. Evicting them would remove the majority and defeat
//! the split-brain hold (K-3), so a stall resets the silence clocks and turns closed streams
//! into members waiting to re-register (as after a restart, K-5) for `rejoin_grace`.

use super::core::{CoreConfig, MemberState, State};
use std::time::{Duration, Instant};

/// A gap between two decisions longer than this is the coordinator's own stall: the decision
/// loop runs every tick (50 ms), so it is far above any scheduling delay and well under the
/// heartbeat deadline that would evict.
pub fn stall_threshold(cfg: &CoreConfig) -> Duration {
    cfg.heartbeat_timeout * 2 / 3
}

impl State {
    /// Called before each decision with the time of the previous one; the length of the stall,
    /// if there was one.
    pub fn observe_clock(
        &mut self,
        now: Instant,
        last: Instant,
        cfg: &CoreConfig,
    ) -> Option<Duration> {
        let gap = now.saturating_duration_since(last);
        if gap < stall_threshold(cfg) {
            return None;
        }
        let deadline = now + cfg.rejoin_grace;
        for m in self.members.values_mut().filter(|m| !m.is_fenced()) {
            m.last_heartbeat = now;
            m.last_progress = now;
            if !m.connected && m.state == MemberState::Active {
                m.rejoin_deadline.get_or_insert(deadline);
            }
        }
        // Streams whose end the coordinator has yet to read are closed within a keepalive
        // round of waking up.
        self.stall_grace = Some((now + cfg.heartbeat_timeout * 2, deadline));
        self.rebuild_live();
        Some(gap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::core::{decide, Decision, Role};
    use crate::coordinator::testkit::{cfg, job};
    use crate::{Generation, Rank};

    // K-11: after a 3 s stall every rank is silent and two streams are closed (one before the
    // stall was noticed, one after): nobody is removed; the closed ones wait to re-register.
    #[test]
    fn a_stall_of_the_coordinator_evicts_nobody() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut s = job(t0, 4, 0, &cfg);
        let ids = s.ranks.clone();
        let t1 = t0 + Duration::from_secs(3);
        s.session_closed(t1, ids[1]);
        assert!(s
            .observe_clock(t1, t0 + Duration::from_millis(50), &cfg)
            .is_some());
        s.session_closed(t1 + Duration::from_millis(20), ids[2]);
        let d = decide(t1 + Duration::from_millis(30), &s, &cfg);
        assert!(matches!(d, Decision::Steady), "{d:?}");
        for id in [ids[1], ids[2]] {
            assert!(s.members[&id].rejoin_deadline.is_some());
        }
        // A member that never comes back is removed once its grace is over.
        let late = t1 + cfg.rejoin_grace + Duration::from_secs(1);
        s.stall_grace = None;
        for &id in &[ids[0], ids[2], ids[3]] {
            s.members.get_mut(&id).unwrap().last_heartbeat = late;
            s.members.get_mut(&id).unwrap().connected = true;
            s.members.get_mut(&id).unwrap().rejoin_deadline = None;
        }
        s.rebuild_live();
        assert!(matches!(decide(late, &s, &cfg), Decision::Regroup(_)));
    }

    // K-11, seen in the suite: waking from a stall, the coordinator reads a rank's
    // re-registration, then the end of the stream it replaces (within the stall's grace, so a
    // deadline to re-register is set), then the rank's new session. The rank trains on: it is
    // not removed once the deadline has passed.
    #[test]
    fn a_stream_end_read_between_a_rejoin_and_its_session_evicts_nobody() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut s = job(t0, 4, 0, &cfg);
        let a = s.ranks[2];
        let t1 = t0 + Duration::from_secs(3);
        assert!(s
            .observe_clock(t1, t0 + Duration::from_millis(50), &cfg)
            .is_some());
        let mut again = crate::coordinator::testkit::reg(Role::Active);
        again.rejoin = Some((a, Generation(1), Rank(2)));
        assert!(s.register(t1, again, &cfg).unwrap().rejoined);
        s.session_closed(t1 + Duration::from_millis(5), a);
        s.session_opened(t1 + Duration::from_millis(10), a).unwrap();
        let late = t1 + cfg.rejoin_grace + Duration::from_secs(1);
        for &id in &s.ranks.clone() {
            s.members.get_mut(&id).unwrap().last_heartbeat = late;
        }
        s.rebuild_live();
        assert_eq!(decide(late, &s, &cfg), Decision::Steady);
    }

    // Without a stall a closed stream is still a crash at once (G-1).
    #[test]
    fn a_closed_stream_without_a_stall_is_a_crash() {
        let cfg = cfg();
        let t0 = Instant::now();
        let mut s = job(t0, 4, 0, &cfg);
        let id = s.ranks[1];
        let t1 = t0 + Duration::from_millis(100);
        assert!(s
            .observe_clock(t1, t0 + Duration::from_millis(50), &cfg)
            .is_none());
        s.session_closed(t1, id);
        assert!(matches!(decide(t1, &s, &cfg), Decision::Regroup(_)));
    }
}
