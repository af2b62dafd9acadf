//! `step_times.jsonl`: every rank's own time in every step, from its heartbeats, for the
//! per-rank heat map of a run. A file that cannot be written costs the job nothing.

use super::core::{MemberId, StepSample};
use crate::ids::{Generation, Rank};
use crate::metrics::RankStepLine;
use parking_lot::Mutex;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use tracing::warn;

#[derive(Default)]
pub struct StepTimes {
    out: Mutex<Option<BufWriter<File>>>,
}

impl StepTimes {
    /// Appends to `path`; without one (or if it cannot be opened) records nothing.
    pub fn open(path: Option<&Path>) -> StepTimes {
        let out = path.and_then(|p| {
            crate::events::append_lines(p)
                .map_err(|e| warn!(path = %p.display(), error = %e, "no step_times.jsonl"))
                .ok()
        });
        StepTimes {
            out: Mutex::new(out.map(BufWriter::new)),
        }
    }

    /// The steps one heartbeat carried, of the rank `member` is in `generation`.
    pub fn record(
        &self,
        unix_ms: u64,
        member: MemberId,
        rank: Rank,
        generation: Generation,
        samples: &[StepSample],
    ) {
        let mut out = self.out.lock();
        let Some(w) = out.as_mut() else {
            return;
        };
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let mut ok = true;
        for s in samples {
            let line = RankStepLine {
                unix_ms,
                member,
                rank: rank.0,
                generation: generation.0,
                step: s.step.0,
                compute_ms: ms(s.compute),
                fixed_ms: ms(s.fixed),
                micro_batches: s.micro_batches,
            };
            ok &= serde_json::to_writer(&mut *w, &line).is_ok() && w.write_all(b"\n").is_ok();
        }
        if !(ok && w.flush().is_ok()) {
            warn!("cannot write step_times.jsonl; per-rank step times stop here");
            *out = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Step;
    use std::time::Duration;

    #[test]
    fn each_step_of_a_heartbeat_is_a_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("step_times.jsonl");
        let t = StepTimes::open(Some(&p));
        let sample = |step| StepSample {
            step: Step(step),
            compute: Duration::from_millis(30),
            fixed: Duration::from_millis(10),
            micro_batches: 4,
        };
        t.record(5, 3, Rank(1), Generation(2), &[sample(7), sample(8)]);
        let (lines, bad) =
            crate::events::read_lines::<RankStepLine>(&std::fs::read_to_string(&p).unwrap());
        assert_eq!(bad, 0);
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[1].step, lines[1].rank, lines[1].member), (8, 1, 3));
        assert_eq!(lines[0].ms_per_micro_batch(), 10.0);
        StepTimes::open(None).record(5, 3, Rank(1), Generation(2), &[sample(1)]);
    }
}
