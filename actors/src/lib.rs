//! phalanx-actors: one rank of a job as a ractor supervision tree, and the data-parallel
//! training loop across ranks.
//!
//! - [`policy`]: the supervisor's decisions (restart strategies, intensity, watchdog) as
//!   pure functions;
//! - [`supervisor`]: `RankSupervisor`, which carries them out over any children;
//! - [`rank`]: the rank's children (control agent, data loader, communicator, compute,
//!   checkpointer) and [`rank::run`];
//! - [`model_io`]: saving and loading a model through the checkpoint format.

pub mod ckpt;
pub mod comm;
pub mod compute;
pub mod control;
pub mod error;
mod faults;
pub mod loader;
pub mod model_io;
pub mod policy;
pub mod rank;
pub mod supervisor;

pub use error::{ActorError, Result};

use phalanx_model::data::Dataset;
use phalanx_model::sampler::Sampler;
use phalanx_model::trainer::{Trainer, Windows};

/// Everything a training run needs before its first step.
pub struct Setup {
    pub ds: Dataset,
    pub trainer: Trainer,
    pub sampler: Sampler,
    pub win: Windows,
    pub threads: usize,
}
