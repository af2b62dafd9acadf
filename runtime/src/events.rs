//! The job's event log (`events.jsonl`): one record type, written by the coordinator, the
//! launcher and the single-process trainer, and read by the report and the tests. Every line is
//! a [`Record`]: the time, and an [`Event`] tagged by `kind`. Renaming a variant or a field is a
//! change of this contract, seen by the compiler, not by a silently wrong `report.json`.

use crate::coordinator::core::{MemberId, Removal, Role, StragglerAct};
use crate::dataplane::PeerLink;
use crate::ids::{Generation, Rank, Step};
use phalanx_proto::pb;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One line of `events.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub unix_ms: u64,
    /// Milliseconds since the run started (single-process runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_ms: Option<u64>,
    #[serde(flatten)]
    pub event: Event,
}

impl Record {
    pub fn now(event: Event) -> Self {
        Record {
            unix_ms: unix_ms(),
            t_ms: None,
            event,
        }
    }

    /// The JSON line (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            // Every field is plain data; this cannot fail, but a log line must never panic.
            format!(r#"{{"kind":"unwritable","error":"{e}"}}"#)
        })
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads an event log: the records it holds, and how many lines were not records (a torn last
/// line after a crash, or a line from another version), which a reader reports rather than
/// trusts.
pub fn read(text: &str) -> (Vec<Record>, usize) {
    read_lines(text)
}

/// Opens a JSON-lines file to append records to, creating it. A line left torn by a writer
/// killed in the middle of its write (the kernel may cut an append short when SIGKILL arrives;
/// measured here, about one kill in ten during writes) is ended first: else the next record
/// would be glued to it and both lost to a reader, a committed step's ledger record among them.
pub fn append_lines(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let len = f.metadata()?.len();
    let mut last = [b'\n'];
    if len > 0 {
        f.read_exact_at(&mut last, len - 1)?;
    }
    if last[0] != b'\n' {
        // A live writer appending meanwhile ends its own line: this then adds an empty one,
        // which readers skip.
        f.write_all(b"\n")?;
    }
    Ok(f)
}

/// The lines of a JSON-lines text that are `T`, and how many non-empty lines were not.
pub fn read_lines<T: serde::de::DeserializeOwned>(text: &str) -> (Vec<T>, usize) {
    let mut bad = 0;
    let items = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str::<T>(l).map_err(|_| bad += 1).ok())
        .collect();
    (items, bad)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    // --- the coordinator ---
    CoordinatorStarted(Started),
    CoordinatorRestarted(Started),
    CoordinatorStopped {},
    /// The coordinator itself stalled (K-11).
    CoordinatorStalled {
        generation: Generation,
        stalled_ms: u64,
    },
    Registered(Joined),
    Rejoined(Joined),
    RegisterRefused {
        host: String,
        pid: u32,
        error: String,
    },
    ConfigHashPinned {
        member: MemberId,
        host: String,
        config_hash: String,
    },
    SessionOpened {
        member: MemberId,
    },
    SessionClosed {
        member: MemberId,
        error: Option<String>,
    },
    FaultReported {
        reporter: MemberId,
        generation: Generation,
        suspect_rank: u32,
        fault: ReportedFault,
        detail: String,
        step: u64,
    },
    /// Requests refused for one reason, counted over about a second (K-12).
    RequestRefused {
        reason: String,
        member: Option<MemberId>,
        count: u64,
    },
    Scale {
        target_world: usize,
    },
    ScaleRefused {
        target_world: usize,
        error: String,
    },
    Drain {
        rank: Rank,
    },
    DrainRefused {
        rank: Rank,
        error: String,
    },
    GroupLinks {
        member: MemberId,
        generation: Generation,
        address: Option<String>,
        links: Vec<PeerLink>,
        rank: Rank,
        host: Option<String>,
        summary: String,
    },
    StragglerFlagged(Flagged),
    StragglerCleared {
        member: MemberId,
        mb_ms: f64,
        peers_mb_ms: f64,
    },
    Generation(GenerationFormed),
    RankFailed(Removed),
    RankRemoved(Removed),
    Hold {
        generation: Generation,
        reason: String,
    },
    Halt {
        generation: Generation,
        reason: String,
    },
    JournalError {
        error: String,
    },
    /// Every part of a sharded checkpoint was durable and rank 0 wrote its manifest (C-5):
    /// `stage_ms` is the longest the training loop waited for a snapshot, `drain_ms` the
    /// longest background write of a part.
    CheckpointCommitted {
        step: u64,
        world: u32,
        bytes: u64,
        stage_ms: f64,
        drain_ms: f64,
    },
    /// A rank could not write its part of a save (disk full, an I/O error) after its retries:
    /// the save is not committed; training goes on and the next interval saves again.
    CheckpointFailed {
        step: u64,
        rank: u32,
        error: String,
    },
    /// A save that lost a rank before every part was durable: it is never committed.
    CheckpointAborted {
        step: u64,
        generation: Generation,
        voted: u32,
        world: u32,
    },
    DecisionLoopPanicked {
        panic: String,
    },
    // --- the launcher ---
    Launch {
        nproc: usize,
        spares: usize,
        threads_per_rank: usize,
        hosts: Option<Vec<LaunchedHost>>,
    },
    WorkerExit {
        pid: u32,
        code: Option<i32>,
        spare: bool,
    },
    FaultInjected(Injected),
    FaultCleared(Cleared),
    NoiseBurst {
        from_unix_ms: u64,
        to_unix_ms: u64,
        pid: u32,
    },
    // --- a single-process run ---
    RunStarted {
        world_size: usize,
        params: i64,
        device: String,
        threads: usize,
        max_steps: u64,
    },
    Eval {
        step: u64,
        val_loss: f64,
    },
    StepSkipped {
        step: u64,
        loss: String,
        reason: String,
    },
    Checkpoint {
        step: u64,
        dir: PathBuf,
        stall_ms: f64,
    },
    Interrupted {
        step: u64,
    },
    RunFinished {
        status: String,
        steps: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub job: String,
    pub generation: Generation,
    pub target_world: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Joined {
    pub member: MemberId,
    pub host: String,
    pub pid: u32,
    pub address: String,
    pub role: Role,
    pub generation: Generation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flagged {
    pub member: MemberId,
    pub mb_ms: f64,
    pub peers_mb_ms: f64,
    pub baseline_mb_ms: Option<f64>,
    pub slow_steps: u32,
    pub slow_for_ms: u64,
    pub severe_for_ms: u64,
    pub at_step: u64,
    pub window_mb_ms: Vec<f64>,
    pub recent_mb_ms: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationFormed {
    pub generation: Generation,
    pub world: usize,
    pub members: Vec<MemberId>,
    pub promoted: Vec<MemberId>,
    pub resume_step: Step,
    pub heal: Vec<(MemberId, Rank)>,
    /// For people; readers use `straggler` and the removal events, never this text.
    pub reason: String,
    pub shares: Vec<u32>,
    pub straggler: Option<StragglerAct>,
}

/// A rank out of the job: failed (fenced for good) or removed on purpose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removed {
    pub member: MemberId,
    pub rank: Option<Rank>,
    pub host: String,
    pub pid: u32,
    pub generation: Generation,
    pub reason: String,
    pub cause: Cause,
    /// From the first sign of the fault to the decision.
    pub detect_ms: Option<f64>,
}

/// Why a rank left (the kind of a [`Removal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    Crashed,
    Silent,
    Stalled,
    Reported,
    NotRejoined,
    Straggler,
    Drained,
    ScaledDown,
}

impl From<&Removal> for Cause {
    fn from(r: &Removal) -> Self {
        match r {
            Removal::Crashed => Cause::Crashed,
            Removal::Silent { .. } => Cause::Silent,
            Removal::Stalled { .. } => Cause::Stalled,
            Removal::Reported { .. } => Cause::Reported,
            Removal::NotRejoined => Cause::NotRejoined,
            Removal::Straggler { .. } => Cause::Straggler,
            Removal::Drained => Cause::Drained,
            Removal::ScaledDown => Cause::ScaledDown,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchedHost {
    pub host: String,
    pub address: String,
    pub pids: Vec<u32>,
}

/// What the launcher (or a test) did to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    Sigkill,
    Sigstop,
    CpuQuota,
    HostLost,
    HostPartition,
    SpareRestart,
    /// The coordinator process SIGKILLed (and started again from its journal).
    CoordinatorKill,
    /// A byte flipped in a part of the newest committed checkpoint.
    CheckpointCorrupt,
    /// Every worker process of the job SIGKILLed at once: the job dies whole.
    JobKilled,
    /// The checkpoint disk filled up (and later emptied again).
    DiskFull,
    /// A host's links to the others slowed down (latency added, bandwidth capped) for a while.
    SlowLink,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Injected {
    pub fault: FaultKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Every process of a host fault, and the ranks they held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<u32>,
    /// The newest committed step when it was injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pct: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_ms: Option<u64>,
    /// The file or directory a storage fault struck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A slow link's added latency each way, and its bandwidth (0: not capped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_mbit_s: Option<u32>,
    pub injected_unix_ms: u64,
    /// The signal or rule took effect.
    pub ok: bool,
}

impl Injected {
    /// A fault with only its kind and time set; the rest is filled in by the caller.
    pub fn of(fault: FaultKind, ok: bool) -> Self {
        Injected {
            fault,
            rank: None,
            pid: None,
            host: None,
            pids: Vec::new(),
            ranks: Vec::new(),
            step: None,
            cpu_pct: None,
            for_ms: None,
            path: None,
            delay_ms: None,
            rate_mbit_s: None,
            injected_unix_ms: unix_ms(),
            ok,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cleared {
    pub fault: FaultKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_unix_ms: Option<u64>,
}

/// What a rank reported about its group (`pb::ReportedFault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedFault {
    PeerFailed,
    Timeout,
    Restarted,
    GroupFailed,
    /// A report from a client that named no kind.
    Unspecified,
}

impl From<pb::ReportedFault> for ReportedFault {
    fn from(k: pb::ReportedFault) -> Self {
        match k {
            pb::ReportedFault::PeerFailed => ReportedFault::PeerFailed,
            pb::ReportedFault::Timeout => ReportedFault::Timeout,
            pb::ReportedFault::Restarted => ReportedFault::Restarted,
            pb::ReportedFault::GroupFailed => ReportedFault::GroupFailed,
            pb::ReportedFault::Unspecified => ReportedFault::Unspecified,
        }
    }
}

impl Cleared {
    /// A fault cleared now.
    pub fn of(fault: FaultKind) -> Self {
        Cleared {
            fault,
            pid: None,
            host: None,
            step: None,
            cleared_unix_ms: Some(unix_ms()),
        }
    }
}

impl Event {
    /// The `kind` tag as written (for logs).
    pub fn kind(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string))
            .unwrap_or_default()
    }

    /// Faults and membership changes (logged at info; routine session traffic at debug).
    pub fn is_notable(&self) -> bool {
        matches!(
            self,
            Event::RankFailed(_)
                | Event::RankRemoved(_)
                | Event::Generation(_)
                | Event::Hold { .. }
                | Event::Halt { .. }
                | Event::RequestRefused { .. }
                | Event::StragglerFlagged(_)
                | Event::StragglerCleared { .. }
                | Event::JournalError { .. }
                | Event::CoordinatorStalled { .. }
                | Event::ConfigHashPinned { .. }
                | Event::DecisionLoopPanicked { .. }
                | Event::CheckpointCommitted { .. }
                | Event::CheckpointAborted { .. }
                | Event::CheckpointFailed { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // D-4: a record appended after a writer was killed mid-line starts a line of its own, so
    // the torn line alone is lost (and counted), not the record after it; a whole last line
    // gets no empty line after it.
    #[test]
    fn a_torn_last_line_is_ended_before_the_next_record() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metrics.jsonl");
        let whole = Record::now(Event::CoordinatorStopped {}).to_line();
        std::fs::write(&p, format!("{whole}\n{}", &whole[..whole.len() / 2])).unwrap();
        writeln!(append_lines(&p).unwrap(), "{whole}").unwrap();
        let (back, bad) = read(&std::fs::read_to_string(&p).unwrap());
        assert_eq!((back.len(), bad), (2, 1));
        writeln!(append_lines(&p).unwrap(), "{whole}").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains("\n\n"), "{text}");
        assert_eq!(read(&text), (vec![back[0].clone(); 3], 1));
        let fresh = d.path().join("new.jsonl");
        writeln!(append_lines(&fresh).unwrap(), "{whole}").unwrap();
        assert_eq!(
            std::fs::read_to_string(&fresh).unwrap(),
            format!("{whole}\n")
        );
    }

    // Every line round-trips, and the wire shape is the one readers (and older logs) know:
    // `kind` in snake case beside the event's own fields.
    #[test]
    fn records_round_trip_with_their_kind_beside_their_fields() {
        let r = Record::now(Event::RankFailed(Removed {
            member: 3,
            rank: Some(Rank(1)),
            host: "h".into(),
            pid: 9,
            generation: Generation(2),
            reason: "session stream closed".into(),
            cause: Cause::NotRejoined,
            detect_ms: Some(1.5),
        }));
        let line = r.to_line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["kind"], "rank_failed");
        assert_eq!(v["cause"], "not_rejoined");
        assert_eq!(v["rank"], 1);
        assert!(v["unix_ms"].as_u64().unwrap() > 0);
        let (back, bad) = read(&format!("{line}\n{{\"kind\":\"no_such\"}}\n{{torn"));
        assert_eq!((back, bad), (vec![r], 2));
        let mut f = Injected::of(FaultKind::Sigkill, true);
        f.rank = Some(1);
        let v = serde_json::to_value(Record::now(Event::FaultInjected(f))).unwrap();
        assert_eq!(v["kind"], "fault_injected");
        assert_eq!(v["fault"], "sigkill");
        assert!(v.get("pids").is_none(), "{v}");
        assert_eq!(Event::CoordinatorStopped {}.kind(), "coordinator_stopped");
    }
}
