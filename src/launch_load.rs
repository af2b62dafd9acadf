//! Periodic faults and background load for `phalanx launch`: a SIGKILL of an active rank every
//! so often, a spare process restarted every so often, and a noisy neighbour (a busy-loop
//! process that takes one core in bursts). Each is recorded in events.jsonl.

use crate::run_dir::unix_ms;
use anyhow::{bail, Context, Result};
use phalanx_runtime::events::{Event, FaultKind, Injected};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Something that fires every `every`, the first time one period after the start.
pub struct Periodic {
    every: Duration,
    next: Instant,
    pub fired: u32,
}

impl Periodic {
    pub fn new(every: Duration, start: Instant) -> Self {
        Periodic {
            every,
            next: start + every,
            fired: 0,
        }
    }

    /// True once per period; a late check does not fire twice to catch up.
    pub fn due(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + self.every;
        self.fired += 1;
        true
    }
}

/// A noisy neighbour: `busy` of one busy core every `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Noise {
    pub busy: Duration,
    pub period: Duration,
}

impl Noise {
    /// From `BUSY_MS:PERIOD_MS` (e.g. `2000:10000`).
    pub fn parse(s: &str) -> Result<Self> {
        let (b, p) = s
            .split_once(':')
            .context("--noise takes BUSY_MS:PERIOD_MS, e.g. 2000:10000")?;
        let busy: u64 = b.parse().context("--noise: BUSY_MS must be a number")?;
        let period: u64 = p.parse().context("--noise: PERIOD_MS must be a number")?;
        if busy == 0 || period <= busy {
            bail!("--noise {s}: BUSY_MS must be > 0 and below PERIOD_MS");
        }
        Ok(Noise {
            busy: Duration::from_millis(busy),
            period: Duration::from_millis(period),
        })
    }
}

fn event(run_dir: &Path, event: Event) {
    if let Err(e) = crate::launch::append_event(run_dir, event) {
        tracing::warn!(error = %e, "cannot write events.jsonl");
    }
}

/// Runs the noisy neighbour on its own thread until `stop`: each burst is a separate process
/// (`sh` in a busy loop) that the kernel schedules like any other tenant of the machine.
pub fn start_noise(
    n: Noise,
    run_dir: PathBuf,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let body = move || {
        let mut tick = Periodic::new(n.period, Instant::now());
        while !stop.load(Ordering::SeqCst) {
            if !tick.due(Instant::now()) {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let child = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let Ok(mut child) = child else {
                tracing::warn!("cannot start the noise process");
                continue;
            };
            let from = unix_ms();
            let t = Instant::now();
            while t.elapsed() < n.busy && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            event(
                &run_dir,
                Event::NoiseBurst {
                    from_unix_ms: from,
                    to_unix_ms: unix_ms(),
                    pid: child.id(),
                },
            );
        }
    };
    std::thread::Builder::new()
        .name("noise".into())
        .spawn(body)
        .context("cannot start the noise thread")
}

/// SIGKILLs `pid` (a spare, so that the launcher starts a new one) and records it.
pub fn restart_spare(run_dir: &Path, pid: u32) -> Result<bool> {
    let ok = crate::signals::send(crate::signals::Signal::Kill, &[pid]);
    let mut f = Injected::of(FaultKind::SpareRestart, ok);
    f.pid = Some(pid);
    event(run_dir, Event::FaultInjected(f));
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_fires_once_per_period() {
        let t = Instant::now();
        let mut p = Periodic::new(Duration::from_secs(10), t);
        assert!(!p.due(t + Duration::from_secs(9)));
        assert!(p.due(t + Duration::from_secs(10)));
        assert!(!p.due(t + Duration::from_secs(11)));
        // Late: fires once, not once per missed period.
        assert!(p.due(t + Duration::from_secs(45)));
        assert!(!p.due(t + Duration::from_secs(46)));
        assert_eq!(p.fired, 2);
    }

    #[test]
    fn noise_is_parsed_and_checked() {
        let n = Noise::parse("2000:10000").unwrap();
        assert_eq!(n.busy, Duration::from_secs(2));
        assert!(Noise::parse("2000").is_err());
        assert!(Noise::parse("0:100").is_err());
        assert!(Noise::parse("100:100").is_err());
        assert!(Noise::parse("a:100").is_err());
    }
}
