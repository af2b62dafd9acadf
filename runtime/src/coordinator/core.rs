//! The coordinator's decision core: membership, generations, failure, hang and straggler
//! detection, spare promotion and the split-brain guard, with no I/O.
//!
//! Inputs are events applied to `State` (`register`, `session_opened`, `session_closed`,
//! `heartbeat`, `report_fault`, `scale`, `drain`); the one decision function is
//! `decide(now, &State, &CoreConfig) -> Decision`, which says what to do and why. `apply`
//! carries a decision out on the state. Time is always passed in, so tests inject it.

use crate::error::RuntimeError;
use crate::ids::{Generation, Rank, Step};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::straggler::Context;
pub use super::straggler::{FlagChange, Judge, Peers, StragglerConfig, MAX_WINDOW};
use super::watchdog::Watch;

pub type MemberId = u64;

/// Member ids are small dense integers handed out by the coordinator itself, so a
/// multiplicative hash is enough and much cheaper than SipHash on the heartbeat path.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01B3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub type Members = HashMap<MemberId, Member, std::hash::BuildHasherDefault<IdHasher>>;

/// Members who left that the coordinator still shows (`status`, error messages).
pub const DEPARTED_KEPT: usize = 64;

/// The hot part of a current rank, in rank order, so that the decision function scans a compact
/// array instead of chasing every member every tick. Mirrors fields of `Member`; updated
/// wherever those change (`State::sync_live`).
#[derive(Debug, Clone, Copy)]
pub struct Live {
    pub id: MemberId,
    pub last_heartbeat: Instant,
    pub last_progress: Instant,
    pub connected: bool,
    pub training: bool,
    pub straggler: bool,
    pub drain: bool,
    pub suspects: u32,
    pub rejoin_deadline: Option<Instant>,
    /// The rank's straggler level (median of a full window), if it has one.
    pub median_s: Option<f64>,
    /// The rank holds the job's committed state (it trained in, or was healed into, the
    /// lineage of the committed steps).
    pub holds_state: bool,
    /// The rank finished the job and may leave without that being a fault.
    pub done: bool,
    /// The rank asked for a regroup (it restarted its compute and is alive).
    pub regroup: bool,
    /// When the rank first reported a failed collective in this generation.
    pub reported_at: Option<Instant>,
}

/// Detection and policy settings. Defaults and the reason for each are in docs/control-plane.md.
#[derive(Debug, Clone, PartialEq)]
pub struct CoreConfig {
    pub heartbeat_interval: Duration,
    /// A member with no heartbeat for this long is hung (or stopped, or partitioned).
    pub heartbeat_timeout: Duration,
    /// After a coordinator restart, journaled members get this long to re-register.
    pub rejoin_grace: Duration,
    /// Below this many active ranks the job stops instead of shrinking.
    pub min_world: usize,
    /// The most ranks a generation may have (micro-batches per global batch).
    pub max_world: usize,
    /// A rank whose step counter has not moved for max(hang_floor, hang_k x its median step
    /// time) while training is hung even if its heartbeats still arrive.
    pub hang_floor: Duration,
    pub hang_k: f64,
    pub straggler: StragglerConfig,
    /// No step committed for this long while ranks are assigned: regroup with the same
    /// members, then halt with the reason (K-13). Zero: off.
    pub progress_timeout: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_millis(1500),
            rejoin_grace: Duration::from_secs(10),
            min_world: 1,
            max_world: usize::MAX,
            hang_floor: Duration::from_secs(10),
            hang_k: 10.0,
            straggler: StragglerConfig::default(),
            progress_timeout: Duration::from_secs(600),
        }
    }
}

/// Micro-batches per rank that minimise the step's compute time, given each rank's time per
/// micro-batch: everyone gets one, then each next micro-batch goes to the rank that would
/// finish it first (ties to the lower rank). Optimal for identical jobs on machines of
/// different speeds, and deterministic.
pub fn weighted_shares(micro_batches: usize, per_mb: &[f64]) -> Vec<u32> {
    let n = per_mb.len();
    if n == 0 || micro_batches < n {
        return Vec::new();
    }
    let mut shares = vec![1u32; n];
    for _ in n..micro_batches {
        let next = (0..n)
            .min_by(|&a, &b| {
                let fa = (shares[a] + 1) as f64 * per_mb[a];
                let fb = (shares[b] + 1) as f64 * per_mb[b];
                fa.total_cmp(&fb)
            })
            .expect("n > 0");
        shares[next] += 1;
    }
    shares
}

/// The most live members a job keeps: enough spares for any world it can run.
pub fn member_cap(cfg: &CoreConfig) -> usize {
    cfg.max_world.saturating_mul(4).saturating_add(64)
}

/// The even split's shares (the first `m % world` ranks take one more).
pub fn even_shares(micro_batches: usize, world: usize) -> Vec<u32> {
    (0..world)
        .map(|r| (micro_batches / world + usize::from(r < micro_batches % world)) as u32)
        .collect()
}

/// The predicted compute time of a step: the slowest rank's share times its speed.
pub fn makespan(shares: &[u32], per_mb: &[f64]) -> f64 {
    shares
        .iter()
        .zip(per_mb)
        .map(|(&c, &t)| c as f64 * t)
        .fold(0.0, f64::max)
}

/// Where a rank is, from its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for a generation (a spare, or between generations).
    #[default]
    Idle,
    Training,
    /// Fetching the committed state from a holder.
    Healing,
    /// Its last step is committed: saving and leaving. Nothing it does now is a fault of the job.
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Training => "training",
            Phase::Healing => "healing",
            Phase::Done => "done",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Active,
    Spare,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// In the current generation (it has a rank).
    Active,
    /// Registered and waiting: a hot spare or a joiner.
    Spare,
    /// Crashed or hung: fenced out, never to return under this id.
    Dead,
    /// Removed on purpose (straggler, drain, scale-down of a spare): fenced out.
    Evicted,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub id: MemberId,
    /// SHA-256 (hex) of the secret Register gave this member: every later call proves it.
    pub secret_digest: String,
    pub host: String,
    pub pid: u32,
    pub addr: Vec<u8>,
    pub role: Role,
    pub state: MemberState,
    pub rank: Option<Rank>,
    pub connected: bool,
    pub last_heartbeat: Instant,
    pub last_progress: Instant,
    pub step: Step,
    pub collective_seq: u64,
    pub phase: Phase,
    pub last_step_time: Duration,
    /// Straggler judging: the window of step times, streaks and the flag (K-7).
    pub judge: Judge,
    /// The member holds the job's committed state: it trained in a generation, or was healed
    /// into one and reported the generation's resume step since (K-9).
    pub holds_state: bool,
    /// The newest generation this member has heartbeated in.
    pub progress_generation: Generation,
    /// Current-generation members that reported this one in a failed collective.
    pub suspected_by: BTreeSet<MemberId>,
    /// The member restarted part of itself (its compute) and asked for a new generation
    /// under its own name; it is alive, so reports of it failing do not evict it.
    pub regroup_requested: bool,
    /// When this member first reported a failed collective in the current generation.
    pub reported_at: Option<Instant>,
    pub drain_requested: bool,
    /// Set for members restored from the journal until they re-register.
    pub rejoin_deadline: Option<Instant>,
    /// When a crash was first observed (stream closed), for detection latency.
    pub closed_at: Option<Instant>,
}

impl Member {
    pub(crate) fn new(id: MemberId, now: Instant, req: &Registration) -> Self {
        Member {
            id,
            secret_digest: req.secret_digest.clone(),
            host: req.host.clone(),
            pid: req.pid,
            addr: req.addr.clone(),
            role: req.role,
            state: MemberState::Spare,
            rank: None,
            connected: false,
            last_heartbeat: now,
            last_progress: now,
            step: Step(0),
            collective_seq: 0,
            phase: Phase::Idle,
            last_step_time: Duration::ZERO,
            judge: Judge::default(),
            holds_state: false,
            progress_generation: Generation(0),
            suspected_by: BTreeSet::new(),
            regroup_requested: false,
            reported_at: None,
            drain_requested: false,
            rejoin_deadline: None,
            closed_at: None,
        }
    }

    /// Whether the straggler detector has flagged this member.
    pub fn straggler(&self) -> bool {
        self.judge.straggler
    }

    pub fn is_fenced(&self) -> bool {
        matches!(self.state, MemberState::Dead | MemberState::Evicted)
    }
}

/// What a process asks for when it registers.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub job_id: String,
    pub host: String,
    pub pid: u32,
    pub addr: Vec<u8>,
    pub role: Role,
    pub config_hash: String,
    /// Rejoin after a coordinator restart: the id, generation and rank it held.
    pub rejoin: Option<(MemberId, Generation, Rank)>,
    pub committed_step: Step,
    /// A new member: the digest of the secret it is given. A rejoin: the digest of the secret
    /// it presents, which must be its own.
    pub secret_digest: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub id: MemberId,
    pub rejoined: bool,
    /// This registration set the job's config hash (none was pinned at start).
    pub pinned_config: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeartbeatMsg {
    pub generation: Generation,
    pub step: Step,
    pub collective_seq: u64,
    pub phase: Phase,
    pub last_step_time: Duration,
    pub last_compute_time: Duration,
    /// Each step computed since the previous heartbeat. Empty from a sender that reports only
    /// the last step: then `last_compute_time` is one sample.
    pub recent: Vec<StepSample>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSample {
    pub step: Step,
    /// Work that scales with the rank's micro-batches (forward and backward passes) ...
    pub compute: Duration,
    /// ... and the rest of its own time in the step (optimizer, time descheduled in
    /// collectives), the same whatever its share.
    pub fixed: Duration,
    pub micro_batches: u32,
}

/// Why a member leaves the current generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Removal {
    /// Its session stream closed (process died, connection reset).
    Crashed,
    /// No heartbeat within the timeout (stopped, hung, or partitioned).
    Silent {
        silent_for: Duration,
    },
    /// Heartbeats arrive but the step counter does not move.
    Stalled {
        stalled_for: Duration,
    },
    /// A majority of the other ranks reported it in failed collectives.
    Reported {
        by: Vec<MemberId>,
    },
    /// Re-registration after a coordinator restart did not come in time.
    NotRejoined,
    /// Slow for longer than the cheap remedies could fix; every figure is non-zero.
    Straggler {
        own_ms: f64,
        peers_ms: f64,
        flagged_for_ms: u64,
        /// It was still slow after the global batch was rebalanced away from it.
        after_rebalance: bool,
    },
    Drained,
    /// Scale-down: it goes back to being a spare.
    ScaledDown,
}

impl Removal {
    /// Failures (as opposed to removals on purpose) fence the member out for good.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Removal::Crashed
                | Removal::Silent { .. }
                | Removal::Stalled { .. }
                | Removal::Reported { .. }
                | Removal::NotRejoined
        )
    }

    /// Failures the coordinator infers from silence, which a partition of the coordinator
    /// itself would also produce.
    fn is_silence(&self) -> bool {
        matches!(self, Removal::Silent { .. } | Removal::NotRejoined)
    }

    pub fn describe(&self) -> String {
        match self {
            Removal::Crashed => "session stream closed (process exited or connection reset)".into(),
            Removal::Silent { silent_for } => {
                format!("no heartbeat for {} ms", silent_for.as_millis())
            }
            Removal::Stalled { stalled_for } => {
                format!("no progress for {} ms", stalled_for.as_millis())
            }
            Removal::Reported { by } => format!("reported by members {by:?}"),
            Removal::NotRejoined => "did not re-register after a coordinator restart".into(),
            Removal::Straggler {
                own_ms,
                peers_ms,
                flagged_for_ms,
                after_rebalance,
            } => format!(
                "straggler: {own_ms:.1} ms per micro-batch vs a median of {peers_ms:.1} ms for \
                 its peers, flagged for {:.1} s{}",
                *flagged_for_ms as f64 / 1e3,
                if *after_rebalance {
                    ", still slow after a rebalance"
                } else {
                    ", and no rebalance helps"
                }
            ),
            Removal::Drained => "drained on request".into(),
            Removal::ScaledDown => "scaled down; back to spare".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Regroup {
    pub generation: Generation,
    /// Members of the new generation in rank order.
    pub ranks: Vec<MemberId>,
    /// Micro-batches per rank; empty for the even split.
    pub shares: Vec<u32>,
    pub removed: Vec<(MemberId, Removal)>,
    pub promoted: Vec<MemberId>,
    /// The highest step any survivor committed; the new generation resumes there.
    pub resume_step: Step,
    /// Members that must fetch the committed state, and the new rank to fetch it from.
    pub heal: Vec<(MemberId, Rank)>,
    pub reason: String,
    /// The straggler action this regroup carries out, if any (at most one at a time).
    pub straggler: Option<StragglerAct>,
    /// When it was decided (cool-down and the eviction budget count from here).
    pub at: Instant,
    /// Made by the progress watchdog (K-13): a second one without progress halts.
    pub watchdog: bool,
}

/// A straggler action: the cheap, reversible one first (K-10).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", content = "member", rename_all = "snake_case")]
pub enum StragglerAct {
    Rebalanced(MemberId),
    Evicted(MemberId),
    EvenedOut,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Steady,
    Regroup(Regroup),
    /// Something is wrong but acting would be unsafe; keep the generation and say why.
    Hold {
        reason: String,
    },
    /// Not enough ranks to go on: stop the job cleanly.
    Halt {
        reason: String,
    },
}

/// The coordinator's whole state. The durable part is journaled (see `journal`).
#[derive(Debug, Clone)]
pub struct State {
    pub job_id: String,
    pub config_hash: String,
    pub generation: Generation,
    pub committed_step: Step,
    pub target_world: usize,
    pub members: Members,
    /// Hot fields of `ranks`, index = rank.
    pub live: Vec<Live>,
    /// The current generation's members, in rank order.
    pub ranks: Vec<MemberId>,
    pub next_id: MemberId,
    /// The ranks' straggler levels at the last `refresh_reference`; empty after a regroup.
    pub peers: Peers,
    /// The current generation's micro-batches per rank; empty for the even split.
    pub shares: Vec<u32>,
    /// Set once the job has stopped (Halt).
    pub halted: Option<String>,
    /// The newest step any rank reported committed (K-9: the committed state).
    pub newest_step: Step,
    /// Hosts where a process registered recently, and until when their ranks' step times are
    /// no evidence of a straggler.
    pub quiet_until: HashMap<String, Instant>,
    /// When the last straggler action was taken, and the straggler evictions of the budget's
    /// window (K-10).
    pub straggler_acted_at: Option<Instant>,
    pub straggler_evictions: Vec<Instant>,
    /// After the coordinator's own stall (K-11): until when a closed stream is a member waiting
    /// to re-register, and the deadline it gets.
    pub stall_grace: Option<(Instant, Instant)>,
    /// When a step was last committed (or the current generation formed), and the newest step
    /// at the last regroup the progress watchdog made (K-13).
    pub progress_at: Option<Instant>,
    pub watchdog_step: Option<Step>,
    /// Regroups since the last committed step, and when the last one was made.
    pub regroups_since_progress: u32,
    pub last_regroup_at: Option<Instant>,
}

impl State {
    pub fn new(job_id: &str, target_world: usize) -> Self {
        State {
            job_id: job_id.into(),
            config_hash: String::new(),
            generation: Generation(0),
            committed_step: Step(0),
            target_world,
            members: Members::default(),
            live: Vec::new(),
            ranks: Vec::new(),
            next_id: 1,
            peers: Peers::default(),
            shares: Vec::new(),
            halted: None,
            newest_step: Step(0),
            quiet_until: HashMap::new(),
            straggler_acted_at: None,
            straggler_evictions: Vec::new(),
            stall_grace: None,
            progress_at: None,
            watchdog_step: None,
            regroups_since_progress: 0,
            last_regroup_at: None,
        }
    }

    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    fn live_of(m: &Member) -> Live {
        Live {
            id: m.id,
            last_heartbeat: m.last_heartbeat,
            last_progress: m.last_progress,
            connected: m.connected,
            training: m.phase == Phase::Training,
            straggler: m.judge.straggler,
            drain: m.drain_requested,
            suspects: m.suspected_by.len() as u32,
            regroup: m.regroup_requested,
            reported_at: m.reported_at,
            rejoin_deadline: m.rejoin_deadline,
            median_s: m.judge.level,
            holds_state: m.holds_state,
            done: m.phase == Phase::Done,
        }
    }

    /// Copies a current rank's hot fields into `live`.
    fn sync_live(&mut self, id: MemberId) {
        if let Some(m) = self.members.get(&id) {
            if let Some(r) = m.rank {
                if m.state == MemberState::Active {
                    if let Some(l) = self.live.get_mut(r.0 as usize) {
                        if l.id == id {
                            *l = Self::live_of(m);
                        }
                    }
                }
            }
        }
    }

    /// Rebuilds `live` from `ranks` (after a regroup or a restore).
    pub fn rebuild_live(&mut self) {
        self.live = self
            .ranks
            .iter()
            .filter_map(|id| self.members.get(id))
            .map(Self::live_of)
            .collect();
    }

    fn member(&self, id: MemberId) -> Result<&Member, RuntimeError> {
        self.members
            .get(&id)
            .ok_or(RuntimeError::UnknownMember { member: id })
    }

    fn member_mut(&mut self, id: MemberId) -> Result<&mut Member, RuntimeError> {
        self.members
            .get_mut(&id)
            .ok_or(RuntimeError::UnknownMember { member: id })
    }

    /// Healthy waiting members that can be promoted, oldest first.
    fn available_spares(&self, now: Instant, cfg: &CoreConfig) -> Vec<MemberId> {
        let mut v: Vec<MemberId> = self
            .members
            .values()
            .filter(|m| {
                m.state == MemberState::Spare
                    && m.connected
                    && now.saturating_duration_since(m.last_heartbeat) <= cfg.heartbeat_timeout
            })
            .map(|m| m.id)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn register(
        &mut self,
        now: Instant,
        req: Registration,
        cfg: &CoreConfig,
    ) -> Result<Registered, RuntimeError> {
        if req.job_id != self.job_id {
            return Err(RuntimeError::WrongJob {
                got: req.job_id,
                want: self.job_id.clone(),
            });
        }
        let pinned_config = self.config_hash.is_empty();
        if pinned_config {
            // No hash given at start (`--config-hash`, or the launcher's own config): the first
            // worker's stands, and the service says so in an event.
            self.config_hash = req.config_hash.clone();
        } else if req.config_hash != self.config_hash {
            return Err(RuntimeError::ConfigMismatch {
                got: req.config_hash,
                want: self.config_hash.clone(),
            });
        }
        if let Some((id, generation, rank)) = req.rejoin {
            if let Some(m) = self.members.get_mut(&id) {
                if m.secret_digest != req.secret_digest {
                    return Err(RuntimeError::NotThisMember { member: id });
                }
                if m.is_fenced() {
                    return Err(RuntimeError::Fenced {
                        member: id,
                        generation: self.generation,
                    });
                }
                if m.rejoin_deadline.is_some() {
                    let same_place = generation == self.generation
                        && (m.state != MemberState::Active || m.rank == Some(rank));
                    if !same_place {
                        return Err(RuntimeError::StaleGeneration {
                            got: generation,
                            current: self.generation,
                        });
                    }
                    m.rejoin_deadline = None;
                    // Counted as connected until its session opens: the heartbeat deadline, not
                    // a missing stream, decides if it never does.
                    m.connected = true;
                    m.closed_at = None;
                    m.last_heartbeat = now;
                    m.last_progress = now;
                    m.addr = req.addr;
                    m.pid = req.pid;
                    if req.committed_step > m.step {
                        m.step = req.committed_step;
                    }
                    self.sync_live(id);
                    return Ok(Registered {
                        id,
                        rejoined: true,
                        pinned_config,
                    });
                }
            }
            // An id this coordinator does not know (its journal was lost): a new member.
        }
        // A bounded number of live members (so of sessions, one per member): a client that
        // registers in a loop is refused, not remembered.
        let cap = member_cap(cfg);
        if self.members.values().filter(|m| !m.is_fenced()).count() >= cap {
            return Err(RuntimeError::InvalidRequest {
                what: format!(
                    "the job already has {cap} live members (4 per rank it can run plus 64); \
                     stop spare workers that are not needed"
                ),
            });
        }
        // Starting a worker takes a core for a while: its host's step times are no evidence.
        self.quiet_until
            .insert(req.host.clone(), now + cfg.straggler.startup_grace);
        let id = self.next_id;
        self.next_id += 1;
        self.members.insert(id, Member::new(id, now, &req));
        self.forget_departed(now);
        Ok(Registered {
            id,
            rejoined: false,
            pinned_config,
        })
    }

    /// Members who left (fenced, holding no rank) beyond the newest `DEPARTED_KEPT` are
    /// forgotten, and so are expired start-up graces: a job that replaces workers for months, or
    /// a client that registers in a loop, does not grow the coordinator. Ids are never reused,
    /// so a forgotten member's calls are refused as unknown, as a fenced member's would be.
    fn forget_departed(&mut self, now: Instant) {
        let mut gone: Vec<MemberId> = self
            .members
            .values()
            .filter(|m| m.is_fenced() && m.rank.is_none() && !self.ranks.contains(&m.id))
            .map(|m| m.id)
            .collect();
        if gone.len() > DEPARTED_KEPT {
            gone.sort_unstable();
            for id in &gone[..gone.len() - DEPARTED_KEPT] {
                self.members.remove(id);
            }
        }
        self.quiet_until.retain(|_, until| *until > now);
    }

    pub fn session_opened(&mut self, now: Instant, id: MemberId) -> Result<(), RuntimeError> {
        let generation = self.generation;
        let m = self.member_mut(id)?;
        if m.is_fenced() {
            return Err(RuntimeError::Fenced {
                member: id,
                generation,
            });
        }
        m.connected = true;
        m.closed_at = None;
        m.last_heartbeat = now;
        self.sync_live(id);
        Ok(())
    }

    /// The session stream ended or errored: for a rank this is a crash signal.
    pub fn session_closed(&mut self, now: Instant, id: MemberId) {
        let grace = self.stall_grace.filter(|(until, _)| now < *until);
        if let Some(m) = self.members.get_mut(&id) {
            m.connected = false;
            if m.closed_at.is_none() {
                m.closed_at = Some(now);
            }
            // K-11: a stream the coordinator's own stall broke; the rank re-registers.
            if let (Some((_, deadline)), MemberState::Active) = (grace, m.state) {
                m.rejoin_deadline.get_or_insert(deadline);
            }
            if m.state == MemberState::Spare {
                m.state = MemberState::Dead;
            }
        }
        self.sync_live(id);
    }

    /// Applies a heartbeat. Heartbeats of fenced members and of generations this member does not
    /// belong to are refused (G-1): the caller closes that session with the error.
    pub fn heartbeat(
        &mut self,
        now: Instant,
        id: MemberId,
        hb: &HeartbeatMsg,
        cfg: &CoreConfig,
    ) -> Result<Vec<FlagChange>, RuntimeError> {
        let out = self.heartbeat_inner(now, id, hb, cfg);
        self.sync_live(id);
        out
    }

    fn heartbeat_inner(
        &mut self,
        now: Instant,
        id: MemberId,
        hb: &HeartbeatMsg,
        cfg: &CoreConfig,
    ) -> Result<Vec<FlagChange>, RuntimeError> {
        let generation = self.generation;
        let resume = self.committed_step;
        let world = self.ranks.len();
        let m = self.member_mut(id)?;
        if m.is_fenced() {
            return Err(RuntimeError::Fenced {
                member: id,
                generation,
            });
        }
        if hb.generation > generation {
            return Err(RuntimeError::InvalidMessage {
                what: format!(
                    "heartbeat for generation {} but the job is at {generation}",
                    hb.generation
                ),
            });
        }
        m.last_heartbeat = now;
        if hb.generation < generation || m.state != MemberState::Active {
            // Liveness only: the member has not yet acted on the newest assignment.
            return Ok(Vec::new());
        }
        if m.progress_generation < generation {
            // Joining a generation is progress: the hang clock starts now, not at registration.
            m.progress_generation = generation;
            m.last_progress = now;
        }
        let advanced = hb.step > m.step || hb.collective_seq > m.collective_seq;
        let stepped = hb.step > m.step;
        if advanced {
            m.last_progress = now;
        }
        // A rank reports its committed step only once it holds the generation's state: a
        // healed joiner reports its old step until the heal is done.
        if hb.step >= resume && (hb.step > Step(0) || resume == Step(0)) {
            m.holds_state = true;
        }
        m.step = m.step.max(hb.step);
        m.collective_seq = m.collective_seq.max(hb.collective_seq);
        m.phase = hb.phase;
        m.last_step_time = hb.last_step_time;
        let step = m.step;
        if step > self.newest_step {
            self.newest_step = step;
            self.progress_at = Some(now);
            self.regroups_since_progress = 0;
        }
        if !stepped {
            return Ok(Vec::new());
        }
        self.judge_steps(now, id, hb, world, cfg)
    }

    /// Feeds each step of a heartbeat to the member's straggler judge.
    fn judge_steps(
        &mut self,
        now: Instant,
        id: MemberId,
        hb: &HeartbeatMsg,
        world: usize,
        cfg: &CoreConfig,
    ) -> Result<Vec<FlagChange>, RuntimeError> {
        let quiet_until = self
            .members
            .get(&id)
            .and_then(|m| self.quiet_until.get(&m.host))
            .copied();
        let m = self
            .members
            .get(&id)
            .ok_or(RuntimeError::UnknownMember { member: id })?;
        let mut cx = Context {
            now,
            step_time: Duration::ZERO,
            world,
            micro_batches: 0,
            peers: self.peers.excluding(m.judge.level_at_refresh),
            quiet: quiet_until.is_some_and(|t| now < t),
        };
        let m = self.member_mut(id)?;
        if hb.recent.is_empty() {
            let t = if hb.last_compute_time > Duration::ZERO {
                hb.last_compute_time
            } else {
                hb.last_step_time
            };
            cx.step_time = t;
            let c = m
                .judge
                .sample(id, hb.step, t.as_secs_f64(), &cx, &cfg.straggler);
            return Ok(c.into_iter().collect());
        }
        let mut changes = Vec::new();
        // The fixed part is spread over the even share, so that a rank given fewer micro-batches
        // is judged on the same scale as at its even share (D-2: shares only move work).
        let even = if cfg.max_world == usize::MAX {
            None
        } else {
            Some((cfg.max_world as f64 / world.max(1) as f64).max(1.0))
        };
        for x in &hb.recent {
            if m.judge.last_sampled.is_some_and(|l| x.step <= l) {
                continue;
            }
            let mbs = x.micro_batches.max(1) as f64;
            let per_mb =
                x.compute.as_secs_f64() / mbs + x.fixed.as_secs_f64() / even.unwrap_or(mbs);
            cx.micro_batches = x.micro_batches;
            cx.step_time = x.compute + x.fixed;
            changes.extend(m.judge.sample(id, x.step, per_mb, &cx, &cfg.straggler));
        }
        Ok(changes)
    }

    /// Recomputes the peer reference for straggler detection from the ranks' levels (full
    /// windows of this generation only). Done once per tick, not per heartbeat, so a heartbeat
    /// costs O(window + log world); each rank is then judged against the others' median.
    pub fn refresh_reference(&mut self) {
        self.peers = Peers::new(self.live.iter().filter_map(|l| l.median_s));
        for id in &self.ranks {
            if let Some(m) = self.members.get_mut(id) {
                m.judge.level_at_refresh = m.judge.level;
            }
        }
    }

    /// A current rank reports a collective failure naming `suspect`.
    pub fn report_fault(
        &mut self,
        now: Instant,
        reporter: MemberId,
        generation: Generation,
        suspect: Rank,
    ) -> Result<(), RuntimeError> {
        if generation != self.generation {
            return Err(RuntimeError::StaleGeneration {
                got: generation,
                current: self.generation,
            });
        }
        let r = self.member(reporter)?;
        if r.state != MemberState::Active {
            return Err(RuntimeError::Fenced {
                member: reporter,
                generation: self.generation,
            });
        }
        let Some(&sid) = self.ranks.get(suspect.0 as usize) else {
            return Err(RuntimeError::InvalidMessage {
                what: format!(
                    "suspect rank {suspect} is outside world {}",
                    self.ranks.len()
                ),
            });
        };
        let r = self.member_mut(reporter)?;
        r.reported_at.get_or_insert(now);
        self.sync_live(reporter);
        if sid != reporter {
            self.member_mut(sid)?.suspected_by.insert(reporter);
        } else {
            // A rank reporting itself lost its place in the generation's collectives (its
            // compute restarted) but not its life: regroup, keep it.
            self.member_mut(sid)?.regroup_requested = true;
        }
        self.sync_live(sid);
        Ok(())
    }

    pub fn scale(&mut self, target: usize, cfg: &CoreConfig) -> Result<(), RuntimeError> {
        if target == 0 || target < cfg.min_world || target > cfg.max_world {
            return Err(RuntimeError::InvalidRequest {
                what: format!(
                    "target world {target} is outside [{}, {}] (min_world .. micro-batches per step)",
                    cfg.min_world.max(1),
                    cfg.max_world
                ),
            });
        }
        self.target_world = target;
        Ok(())
    }

    pub fn drain(&mut self, rank: Rank, cfg: &CoreConfig) -> Result<(), RuntimeError> {
        let Some(&id) = self.ranks.get(rank.0 as usize) else {
            return Err(RuntimeError::InvalidRequest {
                what: format!(
                    "rank {rank} is not in the current world of {}",
                    self.ranks.len()
                ),
            });
        };
        // A retry of a drain already asked for changes nothing (the target is lowered once).
        if self.members.get(&id).is_some_and(|m| m.drain_requested) {
            return Ok(());
        }
        let draining = self.live.iter().filter(|l| l.drain).count();
        if self.ranks.len() - draining <= cfg.min_world.max(1) {
            return Err(RuntimeError::InvalidRequest {
                what: format!(
                    "draining rank {rank} would leave fewer than min_world = {} ranks",
                    cfg.min_world.max(1)
                ),
            });
        }
        self.member_mut(id)?.drain_requested = true;
        self.sync_live(id);
        self.target_world = self.target_world.saturating_sub(1).max(1);
        Ok(())
    }

    /// Marks the journaled members as waiting to re-register (after a coordinator restart).
    pub fn await_rejoin(&mut self, now: Instant, cfg: &CoreConfig) {
        for m in self.members.values_mut() {
            if !m.is_fenced() {
                m.connected = false;
                m.rejoin_deadline = Some(now + cfg.rejoin_grace);
                m.last_heartbeat = now;
                m.last_progress = now;
            }
        }
        self.rebuild_live();
    }
}

/// Why a current rank has failed, if it has. Reads only the compact `Live` mirror, except to
/// list the reporters of a rank that a majority reported.
fn failure(
    now: Instant,
    cuts: &Cuts,
    l: &Live,
    s: &State,
    world: usize,
    cfg: &CoreConfig,
) -> Option<Removal> {
    if l.done {
        return None;
    }
    if let Some(deadline) = l.rejoin_deadline {
        return (now > deadline).then_some(Removal::NotRejoined);
    }
    if !l.connected {
        return Some(Removal::Crashed);
    }
    // Compare instants against precomputed cut-offs: this runs for every rank every tick.
    if cuts.heartbeat.is_some_and(|c| l.last_heartbeat < c) {
        let silent_for = now.saturating_duration_since(l.last_heartbeat);
        return Some(Removal::Silent { silent_for });
    }
    if l.training && cuts.progress.is_some_and(|c| l.last_progress < c) {
        let stalled_for = now.saturating_duration_since(l.last_progress);
        let limit = l
            .median_s
            .map(|t| Duration::from_secs_f64(t * cfg.hang_k))
            .unwrap_or(Duration::ZERO)
            .max(cfg.hang_floor);
        if stalled_for > limit {
            return Some(Removal::Stalled { stalled_for });
        }
    }
    // A strict majority of the other ranks saw it fail in a collective.
    if world > 1 && !l.regroup && (l.suspects as usize) * 2 > world - 1 {
        let by = s
            .members
            .get(&l.id)
            .map(|m| m.suspected_by.iter().copied().collect())
            .unwrap_or_default();
        return Some(Removal::Reported { by });
    }
    None
}

/// `now - timeout` for the per-rank checks (None early in the process's life).
struct Cuts {
    heartbeat: Option<Instant>,
    progress: Option<Instant>,
}

/// The decision: what the coordinator should do now, and why.
pub fn decide(now: Instant, s: &State, cfg: &CoreConfig) -> Decision {
    let cuts = Cuts {
        heartbeat: now.checked_sub(cfg.heartbeat_timeout),
        progress: now.checked_sub(cfg.hang_floor),
    };
    if s.halted.is_some() {
        return Decision::Steady;
    }
    if s.ranks.is_empty() {
        return form_first(now, s, cfg);
    }
    // K-13: a job that commits nothing is regrouped once, then halted with the reason; this
    // comes before the "finished" check (one rank done and another stuck is no finish).
    match super::watchdog::watch(now, s, cfg) {
        Watch::Fine => {}
        Watch::Halt(reason) => return Decision::Halt { reason },
        Watch::Regroup(reason) => return same_members(now, s, reason),
    }
    // The job is over once its ranks finished: nothing to regroup or promote any more.
    if s.live.iter().any(|l| l.done) {
        return Decision::Steady;
    }
    let p = match pressures(now, &cuts, s, cfg) {
        Ok(p) => p,
        Err(reason) => return Decision::Hold { reason },
    };
    if p.calm() {
        return Decision::Steady;
    }
    regroup_for(now, s, cfg, p)
}

/// What may call for a new generation in this tick.
struct Pressures {
    removed: Vec<(MemberId, Removal)>,
    target: usize,
    /// A flagged straggler may be acted on (not cooling down after the last action).
    any_straggler: bool,
    /// A rebalanced split whose straggler is gone or recovered is evened out again.
    even_out: bool,
    /// Members that asked for a regroup (a restarted compute, a group that could not be built).
    regroup: Vec<MemberId>,
    /// Most ranks reported failed collectives with no agreed suspect; their count.
    stuck: Option<usize>,
    world: usize,
}

impl Pressures {
    fn calm(&self) -> bool {
        self.removed.is_empty()
            && !self.any_straggler
            && !self.even_out
            && self.world == self.target
            && self.regroup.is_empty()
            && self.stuck.is_none()
    }
}

fn pressures(now: Instant, cuts: &Cuts, s: &State, cfg: &CoreConfig) -> Result<Pressures, String> {
    let world = s.ranks.len();
    // A hold (a report that cannot be judged yet) waits for the next tick.
    let removed = removals(now, cuts, s, cfg)?;
    let target = s.target_world.min(cfg.max_world).max(1);
    // One straggler action at a time, then a cool-down (K-10).
    let cooling = s
        .straggler_acted_at
        .is_some_and(|t| now.saturating_duration_since(t) < cfg.straggler.cooldown);
    let any_straggler = cfg.straggler.evict && !cooling && s.live.iter().any(|l| l.straggler);
    let even_out = !cooling && !s.shares.is_empty() && !s.live.iter().any(|l| l.straggler);
    // Regroups asked for by ranks back off while they bring no committed step: a cause that
    // fails every new group at once must not churn generations (K-13 then decides).
    let regroup: Vec<MemberId> = if super::watchdog::regroup_allowed(now, s) {
        s.live.iter().filter(|l| l.regroup).map(|l| l.id).collect()
    } else {
        Vec::new()
    };
    // A generation most of whose ranks reported failed collectives, with no suspect agreed by a
    // majority and nobody found dead or hung by the heartbeat deadline since, cannot make
    // progress: every rank waits for the next generation. Regroup with the same members.
    let reports: Vec<Instant> = s.live.iter().filter_map(|l| l.reported_at).collect();
    let stuck = (removed.is_empty()
        && world > 1
        && reports.len() * 2 > world
        && reports
            .iter()
            .min()
            .is_some_and(|&first| now.saturating_duration_since(first) > cfg.heartbeat_timeout))
    .then_some(reports.len());
    Ok(Pressures {
        removed,
        target,
        any_straggler,
        even_out,
        regroup,
        stuck,
        world,
    })
}

/// The next generation under `p`: who leaves, who is promoted, the split, the reason.
fn regroup_for(now: Instant, s: &State, cfg: &CoreConfig, p: Pressures) -> Decision {
    let Pressures {
        mut removed,
        target,
        any_straggler,
        even_out,
        regroup,
        stuck,
        world,
    } = p;
    // Only now scan for spares: the steady path above stays O(world) with no allocation.
    let mut spares = s.available_spares(now, cfg);
    let mut act = None;
    // Failures and requests first: a straggler is acted on only in a tick with nothing else.
    if any_straggler && removed.is_empty() && regroup.is_empty() && stuck.is_none() {
        act = straggler_step(now, s, cfg, spares.len());
    }
    let mut rebalance: Option<(Vec<u32>, String)> = None;
    let mut straggler = None;
    match act {
        Some(StragglerStep::Evict(id, why)) => {
            removed.push((id, why));
            straggler = Some(StragglerAct::Evicted(id));
        }
        Some(StragglerStep::Rebalance(id, shares, why)) => {
            rebalance = Some((shares, why));
            straggler = Some(StragglerAct::Rebalanced(id));
        }
        None => {}
    }
    let mut survivors: Vec<MemberId> = s
        .ranks
        .iter()
        .copied()
        .filter(|id| !removed.iter().any(|(r, _)| r == id))
        .collect();
    // Scale down: the highest ranks go back to being spares.
    while survivors.len() > target {
        let id = survivors.pop().expect("non-empty");
        removed.push((id, Removal::ScaledDown));
    }
    // K-9: never a generation without the committed state.
    if let Err(reason) = keep_a_holder(s, &mut removed, &mut survivors) {
        return Decision::Halt { reason };
    }
    let want = target.saturating_sub(survivors.len());
    spares.truncate(want);
    if removed.is_empty()
        && spares.is_empty()
        && regroup.is_empty()
        && stuck.is_none()
        && rebalance.is_none()
        && !even_out
    {
        return Decision::Steady;
    }
    let new_world = survivors.len() + spares.len();
    if new_world < cfg.min_world.max(1) {
        return below_min_world(new_world, &removed, cfg);
    }
    let mut why: Vec<String> = removed
        .iter()
        .map(|(id, r)| format!("member {id} out: {}", r.describe()))
        .collect();
    if !spares.is_empty() {
        why.push(format!("promoted {spares:?}"));
    }
    for id in &regroup {
        why.push(format!(
            "member {id} restarted its compute and asked for a regroup"
        ));
    }
    // The split changes only in a generation with the same members; any other regroup evens it
    // out (a straggler still flagged in it is rebalanced again once its times are in).
    let same_members = removed.is_empty() && spares.is_empty();
    let shares = match &rebalance {
        Some((shares, reason)) if same_members => {
            why.push(format!("rebalance: {reason}"));
            shares.clone()
        }
        _ => {
            if same_members && even_out {
                why.push(
                    "the straggler recovered or left: the global batch is split evenly again"
                        .into(),
                );
                straggler = Some(StragglerAct::EvenedOut);
            }
            Vec::new()
        }
    };
    if let Some(n) = stuck {
        why.push(format!(
            "{n} of {world} ranks reported failed collectives with no agreed suspect and none \
             missed the heartbeat deadline: regrouping with the same members"
        ));
    }
    let (ranks, resume_step, heal) = place(s, survivors, &spares);
    Decision::Regroup(Regroup {
        generation: Generation(s.generation.0 + 1),
        ranks,
        shares,
        removed,
        promoted: spares,
        resume_step,
        heal,
        reason: why.join("; "),
        straggler,
        at: now,
        watchdog: false,
    })
}

fn below_min_world(
    new_world: usize,
    removed: &[(MemberId, Removal)],
    cfg: &CoreConfig,
) -> Decision {
    Decision::Halt {
        reason: format!(
            "{} rank(s) left ({}) and no spare: below min_world = {}",
            new_world,
            removed
                .iter()
                .map(|(id, r)| format!("member {id}: {}", r.describe()))
                .collect::<Vec<_>>()
                .join("; "),
            cfg.min_world.max(1)
        ),
    }
}

/// The progress watchdog's regroup (K-13): the same members in a fresh generation.
fn same_members(now: Instant, s: &State, reason: String) -> Decision {
    let (ranks, resume_step, heal) = place(s, s.ranks.clone(), &[]);
    Decision::Regroup(Regroup {
        generation: Generation(s.generation.0 + 1),
        ranks,
        shares: s.shares.clone(),
        removed: Vec::new(),
        promoted: Vec::new(),
        resume_step,
        heal,
        reason,
        straggler: None,
        at: now,
        watchdog: true,
    })
}

/// The current ranks that failed or asked to leave; or why to hold when most went silent at
/// once (split-brain guard: the coordinator is more likely the one cut off, and evicting them
/// would leave it with a minority; crashes seen as stream resets are not ambiguous).
fn removals(
    now: Instant,
    cuts: &Cuts,
    s: &State,
    cfg: &CoreConfig,
) -> Result<Vec<(MemberId, Removal)>, String> {
    let world = s.ranks.len();
    let mut removed: Vec<(MemberId, Removal)> = Vec::new();
    for l in &s.live {
        if let Some(f) = failure(now, cuts, l, s, world, cfg) {
            removed.push((l.id, f));
        } else if l.drain {
            removed.push((l.id, Removal::Drained));
        }
    }
    let silent = removed.iter().filter(|(_, r)| r.is_silence()).count();
    if silent * 2 > world {
        return Err(format!(
            "{silent} of {world} ranks are silent at once; refusing to evict a majority \
             (split-brain guard) until they return or an operator intervenes"
        ));
    }
    Ok(removed)
}

/// The new generation's ranks (survivors, then promoted spares), the step it resumes at (the
/// highest any survivor committed), and who heals from whom: the leader is the survivor with
/// that step, lowest rank.
fn place(
    s: &State,
    survivors: Vec<MemberId>,
    spares: &[MemberId],
) -> (Vec<MemberId>, Step, Vec<(MemberId, Rank)>) {
    let resume_step = survivors
        .iter()
        .filter_map(|id| s.members.get(id))
        .map(|m| m.step)
        .max()
        .unwrap_or(s.committed_step)
        .max(s.committed_step);
    let leader = survivors
        .iter()
        .position(|id| s.members.get(id).is_some_and(|m| m.step == resume_step));
    let mut ranks = survivors;
    ranks.extend(spares.iter().copied());
    let heal = match leader {
        Some(l) => ranks
            .iter()
            .enumerate()
            .filter(|(i, id)| {
                *i != l
                    && (spares.contains(id)
                        || s.members.get(id).is_some_and(|m| m.step < resume_step))
            })
            .map(|(_, id)| (*id, Rank(l as u32)))
            .collect(),
        None => Vec::new(),
    };
    (ranks, resume_step, heal)
}

/// K-9: a job that has committed steps never forms a generation in which no member holds them.
/// A holder removed on purpose (straggler, drain, scale-down) stays instead; if every holder
/// failed, the job halts with the reason rather than train on from step 0.
fn keep_a_holder(
    s: &State,
    removed: &mut Vec<(MemberId, Removal)>,
    survivors: &mut Vec<MemberId>,
) -> Result<(), String> {
    if s.newest_step == Step(0) && s.committed_step == Step(0) {
        return Ok(());
    }
    let holds = |id: &MemberId| s.members.get(id).is_some_and(|m| m.holds_state);
    if survivors.iter().any(holds) {
        return Ok(());
    }
    if let Some(i) = removed
        .iter()
        .position(|(id, r)| !r.is_failure() && holds(id))
    {
        let (id, _) = removed.remove(i);
        // Back at its place in rank order.
        let at = |x: &MemberId| s.ranks.iter().position(|r| r == x).unwrap_or(usize::MAX);
        let pos = survivors
            .iter()
            .position(|x| at(x) > at(&id))
            .unwrap_or(survivors.len());
        survivors.insert(pos, id);
        return Ok(());
    }
    let lost: Vec<String> = removed
        .iter()
        .filter(|(id, _)| holds(id))
        .map(|(id, r)| format!("member {id}: {}", r.describe()))
        .collect();
    Err(format!(
        "no member left holds the committed state (step {}): every rank that held it is gone \
         ({}); the rest would start again from step 0. Restart the job from the newest \
         checkpoint",
        s.newest_step.max(s.committed_step),
        if lost.is_empty() {
            "none of the current ranks has reported it".to_string()
        } else {
            lost.join("; ")
        }
    ))
}

/// What to do about the flagged stragglers now: one action at most.
enum StragglerStep {
    Evict(MemberId, Removal),
    Rebalance(MemberId, Vec<u32>, String),
}

/// K-10: rebalancing (cheap, reversible) comes first; a rank is evicted only once its slowness
/// persisted past it (`Judge::persisted`), within the job's eviction budget, when a spare
/// replaces it or the job stays at or above min_world, and never if it is the last rank that
/// holds the committed state.
fn straggler_step(
    now: Instant,
    s: &State,
    cfg: &CoreConfig,
    spares: usize,
) -> Option<StragglerStep> {
    let sc = &cfg.straggler;
    let world = s.ranks.len();
    let can_split = cfg.max_world != usize::MAX && cfg.max_world > world;
    let recent = s
        .straggler_evictions
        .iter()
        .filter(|&&t| now.saturating_duration_since(t) < sc.eviction_window)
        .count();
    let budget = (recent as u32) < sc.max_evictions;
    let holders = s.live.iter().filter(|l| l.holds_state).count();
    for l in s.live.iter().filter(|l| l.straggler) {
        let m = s.members.get(&l.id)?;
        let j = &m.judge;
        if !j.held(now, sc) {
            continue;
        }
        // Without a spare, evicting a rank a split can work around only slows the job.
        let room = spares > 0 || (!can_split && world > cfg.min_world.max(1));
        let last_holder = m.holds_state && holders <= 1;
        if j.persisted(now, can_split, sc) && budget && room && !last_holder {
            let own = j.level.unwrap_or(j.flag_level);
            let peers = s.peers.excluding(j.level_at_refresh);
            if let Some(peers) = peers.filter(|&p| p > 0.0 && own > 0.0) {
                let flagged_for = j
                    .flagged_at
                    .map_or(0, |t| now.saturating_duration_since(t).as_millis() as u64);
                return Some(StragglerStep::Evict(
                    l.id,
                    Removal::Straggler {
                        own_ms: own * 1e3,
                        peers_ms: peers * 1e3,
                        flagged_for_ms: flagged_for.max(1),
                        after_rebalance: can_split,
                    },
                ));
            }
        }
        // A rank already given less is planned again from the times at its new share (a CPU
        // quota does not slow work in proportion): a better split is taken if it gains
        // min_gain, which also keeps the split from oscillating.
        if let Rebalance::To(shares, why) = plan_rebalance(s, cfg) {
            return Some(StragglerStep::Rebalance(
                l.id,
                shares,
                format!("member {} is a straggler: {why}", l.id),
            ));
        }
        return None;
    }
    None
}

enum Rebalance {
    /// Not every rank has a window of step times yet.
    Wait,
    /// No split is enough faster than the current one.
    Useless,
    To(Vec<u32>, String),
}

/// The split of the global batch that evens out the ranks' measured speeds, if it is worth a
/// regroup: its predicted step compute time must be `min_gain` below the current split's.
fn plan_rebalance(s: &State, cfg: &CoreConfig) -> Rebalance {
    let world = s.live.len();
    let m = cfg.max_world;
    if m == usize::MAX || m <= world {
        return Rebalance::Useless;
    }
    // Only flagged ranks are taken at their measured speed; the others at the reference, so
    // that noise among healthy ranks does not tilt the split between them.
    let Some(reference) = s.peers.excluding(None) else {
        return Rebalance::Wait;
    };
    // A rank flagged on its last steps, before its median caught up, is planned at the level
    // that flagged it; once rebalanced, at its median at the new share.
    let flagged = |l: &Live| {
        let j = &s.members.get(&l.id)?.judge;
        let median = l.median_s?;
        Some(if j.rebalanced {
            median
        } else {
            median.max(j.flag_level)
        })
    };
    let Some(per_mb) = s
        .live
        .iter()
        .map(|l| {
            if l.straggler {
                flagged(l)
            } else {
                Some(reference)
            }
        })
        .collect::<Option<Vec<f64>>>()
    else {
        return Rebalance::Wait;
    };
    let current = if s.shares.len() == world {
        s.shares.clone()
    } else {
        even_shares(m, world)
    };
    let next = weighted_shares(m, &per_mb);
    let (before, after) = (makespan(&current, &per_mb), makespan(&next, &per_mb));
    if next == current || after > before * (1.0 - cfg.straggler.min_gain) {
        return Rebalance::Useless;
    }
    // A flagged rank's share only shrinks while it is flagged: at a reduced share a CPU quota
    // may not bind, and its times there say nothing of its speed at a larger one. It grows back
    // when the flag clears (with backoff on relapses).
    let grows = s
        .live
        .iter()
        .zip(current.iter().zip(&next))
        .any(|(l, (c, n))| l.straggler && n > c);
    if grows {
        return Rebalance::Useless;
    }
    let ms: Vec<String> = per_mb.iter().map(|t| format!("{:.1}", t * 1e3)).collect();
    Rebalance::To(
        next.clone(),
        format!(
            "micro-batches per rank {current:?} -> {next:?} for [{}] ms per micro-batch; \
             predicted compute per step {:.1} -> {:.1} ms",
            ms.join(", "),
            before * 1e3,
            after * 1e3
        ),
    )
}

/// The first generation forms when `target_world` members that asked to be active are connected.
fn form_first(now: Instant, s: &State, cfg: &CoreConfig) -> Decision {
    let mut ready: Vec<MemberId> = s
        .members
        .values()
        .filter(|m| {
            m.state == MemberState::Spare
                && m.role == Role::Active
                && m.connected
                && now.saturating_duration_since(m.last_heartbeat) <= cfg.heartbeat_timeout
        })
        .map(|m| m.id)
        .collect();
    let target = s.target_world.min(cfg.max_world).max(1);
    if ready.len() < target {
        return Decision::Steady;
    }
    ready.sort_unstable();
    ready.truncate(target);
    Decision::Regroup(Regroup {
        generation: Generation(s.generation.0 + 1),
        reason: format!("first generation: {} ranks registered", ready.len()),
        promoted: ready.clone(),
        ranks: ready,
        shares: Vec::new(),
        removed: Vec::new(),
        resume_step: s.committed_step,
        heal: Vec::new(),
        straggler: None,
        at: now,
        watchdog: false,
    })
}

/// Carries out a decision. Returns the generation in force afterwards.
pub fn apply(s: &mut State, d: &Decision) -> Generation {
    match d {
        Decision::Steady | Decision::Hold { .. } => {}
        Decision::Halt { reason } => s.halted = Some(reason.clone()),
        Decision::Regroup(r) => apply_regroup(s, r),
    }
    s.generation
}

fn apply_regroup(s: &mut State, r: &Regroup) {
    for (id, why) in &r.removed {
        if let Some(m) = s.members.get_mut(id) {
            m.rank = None;
            m.state = match why {
                Removal::ScaledDown => MemberState::Spare,
                w if w.is_failure() => MemberState::Dead,
                _ => MemberState::Evicted,
            };
            m.judge = Judge::default();
            m.drain_requested = false;
        }
    }
    let uneven = !r.shares.is_empty();
    let nothing_committed = r.resume_step == Step(0) && s.newest_step == Step(0);
    for (i, id) in r.ranks.iter().enumerate() {
        // Survivors listed for a heal only lag in what their heartbeats said; a promoted
        // spare has nothing of the job until its heal is done.
        let joining = r.promoted.contains(id);
        if let Some(m) = s.members.get_mut(id) {
            m.state = MemberState::Active;
            m.rank = Some(Rank(i as u32));
            m.suspected_by.clear();
            m.regroup_requested = false;
            m.reported_at = None;
            // A new generation starts with heals, a fresh prefetch and cold caches on
            // joiners: its first steps are not evidence of a straggler.
            m.judge.restart_window();
            m.judge.rebalanced = uneven && m.judge.straggler;
            if joining {
                // It holds the committed state once it reports the resume step (K-9), unless
                // nothing was ever committed: then the state is the seed's initial model, which
                // every member has, and a rank that has not reported yet (its steps are
                // milliseconds, its heartbeats are not) holds it as surely as its peers.
                m.holds_state = nothing_committed;
            } else {
                m.step = r.resume_step.max(m.step);
            }
        }
    }
    match r.straggler {
        Some(StragglerAct::Evicted(_)) => {
            s.straggler_evictions.push(r.at);
            s.straggler_acted_at = Some(r.at);
        }
        Some(_) => s.straggler_acted_at = Some(r.at),
        None => {}
    }
    s.peers = Peers::default();
    s.shares = r.shares.clone();
    s.ranks = r.ranks.clone();
    s.generation = r.generation;
    s.committed_step = r.resume_step;
    // Only commits move the progress clock (a job that regroups in a loop commits nothing),
    // except that the first generation and a watchdog regroup each get a full timeout.
    if r.watchdog || s.progress_at.is_none() {
        s.progress_at = Some(r.at);
    }
    if r.watchdog {
        s.watchdog_step = Some(s.newest_step);
    }
    s.regroups_since_progress = s.regroups_since_progress.saturating_add(1);
    s.last_regroup_at = Some(r.at);
    s.rebuild_live();
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::coordinator::testkit::*;

    // Registrations are capped (a client registering in a loop is refused, not remembered);
    // fenced members do not count.
    #[test]
    fn live_members_are_capped() {
        let c = CoreConfig {
            max_world: 2,
            ..cfg()
        };
        let t = Instant::now();
        let mut s = State::new("job", 2);
        let cap = member_cap(&c);
        for _ in 0..cap {
            s.register(t, reg(Role::Spare), &c).unwrap();
        }
        let e = s.register(t, reg(Role::Spare), &c).unwrap_err();
        assert!(e.to_string().contains("live members"), "{e}");
        let some = *s.members.keys().next().unwrap();
        s.session_closed(t, some);
        s.register(t, reg(Role::Spare), &c).unwrap();
    }

    // K-9 with K-4: in the first generation a rank that has not sent a heartbeat since it was
    // formed (its steps took milliseconds) still holds the state its peers committed (they
    // commit in lockstep): when the only rank that reported is lost, the job stops for
    // min_world, not because "no member holds the committed state" (a CI run did that).
    #[test]
    fn a_first_generation_rank_that_has_not_reported_still_holds_the_state() {
        let c = CoreConfig {
            min_world: 2,
            ..cfg()
        };
        let t = Instant::now();
        let mut s = job(t, 2, 0, &c);
        let (quiet, reported) = (s.ranks[0], s.ranks[1]);
        beat(&mut s, t, reported, 31, 1, &c);
        s.session_closed(t, reported);
        let d = decide(t, &s, &c);
        let Decision::Halt { reason } = &d else {
            panic!("{d:?}")
        };
        assert!(reason.contains("min_world = 2"), "{reason}");
        assert!(s.members[&quiet].holds_state);
        // With min_world 1 the quiet rank goes on alone, from the committed step.
        let c = cfg();
        let mut s = job(t, 2, 0, &c);
        let reported = s.ranks[1];
        beat(&mut s, t, reported, 31, 1, &c);
        s.session_closed(t, reported);
        let d = decide(t, &s, &c);
        assert!(
            matches!(&d, Decision::Regroup(r) if r.ranks.len() == 1),
            "{d:?}"
        );
    }

    // Members who left are forgotten beyond the newest DEPARTED_KEPT: a client that registers
    // and leaves in a loop (or months of replaced workers) does not grow the state; a forgotten
    // member stays shut out, and the active ranks are untouched.
    #[test]
    fn members_who_left_are_forgotten() {
        let c = cfg();
        let t = Instant::now();
        let mut s = job(t, 2, 0, &c);
        let ranks = s.ranks.clone();
        let first = s.register(t, reg(Role::Spare), &c).unwrap().id;
        s.session_closed(t, first);
        for _ in 0..1000 {
            let id = s.register(t, reg(Role::Spare), &c).unwrap().id;
            s.session_closed(t, id);
        }
        let fenced = s.members.values().filter(|m| m.is_fenced()).count();
        assert!(fenced <= DEPARTED_KEPT + 1, "{fenced} fenced members kept");
        assert!(s.members.len() <= DEPARTED_KEPT + 3, "{}", s.members.len());
        assert!(!s.members.contains_key(&first));
        assert!(s.session_opened(t, first).is_err());
        assert_eq!(s.ranks, ranks);
        assert!(ranks.iter().all(|id| !s.members[id].is_fenced()));
    }

    // A drain retried (the admin's client timed out and asked again) lowers the target once.
    #[test]
    fn a_retried_drain_changes_nothing() {
        let c = cfg();
        let t = Instant::now();
        let mut s = job(t, 4, 0, &c);
        s.drain(Rank(3), &c).unwrap();
        assert_eq!(s.target_world, 3);
        s.drain(Rank(3), &c).unwrap();
        s.drain(Rank(3), &c).unwrap();
        assert_eq!(s.target_world, 3);
    }

    #[test]
    fn first_generation_waits_for_the_target_world() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = State::new("job", 2);
        let a = s.register(t, reg(Role::Active), &cfg).unwrap().id;
        s.session_opened(t, a).unwrap();
        assert_eq!(decide(t, &s, &cfg), Decision::Steady);
        let b = s.register(t, reg(Role::Active), &cfg).unwrap().id;
        s.session_opened(t, b).unwrap();
        let r = regroup(decide(t, &s, &cfg));
        assert_eq!((r.generation, r.ranks), (Generation(1), vec![a, b]));
    }

    // A closed stream is a crash, seen at once (no timeout), and the survivors regroup.
    #[test]
    fn crash_is_detected_immediately() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = job(t, 3, 0, &cfg);
        let dead = s.ranks[1];
        s.session_closed(t, dead);
        let r = regroup(decide(t, &s, &cfg));
        assert_eq!(r.generation, Generation(2));
        assert_eq!(r.removed, vec![(dead, Removal::Crashed)]);
        assert_eq!(r.ranks.len(), 2);
        apply(&mut s, &Decision::Regroup(r));
        assert_eq!(s.members[&dead].state, MemberState::Dead);
    }

    // A stopped rank sends nothing: it is caught by the heartbeat deadline, not before.
    #[test]
    fn hang_is_detected_at_the_heartbeat_timeout() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = job(t, 3, 0, &cfg);
        let hung = s.ranks[2];
        let later = t + cfg.heartbeat_timeout;
        for &id in &s.ranks.clone() {
            if id != hung {
                beat(&mut s, later, id, 1, 50, &cfg);
            }
        }
        assert_eq!(decide(later, &s, &cfg), Decision::Steady);
        let r = regroup(decide(later + Duration::from_millis(1), &s, &cfg));
        assert!(matches!(r.removed[..], [(id, Removal::Silent { .. })] if id == hung));
    }

    #[test]
    fn stalled_progress_is_a_hang_even_with_heartbeats() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = job(t, 2, 0, &cfg);
        let stuck = s.ranks[0];
        let mut now = t;
        for step in 1..=20 {
            now = t + Duration::from_millis(50 * step);
            all_beat(&mut s, now, step, &cfg);
        }
        // The stuck rank keeps heartbeating at step 20; the other goes on.
        let mut step = 20;
        while now < t + Duration::from_secs(12) {
            now += Duration::from_millis(200);
            step += 1;
            beat(&mut s, now, stuck, 20, 50, &cfg);
            let other = s.ranks[1];
            beat(&mut s, now, other, step, 50, &cfg);
        }
        let r = regroup(decide(now, &s, &cfg));
        assert!(matches!(r.removed[..], [(id, Removal::Stalled { .. })] if id == stuck));
    }

    // K-8: the split minimises the slowest rank's compute time; it always covers the batch.
    #[test]
    fn weighted_shares_are_optimal_and_cover_the_batch() {
        assert_eq!(weighted_shares(16, &[1.0, 1.0, 1.0, 1.0]), vec![4, 4, 4, 4]);
        assert_eq!(weighted_shares(16, &[1.0, 1.0, 1.0, 3.0]), vec![5, 5, 5, 1]);
        assert_eq!(weighted_shares(16, &[1.0, 1.0, 1.0, 2.0]), vec![5, 5, 4, 2]);
        assert_eq!(even_shares(10, 4), vec![3, 3, 2, 2]);
        assert!(weighted_shares(3, &[1.0; 4]).is_empty());
        // Brute force over every split of 8 micro-batches on 3 ranks.
        let speeds = [[1.0, 2.0, 3.5], [0.2, 0.9, 0.25], [1.0, 1.0, 7.0]];
        for t in speeds {
            let w = weighted_shares(8, &t);
            assert_eq!(w.iter().sum::<u32>(), 8);
            let mut best = f64::MAX;
            for a in 1..=6u32 {
                for b in 1..=(7 - a) {
                    best = best.min(makespan(&[a, b, 8 - a - b], &t));
                }
            }
            assert!((makespan(&w, &t) - best).abs() < 1e-12, "{w:?} for {t:?}");
        }
    }

    #[test]
    fn spare_is_promoted_and_healed_from_the_leader() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = job(t, 3, 1, &cfg);
        all_beat(&mut s, t, 7, &cfg);
        let spare = *s
            .members
            .values()
            .find(|m| m.state == MemberState::Spare)
            .map(|m| &m.id)
            .unwrap();
        let dead = s.ranks[0];
        s.session_closed(t, dead);
        let r = regroup(decide(t, &s, &cfg));
        assert_eq!(r.ranks.len(), 3);
        assert_eq!(r.promoted, vec![spare]);
        assert_eq!(r.resume_step, Step(7));
        assert_eq!(r.heal, vec![(spare, Rank(0))]);
        apply(&mut s, &Decision::Regroup(r));
        assert_eq!(s.members[&spare].rank, Some(Rank(2)));
    }

    #[test]
    fn shrink_stops_at_min_world() {
        let cfg = CoreConfig {
            min_world: 2,
            ..cfg()
        };
        let t = Instant::now();
        let mut s = job(t, 3, 0, &cfg);
        let a = s.ranks[0];
        s.session_closed(t, a);
        let d = decide(t, &s, &cfg);
        apply(&mut s, &d);
        assert_eq!(s.world(), 2);
        let b = s.ranks[0];
        s.session_closed(t, b);
        match decide(t, &s, &cfg) {
            Decision::Halt { reason } => assert!(reason.contains("min_world = 2"), "{reason}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn split_brain_majority_silence_is_held() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = job(t, 5, 0, &cfg);
        let later = t + cfg.heartbeat_timeout + Duration::from_millis(10);
        // Only two of five ranks are heard from.
        for &id in &s.ranks.clone()[..2] {
            beat(&mut s, later, id, 1, 50, &cfg);
        }
        match decide(later, &s, &cfg) {
            Decision::Hold { reason } => assert!(reason.contains("split-brain"), "{reason}"),
            d => panic!("{d:?}"),
        }
        // Crashes seen as closed streams are not ambiguous: three of five crashing regroups.
        let mut s = job(t, 5, 0, &cfg);
        for &id in &s.ranks.clone()[..3] {
            s.session_closed(t, id);
        }
        assert_eq!(regroup(decide(t, &s, &cfg)).ranks.len(), 2);
    }

    // G-1: a fenced member's heartbeats and reports are refused; generations only increase.
    #[test]
    fn stale_generation_is_refused() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = job(t, 3, 0, &cfg);
        let hung = s.ranks[2];
        let later = t + cfg.heartbeat_timeout * 2;
        for &id in &s.ranks.clone()[..2] {
            beat(&mut s, later, id, 1, 50, &cfg);
        }
        let d = decide(later, &s, &cfg);
        let g = apply(&mut s, &d);
        assert_eq!(g, Generation(2));
        // The hung rank wakes up and heartbeats for generation 1.
        let hb = HeartbeatMsg {
            generation: Generation(1),
            step: Step(1),
            ..Default::default()
        };
        assert!(matches!(
            s.heartbeat(later, hung, &hb, &cfg),
            Err(RuntimeError::Fenced { .. })
        ));
        assert!(matches!(
            s.session_opened(later, hung),
            Err(RuntimeError::Fenced { .. })
        ));
        let alive = s.ranks[0];
        assert!(matches!(
            s.report_fault(t, alive, Generation(1), Rank(1)),
            Err(RuntimeError::StaleGeneration { .. })
        ));
        let future = HeartbeatMsg {
            generation: Generation(9),
            ..Default::default()
        };
        assert!(s.heartbeat(later, alive, &future, &cfg).is_err());
    }

    #[test]
    fn majority_of_fault_reports_evicts_the_suspect() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = job(t, 4, 0, &cfg);
        let (a, b, c, d) = (s.ranks[0], s.ranks[1], s.ranks[2], s.ranks[3]);
        s.report_fault(t, a, Generation(1), Rank(3)).unwrap();
        assert_eq!(decide(t, &s, &cfg), Decision::Steady);
        s.report_fault(t, b, Generation(1), Rank(3)).unwrap();
        let r = regroup(decide(t, &s, &cfg));
        assert!(
            matches!(&r.removed[..], [(id, Removal::Reported { by })] if *id == d && by.len() == 2)
        );
        let _ = c;
    }

    // every rank reported a different suspect (no majority): nothing happens until the
    // heartbeat deadline has passed with everyone alive, then the same members regroup.
    #[test]
    fn reports_without_a_majority_regroup_after_the_heartbeat_deadline() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = job(t, 4, 0, &cfg);
        let ids = s.ranks.clone();
        for (i, id) in ids.iter().enumerate() {
            s.report_fault(t, *id, Generation(1), Rank(((i + 1) % 4) as u32))
                .unwrap();
        }
        assert_eq!(decide(t, &s, &cfg), Decision::Steady);
        let later = t + cfg.heartbeat_timeout + Duration::from_millis(1);
        all_beat(&mut s, later, 10, &cfg);
        let r = regroup(decide(later, &s, &cfg));
        assert!(r.removed.is_empty(), "{r:?}");
        assert_eq!(r.ranks, ids);
        assert!(r.reason.contains("no agreed suspect"), "{}", r.reason);
        apply(&mut s, &Decision::Regroup(r));
        assert_eq!(decide(later, &s, &cfg), Decision::Steady);
    }

    // a rank that restarted its compute reports itself; the job regroups with the same
    // members, and the other ranks' reports of it do not evict it.
    #[test]
    fn self_report_regroups_without_evicting() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = job(t, 3, 0, &cfg);
        let (a, b, c) = (s.ranks[0], s.ranks[1], s.ranks[2]);
        s.report_fault(t, c, Generation(1), Rank(2)).unwrap();
        s.report_fault(t, a, Generation(1), Rank(2)).unwrap();
        s.report_fault(t, b, Generation(1), Rank(2)).unwrap();
        let r = regroup(decide(t, &s, &cfg));
        assert!(r.removed.is_empty(), "{r:?}");
        assert_eq!(r.ranks, vec![a, b, c]);
        assert_eq!(r.generation, Generation(2));
        assert!(r.reason.contains("asked for a regroup"), "{}", r.reason);
        apply(&mut s, &Decision::Regroup(r));
        assert_eq!(decide(t, &s, &cfg), Decision::Steady);
    }

    #[test]
    fn rejoin_after_restart_keeps_the_generation() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = job(t, 2, 0, &cfg);
        let (a, b) = (s.ranks[0], s.ranks[1]);
        // The coordinator restarts from its journal.
        s.await_rejoin(t, &cfg);
        let mut ra = reg(Role::Active);
        ra.rejoin = Some((a, Generation(1), Rank(0)));
        assert!(s.register(t, ra, &cfg).unwrap().rejoined);
        s.session_opened(t, a).unwrap();
        let mut rb = reg(Role::Active);
        rb.rejoin = Some((b, Generation(1), Rank(1)));
        assert!(s.register(t, rb, &cfg).unwrap().rejoined);
        s.session_opened(t, b).unwrap();
        assert_eq!(
            decide(t + Duration::from_secs(1), &s, &cfg),
            Decision::Steady
        );
        assert_eq!(s.generation, Generation(1));
        // A member that never comes back is removed once the grace has passed.
        let mut s2 = job(t, 2, 0, &cfg);
        s2.await_rejoin(t, &cfg);
        let mut ra = reg(Role::Active);
        ra.rejoin = Some((s2.ranks[0], Generation(1), Rank(0)));
        s2.register(t, ra, &cfg).unwrap();
        s2.session_opened(t, s2.ranks[0]).unwrap();
        let late = t + cfg.rejoin_grace + Duration::from_millis(1);
        let first = s2.ranks[0];
        beat(&mut s2, late, first, 1, 50, &cfg);
        let r = regroup(decide(late, &s2, &cfg));
        assert_eq!(r.removed[0].1, Removal::NotRejoined);
    }

    #[test]
    fn scale_and_drain_bounds() {
        let cfg = CoreConfig {
            max_world: 8,
            ..cfg()
        };
        let t = Instant::now();
        let mut s = job(t, 2, 2, &cfg);
        assert!(s.scale(0, &cfg).is_err());
        assert!(s.scale(9, &cfg).is_err());
        s.scale(4, &cfg).unwrap();
        let r = regroup(decide(t, &s, &cfg));
        assert_eq!(r.ranks.len(), 4);
        assert_eq!(r.heal.len(), 2);
        apply(&mut s, &Decision::Regroup(r));
        s.drain(Rank(3), &cfg).unwrap();
        let r = regroup(decide(t, &s, &cfg));
        assert_eq!(r.ranks.len(), 3);
        assert_eq!(r.removed[0].1, Removal::Drained);
        apply(&mut s, &Decision::Regroup(r));
        // The last rank cannot be drained.
        let mut one = job(t, 1, 0, &cfg);
        assert!(one.drain(Rank(0), &cfg).is_err());
        assert!(s.drain(Rank(7), &cfg).is_err());
    }

    #[test]
    fn wrong_job_and_config_are_refused() {
        let cfg = cfg();
        let t = Instant::now();
        let mut s = job(t, 1, 0, &cfg);
        let mut r = reg(Role::Spare);
        r.job_id = "other".into();
        assert!(matches!(
            s.register(t, r, &cfg),
            Err(RuntimeError::WrongJob { .. })
        ));
        let mut r = reg(Role::Spare);
        r.config_hash = "different".into();
        assert!(matches!(
            s.register(t, r, &cfg),
            Err(RuntimeError::ConfigMismatch { .. })
        ));
    }
}
