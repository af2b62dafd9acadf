//! Signals to processes of a job (fault injection, stopping workers), through the system's
//! `kill`: the launcher names processes by pid, and a signal that could not be sent is
//! reported, never a panic.

use std::process::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Kill,
    Stop,
    Cont,
    Term,
    Int,
    /// The link proxy's "slow" and "fast" switches.
    Usr1,
    Usr2,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Kill => "KILL",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
            Signal::Term => "TERM",
            Signal::Int => "INT",
            Signal::Usr1 => "USR1",
            Signal::Usr2 => "USR2",
        }
    }
}

/// Sends `sig` to every process of `pids`; whether all of them got it.
pub fn send(sig: Signal, pids: &[u32]) -> bool {
    if pids.is_empty() {
        return false;
    }
    Command::new("kill")
        .arg(format!("-{}", sig.name()))
        .args(pids.iter().map(u32::to_string))
        .status()
        .is_ok_and(|s| s.success())
}
