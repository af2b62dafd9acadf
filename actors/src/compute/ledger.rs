//! The sample ledger (D-4): recording a committed step; and the end of the job.

use super::*;

impl<'a> Loop<'a> {
    /// A committed (or skipped) step: the figures the heartbeat carries, and its line in
    /// `metrics.jsonl` with the sample ledger's fields (rank 0), or kept to restate (others).
    pub(super) fn record_commit(&self, g: &mut Gen, s: &Setup, m: Measured) {
        let (p, progress) = (&self.sh.params, &self.sh.progress);
        let Measured {
            step,
            dt,
            compute,
            stalled,
            ..
        } = m;
        // The rank's speed, for the straggler detector and the rebalancer, in two parts: its
        // forward and backward passes, which scale with its micro-batches, and the rest of
        // its own work (optimizer, bookkeeping) plus any time it was descheduled inside a
        // collective (its CPU quota ran out there), which holds the peers up as surely as a
        // slow compute does. Waiting for peers or data is in neither.
        let fixed = dt
            .saturating_sub(m.data_wait + compute + m.in_collectives)
            .saturating_add(stalled.min(m.in_collectives));
        progress.step.store(s.trainer.step, Ordering::Relaxed);
        progress.seq.fetch_add(1, Ordering::Relaxed);
        progress
            .step_us
            .store(dt.as_micros() as u32, Ordering::Relaxed);
        progress
            .compute_us
            .store(compute.as_micros() as u32, Ordering::Relaxed);
        progress.record_step(step, compute, fixed, g.mine.len());
        progress
            .loss_bits
            .store((m.loss as f32).to_bits(), Ordering::Relaxed);
        // The sample ledger (D-4): the step's sample positions in its epoch's permutation,
        // and the micro-batches each rank of this world computed. Rank 0 writes it with the
        // step's figures; the others keep their last one to restate (see `generation`).
        let gb = p.global_batch as u64;
        let ledger = StepLine {
            step,
            generation: g.generation.0,
            world_size: g.world as usize,
            epoch: Some(m.epoch),
            positions: Some([m.st * gb, (m.st + 1) * gb]),
            shares: g
                .shares
                .iter()
                .map(|s| [s[0] as u64, s[1] as u64])
                .collect(),
            unix_ms: Some(unix_ms()),
            ..StepLine::default()
        };
        // Every rank writes its part of a checkpoint (C-5).
        if p.checkpoint_interval > 0 && s.trainer.step % p.checkpoint_interval == 0 {
            let at = Place {
                rank: g.rank,
                world: g.world,
                generation: g.generation,
            };
            self.checkpoint_async(s, at);
        }
        if g.rank.0 != 0 {
            *self.last_commit.borrow_mut() = Some(ledger);
            return;
        }
        let line = MetricLine::Step(StepLine {
            loss: Some(m.loss),
            val_loss: m.val_loss,
            lr: Some(m.lr),
            tokens_per_s: Some(g.tokens_per_step / dt.as_secs_f64()),
            step_ms: Some(dt.as_secs_f64() * 1e3),
            compute_ms: Some(compute.as_secs_f64() * 1e3),
            stalled_ms: Some(stalled.as_secs_f64() * 1e3),
            grad_norm: m.grad_norm,
            skipped: m.grad_norm.is_none(),
            nonfinite_ranks: m.bad_ranks,
            replica_mismatch: m.odd,
            incarnation: Some(self.incarnation),
            ..ledger
        });
        let _ = g
            .metrics
            .write_all(format!("{}\n", line.to_line()).as_bytes());
    }

    /// The last step is committed: fingerprints, the final barrier, rank 0's evaluation and
    /// save, and the exit.
    pub(super) fn finish(
        &self,
        ctl: &Control,
        s: &mut Setup,
        group: &dyn Group,
        rank: Rank,
        generation: Generation,
        metrics: &mut std::fs::File,
    ) -> Result<Next, ActorError> {
        let p = &self.sh.params;
        let progress = &self.sh.progress;
        // Done: the last step is committed on every rank, so the job's result is settled. The
        // coordinator hears so at once (K-13: a rank lost from here on ends nothing and starts
        // no new generation). Every rank records a fingerprint of its final state (G-2: they
        // must be equal), rank 0 evaluates and saves the final model; everyone leaves together.
        progress.phase.store(PHASE_DONE, Ordering::Relaxed);
        self.sh.beat_now.notify_one();
        self.heart.busy(true);
        self.write_fingerprint(s, ctl.member, rank, generation)?;
        let world = group.world();
        self.record_memory(s, rank, world, generation);
        let mine = self.final_checkpoint(
            s,
            Place {
                rank,
                world,
                generation,
            },
            false,
        );
        if faults::fire(
            "exit-at-final-barrier",
            s.trainer.step,
            Some(rank.0),
            generation.0,
        ) {
            std::process::exit(9);
        }
        // A peer lost after the last commit costs nothing but its own exit: the state is
        // complete on every rank, and rank 0 saves it with or without the others.
        let (all_durable, lost) = self.settle(group, mine);
        if let Some(why) = &lost {
            warn!(%why, "a peer was lost after the last step; the job's result is complete");
        }
        if rank.0 == 0 && all_durable {
            self.await_final_commit(s.trainer.step, false);
        }
        if rank.0 == 0 {
            let val = s
                .trainer
                .evaluate(&s.ds.val, s.win, p.eval_sequences, p.micro_batch);
            self.save_now(&p.run_dir.join("model"), s)?;
            let line = MetricLine::Final(FinalLine {
                is_final: true,
                step: s.trainer.step,
                val_loss: val,
                peer_lost_at_end: lost,
                preempted: false,
                unix_ms: unix_ms(),
            });
            let _ = metrics.write_all(format!("{}\n", line.to_line()).as_bytes());
        }
        // Let the coordinator see "done" before the session closes (so the exit is no fault).
        self.heart.busy(false);
        std::thread::sleep(3 * p.heartbeat_interval.max(Duration::from_millis(50)));
        Ok(Next::Exit(EXIT_DONE, "training complete".into()))
    }

    /// C-8: some rank's worker was asked to stop (SIGTERM, SIGINT); every rank learnt it from
    /// the step just committed. Each saves its part of that step, rank 0 waits for the commit
    /// and records the stop, and every rank leaves as preempted: the next job resumes there.
    pub(super) fn preempted(&self, g: &mut Gen, s: &mut Setup) -> Result<Next, ActorError> {
        let step = s.trainer.step;
        warn!(
            step,
            "asked to stop: saving this step's checkpoint before leaving"
        );
        // Done: the coordinator starts no new generation and promotes no spare from here.
        self.sh.progress.phase.store(PHASE_DONE, Ordering::Relaxed);
        self.sh.beat_now.notify_one();
        self.heart.busy(true);
        let at = Place {
            rank: g.rank,
            world: g.world,
            generation: g.generation,
        };
        let mine = self.final_checkpoint(s, at, true);
        let (all_durable, lost) = self.settle(g.group, mine);
        if g.rank.0 == 0 {
            if all_durable {
                self.await_final_commit(step, true);
            }
            let line = MetricLine::Final(FinalLine {
                is_final: true,
                step,
                val_loss: None,
                peer_lost_at_end: lost,
                preempted: true,
                unix_ms: unix_ms(),
            });
            let _ = g
                .metrics
                .write_all(format!("{}\n", line.to_line()).as_bytes());
        }
        self.heart.busy(false);
        let beat = self
            .sh
            .params
            .heartbeat_interval
            .max(Duration::from_millis(50));
        std::thread::sleep(3 * beat);
        Ok(Next::Exit(
            EXIT_PREEMPTED,
            format!("preempted after step {step}"),
        ))
    }
}
