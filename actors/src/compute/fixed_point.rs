//! Deterministic mode's fixed-point gradient sum (T-6): order-independent, so bitwise equal
//! across worlds.

use super::*;
use tch::{Device, Kind};

/// Deterministic mode: every micro-batch's gradient alone (dropout seeded by step and
/// micro-batch), converted to fixed point and summed as exact integers, which the allreduce
/// sums on as integers (P-12), so the result does not depend on the order or grouping of the
/// sum. Returns the local mean loss, the integer sum in `out` (capacity kept across steps, room
/// for the allreduce's extras included) and whether any gradient or loss was non-finite.
pub(super) fn deterministic_grads(
    s: &mut Setup,
    batches: &[(Tensor, Tensor)],
    mine: std::ops::Range<usize>,
    (mbs, world): (usize, u32),
    (step, seed): (u64, u64),
    mut out: Vec<i64>,
) -> (f64, Vec<i64>, bool) {
    let n = s.trainer.model.num_params() as usize;
    let mut acc = Tensor::zeros([n as i64], (Kind::Int64, s.trainer.model.device()));
    let (mut loss, mut bad) = (0.0, false);
    for (i, mb) in mine.enumerate() {
        tch::manual_seed(
            phalanx_model::sampler::mix64(seed ^ step.rotate_left(20) ^ mb as u64) as i64,
        );
        s.trainer.model.params.zero_grads();
        let l = s.trainer.accumulate(&batches[i..i + 1], mbs);
        let g = s.trainer.flat_grads();
        // One pass finds the range, with any NaN or infinity in it. A bad micro-batch's
        // gradient is left out: every rank skips the step anyway (T-2).
        let (lo, hi) = g.aminmax(None, false);
        let range = (lo.double_value(&[]), hi.double_value(&[]));
        let finite = l.is_finite() && range.0.is_finite() && range.1.is_finite();
        bad |= !finite;
        loss += l;
        if finite {
            let _ = acc.g_add_(&fixed::quantize_in_place(g, range));
        }
    }
    s.trainer.model.params.zero_grads();
    out.clear();
    out.reserve(n + verdict::extras(world));
    out.resize(n, 0);
    acc.to_device(Device::Cpu).copy_data(&mut out, n);
    (loss / batches.len().max(1) as f64, out, bad)
}

/// Exact, order-independent sums of f32 gradients: fixed point with 40 fractional bits in
/// i64. A micro-batch's gradient is clamped below 2^15, so its fixed point is below 2^55 and
/// the 64 micro-batches deterministic mode allows sum below 2^61: the integer sum over the
/// ranks is exact whatever order the collective adds in (P-12).
pub mod fixed {
    use tch::{Kind, Tensor};

    pub const FRAC: i32 = 40;
    /// |gradient element| is clamped below 2^15 so that 64 micro-batches cannot overflow.
    const LIMIT: f64 = 32767.0;

    /// A finite gradient whose values lie in `range` in fixed point (i64): clamped (only if
    /// the range goes past the limit), scaled in place (`g` is left scaled) and truncated
    /// toward zero by the conversion. Every step is exact: the scale is a power of two and the
    /// scaled values stay below 2^55, so the result does not depend on how libtorch splits the
    /// work. (Truncation, not rounding: one pass fewer, and a bias of at most 2^-40 per element
    /// and micro-batch, far below the gradient's own f32 rounding.)
    pub fn quantize_in_place(g: &mut Tensor, range: (f64, f64)) -> Tensor {
        if range.0 < -LIMIT || range.1 > LIMIT {
            let _ = g.clamp_(-LIMIT, LIMIT);
        }
        let _ = g.g_mul_scalar_(2f64.powi(FRAC));
        g.to_kind(Kind::Int64)
    }

    /// Bits of a square of a fixed-point value dropped before the sum of squares: what is left
    /// has 56 fractional bits.
    const SQ_DROP: u32 = 2 * FRAC as u32 - 56;

    /// The sum of squares of a fixed-point gradient, exact (each square is truncated to 56
    /// fractional bits first), so the shards' sums add up to the whole's whatever the cut and
    /// deterministic mode clips by the same norm at any world (T-6, Z-1). A square is below
    /// 2^122 and keeps below 2^98 after the drop: 2^30 of them (a billion parameters, far more
    /// than a rank holds here) fit the u128.
    pub fn sum_of_squares(sums: &[i64]) -> u128 {
        debug_assert!(sums.len() <= 1 << 30, "the sum of squares could overflow");
        sums.iter()
            .map(|&v| {
                let s = i128::from(v);
                ((s * s) as u128) >> SQ_DROP
            })
            .sum()
    }

    /// The norm of a [`sum_of_squares`].
    pub fn norm(sum_of_squares: u128) -> f64 {
        (sum_of_squares as f64 * 2f64.powi(-56)).sqrt()
    }

    /// A sum of fixed-point gradients back to f32.
    pub fn decode(sum: &[i64]) -> Vec<f32> {
        let scale = 2f64.powi(-FRAC);
        sum.iter().map(|&v| (v as f64 * scale) as f32).collect()
    }

    /// A loss part or flag in the fixed point a deterministic step's allreduce carries; a
    /// non-finite part counts as 0 (its rank flags itself, and the step shows no loss).
    pub fn of(x: f64) -> i64 {
        if x.is_finite() {
            (x * 2f64.powi(FRAC)).round() as i64
        } else {
            0
        }
    }

    /// [`of`] back to f64.
    pub fn value(v: i64) -> f64 {
        v as f64 * 2f64.powi(-FRAC)
    }
}
