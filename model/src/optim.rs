//! AdamW on the flat parameter buffer, and the learning-rate schedule.

use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Learning rate at and after `decay_steps`.
    pub min_lr: f64,
    /// Linear warmup from lr/warmup_steps to lr over this many steps.
    pub warmup_steps: u64,
    /// Cosine decay from lr to min_lr ends at this step.
    pub decay_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, on 2-D parameters (matrices, embeddings) only.
    pub weight_decay: f64,
    /// Clip the global gradient L2 norm to this; 0 turns clipping off.
    pub grad_clip: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            decay_steps: 2000,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

/// Linear warmup, then cosine decay to `min_lr` at `decay_steps` (nanoGPT's schedule).
pub fn lr_at(c: &OptimConfig, step: u64) -> f64 {
    if step < c.warmup_steps {
        return c.lr * (step + 1) as f64 / c.warmup_steps as f64;
    }
    let span = c.decay_steps.saturating_sub(c.warmup_steps).max(1) as f64;
    let r = ((step - c.warmup_steps) as f64 / span).min(1.0);
    c.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * r).cos()) * (c.lr - c.min_lr)
}

/// AdamW (decoupled decay) with the same update as `torch.optim.AdamW`, on flat buffers.
pub struct AdamW {
    /// The moments of the values `base..base + m.numel()` of the flat buffer: all of them, or
    /// under ZeRO-1 (`zero.rs`) one rank's shard.
    pub m: Tensor,
    pub v: Tensor,
    /// Number of updates applied (Adam's t).
    pub t: u64,
    pub(crate) n_decay: i64,
    pub base: usize,
}

impl AdamW {
    pub fn new(params: &Tensor, n_decay: i64) -> Self {
        AdamW {
            m: params.zeros_like(),
            v: params.zeros_like(),
            t: 0,
            n_decay,
            base: 0,
        }
    }

    /// The values of the flat buffer whose moments this optimizer holds.
    pub fn covers(&self) -> std::ops::Range<usize> {
        self.base..self.base + self.m.numel()
    }

    /// Whether it holds the moments of all `n` values (no ZeRO-1 shard).
    pub fn is_whole(&self, n: usize) -> bool {
        self.covers() == (0..n)
    }

    /// Scales `grads` so that their L2 norm is at most `max_norm` (as
    /// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
    pub fn clip(grads: &mut Tensor, max_norm: f64) -> f64 {
        let norm = grads.norm().double_value(&[]);
        Self::clip_with_norm(grads, norm, max_norm);
        norm
    }

    /// `clip` when the norm is already known.
    pub fn clip_with_norm(grads: &mut Tensor, norm: f64, max_norm: f64) {
        if max_norm > 0.0 {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                let _ = grads.g_mul_scalar_(coef);
            }
        }
    }

    pub fn step(&mut self, params: &Tensor, grads: &Tensor, lr: f64, c: &OptimConfig) {
        self.t += 1;
        let t = self.t as i32;
        tch::no_grad(|| {
            let mut p = params.shallow_clone();
            if c.weight_decay != 0.0 && self.n_decay > 0 {
                let _ = p
                    .narrow(0, 0, self.n_decay)
                    .g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = self.m.lerp_(grads, 1.0 - c.beta1);
            let _ = self.v.g_mul_scalar_(c.beta2);
            let _ = self.v.addcmul_(&(grads * (1.0 - c.beta2)), grads);
            let bc1 = 1.0 - c.beta1.powi(t);
            let bc2 = 1.0 - c.beta2.powi(t);
            // In place where the arithmetic stays the same: one buffer per step, not three.
            let mut denom = self.v.sqrt();
            let _ = denom.g_div_scalar_(bc2.sqrt());
            let _ = denom.g_add_scalar_(c.eps);
            let _ = p.addcdiv_(&(&self.m * (-lr / bc1)), &denom);
        });
    }

    /// True when every element is finite (no NaN, no infinity).
    pub fn all_finite(t: &Tensor) -> bool {
        t.isfinite().all().int64_value(&[]) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_shape() {
        let c = OptimConfig::default();
        assert!((lr_at(&c, 0) - 1e-5).abs() < 1e-12);
        assert!((lr_at(&c, 99) - 1e-3).abs() < 1e-12);
        assert!((lr_at(&c, 100) - 1e-3).abs() < 1e-12);
        assert!((lr_at(&c, 2000) - 1e-4).abs() < 1e-12);
        assert!((lr_at(&c, 5000) - 1e-4).abs() < 1e-12);
        assert!(lr_at(&c, 1000) < lr_at(&c, 500));
    }

    // The update equals PyTorch's AdamW for one parameter written out by hand.
    #[test]
    fn adamw_matches_the_reference_formula() {
        let c = OptimConfig::default();
        let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5]);
        let g = Tensor::from_slice(&[0.1f32, 0.2, -0.3]);
        let mut opt = AdamW::new(&p, 2);
        opt.step(&p, &g, 0.01, &c);
        opt.step(&p, &g, 0.01, &c);
        let mut expect = [1.0f64, -2.0, 0.5];
        let gs = [0.1f64, 0.2, -0.3];
        for (i, e) in expect.iter_mut().enumerate() {
            let (mut m, mut v) = (0.0, 0.0);
            for t in 1..=2 {
                if i < 2 {
                    *e *= 1.0 - 0.01 * 0.1;
                }
                m = 0.9 * m + 0.1 * gs[i];
                v = 0.99 * v + 0.01 * gs[i] * gs[i];
                let mh = m / (1.0 - 0.9f64.powi(t));
                let vh = v / (1.0 - 0.99f64.powi(t));
                *e -= 0.01 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = Vec::<f32>::try_from(&p).unwrap();
        for (a, b) in got.iter().zip(expect) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn clip_scales_to_max_norm() {
        let mut g = Tensor::from_slice(&[3.0f32, 4.0]);
        let n = AdamW::clip(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-6);
        assert!((g.norm().double_value(&[]) - 1.0).abs() < 1e-5);
    }
}
