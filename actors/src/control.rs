//! `ControlAgentActor`: the rank's session with the coordinator.
//!
//! Registers (re-registering under the same member id after a restart of this actor or a
//! broken session), heartbeats the progress counters, forwards directives to the compute
//! loop and fault reports to the coordinator, and reconnects with backoff.

use crate::ckpt::{CheckpointerMsg, CommitOrder};
use crate::faults;
use crate::rank::{
    Control, Directive, Shared, EXIT_REFUSED, PHASE_DONE, PHASE_HEALING, PHASE_TRAINING,
};
use crate::supervisor::{finish_reason, Heart};
use crate::ActorError;
use phalanx_proto::pb;
use phalanx_runtime::coordinator::client::{self, OpenError, RankSession};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

pub struct ControlAgentActor;

pub struct ControlArgs {
    pub shared: Arc<Shared>,
    pub heart: Heart,
}

pub enum ControlAgentMsg {
    /// The session task ended: `Ok(Some(reason))` the coordinator refused this worker,
    /// `Ok(None)` it forwarded an eviction or shutdown, `Err` it panicked.
    Ended(Result<Option<String>, ActorError>),
}

pub struct ControlAgentState {
    task: tokio::task::JoinHandle<()>,
}

impl Actor for ControlAgentActor {
    type Msg = ControlAgentMsg;
    type State = ControlAgentState;
    type Arguments = ControlArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ControlArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let inner = tokio::spawn(session(args.shared, args.heart));
        let task = tokio::spawn(async move {
            let r = match inner.await {
                Ok(r) => Ok(r),
                Err(e) if e.is_panic() => {
                    Err(ActorError::Panicked(format!("the session task: {e}")))
                }
                Err(e) => Err(ActorError::Spawn(e.to_string())),
            };
            let _ = myself.cast(ControlAgentMsg::Ended(r));
        });
        Ok(ControlAgentState { task })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: ControlAgentMsg,
        _st: &mut ControlAgentState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ControlAgentMsg::Ended(Ok(Some(refused))) => {
                myself.stop(Some(finish_reason(EXIT_REFUSED, &refused)));
                Ok(())
            }
            // The compute loop acts on the eviction or shutdown it was sent.
            ControlAgentMsg::Ended(Ok(None)) => Ok(()),
            ControlAgentMsg::Ended(Err(e)) => Err(e.into()),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        st: &mut ControlAgentState,
    ) -> Result<(), ActorProcessingErr> {
        st.task.abort();
        Ok(())
    }
}

impl Drop for ControlAgentState {
    fn drop(&mut self) {
        // A killed actor does not run post_stop; its session must not outlive it.
        self.task.abort();
    }
}

fn refusal(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
    )
}

/// An open session: kept in [`Shared`] so that a restarted agent takes it over and the
/// coordinator sees no interruption (S-1).
pub struct Session {
    client: phalanx_runtime::coordinator::client::Client,
    tx: mpsc::Sender<pb::RankMessage>,
    inbound: tonic::Streaming<pb::Directive>,
    heartbeat: Duration,
}

/// Why a session could not be opened.
enum NotOpened {
    /// Worth another try after a backoff (the coordinator is restarting, unreachable).
    Retry,
    /// The coordinator refused this worker, or never answered: the rank gives up with this.
    Refused(String),
    /// The coordinator fenced this member out: an eviction directive was queued.
    Evicted,
}

/// Registers (or re-registers under `member`) and opens the session stream.
async fn open(shared: &Shared, member: &mut u64, started: Instant) -> Result<Session, NotOpened> {
    let p = &shared.params;
    let opts = &p.client;
    let progress = &shared.progress;
    let directives = &shared.directives_tx;
    let c = match client::connect(opts).await {
        Ok(c) => c,
        Err(e) => {
            if *member == 0 && started.elapsed() > Duration::from_secs(10) {
                *shared.refused.lock() = Some(e.to_string());
                return Err(NotOpened::Refused(e.to_string()));
            }
            warn!(error = %e, "coordinator unreachable; retrying");
            return Err(NotOpened::Retry);
        }
    };
    // The compute loop's handle on the coordinator (fault reports): the same channel, kept even
    // when the stream does not open, since the member exists then.
    let c2 = c.clone();
    let mut r = p.register.clone();
    r.member_id = *member;
    r.generation = progress.generation.load(Ordering::Relaxed);
    r.committed_step = progress.step.load(Ordering::Relaxed);
    // A restarted coordinator lets a rank back into its place only if it names it (K-5), and
    // proves it is the same member.
    r.rank = shared.last_rank().unwrap_or(0);
    r.member_secret = shared
        .control
        .lock()
        .as_ref()
        .map(|c| c.secret.clone())
        .unwrap_or_default();
    let (opened, registered) = match RankSession::open(c, opts, r).await {
        Ok(o) => {
            let reg = o.registered.clone();
            (Ok(o), reg)
        }
        Err(OpenError::Register(s)) => {
            let msg = format!("{:?}: {}", s.code(), s.message());
            if refusal(&s) {
                if *member == 0 {
                    *shared.refused.lock() = Some(msg.clone());
                    return Err(NotOpened::Refused(msg));
                }
                let _ = directives.send(Directive::Evict(msg));
                return Err(NotOpened::Evicted);
            }
            warn!(error = %msg, "registration failed; retrying");
            return Err(NotOpened::Retry);
        }
        Err(OpenError::Session { status, registered }) => (Err(status), *registered),
    };
    if *member == 0 {
        info!(member = registered.member_id, "registered");
    } else {
        info!(member = registered.member_id, "re-registered");
    }
    *member = registered.member_id;
    *shared.control.lock() = Some(Control {
        member: *member,
        secret: registered.member_secret.clone(),
        client: c2,
    });
    shared.control_ready.notify_all();
    match opened {
        Ok(o) => {
            let heartbeat = o.heartbeat(Duration::from_millis(20));
            Ok(Session {
                client: o.client,
                tx: o.tx,
                inbound: o.inbound,
                heartbeat,
            })
        }
        Err(st) => {
            if st.code() == tonic::Code::FailedPrecondition {
                let _ = directives.send(Directive::Evict(st.message().to_string()));
                return Err(NotOpened::Evicted);
            }
            Err(NotOpened::Retry)
        }
    }
}

/// The session loop. Returns `Some(reason)` if the coordinator refused this worker.
async fn session(shared: Arc<Shared>, heart: Heart) -> Option<String> {
    let opts = shared.params.client.clone();
    let progress = &shared.progress;
    let directives = shared.directives_tx.clone();
    // One agent at a time owns the fault queue and the session; a restarted agent takes
    // them over where its predecessor left them.
    let mut faults = shared.faults.lock().await;
    let mut sess = shared.session.lock().await;
    let mut member = shared.control.lock().as_ref().map_or(0, |c| c.member);
    let mut backoff = Duration::from_millis(100);
    let started = Instant::now();
    loop {
        heart.beat();
        if sess.is_none() {
            match open(&shared, &mut member, started).await {
                Ok(s) => {
                    backoff = Duration::from_millis(100);
                    *sess = Some(s);
                }
                Err(NotOpened::Evicted) => return None,
                Err(NotOpened::Refused(why)) if member == 0 => return Some(why),
                Err(NotOpened::Refused(_) | NotOpened::Retry) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let s = sess.as_mut().expect("opened above");
        let mut hb = tokio::time::interval(s.heartbeat);
        loop {
            tokio::select! {
                _ = hb.tick() => {
                    heart.beat();
                    let step = progress.step.load(Ordering::Relaxed);
                    if faults::fire("control-panic", step, None, progress.generation.load(Ordering::Relaxed)) {
                        panic!("injected control-agent panic at step {step}");
                    }
                    if s.tx.send(heartbeat(&shared)).await.is_err() { break; }
                }
                _ = shared.beat_now.notified() => {
                    if s.tx.send(heartbeat(&shared)).await.is_err() { break; }
                }
                Some(f) = faults.recv() => {
                    let mut cc = s.client.clone();
                    let o = opts.clone();
                    tokio::spawn(async move { let _ = cc.report_fault(client::request(f, &o)).await; });
                }
                msg = s.inbound.message() => match msg {
                    Ok(Some(d)) => {
                        let d = match d.kind {
                            Some(pb::directive::Kind::Assign(a)) => {
                                // Before the compute loop reads it: a wait in the old
                                // generation may be under way (P-10).
                                if a.abandon_previous {
                                    shared.abandoned_below.fetch_max(a.generation, Ordering::SeqCst);
                                }
                                Directive::Assign(a.into())
                            }
                            Some(pb::directive::Kind::Evict(e)) => Directive::Evict(e.reason),
                            Some(pb::directive::Kind::Drain(_)) => Directive::Drain,
                            Some(pb::directive::Kind::Shutdown(s)) if s.complete => Directive::JobComplete,
                            Some(pb::directive::Kind::Shutdown(s)) => Directive::Shutdown(s.reason),
                            Some(pb::directive::Kind::Commit(c)) => {
                                commit(&shared, c);
                                continue;
                            }
                            _ => continue,
                        };
                        let stop = matches!(
                            d,
                            Directive::Evict(_) | Directive::Shutdown(_) | Directive::JobComplete
                        );
                        if directives.send(d).is_err() || stop { return None; }
                    }
                    Ok(None) => break,
                    Err(st) => {
                        if st.code() == tonic::Code::FailedPrecondition {
                            let _ = directives.send(Directive::Evict(st.message().to_string()));
                            return None;
                        }
                        warn!(code = ?st.code(), "session with the coordinator broke; reconnecting");
                        break;
                    }
                }
            }
        }
        *sess = None;
        tokio::time::sleep(backoff).await;
    }
}

/// C-5: rank 0 commits a save every part of which is durable (in the checkpointer, not here).
fn commit(shared: &Shared, c: pb::CommitCheckpoint) {
    let order = CommitOrder {
        step: c.step,
        generation: c.generation,
        job_id: c.job_id,
        config_hash: c.config_hash,
        parts: c.parts,
    };
    match shared.checkpointer.lock().clone() {
        Some(ck) => {
            let _ = ck.cast(CheckpointerMsg::Commit(Box::new(order)));
        }
        None => warn!(
            step = order.step,
            "no checkpointer to commit this checkpoint"
        ),
    }
}

/// The rank's heartbeat: where it is, and the steps it computed since the last one.
fn heartbeat(shared: &Shared) -> pb::RankMessage {
    let progress = &shared.progress;
    let phase = match progress.phase.load(Ordering::Relaxed) {
        PHASE_TRAINING => pb::Phase::Training,
        PHASE_HEALING => pb::Phase::Healing,
        PHASE_DONE => pb::Phase::Done,
        _ => pb::Phase::Idle,
    };
    pb::RankMessage {
        msg: Some(pb::rank_message::Msg::Heartbeat(pb::Heartbeat {
            generation: progress.generation.load(Ordering::Relaxed),
            step: progress.step.load(Ordering::Relaxed),
            collective_seq: progress.seq.load(Ordering::Relaxed),
            phase: phase as i32,
            last_step_time_us: progress.step_us.load(Ordering::Relaxed),
            last_compute_time_us: progress.compute_us.load(Ordering::Relaxed),
            loss: f32::from_bits(progress.loss_bits.load(Ordering::Relaxed)),
            stats: None,
            recent: progress.take_recent(),
            links: shared.group_links.lock().take(),
            durable: shared.durable.lock().clone(),
            committed_checkpoint: shared.committed_checkpoint.load(Ordering::Relaxed),
        })),
    }
}
