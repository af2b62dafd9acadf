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
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Kill => "KILL",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
            Signal::Term => "TERM",
            Signal::Int => "INT",
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
