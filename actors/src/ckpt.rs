//! `CheckpointerActor`: writes model snapshots in the background.
//!
//! The compute loop copies the state out (a snapshot, a few milliseconds) and goes on
//! training; the write, fsync and rename happen here on a blocking thread. A failed
//! background write fails this actor, which restarts alone (S-5): the next interval tries
//! again and training never waits on the disk. Saves the rank must not leave without (the
//! final model, the model saved when the job halts) are awaited by the caller.

use crate::rank::Shared;
use crate::ActorError;
use phalanx_checkpoint::Contents;
use phalanx_model::io as model_io;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::info;

pub struct CheckpointerActor;

pub struct CheckpointerArgs {
    pub shared: Arc<Shared>,
}

pub enum CheckpointerMsg {
    Save {
        dir: PathBuf,
        step: u64,
        contents: Box<Contents>,
        /// Awaited saves get the result; background ones fail the actor on error.
        reply: Option<RpcReplyPort<Result<(), ActorError>>>,
    },
}

pub struct CheckpointerState {
    shared: Arc<Shared>,
    saved: u64,
}

impl Actor for CheckpointerActor {
    type Msg = CheckpointerMsg;
    type State = CheckpointerState;
    type Arguments = CheckpointerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: CheckpointerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(CheckpointerState {
            shared: args.shared,
            saved: 0,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: CheckpointerMsg,
        st: &mut CheckpointerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CheckpointerMsg::Save {
                dir,
                step,
                contents,
                reply,
            } => {
                let t = Instant::now();
                let d = dir.clone();
                let slow = crate::faults::standing("slow-checkpoint").map(Duration::from_millis);
                let r = tokio::task::spawn_blocking(move || {
                    if let Some(pause) = slow {
                        std::thread::sleep(pause);
                    }
                    model_io::write(&d, step, &contents)
                })
                .await?
                .map_err(ActorError::from);
                if reply.is_none() {
                    st.shared
                        .saving
                        .store(false, std::sync::atomic::Ordering::Release);
                }
                if r.is_ok() {
                    st.saved += 1;
                    info!(step, dir = %dir.display(), write_ms = t.elapsed().as_millis() as u64, "checkpoint written");
                }
                match reply {
                    Some(p) => {
                        let _ = p.send(r);
                    }
                    None => r?,
                }
            }
        }
        Ok(())
    }
}
