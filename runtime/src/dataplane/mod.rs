//! Data plane: transports between ranks and collectives on them.
//!
//! - [`transport`]: the `Transport` contract and the wire format (tags, control messages).
//! - [`collectives`]: ring allreduce, reduce-scatter, allgather, broadcast, barrier, striped
//!   point-to-point, over any transport.
//! - `mesh`: allreduce, reduce-scatter and allgather through every rank's shared-memory window,
//!   when all ranks share a node.
//! - [`inproc`]: an in-process transport for fast tests of the algorithms.
//! - [`group`]: the [`Group`] a training loop uses, over UCX or in-process ranks.
//! - [`ucx`]: the UCX transport and [`UcxGroup`], the handle the runtime uses.
//! - [`bootstrap`]: address exchange until the control plane does it.
//! - [`liveness`]: one idle TCP connection per pair of members, so a crash is seen at once.
//! - [`admission`]: the per-generation key that tells members from everyone else.
//! - [`address`]: the address a rank advertises to its peers (one they can reach).
//! - [`links`]: which transport each pair of ranks uses (shared memory, TCP, RDMA).
//!
//! Invariants P-1.. are in docs/semantics.md ("Data plane"); settings in docs/dataplane.md.

pub mod address;
pub mod admission;
pub mod bootstrap;
pub mod collectives;
pub mod group;
pub mod inproc;
pub mod links;
pub mod liveness;
mod mesh;
pub mod transport;
pub mod ucx;

pub use address::{advertised_ip, AddressChoice, AddressSettings, AddressSource};
pub use admission::GroupKey;
pub use bootstrap::{AddressExchange, BootstrapServer, Exchanged, TcpBootstrap};
pub use collectives::{CollConfig, Collectives};
pub use group::{Group, InProcFabrics, InProcGroup};
pub use links::{Link, PeerLink};
pub use transport::Transport;
pub use ucx::{UcxConfig, UcxGroup, UcxStats};
