//! The one error type of the runtime crate.

use crate::ids::{Generation, Rank};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    // --- data plane ---
    /// A peer died, was stopped, or is unreachable: the collective cannot complete.
    #[error("peer rank {rank} failed during {op}: {reason}")]
    PeerFailed {
        rank: Rank,
        op: &'static str,
        reason: String,
    },
    /// An operation did not complete within its deadline.
    #[error("{op} timed out after {after:?} (generation {generation}); a peer may be hung or partitioned")]
    Timeout {
        op: &'static str,
        after: Duration,
        generation: Generation,
    },
    /// The coordinator replaced this generation because a member failed (P-10): its
    /// collectives cannot complete, and the rank goes on in the newer one.
    #[error("{op} gave up generation {generation}: the coordinator replaced it after a member failed; this rank goes on in the newer generation (nothing to do)")]
    Abandoned {
        op: &'static str,
        generation: Generation,
    },
    /// A peer sent bytes that are not a valid message of this group.
    #[error("malformed message from rank {from} during {op}: {reason}; the peer runs another phalanx version or is not a member of this group")]
    MalformedMessage {
        from: Rank,
        op: &'static str,
        reason: String,
    },
    /// A message of the wrong size arrived: the ranks called the collective with different
    /// buffer lengths.
    #[error("{op}: rank {from} sent {got} bytes where {expected} were expected; every rank must pass a buffer of the same length")]
    MessageLength {
        from: Rank,
        op: &'static str,
        expected: usize,
        got: usize,
    },
    /// An earlier failure broke the group; nothing more can run on it.
    #[error("{op}: the data-plane group of generation {generation} is broken ({cause}); tear it down and build the next generation")]
    GroupBroken {
        op: &'static str,
        generation: Generation,
        cause: String,
    },
    /// A caller passed an argument the data plane cannot act on.
    #[error("{op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },
    /// The UCX library refused an operation (initialisation, endpoint creation, ...).
    #[error("UCX {op} failed: {reason}; check UCX_TLS / UCX_NET_DEVICES (docs/dataplane.md)")]
    Transport { op: &'static str, reason: String },
    /// No address this rank's peers can reach it at could be chosen.
    #[error("cannot choose the address peers reach this rank at: {reason}; set dataplane.address or dataplane.interface (or PHALANX_ADDRESS / PHALANX_SOCKET_IFNAME), see docs/dataplane.md")]
    Address { reason: String },
    /// The address exchange before a group is built failed.
    #[error("bootstrap via {addr} failed: {reason}")]
    Bootstrap { addr: String, reason: String },

    // --- control plane ---
    #[error("member {member} is not registered with this coordinator; register again")]
    UnknownMember { member: u64 },
    #[error("the caller is not member {member}: its member secret does not match the one Register gave; a member speaks only for itself")]
    NotThisMember { member: u64 },
    #[error("job id {got:?} does not match this coordinator's job {want:?}; point the worker at its own job's coordinator")]
    WrongJob { got: String, want: String },
    #[error("no random source for {what} ({reason}); check that /dev/urandom is readable, or set the secret yourself where a setting allows it")]
    NoRandomSource { what: String, reason: String },
    #[error("config hash {got} differs from the job's {want}: this worker's model config or dataset is not the job's; start it with the job's config (the job's hash is the coordinator's --config-hash, else its first worker's, named in the config_hash_pinned event)")]
    ConfigMismatch { got: String, want: String },
    #[error("member {member} was fenced out of the job (now at generation {generation}); restart the process to join as a new spare")]
    Fenced { member: u64, generation: Generation },
    #[error("stale generation {got}: the job is at generation {current}")]
    StaleGeneration {
        got: Generation,
        current: Generation,
    },
    #[error("invalid message: {what}")]
    InvalidMessage { what: String },
    #[error("refused: {what}")]
    InvalidRequest { what: String },
    #[error("coordinator journal {path}: {reason}")]
    Journal { path: String, reason: String },
    #[error("cannot write the event log {path}: {reason} (check that the run directory is writable and the disk is not full)")]
    EventLog { path: String, reason: String },
    #[error("the coordinator's decision loop panicked ({what}); the coordinator stopped with its journal on disk: restart it")]
    DecisionLoop { what: String },
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("coordinator answered {code}: {message}")]
    Rpc { code: String, message: String },
}

/// The one mapping from runtime errors to gRPC statuses.
impl From<RuntimeError> for tonic::Status {
    fn from(e: RuntimeError) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            RuntimeError::UnknownMember { .. } => Status::not_found(msg),
            RuntimeError::NotThisMember { .. } => Status::permission_denied(msg),
            RuntimeError::WrongJob { .. }
            | RuntimeError::ConfigMismatch { .. }
            | RuntimeError::Fenced { .. }
            | RuntimeError::StaleGeneration { .. } => Status::failed_precondition(msg),
            RuntimeError::InvalidMessage { .. }
            | RuntimeError::InvalidRequest { .. }
            | RuntimeError::InvalidArgument { .. } => Status::invalid_argument(msg),
            RuntimeError::Timeout { .. } => Status::deadline_exceeded(msg),
            RuntimeError::Connect { .. } | RuntimeError::PeerFailed { .. } => {
                Status::unavailable(msg)
            }
            _ => Status::internal(msg),
        }
    }
}
