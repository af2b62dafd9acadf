//! Data plane: transports between ranks and collectives on them.
//!
//! - [`transport`]: the `Transport` contract and the wire format (tags, control messages).
//! - [`collectives`]: ring allreduce, reduce-scatter, allgather, broadcast, barrier, striped
//!   point-to-point, over any transport.
//! - [`inproc`]: an in-process transport for fast tests of the algorithms.
//!
//! Invariants P-1.. are in docs/semantics.md ("Data plane"); settings in docs/dataplane.md.

pub mod collectives;
pub mod inproc;
pub mod transport;

pub use collectives::{CollConfig, Collectives};
pub use transport::Transport;
