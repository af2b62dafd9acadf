//! `DataLoaderActor`: prepares the next steps' micro-batches on its own thread.
//!
//! The compute loop publishes a plan (generation, rank, its micro-batches, next step); the
//! loader fills a bounded queue with that rank's micro-batches for the coming steps. Every
//! item carries the plan it was made for and its step, so the output of a replaced plan or of
//! a previous loader incarnation is recognised and dropped (S-2). If the loader is down or
//! late, the compute loop builds the batch itself: the sampler is a pure function, so both give
//! the same tensors.

use crate::faults;
use crate::rank::Shared;
use crate::supervisor::{spawn_body, Heart};
use crate::ActorError;
use parking_lot::{Condvar, Mutex};
use phalanx_model::data::Dataset;
use phalanx_model::sampler::Sampler;
use phalanx_model::trainer::Windows;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

pub type Batch = Vec<(Tensor, Tensor)>;

/// What to prepare. `id` changes whenever the generation or the rank's share changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    pub id: u64,
    pub rank: usize,
    /// The rank's micro-batches of each global batch: `[first_mb, end_mb)`.
    pub first_mb: usize,
    pub end_mb: usize,
    pub next_step: u64,
    pub max_steps: u64,
    pub active: bool,
}

pub struct Prefetched {
    plan: u64,
    step: u64,
    batch: Batch,
}

/// Where the loader reads its data: the same files, sampler and windows as the compute loop.
#[derive(Clone)]
pub struct LoaderData {
    pub dir: PathBuf,
    pub sampler: Sampler,
    pub win: Windows,
    pub device: Device,
}

pub struct LoaderLink {
    plan: Mutex<Plan>,
    changed: Condvar,
    tx: SyncSender<Prefetched>,
    rx: Mutex<Receiver<Prefetched>>,
    /// An item received before its turn.
    ahead: Mutex<Option<Prefetched>>,
    pub data: LoaderData,
}

impl LoaderLink {
    pub fn new(depth: usize, data: LoaderData) -> Self {
        let (tx, rx) = mpsc::sync_channel(depth);
        Self {
            plan: Mutex::new(Plan::default()),
            changed: Condvar::new(),
            tx,
            rx: Mutex::new(rx),
            ahead: Mutex::new(None),
            data,
        }
    }

    /// A new plan from `next_step` (a new generation or share of the global batch).
    pub fn set_plan(
        &self,
        rank: usize,
        mbs: std::ops::Range<usize>,
        next_step: u64,
        max_steps: u64,
    ) -> u64 {
        let mut p = self.plan.lock();
        *p = Plan {
            id: p.id + 1,
            rank,
            first_mb: mbs.start,
            end_mb: mbs.end,
            next_step,
            max_steps,
            active: true,
        };
        self.changed.notify_all();
        p.id
    }

    pub fn pause(&self) {
        self.plan.lock().active = false;
        self.changed.notify_all();
    }

    /// The batch of `step` under plan `id`, if the loader has it ready within `wait`.
    pub fn take(&self, id: u64, step: u64, wait: Duration) -> Option<Batch> {
        {
            // A loader that (re)starts begins at the step the compute loop waits for. Not
            // `step + 1`: a new plan's first step would be skipped if the loader read the plan
            // only after this.
            let mut p = self.plan.lock();
            if p.id == id {
                p.next_step = p.next_step.max(step);
            }
        }
        let mut ahead = self.ahead.lock();
        if let Some(item) = ahead.take() {
            if item.plan == id && item.step == step {
                return Some(item.batch);
            }
            if item.plan == id && item.step > step {
                *ahead = Some(item);
            }
        }
        let rx = self.rx.lock();
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(item) if item.plan == id && item.step == step => return Some(item.batch),
                // A later step of this plan: kept for its turn.
                Ok(item) if item.plan == id && item.step > step => {
                    // Keep the earliest; this step's item may still come.
                    if ahead
                        .as_ref()
                        .is_none_or(|a| a.plan != id || a.step > item.step)
                    {
                        *ahead = Some(item);
                    }
                }
                // Another plan's, or a step already done (a previous incarnation's output).
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }
}

/// Micro-batches `mbs` of the global batch of `step`: the pure sampler's share of a rank.
pub fn build(d: &LoaderData, ds: &Dataset, mbs: std::ops::Range<usize>, step: u64) -> Batch {
    let (epoch, st) = d.sampler.locate(step);
    mbs.map(|mb| {
        d.win.batch(
            &ds.train,
            epoch,
            &d.sampler.micro_batch_ids(epoch, st, mb),
            d.device,
        )
    })
    .collect()
}

pub struct DataLoaderActor;

pub struct LoaderArgs {
    pub shared: Arc<Shared>,
    pub heart: Heart,
}

pub enum DataLoaderMsg {
    /// The thread ended: `Err` it failed (or panicked).
    Ended(Result<(), ActorError>),
}

pub struct DataLoaderState {
    cancel: Arc<AtomicBool>,
}

impl Drop for DataLoaderState {
    fn drop(&mut self) {
        // Killed or stopped: the thread leaves at its next check, its late output is dropped.
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Actor for DataLoaderActor {
    type Msg = DataLoaderMsg;
    type State = DataLoaderState;
    type Arguments = LoaderArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: LoaderArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let cancel = spawn_body("phalanx-loader", myself, DataLoaderMsg::Ended, move |c| {
            run(&args.shared, &args.heart, c)
        })?;
        Ok(DataLoaderState { cancel })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: DataLoaderMsg,
        _st: &mut DataLoaderState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DataLoaderMsg::Ended(Ok(())) => {
                myself.stop(Some("rank stopping".into()));
                Ok(())
            }
            DataLoaderMsg::Ended(Err(e)) => Err(e.into()),
        }
    }
}

fn run(shared: &Shared, heart: &Heart, cancel: &AtomicBool) -> Result<(), ActorError> {
    let link = &shared.loader;
    let ds = Dataset::open(&link.data.dir)?;
    let mut cursor: Option<(u64, u64)> = None;
    loop {
        if cancel.load(Ordering::Relaxed) || shared.stopping.load(Ordering::Relaxed) {
            return Ok(());
        }
        heart.busy(false);
        let plan = {
            let mut p = link.plan.lock();
            let exhausted = |p: &Plan, c: Option<(u64, u64)>| {
                !p.active || c.is_some_and(|(id, s)| id == p.id && s >= p.max_steps)
            };
            if exhausted(&p, cursor) {
                link.changed.wait_for(&mut p, Duration::from_millis(50));
                continue;
            }
            *p
        };
        let step = match cursor {
            Some((id, s)) if id == plan.id => s.max(plan.next_step),
            _ => plan.next_step,
        };
        if step >= plan.max_steps {
            cursor = Some((plan.id, step));
            continue;
        }
        heart.busy(true);
        if faults::fire(
            "loader-panic",
            step,
            Some(plan.rank as u32),
            shared.progress.generation.load(Ordering::Relaxed),
        ) {
            panic!("injected data-loader panic at step {step}");
        }
        let batch = build(&link.data, &ds, plan.first_mb..plan.end_mb, step);
        heart.busy(false);
        let item = Prefetched {
            plan: plan.id,
            step,
            batch,
        };
        // Blocks while the queue is full (no polling: on a shared machine every wakeup is
        // taken from the compute threads). The consumer drops stale items, which unblocks
        // the send after a plan change.
        if link.tx.send(item).is_err() {
            return Ok(());
        }
        cursor = Some((plan.id, step + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> LoaderLink {
        LoaderLink::new(
            4,
            LoaderData {
                dir: PathBuf::from("unused"),
                sampler: Sampler::new(1, 1000, 8, 4).unwrap(),
                win: Windows { block: 8, seed: 1 },
                device: Device::Cpu,
            },
        )
    }

    fn item(plan: u64, step: u64) -> Prefetched {
        Prefetched {
            plan,
            step,
            batch: vec![(
                Tensor::from_slice(&[step as i64]),
                Tensor::from_slice(&[0i64]),
            )],
        }
    }

    fn got(b: Option<Batch>) -> Option<i64> {
        b.map(|b| b[0].0.int64_value(&[0]))
    }

    // S-2: stale output (another plan, a step already done) is dropped; a later step is kept
    // for its turn, not thrown away; the plan's next step never runs ahead of the consumer.
    #[test]
    fn take_drops_stale_items_and_keeps_early_ones() {
        let l = link();
        let old = l.set_plan(0, 0..2, 0, 100);
        l.tx.send(item(old, 5)).unwrap();
        let id = l.set_plan(0, 0..2, 7, 100);
        assert_eq!(l.plan.lock().next_step, 7);
        l.tx.send(item(id, 6)).unwrap();
        l.tx.send(item(id, 8)).unwrap();
        let w = Duration::from_millis(20);
        // Old plan's 5 and this plan's already-done 6 are dropped; 8 is early: kept.
        assert_eq!(got(l.take(id, 7, w)), None);
        assert_eq!(l.plan.lock().next_step, 7);
        l.tx.send(item(id, 7)).unwrap();
        assert_eq!(got(l.take(id, 7, w)), Some(7));
        assert_eq!(got(l.take(id, 8, w)), Some(8));
        assert_eq!(l.plan.lock().next_step, 8);
        assert_eq!(got(l.take(id, 9, w)), None);
    }
}
