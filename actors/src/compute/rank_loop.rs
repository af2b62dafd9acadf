//! The rank's loop over generations: taking the model, directives, assignments, the group.

use super::*;

/// What a rollback did.
pub(super) enum Rolled {
    /// Back at the last checkpoint: the step is redone.
    Back,
    /// No checkpoint to go back to: the step stays skipped.
    Nothing,
    /// It failed half way: this generation is over.
    Failed,
}

/// What one step measured and decided, for the heartbeat and the metrics line.
pub(super) struct Measured {
    pub(super) step: u64,
    /// The step's epoch and its index within it.
    pub(super) epoch: u64,
    pub(super) st: u64,
    pub(super) lr: f64,
    pub(super) loss: f64,
    /// The validation loss of the parameters the step started from, at a validation step.
    pub(super) val_loss: Option<f64>,
    /// None: skipped (non-finite somewhere, T-2).
    pub(super) grad_norm: Option<f64>,
    pub(super) bad_ranks: Vec<u32>,
    /// Ranks whose replica differed from the majority's (T-5).
    pub(super) odd: Vec<u32>,
    /// Wall time of the step, and its parts.
    pub(super) dt: Duration,
    pub(super) data_wait: Duration,
    pub(super) compute: Duration,
    pub(super) in_collectives: Duration,
    /// Time this rank was descheduled inside collectives during the step.
    pub(super) stalled: Duration,
}

/// One generation's context, for its steps.
pub(super) struct Gen<'g> {
    pub(super) ctl: &'g Control,
    pub(super) comm: ActorRef<CommunicatorMsg>,
    pub(super) generation: Generation,
    pub(super) rank: Rank,
    pub(super) world: u32,
    pub(super) group: &'g dyn Group,
    pub(super) mbs: usize,
    pub(super) tokens_per_step: f64,
    pub(super) device: tch::Device,
    /// Every rank's micro-batches of the global batch, and this rank's.
    pub(super) shares: Vec<[usize; 2]>,
    pub(super) mine: std::ops::Range<usize>,
    /// The data loader's plan for this generation.
    pub(super) plan: u64,
    pub(super) metrics: std::fs::File,
    /// Steps the loader was late for.
    pub(super) late: u64,
}

impl Gen<'_> {
    /// A failed collective, to the coordinator through the communicator.
    pub(super) fn report(&self, e: &RuntimeError, step: u64) {
        let (ctl, comm) = (self.ctl, &self.comm);
        report_fault(comm, ctl, self.generation, self.rank, self.world, e, step);
    }
}

/// Tells the coordinator, through the communicator, that a collective of `generation` failed
/// and whom it suspects.
/// Attempts at a restarted compute's report of itself (each bounded by the RPC timeout).
const SELF_REPORT_ATTEMPTS: u32 = 3;

/// The coordinator gave no answer (as opposed to a refusal, which is final).
fn unanswered(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    )
}

pub(super) fn report_fault(
    comm: &ActorRef<CommunicatorMsg>,
    ctl: &Control,
    generation: Generation,
    rank: Rank,
    world: u32,
    e: &RuntimeError,
    step: u64,
) {
    // The coordinator replaced the generation itself: a report about it would be stale.
    if matches!(e, RuntimeError::Abandoned { .. }) {
        return;
    }
    let _ = comm.cast(CommunicatorMsg::Fault(pb::FaultReport {
        member_id: ctl.member,
        generation: generation.0,
        suspect_rank: suspect_of(e, rank, world),
        kind: if matches!(e, RuntimeError::Timeout { .. }) {
            pb::ReportedFault::Timeout
        } else {
            pb::ReportedFault::PeerFailed
        } as i32,
        detail: e.to_string(),
        step,
        member_secret: ctl.secret.clone(),
    }));
}

/// How a generation ended for this rank.
pub(super) enum Next {
    /// Wait for (or take) the next assignment.
    Regroup(Option<Assignment>),
    Exit(i32, String),
}

pub(super) struct Loop<'a> {
    pub(super) sh: &'a Shared,
    pub(super) heart: &'a Heart,
    pub(super) cancel: &'a AtomicBool,
    pub(super) incarnation: u64,
    /// This rank's last commit as a ledger record, when it was not rank 0 (which writes the
    /// ledger): if rank 0 did not record it, this rank may restate it (see `generation`).
    pub(super) last_commit: std::cell::RefCell<Option<StepLine>>,
    /// The step whose non-finite result last caused a rollback: if it goes bad again, it is
    /// skipped (a rollback that replays the same data may well meet the same fault).
    pub(super) last_rollback: std::cell::Cell<Option<u64>>,
    /// The copy of a checkpoint part in flight, if any.
    pub(super) stager: staging::Stager,
    /// Z-4: this rank's last ZeRO-1 snapshot and its copies of its predecessors'.
    pub(super) replicas: std::cell::RefCell<zero_replica::Replicas>,
    /// The gradient buffer of the last step, kept so that the next step neither allocates nor
    /// grows one (the allreduce's extras ride at its end).
    pub(super) grad_buf: std::cell::RefCell<Vec<f32>>,
    /// The `grad_buf` of deterministic mode (i64 fixed-point sums), kept so that the next step
    /// does not allocate.
    pub(super) fixed_buf: std::cell::RefCell<Vec<i64>>,
}

impl<'a> Loop<'a> {
    pub(super) fn new(
        sh: &'a Shared,
        heart: &'a Heart,
        cancel: &'a AtomicBool,
        incarnation: u64,
    ) -> Self {
        Self {
            sh,
            heart,
            cancel,
            incarnation,
            last_commit: std::cell::RefCell::new(None),
            stager: staging::Stager::default(),
            replicas: Default::default(),
            grad_buf: Default::default(),
            fixed_buf: Default::default(),
            last_rollback: std::cell::Cell::new(None),
        }
    }

    pub(super) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.sh.stopping.load(Ordering::Relaxed)
    }

    /// Takes the model from the slot once a predecessor let go of it; a torn one is rebuilt
    /// by `rebuild_if_torn`.
    pub(super) fn take_model(&self) -> Result<Option<SlotGuard<'a>>, ActorError> {
        let mut slot = self.sh.model.lock();
        self.heart.busy(true);
        while slot.setup.is_none() {
            if self.cancelled() {
                return Ok(None);
            }
            // A predecessor still holds it: wait without beating, so that a predecessor
            // that never lets go is caught by the watchdog.
            self.sh
                .model_back
                .wait_for(&mut slot, Duration::from_millis(50));
        }
        let setup = slot.setup.take();
        let torn = slot.torn;
        drop(slot);
        self.heart.beat();
        Ok(Some(SlotGuard {
            shared: self.sh,
            setup,
            torn,
        }))
    }

    /// A model a failure left half-updated is built again (it heals from a peer); should the
    /// build fail, the guard hands the torn one back, still marked, to the next incarnation.
    fn rebuild_if_torn(&self, guard: &mut SlotGuard<'a>) -> Result<(), ActorError> {
        if guard.torn {
            warn!("the model was torn by a failure mid-update; rebuilding it to heal from a peer");
            guard.setup = Some((self.sh.params.setup)()?);
            guard.torn = false;
        }
        Ok(())
    }

    pub(super) fn run(&self) -> Result<(i32, String), ActorError> {
        let Some(ctl) = self.sh.wait_control(&|| self.cancelled()) else {
            return Ok((EXIT_DONE, "rank stopping".into()));
        };
        // Once the predecessor let go (it has stopped using the group).
        let Some(mut guard) = self.take_model()? else {
            return Ok((EXIT_DONE, "rank stopping".into()));
        };
        let held = self.sh.progress.generation.load(Ordering::Relaxed);
        if held > 0 {
            // A restarted incarnation: the old generation's collectives are lost to it. Ask
            // for a regroup under its own name first (so the peers' reports of this rank do
            // not evict it), then let go of the group so the peers stop waiting on it; both
            // before a torn model is rebuilt, which takes a while.
            self.report_self(&ctl, held);
            if let Some(c) = self.sh.communicator.lock().clone() {
                let _ = c.cast(CommunicatorMsg::Release);
            }
        }
        self.rebuild_if_torn(&mut guard)?;
        self.heart.busy(false);
        let mut next = Next::Regroup(None);
        loop {
            next = match next {
                Next::Exit(code, why) => {
                    if let Some(c) = self.sh.communicator.lock().clone() {
                        let _ = c.cast(CommunicatorMsg::Release);
                    }
                    self.sh.loader.pause();
                    return Ok((code, why));
                }
                Next::Regroup(pending) => {
                    let setup = guard.setup.as_mut().expect("the model is held");
                    self.generation(&ctl, setup, pending, &mut guard.torn)?
                }
            };
        }
    }

    pub(super) fn report_self(&self, ctl: &Control, generation: u64) {
        let rank = self.sh.progress_rank();
        let mut c = ctl.client.clone();
        let opts = self.sh.params.client.clone();
        let req = pb::FaultReport {
            member_id: ctl.member,
            generation,
            suspect_rank: rank,
            kind: pb::ReportedFault::Restarted as i32,
            detail: format!("compute restarted (incarnation {})", self.incarnation),
            step: self.sh.progress.step.load(Ordering::Relaxed),
            member_secret: ctl.secret.clone(),
        };
        // Retried while the coordinator does not answer (it may be stalled or restarting):
        // without this report the peers' reports of a closed connection evict a live rank.
        // Any answer ends it, a refusal too (a newer generation, or fenced: nothing to keep).
        let r = self.sh.handle.block_on(async move {
            let mut last = None;
            for attempt in 0..SELF_REPORT_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                }
                let req = phalanx_runtime::coordinator::client::request(req.clone(), &opts);
                match c.report_fault(req).await {
                    Ok(_) => return Ok(()),
                    Err(s) if unanswered(&s) => last = Some(s),
                    Err(s) => return Err(s),
                }
            }
            Err(last.expect("at least one attempt"))
        });
        if let Err(s) = r {
            warn!(code = ?s.code(), msg = s.message(), "could not ask the coordinator for a regroup");
        }
    }

    /// Waits for a directive; `None` while nothing arrived within `wait`.
    pub(super) fn directive(&self, wait: Duration) -> Result<Option<Directive>, ActorError> {
        let rx = self.sh.directives.lock();
        match rx.recv_timeout(wait) {
            Ok(d) => Ok(Some(d)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(ActorError::ChildGone("control agent")),
        }
    }

    /// Waits for this rank's next assignment; `Err(next)` when the rank leaves instead
    /// (stopping, evicted, shut down).
    pub(super) fn await_assign(
        &self,
        s: &Setup,
        last_rank: Option<u32>,
    ) -> Result<Result<Assignment, Next>, ActorError> {
        loop {
            if self.cancelled() {
                return Ok(Err(Next::Exit(EXIT_DONE, "rank stopping".into())));
            }
            // C-8: a rank with no generation to train in (a spare, a regroup under way) has
            // nothing to save: it leaves at once.
            if crate::preempt::requested() {
                return Ok(Err(Next::Exit(
                    EXIT_PREEMPTED,
                    "asked to stop while waiting for a generation".into(),
                )));
            }
            self.heart.beat();
            match self.directive(Duration::from_millis(100))? {
                Some(Directive::Assign(x)) => return Ok(Ok(x)),
                Some(Directive::Drain) | None => continue,
                Some(Directive::JobComplete) => {
                    info!("the job is complete; this spare leaves");
                    return Ok(Err(Next::Exit(EXIT_DONE, "the job is complete".into())));
                }
                Some(Directive::Evict(reason)) => {
                    warn!(%reason, "evicted");
                    return Ok(Err(Next::Exit(EXIT_FENCED, format!("evicted: {reason}"))));
                }
                Some(Directive::Shutdown(reason)) => {
                    warn!(%reason, "shut down by the coordinator");
                    self.save_on_halt(s, last_rank, &reason)?;
                    return Ok(Err(Next::Exit(EXIT_HALTED, format!("halted: {reason}"))));
                }
            }
        }
    }

    /// The data-plane group of `generation`, built by the communicator; `None` when it could
    /// not be built, which is reported to the coordinator (K-13: said, not kept, or the job
    /// idles with every rank alive).
    pub(super) fn connect_group(
        &self,
        comm: &ActorRef<CommunicatorMsg>,
        ctl: &Control,
        generation: Generation,
        rank: Rank,
        world: u32,
        step: u64,
    ) -> Result<Option<SharedGroup>, ActorError> {
        let built = self.sh.handle.block_on(comm.call(
            |reply| CommunicatorMsg::Connect {
                generation,
                rank,
                world,
                reply,
            },
            Some(self.sh.params.collective_timeout * 10),
        ));
        match built {
            Ok(ractor::rpc::CallResult::Success(Ok(g))) => Ok(Some(g)),
            Ok(ractor::rpc::CallResult::Success(Err(
                e @ ActorError::Runtime(RuntimeError::Abandoned { .. }),
            ))) => {
                info!(error = %e, %generation, "the generation was replaced while its group was built; waiting for the next one");
                Ok(None)
            }
            Ok(ractor::rpc::CallResult::Success(Err(e))) => {
                warn!(error = %e, %generation, "could not build the data-plane group; reported, waiting for the next generation");
                let _ = comm.cast(CommunicatorMsg::Fault(pb::FaultReport {
                    member_id: ctl.member,
                    generation: generation.0,
                    suspect_rank: rank.0,
                    kind: pb::ReportedFault::GroupFailed as i32,
                    detail: e.to_string().chars().take(200).collect(),
                    step,
                    member_secret: ctl.secret.clone(),
                }));
                Ok(None)
            }
            Ok(_) | Err(_) => Err(ActorError::ChildGone("communicator")),
        }
    }

    /// Directives between steps: a newer generation, eviction, shutdown, drain. `Some` ends
    /// this generation.
    pub(super) fn between_steps(
        &self,
        s: &Setup,
        generation: Generation,
        rank: Rank,
    ) -> Result<Option<Next>, ActorError> {
        let d = self.sh.directives.lock().try_recv();
        Ok(match d {
            Ok(Directive::Assign(x)) if x.generation > generation => Some(Next::Regroup(Some(x))),
            Ok(Directive::Evict(reason)) => {
                warn!(%reason, "evicted");
                Some(Next::Exit(EXIT_FENCED, format!("evicted: {reason}")))
            }
            Ok(Directive::Shutdown(reason)) => {
                warn!(%reason, "shut down by the coordinator");
                self.save_on_halt(s, Some(rank.0), &reason)?;
                Some(Next::Exit(EXIT_HALTED, format!("halted: {reason}")))
            }
            Ok(Directive::Drain) => Some(Next::Regroup(None)),
            Ok(_) | Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => return Err(ActorError::ChildGone("control agent")),
        })
    }
}
