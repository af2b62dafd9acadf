//! Which transport each pair of ranks uses, from the UCX lanes of their endpoint: shared memory
//! within a host, TCP or RDMA between hosts. Logged when a group is built, sent to the
//! coordinator (its event and `phalanx status`), so a job that fell back to TCP over loopback,
//! or to TCP where InfiniBand was expected, is seen.

use crate::Rank;
use serde::{Deserialize, Serialize};

/// The kind of a transport, by the UCX transport names that carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    SharedMemory,
    Tcp,
    Rdma,
    /// Only the loopback transport (`self`), or names not known here.
    Other,
}

impl Link {
    /// The kind of one UCX transport (`posix`, `sysv`, `cma`, `tcp`, `rc_mlx5`, ...).
    pub fn of_transport(name: &str) -> Link {
        match name {
            "posix" | "sysv" | "cma" | "knem" | "xpmem" => Link::SharedMemory,
            "tcp" => Link::Tcp,
            n if ["rc", "dc", "ud", "srd"].iter().any(|p| n.starts_with(p)) => Link::Rdma,
            _ => Link::Other,
        }
    }

    /// The kind of an endpoint from its lanes: the best one that moves data (an endpoint to a
    /// peer on the same host may also hold a TCP lane for wire-up; it moves data over shared
    /// memory).
    pub fn of_lanes<'a>(transports: impl IntoIterator<Item = &'a str>) -> Link {
        transports
            .into_iter()
            .map(Link::of_transport)
            .min_by_key(|l| match l {
                Link::SharedMemory => 0,
                Link::Rdma => 1,
                Link::Tcp => 2,
                Link::Other => 3,
            })
            .unwrap_or(Link::Other)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Link::SharedMemory => "shared_memory",
            Link::Tcp => "tcp",
            Link::Rdma => "rdma",
            Link::Other => "other",
        }
    }
}

/// One endpoint of a rank's group: the peer, the kind, and UCX's lanes (`transport/device`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLink {
    pub peer: Rank,
    pub link: Link,
    pub lanes: Vec<String>,
}

impl PeerLink {
    pub fn new(peer: Rank, lanes: Vec<(String, String)>) -> Self {
        PeerLink {
            peer,
            link: Link::of_lanes(lanes.iter().map(|(t, _)| t.as_str())),
            lanes: lanes.into_iter().map(|(t, d)| format!("{t}/{d}")).collect(),
        }
    }
}

/// `tcp to ranks 2, 3; shared_memory to rank 1`: one line for the log and `phalanx status`.
pub fn summary(links: &[PeerLink]) -> String {
    let mut by: std::collections::BTreeMap<Link, Vec<u32>> = Default::default();
    for l in links {
        by.entry(l.link).or_default().push(l.peer.0);
    }
    by.iter()
        .map(|(k, ranks)| {
            let r: Vec<String> = ranks.iter().map(u32::to_string).collect();
            let s = if r.len() == 1 { "" } else { "s" };
            format!("{} to rank{s} {}", k.as_str(), r.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_name_the_transport_that_moves_data() {
        assert_eq!(Link::of_lanes(["posix", "cma", "tcp"]), Link::SharedMemory);
        assert_eq!(Link::of_lanes(["tcp"]), Link::Tcp);
        assert_eq!(Link::of_lanes(["rc_mlx5", "ud_verbs", "tcp"]), Link::Rdma);
        assert_eq!(Link::of_lanes(["dc_mlx5"]), Link::Rdma);
        assert_eq!(Link::of_lanes(["self"]), Link::Other);
        assert_eq!(Link::of_lanes(std::iter::empty::<&str>()), Link::Other);
    }

    #[test]
    fn a_summary_groups_peers_by_transport() {
        let l = |p, t: &str| PeerLink::new(Rank(p), vec![(t.into(), "eth0".into())]);
        let s = summary(&[l(1, "sysv"), l(2, "tcp"), l(3, "tcp")]);
        assert_eq!(s, "shared_memory to rank 1; tcp to ranks 2, 3");
        assert_eq!(l(2, "tcp").lanes, vec!["tcp/eth0".to_string()]);
    }
}
