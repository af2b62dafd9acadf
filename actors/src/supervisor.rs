//! `RankSupervisor`: starts a rank's children in order, restarts them by their strategy,
//! escalates past the restart intensity, and runs the watchdog. The rules are in
//! [`crate::policy`]; this actor only carries them out.

use crate::policy::{self, Beat, ChildExit, ChildSpec, Decision, Intensity, RestartLog};
use crate::ActorError;
use parking_lot::Mutex;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// A child that finished the rank's work: the process exit code and why. It travels as the
/// actor's stop reason (a string, in ractor), encoded and decoded here only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Finished {
    finished: i32,
    why: String,
}

/// The stop reason a child gives when it finished the rank's work.
pub fn finish_reason(code: i32, why: &str) -> String {
    serde_json::to_string(&Finished {
        finished: code,
        why: why.to_string(),
    })
    .unwrap_or_default()
}

fn parse_finish(reason: &str) -> Option<(i32, String)> {
    serde_json::from_str::<Finished>(reason)
        .ok()
        .map(|f| (f.finished, f.why))
}

/// A child's liveness for the watchdog: one per incarnation, so a thread abandoned by a
/// restart cannot keep its successor looking alive.
#[derive(Clone)]
pub struct Heart {
    epoch: Instant,
    busy: Arc<AtomicBool>,
    last_us: Arc<AtomicU64>,
}

impl Default for Heart {
    fn default() -> Self {
        Self::new()
    }
}

impl Heart {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            busy: Arc::new(AtomicBool::new(false)),
            last_us: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Progress was made.
    pub fn beat(&self) {
        self.last_us
            .store(self.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Entering (true) or leaving (false) work that must progress within the deadline.
    pub fn busy(&self, busy: bool) {
        self.beat();
        self.busy.store(busy, Ordering::Relaxed);
    }

    pub fn read(&self) -> Beat {
        Beat {
            busy: self.busy.load(Ordering::Relaxed),
            last: self.epoch + Duration::from_micros(self.last_us.load(Ordering::Relaxed)),
        }
    }
}

/// Runs a child's body on its own OS thread (libtorch and blocking I/O never run on tokio
/// workers). A panic becomes `Err`; the outcome goes to the actor as `ended(result)` unless the
/// returned cancel flag was raised first (the actor was replaced: its late outcome is dropped).
pub fn spawn_body<T: Send + 'static, M: ractor::Message>(
    name: &str,
    me: ActorRef<M>,
    ended: fn(Result<T, ActorError>) -> M,
    body: impl FnOnce(&AtomicBool) -> Result<T, ActorError> + Send + 'static,
) -> std::io::Result<Arc<AtomicBool>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&c)))
                .unwrap_or_else(|p| Err(ActorError::Panicked(panic_text(&p))));
            if !c.load(Ordering::Relaxed) {
                let _ = me.cast(ended(r));
            }
        })?;
    Ok(cancel)
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

pub type StartFuture = Pin<Box<dyn Future<Output = Result<ActorCell, ActorError>> + Send>>;

/// Starts the supervisor's children: `start(i, incarnation, heart, supervisor)` spawns a
/// fresh incarnation of child `i` linked to `supervisor`.
pub trait ChildFactory: Send + Sync + 'static {
    fn start(
        &self,
        idx: usize,
        incarnation: u64,
        heart: Heart,
        supervisor: ActorCell,
    ) -> StartFuture;
}

/// How the rank ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankOutcome {
    pub code: i32,
    pub reason: String,
    /// What the supervisor did on the way, one line each (restarts, escalation).
    pub log: Vec<String>,
}

pub struct RankArgs {
    pub specs: Vec<ChildSpec>,
    pub factory: Arc<dyn ChildFactory>,
    pub intensity: Intensity,
    pub watchdog_tick: Duration,
    pub outcome: Arc<Mutex<Option<RankOutcome>>>,
}

pub struct RankSupervisor;

#[derive(Debug)]
pub enum RankMsg {
    /// Watchdog tick.
    Tick,
}

pub struct RankState {
    specs: Vec<ChildSpec>,
    factory: Arc<dyn ChildFactory>,
    intensity: Intensity,
    children: Vec<Option<ActorCell>>,
    hearts: Vec<Heart>,
    incarnation: u64,
    restarts: RestartLog,
    outcome: Arc<Mutex<Option<RankOutcome>>>,
    log: Vec<String>,
}

impl RankState {
    async fn start(&mut self, idx: usize, me: &ActorCell) -> Result<(), ActorError> {
        self.incarnation += 1;
        let heart = Heart::new();
        heart.beat();
        let cell = self
            .factory
            .start(idx, self.incarnation, heart.clone(), me.clone())
            .await
            .map_err(|e| ActorError::Spawn(format!("{}: {e}", self.specs[idx].name)))?;
        self.hearts[idx] = heart;
        self.children[idx] = Some(cell);
        Ok(())
    }

    fn finish(&mut self, me: &ActorCell, code: i32, reason: String) {
        if code == 0 {
            info!(%reason, "rank finished");
        } else {
            warn!(code, %reason, "rank stops");
        }
        self.log.push(reason.clone());
        *self.outcome.lock() = Some(RankOutcome {
            code,
            reason: reason.clone(),
            log: self.log.clone(),
        });
        // Children are forgotten first so that their terminations are not seen as faults.
        for c in self.children.iter_mut().rev() {
            if let Some(c) = c.take() {
                c.stop(Some("rank stopping".into()));
            }
        }
        me.stop(Some(reason));
    }

    async fn carry_out(&mut self, me: &ActorCell, d: Decision) {
        match d {
            Decision::Exit { code, reason } => self.finish(me, code, reason),
            Decision::Restart { children, reason } => {
                warn!(%reason, "supervisor");
                self.log.push(reason);
                let now = Instant::now();
                self.restarts.record(now);
                // Stop dependents before their dependency, start in order.
                for &i in children.iter().rev() {
                    if let Some(c) = self.children[i].take() {
                        c.kill();
                    }
                }
                for &i in &children {
                    if let Err(e) = self.start(i, me).await {
                        self.finish(me, policy::EXIT_ESCALATED, e.to_string());
                        return;
                    }
                }
            }
        }
    }

    async fn child_ended(&mut self, me: &ActorCell, cell: &ActorCell, exit: ChildExit) {
        let id = cell.get_id();
        let Some(idx) = self
            .children
            .iter()
            .position(|c| c.as_ref().map(|c| c.get_id()) == Some(id))
        else {
            // An incarnation the supervisor itself replaced or stopped.
            return;
        };
        self.children[idx] = None;
        let now = Instant::now();
        self.restarts.prune(now, self.intensity.within);
        let d = policy::decide(now, &self.restarts, &self.specs, idx, &exit, self.intensity);
        self.carry_out(me, d).await;
    }
}

impl Actor for RankSupervisor {
    type Msg = RankMsg;
    type State = RankState;
    type Arguments = RankArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RankArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let n = args.specs.len();
        let mut st = RankState {
            specs: args.specs,
            factory: args.factory,
            intensity: args.intensity,
            children: vec![None; n],
            hearts: (0..n).map(|_| Heart::new()).collect(),
            incarnation: 0,
            restarts: RestartLog::default(),
            outcome: args.outcome,
            log: Vec::new(),
        };
        let me = myself.get_cell();
        for i in 0..n {
            st.start(i, &me).await?;
        }
        myself.send_interval(args.watchdog_tick, || RankMsg::Tick);
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: RankMsg,
        st: &mut RankState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RankMsg::Tick => {
                let beats: Vec<Option<Beat>> = st
                    .children
                    .iter()
                    .zip(&st.hearts)
                    .map(|(c, h)| c.as_ref().map(|_| h.read()))
                    .collect();
                if let Some((idx, idle)) = policy::overdue(Instant::now(), &st.specs, &beats) {
                    error!(
                        child = st.specs[idx].name,
                        idle_ms = idle.as_millis() as u64,
                        "watchdog: child is stuck"
                    );
                    if let Some(cell) = st.children[idx].clone() {
                        st.child_ended(&myself.get_cell(), &cell, ChildExit::Stuck { idle })
                            .await;
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut RankState,
    ) -> Result<(), ActorProcessingErr> {
        let me = myself.get_cell();
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                st.child_ended(&me, &cell, ChildExit::Failed(err.to_string()))
                    .await
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let exit = match reason.as_deref().and_then(parse_finish) {
                    Some((code, reason)) => ChildExit::Finished { code, reason },
                    None => ChildExit::Terminated(reason),
                };
                st.child_ended(&me, &cell, exit).await
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        st: &mut RankState,
    ) -> Result<(), ActorProcessingErr> {
        for c in st.children.iter_mut().rev() {
            if let Some(c) = c.take() {
                c.stop(Some("rank stopping".into()));
            }
        }
        let mut o = st.outcome.lock();
        if o.is_none() {
            *o = Some(RankOutcome {
                code: policy::EXIT_ESCALATED,
                reason: "the rank supervisor stopped".into(),
                log: st.log.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{OnStuck, Strategy};
    use std::sync::atomic::AtomicU32;

    // A finished child's exit code and reason come back as they were given, whatever the
    // reason's text; any other stop reason is no finish.
    #[test]
    fn finish_reasons_round_trip() {
        let why = "halted: below min_world: member 3: finished:7:x";
        assert_eq!(
            parse_finish(&finish_reason(4, why)),
            Some((4, why.to_string()))
        );
        assert_eq!(parse_finish("finished:0:done"), None);
        assert_eq!(parse_finish("rank stopping"), None);
    }

    /// A child that fails, finishes or hangs on command, counting its incarnations.
    struct Toy;
    enum ToyMsg {
        Fail,
        Finish(i32),
    }
    impl Actor for Toy {
        type Msg = ToyMsg;
        type State = ();
        type Arguments = Heart;
        async fn pre_start(&self, _: ActorRef<ToyMsg>, h: Heart) -> Result<(), ActorProcessingErr> {
            h.busy(true);
            Ok(())
        }
        async fn handle(
            &self,
            me: ActorRef<ToyMsg>,
            m: ToyMsg,
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            match m {
                ToyMsg::Fail => Err("toy failure".into()),
                ToyMsg::Finish(c) => {
                    me.stop(Some(finish_reason(c, "toy done")));
                    Ok(())
                }
            }
        }
    }

    struct Factory {
        started: Vec<AtomicU32>,
        refs: Mutex<Vec<Option<ActorRef<ToyMsg>>>>,
    }
    impl ChildFactory for Arc<Factory> {
        fn start(&self, idx: usize, _inc: u64, heart: Heart, sup: ActorCell) -> StartFuture {
            let f = self.clone();
            Box::pin(async move {
                f.started[idx].fetch_add(1, Ordering::SeqCst);
                let (r, _) = Actor::spawn_linked(None, Toy, heart, sup)
                    .await
                    .map_err(|e| ActorError::Spawn(e.to_string()))?;
                f.refs.lock()[idx] = Some(r.clone());
                Ok(r.get_cell())
            })
        }
    }

    fn specs(deadline_ms: u64) -> Vec<ChildSpec> {
        vec![
            ChildSpec {
                name: "a",
                strategy: Strategy::OneForOne,
                on_stuck: OnStuck::Restart,
                deadline: None,
            },
            ChildSpec {
                name: "b",
                strategy: Strategy::RestForOne,
                on_stuck: OnStuck::Restart,
                deadline: None,
            },
            ChildSpec {
                name: "c",
                strategy: Strategy::OneForOne,
                on_stuck: OnStuck::EscalateRank,
                deadline: Some(Duration::from_millis(deadline_ms)),
            },
        ]
    }

    /// Waits (at most 5 s) for the rank supervisor to stop and returns how it ended.
    async fn ended(
        h: tokio::task::JoinHandle<()>,
        outcome: &Mutex<Option<RankOutcome>>,
    ) -> RankOutcome {
        tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .unwrap()
            .unwrap();
        outcome.lock().clone().unwrap()
    }

    async fn start(
        deadline_ms: u64,
    ) -> (
        Arc<Factory>,
        Arc<Mutex<Option<RankOutcome>>>,
        tokio::task::JoinHandle<()>,
    ) {
        let f = Arc::new(Factory {
            started: (0..3).map(|_| AtomicU32::new(0)).collect(),
            refs: Mutex::new(vec![None, None, None]),
        });
        let outcome = Arc::new(Mutex::new(None));
        let (_, h) = Actor::spawn(
            None,
            RankSupervisor,
            RankArgs {
                specs: specs(deadline_ms),
                factory: Arc::new(f.clone()),
                intensity: Intensity {
                    max_restarts: 2,
                    within: Duration::from_secs(60),
                },
                watchdog_tick: Duration::from_millis(20),
                outcome: outcome.clone(),
            },
        )
        .await
        .unwrap();
        (f, outcome, h)
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn child(f: &Factory, i: usize) -> ActorRef<ToyMsg> {
        f.refs.lock()[i].clone().unwrap()
    }

    // S-1, S-2, S-3 and S-4 with real actors: one-for-one, rest-for-one, a kill handled like a
    // failure, and the intensity escalating to the rank.
    #[tokio::test]
    async fn restarts_by_strategy_and_escalates() {
        let (f, outcome, h) = start(60_000).await;
        child(&f, 0).cast(ToyMsg::Fail).unwrap();
        settle().await;
        let n = |i: usize| f.started[i].load(Ordering::SeqCst);
        assert_eq!((n(0), n(1), n(2)), (2, 1, 1));
        // A kill arrives as ActorTerminated: still a fault, restarted with its dependents.
        child(&f, 1).get_cell().kill();
        settle().await;
        assert_eq!((n(0), n(1), n(2)), (2, 2, 2));
        assert!(outcome.lock().is_none());
        // The third restart within the window escalates: the rank stops with code 5.
        child(&f, 0).cast(ToyMsg::Fail).unwrap();
        let o = ended(h, &outcome).await;
        assert_eq!(o.code, policy::EXIT_ESCALATED);
        assert!(o.reason.contains("escalating to the rank"), "{o:?}");
        assert_eq!(o.log.len(), 3, "{o:?}");
    }

    // S-5: a child that finished ends the rank with its code.
    #[tokio::test]
    async fn finished_child_stops_the_rank() {
        let (f, outcome, h) = start(60_000).await;
        child(&f, 2).cast(ToyMsg::Finish(3)).unwrap();
        let o = ended(h, &outcome).await;
        assert_eq!((o.code, o.reason.as_str()), (3, "c finished: toy done"));
    }

    // S-6: a busy child without progress past its deadline is a fault within one tick.
    #[tokio::test]
    async fn watchdog_turns_a_stuck_child_into_a_fault() {
        let t0 = Instant::now();
        let (_f, outcome, h) = start(200).await;
        let o = ended(h, &outcome).await;
        assert_eq!(o.code, policy::EXIT_ESCALATED);
        assert!(o.reason.contains("made no progress"), "{o:?}");
        assert!(
            t0.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t0.elapsed()
        );
    }
}
