//! A standalone `phalanx coordinator`, as a job without the launcher runs it.

use super::{bin, Proc};
use std::process::Command;
use std::time::Duration;

/// `phalanx coordinator --bind BIND --world N`; the caller adds the job's config, overrides and
/// tokens.
pub fn coordinator(bind: &str, world: usize) -> Command {
    let mut c = bin();
    c.args(["coordinator", "--bind", bind, "--world", &world.to_string()]);
    c
}

/// Starts a coordinator (stdout collected, stderr discarded) and waits up to 20 s for the
/// address it says it listens on (`host:port`, the port chosen if BIND asked for port 0).
pub fn start_coordinator(cmd: &mut Command) -> (Proc, String) {
    let p = Proc::collect(cmd);
    let first = p
        .next_line(Duration::from_secs(20))
        .expect("coordinator prints its address");
    assert!(first.contains("listening on"), "{first}");
    let addr = first.trim().rsplit(' ').next().unwrap().to_string();
    (p, addr)
}
