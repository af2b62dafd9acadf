//! Deterministic mode's fixed-point gradient sum (T-6): order-independent, so bitwise equal
//! across worlds.

use super::*;

/// Deterministic mode: every micro-batch's gradient alone (dropout seeded by step and
/// micro-batch), summed as exact fixed-point integers and encoded for an allreduce whose
/// result does not depend on the order or grouping of the sum. Returns the local mean loss,
/// the encoded buffer and whether any gradient or loss was non-finite.
pub(super) fn deterministic_grads(
    s: &mut Setup,
    batches: &[(Tensor, Tensor)],
    mine: std::ops::Range<usize>,
    mbs: usize,
    step: u64,
    seed: u64,
) -> (f64, Vec<f32>, bool) {
    let n = s.trainer.model.num_params() as usize;
    let mut acc = vec![0i64; n];
    let (mut loss, mut bad) = (0.0, false);
    for (i, mb) in mine.enumerate() {
        tch::manual_seed(
            phalanx_model::sampler::mix64(seed ^ step.rotate_left(20) ^ mb as u64) as i64,
        );
        s.trainer.model.params.zero_grads();
        let l = s.trainer.accumulate(&batches[i..i + 1], mbs);
        let g = tensor_vec(s.trainer.flat_grads());
        bad |= !l.is_finite() || g.iter().any(|x| !x.is_finite());
        loss += l;
        fixed::add(&mut acc, &g);
    }
    s.trainer.model.params.zero_grads();
    (loss / batches.len().max(1) as f64, fixed::encode(&acc), bad)
}

/// Exact, order-independent sums of f32 gradients: fixed point with 40 fractional bits in
/// i64, carried through an f32 allreduce as four 16-bit limbs of a biased u64. A limb sum over
/// up to 256 ranks stays below 2^24, where f32 holds every integer exactly, so the allreduced
/// limbs are the same whatever order the ring adds them in.
pub mod fixed {
    const FRAC: i32 = 40;
    /// |gradient element| is clamped below 2^15 so that 64 micro-batches cannot overflow.
    const LIMIT: f64 = 32767.0;
    const BIAS: i128 = 1 << 62;

    pub fn add(acc: &mut [i64], g: &[f32]) {
        let scale = (2f64).powi(FRAC);
        for (a, x) in acc.iter_mut().zip(g) {
            let v = if x.is_finite() {
                (*x as f64).clamp(-LIMIT, LIMIT)
            } else {
                0.0
            };
            *a += (v * scale).round() as i64;
        }
    }

    pub fn encode(acc: &[i64]) -> Vec<f32> {
        let mut out = Vec::with_capacity(acc.len() * 4);
        for &a in acc {
            let u = (a as i128 + BIAS) as u64;
            for l in 0..4 {
                out.push(((u >> (16 * l)) & 0xFFFF) as f32);
            }
        }
        out
    }

    /// The sum over `world` ranks' encodings, back to f32.
    pub fn decode(limbs: &[f32], world: u32) -> Vec<f32> {
        let scale = (2f64).powi(-FRAC);
        limbs
            .chunks_exact(4)
            .map(|c| {
                let total: i128 = c
                    .iter()
                    .enumerate()
                    .map(|(l, v)| (*v as i128) << (16 * l))
                    .sum::<i128>()
                    - BIAS * world as i128;
                (total as f64 * scale) as f32
            })
            .collect()
    }
}
