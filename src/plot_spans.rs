//! Faults that last a while or fail no rank by themselves (a slow link, a full disk, a CPU
//! quota, the coordinator down, a host cut off, a corrupted checkpoint) as bands over the steps
//! they lasted: a lost rank is marked by its loss, but most of these would otherwise not be
//! seen at all, and a partition's length is what its lost ranks do not show.

use phalanx_runtime::events::{Event, FaultKind, Record};
use plotters::coord::types::RangedCoordu64;
use plotters::prelude::*;

/// A fault from the step in flight when it struck to the one in flight when it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub from: u64,
    pub to: u64,
    pub what: &'static str,
}

fn words(k: FaultKind) -> Option<&'static str> {
    Some(match k {
        FaultKind::SlowLink => "slow link",
        FaultKind::DiskFull => "checkpoint disk full",
        FaultKind::CpuQuota => "CPU quota",
        FaultKind::CoordinatorKill => "coordinator down",
        FaultKind::HostPartition => "host cut off",
        FaultKind::CheckpointCorrupt => "checkpoint corrupted",
        // These fail ranks, marked where the loss was seen.
        FaultKind::Sigkill
        | FaultKind::Sigstop
        | FaultKind::HostLost
        | FaultKind::SpareRestart
        | FaultKind::JobKilled => return None,
    })
}

/// Each such fault, from its injection to its clearing (the last step recorded if it never
/// cleared; a corruption is an instant).
pub fn of(records: &[Record], stamps: &[(u64, u64)]) -> Vec<Span> {
    let step_at = |t: u64| {
        stamps
            .iter()
            .find(|(s, _)| *s >= t)
            .or(stamps.last())
            .map(|p| p.1)
    };
    let mut out: Vec<(FaultKind, Span, bool)> = Vec::new();
    for r in records {
        match &r.event {
            Event::FaultInjected(f) if f.ok => {
                let (Some(what), Some(from)) = (words(f.fault), step_at(f.injected_unix_ms)) else {
                    continue;
                };
                let last = stamps.last().map_or(from, |p| p.1);
                let instant = f.fault == FaultKind::CheckpointCorrupt;
                let to = if instant { from } else { last };
                out.push((f.fault, Span { from, to, what }, instant));
            }
            Event::FaultCleared(c) => {
                let open = out
                    .iter_mut()
                    .find(|(k, _, closed)| *k == c.fault && !closed);
                if let (Some((_, span, closed)), Some(to)) =
                    (open, step_at(c.cleared_unix_ms.unwrap_or(r.unix_ms)))
                {
                    span.to = to.max(span.from);
                    *closed = true;
                }
            }
            _ => {}
        }
    }
    out.into_iter().map(|(_, s, _)| s).collect()
}

pub const COLOUR: RGBColor = RGBColor(255, 140, 0);

type Chart<'a, DB> =
    ChartContext<'a, DB, Cartesian2d<RangedCoordu64, plotters::coord::types::RangedCoordf64>>;

/// The bands behind a panel's lines, and one legend entry naming them.
pub fn draw<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    y: std::ops::Range<f64>,
    spans: &[Span],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    for s in spans {
        chart.draw_series(std::iter::once(Rectangle::new(
            [(s.from, y.start), (s.to.max(s.from + 1), y.end)],
            COLOUR.mix(0.25).filled(),
        )))?;
    }
    if let Some(first) = spans.first() {
        let label = match spans.len() {
            1 => first.what.to_string(),
            n => format!("{n} faults without a lost rank (first: {})", first.what),
        };
        chart
            .draw_series(std::iter::once(PathElement::new(vec![], COLOUR)))?
            .label(label)
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 20, y + 5)], COLOUR.mix(0.4).filled())
            });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_runtime::events::{Cleared, Injected};

    fn rec(t: u64, event: Event) -> Record {
        Record {
            unix_ms: t,
            t_ms: None,
            event,
        }
    }

    #[test]
    fn a_slow_link_spans_the_steps_it_lasted_and_a_kill_is_left_to_its_loss() {
        let stamps: Vec<(u64, u64)> = (0..10).map(|s| (1000 + s * 100, s)).collect();
        let mut slow = Injected::of(FaultKind::SlowLink, true);
        slow.injected_unix_ms = 1250;
        let mut kill = Injected::of(FaultKind::Sigkill, true);
        kill.injected_unix_ms = 1300;
        let mut quota = Injected::of(FaultKind::CpuQuota, true);
        quota.injected_unix_ms = 1750;
        let mut clear = Cleared::of(FaultKind::SlowLink);
        clear.cleared_unix_ms = Some(1540);
        let recs = vec![
            rec(1250, Event::FaultInjected(slow)),
            rec(1300, Event::FaultInjected(kill)),
            rec(1540, Event::FaultCleared(clear)),
            rec(1750, Event::FaultInjected(quota)),
        ];
        let spans = of(&recs, &stamps);
        assert_eq!(
            spans,
            vec![
                Span {
                    from: 3,
                    to: 6,
                    what: "slow link"
                },
                Span {
                    from: 8,
                    to: 9,
                    what: "CPU quota"
                },
            ],
            "a quota never cleared lasts to the last step"
        );
    }
}
