//! The slow-link check: a slow link is no failure. While a host's links are slow the steps take
//! longer (the fault struck: each step's collectives cross the link at least once), and no
//! rank is failed or removed for it.

use super::invariants::{Check, Evidence};
use phalanx_runtime::events::{Event, FaultKind};
use phalanx_runtime::metrics::MetricLine;

/// A removal reported this long after the link is fast again is still laid to it (a deadline
/// that ran out while it was slow is reported a tick or two later).
const AFTER_MS: u64 = 2_000;

struct Window {
    from_ms: u64,
    to_ms: u64,
    delay_ms: u64,
}

pub fn slow_link_slows_and_evicts_nobody(e: &Evidence) -> Check {
    let name = "slow_link_slows_and_evicts_nobody";
    let Some(w) = window(e) else {
        return Check {
            name,
            pass: true,
            detail: "no slow link in this run".into(),
        };
    };
    let (mut before, mut during) = (Vec::new(), Vec::new());
    for m in &e.metrics {
        if let MetricLine::Step(s) = m {
            match (s.unix_ms, s.step_ms) {
                (Some(t), Some(ms)) if t < w.from_ms => before.push(ms),
                (Some(t), Some(ms)) if t <= w.to_ms => during.push(ms),
                _ => {}
            }
        }
    }
    let lost: Vec<String> = e
        .records
        .iter()
        .filter(|r| (w.from_ms..=w.to_ms + AFTER_MS).contains(&r.unix_ms))
        .filter_map(|r| match &r.event {
            Event::RankFailed(x) | Event::RankRemoved(x) => {
                Some(format!("member {} ({:?})", x.member, x.cause))
            }
            _ => None,
        })
        .collect();
    let (pass, detail) = judge(&mut before, &mut during, w.delay_ms, &lost);
    Check { name, pass, detail }
}

fn window(e: &Evidence) -> Option<Window> {
    let mut w: Option<Window> = None;
    for r in &e.records {
        match &r.event {
            Event::FaultInjected(f) if f.fault == FaultKind::SlowLink && w.is_none() => {
                w = Some(Window {
                    from_ms: f.injected_unix_ms,
                    to_ms: u64::MAX,
                    delay_ms: f.delay_ms.unwrap_or(0),
                });
            }
            Event::FaultCleared(c) if c.fault == FaultKind::SlowLink => {
                if let Some(w) = w.as_mut().filter(|w| w.to_ms == u64::MAX) {
                    w.to_ms = c.cleared_unix_ms.unwrap_or(r.unix_ms);
                }
            }
            _ => {}
        }
    }
    w
}

fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Passes when nobody was lost and the median step while slow took at least the link's added
/// latency longer than the median step before it.
fn judge(before: &mut [f64], during: &mut [f64], delay_ms: u64, lost: &[String]) -> (bool, String) {
    let (Some(b), Some(d)) = (median(before), median(during)) else {
        return (
            false,
            format!(
                "{} step(s) before the slow link and {} during it: too few to tell whether it \
                 struck (slow it for longer)",
                before.len(),
                during.len()
            ),
        );
    };
    let slowed = d >= b + delay_ms as f64;
    let steps = format!(
        "steps took {d:.0} ms (median of {}) while slow against {b:.0} ms before",
        during.len()
    );
    match (slowed, lost.is_empty()) {
        (true, true) => (true, format!("{steps}; nobody failed or removed")),
        (false, _) => (
            false,
            format!("{steps}: not {delay_ms} ms slower, the link's latency; the fault missed"),
        ),
        (true, false) => (false, format!("{steps}; lost for it: {}", lost.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::judge;

    #[test]
    fn slower_steps_and_nobody_lost_pass() {
        let (pass, detail) = judge(&mut [5.0, 6.0, 5.5], &mut [80.0, 90.0], 20, &[]);
        assert!(pass, "{detail}");
        assert!(detail.contains("90 ms"), "{detail}");
    }

    #[test]
    fn a_link_that_did_not_slow_the_steps_missed() {
        let (pass, detail) = judge(&mut [5.0, 6.0], &mut [7.0, 8.0], 20, &[]);
        assert!(!pass);
        assert!(detail.contains("missed"), "{detail}");
        let (pass, _) = judge(&mut [5.0], &mut [], 20, &[]);
        assert!(!pass);
    }

    #[test]
    fn a_rank_lost_to_a_slow_link_fails() {
        let lost = ["member 3 (Timeout)".to_string()];
        let (pass, detail) = judge(&mut [5.0], &mut [80.0], 20, &lost);
        assert!(!pass);
        assert!(detail.contains("member 3"), "{detail}");
    }
}
