//! Data plane: transports between ranks and collectives on them.
//!
//! - [`transport`]: the `Transport` contract and the wire format (tags, control messages).
//! - [`collectives`]: ring allreduce, reduce-scatter, allgather, broadcast, barrier, striped
//!   point-to-point, over any transport.
//! - [`inproc`]: an in-process transport for fast tests of the algorithms.
//! - [`ucx`]: the UCX transport and [`UcxGroup`], the handle the runtime uses.
//! - [`bootstrap`]: address exchange until the control plane does it.
//! - [`liveness`]: one idle TCP connection per pair of members, so a crash is seen at once.
//!
//! Invariants P-1.. are in docs/semantics.md ("Data plane"); settings in docs/dataplane.md.

pub mod bootstrap;
pub mod collectives;
pub mod inproc;
pub mod liveness;
pub mod transport;
pub mod ucx;

pub use bootstrap::{AddressExchange, BootstrapServer, TcpBootstrap};
pub use collectives::{CollConfig, Collectives};
pub use transport::Transport;
pub use ucx::{UcxConfig, UcxGroup, UcxStats};
