//! The launcher's progress line: step, loss, validation loss, tokens/s, ETA, world, generation
//! and the last fault with its recovery time, folded from what the job writes as it writes it
//! (rank 0's `metrics.jsonl`, the coordinator's `events.jsonl`), so the line and the report
//! read the same records. On a terminal it is the progress bar's message; elsewhere it is a
//! plain log line every `train.log_interval` steps and at every fault and recovery.

use phalanx_runtime::events::{Cause, Event, Record};
use phalanx_runtime::metrics::{FinalLine, MetricLine};
use serde::de::DeserializeOwned;
use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

/// Lines appended to a JSON-lines file since the last read: a long run's growing file is not
/// read again every tick, and a line being written is read whole the next time.
pub struct Tail {
    path: PathBuf,
    seen: u64,
}

impl Tail {
    /// From the file's current end: what an earlier job of the campaign wrote is not this
    /// job's progress (C-6).
    pub fn from_end(path: PathBuf) -> Tail {
        let seen = std::fs::metadata(&path).map_or(0, |m| m.len());
        Tail { path, seen }
    }

    /// The new whole lines that parse as `T` (others, such as a torn line, are passed over).
    pub fn read<T: DeserializeOwned>(&mut self) -> Vec<T> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if len <= self.seen || f.seek(SeekFrom::Start(self.seen)).is_err() {
            return Vec::new();
        }
        let mut tail = String::new();
        if f.read_to_string(&mut tail).is_err() {
            return Vec::new();
        }
        let whole = tail.rfind('\n').map_or(0, |i| i + 1);
        self.seen += whole as u64;
        phalanx_runtime::events::read_lines(&tail[..whole]).0
    }
}

/// The last rank the job lost, and how long until the next committed step.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub what: String,
    pub at_unix_ms: u64,
    pub recovery_ms: Option<u64>,
}

/// Commits remembered for the rate behind the ETA.
const RATE_WINDOW: usize = 20;

/// What the line shows, folded from the job's records.
#[derive(Debug, Default)]
pub struct Progress {
    /// Steps committed (the next step to train).
    pub done: u64,
    pub loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub world: usize,
    pub generation: u64,
    pub fault: Option<Fault>,
    /// Recent commits: (steps done, unix ms).
    recent: VecDeque<(u64, u64)>,
}

impl Progress {
    /// Folds a metrics line; whether it is news worth a plain line (a recovery).
    pub fn on_metric(&mut self, m: &MetricLine) -> bool {
        let MetricLine::Step(s) = m else {
            return false;
        };
        if s.loss.is_none() {
            // A restated ledger line (D-4): no figures of its own.
            return false;
        }
        self.done = self.done.max(s.step + 1);
        self.loss = s.loss.or(self.loss);
        self.val_loss = s.val_loss.or(self.val_loss);
        self.tokens_per_s = s.tokens_per_s.or(self.tokens_per_s);
        self.world = s.world_size;
        self.generation = s.generation;
        let now = s.unix_ms.unwrap_or(0);
        if now > 0 {
            self.recent.push_back((self.done, now));
            if self.recent.len() > RATE_WINDOW {
                self.recent.pop_front();
            }
        }
        match &mut self.fault {
            Some(f) if f.recovery_ms.is_none() && now >= f.at_unix_ms => {
                f.recovery_ms = Some(now - f.at_unix_ms);
                true
            }
            _ => false,
        }
    }

    /// Folds an event; whether it is news worth a plain line (a fault).
    pub fn on_event(&mut self, r: &Record) -> bool {
        if let Some(what) = fault_words(r) {
            self.fault = Some(Fault {
                what,
                at_unix_ms: r.unix_ms,
                recovery_ms: None,
            });
            return true;
        }
        match &r.event {
            Event::Generation(g) => {
                self.world = g.world;
                self.generation = g.generation.0;
                false
            }
            _ => false,
        }
    }

    /// Seconds left at the rate of the recent commits.
    pub fn eta_s(&self, max_steps: u64) -> Option<f64> {
        let (&(d0, t0), &(d1, t1)) = (self.recent.front()?, self.recent.back()?);
        if d1 <= d0 || t1 <= t0 {
            return None;
        }
        let per_step_s = (t1 - t0) as f64 / 1e3 / (d1 - d0) as f64;
        Some(max_steps.saturating_sub(self.done) as f64 * per_step_s)
    }

    pub fn line(&self, max_steps: u64) -> String {
        let mut parts = vec![format!("step {}/{max_steps}", self.done)];
        if let Some(l) = self.loss {
            parts.push(format!("loss {l:.4}"));
        }
        if let Some(v) = self.val_loss {
            parts.push(format!("val {v:.4}"));
        }
        if let Some(t) = self.tokens_per_s {
            parts.push(format!("{t:.0} tok/s"));
        }
        if let Some(s) = self.eta_s(max_steps) {
            parts.push(format!("ETA {}", duration_words(s)));
        }
        if self.world > 0 {
            parts.push(format!("world {} gen {}", self.world, self.generation));
        }
        if let Some(f) = &self.fault {
            parts.push(match f.recovery_ms {
                Some(ms) => format!(
                    "last fault: {}, training again after {:.1} s",
                    f.what,
                    ms as f64 / 1e3
                ),
                None => format!("last fault: {}, recovering", f.what),
            });
        }
        parts.join(" | ")
    }
}

/// "rank 2 crashed": a rank lost to a fault, in words; None for any other record (a drain or
/// a scale-down is no fault). The progress line and `phalanx plot` label faults with it.
pub fn fault_words(r: &Record) -> Option<String> {
    let (Event::RankFailed(x) | Event::RankRemoved(x)) = &r.event else {
        return None;
    };
    if matches!(x.cause, Cause::Drained | Cause::ScaledDown) {
        return None;
    }
    let who = x
        .rank
        .map_or(format!("member {}", x.member), |r| format!("rank {r}"));
    Some(format!("{who} {}", cause_words(x.cause)))
}

/// A rank lost at `unix_ms` (for the tests of the readers of the records).
#[cfg(test)]
pub fn rank_failed(member: u64, rank: u32, cause: Cause, unix_ms: u64) -> Record {
    use phalanx_runtime::events::Removed;
    use phalanx_runtime::ids::{Generation, Rank};
    Record {
        unix_ms,
        t_ms: None,
        event: Event::RankFailed(Removed {
            member,
            rank: Some(Rank(rank)),
            host: "h".into(),
            pid: 1,
            generation: Generation(1),
            reason: String::new(),
            cause,
            detect_ms: None,
        }),
    }
}

fn cause_words(c: Cause) -> &'static str {
    match c {
        Cause::Crashed => "crashed",
        Cause::Silent => "went silent",
        Cause::Stalled => "stalled",
        Cause::Reported => "reported by its peers",
        Cause::NotRejoined => "did not rejoin",
        Cause::Straggler => "evicted as a straggler",
        Cause::Drained => "drained",
        Cause::ScaledDown => "scaled down",
    }
}

/// "42s", "3m05s", "2h07m".
pub fn duration_words(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The launcher's view of a running job: the tails of its logs and the line they fold into.
pub struct Watch {
    metrics: Tail,
    events: Tail,
    pub progress: Progress,
    /// Steps done when the last plain line was written.
    printed: Option<u64>,
}

/// What one poll of the logs found.
#[derive(Default)]
pub struct Polled {
    /// Rank 0's final line: the job is done.
    pub final_line: Option<FinalLine>,
    /// A fault or a recovery was read.
    pub news: bool,
}

impl Watch {
    pub fn new(run_dir: &std::path::Path) -> Watch {
        Watch {
            metrics: Tail::from_end(run_dir.join("metrics.jsonl")),
            events: Tail::from_end(run_dir.join("events.jsonl")),
            progress: Progress::default(),
            printed: None,
        }
    }

    pub fn poll(&mut self) -> Polled {
        let mut p = Polled::default();
        for r in self.events.read::<Record>() {
            p.news |= self.progress.on_event(&r);
        }
        for m in self.metrics.read::<MetricLine>() {
            if let MetricLine::Final(f) = &m {
                p.final_line = Some(f.clone());
            }
            p.news |= self.progress.on_metric(&m);
        }
        p
    }

    /// Whether a plain line is due: every `every` steps, and on news.
    pub fn plain_due(&mut self, every: u64, news: bool) -> bool {
        let done = self.progress.done;
        let due = news
            || match self.printed {
                None => done > 0,
                Some(last) => every > 0 && done / every > last / every,
            };
        if due {
            self.printed = Some(done);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_runtime::metrics::StepLine;

    fn step(step: u64, unix_ms: u64, val: Option<f64>) -> MetricLine {
        MetricLine::Step(StepLine {
            step,
            generation: 1,
            world_size: 4,
            unix_ms: Some(unix_ms),
            loss: Some(2.5),
            val_loss: val,
            tokens_per_s: Some(1000.0),
            ..StepLine::default()
        })
    }

    #[test]
    fn the_line_shows_the_figures_the_eta_and_the_last_fault_with_its_recovery() {
        let mut p = Progress::default();
        for s in 0..10 {
            p.on_metric(&step(s, 1_000 + s * 500, (s == 5).then_some(2.75)));
        }
        // 10 of 30 steps done at 0.5 s a step: 10 s left.
        assert_eq!(p.eta_s(30), Some(10.0));
        let line = p.line(30);
        assert!(
            line.starts_with(
                "step 10/30 | loss 2.5000 | val 2.7500 | 1000 tok/s | ETA 10s | world 4 gen 1"
            ),
            "{line}"
        );
        let lost = rank_failed(3, 2, Cause::Crashed, 6_000);
        assert!(p.on_event(&lost));
        assert!(
            p.line(30)
                .ends_with("last fault: rank 2 crashed, recovering"),
            "{}",
            p.line(30)
        );
        assert!(p.on_metric(&step(10, 6_400, None)));
        assert!(
            p.line(30).ends_with("training again after 0.4 s"),
            "{}",
            p.line(30)
        );
        assert!(
            !p.on_metric(&step(11, 6_900, None)),
            "a recovery is news once"
        );
    }

    #[test]
    fn plain_lines_come_every_interval_and_on_news() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Watch::new(d.path());
        assert!(!w.plain_due(10, false), "nothing done yet");
        w.progress.done = 3;
        assert!(w.plain_due(10, false), "the first step done");
        w.progress.done = 9;
        assert!(!w.plain_due(10, false));
        w.progress.done = 12;
        assert!(w.plain_due(10, false));
        assert!(w.plain_due(10, true));
        assert_eq!(duration_words(3725.0), "1h02m");
        assert_eq!(duration_words(65.0), "1m05s");
    }

    #[test]
    fn a_tail_reads_whole_new_lines_once() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("metrics.jsonl");
        std::fs::write(&path, format!("{}\n", step(0, 1, None).to_line())).unwrap();
        let mut t = Tail::from_end(path.clone());
        assert!(
            t.read::<MetricLine>().is_empty(),
            "an earlier job's lines are not read"
        );
        let one = step(1, 2, None).to_line();
        let (head, rest) = one.split_at(10);
        std::fs::write(&path, format!("{}\n{head}", step(0, 1, None).to_line())).unwrap();
        assert!(t.read::<MetricLine>().is_empty(), "half a line waits");
        std::fs::write(
            &path,
            format!("{}\n{head}{rest}\n", step(0, 1, None).to_line()),
        )
        .unwrap();
        assert_eq!(t.read::<MetricLine>(), vec![step(1, 2, None)]);
        assert!(t.read::<MetricLine>().is_empty());
    }
}
