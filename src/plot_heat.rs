//! The per-rank heat map of a run: each rank's own time per micro-batch (its heartbeats'
//! forward, backward and the rest of its step, `step_times.jsonl`) against step, as a colour
//! from the run's median (white) to three times it (red): a straggler is a red row, a fault a
//! line. The fixed part of a step is spread over the rank's own micro-batches here (the
//! detector spreads it over the even share), so a rank given fewer micro-batches by a
//! rebalance looks slower per micro-batch than the detector judges it.

use crate::plot::{Drawn, Mark};
use phalanx_runtime::metrics::RankStepLine;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;

/// Columns drawn at most: a long run's steps are averaged into this many bins.
const MAX_BINS: u64 = 400;

#[derive(Debug, PartialEq)]
pub struct HeatMap {
    pub steps_per_bin: u64,
    pub ranks: u32,
    /// (bin, rank) -> the mean of the rank's time per micro-batch over the bin's steps, ms.
    pub cells: BTreeMap<(u64, u32), f64>,
    /// The median over every step of every rank, ms: the colour scale's white.
    pub median_ms: f64,
}

impl HeatMap {
    /// `None` without any step (a single-process run writes none).
    pub fn of(lines: &[RankStepLine], last_step: u64) -> Option<HeatMap> {
        if lines.is_empty() {
            return None;
        }
        let steps_per_bin = (last_step + 1).div_ceil(MAX_BINS).max(1);
        let mut sums: BTreeMap<(u64, u32), (f64, u32)> = BTreeMap::new();
        for l in lines {
            let e = sums.entry((l.step / steps_per_bin, l.rank)).or_default();
            e.0 += l.ms_per_micro_batch();
            e.1 += 1;
        }
        let mut all: Vec<f64> = lines.iter().map(RankStepLine::ms_per_micro_batch).collect();
        all.sort_by(f64::total_cmp);
        Some(HeatMap {
            steps_per_bin,
            ranks: lines.iter().map(|l| l.rank + 1).max().unwrap_or(1),
            cells: sums
                .into_iter()
                .map(|(k, (sum, n))| (k, sum / f64::from(n)))
                .collect(),
            median_ms: all[all.len() / 2].max(1e-6),
        })
    }
}

/// White at the median and below, red at three times it and above (a log scale between).
pub fn colour(ms: f64, median: f64) -> RGBColor {
    let t = ((ms / median).ln() / 3f64.ln()).clamp(0.0, 1.0);
    let fade = |c: u8| (255.0 - (255.0 - f64::from(c)) * t).round() as u8;
    RGBColor(fade(200), fade(20), fade(20))
}

pub fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    h: &HeatMap,
    x: std::ops::Range<u64>,
    faults: &[Mark],
) -> Drawn<DB> {
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .caption(
            format!(
                "each rank's own time per micro-batch: white = the median {:.1} ms, red = 3x",
                h.median_ms
            ),
            ("sans-serif", 14),
        )
        .build_cartesian_2d(x, 0..h.ranks)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("rank")
        .y_labels(h.ranks.min(16) as usize + 1)
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let w = h.steps_per_bin;
    chart.draw_series(h.cells.iter().map(|(&(bin, rank), &ms)| {
        Rectangle::new(
            [(bin * w, rank), ((bin + 1) * w, rank + 1)],
            colour(ms, h.median_ms).filled(),
        )
    }))?;
    for f in faults {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(f.step, 0), (f.step, h.ranks)],
            BLUE.mix(0.8).stroke_width(2),
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u64, rank: u32, ms: f64) -> RankStepLine {
        RankStepLine {
            unix_ms: 0,
            member: u64::from(rank) + 1,
            rank,
            generation: 1,
            step,
            compute_ms: ms * 4.0,
            fixed_ms: 0.0,
            micro_batches: 4,
        }
    }

    // A slow rank is a row of hot cells; a long run is binned to at most MAX_BINS columns.
    #[test]
    fn a_slow_rank_is_a_hot_row_and_long_runs_are_binned() {
        let mut lines = Vec::new();
        for step in 0..1000 {
            for rank in 0..4 {
                let slow = rank == 2 && step >= 500;
                lines.push(line(step, rank, if slow { 40.0 } else { 10.0 }));
            }
        }
        let h = HeatMap::of(&lines, 999).unwrap();
        assert_eq!(h.steps_per_bin, 3);
        assert_eq!(h.ranks, 4);
        assert_eq!(h.median_ms, 10.0);
        assert_eq!(h.cells[&(0, 2)], 10.0);
        assert_eq!(h.cells[&(200, 2)], 40.0);
        assert_eq!(colour(10.0, 10.0), RGBColor(255, 255, 255));
        assert_eq!(colour(5.0, 10.0), RGBColor(255, 255, 255));
        assert_eq!(colour(40.0, 10.0), RGBColor(200, 20, 20));
        assert!(HeatMap::of(&[], 10).is_none());
    }
}
