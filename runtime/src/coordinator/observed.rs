//! What members say about themselves that no decision depends on: the address each advertises
//! and the transport to each peer of its group. Kept for `phalanx status` and the events, and
//! checked like any client input (bounded, named kinds).

use super::core::MemberId;
use crate::dataplane::links::summary;
use crate::dataplane::{Link, PeerLink};
use crate::error::RuntimeError;
use crate::ids::{Generation, Rank};
use phalanx_proto::pb;
use std::collections::HashMap;

/// The most links a heartbeat carries (one per peer) and lanes per link.
const MAX_LINKS: usize = 4096;
const MAX_LANES: usize = 16;
const MAX_LANE_TEXT: usize = 64;

#[derive(Debug, Default)]
pub struct Observed {
    links: HashMap<MemberId, (Generation, Vec<PeerLink>)>,
    addresses: HashMap<MemberId, String>,
}

fn kind_of(k: i32) -> Result<Link, RuntimeError> {
    match pb::LinkKind::try_from(k) {
        Ok(pb::LinkKind::SharedMemory) => Ok(Link::SharedMemory),
        Ok(pb::LinkKind::Tcp) => Ok(Link::Tcp),
        Ok(pb::LinkKind::Rdma) => Ok(Link::Rdma),
        Ok(pb::LinkKind::Other) => Ok(Link::Other),
        _ => Err(RuntimeError::InvalidMessage {
            what: format!("link kind {k} is not one of shared memory, tcp, rdma, other"),
        }),
    }
}

pub fn to_pb(l: &PeerLink) -> pb::PeerLink {
    pb::PeerLink {
        peer_rank: l.peer.0,
        kind: match l.link {
            Link::SharedMemory => pb::LinkKind::SharedMemory,
            Link::Tcp => pb::LinkKind::Tcp,
            Link::Rdma => pb::LinkKind::Rdma,
            Link::Other => pb::LinkKind::Other,
        } as i32,
        lanes: l.lanes.clone(),
    }
}

/// A heartbeat's links, checked.
pub fn from_pb(links: &[pb::PeerLink]) -> Result<Vec<PeerLink>, RuntimeError> {
    if links.len() > MAX_LINKS {
        return Err(RuntimeError::InvalidMessage {
            what: format!("{} links; at most {MAX_LINKS}", links.len()),
        });
    }
    links
        .iter()
        .map(|l| {
            if l.lanes.len() > MAX_LANES || l.lanes.iter().any(|x| x.len() > MAX_LANE_TEXT) {
                return Err(RuntimeError::InvalidMessage {
                    what: format!("at most {MAX_LANES} lanes of {MAX_LANE_TEXT} bytes per link"),
                });
            }
            Ok(PeerLink {
                peer: Rank(l.peer_rank),
                link: kind_of(l.kind)?,
                lanes: l.lanes.clone(),
            })
        })
        .collect()
}

impl Observed {
    pub fn set_address(&mut self, id: MemberId, address: String) {
        self.addresses.insert(id, address);
    }

    pub fn address(&self, id: MemberId) -> String {
        self.addresses.get(&id).cloned().unwrap_or_default()
    }

    /// Records a member's links in `generation`; the summary when they are new (the event).
    pub fn set_links(
        &mut self,
        id: MemberId,
        generation: Generation,
        links: Vec<PeerLink>,
    ) -> Option<String> {
        let new = self
            .links
            .get(&id)
            .is_none_or(|(g, l)| *g != generation || *l != links);
        let s = summary(&links);
        self.links.insert(id, (generation, links));
        new.then_some(s)
    }

    /// The member's links if they are of `generation` (older ones describe a group that is gone).
    pub fn links(&self, id: MemberId, generation: Generation) -> Vec<PeerLink> {
        match self.links.get(&id) {
            Some((g, l)) if *g == generation => l.clone(),
            _ => Vec::new(),
        }
    }

    pub fn forget(&mut self, id: MemberId) {
        self.links.remove(&id);
        self.addresses.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_round_trip_and_bad_kinds_are_refused() {
        let l = PeerLink::new(Rank(1), vec![("tcp".into(), "eth0".into())]);
        assert_eq!(from_pb(&[to_pb(&l)]).unwrap(), vec![l.clone()]);
        let mut bad = to_pb(&l);
        bad.kind = 99;
        assert!(from_pb(&[bad]).is_err());
        let mut long = to_pb(&l);
        long.lanes = vec!["x".repeat(200)];
        assert!(from_pb(&[long]).is_err());
    }

    #[test]
    fn links_are_news_once_per_generation_and_stale_ones_are_not_shown() {
        let mut o = Observed::default();
        let l = vec![PeerLink::new(Rank(1), vec![("tcp".into(), "eth0".into())])];
        assert_eq!(
            o.set_links(7, Generation(2), l.clone()).as_deref(),
            Some("tcp to rank 1")
        );
        assert_eq!(o.set_links(7, Generation(2), l.clone()), None);
        assert!(o.set_links(7, Generation(3), l.clone()).is_some());
        assert_eq!(o.links(7, Generation(3)), l);
        assert!(o.links(7, Generation(4)).is_empty());
    }
}
