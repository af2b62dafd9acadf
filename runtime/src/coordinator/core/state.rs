//! The coordinator's state and the events applied to it.

use super::*;

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
    pub(super) fn available_spares(&self, now: Instant, cfg: &CoreConfig) -> Vec<MemberId> {
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
                // A spare holds no place in any generation: whichever it last saw, it is back
                // as the spare it was (one that waited through a regroup was refused once, and
                // its process restarted for nothing).
                // An active member that names an older generation missed a regroup that kept
                // it (one formed while it was away): its place is the current one, and the
                // data plane heals it if it is behind (G-2).
                let missed_a_regroup = generation < self.generation
                    && m.state == MemberState::Active
                    && self.ranks.contains(&id);
                let same_place = m.state == MemberState::Spare
                    || missed_a_regroup
                    || (generation == self.generation
                        && (m.state != MemberState::Active || m.rank == Some(rank)));
                if m.rejoin_deadline.is_some() && !same_place {
                    return Err(RuntimeError::StaleGeneration {
                        got: generation,
                        current: self.generation,
                    });
                }
                // Awaited after a restart or a stall (K-5, K-11), or not yet: a member whose
                // stream broke may re-register before the coordinator reads the stream's end
                // (it wakes from a stall to both at once). Either way it keeps its place. Not
                // awaited, it keeps it whatever generation it names: it is retrying a
                // registration whose answer it lost while a regroup went on, and the session
                // it opens is sent the current assignment. Registered anew, its old self would
                // stay in the group, silent, and be evicted (or hold the job, when every rank
                // did so at once).
                if same_place || m.rejoin_deadline.is_none() {
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
        // K-11: a member with an open session is back, whatever was awaited of it. Waking from
        // a stall, the coordinator may read a member's re-registration, then the end of the
        // stream it replaces (which sets a deadline to re-register, already met), then its
        // new session: the deadline must not outlive the session and evict a training rank.
        m.rejoin_deadline = None;
        self.sync_live(id);
        Ok(())
    }

    /// K-13: once every rank of the generation finished (done, or stopped on request), the
    /// connected spares have nothing left to wait for: under a scheduler (srun, mpiexec) the
    /// batch job would otherwise run to its time limit.
    pub fn spares_after_the_end(&self) -> Vec<MemberId> {
        if self.live.is_empty() || !self.live.iter().all(|l| l.done) {
            return Vec::new();
        }
        self.members
            .values()
            .filter(|m| m.state == MemberState::Spare && m.connected)
            .map(|m| m.id)
            .collect()
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
            quiet_since: quiet_until
                .filter(|&t| now < t)
                .map(|t| t - cfg.straggler.startup_grace),
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

    /// The rank a member holds in the current generation (drain by member).
    pub fn rank_of(&self, id: MemberId) -> Result<Rank, RuntimeError> {
        match self.ranks.iter().position(|&r| r == id) {
            Some(r) => Ok(Rank(r as u32)),
            None => Err(RuntimeError::InvalidRequest {
                what: format!(
                    "member {id} holds no rank in generation {} (a spare, or gone); \
                     `phalanx status` lists the members and their ranks",
                    self.generation
                ),
            }),
        }
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
