//! One rank of a multi-rank job as a supervised actor group.
//!
//! ```text
//! RankSupervisor
//!  ├─ ControlAgent   gRPC session: registers, heartbeats progress up, directives down
//!  ├─ DataLoader     prefetches the next steps' micro-batches on its own thread
//!  ├─ Communicator   owns the data-plane group of the current generation; reports faults
//!  ├─ Compute        libtorch on a dedicated OS thread: heal, step, allreduce, commit
//!  └─ Checkpointer   writes snapshots in the background
//! ```
//!
//! The children share [`Shared`]: progress counters (read by the control agent for its
//! heartbeats), the directive queue, the prefetch link, the model slot. Each child is
//! restartable alone; what a failure of each does is in docs/semantics.md (S-1..S-8).

use crate::ckpt::{CheckpointerActor, CheckpointerArgs, CheckpointerMsg};
use crate::comm::{CommunicatorActor, CommunicatorArgs, CommunicatorMsg};
use crate::compute::{ComputeActor, ComputeArgs};
use crate::control::{ControlAgentActor, ControlArgs};
use crate::error::{ActorError, Result};
use crate::loader::{DataLoaderActor, LoaderArgs, LoaderData, LoaderLink};
use crate::policy::{ChildSpec, Intensity, OnStuck, Strategy};
use crate::supervisor::{ChildFactory, Heart, RankArgs, RankOutcome, RankSupervisor, StartFuture};
use crate::Setup;
use parking_lot::{Condvar, Mutex};
use phalanx_model::optim::OptimConfig;
use phalanx_proto::pb;
use phalanx_proto::MAX_RECENT_STEPS;
use phalanx_runtime::coordinator::client::{Client, ClientOpts};
use phalanx_runtime::metrics::ResumeLine;
use phalanx_runtime::{Generation, Rank};
use ractor::{Actor, ActorCell, ActorRef};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc as smpsc;
use std::sync::Arc;
use std::time::Duration;

/// Exit codes of a worker process, for the launcher.
/// The rank's phase in `Progress::phase` (sent as `pb::Phase` in heartbeats).
pub const PHASE_IDLE: u8 = 0;
pub const PHASE_TRAINING: u8 = 1;
pub const PHASE_HEALING: u8 = 2;
pub const PHASE_DONE: u8 = 3;

pub const EXIT_DONE: i32 = 0;
pub const EXIT_REFUSED: i32 = 1;
pub const EXIT_FENCED: i32 = 3;
pub const EXIT_HALTED: i32 = 4;
/// Stopped on request (SIGTERM, SIGINT) after a committed checkpoint of the last step (C-8).
pub const EXIT_PREEMPTED: i32 = 6;
pub use crate::policy::EXIT_ESCALATED;

/// Builds a fresh model, optimizer, dataset view and sampler (for a compute incarnation
/// whose state was torn by a failure mid-update).
pub type SetupFn = Arc<dyn Fn() -> Result<Setup> + Send + Sync>;

/// Everything a rank needs; the binary builds it from the job's config.
#[derive(Clone)]
pub struct RankParams {
    pub url: String,
    /// The address this rank's peers reach its listeners at (never loopback across hosts).
    pub advertise_ip: String,
    pub client: ClientOpts,
    pub register: pb::RegisterRequest,
    pub setup: SetupFn,
    pub run_dir: PathBuf,
    pub max_steps: u64,
    pub global_batch: usize,
    pub micro_batch: usize,
    /// Validation every this many steps (0: only at the end), over this many sequences (T-7).
    pub eval_interval: u64,
    pub eval_sequences: usize,
    pub optim: OptimConfig,
    pub heartbeat_interval: Duration,
    pub checkpoint_interval: u64,
    /// Retention: the newest this many committed checkpoints are kept ...
    pub keep_checkpoints: usize,
    /// ... and every one whose step is a multiple of this (0: none).
    pub keep_every: u64,
    /// Deterministic mode (exact fixed-point gradient sums).
    pub deterministic: bool,
    /// ZeRO-1: the AdamW moments sharded over the ranks (Z-1).
    pub zero: bool,
    /// Z-4: ranks that hold a copy of each shard, refreshed every this many steps.
    pub zero_replicas: u32,
    pub zero_replica_interval: u64,
    /// The job's seed (dropout per micro-batch in deterministic mode).
    pub seed: u64,
    /// Every this many steps the ranks compare digests of their state (0: never).
    pub fingerprint_interval: u64,
    /// Roll back to the last saved checkpoint on a non-finite step instead of skipping it.
    pub rollback_on_nonfinite: bool,
    pub collective_timeout: Duration,
    /// Shared-memory collectives within a node (P-11).
    pub mesh: bool,
    /// The compute child's watchdog deadline (a step, a heal, a collective included).
    pub watchdog: Duration,
    pub intensity: Intensity,
    /// Steps the data loader prepares ahead.
    pub prefetch: usize,
    /// How each generation's group is built (`comm::ucx()` in a worker process).
    pub data_plane: crate::comm::DataPlane,
    /// The checkpoint this worker's state was loaded from (C-6): rank 0 records it in the
    /// metrics before the job's first step.
    pub resumed: Option<ResumeLine>,
}

/// Progress the compute loop publishes and the control agent heartbeats.
#[derive(Default)]
pub struct Progress {
    pub step: AtomicU64,
    pub seq: AtomicU64,
    pub generation: AtomicU64,
    pub step_us: AtomicU32,
    pub compute_us: AtomicU32,
    pub loss_bits: AtomicU32,
    /// 0 idle, 1 training, 2 healing, 3 done.
    /// One of the `PHASE_*` values (an atomic, so the compute thread sets it without a lock).
    pub phase: AtomicU8,
    /// Steps committed since the last heartbeat, for the straggler detector.
    recent: Mutex<Vec<pb::StepTime>>,
}

impl Progress {
    pub fn record_step(&self, step: u64, compute: Duration, fixed: Duration, micro_batches: usize) {
        let mut r = self.recent.lock();
        // Older ones are dropped: a heartbeat that late is a liveness problem, not a straggler one.
        if r.len() == MAX_RECENT_STEPS {
            r.remove(0);
        }
        r.push(pb::StepTime {
            step,
            compute_us: compute.as_micros().min(u32::MAX as u128) as u32,
            fixed_us: fixed.as_micros().min(u32::MAX as u128) as u32,
            micro_batches: micro_batches as u32,
        });
    }

    pub fn take_recent(&self) -> Vec<pb::StepTime> {
        std::mem::take(&mut *self.recent.lock())
    }
}

/// A rank's place in a new generation, as the coordinator assigned it.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub generation: Generation,
    pub rank: Rank,
    pub world: u32,
    /// The committed step the generation resumes at.
    pub resume_step: u64,
    /// Micro-batches of each global batch per rank, in rank order; empty: the even split.
    pub shares: Vec<u32>,
    /// The generation before lost a member (P-10).
    pub abandon_previous: bool,
}

impl From<pb::Assign> for Assignment {
    fn from(a: pb::Assign) -> Self {
        Assignment {
            generation: Generation(a.generation),
            rank: Rank(a.rank),
            world: a.world,
            resume_step: a.resume_step,
            shares: a.shares,
            abandon_previous: a.abandon_previous,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Directive {
    Assign(Assignment),
    Evict(String),
    Drain,
    Shutdown(String),
    /// Every rank finished: a spare has nothing left to wait for (K-13).
    JobComplete,
}

/// The registration, once the control agent has it.
#[derive(Clone)]
pub struct Control {
    pub member: u64,
    /// The secret Register gave this member; every later call carries it.
    pub secret: String,
    pub client: Client,
}

/// The model and optimizer, handed from one compute incarnation to the next. `torn` is
/// set while an update is half-applied: a successor must not train on that state.
pub struct ModelSlot {
    pub setup: Option<Setup>,
    pub torn: bool,
}

pub struct Shared {
    pub params: RankParams,
    pub progress: Progress,
    pub directives_tx: smpsc::Sender<Directive>,
    pub directives: Mutex<smpsc::Receiver<Directive>>,
    pub faults_tx: tokio::sync::mpsc::UnboundedSender<pb::FaultReport>,
    pub faults: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<pb::FaultReport>>,
    pub control: Mutex<Option<Control>>,
    pub session: tokio::sync::Mutex<Option<crate::control::Session>>,
    pub control_ready: Condvar,
    /// Set when the control plane refused this worker (exit 1 with this reason).
    pub refused: Mutex<Option<String>>,
    pub loader: LoaderLink,
    pub model: Mutex<ModelSlot>,
    pub model_back: Condvar,
    pub communicator: Mutex<Option<ActorRef<CommunicatorMsg>>>,
    pub checkpointer: Mutex<Option<ActorRef<CheckpointerMsg>>>,
    pub handle: tokio::runtime::Handle,
    /// The rank is stopping: threads leave at their next check.
    pub stopping: AtomicBool,
    /// This rank's place in the last generation it joined (`u32::MAX`: none yet).
    pub last_rank: AtomicU32,
    /// The newest generation assigned in place of one that lost a member: a collective of an
    /// older generation gives up when it sees it (P-10).
    pub abandoned_below: Arc<AtomicU64>,
    /// The transports of the group just built, for the next heartbeat.
    pub group_links: Mutex<Option<pb::GroupLinks>>,
    /// A background checkpoint is queued or being written (at most one snapshot is held).
    pub saving: AtomicBool,
    /// The newest part of a checkpoint this rank made durable: its vote, in every heartbeat.
    pub durable: Mutex<Option<pb::CheckpointPart>>,
    /// The newest checkpoint this rank committed (as rank 0).
    pub committed_checkpoint: AtomicU64,
    /// The resume line is in the metrics (written once per process).
    pub resume_recorded: AtomicBool,
    /// The host buffers of the last part written, reused by the next stage (C-5).
    pub part_buffers: Mutex<Vec<Vec<f32>>>,
    /// Send a heartbeat now, not at the next tick (the rank's phase changed).
    pub beat_now: tokio::sync::Notify,
}

impl Shared {
    pub fn last_rank(&self) -> Option<u32> {
        Some(self.last_rank.load(Ordering::Relaxed)).filter(|&r| r != u32::MAX)
    }

    pub fn set_last_rank(&self, r: u32) {
        self.last_rank.store(r, Ordering::Relaxed);
    }

    /// The rank to name in a report about this rank itself.
    pub fn progress_rank(&self) -> u32 {
        self.last_rank().unwrap_or(0)
    }

    /// Blocks until the control agent registered (or `stop` says to give up).
    pub fn wait_control(&self, stop: &dyn Fn() -> bool) -> Option<Control> {
        let mut c = self.control.lock();
        loop {
            if let Some(c) = c.as_ref() {
                return Some(c.clone());
            }
            if stop() || self.stopping.load(Ordering::Relaxed) {
                return None;
            }
            self.control_ready
                .wait_for(&mut c, Duration::from_millis(50));
        }
    }
}

/// The children in start order; rest-for-one restarts follow this order.
pub const CONTROL: usize = 0;
pub const LOADER: usize = 1;
pub const COMMUNICATOR: usize = 2;
pub const COMPUTE: usize = 3;
pub const CHECKPOINTER: usize = 4;

pub fn child_specs(watchdog: Duration) -> Vec<ChildSpec> {
    vec![
        // S-1: the session reconnects under the same member id; nothing else restarts.
        ChildSpec {
            name: "control-agent",
            strategy: Strategy::OneForOne,
            on_stuck: OnStuck::Restart,
            deadline: None,
        },
        // S-2: the loader's output is tagged, so a new one simply refills the queue.
        ChildSpec {
            name: "data-loader",
            strategy: Strategy::OneForOne,
            on_stuck: OnStuck::Restart,
            deadline: Some(watchdog),
        },
        // S-3: compute borrows the communicator's group: both restart, then the checkpointer.
        ChildSpec {
            name: "communicator",
            strategy: Strategy::RestForOne,
            on_stuck: OnStuck::Restart,
            deadline: None,
        },
        // S-4: a compute failure restarts compute and the checkpointer after it; a stuck
        // compute thread cannot be cancelled and gives the rank up (S-6).
        ChildSpec {
            name: "compute",
            strategy: Strategy::RestForOne,
            on_stuck: OnStuck::EscalateRank,
            deadline: Some(watchdog),
        },
        ChildSpec {
            name: "checkpointer",
            strategy: Strategy::OneForOne,
            on_stuck: OnStuck::Restart,
            deadline: None,
        },
    ]
}

struct Factory {
    shared: Arc<Shared>,
    /// This rank's number among the ranks started in this process (in its actors' names).
    tag: u64,
}

impl ChildFactory for Factory {
    fn start(&self, idx: usize, incarnation: u64, heart: Heart, sup: ActorCell) -> StartFuture {
        let shared = self.shared.clone();
        let tag = self.tag;
        Box::pin(async move {
            let name = |n: &str| Some(format!("{n}-{tag}-{incarnation}"));
            let cell = match idx {
                CONTROL => {
                    let (r, _) = Actor::spawn_linked(
                        name("control-agent"),
                        ControlAgentActor,
                        ControlArgs { shared, heart },
                        sup,
                    )
                    .await
                    .map_err(|e| ActorError::Spawn(e.to_string()))?;
                    r.get_cell()
                }
                LOADER => {
                    let (r, _) = Actor::spawn_linked(
                        name("data-loader"),
                        DataLoaderActor,
                        LoaderArgs { shared, heart },
                        sup,
                    )
                    .await
                    .map_err(|e| ActorError::Spawn(e.to_string()))?;
                    r.get_cell()
                }
                COMMUNICATOR => {
                    let (r, _) = Actor::spawn_linked(
                        name("communicator"),
                        CommunicatorActor,
                        CommunicatorArgs {
                            shared: shared.clone(),
                        },
                        sup,
                    )
                    .await
                    .map_err(|e| ActorError::Spawn(e.to_string()))?;
                    *shared.communicator.lock() = Some(r.clone());
                    r.get_cell()
                }
                COMPUTE => {
                    let (r, _) = Actor::spawn_linked(
                        name("compute"),
                        ComputeActor,
                        ComputeArgs {
                            shared,
                            heart,
                            incarnation,
                        },
                        sup,
                    )
                    .await
                    .map_err(|e| ActorError::Spawn(e.to_string()))?;
                    r.get_cell()
                }
                CHECKPOINTER => {
                    let (r, _) = Actor::spawn_linked(
                        name("checkpointer"),
                        CheckpointerActor,
                        CheckpointerArgs {
                            shared: shared.clone(),
                        },
                        sup,
                    )
                    .await
                    .map_err(|e| ActorError::Spawn(e.to_string()))?;
                    *shared.checkpointer.lock() = Some(r.clone());
                    r.get_cell()
                }
                other => return Err(ActorError::Spawn(format!("no child #{other}"))),
            };
            Ok(cell)
        })
    }
}

/// Runs one rank to its end; returns the process exit code. `first` is the first compute
/// incarnation's state, built by the caller before the rank registers, so that bad input (a
/// missing dataset, a bad model config) fails before the job sees this worker.
pub fn run(params: RankParams, first: Setup) -> Result<i32> {
    start(params, first)?.wait()
}

/// A running rank: its async runtime (control agent, supervisor and the actors' tasks) and
/// what its children share.
pub struct RankHandle {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    outcome: Arc<Mutex<Option<RankOutcome>>>,
    ended: tokio::sync::oneshot::Receiver<Result<()>>,
    url: String,
}

/// Ranks started in this process, so that each supervisor has a name of its own.
static STARTED: AtomicU64 = AtomicU64::new(0);

/// Starts one rank (see [`run`]).
pub fn start(params: RankParams, first: Setup) -> Result<RankHandle> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("phalanx-rank")
        .enable_all()
        .build()
        .map_err(|source| ActorError::Io {
            what: "cannot start the rank's async runtime".into(),
            source,
        })?;
    let (dtx, drx) = smpsc::channel();
    let (ftx, frx) = tokio::sync::mpsc::unbounded_channel();
    let specs = child_specs(params.watchdog);
    let intensity = params.intensity;
    let prefetch = params.prefetch.max(1);
    let url = params.url.clone();
    let data = LoaderData {
        dir: first.ds.dir.clone(),
        sampler: first.sampler.clone(),
        win: first.win,
        device: first.trainer.model.device(),
    };
    // A rank resumed from a checkpoint registers at its step (C-6).
    let start_step = first.trainer.step;
    let setup = Some(first);
    let shared = Arc::new(Shared {
        params,
        progress: Progress::default(),
        directives_tx: dtx,
        directives: Mutex::new(drx),
        faults_tx: ftx,
        faults: tokio::sync::Mutex::new(frx),
        control: Mutex::new(None),
        session: tokio::sync::Mutex::new(None),
        control_ready: Condvar::new(),
        refused: Mutex::new(None),
        loader: LoaderLink::new(prefetch, data),
        model: Mutex::new(ModelSlot { setup, torn: false }),
        model_back: Condvar::new(),
        communicator: Mutex::new(None),
        checkpointer: Mutex::new(None),
        handle: rt.handle().clone(),
        stopping: AtomicBool::new(false),
        last_rank: AtomicU32::new(u32::MAX),
        abandoned_below: Arc::new(AtomicU64::new(0)),
        group_links: Mutex::new(None),
        beat_now: tokio::sync::Notify::new(),
        saving: AtomicBool::new(false),
        durable: Mutex::new(None),
        committed_checkpoint: AtomicU64::new(0),
        resume_recorded: AtomicBool::new(false),
        part_buffers: Mutex::new(Vec::new()),
    });
    shared.progress.step.store(start_step, Ordering::Relaxed);
    let outcome = Arc::new(Mutex::new(None::<RankOutcome>));
    let o = outcome.clone();
    // Actor names are unique per process, and a test may run several ranks in one.
    let tag = STARTED.fetch_add(1, Ordering::Relaxed);
    let factory = Arc::new(Factory {
        shared: shared.clone(),
        tag,
    });
    let name = format!("rank-{}-{tag}", std::process::id());
    let (end_tx, ended) = tokio::sync::oneshot::channel();
    rt.spawn(async move {
        let r = async {
            let (_sup, handle) = Actor::spawn(
                Some(name),
                RankSupervisor,
                RankArgs {
                    specs,
                    factory,
                    intensity,
                    watchdog_tick: Duration::from_millis(100),
                    outcome: o,
                },
            )
            .await
            .map_err(|e| ActorError::Spawn(e.to_string()))?;
            let _ = handle.await;
            Ok::<(), ActorError>(())
        }
        .await;
        let _ = end_tx.send(r);
    });
    Ok(RankHandle {
        rt,
        shared,
        outcome,
        ended,
        url,
    })
}

impl RankHandle {
    /// The last step this rank committed.
    pub fn step(&self) -> u64 {
        self.shared.progress.step.load(Ordering::Relaxed)
    }

    /// Waits for the rank's end; returns the process exit code.
    pub fn wait(self) -> Result<i32> {
        let RankHandle {
            rt,
            shared,
            outcome,
            ended,
            url,
        } = self;
        match rt.block_on(ended) {
            Ok(r) => r?,
            Err(_) => {
                return Err(ActorError::Spawn(
                    "the rank supervisor's task was lost".into(),
                ))
            }
        }
        shared.stopping.store(true, Ordering::Relaxed);
        let out = outcome.lock().clone().unwrap_or(RankOutcome {
            code: EXIT_ESCALATED,
            reason: "the rank supervisor ended without an outcome".into(),
            log: Vec::new(),
        });
        if let Some(reason) = shared.refused.lock().clone() {
            return Err(ActorError::Refused { url, reason });
        }
        // Threads that are stuck (the reason the rank gives up) must not keep the process.
        rt.shutdown_timeout(Duration::from_millis(500));
        Ok(out.code)
    }

    /// Ends the rank as a crash would, for ranks that are threads of a test: its tasks and
    /// connections are dropped at once (the coordinator sees its session break), and its
    /// threads leave at their next check, closing its data-plane group.
    pub fn crash(self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.rt.shutdown_background();
    }
}
