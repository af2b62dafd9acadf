//! The coordinator's gRPC service: a thin shell around `core`.
//!
//! `run(opts, listener, shutdown)` serves until `shutdown` resolves, so tests bind port 0. All
//! decisions are taken by `core::decide` in one loop that runs every tick and at once when a
//! session closes (a crash) or a fault is reported; every decision is written to events.jsonl.

use super::core::{
    apply, assigned_shares, decide, CoreConfig, Decision, FlagChange, HeartbeatMsg, MemberId,
    MemberState, Phase, Registration, Regroup, Removal, Role, State, StepSample,
};
use super::journal::{Journal, JournalState};
use super::observed::{self, Observed};
use super::saves::{self, Saves, Voter};
use crate::dataplane::{GroupKey, PeerLink};
use crate::error::RuntimeError;
use crate::events::{Cause, Event, Flagged, GenerationFormed, Joined, Record, Removed, Started};
use crate::ids::{Generation, Rank, Step};
use parking_lot::Mutex;
use phalanx_proto::pb;
use phalanx_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

/// Limits on what a client may send; anything larger is refused before it is decoded.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
const MAX_ADDR_BYTES: usize = 16 * 1024;
const MAX_TEXT: usize = 256;
use phalanx_proto::MAX_RECENT_STEPS;
/// Worlds up to this size get the peer table inline in Assign; larger ones use GetPeers.
pub const INLINE_PEERS_MAX: usize = 256;

#[derive(Debug, Clone)]
pub struct ServiceOpts {
    pub job_id: String,
    /// Required on every RPC as `authorization: Bearer <token>` when set. Never logged.
    pub token: Option<String>,
    pub core: CoreConfig,
    pub target_world: usize,
    pub journal: Option<PathBuf>,
    pub events: Option<PathBuf>,
    /// `step_times.jsonl`: every rank's own time in every step.
    pub step_times: Option<PathBuf>,
    /// How often the decision loop runs when nothing wakes it.
    pub tick: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Required (instead of the job token) on Scale, Drain and Status when set: the ranks'
    /// token does not let a rank resize the job. Never logged.
    pub admin_token: Option<String>,
    /// The hash every worker's config must have. Unset: the first worker's is the job's.
    pub config_hash: Option<String>,
}

impl ServiceOpts {
    pub fn new(job_id: &str, target_world: usize) -> Self {
        ServiceOpts {
            job_id: job_id.into(),
            token: None,
            core: CoreConfig::default(),
            target_world,
            journal: None,
            events: None,
            step_times: None,
            tick: Duration::from_millis(50),
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(1),
            tls: None,
            admin_token: None,
            config_hash: None,
        }
    }
}

type DirectiveTx = mpsc::Sender<Result<pb::Directive, Status>>;

/// Addresses published for a generation's rendezvous, by rank, and the generation's key,
/// handed only to its members (P-9).
struct Rendezvous {
    generation: Generation,
    addrs: Vec<Option<Vec<u8>>>,
    key: Option<GroupKey>,
}

pub struct Shared {
    state: Mutex<State>,
    rendezvous: Mutex<Rendezvous>,
    rendezvous_changed: Notify,
    cfg: CoreConfig,
    sessions: Mutex<HashMap<MemberId, DirectiveTx>>,
    events: Mutex<Option<BufWriter<File>>>,
    journal: Option<Journal>,
    wake: Notify,
    last_hold: Mutex<Option<String>>,
    last_reference: Mutex<Instant>,
    observed: Mutex<Observed>,
    /// When the decision loop last ran (a long gap is the coordinator's own stall, K-11).
    last_step_at: Mutex<Instant>,
    /// Held from a journal snapshot to its write, so that writes keep the snapshots' order.
    journal_io: Mutex<()>,
    admin_token: Option<String>,
    /// Refused requests are logged at most once a second per kind.
    refused_at: Mutex<HashMap<&'static str, (Instant, u64)>>,
    /// Sharded checkpoints' two-phase commits (C-5).
    saves: Mutex<Saves>,
    /// Spares told that the job is complete (once each).
    released: Mutex<std::collections::BTreeSet<MemberId>>,
    step_times: super::step_times::StepTimes,
}

fn role_of(r: i32) -> Result<Role, Status> {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Active) => Ok(Role::Active),
        Ok(pb::Role::Spare) => Ok(Role::Spare),
        _ => Err(Status::invalid_argument(
            "role must be ROLE_ACTIVE or ROLE_SPARE",
        )),
    }
}

impl Shared {
    /// One structured event: tracing and a line of events.jsonl.
    /// A refused request, as an event at a bounded rate (a client hammering the coordinator
    /// must not fill the disk): the first of each kind per second, with the count since.
    pub fn refused(&self, kind: &'static str, member: MemberId) {
        let now = Instant::now();
        let emit = {
            let mut r = self.refused_at.lock();
            let e = r.entry(kind).or_insert((now - Duration::from_secs(2), 0));
            e.1 += 1;
            if now.saturating_duration_since(e.0) >= Duration::from_secs(1) {
                let n = e.1;
                *e = (now, 0);
                Some(n)
            } else {
                None
            }
        };
        if let Some(n) = emit {
            self.event(Event::RequestRefused {
                reason: kind.to_string(),
                member: Some(member),
                count: n,
            });
        }
    }

    pub fn event(&self, event: Event) {
        let record = Record::now(event);
        let line = record.to_line();
        // Faults and membership changes at info; routine session traffic at debug.
        if record.event.is_notable() {
            info!(target: "phalanx::coordinator", event = %line);
        } else {
            tracing::debug!(target: "phalanx::coordinator", event = %line);
        }
        if let Some(w) = self.events.lock().as_mut() {
            // An event log that cannot be written must not stop the job; say so once per line.
            if w.write_all(line.as_bytes()).is_err()
                || w.write_all(b"\n").is_err()
                || w.flush().is_err()
            {
                warn!("cannot write events.jsonl");
            }
        }
    }

    /// Writes the journal from a snapshot taken under the state lock, after releasing it
    /// (writes keep the order of their snapshots).
    fn persist(&self, st: parking_lot::MutexGuard<'_, State>) -> Generation {
        let generation = st.generation;
        let snapshot = JournalState::of(&st);
        let io = self.journal_io.lock();
        drop(st);
        if let Some(j) = &self.journal {
            if let Err(e) = j.save(&snapshot) {
                warn!(error = %e, "journal write failed");
                self.event(Event::JournalError {
                    error: e.to_string(),
                });
            }
        }
        drop(io);
        generation
    }

    fn send(&self, id: MemberId, d: pb::directive::Kind) {
        if let Some(tx) = self.sessions.lock().get(&id) {
            // Never block the decision loop on a slow rank: a full queue means it is not reading.
            let _ = tx.try_send(Ok(pb::Directive { kind: Some(d) }));
        }
    }

    fn peer(st: &State, rank: usize) -> Option<pb::Peer> {
        let id = st.ranks.get(rank)?;
        st.members.get(id).map(|p| pb::Peer {
            rank: rank as u32,
            member_id: p.id,
            host: p.host.clone(),
            dataplane_address: p.addr.clone(),
        })
    }

    fn assign_for(
        st: &State,
        cfg: &CoreConfig,
        id: MemberId,
        heal: &[(MemberId, Rank)],
    ) -> Option<pb::Assign> {
        let m = st.members.get(&id)?;
        let rank = m.rank?;
        let inline = st.ranks.len() <= INLINE_PEERS_MAX;
        let peers = if inline {
            (0..st.ranks.len())
                .filter_map(|r| Self::peer(st, r))
                .collect()
        } else {
            Vec::new()
        };
        Some(pb::Assign {
            peers_inline: inline,
            generation: st.generation.0,
            world: st.ranks.len() as u32,
            rank: rank.0,
            peers,
            resume_step: st.committed_step.0,
            heal_from: heal.iter().find(|(h, _)| *h == id).map(|(_, r)| r.0),
            shares: assigned_shares(st, cfg),
            abandon_previous: false,
        })
    }

    /// Runs the decision function once and carries out what it says. The decision and its
    /// effect on the state happen under the state lock; the journal's fsync, the events and the
    /// directives after it, so that RPCs are not held up by the disk. The journal is durable
    /// before any rank hears of the new generation.
    pub fn step(&self, now: Instant) {
        let (out, journal_io) = {
            let mut st = self.state.lock();
            let out = self.decide_locked(now, &mut st);
            // Taken before the state lock is released: snapshots reach the disk in order.
            let io = out.journal.as_ref().map(|_| self.journal_io.lock());
            (out, io)
        };
        if let (Some(j), Some(snapshot)) = (&self.journal, &out.journal) {
            if let Err(e) = j.save(snapshot) {
                warn!(error = %e, "journal write failed");
                self.event(Event::JournalError {
                    error: e.to_string(),
                });
            }
        }
        drop(journal_io);
        for e in out.events {
            self.event(e);
        }
        if out.superseded {
            // Waiters of the superseded generation's rendezvous must give up now.
            self.rendezvous_changed.notify_waiters();
        }
        for (id, d) in out.directives {
            self.send(id, d);
        }
    }

    /// The decision and what it changes in the state, with the events, the journal snapshot
    /// and the directives it calls for (carried out by `step` without the lock).
    fn decide_locked(&self, now: Instant, st: &mut State) -> Outcome {
        let mut out = Outcome::default();
        let last = std::mem::replace(&mut *self.last_step_at.lock(), now);
        if let Some(gap) = st.observe_clock(now, last, &self.cfg) {
            warn!(
                stalled_ms = gap.as_millis() as u64,
                "the coordinator itself stalled; silence and closed streams since are not deaths"
            );
            out.events.push(Event::CoordinatorStalled {
                generation: st.generation,
                stalled_ms: gap.as_millis() as u64,
            });
        }
        {
            let mut last = self.last_reference.lock();
            if now.saturating_duration_since(*last) >= Duration::from_millis(500) {
                st.refresh_reference();
                *last = now;
            }
        }
        for id in st.spares_after_the_end() {
            if self.released.lock().insert(id) {
                out.directives.push((
                    id,
                    pb::directive::Kind::Shutdown(pb::Shutdown {
                        reason: "the job is complete".into(),
                        complete: true,
                    }),
                ));
            }
        }
        let d = decide(now, st, &self.cfg);
        match &d {
            Decision::Steady => *self.last_hold.lock() = None,
            Decision::Hold { reason } => {
                let mut last = self.last_hold.lock();
                if last.as_deref() != Some(reason) {
                    warn!(%reason, "holding");
                    out.events.push(Event::Hold {
                        generation: st.generation,
                        reason: reason.clone(),
                    });
                    *last = Some(reason.clone());
                }
            }
            Decision::Halt { reason } => {
                apply(st, &d);
                out.journal = Some(JournalState::of(st));
                out.events.push(Event::Halt {
                    generation: st.generation,
                    reason: reason.clone(),
                });
                for &id in st.members.keys() {
                    out.directives.push((
                        id,
                        pb::directive::Kind::Shutdown(pb::Shutdown {
                            reason: reason.clone(),
                            complete: false,
                        }),
                    ));
                }
            }
            Decision::Regroup(r) => {
                out.events.extend(removal_events(now, st, r));
                for a in self.saves.lock().abort_before(r.generation) {
                    out.events.push(Event::CheckpointAborted {
                        step: a.step,
                        generation: a.generation,
                        voted: a.voted,
                        world: a.world,
                    });
                }
                apply(st, &d);
                out.journal = Some(JournalState::of(st));
                out.superseded = true;
                out.events.push(Event::Generation(GenerationFormed {
                    generation: r.generation,
                    world: r.ranks.len(),
                    members: r.ranks.clone(),
                    promoted: r.promoted.clone(),
                    resume_step: r.resume_step,
                    heal: r.heal.clone(),
                    reason: r.reason.clone(),
                    shares: r.shares.clone(),
                    straggler: r.straggler,
                }));
                for (id, why) in &r.removed {
                    let kind = match why {
                        Removal::ScaledDown | Removal::Drained => {
                            pb::directive::Kind::Drain(pb::DrainNow {
                                generation: r.generation.0,
                            })
                        }
                        _ => pb::directive::Kind::Evict(pb::Evict {
                            generation: r.generation.0,
                            reason: why.describe(),
                        }),
                    };
                    out.directives.push((*id, kind));
                }
                // A member that only missed re-registering may still be in the old data plane.
                let lost = r
                    .removed
                    .iter()
                    .any(|(_, why)| why.is_failure() && !matches!(why, Removal::NotRejoined));
                for &id in &r.ranks {
                    if let Some(mut a) = Self::assign_for(st, &self.cfg, id, &r.heal) {
                        a.abandon_previous = lost;
                        out.directives.push((id, pb::directive::Kind::Assign(a)));
                    }
                }
            }
        }
        out
    }
}

/// What one decision calls for once the state lock is released.
#[derive(Default)]
struct Outcome {
    events: Vec<Event>,
    journal: Option<JournalState>,
    superseded: bool,
    directives: Vec<(MemberId, pb::directive::Kind)>,
}

/// The `rank_failed` / `rank_removed` events of a regroup, with the detection latency: from the
/// first sign of the fault to this decision. Read before the regroup is applied.
fn removal_events(now: Instant, st: &State, r: &Regroup) -> Vec<Event> {
    r.removed
        .iter()
        .filter_map(|(id, why)| {
            let m = st.members.get(id)?;
            let since = match why {
                Removal::Crashed => m.closed_at,
                Removal::Silent { .. } => Some(m.last_heartbeat),
                Removal::Stalled { .. } => Some(m.last_progress),
                _ => None,
            };
            let removed = Removed {
                member: *id,
                rank: m.rank,
                host: m.host.clone(),
                pid: m.pid,
                generation: st.generation,
                reason: why.describe(),
                cause: Cause::from(why),
                detect_ms: since.map(|t| now.saturating_duration_since(t).as_secs_f64() * 1e3),
            };
            Some(if why.is_failure() {
                Event::RankFailed(removed)
            } else {
                Event::RankRemoved(removed)
            })
        })
        .collect()
}

#[derive(Clone)]
pub struct Svc {
    shared: Arc<Shared>,
}

fn check_text(what: &str, s: &str) -> Result<(), Status> {
    if s.len() > MAX_TEXT {
        return Err(Status::invalid_argument(format!(
            "{what} is {} bytes; at most {MAX_TEXT}",
            s.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Coordinator for Svc {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        check_text("job_id", &r.job_id)?;
        check_text("host", &r.host)?;
        check_text("config_hash", &r.config_hash)?;
        check_text("address", &r.address)?;
        if r.dataplane_address.len() > MAX_ADDR_BYTES {
            return Err(Status::invalid_argument(format!(
                "dataplane_address is {} bytes; at most {MAX_ADDR_BYTES}",
                r.dataplane_address.len()
            )));
        }
        if r.capabilities.len() > 64 {
            return Err(Status::invalid_argument("at most 64 capabilities"));
        }
        let role = role_of(r.role)?;
        check_text("member_secret", &r.member_secret)?;
        let rejoin =
            (r.member_id != 0).then_some((r.member_id, Generation(r.generation), Rank(r.rank)));
        // A new member gets a secret; a rejoining one proves it holds its own.
        let secret = if rejoin.is_some() {
            r.member_secret.clone()
        } else {
            new_secret()?
        };
        let reg = Registration {
            job_id: r.job_id,
            host: r.host.clone(),
            pid: r.pid,
            addr: r.dataplane_address,
            role,
            config_hash: r.config_hash,
            rejoin,
            committed_step: Step(r.committed_step),
            secret_digest: digest(&secret),
        };
        let sh = &self.shared;
        let mut st = sh.state.lock();
        let out = match st.register(Instant::now(), reg, &sh.cfg) {
            Ok(o) => o,
            Err(e) => {
                drop(st);
                sh.event(Event::RegisterRefused {
                    host: r.host.clone(),
                    pid: r.pid,
                    error: e.to_string(),
                });
                return Err(e.into());
            }
        };
        let generation = st.generation;
        let pinned = out.pinned_config.then(|| st.config_hash.clone());
        drop(st);
        if let Some(config_hash) = pinned {
            sh.event(Event::ConfigHashPinned {
                member: out.id,
                host: r.host.clone(),
                config_hash,
            });
        }
        sh.observed.lock().set_address(out.id, r.address.clone());
        // Not journaled: a registration changes no durable state. Waiting members that a
        // restarted coordinator does not know simply register again as new members.
        let joined = Joined {
            member: out.id,
            host: r.host.clone(),
            pid: r.pid,
            address: r.address.clone(),
            role,
            generation,
        };
        sh.event(if out.rejoined {
            Event::Rejoined(joined)
        } else {
            Event::Registered(joined)
        });
        Ok(Response::new(pb::RegisterResponse {
            member_id: out.id,
            generation: generation.0,
            heartbeat_interval_ms: sh.cfg.heartbeat_interval.as_millis() as u32,
            heartbeat_timeout_ms: sh.cfg.heartbeat_timeout.as_millis() as u32,
            rejoined: out.rejoined,
            member_secret: secret,
        }))
    }

    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::Directive, Status>> + Send>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::RankMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded("no hello within 5 s of opening the session")
            })??;
        let (id, secret) = match first {
            Some(pb::RankMessage {
                msg: Some(pb::rank_message::Msg::Hello(h)),
            }) => (h.member_id, h.member_secret),
            _ => return Err(Status::invalid_argument(
                "the first message of a session must be `hello` with the member id from Register",
            )),
        };
        let sh = self.shared.clone();
        let (tx, rx) = mpsc::channel(64);
        {
            let mut st = sh.state.lock();
            prove(&sh, &st, id, &secret)?;
            st.session_opened(Instant::now(), id)?;
            sh.sessions.lock().insert(id, tx.clone());
            // A rank that reconnects into the generation it holds hears it again (idempotent).
            if st
                .members
                .get(&id)
                .is_some_and(|m| m.state == MemberState::Active)
            {
                if let Some(a) = Shared::assign_for(&st, &sh.cfg, id, &[]) {
                    let _ = tx.try_send(Ok(pb::Directive {
                        kind: Some(pb::directive::Kind::Assign(a)),
                    }));
                }
            }
        }
        sh.event(Event::SessionOpened { member: id });
        sh.wake.notify_one();
        tokio::spawn(async move {
            let err = loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        if let Err(e) = handle_message(&sh, id, msg) {
                            let status: Status = e.into();
                            let _ = tx.try_send(Err(status.clone()));
                            break Some(status.message().to_string());
                        }
                    }
                    Ok(None) => break None,
                    // Unknown, Cancelled and Unavailable all mean the transport broke.
                    Err(status) => {
                        break Some(format!("{:?}: {}", status.code(), status.message()))
                    }
                }
            };
            let now = Instant::now();
            {
                let mut st = sh.state.lock();
                let mut sessions = sh.sessions.lock();
                // A stream that a newer session of the same member replaced says nothing about
                // the member: it re-registered before this end was read (K-11).
                if sessions.get(&id).is_some_and(|t| t.same_channel(&tx)) {
                    sessions.remove(&id);
                    st.session_closed(now, id);
                }
            }
            sh.event(Event::SessionClosed {
                member: id,
                error: err,
            });
            sh.wake.notify_one();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_fault(
        &self,
        req: Request<pb::FaultReport>,
    ) -> Result<Response<pb::FaultAck>, Status> {
        let r = req.into_inner();
        let kind = pb::ReportedFault::try_from(r.kind)
            .map_err(|_| Status::invalid_argument("unknown fault kind"))?;
        let sh = &self.shared;
        let generation = {
            let mut st = sh.state.lock();
            prove(sh, &st, r.member_id, &r.member_secret)?;
            st.report_fault(
                Instant::now(),
                r.member_id,
                Generation(r.generation),
                Rank(r.suspect_rank),
            )?;
            st.generation
        };
        sh.event(Event::FaultReported {
            reporter: r.member_id,
            generation: Generation(r.generation),
            suspect_rank: r.suspect_rank,
            fault: kind.into(),
            detail: r.detail.chars().take(MAX_TEXT).collect(),
            step: r.step,
        });
        sh.wake.notify_one();
        Ok(Response::new(pb::FaultAck {
            generation: generation.0,
        }))
    }

    async fn rendezvous(
        &self,
        req: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        // The caller's own deadline cuts this short; this bounds a caller that set none.
        let deadline = Duration::from_secs(30);
        let r = req.into_inner();
        if r.address.len() > MAX_ADDR_BYTES {
            return Err(Status::invalid_argument("address too long"));
        }
        let sh = &self.shared;
        let generation = Generation(r.generation);
        {
            let st = sh.state.lock();
            prove(sh, &st, r.member_id, &r.member_secret)?;
            if generation != st.generation {
                return Err(RuntimeError::StaleGeneration {
                    got: generation,
                    current: st.generation,
                }
                .into());
            }
            if st.ranks.get(r.rank as usize) != Some(&r.member_id) {
                return Err(Status::failed_precondition(format!(
                    "member {} is not rank {} of generation {generation}",
                    r.member_id, r.rank
                )));
            }
            let mut rv = sh.rendezvous.lock();
            if rv.generation != generation || rv.key.is_none() {
                rv.generation = generation;
                rv.addrs = vec![None; st.ranks.len()];
                rv.key = Some(GroupKey::random().map_err(|e| Status::unavailable(e.to_string()))?);
            }
            rv.addrs[r.rank as usize] = Some(r.address);
        }
        sh.rendezvous_changed.notify_waiters();
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let notified = sh.rendezvous_changed.notified();
            {
                let current = sh.state.lock().generation;
                if current != generation {
                    return Err(Status::aborted(format!(
                        "generation {generation} was superseded by {current} during the rendezvous"
                    )));
                }
                let rv = sh.rendezvous.lock();
                if rv.generation == generation && rv.addrs.iter().all(Option::is_some) {
                    return Ok(Response::new(pb::RendezvousResponse {
                        addresses: rv.addrs.iter().flatten().cloned().collect(),
                        group_key: rv
                            .key
                            .as_ref()
                            .map(|k| k.as_bytes().to_vec())
                            .unwrap_or_default(),
                    }));
                }
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return Err(Status::deadline_exceeded(format!(
                    "not every rank of generation {generation} published its address in time"
                )));
            }
        }
    }

    async fn get_peers(
        &self,
        req: Request<pb::PeersRequest>,
    ) -> Result<Response<pb::PeersResponse>, Status> {
        let r = req.into_inner();
        let st = self.shared.state.lock();
        if r.generation != st.generation.0 {
            return Err(RuntimeError::StaleGeneration {
                got: Generation(r.generation),
                current: st.generation,
            }
            .into());
        }
        let world = st.ranks.len();
        let peers = if r.ranks.is_empty() {
            (0..world).filter_map(|i| Shared::peer(&st, i)).collect()
        } else {
            r.ranks
                .iter()
                .map(|&i| {
                    Shared::peer(&st, i as usize).ok_or_else(|| {
                        Status::invalid_argument(format!("rank {i} is outside world {world}"))
                    })
                })
                .collect::<Result<_, _>>()?
        };
        Ok(Response::new(pb::PeersResponse {
            generation: st.generation.0,
            world: world as u32,
            peers,
        }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        require_admin(&self.shared, &req)?;
        let st = self.shared.state.lock();
        let seen = self.shared.observed.lock();
        let now = Instant::now();
        let mut ranks: Vec<pb::RankStatus> = st
            .members
            .values()
            .map(|m| {
                let mut flags = Vec::new();
                if m.straggler() {
                    flags.push("straggler".to_string());
                }
                if m.drain_requested {
                    flags.push("draining".into());
                }
                if !m.suspected_by.is_empty() {
                    flags.push(format!("suspected_by={}", m.suspected_by.len()));
                }
                if m.rejoin_deadline.is_some() {
                    flags.push("awaiting_rejoin".into());
                }
                pb::RankStatus {
                    member_id: m.id,
                    rank: m.rank.map(|r| r.0),
                    host: m.host.clone(),
                    role: match m.role {
                        Role::Active => pb::Role::Active,
                        Role::Spare => pb::Role::Spare,
                    } as i32,
                    state: match m.state {
                        MemberState::Active => pb::MemberState::Active,
                        MemberState::Spare => pb::MemberState::Spare,
                        MemberState::Dead => pb::MemberState::Dead,
                        MemberState::Evicted => pb::MemberState::Evicted,
                    } as i32,
                    step: m.step.0,
                    last_step_time_us: m.last_step_time.as_micros() as u32,
                    heartbeat_age_ms: now.saturating_duration_since(m.last_heartbeat).as_millis()
                        as u64,
                    flags,
                    pid: m.pid,
                    links: seen
                        .links(m.id, st.generation)
                        .iter()
                        .map(observed::to_pb)
                        .collect(),
                    address: seen.address(m.id),
                }
            })
            .collect();
        ranks.sort_by_key(|r| (r.rank.unwrap_or(u32::MAX), r.member_id));
        Ok(Response::new(pb::StatusResponse {
            job_id: st.job_id.clone(),
            generation: st.generation.0,
            committed_step: st
                .ranks
                .iter()
                .filter_map(|id| st.members.get(id))
                .map(|m| m.step.0)
                .max()
                .unwrap_or(st.committed_step.0),
            world: st.ranks.len() as u32,
            target_world: st.target_world as u32,
            ranks,
        }))
    }

    async fn scale(
        &self,
        req: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        require_admin(&self.shared, &req)?;
        let target = req.into_inner().target_world as usize;
        let sh = &self.shared;
        let generation = {
            let mut st = sh.state.lock();
            if let Err(e) = st.scale(target, &sh.cfg) {
                drop(st);
                sh.event(Event::ScaleRefused {
                    target_world: target,
                    error: e.to_string(),
                });
                return Err(e.into());
            }
            sh.persist(st)
        };
        sh.event(Event::Scale {
            target_world: target,
        });
        sh.wake.notify_one();
        Ok(Response::new(pb::AdminResponse {
            message: format!("target world set to {target}"),
            generation: generation.0,
        }))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        require_admin(&self.shared, &req)?;
        let who = req.into_inner().who;
        let sh = &self.shared;
        let (rank, generation) = {
            let mut st = sh.state.lock();
            let rank = match who {
                Some(pb::drain_request::Who::Rank(r)) => Rank(r),
                Some(pb::drain_request::Who::MemberId(id)) => st.rank_of(id)?,
                None => {
                    return Err(Status::invalid_argument(
                        "a drain names a rank or a member id",
                    ))
                }
            };
            if let Err(e) = st.drain(rank, &sh.cfg) {
                drop(st);
                sh.event(Event::DrainRefused {
                    rank,
                    error: e.to_string(),
                });
                return Err(e.into());
            }
            // A drain survives a coordinator restart (K-5).
            (rank, sh.persist(st))
        };
        sh.event(Event::Drain { rank });
        sh.wake.notify_one();
        Ok(Response::new(pb::AdminResponse {
            message: format!("rank {rank} will leave at the next step boundary"),
            generation: generation.0,
        }))
    }
}

fn handle_message(sh: &Shared, id: MemberId, msg: pb::RankMessage) -> Result<(), RuntimeError> {
    let hb = match msg.msg {
        Some(pb::rank_message::Msg::Heartbeat(hb)) => hb,
        Some(pb::rank_message::Msg::Hello(_)) => {
            return Err(RuntimeError::InvalidMessage {
                what: "hello sent twice on one session".into(),
            })
        }
        None => {
            return Err(RuntimeError::InvalidMessage {
                what: "empty session message".into(),
            })
        }
    };
    let phase = match pb::Phase::try_from(hb.phase) {
        Ok(pb::Phase::Idle) => Phase::Idle,
        Ok(pb::Phase::Training) => Phase::Training,
        Ok(pb::Phase::Healing) => Phase::Healing,
        Ok(pb::Phase::Done) => Phase::Done,
        Ok(pb::Phase::Unspecified) | Err(_) => {
            return Err(RuntimeError::InvalidMessage {
                what: format!(
                    "heartbeat phase {} is not one of the known phases",
                    hb.phase
                ),
            })
        }
    };
    let msg = HeartbeatMsg {
        generation: Generation(hb.generation),
        step: Step(hb.step),
        collective_seq: hb.collective_seq,
        phase,
        last_step_time: Duration::from_micros(hb.last_step_time_us as u64),
        last_compute_time: Duration::from_micros(hb.last_compute_time_us as u64),
        recent: hb
            .recent
            .iter()
            .take(MAX_RECENT_STEPS)
            .map(|x| StepSample {
                step: Step(x.step),
                compute: Duration::from_micros(x.compute_us as u64),
                fixed: Duration::from_micros(x.fixed_us as u64),
                micro_batches: x.micro_batches,
            })
            .collect(),
    };
    let links = match &hb.links {
        Some(g) => Some((
            Generation(g.generation),
            Rank(g.rank),
            observed::from_pb(&g.links)?,
        )),
        None => None,
    };
    let (flags, place) = {
        let mut st = sh.state.lock();
        let flags = st.heartbeat(Instant::now(), id, &msg, &sh.cfg)?;
        let place = st
            .members
            .get(&id)
            .filter(|m| m.state == MemberState::Active)
            .and_then(|m| m.rank)
            .map(|r| (r, st.generation));
        (flags, place)
    };
    // Steps of an older generation (a heartbeat in flight across a regroup) are not this rank's.
    if let Some((rank, generation)) = place.filter(|p| p.1 == msg.generation) {
        sh.step_times
            .record(crate::events::unix_ms(), id, rank, generation, &msg.recent);
    }
    if let Some((generation, rank, links)) = links.filter(|(_, _, l)| !l.is_empty()) {
        links_event(sh, id, generation, rank, links);
    }
    for flag in &flags {
        flag_event(sh, flag);
    }
    if !flags.is_empty() {
        sh.wake.notify_one();
    }
    if let Some(part) = &hb.durable {
        checkpoint_vote(sh, id, part);
    }
    if hb.committed_checkpoint > 0 {
        checkpoint_committed(sh, hb.committed_checkpoint);
    }
    Ok(())
}

/// C-5: a rank's durable part; once every rank of the generation has one for the step, rank 0
/// is told to commit it.
fn checkpoint_vote(sh: &Shared, id: MemberId, part: &pb::CheckpointPart) {
    let st = sh.state.lock();
    let who = Voter {
        rank: st
            .members
            .get(&id)
            .filter(|m| m.state == MemberState::Active)
            .and_then(|m| m.rank),
        generation: st.generation,
        world: st.ranks.len() as u32,
    };
    let order = match sh.saves.lock().on_vote(Instant::now(), part, who) {
        None => return,
        Some(saves::Outcome::Aborted(a)) => {
            drop(st);
            sh.event(Event::CheckpointAborted {
                step: a.step,
                generation: a.generation,
                voted: a.voted,
                world: a.world,
            });
            return;
        }
        Some(saves::Outcome::Failed(f)) => {
            drop(st);
            warn!(step = f.step, rank = f.rank, error = %f.error, "a rank could not write its part of a checkpoint");
            sh.event(Event::CheckpointFailed {
                step: f.step,
                rank: f.rank,
                error: f.error,
            });
            return;
        }
        Some(saves::Outcome::Commit(order)) => order,
    };
    let Some(&first) = st.ranks.first() else {
        return;
    };
    let commit = pb::CommitCheckpoint {
        step: order.step,
        generation: order.generation.0,
        job_id: st.job_id.clone(),
        config_hash: st.config_hash.clone(),
        parts: order.parts,
    };
    drop(st);
    sh.send(first, pb::directive::Kind::Commit(commit));
}

/// Rank 0 wrote a commit: said once, with the save's size and times.
fn checkpoint_committed(sh: &Shared, step: u64) {
    let Some(parts) = sh.saves.lock().committed(step) else {
        return;
    };
    let ms = |us: u32| us as f64 / 1e3;
    let world = parts.len() as u32;
    sh.event(Event::CheckpointCommitted {
        step,
        world,
        bytes: parts.iter().flat_map(|p| &p.files).map(|f| f.bytes).sum(),
        stage_ms: parts.iter().map(|p| ms(p.stage_us)).fold(0.0, f64::max),
        drain_ms: parts.iter().map(|p| ms(p.drain_us)).fold(0.0, f64::max),
    });
}

/// The transports a member's group chose, once per generation: which pairs of ranks talk over
/// shared memory, TCP or RDMA. The rank is the group's own, not the member's current one: the
/// coordinator may have renumbered the ranks before the heartbeat carrying the links arrived.
fn links_event(
    sh: &Shared,
    id: MemberId,
    generation: Generation,
    rank: Rank,
    links: Vec<PeerLink>,
) {
    let address = sh.observed.lock().address(id);
    let Some(summary) = sh.observed.lock().set_links(id, generation, links.clone()) else {
        return;
    };
    let host = sh.state.lock().members.get(&id).map(|m| m.host.clone());
    info!(member = id, %rank, %summary, "group transports");
    sh.event(Event::GroupLinks {
        member: id,
        generation,
        address: Some(address),
        links,
        rank,
        host,
        summary,
    });
}

/// The event of a straggler flag raised or cleared.
fn flag_event(sh: &Shared, flag: &FlagChange) {
    match flag {
        FlagChange::Flagged {
            id,
            own_ms,
            peers_ms,
            baseline_ms,
            slow_steps,
            slow_for_ms,
            severe_for_ms,
            at_step,
            window_ms,
            recent_ms,
        } => sh.event(Event::StragglerFlagged(Flagged {
            member: *id,
            mb_ms: *own_ms,
            peers_mb_ms: *peers_ms,
            baseline_mb_ms: *baseline_ms,
            slow_steps: *slow_steps,
            slow_for_ms: *slow_for_ms,
            severe_for_ms: *severe_for_ms,
            at_step: at_step.0,
            window_mb_ms: window_ms.clone(),
            recent_mb_ms: recent_ms.clone(),
        })),
        FlagChange::Cleared {
            id,
            own_ms,
            peers_ms,
        } => sh.event(Event::StragglerCleared {
            member: *id,
            mb_ms: *own_ms,
            peers_mb_ms: *peers_ms,
        }),
    }
}

/// A journal this coordinator must not take over, and why.
fn journal_refused(opts: &ServiceOpts, reason: String) -> RuntimeError {
    RuntimeError::Journal {
        path: opts
            .journal
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        reason,
    }
}

/// Sets the job's config hash from the options; a journal of the same job with another hash
/// is refused (its ranks trained another model).
fn pin_config(mut state: State, opts: &ServiceOpts) -> Result<State, RuntimeError> {
    let Some(want) = opts.config_hash.as_ref().filter(|h| !h.is_empty()) else {
        return Ok(state);
    };
    if !state.config_hash.is_empty() && state.config_hash != *want {
        return Err(journal_refused(
            opts,
            format!(
                "its job ran with config hash {}, not {want}; use another run directory for \
                 another model or dataset",
                state.config_hash
            ),
        ));
    }
    state.config_hash = want.clone();
    Ok(state)
}

/// Checks the job token on every RPC. Constant-time comparison; the token is never logged.
#[derive(Clone)]
pub struct Auth {
    token: Option<Arc<str>>,
    admin: Option<Arc<str>>,
    shared: Arc<Shared>,
}

/// A member's secret: 128 bits from the kernel's random source, or an error (never a weak one).
fn new_secret() -> Result<String, Status> {
    crate::random::hex_secret("a member secret").map_err(|e| Status::unavailable(e.to_string()))
}

/// SHA-256 (hex) of a member secret; empty for an empty one (members of journals written before
/// secrets existed).
pub fn digest(secret: &str) -> String {
    use sha2::Digest;
    if secret.is_empty() {
        return String::new();
    }
    sha2::Sha256::digest(secret.as_bytes())
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The caller holds member `id`'s secret: it may speak for that member only.
fn prove(sh: &Shared, st: &State, id: MemberId, secret: &str) -> Result<(), RuntimeError> {
    let m = st
        .members
        .get(&id)
        .ok_or(RuntimeError::UnknownMember { member: id })?;
    if ct_eq(digest(secret).as_bytes(), m.secret_digest.as_bytes()) {
        return Ok(());
    }
    sh.refused("not_this_member", id);
    Err(RuntimeError::NotThisMember { member: id })
}

/// Scale, Drain and Status need the admin token when the job has one.
fn require_admin<T>(sh: &Shared, req: &Request<T>) -> Result<(), Status> {
    let Some(admin) = &sh.admin_token else {
        return Ok(());
    };
    let got = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.strip_prefix("Bearer "));
    if got.is_some_and(|g| ct_eq(g.as_bytes(), admin.as_bytes())) {
        return Ok(());
    }
    sh.refused("not_admin", 0);
    Err(Status::permission_denied(
        "scale, drain and status need the job's admin token: set PHALANX_ADMIN_TOKEN (phalanx launch writes it to <run dir>/admin-token)",
    ))
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(req);
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.strip_prefix("Bearer "));
        let admin = |g: &str| {
            self.admin
                .as_ref()
                .is_some_and(|a| ct_eq(g.as_bytes(), a.as_bytes()))
        };
        match got {
            Some(g) if ct_eq(g.as_bytes(), token.as_bytes()) || admin(g) => Ok(req),
            _ => {
                self.shared.refused(
                    if got.is_some() {
                        "wrong_token"
                    } else {
                        "missing_token"
                    },
                    0,
                );
                Err(Status::unauthenticated(
                    "missing or wrong job token: set PHALANX_JOB_TOKEN to the job's token",
                ))
            }
        }
    }
}

/// Builds the shared state: a fresh job, or the journaled one after a restart.
pub fn load_shared(opts: &ServiceOpts) -> Result<Arc<Shared>, RuntimeError> {
    let now = Instant::now();
    let journal = opts.journal.clone().map(Journal::new);
    let restored = match &journal {
        Some(j) => j.load()?,
        None => None,
    };
    let events = match &opts.events {
        Some(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| RuntimeError::EventLog {
                    path: p.display().to_string(),
                    reason: e.to_string(),
                })?;
            }
            let f = crate::events::append_lines(p).map_err(|e| RuntimeError::EventLog {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?;
            Some(BufWriter::new(f))
        }
        None => None,
    };
    let (state, was_restored) = match restored {
        Some(js) if js.job_id == opts.job_id => {
            let mut s = js.restore(now);
            s.await_rejoin(now, &opts.core);
            (s, true)
        }
        Some(js) => {
            return Err(journal_refused(
                opts,
                format!(
                    "it belongs to job {:?}, not {:?}; use another journal path",
                    js.job_id, opts.job_id
                ),
            ))
        }
        None => (State::new(&opts.job_id, opts.target_world), false),
    };
    let state = pin_config(state, opts)?;
    let generation = state.generation;
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        rendezvous: Mutex::new(Rendezvous {
            generation: Generation(0),
            addrs: Vec::new(),
            key: None,
        }),
        rendezvous_changed: Notify::new(),
        cfg: opts.core.clone(),
        sessions: Mutex::new(HashMap::new()),
        saves: Mutex::new(Saves::default()),
        released: Mutex::new(std::collections::BTreeSet::new()),
        events: Mutex::new(events),
        journal,
        wake: Notify::new(),
        last_hold: Mutex::new(None),
        last_reference: Mutex::new(now),
        observed: Mutex::new(Observed::default()),
        last_step_at: Mutex::new(now),
        journal_io: Mutex::new(()),
        admin_token: opts.admin_token.clone(),
        refused_at: Mutex::new(HashMap::new()),
        step_times: super::step_times::StepTimes::open(opts.step_times.as_deref()),
    });
    let started = Started {
        job: opts.job_id.clone(),
        generation,
        target_world: opts.target_world,
    };
    shared.event(if was_restored {
        Event::CoordinatorRestarted(started)
    } else {
        Event::CoordinatorStarted(started)
    });
    Ok(shared)
}

/// Decides on every tick or wake-up. A panic in `step` ends the loop: it is logged, written as a
/// `decision_loop_panicked` event and sent on `died`, so that the service stops instead of
/// answering RPCs with nobody deciding.
async fn decision_loop(
    sh: Arc<Shared>,
    tick: Duration,
    died: tokio::sync::oneshot::Sender<String>,
    step: impl Fn(&Shared, Instant),
) {
    let mut iv = tokio::time::interval(tick);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = iv.tick() => {}
            _ = sh.wake.notified() => {}
        }
        let stepped =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step(&sh, Instant::now())));
        if let Err(p) = stepped {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            tracing::error!(panic = %what, "the decision loop panicked; stopping the coordinator");
            sh.event(Event::DecisionLoopPanicked {
                panic: what.clone(),
            });
            let _ = died.send(what);
            return;
        }
    }
}

/// Serves the coordinator on `listener` until `shutdown` resolves.
pub async fn run(
    opts: ServiceOpts,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RuntimeError> {
    let shared = load_shared(&opts)?;
    // A coordinator whose decision loop died must not keep answering RPCs as if it decided:
    // a panic in it stops the service (the journal is on disk; a restart resumes, K-5).
    let (died_tx, died_rx) = tokio::sync::oneshot::channel::<String>();
    let ticker = tokio::spawn(decision_loop(
        shared.clone(),
        opts.tick,
        died_tx,
        |sh: &Shared, now| sh.step(now),
    ));
    let died = Arc::new(Mutex::new(None::<String>));
    let died_w = died.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            Ok(what) = died_rx => *died_w.lock() = Some(what),
        }
    };
    let server = CoordinatorServer::new(Svc {
        shared: shared.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let auth = Auth {
        token: opts.token.as_deref().map(Arc::from),
        admin: opts.admin_token.as_deref().map(Arc::from),
        shared: shared.clone(),
    };
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(opts.keepalive_interval))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout))
        .tcp_nodelay(true);
    if let Some(tls) = opts.tls.clone() {
        builder = builder
            .tls_config(tls)
            .map_err(|e| RuntimeError::InvalidRequest {
                what: format!("TLS configuration: {e}"),
            })?;
    }
    let res = builder
        .add_service(InterceptedService::new(server, auth))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    ticker.abort();
    shared.event(Event::CoordinatorStopped {});
    if let Some(what) = died.lock().take() {
        return Err(RuntimeError::DecisionLoop { what });
    }
    res.map_err(|e| RuntimeError::Connect {
        url: "listener".into(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // A panic in the decision loop is not silent: the loop ends, the panic is written as an
    // event, and the service is told to stop (it then returns an error naming the panic).
    #[tokio::test]
    async fn a_panic_in_the_decision_loop_is_reported_and_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = ServiceOpts::new("job", 1);
        opts.events = Some(dir.path().join("events.jsonl"));
        let sh = load_shared(&opts).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = ticks.clone();
        let lp = tokio::spawn(decision_loop(
            sh.clone(),
            Duration::from_millis(5),
            tx,
            move |_: &Shared, _| {
                if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 3 {
                    panic!("boom at the fourth tick");
                }
            },
        ));
        let what = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(what, "boom at the fourth tick");
        tokio::time::timeout(Duration::from_secs(5), lp)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ticks.load(std::sync::atomic::Ordering::SeqCst), 4);
        let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
        assert!(events.contains("decision_loop_panicked"), "{events}");
        assert!(events.contains("boom at the fourth tick"), "{events}");
    }
}
