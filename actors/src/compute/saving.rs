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
        let fp = state_fingerprint(s, self.sh.params.zero);
        let path = self.sh.params.run_dir.join("fingerprints.jsonl");
        let io = |source| ActorError::Io {
            what: format!("cannot append to {}", path.display()),
            source,
        };
        let mut f = append_lines(&path).map_err(io)?;
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
                what: format!(
                    "cannot write {}/metrics.jsonl",
                    self.sh.params.run_dir.display()
                ),
                source,
            })
    }

    /// C-5: this rank's part of the checkpoint of the step just committed. Its copy starts
    /// here and overlaps the next step's forward and backward (see `staging`); the
    /// checkpointer writes it in the background and votes, and rank 0 commits once every
    /// rank's part is durable.
    pub(super) fn checkpoint_async(&self, s: &Setup, at: Place) {
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
        let range = sharded::part_range(total, at.world, at.rank.0);
        let buffers = std::mem::take(&mut *self.sh.part_buffers.lock());
        let meta = (at.rank.0 == 0)
            .then(|| model_io::meta(&s.trainer, &s.ds.meta.tokenizer, s.ds.meta.vocab.clone()));
        let part = PartSave {
            dir: self
                .sh
                .params
                .run_dir
                .join("checkpoints")
                .join(format!("step-{step}")),
            step,
            generation: at.generation.0,
            rank: at.rank.0,
            world: at.world,
            total,
            range,
            sealing: None,
            meta,
            stage: Duration::ZERO,
        };
        let src = model_io::PartSource::of(&s.trainer);
        if let Err(e) = self.stager.start(src, buffers, part, staged) {
            warn!(step, error = %e, "cannot start copying this rank's part of the checkpoint; this save is skipped");
            self.sh.saving.store(false, Ordering::Release);
        }
    }

    /// C-5: the job's last step is saved and committed before the ranks leave, so the next job
    /// of the campaign resumes where this one ended. Every rank makes its part durable (after
    /// any save still draining) and votes; rank 0 then waits, bounded, for the commit.
    /// Whether this rank's part is durable (or no checkpoint is wanted).
    pub(super) fn final_checkpoint(&self, s: &Setup, at: Place, always: bool) -> bool {
        let step = s.trainer.step;
        if self.sh.params.checkpoint_interval == 0 && !always {
            return true;
        }
        let voted = |sh: &Shared| sh.durable.lock().as_ref().is_some_and(|d| d.step == step);
        let deadline = Instant::now() + FINAL_SAVE_WAIT;
        let wait_for = |done: &dyn Fn() -> bool| {
            while !done() && Instant::now() < deadline {
                self.heart.beat();
                std::thread::sleep(Duration::from_millis(5));
            }
            done()
        };
        // A save of this very step may be staging or draining: it is the vote, once durable.
        self.fence_stage();
        wait_for(&|| !self.sh.saving.load(Ordering::Acquire));
        if !voted(self.sh) {
            self.checkpoint_async(s, at);
            self.fence_stage();
        }
        let written = wait_for(&|| voted(self.sh))
            && self
                .sh
                .durable
                .lock()
                .as_ref()
                .is_some_and(|d| d.error.is_empty());
        if !written {
            warn!(step, "this rank's part of the final checkpoint is not durable; the campaign resumes from an earlier one");
        }
        self.sh.beat_now.notify_one();
        written
    }

    /// In place of the final barrier: whether every rank's part of the final checkpoint is
    /// durable (then rank 0 waits for the commit; else the commit cannot come), and the error
    /// of a peer lost at the end.
    pub(super) fn settle(&self, group: &dyn Group, mine: bool) -> (bool, Option<String>) {
        let mut all = vec![if mine { 1f32 } else { 0f32 }];
        match group.allreduce(&mut all) {
            Ok(()) => (all[0] as u32 == group.world(), None),
            Err(e) => (false, Some(e.to_string())),
        }
    }

    /// Rank 0, after every rank's part of the final checkpoint is durable: its commit.
    pub(super) fn await_final_commit(&self, step: u64, always: bool) {
        if self.sh.params.checkpoint_interval == 0 && !always {
            return;
        }
        let deadline = Instant::now() + FINAL_SAVE_WAIT;
        while self.sh.committed_checkpoint.load(Ordering::Acquire) < step {
            if Instant::now() > deadline {
                warn!(step, "the final checkpoint was not committed; the campaign resumes from an earlier one");
                return;
            }
            self.heart.beat();
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// How long the end of a job waits for its final checkpoint.
const FINAL_SAVE_WAIT: Duration = Duration::from_secs(60);

/// Where a rank is: what a save records about the writer.
#[derive(Clone, Copy)]
pub(super) struct Place {
    pub(super) rank: Rank,
    pub(super) world: u32,
    pub(super) generation: Generation,
}

/// The process's peak resident memory in KiB (Linux), for the memory record.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Loop<'_> {
    /// Z-5: this rank's bytes of parameters, gradients, optimizer state and replicas, to
    /// `memory.jsonl` (the report and `phalanx bench train` read it).
    pub(super) fn record_memory(&self, s: &Setup, rank: Rank, world: u32, generation: Generation) {
        let n = s.trainer.model.num_params() as u64;
        let line = phalanx_runtime::metrics::MemoryLine {
            rank: rank.0,
            world,
            generation: generation.0,
            step: s.trainer.step,
            params_bytes: 4 * n,
            grads_bytes: 4 * n,
            optimizer_bytes: s.trainer.opt.state_bytes() as u64,
            replica_bytes: self.replicas.borrow().bytes() as u64,
            peak_rss_kib: peak_rss_kib(),
            unix_ms: unix_ms(),
        };
        let path = self.sh.params.run_dir.join("memory.jsonl");
        let text = serde_json::to_string(&line).expect("a memory line serializes");
        let written =
            append_lines(&path).and_then(|mut f| f.write_all(format!("{text}\n").as_bytes()));
        if let Err(e) = written {
            warn!(error = %e, path = %path.display(), "cannot record this rank's memory");
        }
    }
}
