//! The resident memory of the launcher (which hosts the coordinator) and of every process it
//! started, sampled while a chaos run goes on: a soak must leave them flat, and a leak shows
//! only over minutes. Written to `rss.jsonl` in the run directory; summed up per process.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One process's resident memory at one time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RssSample {
    pub unix_ms: u64,
    pub pid: u32,
    /// The launcher itself, or a process it started (a worker).
    pub launcher: bool,
    pub rss_kib: u64,
}

/// A long-lived process's memory a third into the run and at the end.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RssSpan {
    pub pid: u32,
    pub launcher: bool,
    pub start_kib: u64,
    pub end_kib: u64,
    pub lived_s: f64,
}

/// How often a chaos run samples.
pub const EVERY: Duration = Duration::from_secs(2);

/// Samples until dropped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    pub fn start(run_dir: &Path, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let path = run_dir.join("rss.jsonl");
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || sample_until(&path, every, &s))
            .ok();
        Sampler { stop, thread }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sample_until(path: &PathBuf, every: Duration, stop: &AtomicBool) {
    let me = std::process::id();
    // Not at once: the launch empties the run directory as it starts.
    let mut next = Instant::now() + every;
    while !stop.load(Ordering::SeqCst) {
        if Instant::now() >= next {
            next += every;
            let now = phalanx_runtime::events::unix_ms();
            let mut lines = String::new();
            for pid in std::iter::once(me).chain(descendants(me)) {
                if let Some(kib) = rss_kib(pid) {
                    let s = RssSample {
                        unix_ms: now,
                        pid,
                        launcher: pid == me,
                        rss_kib: kib,
                    };
                    lines.push_str(&serde_json::to_string(&s).unwrap_or_default());
                    lines.push('\n');
                }
            }
            // The run directory is emptied at the launch's start: append, creating it anew.
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = f.write_all(lines.as_bytes());
            }
        }
        std::thread::sleep(every.min(Duration::from_millis(100)));
    }
}

/// Every process below `root` (workers run under `ip netns exec` on simulated hosts).
fn descendants(root: u32) -> Vec<u32> {
    let mut parent = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(pp) = ppid(pid) {
            parent.insert(pid, pp);
        }
    }
    let below = |mut p: u32| {
        for _ in 0..16 {
            match parent.get(&p) {
                Some(&pp) if pp == root => return true,
                Some(&pp) if pp > 1 => p = pp,
                _ => return false,
            }
        }
        false
    };
    parent.keys().copied().filter(|&p| below(p)).collect()
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The processes that lived through the last two thirds of the run (a rank's memory grows for
/// minutes as it first trains, saves, evaluates and heals; a leak keeps growing after): each
/// one's memory at its first sample a third into the run and at its last.
pub fn spans(samples: &[RssSample]) -> Vec<RssSpan> {
    let (Some(t0), Some(t1)) = (
        samples.iter().map(|s| s.unix_ms).min(),
        samples.iter().map(|s| s.unix_ms).max(),
    ) else {
        return Vec::new();
    };
    let from = t0 + (t1 - t0) / 3;
    // Alive at the end: sampled in the last two rounds.
    let to = t1.saturating_sub(2 * EVERY.as_millis() as u64);
    let mut by_pid: BTreeMap<u32, Vec<&RssSample>> = BTreeMap::new();
    for s in samples {
        by_pid.entry(s.pid).or_default().push(s);
    }
    by_pid
        .into_iter()
        .filter_map(|(pid, v)| {
            let (first, last) = (v.first()?, v.last()?);
            if first.unix_ms > from || last.unix_ms < to {
                return None;
            }
            let lived = Duration::from_millis(last.unix_ms - first.unix_ms);
            let start = v.iter().find(|s| s.unix_ms >= from).unwrap_or(first);
            Some(RssSpan {
                pid,
                launcher: first.launcher,
                start_kib: start.rss_kib,
                end_kib: last.rss_kib,
                lived_s: lived.as_secs_f64(),
            })
        })
        .collect()
}

pub fn read(run_dir: &Path) -> Vec<RssSample> {
    std::fs::read_to_string(run_dir.join("rss.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: u64, pid: u32, kib: u64) -> RssSample {
        RssSample {
            unix_ms: t * 1000,
            pid,
            launcher: pid == 1,
            rss_kib: kib,
        }
    }

    // A span starts a third into the run and ends at the process's last sample; processes born
    // after that point (a spare started late) or gone before the end (a killed rank) are left
    // out.
    #[test]
    fn spans_cover_processes_alive_through_the_last_two_thirds() {
        let v = vec![
            s(0, 1, 100),
            s(0, 7, 50),
            s(10, 1, 300),
            s(10, 7, 60),
            s(20, 9, 70),
            s(40, 1, 310),
            s(40, 9, 80),
            s(50, 11, 80),
            s(90, 1, 320),
            s(90, 9, 90),
            s(90, 11, 95),
        ];
        let sp = spans(&v);
        assert_eq!(sp.len(), 2, "{sp:?}");
        assert_eq!((sp[0].pid, sp[0].start_kib, sp[0].end_kib), (1, 310, 320));
        assert!(sp[0].launcher);
        assert_eq!((sp[1].pid, sp[1].start_kib, sp[1].end_kib), (9, 80, 90));
        assert!(spans(&[]).is_empty());
    }

    // The sampler finds this process and a child it started, with their memory.
    #[test]
    fn the_sampler_sees_the_launcher_and_its_children() {
        let d = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let s = Sampler::start(d.path(), Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(400));
        drop(s);
        let _ = child.kill();
        let _ = child.wait();
        let v = read(d.path());
        assert!(v.iter().any(|x| x.launcher && x.rss_kib > 0), "{v:?}");
        assert!(
            v.iter().any(|x| x.pid == child.id() && !x.launcher),
            "{v:?}"
        );
    }
}
