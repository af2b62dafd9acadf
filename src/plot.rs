//! `phalanx plot RUN_DIR`: the run as a picture (PNG and SVG): train and validation loss,
//! tokens/s, world size and generation against step, with the job's faults marked where they
//! struck. Read from the same records as the report (`metrics.jsonl`, `events.jsonl`), for a
//! single-process run and a multi-rank one alike.

use crate::plot_heat::HeatMap;
use anyhow::{bail, Context, Result};
use phalanx_runtime::events::{self, Record};
use phalanx_runtime::metrics::{self, MetricLine};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the text's font comes from (Debian's fonts-dejavu-core, installed by scripts/setup).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// A fault, at the step it struck (the step in flight then).
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub step: u64,
    pub what: String,
}

/// What is drawn, by step. Where a step was trained more than once (a rollback, a resumed
/// campaign), its last record counts: the lines follow the final model's lineage.
#[derive(Debug, Default, PartialEq)]
pub struct Series {
    pub loss: Vec<(u64, f64)>,
    pub val: Vec<(u64, f64)>,
    pub tokens_per_s: Vec<(u64, f64)>,
    pub world: Vec<(u64, f64)>,
    pub generation: Vec<(u64, f64)>,
    pub faults: Vec<Mark>,
    /// Faults that failed no rank, over the steps they lasted.
    pub spans: Vec<crate::plot_spans::Span>,
}

impl Series {
    pub fn of(lines: &[MetricLine], records: &[Record]) -> Series {
        let mut by_step = BTreeMap::new();
        let mut stamps = Vec::new();
        let mut vals = BTreeMap::new();
        for l in lines {
            match l {
                MetricLine::Step(s) if s.loss.is_some() => {
                    by_step.insert(s.step, s);
                    if let Some(t) = s.unix_ms {
                        stamps.push((t, s.step));
                    }
                    if let Some(v) = s.val_loss {
                        vals.insert(s.step, v);
                    }
                }
                MetricLine::Final(f) => {
                    if let Some(v) = f.val_loss {
                        vals.insert(f.step, v);
                    }
                }
                _ => {}
            }
        }
        let pick = |f: &dyn Fn(&metrics::StepLine) -> Option<f64>| {
            by_step
                .iter()
                .filter_map(|(&k, s)| f(s).map(|v| (k, v)))
                .collect::<Vec<_>>()
        };
        Series {
            loss: thin(pick(&|s| s.loss), Thin::Mean),
            val: vals.into_iter().collect(),
            tokens_per_s: thin(pick(&|s| s.tokens_per_s), Thin::Mean),
            world: thin(pick(&|s| Some(s.world_size as f64)), Thin::Last),
            generation: thin(pick(&|s| Some(s.generation as f64)), Thin::Last),
            faults: records.iter().filter_map(|r| fault(r, &stamps)).collect(),
            spans: crate::plot_spans::of(records, &stamps),
        }
    }

    fn last_step(&self) -> u64 {
        let last = |v: &[(u64, f64)]| v.last().map_or(0, |p| p.0);
        last(&self.loss).max(last(&self.val)).max(1)
    }
}

/// Points drawn per line at most: a months-long run has millions of steps, a picture a few
/// thousand pixels.
const MAX_POINTS: usize = 2000;

#[derive(Clone, Copy)]
enum Thin {
    /// A bucket's mean (loss, throughput).
    Mean,
    /// A bucket's last value (world size, generation: steps, not averages).
    Last,
}

/// `points` in at most [`MAX_POINTS`] buckets of consecutive points, each at its last step.
fn thin(points: Vec<(u64, f64)>, how: Thin) -> Vec<(u64, f64)> {
    if points.len() <= MAX_POINTS {
        return points;
    }
    points
        .chunks(points.len().div_ceil(MAX_POINTS))
        .map(|c| {
            let last = c[c.len() - 1];
            match how {
                Thin::Mean => (last.0, c.iter().map(|p| p.1).sum::<f64>() / c.len() as f64),
                Thin::Last => last,
            }
        })
        .collect()
}

/// A rank lost to a fault (not one drained or scaled down on purpose), at the first step
/// recorded after it.
fn fault(r: &Record, stamps: &[(u64, u64)]) -> Option<Mark> {
    let what = crate::progress::fault_words(r)?;
    let step = stamps
        .iter()
        .find(|(t, _)| *t >= r.unix_ms)
        .or(stamps.last())?
        .1;
    Some(Mark { step, what })
}

/// Reads the run's records and writes `report.png` and `report.svg` into `out`; their paths.
pub fn run(run_dir: &Path, out: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let metrics_path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics_path).with_context(|| {
        format!(
            "cannot read {}: pass a run directory (a job's run.dir) that has trained at least \
             one step",
            metrics_path.display()
        )
    })?;
    let (lines, _) = metrics::read(&text);
    let records = std::fs::read_to_string(run_dir.join("events.jsonl"))
        .map(|t| events::read(&t).0)
        .unwrap_or_default();
    let s = Series::of(&lines, &records);
    let step_times = std::fs::read_to_string(run_dir.join("step_times.jsonl"))
        .map(|t| events::read_lines(&t).0)
        .unwrap_or_default();
    let heat = HeatMap::of(&step_times, s.last_step());
    if s.loss.is_empty() {
        bail!(
            "{} holds no training step yet: nothing to plot",
            metrics_path.display()
        );
    }
    let out = out.unwrap_or(run_dir);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let title = run_dir
        .canonicalize()
        .unwrap_or(run_dir.to_path_buf())
        .display()
        .to_string();
    // Both backends measure text with the font (the legend's box is sized by it).
    register_font()?;
    let svg = out.join("report.svg");
    let size = if heat.is_some() {
        SIZE_WITH_RANKS
    } else {
        SIZE
    };
    draw(
        SVGBackend::new(&svg, size).into_drawing_area(),
        &s,
        heat.as_ref(),
        &title,
    )
    .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", svg.display()))?;
    let png = out.join("report.png");
    draw(
        BitMapBackend::new(&png, size).into_drawing_area(),
        &s,
        heat.as_ref(),
        &title,
    )
    .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", png.display()))?;
    Ok((png, svg))
}

const SIZE: (u32, u32) = (1200, 1100);
/// With the per-rank heat map below the three panels.
const SIZE_WITH_RANKS: (u32, u32) = (1200, 1450);

fn register_font() -> Result<()> {
    let Some(bytes) = FONTS.iter().find_map(|p| std::fs::read(p).ok()) else {
        bail!(
            "no DejaVu Sans font for the PNG's text (looked in {}); install Debian's \
             fonts-dejavu-core (scripts/setup does)",
            FONTS.join(", ")
        );
    };
    // plotters keeps registered fonts for the life of the process: one leak per process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("the DejaVu Sans font could not be read"))
}

pub(crate) type Drawn<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Three panels, one above the other, sharing the step axis, and the per-rank heat map below
/// them for a multi-rank run; faults as lines in each.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    s: &Series,
    heat: Option<&HeatMap>,
    title: &str,
) -> Drawn<DB> {
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    let panels = root.split_evenly((if heat.is_some() { 4 } else { 3 }, 1));
    if let Some(h) = heat {
        crate::plot_heat::panel(&panels[3], h, 0..s.last_step() + 1, &s.faults)?;
    }
    let x = 0..s.last_step() + 1;
    panel(
        &panels[0],
        Axis::LOSS,
        x.clone(),
        &[("train", &s.loss, BLUE), ("validation", &s.val, RED)],
        (&s.faults, &s.spans),
    )?;
    panel(
        &panels[1],
        Axis::RATE,
        x.clone(),
        &[("tokens/s", &s.tokens_per_s, GREEN)],
        (&s.faults, &s.spans),
    )?;
    panel(
        &panels[2],
        Axis::COUNT,
        x,
        &[
            ("world size", &s.world, BLACK),
            ("generation", &s.generation, MAGENTA),
        ],
        (&s.faults, &s.spans),
    )?;
    root.present()
}

/// A series drawn in a panel: its legend, its points, its colour.
type Line<'a> = (&'a str, &'a Vec<(u64, f64)>, RGBColor);

/// A panel's y axis: its name, whether it starts at zero, the decimals of its labels.
struct Axis {
    name: &'static str,
    from_zero: bool,
    decimals: usize,
}

impl Axis {
    const LOSS: Axis = Axis {
        name: "loss",
        from_zero: false,
        decimals: 2,
    };
    const RATE: Axis = Axis {
        name: "tokens/s",
        from_zero: true,
        decimals: 0,
    };
    const COUNT: Axis = Axis {
        name: "world size, generation",
        from_zero: true,
        decimals: 0,
    };
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    axis: Axis,
    x: std::ops::Range<u64>,
    lines: &[Line],
    (faults, spans): (&[Mark], &[crate::plot_spans::Span]),
) -> Drawn<DB> {
    let ys = lines.iter().flat_map(|l| l.1.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.02).max(0.05);
    let y = if axis.from_zero {
        0.0..hi + pad.max(0.5)
    } else {
        lo - pad..hi + pad
    };
    // Integer axes get at most one label per unit.
    let y_labels = match axis.decimals {
        0 if hi < 10.0 => (hi + pad.max(0.5)).ceil() as usize + 1,
        _ => 10,
    };
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y.clone())?;
    let decimals = axis.decimals;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(axis.name)
        .y_labels(y_labels)
        .y_label_formatter(&|v| format!("{v:.decimals$}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    crate::plot_spans::draw(&mut chart, y.clone(), spans)?;
    for (name, points, color) in lines {
        let points = points.iter().map(|&(s, v)| (s, v));
        if points.len() == 1 || *name == "validation" {
            chart
                .draw_series(points.clone().map(|p| Circle::new(p, 4, color.filled())))?
                .label(*name)
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
            chart.draw_series(LineSeries::new(points, color.mix(0.4)))?;
        } else {
            chart
                .draw_series(LineSeries::new(points, *color))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], *color));
        }
    }
    for f in faults {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(f.step, y.start), (f.step, y.end)],
            RED.mix(0.7).stroke_width(2),
        )))?;
    }
    if let Some(first) = faults.first() {
        let label = match faults.len() {
            1 => format!("fault: {}", first.what),
            n => format!("{n} faults (first: {})", first.what),
        };
        chart
            .draw_series(std::iter::once(PathElement::new(vec![], RED)))?
            .label(label)
            .legend(|(x, y)| PathElement::new(vec![(x, y - 6), (x, y + 6)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_runtime::events::Cause;
    use phalanx_runtime::metrics::{FinalLine, StepLine};

    fn step(step: u64, generation: u64, world: usize, t: u64) -> MetricLine {
        MetricLine::Step(StepLine {
            step,
            generation,
            world_size: world,
            unix_ms: Some(t),
            loss: Some(3.0 - step as f64 * 0.1),
            tokens_per_s: Some(100.0),
            ..StepLine::default()
        })
    }

    fn lost(cause: Cause, t: u64) -> Record {
        crate::progress::rank_failed(7, 1, cause, t)
    }

    #[test]
    fn faults_mark_the_step_in_flight_and_redone_steps_keep_their_last_record() {
        let mut lines: Vec<MetricLine> = (0..5).map(|s| step(s, 1, 4, 1000 + s * 100)).collect();
        // The job lost a rank while step 5 was in flight and redid it with 3 ranks.
        lines.push(step(5, 2, 3, 1700));
        lines.push(step(3, 3, 3, 1800)); // a rollback's redone step
        lines.push(MetricLine::Final(FinalLine {
            is_final: true,
            step: 6,
            val_loss: Some(2.5),
            peer_lost_at_end: None,
            preempted: false,
            unix_ms: 1900,
        }));
        let recs = vec![lost(Cause::Crashed, 1450), lost(Cause::Drained, 1750)];
        let s = Series::of(&lines, &recs);
        assert_eq!(s.loss.len(), 6);
        assert_eq!(s.generation[3], (3, 3.0), "the redone step's record wins");
        assert_eq!(s.world.last(), Some(&(5, 3.0)));
        assert_eq!(s.val, vec![(6, 2.5)]);
        assert_eq!(
            s.faults,
            vec![Mark {
                step: 5,
                what: "rank 1 crashed".into()
            }],
            "a drain is no fault"
        );
    }

    #[test]
    fn a_long_run_is_thinned_to_a_picture_s_worth_of_points() {
        let long: Vec<(u64, f64)> = (0..1_000_000).map(|s| (s, (s % 10) as f64)).collect();
        let mean = thin(long.clone(), Thin::Mean);
        assert!(
            mean.len() <= MAX_POINTS && mean.len() > MAX_POINTS / 2,
            "{}",
            mean.len()
        );
        assert_eq!(mean.last().unwrap().0, 999_999, "the last step stays");
        assert!(
            mean.iter().all(|p| (p.1 - 4.5).abs() < 1e-9),
            "a bucket of 500 averages 4.5"
        );
        let last = thin(long, Thin::Last);
        assert_eq!(last[0], (499, 9.0));
        let short = vec![(0, 1.0), (1, 2.0)];
        assert_eq!(thin(short.clone(), Thin::Mean), short);
    }

    #[test]
    fn a_run_dir_is_drawn_as_png_and_svg() {
        let d = tempfile::tempdir().unwrap();
        let lines: String = (0..30)
            .map(|s| {
                format!(
                    "{}\n",
                    step(s, 1 + s / 15, 4 - (s / 15) as usize, 1000 + s * 10).to_line()
                )
            })
            .collect();
        std::fs::write(d.path().join("metrics.jsonl"), lines).unwrap();
        let mut slow = phalanx_runtime::events::Injected::of(
            phalanx_runtime::events::FaultKind::SlowLink,
            true,
        );
        slow.injected_unix_ms = 1200;
        let slow = Record {
            unix_ms: 1200,
            t_ms: None,
            event: phalanx_runtime::events::Event::FaultInjected(slow),
        };
        std::fs::write(
            d.path().join("events.jsonl"),
            format!(
                "{}\n{}\n",
                lost(Cause::Crashed, 1145).to_line(),
                slow.to_line()
            ),
        )
        .unwrap();
        let (png, svg) = run(d.path(), None).unwrap();
        let svg = std::fs::read_to_string(svg).unwrap();
        assert!(
            svg.contains("tokens/s") && svg.contains("rank 1 crashed") && svg.contains("slow link"),
            "{svg}"
        );
        let png = std::fs::read(png).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{} bytes",
            png.len()
        );
        let empty = tempfile::tempdir().unwrap();
        let e = run(empty.path(), None).unwrap_err().to_string();
        assert!(e.contains("pass a run directory"), "{e}");
    }
}
