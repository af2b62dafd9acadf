//! ZeRO-1 in the compute loop (`train.zero = 1`, Z-1 and Z-2 in docs/semantics.md): the
//! gradient is reduce-scattered by the shard plan, each rank updates the parameters of its
//! shard with the moments only it holds, and the parameters are all-gathered. At a new
//! generation the moments move to the new cut of the plan.

use super::zero_plan::{plan, Held, Lost};
use super::*;
use phalanx_model::zero::{shard_plan, sum_of_squares};
use std::ops::Range;

/// Z-1: the step's collectives before the update: this rank's shard of the summed gradient
/// (left in its segment of `buf`), then the loss parts and the flags in one small allreduce.
pub(super) fn reduce(
    group: &dyn Group,
    grads: &mut Grads,
    segs: &[Range<usize>],
    parts: Parts,
    flags: Flags,
) -> (Result<(), RuntimeError>, Summed, Duration) {
    let t = Instant::now();
    let scattered = match grads {
        Grads::Float(buf) => group.reduce_scatter(buf, segs),
        Grads::Fixed(buf) => group.reduce_scatter_i64(buf, segs),
    };
    let (reduced, summed, _) = super::step::reduce_extras(group, scattered, parts, flags);
    (reduced, summed, t.elapsed())
}

/// The whole gradient's norm before clipping, from every rank's sum of squares over its shard:
/// exact (of the fixed-point sums) in deterministic mode, so that any cut gives the norm of
/// replicated training; in f64 otherwise. Non-finite when a square is.
fn global_norm(group: &dyn Group, grads: &Grads, seg: Range<usize>) -> Result<f64, RuntimeError> {
    let g = match grads {
        Grads::Float(buf) => &buf[seg],
        Grads::Fixed(sums) => {
            let mine = fixed::sum_of_squares(&sums[seg]);
            let lo = group.gather_u64(mine as u64)?;
            let hi = group.gather_u64((mine >> 64) as u64)?;
            let sum: u128 = lo
                .iter()
                .zip(&hi)
                .map(|(&l, &h)| (u128::from(h) << 64) | u128::from(l))
                .sum();
            return Ok(fixed::norm(sum));
        }
    };
    let sums = group.gather_u64(sum_of_squares(g).to_bits())?;
    Ok(sums.iter().map(|&b| f64::from_bits(b)).sum::<f64>().sqrt())
}

/// Z-1: the update of this rank's shard and the allgather of the parameters. The new moments
/// are kept only once every parameter arrived, so a failed allgather leaves this rank's state
/// as it was (the step is redone). Returns the gradient norm, or `None` when it is not finite
/// (the step is skipped on every rank: every rank computes the same norm).
pub(super) fn apply(
    group: &dyn Group,
    s: &mut Setup,
    grads: &Grads,
    segs: &[Range<usize>],
    lr: f64,
) -> Result<Option<f64>, RuntimeError> {
    let (me, world) = (group.rank().0 as usize, group.world());
    let seg = segs[me].clone();
    let g = match grads {
        Grads::Float(buf) => buf[seg.clone()].to_vec(),
        Grads::Fixed(sums) => fixed::decode(&sums[seg.clone()]),
    };
    let norm = global_norm(group, grads, seg)?;
    if !norm.is_finite() {
        s.trainer.model.params.zero_grads();
        return Ok(None);
    }
    let t = &mut s.trainer;
    let mine = t.opt.covers();
    let mut p = t.model.params.host_range(mine.clone());
    let (m, v) = t.opt.fused_update(&mut p, &g, lr, norm, &t.optim);
    let n = t.model.num_params() as usize;
    let mut params = vec![0f32; n];
    params[mine].copy_from_slice(&p);
    group.allgather(&mut params, &shard_plan(n, world))?;
    t.model.params.set_host(&params);
    t.opt.keep_update(m, v);
    t.model.params.zero_grads();
    t.step += 1;
    Ok(Some(norm))
}

/// Every rank's account of the moments it holds.
fn gather_held(group: &dyn Group, s: &Setup) -> Result<Vec<Held>, RuntimeError> {
    let c = s.trainer.opt.covers();
    let starts = group.gather_u64(c.start as u64)?;
    let ends = group.gather_u64(c.end as u64)?;
    let ts = group.gather_u64(s.trainer.opt.t)?;
    Ok((0..starts.len())
        .map(|r| Held {
            covers: starts[r] as usize..ends[r] as usize,
            t: ts[r],
        })
        .collect())
}

/// What a reshard did.
pub(super) struct Resharded {
    /// Values whose moments were broadcast, and in how many broadcasts.
    pub values: usize,
    pub broadcasts: usize,
}

/// Z-2: gives every rank of a new generation the moments of its shard of the new cut, from
/// the ranks that hold them at the state's update count (the parameters were healed before).
/// `Ok(Err(lost))` when some values have no such holder left.
pub(super) fn reshard(
    group: &dyn Group,
    s: &mut Setup,
) -> Result<Result<Resharded, Lost>, RuntimeError> {
    let n = s.trainer.model.num_params() as usize;
    let me = group.rank().0 as usize;
    let want = shard_plan(n, group.world());
    let held = gather_held(group, s)?;
    let t = s.trainer.opt.t;
    let moves = match plan(n, &held, &want, t) {
        Ok(m) => m,
        Err(lost) => return Ok(Err(lost)),
    };
    let mine = want[me].clone();
    let (old_m, old_v) = s.trainer.opt.moments();
    let base = s.trainer.opt.base;
    let mut m = vec![0f32; mine.len()];
    let mut v = vec![0f32; mine.len()];
    let (a, b) = overlap(&held[me].covers, &mine);
    if held[me].t == t && a < b {
        m[a - mine.start..b - mine.start].copy_from_slice(&old_m[a - base..b - base]);
        v[a - mine.start..b - mine.start].copy_from_slice(&old_v[a - base..b - base]);
    }
    for mv in &moves {
        let len = mv.values.len();
        let mut bytes = if mv.from as usize == me {
            let r = mv.values.start - base..mv.values.end - base;
            to_bytes(old_m[r.clone()].iter().chain(&old_v[r]))
        } else {
            vec![0u8; 8 * len]
        };
        group.broadcast(&mut bytes, Rank(mv.from))?;
        let (a, b) = overlap(&mv.values, &mine);
        for i in a..b {
            let k = i - mv.values.start;
            m[i - mine.start] = f32_at(&bytes, k);
            v[i - mine.start] = f32_at(&bytes, len + k);
        }
    }
    s.trainer.opt.set_shard(mine, &m, &v);
    Ok(Ok(Resharded {
        values: moves.iter().map(|m| m.values.len()).sum(),
        broadcasts: moves.len(),
    }))
}

/// The values two ranges share, as (start, end) with start >= end when none.
fn overlap(a: &Range<usize>, b: &Range<usize>) -> (usize, usize) {
    let start = a.start.max(b.start);
    (start, a.end.min(b.end).max(start))
}

fn to_bytes<'a>(xs: impl Iterator<Item = &'a f32>) -> Vec<u8> {
    xs.flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_at(bytes: &[u8], i: usize) -> f32 {
    f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"))
}

/// How a ZeRO-1 generation got its shards.
enum Joined {
    Resharded(Resharded),
    /// Z-4: back to the replicas' step, from memory.
    Restored(u64),
    /// Z-3: back to the checkpoint of this step.
    Rewound(u64),
}

impl Loop<'_> {
    /// Z-2 and Z-3 when a generation starts under ZeRO-1: the moments move to the new cut, or,
    /// when some were lost with every rank that held them, every rank goes back to the newest
    /// committed checkpoint. `Some` ends the generation.
    pub(super) fn join_shards(
        &self,
        ctl: &Control,
        comm: &ActorRef<CommunicatorMsg>,
        group: &dyn Group,
        s: &mut Setup,
    ) -> Option<Next> {
        let (rank, world, generation) = (group.rank(), group.world(), group.generation());
        let t0 = Instant::now();
        let step = s.trainer.step;
        let joined = match reshard(group, s) {
            Ok(Ok(r)) => Ok(Ok(Joined::Resharded(r))),
            Ok(Err(lost)) => self.recover(group, s, &lost),
            Err(e) => Err(e),
        };
        let joined = joined.and_then(|j| {
            // Z-4: every generation starts with fresh replicas of its shards.
            if j.is_ok() && self.sh.params.zero_replicas > 0 {
                let mut reps = self.replicas.borrow_mut();
                zero_replica::refresh(group, s, &mut reps, self.sh.params.zero_replicas)?;
            }
            Ok(j)
        });
        let ms = t0.elapsed().as_millis() as u64;
        match joined {
            Ok(Ok(Joined::Resharded(r))) => {
                info!(values = r.values, broadcasts = r.broadcasts, ms, shard = ?s.trainer.opt.covers(),
                      "optimizer moments moved to this generation's shards");
                None
            }
            Ok(Ok(Joined::Restored(to))) => {
                warn!(
                    from = step,
                    to,
                    ms,
                    "restored the lost optimizer shard from replicas in memory (no disk read)"
                );
                None
            }
            Ok(Ok(Joined::Rewound(to))) => {
                warn!(
                    from = step,
                    to, ms, "went back to the last committed checkpoint"
                );
                None
            }
            Ok(Err(why)) => Some(Next::Exit(EXIT_HALTED, format!("halted: {why}"))),
            Err(e) => {
                warn!(error = %e, "moving the optimizer shards failed; waiting for the next generation");
                report_fault(comm, ctl, generation, rank, world, &e, step);
                Some(Next::Regroup(None))
            }
        }
    }

    /// Z-4, then Z-3: the newest step the buddy replicas cover, else the last checkpoint.
    fn recover(
        &self,
        group: &dyn Group,
        s: &mut Setup,
        lost: &Lost,
    ) -> Result<Result<Joined, String>, RuntimeError> {
        let step = s.trainer.step;
        let k = self.sh.params.zero_replicas;
        if k > 0 {
            warn!(values = ?lost.values, step, "optimizer moments were lost with the rank that held them; restoring them from the replicas");
            let restored = zero_replica::restore(group, s, &self.replicas.borrow(), k)?;
            if let Some(to) = restored {
                if group.rank().0 == 0 {
                    let generation = group.generation().0;
                    self.record_rewind(generation, step, to, RollbackCause::ShardFromReplica);
                }
                return Ok(Ok(Joined::Restored(to)));
            }
        }
        warn!(values = ?lost.values, step, "optimizer moments were lost with every rank that held them; going back to the last committed checkpoint");
        Ok(self.rewind(group, s, lost)?.map(Joined::Rewound))
    }

    /// Z-3: every rank restores the newest committed checkpoint rank 0 finds (parameters, and
    /// the moments of its shard of this generation's cut); rank 0 records the return. `Ok(Err)`
    /// says why the job cannot go on.
    fn rewind(
        &self,
        group: &dyn Group,
        s: &mut Setup,
        lost: &Lost,
    ) -> Result<Result<u64, String>, RuntimeError> {
        let p = &self.sh.params;
        let dir = p.run_dir.join("checkpoints");
        let from = s.trainer.step;
        let mut head = vec![0u8; 8];
        if group.rank().0 == 0 {
            let (found, skipped) = model_io::latest_checkpoint(&dir, from + 1);
            for (path, why) in skipped {
                warn!(path = %path.display(), %why, "skipping a checkpoint that does not verify");
            }
            if let Some(v) = found {
                head = (v.step + 1).to_le_bytes().to_vec();
            }
        }
        group.broadcast(&mut head, Rank(0))?;
        let chosen = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let Some(to) = chosen.checked_sub(1) else {
            return Ok(Err(format!(
                "the ZeRO-1 optimizer moments of values {:?} were lost with every rank that \
                 held them, and {} holds no committed checkpoint to go back to; set \
                 run.checkpoint_interval",
                lost.values,
                dir.display()
            )));
        };
        let n = s.trainer.model.num_params() as usize;
        let want = phalanx_model::zero::shard_range(n, group.world(), group.rank().0);
        let zeros = vec![0f32; want.len()];
        s.trainer.opt.set_shard(want, &zeros, &zeros);
        let restored = match model_io::latest_checkpoint(&dir, to + 1).0 {
            Some(v) if v.step == to => model_io::restore_sharded(&v, &mut s.trainer),
            _ => {
                return Ok(Err(format!(
                    "checkpoint step-{to} in {} does not verify on rank {}",
                    dir.display(),
                    group.rank()
                )))
            }
        };
        if let Err(e) = restored {
            return Ok(Err(format!("cannot restore checkpoint step-{to}: {e}")));
        }
        if group.rank().0 == 0 {
            self.record_rewind(group.generation().0, from, to, RollbackCause::ShardLost);
        }
        group.barrier()?;
        Ok(Ok(to))
    }

    fn record_rewind(&self, generation: u64, from: u64, to: u64, cause: RollbackCause) {
        let line = MetricLine::Rollback(RollbackLine {
            rollback: true,
            step: from,
            generation,
            to_step: to,
            nonfinite_ranks: Vec::new(),
            unix_ms: unix_ms(),
            cause,
        });
        let path = self.sh.params.run_dir.join("metrics.jsonl");
        let written = append_lines(&path)
            .and_then(|mut f| f.write_all(format!("{}\n", line.to_line()).as_bytes()));
        if let Err(e) = written {
            warn!(error = %e, path = %path.display(), "cannot record the return to the checkpoint");
        }
    }
}
