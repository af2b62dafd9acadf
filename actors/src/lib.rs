//! phalanx-actors: one rank of a job as a ractor supervision tree, and the data-parallel
//! training loop across ranks.
//!
//! - [`policy`]: the supervisor's decisions (restart strategies, intensity, watchdog) as
//!   pure functions;
//! - [`supervisor`]: `RankSupervisor`, which carries them out over any children;
//! - [`rank`]: the rank's children (control agent, data loader, communicator, compute,
//!   checkpointer) and [`rank::run`];

pub mod ckpt;
pub mod comm;
pub mod compute;
pub mod control;
pub mod error;
mod faults;
pub mod loader;
pub mod policy;
pub mod preempt;
pub mod rank;
pub mod supervisor;

pub use error::{ActorError, Result};

pub use phalanx_model::Setup;
