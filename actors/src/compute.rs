//! `ComputeActor`: the data-parallel training loop, on a dedicated OS thread.
//!
//! For each generation it gets the group from the communicator, brings every rank to the
//! same committed state (G-2), and runs steps until the job ends or a collective fails; the
//! step in flight is then redone in the next generation with the same global batch (G-1).
//! libtorch never runs on a tokio worker. The model lives in [`ModelSlot`], so a restarted
//! incarnation takes over its predecessor's state unless that state was torn mid-update.

use crate::ckpt::CheckpointerMsg;
use crate::comm::{CommunicatorMsg, SharedGroup};
use crate::faults;
use crate::loader;
use crate::rank::{
    Assignment, Control, Directive, Shared, EXIT_DONE, EXIT_FENCED, EXIT_HALTED, PHASE_DONE,
    PHASE_HEALING, PHASE_IDLE, PHASE_TRAINING,
};
use crate::supervisor::{finish_reason, spawn_body, Heart};
use crate::{ActorError, Setup};
use phalanx_model::io as model_io;
use phalanx_model::optim::lr_at;
use phalanx_proto::pb;
use phalanx_runtime::dataplane::Group;
use phalanx_runtime::events::unix_ms;
use phalanx_runtime::metrics::{FinalLine, MetricLine, RollbackLine, StepLine};
use phalanx_runtime::{Generation, Rank, RuntimeError};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;
use tracing::{info, warn};

pub struct ComputeActor;

pub struct ComputeArgs {
    pub shared: Arc<Shared>,
    pub heart: Heart,
    pub incarnation: u64,
}

pub enum ComputeMsg {
    /// The thread ended: `Ok((code, why))` the rank's work is over, `Err` it failed.
    Ended(Result<(i32, String), ActorError>),
}

pub struct ComputeState {
    cancel: Arc<AtomicBool>,
}

impl Drop for ComputeState {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Actor for ComputeActor {
    type Msg = ComputeMsg;
    type State = ComputeState;
    type Arguments = ComputeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ComputeArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let cancel = spawn_body("phalanx-compute", myself, ComputeMsg::Ended, move |c| {
            Loop::new(&args.shared, &args.heart, c, args.incarnation).run()
        })?;
        Ok(ComputeState { cancel })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: ComputeMsg,
        _st: &mut ComputeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ComputeMsg::Ended(Ok((code, why))) => {
                myself.stop(Some(finish_reason(code, &why)));
                Ok(())
            }
            ComputeMsg::Ended(Err(e)) => Err(e.into()),
        }
    }
}

/// Holds the model while an incarnation runs and hands it back when it ends, however it
/// ends (a panic unwinds through this guard).
struct SlotGuard<'a> {
    shared: &'a Shared,
    setup: Option<Setup>,
    torn: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut slot = self.shared.model.lock();
        slot.setup = self.setup.take();
        slot.torn = self.torn;
        self.shared.model_back.notify_all();
    }
}

fn tensor_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu).view([-1])).unwrap_or_default()
}

/// SHA-256 of parameters and optimizer state: equal on every member at a commit (G-2).
pub fn state_fingerprint(s: &Setup) -> String {
    use sha2::{Digest, Sha256};
    let t = &s.trainer;
    let mut h = Sha256::new();
    for x in [&t.model.params.flat, &t.opt.m, &t.opt.v] {
        for f in tensor_vec(x) {
            h.update(f.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// How a rank of a new generation got the committed state (logged, and it names the lowest
/// rank that held it).
#[derive(Debug)]
enum Healed {
    /// Broadcast from the one rank that held it.
    From(u32),
    /// Each holder sent a stripe to every rank that lacked it.
    Striped(Vec<u32>),
}

/// Brings every rank of a new generation to the committed state of the most advanced ones:
/// the ranks learn each other's step (an allreduce of one-hot steps); if they differ, the
/// ranks at the highest step send parameters, optimizer state and step to the others, striped
/// over all of them when there are several (a joiner then pulls from every holder at once),
/// broadcast from the one otherwise.
fn sync_state(group: &dyn Group, s: &mut Setup) -> Result<Option<Healed>, RuntimeError> {
    let world = group.world() as usize;
    let all = group.gather_u64(s.trainer.step)?;
    let max = *all.iter().max().unwrap_or(&0);
    if all.iter().all(|&x| x == max) {
        return Ok(None);
    }
    let holders: Vec<Rank> = (0..world as u32)
        .filter(|&r| all[r as usize] == max)
        .map(Rank)
        .collect();
    if holders.len() == 1 {
        transfer_state(group, s, holders[0].0)?;
        return Ok(Some(Healed::From(holders[0].0)));
    }
    let me = group.rank();
    let need = state_len(s);
    // One round per joiner, on every rank, so that the group's operation count stays equal.
    let mut buf = if holders.contains(&me) {
        state_bytes(s)
    } else {
        vec![0u8; need]
    };
    for j in (0..world as u32).map(Rank).filter(|r| !holders.contains(r)) {
        if holders.contains(&me) {
            group.send_striped(j, &holders, &mut buf)?;
        } else if j == me {
            group.recv_striped(&holders, &mut buf)?;
        } else {
            group.skip()?;
        }
    }
    if !holders.contains(&me) {
        load_state(s, &buf)?;
    }
    Ok(Some(Healed::Striped(holders.iter().map(|r| r.0).collect())))
}

fn state_len(s: &Setup) -> usize {
    3 * s.trainer.model.num_params() as usize * 4 + 16
}

/// Parameters, optimizer moments, step and optimizer step count, little-endian.
fn state_bytes(s: &Setup) -> Vec<u8> {
    let t = &s.trainer;
    let mut floats = tensor_vec(&t.model.params.flat);
    floats.extend(tensor_vec(&t.opt.m));
    floats.extend(tensor_vec(&t.opt.v));
    let mut buf: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
    buf.extend(t.step.to_le_bytes());
    buf.extend(t.opt.t.to_le_bytes());
    buf
}

fn load_state(s: &mut Setup, buf: &[u8]) -> Result<(), RuntimeError> {
    let need = state_len(s);
    if buf.len() != need {
        return Err(RuntimeError::InvalidArgument {
            op: "state transfer",
            reason: format!("received {} bytes, expected {need}", buf.len()),
        });
    }
    let t = &mut s.trainer;
    let n = t.model.num_params() as usize;
    let floats: Vec<f32> = buf[..3 * n * 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    tch::no_grad(|| {
        let dev = t.model.device();
        t.model
            .params
            .flat
            .shallow_clone()
            .copy_(&Tensor::from_slice(&floats[..n]).to_device(dev));
        t.opt
            .m
            .copy_(&Tensor::from_slice(&floats[n..2 * n]).to_device(dev));
        t.opt
            .v
            .copy_(&Tensor::from_slice(&floats[2 * n..]).to_device(dev));
    });
    let tail = &buf[3 * n * 4..];
    t.step = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes"));
    t.opt.t = u64::from_le_bytes(tail[8..16].try_into().expect("8 bytes"));
    t.model.params.zero_grads();
    Ok(())
}

/// `leader` broadcasts parameters, optimizer state and step; every other rank takes them.
fn transfer_state(group: &dyn Group, s: &mut Setup, leader: u32) -> Result<(), RuntimeError> {
    let mut buf = if group.rank().0 == leader {
        state_bytes(s)
    } else {
        // Every rank passes a buffer of the broadcast's size.
        vec![0u8; state_len(s)]
    };
    group.broadcast(&mut buf, Rank(leader))?;
    if group.rank().0 != leader {
        load_state(s, &buf)?;
    }
    Ok(())
}

/// A 64-bit digest of parameters and optimizer state, for the periodic cross-rank comparison
/// (fixed, so every build of phalanx computes the same value).
pub fn quick_fingerprint(s: &Setup) -> u64 {
    let t = &s.trainer;
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for x in [&t.model.params.flat, &t.opt.m, &t.opt.v] {
        for f in tensor_vec(x) {
            h = (h.rotate_left(5) ^ f.to_bits() as u64).wrapping_mul(0x0100_0000_01B3);
        }
    }
    h ^ t.step
}

/// The ranks whose digest differs from the majority's, and the rank to heal them from. Without
/// a strict majority the lowest rank's digest is taken as the reference.
pub fn odd_ranks(digests: &[u64]) -> (Vec<u32>, u32) {
    let mut counts: std::collections::BTreeMap<u64, usize> = Default::default();
    for d in digests {
        *counts.entry(*d).or_default() += 1;
    }
    let reference = counts
        .iter()
        .find(|(_, &c)| c * 2 > digests.len())
        .map_or(digests.first().copied().unwrap_or(0), |(d, _)| *d);
    let odd = (0..digests.len() as u32)
        .filter(|&r| digests[r as usize] != reference)
        .collect();
    let leader = digests.iter().position(|d| *d == reference).unwrap_or(0) as u32;
    (odd, leader)
}

/// Silent-data-corruption check: every rank's digest goes to every rank; ranks that differ
/// from the majority are named and healed from it.
fn check_replicas(group: &dyn Group, s: &mut Setup) -> Result<Vec<u32>, RuntimeError> {
    let digests = group.gather_u64(quick_fingerprint(s))?;
    let (odd, leader) = odd_ranks(&digests);
    if !odd.is_empty() {
        transfer_state(group, s, leader)?;
    }
    Ok(odd)
}

fn suspect_of(e: &RuntimeError, me: Rank, world: u32) -> u32 {
    match e {
        RuntimeError::PeerFailed { rank, .. } => rank.0,
        // A timeout does not say who; name the ring neighbour we wait on.
        _ => (me.0 + world - 1) % world.max(1),
    }
}

/// Deterministic mode: every micro-batch's gradient alone (dropout seeded by step and
/// micro-batch), summed as exact fixed-point integers and encoded for an allreduce whose
/// result does not depend on the order or grouping of the sum. Returns the local mean loss,
/// the encoded buffer and whether any gradient or loss was non-finite.
fn deterministic_grads(
    s: &mut Setup,
    batches: &[(Tensor, Tensor)],
    mine: std::ops::Range<usize>,
    mbs: usize,
    step: u64,
    seed: u64,
) -> (f64, Vec<f32>, bool) {
    let n = s.trainer.model.num_params() as usize;
    let mut acc = vec![0i64; n];
    let (mut loss, mut bad) = (0.0, false);
    for (i, mb) in mine.enumerate() {
        tch::manual_seed(
            phalanx_model::sampler::mix64(seed ^ step.rotate_left(20) ^ mb as u64) as i64,
        );
        s.trainer.model.params.zero_grads();
        let l = s.trainer.accumulate(&batches[i..i + 1], mbs);
        let g = tensor_vec(s.trainer.flat_grads());
        bad |= !l.is_finite() || g.iter().any(|x| !x.is_finite());
        loss += l;
        fixed::add(&mut acc, &g);
    }
    s.trainer.model.params.zero_grads();
    (loss / batches.len().max(1) as f64, fixed::encode(&acc), bad)
}

/// Exact, order-independent sums of f32 gradients: fixed point with 40 fractional bits in
/// i64, carried through an f32 allreduce as four 16-bit limbs of a biased u64. A limb sum over
/// up to 256 ranks stays below 2^24, where f32 holds every integer exactly, so the allreduced
/// limbs are the same whatever order the ring adds them in.
pub mod fixed {
    const FRAC: i32 = 40;
    /// |gradient element| is clamped below 2^15 so that 64 micro-batches cannot overflow.
    const LIMIT: f64 = 32767.0;
    const BIAS: i128 = 1 << 62;

    pub fn add(acc: &mut [i64], g: &[f32]) {
        let scale = (2f64).powi(FRAC);
        for (a, x) in acc.iter_mut().zip(g) {
            let v = if x.is_finite() {
                (*x as f64).clamp(-LIMIT, LIMIT)
            } else {
                0.0
            };
            *a += (v * scale).round() as i64;
        }
    }

    pub fn encode(acc: &[i64]) -> Vec<f32> {
        let mut out = Vec::with_capacity(acc.len() * 4);
        for &a in acc {
            let u = (a as i128 + BIAS) as u64;
            for l in 0..4 {
                out.push(((u >> (16 * l)) & 0xFFFF) as f32);
            }
        }
        out
    }

    /// The sum over `world` ranks' encodings, back to f32.
    pub fn decode(limbs: &[f32], world: u32) -> Vec<f32> {
        let scale = (2f64).powi(-FRAC);
        limbs
            .chunks_exact(4)
            .map(|c| {
                let total: i128 = c
                    .iter()
                    .enumerate()
                    .map(|(l, v)| (*v as i128) << (16 * l))
                    .sum::<i128>()
                    - BIAS * world as i128;
                (total as f64 * scale) as f32
            })
            .collect()
    }
}

/// What a step comes to once its sums are in. Every rank computes it from the same reduced
/// buffer, so every rank reaches the same verdict (T-2, T-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The allreduce failed: the step is redone in the next generation (R-*).
    Regroup,
    /// Every rank's loss and gradient were finite: apply the update.
    Commit,
    /// Non-finite somewhere: every rank skips the step.
    Skip,
    /// Non-finite, with rollback asked for and this step not rolled back for already: every
    /// rank goes back to the last checkpoint.
    RollBack,
}

pub fn verdict(
    reduced: bool,
    bad_ranks: &[u32],
    rollback_on_nonfinite: bool,
    last_rollback: Option<u64>,
    step: u64,
) -> Verdict {
    if !reduced {
        Verdict::Regroup
    } else if bad_ranks.is_empty() {
        Verdict::Commit
    } else if rollback_on_nonfinite && last_rollback != Some(step) {
        // A step that goes bad again after its rollback is skipped: replaying the same data
        // may well meet the same fault.
        Verdict::RollBack
    } else {
        Verdict::Skip
    }
}

/// The buffer of a step's one allreduce: the gradient, then this rank's part of the global
/// mean loss, then one slot per rank for its own non-finite flag (so the bad ranks are named).
pub fn pack(mut grads: Vec<f32>, loss_part: f64, bad: bool, rank: Rank, world: u32) -> Vec<f32> {
    let n = grads.len();
    grads.push(loss_part as f32);
    grads.extend(std::iter::repeat_n(0f32, world as usize));
    if bad {
        grads[n + 1 + rank.0 as usize] = 1.0;
    }
    grads
}

/// The reduced buffer back into the summed gradient (left in `buf`), the mean loss and the
/// ranks that flagged themselves.
pub fn unpack(buf: &mut Vec<f32>, n: usize) -> (f64, Vec<u32>) {
    let bad: Vec<u32> = buf[n + 1..]
        .iter()
        .enumerate()
        .filter(|(_, f)| **f > 0.5)
        .map(|(r, _)| r as u32)
        .collect();
    buf.truncate(n + 1);
    let loss = buf.pop().unwrap_or(f32::NAN) as f64;
    (loss, bad)
}

/// How a generation ended for this rank.
/// What a rollback did.
enum Rolled {
    /// Back at the last checkpoint: the step is redone.
    Back,
    /// No checkpoint to go back to: the step stays skipped.
    Nothing,
    /// It failed half way: this generation is over.
    Failed,
}

/// What one step measured and decided, for the heartbeat and the metrics line.
struct Measured {
    step: u64,
    /// The step's epoch and its index within it.
    epoch: u64,
    st: u64,
    lr: f64,
    loss: f64,
    /// None: skipped (non-finite somewhere, T-2).
    grad_norm: Option<f64>,
    bad_ranks: Vec<u32>,
    /// Ranks whose replica differed from the majority's (T-5).
    odd: Vec<u32>,
    /// Wall time of the step, and its parts.
    dt: Duration,
    data_wait: Duration,
    compute: Duration,
    in_collectives: Duration,
    /// Time this rank was descheduled inside collectives during the step.
    stalled: Duration,
}

/// One generation's context, for its steps.
struct Gen<'g> {
    ctl: &'g Control,
    comm: ActorRef<CommunicatorMsg>,
    generation: Generation,
    rank: Rank,
    world: u32,
    group: &'g dyn Group,
    mbs: usize,
    tokens_per_step: f64,
    device: tch::Device,
    /// Every rank's micro-batches of the global batch, and this rank's.
    shares: Vec<[usize; 2]>,
    mine: std::ops::Range<usize>,
    /// The data loader's plan for this generation.
    plan: u64,
    metrics: std::fs::File,
    /// Steps the loader was late for.
    late: u64,
}

impl Gen<'_> {
    /// A failed collective, to the coordinator through the communicator.
    fn report(&self, e: &RuntimeError, step: u64) {
        let (ctl, comm) = (self.ctl, &self.comm);
        report_fault(comm, ctl, self.generation, self.rank, self.world, e, step);
    }
}

/// Tells the coordinator, through the communicator, that a collective of `generation` failed
/// and whom it suspects.
fn report_fault(
    comm: &ActorRef<CommunicatorMsg>,
    ctl: &Control,
    generation: Generation,
    rank: Rank,
    world: u32,
    e: &RuntimeError,
    step: u64,
) {
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

enum Next {
    /// Wait for (or take) the next assignment.
    Regroup(Option<Assignment>),
    Exit(i32, String),
}

struct Loop<'a> {
    sh: &'a Shared,
    heart: &'a Heart,
    cancel: &'a AtomicBool,
    incarnation: u64,
    /// This rank's last commit as a ledger record, when it was not rank 0 (which writes the
    /// ledger): if rank 0 did not record it, this rank may restate it (see `generation`).
    last_commit: std::cell::RefCell<Option<StepLine>>,
    /// The step whose non-finite result last caused a rollback: if it goes bad again, it is
    /// skipped (a rollback that replays the same data may well meet the same fault).
    last_rollback: std::cell::Cell<Option<u64>>,
}

impl<'a> Loop<'a> {
    fn new(sh: &'a Shared, heart: &'a Heart, cancel: &'a AtomicBool, incarnation: u64) -> Self {
        Self {
            sh,
            heart,
            cancel,
            incarnation,
            last_commit: std::cell::RefCell::new(None),
            last_rollback: std::cell::Cell::new(None),
        }
    }

    /// T-4 rollback: rank 0 restores its newest complete checkpoint from before `step` and
    /// sends that state to every rank. Returns the step the job is back at, or None when rank
    /// 0 has no checkpoint to go back to (the step is then skipped).
    fn rollback(
        &self,
        group: &dyn Group,
        s: &mut Setup,
        step: u64,
    ) -> Result<Option<u64>, RuntimeError> {
        let mut head = vec![0u8; 16];
        if group.rank().0 == 0 {
            let dir = self.sh.params.run_dir.join("checkpoints");
            match model_io::latest_checkpoint(&dir, step + 1) {
                Some((_, path)) => match model_io::restore(&path, &mut s.trainer) {
                    Ok(to) => {
                        head[..8].copy_from_slice(&1u64.to_le_bytes());
                        head[8..].copy_from_slice(&to.to_le_bytes());
                    }
                    Err(e) => {
                        warn!(error = %e, path = %path.display(), "cannot roll back to this checkpoint")
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
        transfer_state(group, s, 0)?;
        Ok(Some(u64::from_le_bytes(
            head[8..].try_into().expect("8 bytes"),
        )))
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.sh.stopping.load(Ordering::Relaxed)
    }

    /// Takes the model from the slot; a torn one is rebuilt (it heals from a peer).
    fn take_model(&self) -> Result<Option<SlotGuard<'a>>, ActorError> {
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
        let mut setup = slot.setup.take();
        let torn = slot.torn;
        drop(slot);
        if torn {
            warn!("the model was torn by a failure mid-update; rebuilding it to heal from a peer");
            setup = Some((self.sh.params.setup)()?);
        }
        self.heart.beat();
        Ok(Some(SlotGuard {
            shared: self.sh,
            setup,
            torn: false,
        }))
    }

    fn run(&self) -> Result<(i32, String), ActorError> {
        let Some(mut guard) = self.take_model()? else {
            return Ok((EXIT_DONE, "rank stopping".into()));
        };
        self.heart.busy(false);
        let Some(ctl) = self.sh.wait_control(&|| self.cancelled()) else {
            return Ok((EXIT_DONE, "rank stopping".into()));
        };
        let progress = &self.sh.progress;
        let held = progress.generation.load(Ordering::Relaxed);
        if held > 0 {
            // A restarted incarnation: the old generation's collectives are lost to it. Ask
            // for a regroup under its own name first (so the peers' reports of this rank do
            // not evict it), then let go of the group so the peers stop waiting on it.
            self.report_self(&ctl, held);
            if let Some(c) = self.sh.communicator.lock().clone() {
                let _ = c.cast(CommunicatorMsg::Release);
            }
        }
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

    fn report_self(&self, ctl: &Control, generation: u64) {
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
        let r = self.sh.handle.block_on(async move {
            c.report_fault(phalanx_runtime::coordinator::client::request(req, &opts))
                .await
        });
        if let Err(s) = r {
            warn!(code = ?s.code(), msg = s.message(), "could not ask the coordinator for a regroup");
        }
    }

    /// Waits for a directive; `None` while nothing arrived within `wait`.
    fn directive(&self, wait: Duration) -> Result<Option<Directive>, ActorError> {
        let rx = self.sh.directives.lock();
        match rx.recv_timeout(wait) {
            Ok(d) => Ok(Some(d)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(ActorError::ChildGone("control agent")),
        }
    }

    fn save_on_halt(
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
    fn write_fingerprint(
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

    fn save_now(&self, dir: &Path, s: &Setup) -> Result<(), ActorError> {
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

    fn checkpoint_async(&self, s: &Setup) {
        let step = s.trainer.step;
        // One snapshot in flight at most: a disk slower than the checkpoint interval skips
        // checkpoints instead of queueing copies of the model without bound.
        if self.sh.saving.swap(true, Ordering::AcqRel) {
            warn!(
                step,
                "the previous checkpoint is still being written; skipping this one"
            );
            return;
        }
        let Ok(c) = model_io::snapshot(&s.trainer, &s.ds.meta.tokenizer, s.ds.meta.vocab.clone())
        else {
            self.sh.saving.store(false, Ordering::Release);
            return;
        };
        let dir = self
            .sh
            .params
            .run_dir
            .join("checkpoints")
            .join(format!("step-{step}"));
        let sent = self.sh.checkpointer.lock().clone().is_some_and(|ck| {
            ck.cast(CheckpointerMsg::Save {
                dir,
                step,
                contents: Box::new(c),
                reply: None,
            })
            .is_ok()
        });
        if !sent {
            self.sh.saving.store(false, Ordering::Release);
        }
    }

    /// Waits for this rank's next assignment; `Err(next)` when the rank leaves instead
    /// (stopping, evicted, shut down).
    fn await_assign(
        &self,
        s: &Setup,
        last_rank: Option<u32>,
    ) -> Result<Result<Assignment, Next>, ActorError> {
        loop {
            if self.cancelled() {
                return Ok(Err(Next::Exit(EXIT_DONE, "rank stopping".into())));
            }
            self.heart.beat();
            match self.directive(Duration::from_millis(100))? {
                Some(Directive::Assign(x)) => return Ok(Ok(x)),
                Some(Directive::Drain) | None => continue,
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
    fn connect_group(
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
    fn between_steps(
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

    /// One generation: wait for it, join, train until it ends.
    fn generation(
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
        let healed = match sync_state(group, s) {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "state sync failed; waiting for the next generation");
                report_fault(&comm, ctl, generation, rank, world, &e, s.trainer.step);
                return Ok(Next::Regroup(None));
            }
        };
        if s.trainer.step == 0 && assign.resume_step > 0 {
            // K-9: nobody in this generation holds the committed state; training on would
            // silently restart the job from step 0. The coordinator halts before this; a rank
            // never trusts that alone.
            let why = format!(
                "generation {generation} resumes at step {} but no member holds a state past step \
                 0; refusing to train from scratch",
                assign.resume_step
            );
            warn!(%why, "no committed state in the group");
            return Ok(Next::Exit(EXIT_HALTED, format!("halted: {why}")));
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
                .rank_micro_batches_split(&assign.shares, world as usize, r)
        };
        let shares: Vec<[usize; 2]> = (0..world as usize)
            .map(|r| {
                let m = split(r);
                [m.start, m.end]
            })
            .collect();
        let mine = split(rank.0 as usize);
        let plan = sh
            .loader
            .set_plan(rank.0 as usize, mine.clone(), s.trainer.step, p.max_steps);
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p.run_dir.join("metrics.jsonl"))
            .map_err(|source| ActorError::Io {
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

    /// One step of a generation: data, forward and backward, the allreduce, the verdict
    /// (commit, skip, roll back), the replica check and the record. `Some` ends the generation.
    fn one_step(
        &self,
        g: &mut Gen,
        s: &mut Setup,
        torn: &mut bool,
    ) -> Result<Option<Next>, ActorError> {
        let p = &self.sh.params;
        let (generation, rank, world, group) = (g.generation, g.rank, g.world, g.group);
        let (mbs, device) = (g.mbs, g.device);
        let mine = g.mine.clone();
        let step = s.trainer.step;
        let (epoch, st) = s.sampler.locate(step);
        let lr = lr_at(&p.optim, step);
        let t_step = Instant::now();
        let batches = self.batches(g, s, step);
        let data_wait = t_step.elapsed();
        // Compute time excludes waiting for data and in collectives: it is the straggler
        // detector's and the rebalancer's measure of this rank's speed.
        let t_compute = Instant::now();
        if faults::fire("compute-hang", step, Some(rank.0), generation.0) {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        let (local_loss, buf, local_bad) = if p.deterministic {
            deterministic_grads(s, &batches, mine.clone(), mbs, step, p.seed)
        } else {
            let l = s.trainer.accumulate(&batches, mbs);
            let b = tensor_vec(s.trainer.flat_grads());
            let bad = !l.is_finite() || b.iter().any(|x| !x.is_finite());
            (l, b, bad)
        };
        if faults::fire("compute-panic", step, Some(rank.0), generation.0) {
            panic!("injected compute panic at step {step}");
        }
        let compute = t_compute.elapsed();
        let nan = faults::fire("nan", step, Some(rank.0), generation.0);
        let mut buf = buf;
        if nan {
            buf[0] = f32::NAN;
        }
        // Bad numerics are caught before the commit, and named: each rank flags its own
        // non-finite loss or gradient in a slot of its own that rides along with the sum.
        let n = buf.len();
        let loss_part = local_loss * mine.len() as f64 / mbs as f64;
        let mut buf = pack(buf, loss_part, local_bad || nan, rank, world);
        let (t_reduce, stalled_before) = (Instant::now(), group.stalled());
        let reduced = group.allreduce(&mut buf);
        let mut in_collectives = t_reduce.elapsed();
        let (loss, bad_ranks) = match &reduced {
            Ok(()) => unpack(&mut buf, n),
            Err(_) => (f64::NAN, Vec::new()),
        };
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
                if p.deterministic {
                    buf = fixed::decode(&buf, world);
                }
                *torn = true;
                grad_norm = s
                    .trainer
                    .apply_flat(&Tensor::from_slice(&buf).to_device(device), lr);
                *torn = false;
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
        if faults::fire("sdc", step, Some(rank.0), generation.0) {
            // A flipped low bit in one parameter: what a bad DIMM or a silent GPU error does.
            tch::no_grad(|| {
                let flat = s.trainer.model.params.flat.shallow_clone();
                let v = flat.double_value(&[0]) as f32;
                let _ = flat.get(0).fill_(f32::from_bits(v.to_bits() ^ 1) as f64);
            });
        }
        let mut odd = Vec::new();
        if p.fingerprint_interval > 0 && s.trainer.step % p.fingerprint_interval == 0 {
            let t_check = Instant::now();
            let checked = check_replicas(group, s);
            in_collectives += t_check.elapsed();
            match checked {
                Ok(o) => odd = o,
                Err(e) => {
                    warn!(error = %e, step, "replica check failed; the step will be redone in the next generation");
                    g.report(&e, step);
                    return Ok(Some(Next::Regroup(None)));
                }
            }
            if !odd.is_empty() {
                warn!(step, ranks = ?odd, "replicas differ (silent data corruption): healed from the majority");
            }
        }
        let measured = Measured {
            step,
            epoch,
            st,
            lr,
            loss,
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
        Ok(None)
    }

    /// This rank's micro-batches of `step`: from the loader, or built here when it is late.
    fn batches(&self, g: &mut Gen, s: &Setup, step: u64) -> Vec<(Tensor, Tensor)> {
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

    /// T-4: every rank saw the same non-finite flags, so every rank rolls back to the last
    /// checkpoint together (once per step), and the loader starts again from the step to redo.
    fn roll_back(
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

    /// A committed (or skipped) step: the figures the heartbeat carries, and its line in
    /// `metrics.jsonl` with the sample ledger's fields (rank 0), or kept to restate (others).
    fn record_commit(&self, g: &mut Gen, s: &Setup, m: Measured) {
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
        if g.rank.0 != 0 {
            *self.last_commit.borrow_mut() = Some(ledger);
            return;
        }
        let line = MetricLine::Step(StepLine {
            loss: Some(m.loss),
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
        if p.checkpoint_interval > 0 && s.trainer.step % p.checkpoint_interval == 0 {
            self.checkpoint_async(s);
        }
    }

    /// The last step is committed: fingerprints, the final barrier, rank 0's evaluation and
    /// save, and the exit.
    fn finish(
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
        let lost = group.barrier().err().map(|e| e.to_string());
        if let Some(why) = &lost {
            warn!(%why, "a peer was lost after the last step; the job's result is complete");
        }
        if rank.0 == 0 {
            let val = s
                .trainer
                .evaluate(&s.ds.val, s.win, p.eval_batches, p.micro_batch);
            self.save_now(&p.run_dir.join("model"), s)?;
            let line = MetricLine::Final(FinalLine {
                is_final: true,
                step: s.trainer.step,
                val_loss: val,
                peer_lost_at_end: lost,
                unix_ms: unix_ms(),
            });
            let _ = metrics.write_all(format!("{}\n", line.to_line()).as_bytes());
        }
        // Let the coordinator see "done" before the session closes (so the exit is no fault).
        self.heart.busy(false);
        std::thread::sleep(3 * p.heartbeat_interval.max(Duration::from_millis(50)));
        Ok(Next::Exit(EXIT_DONE, "training complete".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::odd_ranks;
    use phalanx_runtime::Rank;

    // DET-1: the fixed-point sum is the same for any grouping and order of the addends, and
    // close to the float sum.
    #[test]
    fn fixed_point_sum_is_order_independent() {
        use super::fixed;
        let g: Vec<Vec<f32>> = (0..6)
            .map(|i| {
                (0..50)
                    .map(|j| ((i * 31 + j * 7) as f32).sin() * 10f32.powi(-(j % 9)))
                    .collect()
            })
            .collect();
        // World 1: one rank sums all six; world 3: ranks sum 2 each; world 4: 2,2,1,1.
        let run = |split: &[&[usize]]| {
            let encs: Vec<Vec<f32>> = split
                .iter()
                .map(|mbs| {
                    let mut acc = vec![0i64; 50];
                    for &m in *mbs {
                        fixed::add(&mut acc, &g[m]);
                    }
                    fixed::encode(&acc)
                })
                .collect();
            // The allreduce: element-wise f32 sums, here in reverse rank order.
            let mut sum = vec![0f32; encs[0].len()];
            for e in encs.iter().rev() {
                for (s, x) in sum.iter_mut().zip(e) {
                    *s += x;
                }
            }
            fixed::decode(&sum, split.len() as u32)
        };
        let one = run(&[&[0, 1, 2, 3, 4, 5]]);
        let three = run(&[&[0, 1], &[2, 3], &[4, 5]]);
        let four = run(&[&[0, 1], &[2, 3], &[4], &[5]]);
        assert_eq!(one, three);
        assert_eq!(one, four);
        let float: Vec<f32> = (0..50).map(|j| g.iter().map(|v| v[j]).sum()).collect();
        // Within the f32 sum's own rounding (addends are at most 1 in magnitude).
        for (a, b) in one.iter().zip(&float) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }

    // SDC-1: the odd rank out is named and the majority is the reference.
    #[test]
    fn the_verdict_of_a_step() {
        use super::{verdict, Verdict};
        // T-2 / T-4: the same sums give every rank the same verdict.
        assert_eq!(verdict(false, &[], false, None, 7), Verdict::Regroup);
        assert_eq!(verdict(false, &[1], true, None, 7), Verdict::Regroup);
        assert_eq!(verdict(true, &[], true, None, 7), Verdict::Commit);
        assert_eq!(verdict(true, &[2], false, None, 7), Verdict::Skip);
        assert_eq!(verdict(true, &[2], true, None, 7), Verdict::RollBack);
        assert_eq!(verdict(true, &[2], true, Some(6), 7), Verdict::RollBack);
        // The same step bad again after its rollback is skipped, not rolled back forever.
        assert_eq!(verdict(true, &[2], true, Some(7), 7), Verdict::Skip);
    }

    // T-2: each rank's flag and loss part ride along with the gradient and come back named.
    #[test]
    fn pack_and_unpack_name_the_bad_ranks() {
        use super::{pack, unpack};
        let world = 3;
        let mut sum = vec![0f32; 2 + 1 + world as usize];
        for r in 0..world {
            let b = pack(vec![1.0, 2.0], 0.5, r == 1, Rank(r), world);
            for (s, x) in sum.iter_mut().zip(&b) {
                *s += x;
            }
        }
        let (loss, bad) = unpack(&mut sum, 2);
        assert_eq!(sum, vec![3.0, 6.0]);
        assert!((loss - 1.5).abs() < 1e-6);
        assert_eq!(bad, vec![1]);
    }

    #[test]
    fn odd_rank_out_is_found_by_majority() {
        assert_eq!(odd_ranks(&[7, 7, 9, 7]), (vec![2], 0));
        assert_eq!(odd_ranks(&[9, 7, 7]), (vec![0], 1));
        assert_eq!(odd_ranks(&[5, 5]), (vec![], 0));
        // No strict majority: the lowest rank is the reference.
        assert_eq!(odd_ranks(&[1, 2]), (vec![1], 0));
        assert_eq!(odd_ranks(&[3]), (vec![], 0));
    }
}
