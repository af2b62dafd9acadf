//! phalanx-runtime: everything between ranks, and nothing that computes.
//!
//! - `coordinator`: membership, generations, failure and straggler detection as pure decision
//!   functions, and the gRPC service around them.
//! - `dataplane`: the transport between ranks (UCX; an in-process one for tests) and the
//!   fault-aware collectives on it.
//!
//! No libtorch and no actors here (see docs/design.md's layout table).

pub mod coordinator;
pub mod dataplane;
pub mod error;
pub mod events;
pub mod ids;
pub mod metrics;
pub mod random;

pub use error::RuntimeError;
pub use ids::{Generation, Rank, Step};
