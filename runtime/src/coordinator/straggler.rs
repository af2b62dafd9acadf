//! Straggler judging, one sample per step and rank, with no I/O (K-7, K-9).
//!
//! A rank is judged only on evidence: its own full window of the current generation and share,
//! against the levels of its peers (never itself) that have full windows too, all non-zero. At
//! worlds of 2 and 3 the peers' median is one or two other ranks, so a rank must also be slow
//! against its own earlier level at the same share. Slowness must last `flag_after` steps *and*
//! `flag_after_time`, so that a burst of CPU contention, a neighbour's process start or a
//! regroup flags nobody, while a CPU-quota straggler (slow for good) is flagged within a few
//! steps.

use crate::ids::Step;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The longest straggler window; step times are kept on the stack when taking medians.
pub const MAX_WINDOW: usize = 64;

/// Samples kept for a rank's own baseline at its current share (those that left the window).
const HISTORY: usize = 32;
/// Steps of the current generation a flag event shows.
const RECENT: usize = 16;

/// Straggler detection works on each rank's own time per micro-batch, one sample per step: its
/// forward and backward time over its micro-batches, plus the rest of its own work (optimizer,
/// time descheduled inside collectives) over the even share. Waiting for data or for peers is
/// not in it, and a rank given fewer micro-batches by a rebalance is judged on the same scale.
#[derive(Debug, Clone, PartialEq)]
pub struct StragglerConfig {
    /// Steps (per rank) over which the rank's level is taken.
    pub window: usize,
    /// Slow means: own level > ratio x the median of the peers' levels (and, at worlds of 2
    /// and 3, > ratio x its own baseline) ...
    pub ratio: f64,
    /// ... and slower by at least this much per micro-batch (so that tiny steps do not flap).
    pub min_excess: Duration,
    /// Slow judgements in a row (one per step) before a rank is flagged ...
    pub flag_after: u32,
    /// ... whose own time in slow steps adds up to this (measured from the samples, so that
    /// it does not depend on when heartbeats arrive): a shorter burst flags nobody ...
    pub flag_after_time: Duration,
    /// ... or to this when some of them were above `severe_ratio` x the reference. Two of the
    /// last three steps that severe count as slow even before the window median moves (a CPU
    /// quota often alternates slow and normal steps).
    pub severe_ratio: f64,
    pub severe_after_time: Duration,
    /// A flagged rank is cleared after this many consecutive steps below `clear_ratio` x the
    /// reference: a narrower band than the flag's, so a rank near the line does not flap.
    pub unflag_after: u32,
    pub clear_ratio: f64,
    /// Act on a flagged straggler: first rebalance the global batch away from it, then, if it
    /// stays slow, replace it with a spare or evict it (above min_world).
    pub evict: bool,
    /// Rebalance only when the predicted step time drops by at least this fraction.
    pub min_gain: f64,
    /// A flag is acted on only once it has held this long: a short disturbance (a process
    /// start beside the rank, a burst of contention) clears before anything changes.
    pub act_after: Duration,
    /// A flagged rank is evicted only once it has been flagged this long and was slow again
    /// after a rebalance (or no rebalance can help it).
    pub evict_after: Duration,
    /// No straggler action (rebalance, eviction, evening out) within this long of the last.
    pub cooldown: Duration,
    /// At most this many straggler evictions per `eviction_window` for the whole job.
    pub max_evictions: u32,
    pub eviction_window: Duration,
    /// Step times of ranks on a host where a process registered this recently are not
    /// evidence: starting a worker (libtorch, the dataset, the model) takes a core for a while.
    pub startup_grace: Duration,
}

impl Default for StragglerConfig {
    fn default() -> Self {
        StragglerConfig {
            window: 6,
            ratio: 1.75,
            min_excess: Duration::from_millis(2),
            flag_after: 3,
            flag_after_time: Duration::from_millis(2000),
            severe_ratio: 2.2,
            severe_after_time: Duration::from_millis(200),
            unflag_after: 10,
            clear_ratio: 1.25,
            evict: true,
            min_gain: 0.15,
            act_after: Duration::from_secs(2),
            evict_after: Duration::from_secs(8),
            cooldown: Duration::from_secs(1),
            max_evictions: 2,
            eviction_window: Duration::from_secs(1800),
            startup_grace: Duration::from_secs(3),
        }
    }
}

/// A straggler flag raised or cleared by a heartbeat, with the figures behind it (all
/// non-zero: no judgement is made without them).
#[derive(Debug, Clone, PartialEq)]
pub enum FlagChange {
    Flagged {
        id: u64,
        own_ms: f64,
        peers_ms: f64,
        /// The rank's own level at this share before the slowdown, where it was needed
        /// (worlds of 2 and 3).
        baseline_ms: Option<f64>,
        slow_steps: u32,
        /// The rank's own time in the slow steps of the streak, and in its severe ones.
        slow_for_ms: u64,
        severe_for_ms: u64,
        /// The step whose time completed the evidence, and the per-micro-batch times (ms) of
        /// the window behind the flag, oldest first.
        at_step: Step,
        window_ms: Vec<f64>,
        /// The last `RECENT` steps' times (ms per micro-batch) of this generation, oldest
        /// first: where the slowdown began, when it began before the window.
        recent_ms: Vec<f64>,
    },
    Cleared {
        id: u64,
        own_ms: f64,
        peers_ms: f64,
    },
}

/// The peers' levels at the last refresh, sorted, so that the median of every rank but one is
/// found in O(log n) on the heartbeat path.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    sorted: Vec<f64>,
}

impl Peers {
    /// From the levels of the ranks that have one (full windows only); zero, negative and
    /// non-finite levels are not evidence and are left out.
    pub fn new(levels: impl Iterator<Item = f64>) -> Self {
        let mut sorted: Vec<f64> = levels.filter(|x| x.is_finite() && *x > 0.0).collect();
        sorted.sort_by(f64::total_cmp);
        Peers { sorted }
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The median of the levels with `own` (this rank's level at the refresh, if it had one)
    /// taken out once: a rank is never judged against itself.
    pub fn excluding(&self, own: Option<f64>) -> Option<f64> {
        let n = self.sorted.len();
        let skip = own.and_then(|v| self.sorted.binary_search_by(|x| x.total_cmp(&v)).ok());
        let m = n - usize::from(skip.is_some());
        if m == 0 {
            return None;
        }
        let at = |k: usize| match skip {
            Some(p) if k >= p => self.sorted[k + 1],
            _ => self.sorted[k],
        };
        Some(if m % 2 == 1 {
            at(m / 2)
        } else {
            (at(m / 2 - 1) + at(m / 2)) / 2.0
        })
    }
}

fn median_of<'a>(xs: impl Iterator<Item = &'a f64>) -> Option<f64> {
    let mut buf = [0f64; MAX_WINDOW];
    let mut n = 0;
    for (b, x) in buf.iter_mut().zip(xs) {
        *b = *x;
        n += 1;
    }
    if n == 0 {
        return None;
    }
    let v = &mut buf[..n];
    let (_, m, _) = v.select_nth_unstable_by(n / 2, f64::total_cmp);
    Some(*m)
}

/// What one step's sample is judged against.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub now: Instant,
    /// The rank's own time in this step (its compute and the rest of its own work).
    pub step_time: Duration,
    pub world: usize,
    /// The micro-batches the rank computed in this step (its share).
    pub micro_batches: u32,
    /// The median of the other ranks' levels.
    pub peers: Option<f64>,
    /// A process started on the rank's host within `startup_grace`: not evidence.
    pub quiet: bool,
    /// When that process registered (while `quiet`).
    pub quiet_since: Option<Instant>,
}

/// The bars a step is measured against: the other ranks' median and, at worlds of 2 and 3,
/// the rank's own baseline; slower by a ratio and by `min_excess`.
struct Bar {
    peers: f64,
    baseline: Option<f64>,
    small: bool,
    min_excess: f64,
}

impl Bar {
    fn above(&self, x: f64, ratio: f64) -> bool {
        let slower = |than: f64| x > ratio * than && x - than > self.min_excess;
        slower(self.peers) && (!self.small || self.baseline.is_some_and(slower))
    }
}

/// One rank's straggler state. The window restarts with each generation; the baseline history
/// restarts when the rank's share (or the world) changes.
#[derive(Debug, Clone, Default)]
pub struct Judge {
    window: VecDeque<f64>,
    /// The rank's own time in each step of the window.
    window_own: VecDeque<Duration>,
    history: VecDeque<f64>,
    recent: VecDeque<f64>,
    share: Option<(usize, u32)>,
    /// The newest step whose time is in the window (a heartbeat may repeat one).
    pub last_sampled: Option<Step>,
    /// Median of a full window; `None` until the window is full.
    pub level: Option<f64>,
    /// `level` at the last `Peers` refresh, to take it out of its own reference.
    pub level_at_refresh: Option<f64>,
    slow_streak: u32,
    /// The rank's own time in the slow (severe) steps of the current streak.
    slow_time: Duration,
    severe_time: Duration,
    normal_streak: u32,
    pub straggler: bool,
    pub flagged_at: Option<Instant>,
    /// The level (time per micro-batch) that raised the flag: with severe steps it is ahead of
    /// the window median, which the first rebalance must not wait for.
    pub flag_level: f64,
    /// Flags that came soon after this rank was last cleared: each doubles the normal steps the
    /// next clear needs (a CPU quota may bind only at the even share).
    pub relapses: u32,
    cleared_at: Option<Step>,
    /// The current generation gives this (flagged) rank a reduced share of the global batch.
    pub rebalanced: bool,
    /// Slow judgements in the current generation: after a rebalance, the slowness persisted.
    pub slow_in_generation: u32,
    /// Judgements in the current generation that were not slow.
    normal_in_generation: u32,
    /// The last clear came while the rank had a reduced share.
    cleared_rebalanced: bool,
    /// The flag came back the moment the rank had its even share again: its slowness outlasted
    /// a rebalance (it looked fine only while given less).
    pub relapsed: bool,
}

impl Judge {
    /// A new generation: heals, a fresh prefetch and cold caches make its first steps no
    /// evidence, so the window and the streaks restart. The flag, its relapses and the
    /// baseline at an unchanged share are kept.
    pub fn restart_window(&mut self) {
        self.window.clear();
        self.window_own.clear();
        self.recent.clear();
        self.level = None;
        self.level_at_refresh = None;
        self.end_streak();
        self.normal_streak = 0;
        self.slow_in_generation = 0;
        self.normal_in_generation = 0;
        self.last_sampled = None;
    }

    pub fn window_ms(&self) -> Vec<f64> {
        self.window.iter().map(|t| t * 1e3).collect()
    }

    /// Takes one step's time per micro-batch and judges the rank. The level is the median of
    /// the window, so a spike, or a rank slow one step in three, never moves it; a CPU-quota
    /// straggler is slow in bursts (the quota runs out mid-step, then refills), and half a
    /// window of slow steps does.
    pub fn sample(
        &mut self,
        id: u64,
        step: Step,
        per_mb: f64,
        cx: &Context,
        cfg: &StragglerConfig,
    ) -> Option<FlagChange> {
        self.last_sampled = Some(step);
        if !(per_mb.is_finite() && per_mb > 0.0) {
            return None;
        }
        self.push(per_mb, cx, cfg);
        let own = self.level?;
        let peers = cx.peers.filter(|p| p.is_finite() && *p > 0.0)?;
        if cx.world < 2 {
            return None;
        }
        if cx.quiet {
            self.end_streak();
            return self.withdraw_startup_flag(id, own, peers, cx, cfg);
        }
        let bar = Bar {
            peers,
            baseline: self.baseline(cx, cfg),
            small: cx.world <= 3,
            min_excess: cfg.min_excess.as_secs_f64(),
        };
        let slow = bar.above(own, cfg.ratio);
        let severe_level = self.second_of_last_three();
        let severe = bar.above(severe_level, cfg.severe_ratio);
        if slow || severe {
            self.extend_streak(per_mb, cx, &bar, cfg);
        } else {
            self.end_streak();
            self.normal_in_generation += 1;
        }
        // A rank at a reduced share is measured on a scale biased against it: its one or few
        // micro-batches run while every peer computes (the peers finish theirs with the cores
        // to themselves), and the step's own overhead falls on fewer of them. Measured at 1.2-1.6x
        // its peers once recovered, it clears when no longer slow by the flag's own bar; if
        // that was too early, the even share shows it and the relapse doubles the next wait.
        let clear_ratio = if self.rebalanced {
            cfg.ratio
        } else {
            cfg.clear_ratio
        };
        let normal = own - peers <= bar.min_excess || own <= clear_ratio * peers;
        self.normal_streak = if normal { self.normal_streak + 1 } else { 0 };
        // Clearing needs unflag_after normal steps, doubled for each recent relapse (at most 16x).
        let clear_after = cfg.unflag_after.saturating_mul(1 << self.relapses.min(4));
        if !self.straggler && self.persistent(cfg) {
            let level = if severe { own.max(severe_level) } else { own };
            return Some(self.flag(id, step, level, &bar, cx, clear_after));
        }
        if self.straggler && self.normal_streak >= clear_after {
            self.straggler = false;
            self.flagged_at = None;
            self.relapsed = false;
            self.cleared_rebalanced = self.rebalanced;
            self.cleared_at = Some(step);
            return Some(FlagChange::Cleared {
                id,
                own_ms: own * 1e3,
                peers_ms: peers * 1e3,
            });
        }
        None
    }

    /// Adds a sample to the window; what leaves it goes to the baseline history unless the
    /// rank is suspect or flagged (a persistent slowdown never becomes its own baseline).
    fn push(&mut self, per_mb: f64, cx: &Context, cfg: &StragglerConfig) {
        let w = cfg.window.clamp(1, MAX_WINDOW);
        if self.share != Some((cx.world, cx.micro_batches)) {
            // A new share is judged on its own baseline.
            self.history.clear();
            self.share = Some((cx.world, cx.micro_batches));
        }
        self.window.push_back(per_mb);
        self.window_own.push_back(cx.step_time);
        self.recent.push_back(per_mb);
        if self.recent.len() > RECENT {
            self.recent.pop_front();
        }
        let frozen = self.slow_streak > 0 || self.straggler;
        while self.window.len() > w {
            self.window_own.pop_front();
            if let Some(old) = self.window.pop_front() {
                if !frozen {
                    self.history.push_back(old);
                }
            }
        }
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        self.level = if self.window.len() < w {
            None
        } else {
            median_of(self.window.iter())
        };
    }

    /// At worlds of 2 and 3 the peers are one or two ranks: a rank must also be slow against
    /// its own level at this share before the slowdown.
    fn baseline(&self, cx: &Context, cfg: &StragglerConfig) -> Option<f64> {
        let enough = self.history.len() >= cfg.window.clamp(1, MAX_WINDOW);
        (cx.world <= 3 && enough)
            .then(|| median_of(self.history.iter().rev().take(MAX_WINDOW)))
            .flatten()
    }

    /// The second slowest of the last three steps: above the severe bar, two of three were (a
    /// CPU quota often alternates slow and normal steps).
    fn second_of_last_three(&self) -> f64 {
        let mut last3 = [f64::NEG_INFINITY; 3];
        for (x, &t) in last3.iter_mut().zip(self.window.iter().rev()) {
            *x = t;
        }
        last3.sort_by(|a, b| b.total_cmp(a));
        last3[1]
    }

    /// A process burns a core while it starts, before it registers: a flag raised within
    /// `startup_grace` before a registration on this host is that start, not this rank (K-7).
    /// Withdrawn unless it was acted on already.
    fn withdraw_startup_flag(
        &mut self,
        id: u64,
        own: f64,
        peers: f64,
        cx: &Context,
        cfg: &StragglerConfig,
    ) -> Option<FlagChange> {
        let registered = cx.quiet_since?;
        let flagged = self.flagged_at?;
        if !self.straggler || self.rebalanced || flagged + cfg.startup_grace < registered {
            return None;
        }
        self.straggler = false;
        self.flagged_at = None;
        self.relapsed = false;
        self.normal_streak = 0;
        Some(FlagChange::Cleared {
            id,
            own_ms: own * 1e3,
            peers_ms: peers * 1e3,
        })
    }

    fn end_streak(&mut self) {
        self.slow_streak = 0;
        self.slow_time = Duration::ZERO;
        self.severe_time = Duration::ZERO;
    }

    /// One more suspect step. Only steps that were slow (severe) themselves add to the slow
    /// (severe) time: the window median stays slow for a few steps after a burst.
    fn extend_streak(&mut self, per_mb: f64, cx: &Context, bar: &Bar, cfg: &StragglerConfig) {
        self.slow_in_generation += 1;
        if self.slow_streak > 0 {
            self.slow_streak += 1;
            if bar.above(per_mb, cfg.ratio) {
                self.slow_time += cx.step_time;
            }
            if bar.above(per_mb, cfg.severe_ratio) {
                self.severe_time += cx.step_time;
            }
            return;
        }
        // The streak began at the first of the slow steps that led here, not when the
        // window's evidence caught up with them; up to two normal steps between slow ones (a CPU
        // quota refilling) does not end it.
        let (mut run, mut normals) = (0u32, 0);
        let (mut slow, mut severe) = (Duration::ZERO, Duration::ZERO);
        for (i, (&x, &own)) in self.window.iter().zip(&self.window_own).rev().enumerate() {
            if bar.above(x, cfg.ratio) {
                (run, normals) = (i as u32 + 1, 0);
                slow += own;
                if bar.above(x, cfg.severe_ratio) {
                    severe += own;
                }
            } else {
                normals += 1;
                if normals == 3 {
                    break;
                }
            }
        }
        self.slow_streak = run.max(1);
        self.slow_time = slow;
        self.severe_time = severe;
    }

    /// Slow for `flag_after` steps, and for `flag_after_time` of them, or only
    /// `severe_after_time` when some were severe: the worse the slowdown, the sooner it is
    /// certain. (A CPU quota's slow steps straddle the severe bar; a process start beside the
    /// rank seldom reaches it, and its flag clears before `act_after`.)
    fn persistent(&self, cfg: &StragglerConfig) -> bool {
        let severe = self.severe_time > Duration::ZERO;
        self.slow_streak >= cfg.flag_after
            && (self.slow_time >= cfg.flag_after_time
                || (severe && self.slow_time >= cfg.severe_after_time))
    }

    fn flag(
        &mut self,
        id: u64,
        step: Step,
        level: f64,
        bar: &Bar,
        cx: &Context,
        clear_after: u32,
    ) -> FlagChange {
        self.straggler = true;
        self.flagged_at = Some(cx.now);
        self.flag_level = level;
        let recent = self
            .cleared_at
            .is_some_and(|c| step.0.saturating_sub(c.0) <= 4 * clear_after as u64);
        self.relapses = if recent { self.relapses + 1 } else { 0 };
        self.relapsed =
            self.cleared_rebalanced && !self.rebalanced && self.normal_in_generation == 0;
        FlagChange::Flagged {
            id,
            own_ms: level * 1e3,
            peers_ms: bar.peers * 1e3,
            baseline_ms: bar.baseline.map(|b| b * 1e3),
            slow_steps: self.slow_streak,
            slow_for_ms: self.slow_time.as_millis() as u64,
            severe_for_ms: self.severe_time.as_millis() as u64,
            at_step: step,
            window_ms: self.window_ms(),
            recent_ms: self.recent.iter().map(|t| t * 1e3).collect(),
        }
    }

    /// Flagged for at least `act_after`, or slow again the moment a rebalance was undone (that
    /// is persistence already): slow for long enough to act on.
    pub fn held(&self, now: Instant, cfg: &StragglerConfig) -> bool {
        let long = self
            .flagged_at
            .is_some_and(|t| now.saturating_duration_since(t) >= cfg.act_after);
        self.straggler && (self.relapsed || long)
    }

    /// Whether a flagged rank's slowness has lasted past the cheap remedies: slow again the
    /// moment a rebalance was undone, or flagged for `evict_after` and still slow after a
    /// rebalance, or flagged that long where no split of the batch can help (one micro-batch
    /// per rank).
    pub fn persisted(&self, now: Instant, can_split: bool, cfg: &StragglerConfig) -> bool {
        let long = self
            .flagged_at
            .is_some_and(|t| now.saturating_duration_since(t) >= cfg.evict_after);
        let after_rebalance = self.rebalanced && self.slow_in_generation >= cfg.flag_after;
        self.straggler && (self.relapsed || (long && (after_rebalance || !can_split)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_exclude_the_rank_itself() {
        let p = Peers::new([1.0, 2.0, 3.0, 10.0].into_iter());
        assert_eq!(p.excluding(Some(10.0)), Some(2.0));
        assert_eq!(p.excluding(Some(1.0)), Some(3.0));
        assert_eq!(p.excluding(None), Some(2.5));
        let two = Peers::new([0.02, 0.05].into_iter());
        assert_eq!(two.excluding(Some(0.05)), Some(0.02));
        assert_eq!(two.excluding(Some(0.02)), Some(0.05));
        // Alone, or with only zero levels around: no reference at all.
        assert_eq!(Peers::new([0.04].into_iter()).excluding(Some(0.04)), None);
        assert_eq!(
            Peers::new([0.0, f64::NAN].into_iter()).excluding(None),
            None
        );
    }
}
