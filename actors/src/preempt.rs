//! Preemption (C-8): SIGTERM or SIGINT to a worker (what Slurm and PBS send before a time limit,
//! what Ctrl-C sends to the terminal's process group) asks the job to stop at the next step
//! boundary with a committed checkpoint, not to die. The request is this process's; it travels
//! to every rank with the next step's allreduce, so all ranks stop after the same step.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks this worker's rank to stop at the next step boundary (idempotent: a second signal
/// changes nothing; SIGKILL is the way to stop at once).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
