//! `ComputeActor`: the data-parallel training loop, on a dedicated OS thread.
//!
//! For each generation it gets the group from the communicator, brings every rank to the
//! same committed state (G-2), and runs steps until the job ends or a collective fails; the
//! step in flight is then redone in the next generation with the same global batch (G-1).
//! libtorch never runs on a tokio worker. The model lives in [`ModelSlot`], so a restarted
//! incarnation takes over its predecessor's state unless that state was torn mid-update.

use crate::ckpt::{CheckpointerMsg, PartSave};
use crate::comm::{CommunicatorMsg, SharedGroup};
use crate::faults;
use crate::loader;
use crate::rank::{
    Assignment, Control, Directive, Shared, EXIT_DONE, EXIT_FENCED, EXIT_HALTED, EXIT_PREEMPTED,
    PHASE_DONE, PHASE_HEALING, PHASE_IDLE, PHASE_TRAINING,
};
use crate::supervisor::{finish_reason, spawn_body, Heart};
use crate::{ActorError, Setup};
use phalanx_checkpoint::sharded;
use phalanx_model::io as model_io;
use phalanx_model::optim::lr_at;
use phalanx_model::trainer::val_ids;
use phalanx_proto::pb;
use phalanx_runtime::dataplane::Group;
use phalanx_runtime::events::{append_lines, unix_ms};
use phalanx_runtime::metrics::{
    FinalLine, MetricLine, ResumeLine, RollbackCause, RollbackLine, StepLine,
};
use phalanx_runtime::{Generation, Rank, RuntimeError};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;
use tracing::{info, warn};

mod fixed_point;
mod generation;
mod ledger;
mod rank_loop;
mod saving;
mod staging;
mod state_sync;
mod step;
#[cfg(test)]
mod tests;
mod verdict;
mod zero;
mod zero_plan;
mod zero_replica;

pub use fixed_point::fixed;
use fixed_point::*;
use rank_loop::*;
use saving::Place;
use state_sync::*;
pub use state_sync::{odd_ranks, quick_fingerprint, state_fingerprint};
use verdict::*;
pub use verdict::{pack, unpack, verdict, Flags, Parts, Summed, Verdict};

pub struct ComputeActor;

pub struct ComputeArgs {
    pub shared: Arc<Shared>,
    pub heart: Heart,
    pub incarnation: u64,
}

pub enum ComputeMsg {
    /// The thread ended: `Ok((code, why))` the rank's work is over, `Err` it failed.
    Ended(Result<(i32, String), ActorError>),
}

pub struct ComputeState {
    cancel: Arc<AtomicBool>,
}

impl Drop for ComputeState {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Actor for ComputeActor {
    type Msg = ComputeMsg;
    type State = ComputeState;
    type Arguments = ComputeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ComputeArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let cancel = spawn_body("phalanx-compute", myself, ComputeMsg::Ended, move |c| {
            Loop::new(&args.shared, &args.heart, c, args.incarnation).run()
        })?;
        Ok(ComputeState { cancel })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: ComputeMsg,
        _st: &mut ComputeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ComputeMsg::Ended(Ok((code, why))) => {
                myself.stop(Some(finish_reason(code, &why)));
                Ok(())
            }
            ComputeMsg::Ended(Err(e)) => Err(e.into()),
        }
    }
}

/// Holds the model while an incarnation runs and hands it back when it ends, however it
/// ends (a panic unwinds through this guard).
struct SlotGuard<'a> {
    shared: &'a Shared,
    setup: Option<Setup>,
    torn: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut slot = self.shared.model.lock();
        slot.setup = self.setup.take();
        slot.torn = self.torn;
        self.shared.model_back.notify_all();
    }
}
