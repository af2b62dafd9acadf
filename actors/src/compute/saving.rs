//! Saving the model: on a halt, a checkpoint in the background, the final fingerprint.

use super::*;

impl<'a> Loop<'a> {
    pub(super) fn save_on_halt(
        &self,
        s: &Setup,
        last_rank: Option<u32>,
        reason: &str,
    ) -> Result<(), ActorError> {
        if last_rank != Some(0) || s.trainer.step == 0 {
            return Ok(());
        }
        let dir = self.sh.params.run_dir.join("model");
        self.save_now(&dir, s)?;
        let halted = self.sh.params.run_dir.join("halted.txt");
        std::fs::write(&halted, format!("{reason}\n")).map_err(|source| ActorError::Io {
            what: format!("cannot write {}", halted.display()),
            source,
        })?;
        warn!(step = s.trainer.step, dir = %dir.display(), "saved the committed model before stopping");
        Ok(())
    }

    /// Saves through the checkpointer and waits for it (or inline if it is down).
    /// Appends this rank's final-state fingerprint to `fingerprints.jsonl` (G-2).
    pub(super) fn write_fingerprint(
        &self,
        s: &Setup,
        member: u64,
        rank: Rank,
        generation: Generation,
    ) -> Result<(), ActorError> {
        let fp = state_fingerprint(s);
        let path = self.sh.params.run_dir.join("fingerprints.jsonl");
        let io = |source| ActorError::Io {
            what: format!("cannot append to {}", path.display()),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        // One write per line: every rank appends to this file at the same moment.
        let line = json!({"member": member, "rank": rank.0, "generation": generation.0,
                          "step": s.trainer.step, "state_sha256": fp});
        f.write_all(format!("{line}\n").as_bytes()).map_err(io)
    }

    pub(super) fn save_now(&self, dir: &Path, s: &Setup) -> Result<(), ActorError> {
        let c = model_io::snapshot(&s.trainer, &s.ds.meta.tokenizer, s.ds.meta.vocab.clone())?;
        let step = s.trainer.step;
        if let Some(ck) = self.sh.checkpointer.lock().clone() {
            let d = dir.to_path_buf();
            let r = self.sh.handle.block_on(ck.call(
                |reply| CheckpointerMsg::Save {
                    dir: d,
                    step,
                    contents: Box::new(c),
                    reply: Some(reply),
                },
                Some(Duration::from_secs(120)),
            ));
            if let Ok(ractor::rpc::CallResult::Success(r)) = r {
                return r;
            }
            // The checkpointer died with the snapshot: write a new one here.
            let c = model_io::snapshot(&s.trainer, &s.ds.meta.tokenizer, s.ds.meta.vocab.clone())?;
            return Ok(model_io::write(dir, step, &c)?);
        }
        Ok(model_io::write(dir, step, &c)?)
    }

    /// C-6: rank 0 records the checkpoint the job resumed from, before its first step (the
    /// report's ledger takes the earlier jobs' steps after it as not the final model's).
    pub(super) fn record_resume(
        &self,
        metrics: &mut std::fs::File,
        rank: Rank,
        world: u32,
        step: u64,
    ) -> Result<(), ActorError> {
        let Some(r) = &self.sh.params.resumed else {
            return Ok(());
        };
        if rank.0 != 0 || r.step != step || self.sh.resume_recorded.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let line = MetricLine::Resume(ResumeLine {
            world_size: world as usize,
            unix_ms: unix_ms(),
            ..r.clone()
        });
        metrics
            .write_all(format!("{}\n", line.to_line()).as_bytes())
            .map_err(|source| ActorError::Io {
                what: format!("cannot write {}/metrics.jsonl", self.sh.params.run_dir.display()),
                source,
            })
    }

    /// C-5: this rank's part of the checkpoint of the step just committed. The loop waits only
    /// for the copy of its range (the stage); the checkpointer writes it in the background and
    /// votes, and rank 0 commits once every rank's part is durable.
    pub(super) fn checkpoint_async(&self, s: &Setup, g: &Gen) {
        let step = s.trainer.step;
        // One snapshot in flight at most: a disk slower than the checkpoint interval skips
        // checkpoints instead of queueing copies of the model without bound. A save with a
        // part skipped never commits; the next one does.
        if self.sh.saving.swap(true, Ordering::AcqRel) {
            warn!(
                step,
                "the previous checkpoint is still being written; skipping this one"
            );
            return;
        }
        let staged = Instant::now();
        let total = s.trainer.model.num_params() as u64;
        let range = sharded::part_range(total, g.world, g.rank.0);
        let tensors = match model_io::part_snapshot(&s.trainer, &range) {
            Ok(t) => t,
            Err(e) => {
                warn!(step, error = %e, "cannot copy this rank's part of the checkpoint");
                self.sh.saving.store(false, Ordering::Release);
                return;
            }
        };
        let meta = (g.rank.0 == 0).then(|| {
            model_io::meta(&s.trainer, &s.ds.meta.tokenizer, s.ds.meta.vocab.clone())
        });
        let part = PartSave {
            dir: self.sh.params.run_dir.join("checkpoints").join(format!("step-{step}")),
            step,
            generation: g.generation.0,
            rank: g.rank.0,
            world: g.world,
            total,
            range,
            tensors,
            meta,
            stage: staged.elapsed(),
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
