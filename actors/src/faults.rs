//! Fault injection for the tests of the supervision tree (docs/semantics.md, S-*).
//!
//! Hidden and off unless `PHALANX_TEST_FAULT` is set, e.g.
//! `compute-panic@40:1,loader-panic@30,control-panic@20,compute-hang@50:0,exit-at-final-barrier@30:1`:
//! the named fault fires once per process when the rank reaches that step (and, with `:R`, only
//! on rank R) in the job's first generation, so that a spare taking the rank over later is not
//! hit again.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

struct Fault {
    kind: String,
    step: u64,
    rank: Option<u32>,
}

fn faults() -> &'static Vec<Fault> {
    static F: OnceLock<Vec<Fault>> = OnceLock::new();
    F.get_or_init(|| {
        let Ok(spec) = std::env::var("PHALANX_TEST_FAULT") else {
            return Vec::new();
        };
        spec.split(',')
            .filter_map(|f| {
                let (kind, at) = f.trim().split_once('@')?;
                let (step, rank) = match at.split_once(':') {
                    Some((s, r)) => (s.parse().ok()?, Some(r.parse().ok()?)),
                    None => (at.parse().ok()?, None),
                };
                Some(Fault {
                    kind: kind.to_string(),
                    step,
                    rank,
                })
            })
            .collect()
    })
}

/// Bit i set: fault i already fired in this process.
static FIRED: AtomicU32 = AtomicU32::new(0);

/// Whether the fault `kind` fires now, at `step` on `rank`. Fires at most once per process.
pub fn fire(kind: &str, step: u64, rank: Option<u32>, generation: u64) -> bool {
    if generation != 1 {
        return false;
    }
    for (i, f) in faults().iter().enumerate().take(32) {
        if f.kind == kind
            && step >= f.step
            && (f.rank.is_none() || f.rank == rank)
            && FIRED.fetch_or(1 << i, Ordering::SeqCst) & (1 << i) == 0
        {
            tracing::warn!(kind, step, ?rank, "injecting a test fault");
            return true;
        }
    }
    false
}

/// A standing fault (not once): `kind@N` gives N, e.g. `slow-checkpoint@1500` makes every
/// background checkpoint write take 1.5 s longer (a slow disk).
pub fn standing(kind: &str) -> Option<u64> {
    faults().iter().find(|f| f.kind == kind).map(|f| f.step)
}
