//! The run directory: metrics.jsonl, events.jsonl and report.json.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct RunDir {
    pub dir: PathBuf,
    metrics: BufWriter<File>,
    events: BufWriter<File>,
    start: Instant,
}

pub use phalanx_runtime::events::unix_ms;
use phalanx_runtime::events::{Event, Record};
use phalanx_runtime::metrics::MetricLine;

/// Creates the run directory (and its parents), or says which path is in the way.
pub fn ensure(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the run directory {} (run.dir); it, or a parent, may be a file: \
             pick another run.dir",
            dir.display()
        )
    })
}

/// What a run directory holds that a new run would overwrite: a saved model, committed
/// checkpoints.
fn saved_work(dir: &Path) -> Option<String> {
    let newest = phalanx_checkpoint::sharded::saves(&dir.join("checkpoints"))
        .into_iter()
        .find(|s| s.2)
        .map(|s| s.0);
    let model = dir
        .join("model")
        .join(phalanx_checkpoint::MANIFEST)
        .is_file();
    match (newest, model) {
        (Some(step), _) => Some(format!("committed checkpoints up to step {step}")),
        (None, true) => Some("a saved model (model/)".into()),
        (None, false) => None,
    }
}

/// A new run in `dir` (not a resumed one): a directory holding a model or checkpoints is
/// refused unless `force` (then they go), never overwritten silently. The last run's records
/// go either way.
pub fn claim(dir: &Path, force: bool, how_to_resume: &str) -> Result<()> {
    ensure(dir)?;
    if let Some(what) = saved_work(dir) {
        if !force {
            anyhow::bail!(
                "{} holds {what}: {how_to_resume}pass --force to start over (they are deleted), \
                 or pick another run.dir",
                dir.display()
            );
        }
        for sub in ["checkpoints", "model", "history"] {
            let p = dir.join(sub);
            if p.exists() {
                std::fs::remove_dir_all(&p)
                    .with_context(|| format!("cannot remove {} (--force)", p.display()))?;
            }
        }
    }
    for f in [
        "metrics.jsonl",
        "events.jsonl",
        "report.json",
        "coordinator-journal.json",
        "fingerprints.jsonl",
        "step_times.jsonl",
        "halted.txt",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    Ok(())
}

/// The batch job this process belongs to, as the scheduler names it.
fn scheduler_job() -> Option<String> {
    ["PHALANX_JOB_INSTANCE", "SLURM_JOB_ID", "PBS_JOBID"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// A standalone coordinator (`phalanx coordinator`) starting in a run directory: a journal left
/// by another batch job of the campaign (C-6) is that job's, moved to `history/` with its
/// events and report, so this job starts fresh; a journal of this same batch job is its own
/// coordinator's, restarted after a crash (K-5), and restored. Without a scheduler's job id
/// (`SLURM_JOB_ID`, `PBS_JOBID`, or `PHALANX_JOB_INSTANCE`) a journal is always restored.
pub fn new_job_of_campaign(dir: &Path) -> Result<()> {
    let Some(job) = scheduler_job() else {
        return Ok(());
    };
    ensure(dir)?;
    let mark = dir.join("coordinator-job");
    let previous = std::fs::read_to_string(&mark).ok();
    if previous.as_deref().map(str::trim) != Some(job.as_str()) {
        archive_job(dir)?;
    }
    std::fs::write(&mark, format!("{job}\n"))
        .with_context(|| format!("cannot write {}", mark.display()))
}

/// A resumed job (C-6) keeps the campaign's `metrics.jsonl` (the loss curve and the sample
/// ledger go on) and moves the previous job's events, report and coordinator journal to
/// `history/job-<unix_ms>/`: the new job's coordinator starts fresh, its report is its own.
pub fn archive_job(dir: &Path) -> Result<()> {
    // The job's own records; fingerprints.jsonl too: its final states are this job's.
    let files = [
        "events.jsonl",
        "report.json",
        "coordinator-journal.json",
        "fingerprints.jsonl",
        "step_times.jsonl",
    ];
    if !files.iter().any(|f| dir.join(f).exists()) {
        return Ok(());
    }
    let to = dir.join("history").join(format!("job-{}", unix_ms()));
    std::fs::create_dir_all(&to).with_context(|| format!("cannot create {}", to.display()))?;
    for f in files {
        let from = dir.join(f);
        if from.exists() {
            std::fs::rename(&from, to.join(f))
                .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

impl RunDir {
    pub fn create(dir: &Path) -> Result<Self> {
        ensure(dir)?;
        let open = |name: &str| -> Result<BufWriter<File>> {
            let p = dir.join(name);
            Ok(BufWriter::new(File::create(&p).with_context(|| {
                format!("cannot create {}", p.display())
            })?))
        };
        Ok(RunDir {
            dir: dir.to_path_buf(),
            metrics: open("metrics.jsonl")?,
            events: open("events.jsonl")?,
            start: Instant::now(),
        })
    }

    pub fn metric(&mut self, line: &MetricLine) -> Result<()> {
        self.metrics.write_all(line.to_line().as_bytes())?;
        self.metrics.write_all(b"\n")?;
        Ok(())
    }

    /// One event line: its kind, wall-clock and run-relative time, and `fields`.
    pub fn event(&mut self, event: Event) -> Result<()> {
        let mut r = Record::now(event);
        r.t_ms = Some(self.start.elapsed().as_millis() as u64);
        self.events.write_all(r.to_line().as_bytes())?;
        self.events.write_all(b"\n")?;
        self.events.flush()?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.metrics.flush()?;
        self.events.flush()?;
        Ok(())
    }

    pub fn write_report(&mut self, report: &Value) -> Result<()> {
        self.flush()?;
        let p = self.dir.join("report.json");
        let tmp = self.dir.join("report.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("cannot write {}", p.display()))?;
        Ok(())
    }
}
