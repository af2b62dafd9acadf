//! One training step: batches, forward and backward, the one allreduce, the verdict, the
//! update; and the rollback a bad step may call for.

use super::*;

impl<'a> Loop<'a> {
    /// One step of a generation: data, forward and backward, the allreduce, the verdict
    /// (commit, skip, roll back), the replica check and the record. `Some` ends the generation.
    pub(super) fn one_step(
        &self,
        g: &mut Gen,
        s: &mut Setup,
        torn: &mut bool,
    ) -> Result<Option<Next>, ActorError> {
        let p = &self.sh.params;
        let (generation, rank, world, group) = (g.generation, g.rank, g.world, g.group);
        let mbs = g.mbs;
        let mine = g.mine.clone();
        let step = s.trainer.step;
        let (epoch, st) = s.sampler.locate(step);
        let lr = lr_at(&p.optim, step);
        let t_step = Instant::now();
        let batches = self.batches(g, s, step);
        let data_wait = t_step.elapsed();
        let val = self.val_share(g, s, step);
        // Compute time excludes waiting for data and in collectives: it is the straggler
        // detector's and the rebalancer's measure of this rank's speed.
        let t_compute = Instant::now();
        if faults::fire("compute-hang", step, Some(rank.0), generation.0) {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        let (local_loss, grads, local_bad) = self.local_grads(s, &batches, g, step);
        if faults::fire("compute-panic", step, Some(rank.0), generation.0) {
            panic!("injected compute panic at step {step}");
        }
        let compute = t_compute.elapsed();
        // Below, the parameters and moments may be written (update, rollback, fault): a part
        // being copied from them is done first.
        self.fence_stage();
        let nan = faults::fire("nan", step, Some(rank.0), generation.0);
        let mut grads = grads;
        if let (true, Grads::Float(buf)) = (nan, &mut grads) {
            buf[0] = f32::NAN;
        }
        // Bad numerics are caught before the commit, and named: each rank flags its own
        // non-finite loss or gradient in a slot of its own that rides along with the sum.
        let parts = Parts {
            loss: local_loss * mine.len() as f64 / mbs as f64,
            val: val.map_or(0.0, |v| v.0),
        };
        let flags = Flags {
            bad: local_bad || nan,
            preempt: crate::preempt::requested(),
        };
        let stalled_before = group.stalled();
        let n = s.trainer.model.num_params() as usize;
        let segs = phalanx_model::zero::shard_plan(n, world);
        let (reduced, summed, mut in_collectives) = if p.zero {
            zero::reduce(group, &mut grads, &segs, parts, flags)
        } else {
            reduce(group, &mut grads, parts, flags)
        };
        let Summed {
            loss,
            val: val_sum,
            bad_ranks,
            preempt,
        } = summed;
        let v = verdict(
            reduced.is_ok(),
            &bad_ranks,
            p.rollback_on_nonfinite,
            self.last_rollback.get(),
            step,
        );
        let mut grad_norm = None;
        match v {
            Verdict::Regroup => {
                if let Err(e) = &reduced {
                    warn!(error = %e, step, "gradient allreduce failed; the step will be redone in the next generation");
                    g.report(e, step);
                }
                s.trainer.model.params.zero_grads();
                return Ok(Some(Next::Regroup(None)));
            }
            Verdict::Commit => {
                let t = Instant::now();
                let applied = self.update(g, s, &grads, &segs, lr, torn);
                if p.zero {
                    // ZeRO-1's update holds the parameter allgather.
                    in_collectives += t.elapsed();
                }
                match applied {
                    Ok(norm) => grad_norm = norm,
                    Err(next) => return Ok(Some(next)),
                }
            }
            Verdict::Skip | Verdict::RollBack => {
                warn!(step, ranks = ?bad_ranks, "non-finite loss or gradient; the step is skipped");
                s.trainer.model.params.zero_grads();
            }
        }
        if v == Verdict::RollBack {
            match self.roll_back(g, s, step, &bad_ranks, torn) {
                Rolled::Back => return Ok(None),
                Rolled::Nothing => {}
                Rolled::Failed => return Ok(Some(Next::Regroup(None))),
            }
        }
        if grad_norm.is_none() {
            // Every rank sees the same flags, so every rank skips the same step (T-2).
            s.trainer.step += 1;
        }
        let odd = match self.after_commit(g, s, step, grad_norm.is_some()) {
            Ok((odd, took)) => {
                in_collectives += took;
                odd
            }
            Err(next) => return Ok(Some(next)),
        };
        let measured = Measured {
            step,
            epoch,
            st,
            lr,
            loss,
            val_loss: val.map(|v| val_sum / v.1 as f64),
            grad_norm,
            bad_ranks,
            odd,
            dt: t_step.elapsed(),
            data_wait,
            compute,
            in_collectives,
            stalled: group.stalled().saturating_sub(stalled_before),
        };
        self.record_commit(g, s, measured);
        match grads {
            Grads::Float(buf) => drop(self.grad_buf.replace(buf)),
            Grads::Fixed(buf) => drop(self.fixed_buf.replace(buf)),
        }
        if preempt {
            return self.preempted(g, s).map(Some);
        }
        Ok(None)
    }

    /// This rank's forward and backward passes over its micro-batches: its mean loss, its
    /// gradient as the allreduce carries it (fixed point in deterministic mode, T-6), and
    /// whether a loss or gradient was not finite.
    fn local_grads(
        &self,
        s: &mut Setup,
        batches: &[(Tensor, Tensor)],
        g: &Gen,
        step: u64,
    ) -> (f64, Grads, bool) {
        let p = &self.sh.params;
        if p.deterministic {
            let out = self.fixed_buf.take();
            let (mine, shape) = (g.mine.clone(), (g.mbs, g.world));
            let (loss, sums, bad) =
                deterministic_grads(s, batches, mine, shape, (step, p.seed), out);
            (loss, Grads::Fixed(sums), bad)
        } else {
            let local = s.trainer.local_step(batches, g.mbs);
            (local.loss, Grads::Float(self.grads(s, g.world)), local.bad)
        }
    }

    /// This rank's accumulated gradient, copied into the buffer the last step left (room for
    /// the allreduce's extras included). `local_step` just gathered it into the flat buffer.
    fn grads(&self, s: &mut Setup, world: u32) -> Vec<f32> {
        let flat = s.trainer.model.params.flat_grads_buffer();
        let n = flat.numel();
        let mut buf = self.grad_buf.take();
        buf.clear();
        buf.reserve(n + verdict::extras(world));
        buf.resize(n, 0.0);
        flat.copy_data(&mut buf, n);
        buf
    }

    /// The committed step's update: ZeRO-1's (Z-1; it keeps nothing until the allgather is
    /// complete, so a failure leaves the state whole and the step is redone next generation),
    /// deterministic mode's fused one (T-6), or libtorch's AdamW. The gradient norm, `None`
    /// when it was not finite (the step is skipped).
    fn update(
        &self,
        g: &mut Gen,
        s: &mut Setup,
        grads: &Grads,
        segs: &[std::ops::Range<usize>],
        lr: f64,
        torn: &mut bool,
    ) -> Result<Option<f64>, Next> {
        let p = &self.sh.params;
        let step = s.trainer.step;
        if p.zero {
            return zero::apply(g.group, s, grads, segs, lr).map_err(|e| {
                warn!(error = %e, step, "parameter allgather failed; the step will be redone in the next generation");
                g.report(&e, step);
                Next::Regroup(None)
            });
        }
        *torn = true;
        let norm = match grads {
            // T-6: the fused update, element by element what ZeRO-1's shards do.
            Grads::Fixed(sums) => {
                let norm = fixed::norm(fixed::sum_of_squares(sums));
                s.trainer.apply_fused(&fixed::decode(sums), norm, lr);
                Some(norm)
            }
            // A sum over one rank is its own gradient, still in the flat buffer.
            Grads::Float(_) if g.world == 1 => {
                let flat = s.trainer.model.params.flat_grads_buffer();
                s.trainer.apply_flat(flat, lr)
            }
            Grads::Float(buf) => {
                let summed = Tensor::from_slice(buf).to_device(g.device);
                s.trainer.apply_flat(summed, lr)
            }
        };
        *torn = false;
        Ok(norm)
    }

    /// What follows a step's update: the refresh of ZeRO-1's replicas when due (Z-4), the
    /// injected bit flip, the periodic replica check (T-5). The ranks named by the check, and the
    /// time in collectives; `Err` ends the generation.
    fn after_commit(
        &self,
        g: &mut Gen,
        s: &mut Setup,
        step: u64,
        updated: bool,
    ) -> Result<(Vec<u32>, Duration), Next> {
        let p = &self.sh.params;
        let t = Instant::now();
        let refresh = p.zero && p.zero_replicas > 0 && updated;
        if refresh && s.trainer.step % p.zero_replica_interval.max(1) == 0 {
            let reps = &mut self.replicas.borrow_mut();
            if let Err(e) = zero_replica::refresh(g.group, s, reps, p.zero_replicas) {
                warn!(error = %e, step, "refreshing the optimizer shard replicas failed; regrouping");
                g.report(&e, step);
                return Err(Next::Regroup(None));
            }
        }
        if faults::fire("sdc", step, Some(g.rank.0), g.generation.0) {
            flip_a_bit(s);
        }
        let mut odd = Vec::new();
        if p.fingerprint_interval > 0 && s.trainer.step % p.fingerprint_interval == 0 {
            match check_replicas(g.group, s, p.zero) {
                Ok(o) => odd = o,
                Err(e) => {
                    warn!(error = %e, step, "replica check failed; the step will be redone in the next generation");
                    g.report(&e, step);
                    return Err(Next::Regroup(None));
                }
            }
            if !odd.is_empty() {
                warn!(step, ranks = ?odd, "replicas differ (silent data corruption): healed from the majority");
            }
        }
        Ok((odd, t.elapsed()))
    }

    /// T-7: at a validation step, this rank's share of the validation set's summed loss (the
    /// parameters the step starts from) and the set's size. The shares are even and fixed by
    /// rank, whatever the micro-batch split: the sum rides on the step's allreduce.
    fn val_share(&self, g: &Gen, s: &Setup, step: u64) -> Option<(f64, usize)> {
        let p = &self.sh.params;
        if p.eval_interval == 0 || step == 0 || step % p.eval_interval != 0 {
            return None;
        }
        let ids = val_ids(s.win, s.ds.val.len(), p.eval_sequences);
        let (n, world, rank) = (ids.len(), g.world as usize, g.rank.0 as usize);
        let mine = &ids[n * rank / world..n * (rank + 1) / world];
        let sum = s
            .trainer
            .val_loss_sum(&s.ds.val, s.win, mine, p.micro_batch);
        Some((sum, n))
    }

    /// This rank's micro-batches of `step`: from the loader, or built here when it is late.
    pub(super) fn batches(&self, g: &mut Gen, s: &Setup, step: u64) -> Vec<(Tensor, Tensor)> {
        let loader = &self.sh.loader;
        if let Some(b) = loader.take(g.plan, step, Duration::from_millis(200)) {
            return b;
        }
        g.late += 1;
        if g.late == 1 || g.late % 100 == 0 {
            warn!(
                step,
                late = g.late,
                "the data loader is late; building the batch here"
            );
        }
        loader::build(&loader.data, &s.ds, g.mine.clone(), step)
    }

    /// T-4 rollback: rank 0 restores its newest complete checkpoint from before `step` and
    /// sends that state to every rank. Returns the step the job is back at, or None when rank
    /// 0 has no checkpoint to go back to (the step is then skipped).
    pub(super) fn rollback(
        &self,
        group: &dyn Group,
        s: &mut Setup,
        step: u64,
    ) -> Result<Option<u64>, RuntimeError> {
        let mut head = vec![0u8; 16];
        if group.rank().0 == 0 {
            let dir = self.sh.params.run_dir.join("checkpoints");
            let (found, skipped) = model_io::latest_checkpoint(&dir, step + 1);
            for (path, why) in skipped {
                warn!(path = %path.display(), %why, "skipping a checkpoint that does not verify");
            }
            match found {
                Some(v) => match model_io::restore_sharded(&v, &mut s.trainer) {
                    Ok(to) => {
                        head[..8].copy_from_slice(&1u64.to_le_bytes());
                        head[8..].copy_from_slice(&to.to_le_bytes());
                    }
                    Err(e) => {
                        warn!(error = %e, path = %v.dir.display(), "cannot roll back to this checkpoint")
                    }
                },
                None => {
                    warn!(dir = %dir.display(), step, "no complete checkpoint from before this step to roll back to")
                }
            }
        }
        group.broadcast(&mut head, Rank(0))?;
        if head[..8] != 1u64.to_le_bytes() {
            return Ok(None);
        }
        transfer_state(group, s, 0, self.sh.params.zero)?;
        Ok(Some(u64::from_le_bytes(
            head[8..].try_into().expect("8 bytes"),
        )))
    }

    /// T-4: every rank saw the same non-finite flags, so every rank rolls back to the last
    /// checkpoint together (once per step), and the loader starts again from the step to redo.
    pub(super) fn roll_back(
        &self,
        g: &mut Gen,
        s: &mut Setup,
        step: u64,
        bad_ranks: &[u32],
        torn: &mut bool,
    ) -> Rolled {
        let (sh, p, progress) = (self.sh, &self.sh.params, &self.sh.progress);
        *torn = true;
        match self.rollback(g.group, s, step) {
            Ok(Some(to)) => {
                *torn = false;
                self.last_rollback.set(Some(step));
                warn!(step, ranks = ?bad_ranks, to, "non-finite loss or gradient; rolled back to the last checkpoint");
                if g.rank.0 == 0 {
                    let line = MetricLine::Rollback(RollbackLine {
                        rollback: true,
                        step,
                        generation: g.generation.0,
                        to_step: to,
                        nonfinite_ranks: bad_ranks.to_vec(),
                        unix_ms: unix_ms(),
                        cause: RollbackCause::Nonfinite,
                    });
                    let _ = g
                        .metrics
                        .write_all(format!("{}\n", line.to_line()).as_bytes());
                }
                progress.step.store(s.trainer.step, Ordering::Relaxed);
                progress.seq.fetch_add(1, Ordering::Relaxed);
                g.plan = sh.loader.set_plan(
                    g.rank.0 as usize,
                    g.mine.clone(),
                    s.trainer.step,
                    p.max_steps,
                );
                Rolled::Back
            }
            Ok(None) => {
                *torn = false;
                Rolled::Nothing
            }
            Err(e) => {
                // The state may be half restored: heal from a peer next generation.
                warn!(error = %e, step, "rollback failed; the step will be redone in the next generation");
                g.report(&e, step);
                Rolled::Failed
            }
        }
    }
}

/// A flipped low bit in one parameter: what a bad DIMM or a silent GPU error does (T-5).
fn flip_a_bit(s: &mut Setup) {
    tch::no_grad(|| {
        let flat = s.trainer.model.params.flat.shallow_clone();
        let v = flat.double_value(&[0]) as f32;
        let _ = flat.get(0).fill_(f32::from_bits(v.to_bits() ^ 1) as f64);
    });
}

/// The loss parts and flags alone, in a small allreduce of their own (ZeRO-1's gradient goes
/// through a reduce-scatter), unless the collective before it (`prior`) failed.
pub(super) fn reduce_extras(
    group: &dyn Group,
    prior: Result<(), RuntimeError>,
    parts: Parts,
    flags: Flags,
) -> (Result<(), RuntimeError>, Summed, Duration) {
    match prior {
        Ok(()) => reduce_as(group, &mut Vec::<f32>::new(), parts, flags, |b| {
            group.allreduce(b)
        }),
        Err(e) => (Err(e), failed(), Duration::ZERO),
    }
}

fn failed() -> Summed {
    Summed {
        loss: f64::NAN,
        val: f64::NAN,
        bad_ranks: Vec::new(),
        preempt: false,
    }
}

/// The step's one allreduce: the gradient with the loss parts and the flags.
fn reduce(
    group: &dyn Group,
    grads: &mut Grads,
    parts: Parts,
    flags: Flags,
) -> (Result<(), RuntimeError>, Summed, Duration) {
    match grads {
        Grads::Float(buf) => reduce_as(group, buf, parts, flags, |b| group.allreduce(b)),
        Grads::Fixed(buf) => {
            let (res, mut summed, took) =
                reduce_as(group, buf, parts, flags, |b| group.allreduce_i64(b));
            // A fixed-point loss cannot carry a NaN or an infinity: a step a rank flagged has
            // no loss to show, as in f32, where the non-finite part spoils the sum.
            if !summed.bad_ranks.is_empty() {
                summed.loss = f64::NAN;
            }
            (res, summed, took)
        }
    }
}

fn reduce_as<V: Slot>(
    group: &dyn Group,
    buf: &mut Vec<V>,
    parts: Parts,
    flags: Flags,
    allreduce: impl FnOnce(&mut Vec<V>) -> Result<(), RuntimeError>,
) -> (Result<(), RuntimeError>, Summed, Duration) {
    let n = buf.len();
    let (rank, world) = (group.rank(), group.world());
    let mut packed = pack(std::mem::take(buf), parts, flags, rank, world);
    let t = Instant::now();
    let reduced = allreduce(&mut packed);
    let took = t.elapsed();
    let summed = match &reduced {
        Ok(()) => unpack(&mut packed, n),
        Err(_) => failed(),
    };
    *buf = packed;
    (reduced, summed, took)
}
