//! One generation: join, heal, then steps until it ends.

use super::*;

impl<'a> Loop<'a> {
    /// After the heal: the K-9 refusal to train from scratch, ZeRO-1's shards (Z-2..Z-4), the
    /// memory record (Z-5). `Some` ends the generation.
    fn joined(
        &self,
        ctl: &Control,
        comm: &ActorRef<CommunicatorMsg>,
        group: &dyn Group,
        s: &mut Setup,
        resume_step: u64,
    ) -> Option<Next> {
        let generation = group.generation();
        if s.trainer.step == 0 && resume_step > 0 {
            // K-9: nobody in this generation holds the committed state; training on would
            // silently restart the job from step 0. The coordinator halts before this; a rank
            // never trusts that alone.
            let why = format!(
                "generation {generation} resumes at step {resume_step} but no member holds a \
                 state past step 0; refusing to train from scratch"
            );
            warn!(%why, "no committed state in the group");
            return Some(Next::Exit(EXIT_HALTED, format!("halted: {why}")));
        }
        if self.sh.params.zero {
            if let Some(next) = self.join_shards(ctl, comm, group, s) {
                return Some(next);
            }
        }
        self.record_memory(s, group.rank(), group.world(), generation);
        None
    }

    /// One generation: wait for it, join, train until it ends.
    pub(super) fn generation(
        &self,
        ctl: &Control,
        s: &mut Setup,
        pending: Option<Assignment>,
        torn: &mut bool,
    ) -> Result<Next, ActorError> {
        let sh = self.sh;
        let p = &sh.params;
        let progress = &sh.progress;
        progress.phase.store(PHASE_IDLE, Ordering::Relaxed);
        self.heart.busy(false);
        let last_rank = sh.last_rank();
        let assign = match pending {
            Some(a) => a,
            None => match self.await_assign(s, last_rank)? {
                Ok(a) => a,
                Err(next) => return Ok(next),
            },
        };
        if assign.generation.0 <= progress.generation.load(Ordering::Relaxed) {
            return Ok(Next::Regroup(None));
        }
        let (generation, rank, world) = (assign.generation, assign.rank, assign.world);
        sh.set_last_rank(rank.0);
        progress.generation.store(generation.0, Ordering::Relaxed);
        self.heart.busy(true);
        let t0 = Instant::now();
        let Some(comm) = sh.communicator.lock().clone() else {
            return Err(ActorError::ChildGone("communicator"));
        };
        let Some(shared_group) =
            self.connect_group(&comm, ctl, generation, rank, world, s.trainer.step)?
        else {
            return Ok(Next::Regroup(None));
        };
        let guard = shared_group.lock();
        let group: &dyn Group = &**guard;
        progress.phase.store(PHASE_HEALING, Ordering::Relaxed);
        // A heal writes the state a part may still be copying.
        self.fence_stage();
        let healed = match sync_state(group, s, p.zero) {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "state sync failed; waiting for the next generation");
                report_fault(&comm, ctl, generation, rank, world, &e, s.trainer.step);
                return Ok(Next::Regroup(None));
            }
        };
        if let Some(next) = self.joined(ctl, &comm, group, s, assign.resume_step) {
            return Ok(next);
        }
        progress.step.store(s.trainer.step, Ordering::Relaxed);
        info!(%generation, %rank, world, step = s.trainer.step, healed_from = ?healed, shares = ?assign.shares,
              ready_ms = t0.elapsed().as_millis() as u64, incarnation = self.incarnation, "joined generation");
        progress.phase.store(PHASE_TRAINING, Ordering::Relaxed);
        let mbs = s.sampler.micro_batches_per_step();
        let tokens_per_step = (p.global_batch * s.win.block) as f64;
        let device = s.trainer.model.device();
        // The coordinator's split of the global batch: even, or rebalanced away from a
        // straggler (K-8). Any split concatenates to the same global batch (D-2).
        let split = |r: usize| {
            s.sampler
                .rank_micro_batches(&assign.shares, world as usize, r)
                .ok_or_else(|| ActorError::BadSplit {
                    shares: assign.shares.clone(),
                    world,
                    micro_batches: mbs,
                })
        };
        let shares = (0..world as usize)
            .map(|r| split(r).map(|m| [m.start, m.end]))
            .collect::<Result<Vec<[usize; 2]>, _>>()?;
        let mine = split(rank.0 as usize)?;
        // The same plan on every rank, from the largest share (see `plan_lanes`).
        s.trainer
            .plan_lanes(shares.iter().map(|r| r[1] - r[0]).max().unwrap_or(1));
        let plan = sh
            .loader
            .set_plan(rank.0 as usize, mine.clone(), s.trainer.step, p.max_steps);
        let mut metrics =
            append_lines(&p.run_dir.join("metrics.jsonl")).map_err(|source| ActorError::Io {
                what: format!("cannot open {}/metrics.jsonl", p.run_dir.display()),
                source,
            })?;
        // D-4: the lowest rank holding the committed state restates its own last commit of an
        // earlier generation, made when it was not rank 0: rank 0, which records commits, may
        // have died before recording it, or failed that step's allreduce after the others had
        // finished it (it is healed then). The report ignores a restated step that was recorded
        // already. Only a commit that is still this rank's state counts.
        let lowest_holder = match &healed {
            None => 0,
            Some(Healed::From(r)) => *r,
            Some(Healed::Striped(h)) => h.first().copied().unwrap_or(0),
        };
        let restate = self.last_commit.borrow_mut().take();
        if let (true, Some(mut rec)) = (rank.0 == lowest_holder, restate) {
            if rec.step + 1 == s.trainer.step {
                rec.restated = true;
                metrics
                    .write_all(format!("{}\n", MetricLine::Step(rec).to_line()).as_bytes())
                    .map_err(|source| ActorError::Io {
                        what: format!("cannot write {}/metrics.jsonl", p.run_dir.display()),
                        source,
                    })?;
            }
        }
        self.record_resume(&mut metrics, rank, world, s.trainer.step)?;
        let mut g = Gen {
            ctl,
            comm,
            generation,
            rank,
            world,
            group,
            mbs,
            tokens_per_step,
            device,
            shares,
            mine,
            plan,
            metrics,
            late: 0,
        };
        while s.trainer.step < p.max_steps {
            self.heart.beat();
            if self.cancelled() {
                return Ok(Next::Exit(EXIT_DONE, "rank stopping".into()));
            }
            if let Some(next) = self.between_steps(s, generation, rank)? {
                return Ok(next);
            }
            if let Some(next) = self.one_step(&mut g, s, torn)? {
                return Ok(next);
            }
        }
        let next = self.finish(ctl, s, group, rank, generation, &mut g.metrics);
        drop(guard);
        next
    }
}
