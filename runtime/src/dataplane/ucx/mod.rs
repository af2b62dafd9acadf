//! The UCX transport: one OS thread owns the UCP context, worker and endpoints of a group; the
//! rest of the runtime talks to it through [`UcxGroup`] over channels. UCX objects never leave
//! that thread (the raw handles make the transport `!Send`, so the compiler enforces it).
//!
//! A group is one generation: building the next generation builds a new worker with a new
//! address, so a fenced-out rank that wakes up still holds endpoints to workers that no longer
//! exist and cannot reach the new group at all (P-1); tags carry the generation's low bits as
//! well, and a sweep drops and counts anything of another generation that reaches a worker.
//!
//! Failure handling: endpoints use `UCP_ERR_HANDLING_MODE_PEER` with UCX keepalive; a failed
//! endpoint, a failed request or a wait without progress for `timeout` breaks the group, and the
//! rank that notices tells every other member with an abort message so that all of them fail
//! within milliseconds rather than each waiting out its own deadline (P-3).
//!
//! Rooms:
//! - `ffi`: the UCP C API behind handles that release themselves; the only `unsafe` code of
//!   the workspace besides the token mmap (docs/semantics.md, "Unsafe code"). The other rooms
//!   forbid it; this file denies it, as the workspace does.
//! - `transport`: [`UcxTransport`], building a group and the `Transport` contract over it.
//! - `requests`: posting requests, the wait loop and what each completion means, the sweep,
//!   breaking the group.
//! - `window`: the shared-memory windows of the broadcast.
//! - `group`: [`UcxGroup`], the thread that owns a transport and serves the collectives.

mod ffi;
mod group;
mod requests;
mod transport;
mod window;

pub use group::UcxGroup;
pub use transport::UcxTransport;

use super::collectives::CollConfig;
use crate::error::RuntimeError;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Settings of a UCX group. Defaults and their reasons: docs/dataplane.md.
#[derive(Debug, Clone)]
pub struct UcxConfig {
    pub coll: CollConfig,
    /// UCX keepalive interval, unless `UCX_KEEPALIVE_INTERVAL` is set in the environment.
    pub keepalive: Duration,
    /// Bound on building the group: address exchange plus the handshake with every peer.
    pub connect_timeout: Duration,
    /// How long the worker thread busy-polls without progress before it starts yielding the
    /// core (and, after 5 ms, sleeping on the worker's event fd). 0: yield at once, which is
    /// fastest when ranks share cores; a rank with a core of its own may spin a few us.
    pub spin: Duration,
    /// Address the crash-detection connections listen on (this node's address on a cluster).
    pub liveness_ip: String,
    /// `UCP_ERR_HANDLING_MODE_PEER` on every endpoint. Off, UCX may use transports without
    /// peer-failure support (CMA single-copy reads); crashes are still seen through the
    /// liveness connections and hangs through the deadline. See docs/dataplane.md.
    pub peer_error_mode: bool,
    /// The newest generation that replaced an older one because a member failed (set by the
    /// rank's control session): a wait in an older generation gives up at once (P-10).
    pub abandoned_below: Option<Arc<AtomicU64>>,
}

impl Default for UcxConfig {
    fn default() -> Self {
        UcxConfig {
            coll: CollConfig::default(),
            keepalive: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(30),
            spin: Duration::ZERO,
            liveness_ip: "127.0.0.1".into(),
            peer_error_mode: true,
            abandoned_below: None,
        }
    }
}

/// Counters a group reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UcxStats {
    /// Messages of another generation (or malformed tags) dropped by the sweep.
    pub dropped_stale: u64,
    /// Control messages not signed with the generation's key, dropped unread (P-9).
    pub forged: u64,
    /// Broadcasts that went through the root's shared-memory window (the rest took the chain).
    pub window_broadcasts: u64,
    /// Allreduces, reduce-scatters and allgathers that went through the ranks' shared-memory
    /// windows (P-11; the rest took the ring).
    pub mesh_collectives: u64,
}

fn ucx_err(op: &'static str, st: ffi::Status) -> RuntimeError {
    RuntimeError::Transport {
        op,
        reason: st.to_string(),
    }
}
