//! The stage of a checkpoint part, overlapped with the next step (C-5): the copy of this rank's
//! range of the parameters and AdamW moments runs on its own thread while the next step's
//! forward and backward only read them. The loop fences it before anything writes them again
//! (the update, a rollback, a heal, the final save); the time it waits there, plus the time
//! to start the copy, is the save's stage time. Once the copy is done the same thread seals
//! the part (its header and SHA-256), still beside the step: the loop does not wait for it,
//! and the checkpointer's drain only writes.

use super::*;
use crate::ckpt::Sealing;
use phalanx_checkpoint::sharded::Sealed;
use phalanx_model::io::PartSource;
use std::cell::RefCell;
use std::sync::mpsc;

/// A part whose copy is under way.
struct InFlight {
    /// Says when the copy is done (the state may be written again), or why it failed.
    copied: mpsc::Receiver<Result<(), String>>,
    sealing: Sealing,
    /// The part without its data (the stage thread seals it).
    part: PartSave,
    /// What the loop spent starting the copy.
    start: Duration,
}

/// At most one stage in flight (the `saving` flag keeps it so).
#[derive(Default)]
pub(super) struct Stager(RefCell<Option<InFlight>>);

impl Stager {
    /// Starts copying `range` of `src` into the reused `buffers`, for `part`.
    pub(super) fn start(
        &self,
        src: PartSource,
        buffers: Vec<Vec<f32>>,
        part: PartSave,
        began: Instant,
    ) -> Result<(), std::io::Error> {
        let range = part.range.clone();
        let (tell, copied) = mpsc::sync_channel(1);
        let sealing = std::thread::Builder::new()
            .name("phalanx-stage".into())
            .spawn(move || copy_then_seal(src, &range, buffers, &tell))?;
        *self.0.borrow_mut() = Some(InFlight {
            copied,
            sealing,
            part,
            start: began.elapsed(),
        });
        Ok(())
    }

    /// Waits for the copy in flight, if any (not for its seal): the part, with the time the
    /// loop waited in total, or the error that stopped the copy.
    fn finish(&self) -> Option<Result<PartSave, String>> {
        let f = self.0.borrow_mut().take()?;
        let t = Instant::now();
        // A closed channel without a word: the thread panicked (its join says so below).
        let copied = f.copied.recv().unwrap_or(Err(String::new()));
        let mut part = f.part;
        part.stage = f.start + t.elapsed();
        Some(match copied {
            Ok(()) => {
                part.sealing = Some(f.sealing);
                Ok(part)
            }
            Err(e) => match f.sealing.join() {
                Err(_) => Err("the stage thread panicked".into()),
                _ => Err(e),
            },
        })
    }
}

/// The stage thread: copies the range, tells the loop, then seals what it copied. The source's
/// handles on the training state are let go before the loop hears of the copy.
fn copy_then_seal(
    src: PartSource,
    range: &std::ops::Range<u64>,
    buffers: Vec<Vec<f32>>,
    copied: &mpsc::SyncSender<Result<(), String>>,
) -> Result<Sealed, String> {
    let copy = src.snapshot_into(range, buffers);
    drop(src);
    let tensors = match copy {
        Ok(t) => t,
        Err(e) => {
            let _ = copied.send(Err(e.to_string()));
            return Err(e.to_string());
        }
    };
    let _ = copied.send(Ok(()));
    Sealed::seal(tensors).map_err(|e| e.to_string())
}

impl Loop<'_> {
    /// C-5: the copy of a part in flight is done before the state it reads is written again;
    /// the part then goes to the checkpointer.
    pub(super) fn fence_stage(&self) {
        let Some(done) = self.stager.finish() else {
            return;
        };
        let part = match done {
            Ok(part) => part,
            Err(e) => {
                warn!(error = %e, "cannot copy this rank's part of the checkpoint; this save is skipped");
                self.sh.saving.store(false, Ordering::Release);
                return;
            }
        };
        let sent = self
            .sh
            .checkpointer
            .lock()
            .clone()
            .is_some_and(|ck| ck.cast(CheckpointerMsg::SavePart(Box::new(part))).is_ok());
        if !sent {
            self.sh.saving.store(false, Ordering::Release);
        }
    }
}

impl Drop for Loop<'_> {
    /// A loop that ends with a copy in flight lets it finish and hands the part on: the save
    /// can still commit, and the `saving` flag is freed for the next loop either way.
    fn drop(&mut self) {
        self.fence_stage();
    }
}
