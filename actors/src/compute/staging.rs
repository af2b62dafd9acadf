//! The stage of a checkpoint part, overlapped with the next step (C-5): the copy of this rank's
//! range of the parameters and AdamW moments runs on its own thread while the next step's
//! forward and backward only read them. The loop fences it before anything writes them again
//! (the update, a rollback, a heal, the final save); the time it waits there, plus the time
//! to start the copy, is the save's stage time.

use super::*;
use phalanx_checkpoint::TensorData;
use phalanx_model::io::PartSource;
use std::cell::RefCell;
use std::thread::JoinHandle;

/// A part whose copy is under way.
struct InFlight {
    copy: JoinHandle<Result<Vec<TensorData>, phalanx_model::ModelError>>,
    /// The part without its tensors (the copy fills them).
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
        let copy = std::thread::Builder::new()
            .name("phalanx-stage".into())
            .spawn(move || src.snapshot_into(&range, buffers))?;
        *self.0.borrow_mut() = Some(InFlight {
            copy,
            part,
            start: began.elapsed(),
        });
        Ok(())
    }

    /// Waits for the copy in flight, if any: the part, with the time the loop waited in total,
    /// or the error that stopped the copy.
    fn finish(&self) -> Option<Result<PartSave, String>> {
        let f = self.0.borrow_mut().take()?;
        let t = Instant::now();
        let copied = f.copy.join();
        let mut part = f.part;
        part.stage = f.start + t.elapsed();
        Some(match copied {
            Ok(Ok(tensors)) => {
                part.tensors = tensors;
                Ok(part)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the copy thread panicked".into()),
        })
    }
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
