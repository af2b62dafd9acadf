//! `CheckpointerActor`: writes checkpoints in the background.
//!
//! The compute loop copies its part of the state out (the stage, milliseconds) and goes on
//! training; the write, fsync and rename happen here on a blocking thread, then the part is
//! reported durable in the heartbeats (the vote of the two-phase commit, C-5). Rank 0 writes
//! the manifest that commits a save when the coordinator says every part is durable, and
//! applies retention. A failed background write fails this actor, which restarts alone (S-5):
//! the save never commits, the next interval tries again and training never waits on the
//! disk. Saves the rank must not leave without (the final model, the model saved when the job
//! halts) are awaited by the caller.

use crate::rank::Shared;
use crate::ActorError;
use phalanx_checkpoint::sharded::{self, Part, Sealed, Shards};
use phalanx_checkpoint::{Contents, FileEntry};
use phalanx_model::io as model_io;
use phalanx_proto::pb;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub struct CheckpointerActor;

pub struct CheckpointerArgs {
    pub shared: Arc<Shared>,
}

/// A part being sealed (its header and SHA-256 computed) on the thread that copied it, beside
/// the training step; what went wrong if it could not be.
pub type Sealing = std::thread::JoinHandle<Result<Sealed, String>>;

/// A rank's part of a sharded checkpoint, copied out of the training state.
pub struct PartSave {
    pub dir: PathBuf,
    pub step: u64,
    pub generation: u64,
    pub rank: u32,
    pub world: u32,
    pub total: u64,
    pub range: Range<u64>,
    /// Set once the copy is done.
    pub sealing: Option<Sealing>,
    /// Rank 0's side file (model, tokenizer, optimizer step).
    pub meta: Option<serde_json::Value>,
    /// How long the training loop waited for the copy.
    pub stage: Duration,
}

/// The coordinator's word that every part of a save is durable (rank 0 commits it).
pub struct CommitOrder {
    pub step: u64,
    pub generation: u64,
    pub job_id: String,
    pub config_hash: String,
    pub parts: Vec<pb::CheckpointPart>,
}

pub enum CheckpointerMsg {
    /// A whole-model save (the final model, the model saved on a halt), awaited.
    Save {
        dir: PathBuf,
        step: u64,
        contents: Box<Contents>,
        reply: Option<RpcReplyPort<Result<(), ActorError>>>,
    },
    SavePart(Box<PartSave>),
    Commit(Box<CommitOrder>),
}

pub struct CheckpointerState {
    shared: Arc<Shared>,
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
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        st: &mut CheckpointerState,
    ) -> Result<(), ActorProcessingErr> {
        // A part lost with this incarnation is never voted: the next interval saves again.
        st.shared.saving.store(false, Ordering::Release);
        Ok(())
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
                let r = tokio::task::spawn_blocking(move || model_io::write(&d, step, &contents))
                    .await?
                    .map_err(ActorError::from);
                if r.is_ok() {
                    info!(step, dir = %dir.display(), write_ms = t.elapsed().as_millis() as u64, "model written");
                }
                match reply {
                    Some(p) => {
                        let _ = p.send(r);
                    }
                    None => r?,
                }
            }
            CheckpointerMsg::SavePart(part) => {
                let vote = save_part(*part, &st.shared.part_buffers).await;
                st.shared.saving.store(false, Ordering::Release);
                *st.shared.durable.lock() = Some(vote?);
                st.shared.beat_now.notify_one();
            }
            CheckpointerMsg::Commit(order) => {
                let sh = st.shared.clone();
                let step = order.step;
                tokio::task::spawn_blocking(move || commit(&sh, &order))
                    .await?
                    .map_err(ActorError::from)?;
                st.shared
                    .committed_checkpoint
                    .fetch_max(step, Ordering::AcqRel);
                st.shared.beat_now.notify_one();
            }
        }
        Ok(())
    }
}

/// Tries of a part's write: a transient I/O error (or space freed meanwhile) gets another go.
const WRITE_TRIES: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Writes a part (and rank 0's side file) durably, with retries and backoff; the vote that
/// says so, or that it failed (the save is then not committed; training goes on).
async fn save_part(
    p: PartSave,
    buffers: &parking_lot::Mutex<Vec<Vec<f32>>>,
) -> Result<pb::CheckpointPart, ActorProcessingErr> {
    let t = Instant::now();
    let sealed = match p.sealing {
        Some(s) => tokio::task::spawn_blocking(move || s.join())
            .await?
            .unwrap_or_else(|_| Err("the stage thread panicked".into())),
        None => Err("the part was handed on before its copy was done".into()),
    };
    let name = sharded::part_name(p.rank, p.world);
    let written = match sealed {
        Ok(sealed) => {
            let sealed = Arc::new(sealed);
            let meta = Arc::new(p.meta);
            let w = write_with_retries(&p.dir, &name, p.step, sealed.clone(), meta).await?;
            // The part's host buffers go back for the next stage (the writer holds no other
            // handle).
            if let Ok(s) = Arc::try_unwrap(sealed) {
                *buffers.lock() = s.into_tensors().into_iter().map(|t| t.data).collect();
            }
            w
        }
        Err(reason) => Err(phalanx_checkpoint::CheckpointError::BadPart { reason }),
    };
    let drain = t.elapsed();
    let us = |d: Duration| d.as_micros().min(u32::MAX as u128) as u32;
    let (files, error) = match written {
        Ok(files) => {
            info!(
                step = p.step,
                rank = p.rank,
                stage_ms = p.stage.as_millis() as u64,
                drain_ms = drain.as_millis() as u64,
                "checkpoint part durable"
            );
            (files, String::new())
        }
        Err(e) => {
            warn!(step = p.step, error = %e, "this rank's part of the checkpoint could not be written; the save is not committed, training goes on");
            (Vec::new(), e.to_string())
        }
    };
    Ok(pb::CheckpointPart {
        step: p.step,
        generation: p.generation,
        rank: p.rank,
        world: p.world,
        start: p.range.start,
        len: p.range.end - p.range.start,
        total: p.total,
        files: files
            .into_iter()
            .map(|f| pb::CheckpointFile {
                name: f.name,
                bytes: f.bytes,
                sha256: f.sha256,
            })
            .collect(),
        stage_us: us(p.stage),
        drain_us: us(drain),
        error,
    })
}

type Written = Result<Vec<FileEntry>, phalanx_checkpoint::CheckpointError>;

async fn write_with_retries(
    dir: &std::path::Path,
    name: &str,
    step: u64,
    part: Arc<Sealed>,
    meta: Arc<Option<serde_json::Value>>,
) -> Result<Written, ActorProcessingErr> {
    let slow = crate::faults::standing("slow-checkpoint").map(Duration::from_millis);
    let mut backoff = FIRST_BACKOFF;
    for tries in 1.. {
        let (dir, name) = (dir.to_path_buf(), name.to_string());
        let (part, meta) = (part.clone(), meta.clone());
        let r = tokio::task::spawn_blocking(move || {
            if let Some(pause) = slow {
                std::thread::sleep(pause);
            }
            let mut files = vec![sharded::write_part(&dir, &name, &part)?];
            if let Some(m) = meta.as_ref() {
                files.push(sharded::write_json(&dir, sharded::META, m)?);
            }
            Ok(files)
        })
        .await?;
        match r {
            Err(e) if tries < WRITE_TRIES => {
                warn!(step, error = %e, tries, "cannot write this rank's part of the checkpoint; trying again");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            r => return Ok(r),
        }
    }
    unreachable!("the loop returns by its last try")
}

/// Rank 0: the manifest that commits the save (written last), then retention (C-7).
fn commit(sh: &Shared, o: &CommitOrder) -> Result<(), phalanx_checkpoint::CheckpointError> {
    let root = sh.params.run_dir.join("checkpoints");
    let dir = root.join(format!("step-{}", o.step));
    let world = o.parts.len() as u32;
    let total = o.parts.first().map_or(0, |p| p.total);
    let files: Vec<FileEntry> = o
        .parts
        .iter()
        .flat_map(|p| &p.files)
        .map(|f| FileEntry {
            name: f.name.clone(),
            bytes: f.bytes,
            sha256: f.sha256.clone(),
        })
        .collect();
    let parts = o
        .parts
        .iter()
        .map(|p| Part {
            rank: p.rank,
            file: sharded::part_name(p.rank, p.world),
            start: p.start,
            len: p.len,
        })
        .collect();
    let shards = Shards {
        world,
        generation: o.generation,
        job: o.job_id.clone(),
        config_hash: o.config_hash.clone(),
        total,
        parts,
    };
    sharded::commit(&dir, o.step, files, shards)?;
    info!(step = o.step, world, dir = %dir.display(), "checkpoint committed");
    let p = &sh.params;
    for gone in sharded::retain(&root, p.keep_checkpoints, p.keep_every) {
        info!(dir = %gone.display(), "removed by retention");
    }
    if !dir.join(phalanx_checkpoint::MANIFEST).is_file() {
        warn!(dir = %dir.display(), "the committed checkpoint vanished");
    }
    Ok(())
}
