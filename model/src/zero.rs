//! ZeRO-1's optimizer: each rank keeps the AdamW moments of one shard of the flat parameter
//! buffer, cut by the checkpoint plan (`part_range`, aligned to blocks of `ALIGN` values), and
//! updates only that shard's parameters (which are f32 on every rank: they are their own
//! master copy).
//!
//! The update is one fused pass over host slices, element by element in plain IEEE f32 (Rust
//! contracts no multiply-add on its own), so a value's update does not depend on where its
//! shard starts or how many ranks share the buffer: sharded over any world it is bitwise the
//! update of the whole buffer.

use crate::optim::{AdamW, OptimConfig};
use phalanx_checkpoint::sharded::part_range;
use rayon::prelude::*;
use std::ops::Range;
use tch::Tensor;

/// Elements per parallel task: large enough that a task outweighs its scheduling.
const TASK: usize = 1 << 16;

/// The shard of a flat buffer of `total` values that `rank` of `world` owns.
pub fn shard_range(total: usize, world: u32, rank: u32) -> Range<usize> {
    let r = part_range(total as u64, world, rank);
    r.start as usize..r.end as usize
}

/// Every rank's shard, in rank order: the segments of the reduce-scatter and the allgather.
pub fn shard_plan(total: usize, world: u32) -> Vec<Range<usize>> {
    (0..world.max(1))
        .map(|r| shard_range(total, world, r))
        .collect()
}

/// The scalars of one AdamW update, computed once per step as `torch.optim.AdamW` does.
#[derive(Debug, Clone, Copy)]
pub struct Update {
    /// Multiplies the gradient (clipping); 1 when the norm is within bounds.
    pub grad_scale: f32,
    pub decay: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl Update {
    /// Update number `t` (1-based) at learning rate `lr`, with the gradient norm `norm` before
    /// clipping.
    pub fn new(c: &OptimConfig, lr: f64, t: u64, norm: f64) -> Self {
        let coef = c.grad_clip / (norm + 1e-6);
        let t = t.min(i32::MAX as u64) as i32;
        Update {
            grad_scale: if c.grad_clip > 0.0 && coef < 1.0 {
                coef as f32
            } else {
                1.0
            },
            decay: (1.0 - lr * c.weight_decay) as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            step_size: (-lr / (1.0 - c.beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
            eps: c.eps as f32,
        }
    }

    /// One element: parameter `p`, gradient `g`, moments `m` and `v`; `decays` for matrices
    /// and embeddings.
    #[inline(always)]
    fn apply(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32, decays: bool) {
        let g = g * self.grad_scale;
        if decays {
            *p *= self.decay;
        }
        // lerp with a weight below 0.5, as torch computes it: m + w (g - m).
        *m += self.one_minus_beta1 * (g - *m);
        *v = *v * self.beta2 + (g * self.one_minus_beta2) * g;
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        *p += (*m * self.step_size) / denom;
    }
}

/// AdamW over host slices: `p`, `g`, `m`, `v` of one length, the first `decay_len` values
/// decayed. Parallel over fixed tasks; the result does not depend on them.
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decay_len: usize, u: &Update) {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len());
    p.par_chunks_mut(TASK)
        .zip(g.par_chunks(TASK))
        .zip(m.par_chunks_mut(TASK))
        .zip(v.par_chunks_mut(TASK))
        .enumerate()
        .for_each(|(task, (((p, g), m), v))| {
            let cut = decay_len.saturating_sub(task * TASK).min(p.len());
            let (pd, pr) = p.split_at_mut(cut);
            let (md, mr) = m.split_at_mut(cut);
            let (vd, vr) = v.split_at_mut(cut);
            adamw_run::<true>(pd, &g[..cut], md, vd, u);
            adamw_run::<false>(pr, &g[cut..], mr, vr, u);
        });
}

/// A run of values that all decay or all do not: a loop without a branch, which the compiler
/// vectorizes (the same IEEE operations per element, so the same bits).
fn adamw_run<const DECAYS: bool>(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    u: &Update,
) {
    for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        u.apply(p, *g, m, v, DECAYS);
    }
}

/// Sum of squares of `g` in f64, over fixed blocks added in order: the same figure on every
/// rank for the same values.
pub fn sum_of_squares(g: &[f32]) -> f64 {
    g.par_chunks(TASK)
        .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
        .collect::<Vec<f64>>()
        .into_iter()
        .sum()
}

/// Host copy of a flat tensor.
fn host(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu).view([-1])).unwrap_or_default()
}

impl AdamW {
    /// Keeps the moments of `range` only (this rank's shard), given as `m` and `v`.
    pub fn set_shard(&mut self, range: Range<usize>, m: &[f32], v: &[f32]) {
        assert!(m.len() == range.len() && v.len() == range.len());
        let dev = self.m.device();
        self.m = Tensor::from_slice(m).to_device(dev);
        self.v = Tensor::from_slice(v).to_device(dev);
        self.base = range.start;
    }

    /// Host copies of the moments this optimizer holds.
    pub fn moments(&self) -> (Vec<f32>, Vec<f32>) {
        (host(&self.m), host(&self.v))
    }

    /// One update of the values this optimizer covers: `p` their parameters (updated in
    /// place), `g` their summed gradient, `norm` the whole gradient's norm before clipping.
    pub fn step_fused(&mut self, p: &mut [f32], g: &[f32], lr: f64, norm: f64, c: &OptimConfig) {
        let (m, v) = self.fused_update(p, g, lr, norm, c);
        self.keep_update(m, v);
    }

    /// [`step_fused`](Self::step_fused) without keeping its moments: the new ones are
    /// returned, for [`keep_update`](Self::keep_update) once the step commits.
    pub fn fused_update(
        &self,
        p: &mut [f32],
        g: &[f32],
        lr: f64,
        norm: f64,
        c: &OptimConfig,
    ) -> (Vec<f32>, Vec<f32>) {
        let u = Update::new(c, lr, self.t + 1, norm);
        let (mut m, mut v) = self.moments();
        let decay_len = (self.n_decay.max(0) as usize)
            .saturating_sub(self.base)
            .min(p.len());
        adamw(p, g, &mut m, &mut v, decay_len, &u);
        (m, v)
    }

    /// Keeps the moments of a [`fused_update`](Self::fused_update) and counts it.
    pub fn keep_update(&mut self, m: Vec<f32>, v: Vec<f32>) {
        let dev = self.m.device();
        self.m = Tensor::from_slice(&m).to_device(dev);
        self.v = Tensor::from_slice(&v).to_device(dev);
        self.t += 1;
    }

    /// Bytes of optimizer state held (both moments).
    pub fn state_bytes(&self) -> usize {
        8 * self.m.numel()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The optimizer of `range` of `flat` (moments zero) and its parameters.
    fn shard(flat: &[f32], range: Range<usize>, n_decay: usize) -> (AdamW, Vec<f32>) {
        let mut o = AdamW::new(&Tensor::from_slice(flat), n_decay as i64);
        let zeros = vec![0.0; range.len()];
        o.set_shard(range.clone(), &zeros, &zeros);
        (o, flat[range].to_vec())
    }

    fn values(n: usize, salt: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = ((i as u32).wrapping_mul(2654435761) ^ salt.wrapping_mul(40503)) % 10007;
                (x as f32 - 5000.0) * 1e-4 * 10f32.powi((i % 5) as i32 - 2)
            })
            .collect()
    }

    fn cfg() -> OptimConfig {
        OptimConfig {
            grad_clip: 1.0,
            ..OptimConfig::default()
        }
    }

    // The fused pass is AdamW as torch writes it: a few steps match the libtorch update on the
    // whole buffer to float rounding.
    #[test]
    fn the_fused_pass_matches_the_libtorch_update() {
        let n = 3000;
        let (c, n_decay) = (cfg(), 1700);
        let flat = values(n, 1);
        let p = Tensor::from_slice(&flat);
        let mut torch = AdamW::new(&p, n_decay as i64);
        let (mut mine, mut master) = shard(&flat, 0..n, n_decay);
        for t in 0..4u32 {
            let g = values(n, 7 + t);
            let norm = sum_of_squares(&g).sqrt();
            let mut gt = Tensor::from_slice(&g);
            AdamW::clip_with_norm(&mut gt, norm, c.grad_clip);
            torch.step(&p, &gt, 1e-3, &c);
            mine.step_fused(&mut master, &g, 1e-3, norm, &c);
        }
        let want = Vec::<f32>::try_from(&p).unwrap();
        for (i, (a, b)) in master.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{i}: {a} vs {b}");
        }
        assert!(master.iter().zip(&flat).any(|(a, b)| a != b));
    }

    // ZeRO-1's promise: cut over any world by the plan, the shards' updates are bitwise the
    // whole buffer's, decay boundary and clipping included.
    #[test]
    fn sharded_over_any_world_is_bitwise_the_whole_update() {
        let n = 256 * 11 + 37;
        let (c, n_decay) = (cfg(), 256 * 6 + 100);
        let flat = values(n, 3);
        let grads: Vec<Vec<f32>> = (0..3).map(|t| values(n, 20 + t)).collect();
        let run = |world: u32| -> Vec<u32> {
            let mut shards: Vec<(AdamW, Vec<f32>)> = shard_plan(n, world)
                .into_iter()
                .map(|r| shard(&flat, r, n_decay))
                .collect();
            for g in &grads {
                let norm = sum_of_squares(g).sqrt();
                for (o, p) in &mut shards {
                    let r = o.covers();
                    o.step_fused(p, &g[r], 1e-2, norm, &c);
                }
            }
            shards
                .iter()
                .flat_map(|(_, p)| p.iter().map(|x| x.to_bits()))
                .collect()
        };
        let whole = run(1);
        assert_eq!(whole.len(), n);
        for world in [2, 3, 4, 5, 8, 16] {
            assert_eq!(run(world), whole, "world {world}");
        }
    }

    #[test]
    fn the_plan_covers_the_buffer_in_aligned_shards() {
        for total in [0usize, 1, 255, 256, 257, 10_000, 1_000_003] {
            for world in 1..=7 {
                let plan = shard_plan(total, world);
                assert_eq!(plan.len(), world as usize);
                assert_eq!(plan[0].start, 0);
                assert_eq!(plan.last().unwrap().end, total);
                for w in plan.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[1].start % 256 == 0 || w[1].start == total);
                }
            }
        }
    }

    #[test]
    fn a_shard_holds_a_third_of_the_state_of_three() {
        let n = 256 * 30;
        let flat = values(n, 5);
        let (one, _) = shard(&flat, 0..n, 0);
        let (third, _) = shard(&flat, shard_range(n, 3, 1), 0);
        assert_eq!(one.state_bytes(), 8 * n);
        assert_eq!(third.state_bytes() * 3, one.state_bytes());
        assert_eq!(third.covers(), shard_range(n, 3, 1));
    }
}
