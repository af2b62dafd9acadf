//! Helpers for tests that run the real `phalanx` binary.
#![allow(dead_code)]

mod coordinator;
mod job;
mod jsonl;
mod proc;
mod slurm;

// Every test binary compiles all of these and uses only some.
#[allow(unused_imports)]
pub use {coordinator::*, job::*, jsonl::*, proc::*, slurm::*};

use std::path::Path;
use std::process::{Command, Output};

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_phalanx"));
    c.env("PHALANX_LOG", "warn");
    c
}

pub struct Run {
    pub out: Output,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.out.status.success()
    }
    pub fn code(&self) -> Option<i32> {
        self.out.status.code()
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    /// A user error: exit code 1 with an `error:` line, never a panic.
    pub fn assert_user_error(&self, needle: &str) {
        let err = self.stderr();
        assert_eq!(self.code(), Some(1), "expected exit 1, stderr:\n{err}");
        assert!(err.contains("error:"), "no error line:\n{err}");
        assert!(!err.contains("panicked"), "panicked:\n{err}");
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
        assert_no_clause_twice(&err);
    }
}

/// C-4: a `checkpoint_failed` event names the full disk as the system said it.
pub fn assert_a_save_failed_for_space(events: &[serde_json::Value]) {
    let failed: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "checkpoint_failed")
        .collect();
    assert!(
        failed
            .iter()
            .any(|e| e["error"].as_str().unwrap_or("").contains("No space left")),
        "no save failed for the full disk: {failed:?}"
    );
}

/// An error line says each thing once ("tcp connect error: tcp connect error" was a bug).
pub fn assert_no_clause_twice(err: &str) {
    for line in err.lines().filter(|l| l.starts_with("error:")) {
        let clauses: Vec<&str> = line
            .split(": ")
            .map(str::trim)
            .filter(|c| c.len() > 8)
            .collect();
        for (i, c) in clauses.iter().enumerate() {
            assert!(
                !clauses[i + 1..].contains(c),
                "{c:?} is said twice in the error line:\n{line}"
            );
        }
    }
}

pub fn run(args: &[&str], cwd: &Path) -> Run {
    let out = bin()
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("phalanx runs");
    Run { out }
}

/// These tests each run a whole job of 4-5 processes on a 2-core machine; run them one at a
/// time so that one job's timing is not another's noise.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a job's ranks run: this host, or two simulated hosts (`phalanx launch --hosts 2`:
/// network, IPC and UTS namespaces on a bridge; needs root).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hosts {
    One,
    Two,
}

impl Hosts {
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Hosts::One => &[],
            Hosts::Two => &["--hosts", "2"],
        }
    }

    /// Whether this machine can place ranks so; a scenario that needs root says it was skipped.
    pub fn available(self) -> bool {
        if self == Hosts::Two && !is_root() {
            eprintln!("skipped: simulated hosts need root (network namespaces, veth, a bridge)");
            return false;
        }
        true
    }
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A port free on loopback now (for a process that must bind a known port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends SIG`sig` ("KILL", "STOP", "CONT", "INT") to `pid`; whether it was delivered.
pub fn send_signal(pid: u32, sig: &str) -> bool {
    std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// Sends SIG`sig` to `pid`, which must still be there to receive it.
pub fn signal(pid: u32, sig: &str) {
    assert!(send_signal(pid, sig), "kill -{sig} {pid} failed");
}

/// Milliseconds since the Unix epoch: the clock of the `unix_ms` fields in events and metrics.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The upper median (of an even count, the larger middle value), which is what the step-time
/// bounds in the tests were measured with.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A test's scratch directory. Removed when the test ends, unless the test failed and
/// `PHALANX_KEEP_FAILED` is set: then it stays, and its path is printed, so a failure on a
/// loaded machine can be read afterwards (logs, events, metrics).
pub struct TestDir(Option<tempfile::TempDir>);

pub fn test_dir() -> TestDir {
    TestDir(Some(tempfile::tempdir().expect("a temporary directory")))
}

impl TestDir {
    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let Some(mut d) = self.0.take() else { return };
        if std::thread::panicking() && std::env::var_os("PHALANX_KEEP_FAILED").is_some() {
            d.disable_cleanup(true);
            eprintln!("kept the failed test's directory: {}", d.path().display());
        }
    }
}
