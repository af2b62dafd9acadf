//! The coordinator's durable state, so that `kill -9` of the coordinator costs no step.
//!
//! Written on every membership or generation change (not per heartbeat) as JSON, to a
//! temporary file that is fsynced and renamed over the old one, then the folder is fsynced:
//! a reader sees the old journal or the new one, never a torn one.

use super::core::{Member, MemberId, MemberState, Role, State};
use crate::error::RuntimeError;
use crate::ids::{Generation, Rank, Step};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalMember {
    pub id: MemberId,
    pub host: String,
    pub pid: u32,
    pub addr: Vec<u8>,
    pub role: Role,
    pub state: MemberState,
    pub rank: Option<Rank>,
    pub step: Step,
    /// Holds the committed state (K-9); journals written before this field: the active ranks.
    #[serde(default)]
    pub holds_state: Option<bool>,
    /// SHA-256 of the member's secret: a rejoining member proves it is the same one.
    #[serde(default)]
    pub secret_digest: String,
    /// Asked to drain and not gone yet: a restarted coordinator still drains it.
    #[serde(default)]
    pub drain_requested: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalState {
    pub format: u32,
    pub job_id: String,
    pub config_hash: String,
    pub generation: Generation,
    pub committed_step: Step,
    pub target_world: usize,
    pub next_id: MemberId,
    pub ranks: Vec<MemberId>,
    pub members: Vec<JournalMember>,
    pub halted: Option<String>,
    /// The current generation's split of the global batch (empty: even).
    #[serde(default)]
    pub shares: Vec<u32>,
}

impl JournalState {
    pub fn of(s: &State) -> Self {
        let mut members: Vec<JournalMember> = s
            .members
            .values()
            // Dead spares carry nothing worth remembering.
            .filter(|m| !(m.is_fenced() && m.rank.is_none() && !s.ranks.contains(&m.id)))
            .map(|m| JournalMember {
                id: m.id,
                host: m.host.clone(),
                pid: m.pid,
                addr: m.addr.clone(),
                role: m.role,
                state: m.state,
                rank: m.rank,
                step: m.step,
                holds_state: Some(m.holds_state),
                secret_digest: m.secret_digest.clone(),
                drain_requested: m.drain_requested,
            })
            .collect();
        members.sort_by_key(|m| m.id);
        JournalState {
            format: 1,
            job_id: s.job_id.clone(),
            config_hash: s.config_hash.clone(),
            generation: s.generation,
            committed_step: s.committed_step,
            target_world: s.target_world,
            next_id: s.next_id,
            ranks: s.ranks.clone(),
            members,
            halted: s.halted.clone(),
            shares: s.shares.clone(),
        }
    }

    /// Rebuilds the state; every live member must re-register within the rejoin grace.
    pub fn restore(&self, now: Instant) -> State {
        let mut s = State::new(&self.job_id, self.target_world);
        s.config_hash.clone_from(&self.config_hash);
        s.generation = self.generation;
        s.committed_step = self.committed_step;
        s.next_id = self.next_id;
        s.ranks.clone_from(&self.ranks);
        s.halted.clone_from(&self.halted);
        s.shares.clone_from(&self.shares);
        // A restarted coordinator gives the job a full progress timeout (K-13).
        s.progress_at = (!self.ranks.is_empty()).then_some(now);
        for jm in &self.members {
            let reg = super::core::Registration {
                job_id: self.job_id.clone(),
                host: jm.host.clone(),
                pid: jm.pid,
                addr: jm.addr.clone(),
                role: jm.role,
                config_hash: self.config_hash.clone(),
                rejoin: None,
                committed_step: jm.step,
                secret_digest: jm.secret_digest.clone(),
            };
            let mut m = Member::new(jm.id, now, &reg);
            m.state = jm.state;
            m.rank = jm.rank;
            m.step = jm.step;
            m.drain_requested = jm.drain_requested;
            m.holds_state = jm
                .holds_state
                .unwrap_or(jm.state == MemberState::Active && jm.rank.is_some());
            s.newest_step = s.newest_step.max(jm.step);
            s.members.insert(jm.id, m);
        }
        s.rebuild_live();
        s
    }
}

pub struct Journal {
    path: PathBuf,
}

impl Journal {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Journal { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, reason: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Journal {
            path: self.path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    pub fn load(&self) -> Result<Option<JournalState>, RuntimeError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                self.err(format!(
                    "unreadable ({e}); move it away to start the job afresh, or restore a backup"
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    pub fn save(&self, s: &JournalState) -> Result<(), RuntimeError> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| self.err(e))?;
        let tmp = self.path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(s).map_err(|e| self.err(e))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| self.err(e))?;
        f.write_all(&bytes).map_err(|e| self.err(e))?;
        f.sync_all().map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.err(e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::core::{apply, decide, CoreConfig, Registration};

    #[test]
    fn round_trip_keeps_generation_and_ranks() {
        let cfg = CoreConfig::default();
        let t = Instant::now();
        let mut s = State::new("job", 2);
        for _ in 0..2 {
            let r = Registration {
                job_id: "job".into(),
                host: "h".into(),
                pid: 9,
                addr: vec![7; 4],
                role: Role::Active,
                config_hash: "c".into(),
                rejoin: None,
                committed_step: Step(0),
                secret_digest: "d".into(),
            };
            let id = s.register(t, r, &cfg).unwrap().id;
            s.session_opened(t, id).unwrap();
        }
        let d = decide(t, &s, &cfg);
        apply(&mut s, &d);
        let d = tempfile::tempdir().unwrap();
        let j = Journal::new(d.path().join("coord/journal.json"));
        assert!(j.load().unwrap().is_none());
        j.save(&JournalState::of(&s)).unwrap();
        let back = j.load().unwrap().unwrap();
        assert_eq!(back, JournalState::of(&s));
        let r = back.restore(t);
        assert_eq!(r.generation, Generation(1));
        assert_eq!(r.ranks, s.ranks);
        assert!(r
            .members
            .values()
            .all(|m| m.rejoin_deadline.is_none() && !m.connected));
        std::fs::write(j.path(), b"{ torn").unwrap();
        assert!(j.load().unwrap_err().to_string().contains("move it away"));
    }

    // A drain asked for before a coordinator restart is still pending after it (journaled),
    // and the admin's retry after the restart does not lower the target a second time.
    #[test]
    fn a_drain_survives_a_restart_and_its_retry_changes_nothing() {
        let cfg = CoreConfig {
            max_world: 4,
            ..CoreConfig::default()
        };
        let t = Instant::now();
        let mut s = crate::coordinator::testkit::job(t, 3, 0, &cfg);
        s.drain(Rank(2), &cfg).unwrap();
        assert_eq!(s.target_world, 2);
        let d = tempfile::tempdir().unwrap();
        let j = Journal::new(d.path().join("journal.json"));
        j.save(&JournalState::of(&s)).unwrap();
        let mut back = j.load().unwrap().unwrap().restore(t);
        assert_eq!(back.target_world, 2);
        let drained = back.ranks[2];
        assert!(back.members[&drained].drain_requested);
        back.drain(Rank(2), &cfg).unwrap();
        assert_eq!(back.target_world, 2);
    }
}
