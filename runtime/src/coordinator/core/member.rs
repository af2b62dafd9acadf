//! A member of the job as the coordinator sees it, and what it reports.

use super::*;

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
            // A worker resumed from a checkpoint (C-6) starts at its step.
            step: req.committed_step,
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
