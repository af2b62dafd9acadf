//! One rank's training state and step: micro-batch forward/backward with accumulation into the
//! parameters' gradients, the flat gradient buffer, clipping and the AdamW update.

use crate::data::TokenFile;
use crate::gpt::Gpt;
use crate::lanes::{backward_here, Lanes, Plan};
use crate::optim::{AdamW, OptimConfig};
use crate::sampler::{mix64, permute};
use tch::{Device, Kind, Tensor};

/// Samples are windows of `block + 1` tokens at stride `block`, shifted by an offset in
/// `[0, block)` that changes every epoch so that windows do not always start at the same tokens.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    pub block: usize,
    pub seed: u64,
}

impl Windows {
    /// Samples in a token file of `len` tokens: windows that fit for any epoch offset.
    pub fn count(&self, len: usize) -> u64 {
        if len < 2 * self.block + 1 {
            return 0;
        }
        ((len - self.block) / self.block) as u64
    }

    pub fn offset(&self, epoch: u64) -> usize {
        (mix64(self.seed ^ mix64(epoch).rotate_left(17)) % self.block as u64) as usize
    }

    /// Inputs and targets [ids.len(), block] for the given sample ids.
    pub fn batch(
        &self,
        tokens: &TokenFile,
        epoch: u64,
        ids: &[u64],
        device: Device,
    ) -> (Tensor, Tensor) {
        let off = self.offset(epoch);
        let t = self.block;
        let mut buf = Vec::with_capacity(ids.len() * (t + 1));
        for &id in ids {
            tokens.extend_window(off + id as usize * t, t + 1, &mut buf);
        }
        let all = Tensor::from_slice(&buf)
            .view([ids.len() as i64, t as i64 + 1])
            .to_device(device);
        (
            all.narrow(1, 0, t as i64).contiguous(),
            all.narrow(1, 1, t as i64).contiguous(),
        )
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// Mean loss over the micro-batches this rank computed.
    pub loss: f64,
    pub grad_norm: f64,
}

pub struct Trainer {
    pub model: Gpt,
    pub opt: AdamW,
    pub optim: OptimConfig,
    /// Steps committed so far (the next step to run).
    pub step: u64,
    /// libtorch threads of this rank, and whether its micro-batches may be computed side by
    /// side on them (see `use_threads`).
    threads: usize,
    lanes_allowed: bool,
    lanes: Lanes,
    /// How micro-batches are spread over the threads until `plan_lanes` is called again.
    plan: Plan,
    /// libtorch's threads now: a step with lanes runs everything at the plan's count.
    intra: std::cell::Cell<usize>,
}

/// What a step's local half computed: the mean loss of its micro-batches, and whether the loss
/// or a gradient was non-finite.
#[derive(Debug, Clone, Copy)]
pub struct Local {
    pub loss: f64,
    pub bad: bool,
}

impl Trainer {
    pub fn new(model: Gpt, optim: OptimConfig) -> Self {
        let opt = AdamW::new(&model.params.flat, model.params.n_decay());
        Trainer {
            model,
            opt,
            optim,
            step: 0,
            threads: 0,
            lanes_allowed: false,
            lanes: Lanes::default(),
            plan: Plan::of(1, 1, false),
            intra: std::cell::Cell::new(0),
        }
    }

    /// This rank's `threads` (libtorch's are set to them), and whether several micro-batches
    /// may be computed at once, one lane per thread or group of threads (`lanes`, on CPU only:
    /// on a GPU the lanes would share one device and each hold its own activations). A model
    /// with dropout runs one lane: its masks come from libtorch's one generator, whose draws
    /// would interleave across lanes, and a run would no longer repeat itself.
    pub fn use_threads(&mut self, threads: usize, lanes: bool) {
        self.threads = threads.max(1);
        self.lanes_allowed =
            lanes && self.model.cfg.dropout == 0.0 && self.model.device() == Device::Cpu;
        self.plan_lanes(1);
    }

    /// Plans the lanes for up to `micro_batches` per step. Every rank of a group must plan for
    /// the same count (the largest share of any): the plan sets the threads the optimizer runs
    /// on, and the gradient norm and the update differ in their last bits between thread
    /// counts, which would set replicas apart.
    pub fn plan_lanes(&mut self, micro_batches: usize) {
        self.plan = Plan::of(self.threads, micro_batches, self.lanes_allowed);
        self.set_intra(self.plan.intra_threads);
    }

    /// Sets libtorch's threads only when they change: a change resizes its thread team, which
    /// measured here costs more per step than the lanes gain (and the optimizer's small passes
    /// run as fast on one thread as on two).
    fn set_intra(&self, n: usize) {
        // A trainer never told its threads (`use_threads`) leaves libtorch's as they are.
        if self.threads > 0 && self.intra.get() != n {
            tch::set_num_threads(n as i32);
            self.intra.set(n);
        }
    }

    /// Forward and backward of the given micro-batches, accumulating into the gradients. Each
    /// micro-batch's mean loss is weighted by `1 / total_micro_batches` (the count over all
    /// ranks), so that summing the ranks' gradients gives the global-batch mean exactly however
    /// unevenly the micro-batches are split. Returns the mean loss of these micro-batches.
    ///
    /// With several threads and micro-batches, the micro-batches are computed side by side,
    /// one lane per thread (`lanes`).
    pub fn accumulate(&mut self, batches: &[(Tensor, Tensor)], total_micro_batches: usize) -> f64 {
        let scale = 1.0 / total_micro_batches as f64;
        // Evaluation may have run on every thread since.
        self.set_intra(self.plan.intra_threads);
        let sum = if self.plan.lanes > 1 && batches.len() > 1 {
            self.lanes
                .accumulate(&self.model, batches, scale, self.plan)
        } else {
            backward_here(&self.model, batches, scale)
        };
        sum.double_value(&[]) / batches.len().max(1) as f64
    }

    /// The local half of a training step, the same for one process and for a rank of many:
    /// forward and backward of this process's micro-batches (see `accumulate`), and whether
    /// the result is unusable. Leaves the gradient gathered in the flat buffer. T-2: a non-finite loss or gradient anywhere means the step is
    /// not applied, whatever the gradient's norm would say.
    pub fn local_step(
        &mut self,
        batches: &[(Tensor, Tensor)],
        total_micro_batches: usize,
    ) -> Local {
        let loss = self.accumulate(batches, total_micro_batches);
        // One pass: a sum in f64 cannot overflow on finite f32 values, and any NaN or infinity
        // makes it non-finite.
        let finite_grads = self
            .model
            .params
            .flat_grads()
            .sum(Kind::Double)
            .double_value(&[])
            .is_finite();
        Local {
            loss,
            bad: !loss.is_finite() || !finite_grads,
        }
    }

    /// The accumulated gradients as one flat buffer (what a data-parallel rank allreduces).
    pub fn flat_grads(&mut self) -> &mut Tensor {
        self.model.params.flat_grads()
    }

    /// Clips the flat gradients, applies AdamW at learning rate `lr`, clears the gradients and
    /// counts the step. A non-finite gradient is refused: the gradients are cleared, parameters
    /// and optimizer state stay as they were, and `None` is returned (the caller decides whether
    /// the step is skipped or redone). Returns the gradient norm before clipping.
    pub fn apply_checked(&mut self, lr: f64) -> Option<f64> {
        let grads = self.model.params.flat_grads().shallow_clone();
        self.apply_gathered(grads, lr)
    }

    /// `apply_checked` with the gradient given as one flat buffer (e.g. the allreduced sum):
    /// it goes straight to the optimizer, without a round trip through the parameters' grads.
    pub fn apply_flat(&mut self, grads: Tensor, lr: f64) -> Option<f64> {
        self.apply_gathered(grads, lr)
    }

    fn apply_gathered(&mut self, mut grads: Tensor, lr: f64) -> Option<f64> {
        let norm = grads.norm().double_value(&[]);
        if !norm.is_finite() {
            self.model.params.zero_grads();
            return None;
        }
        AdamW::clip_with_norm(&mut grads, norm, self.optim.grad_clip);
        self.opt
            .step(&self.model.params.flat, &grads, lr, &self.optim);
        self.model.params.zero_grads();
        self.step += 1;
        Some(norm)
    }

    /// Deterministic mode's update (T-6), the same element by element as ZeRO-1's on a shard:
    /// the fused AdamW pass on the whole buffer with the summed gradient `grads`, clipped by
    /// `norm` (the caller's exact one).
    pub fn apply_fused(&mut self, grads: &[f32], norm: f64, lr: f64) {
        let mut p = self.model.params.host();
        self.opt.step_fused(&mut p, grads, lr, norm, &self.optim);
        self.model.params.set_host(&p);
        self.model.params.zero_grads();
        self.step += 1;
    }

    /// Applies a step's local half on one process: refused (None, gradients cleared) when it
    /// was bad, else as `apply_checked`.
    pub fn apply_local(&mut self, local: Local, lr: f64) -> Option<f64> {
        if local.bad {
            self.model.params.zero_grads();
            return None;
        }
        self.apply_checked(lr)
    }

    /// Single-process step: all micro-batches of the global batch on this process.
    pub fn train_step(&mut self, batches: &[(Tensor, Tensor)], lr: f64) -> StepStats {
        let loss = self.accumulate(batches, batches.len());
        let grad_norm = self.apply_checked(lr).unwrap_or(f64::NAN);
        StepStats { loss, grad_norm }
    }

    /// The summed loss of the validation sequences `ids` (each its mean over its tokens),
    /// computed `micro_batch` sequences at a time.
    pub fn val_loss_sum(
        &self,
        val: &TokenFile,
        win: Windows,
        ids: &[u64],
        micro_batch: usize,
    ) -> f64 {
        // One micro-batch at a time: on every thread.
        self.set_intra(self.threads);
        tch::no_grad(|| {
            ids.chunks(micro_batch.max(1))
                .map(|c| {
                    let (x, y) = win.batch(val, 0, c, self.model.device());
                    self.model.loss(&x, &y, false).double_value(&[]) * c.len() as f64
                })
                .sum()
        })
    }

    /// Mean loss over the validation set of `sequences` sequences (see [`val_ids`]).
    pub fn evaluate(
        &self,
        val: &TokenFile,
        win: Windows,
        sequences: usize,
        micro_batch: usize,
    ) -> Option<f64> {
        let ids = val_ids(win, val.len(), sequences);
        if ids.is_empty() {
            return None;
        }
        Some(self.val_loss_sum(val, win, &ids, micro_batch) / ids.len() as f64)
    }
}

/// The validation set: `sequences` windows of the validation tokens (all of them if there are
/// fewer), one fixed draw, so that the validation loss depends on the model only, not on the
/// micro-batch, the world size or the step it is taken at.
pub fn val_ids(win: Windows, val_tokens: usize, sequences: usize) -> Vec<u64> {
    let n = win.count(val_tokens);
    (0..(sequences as u64).min(n))
        .map(|i| permute(win.seed ^ 0x7A1, 0, i, n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn small(arch: crate::config::Arch) -> ModelConfig {
        ModelConfig {
            arch,
            vocab_size: 23,
            block_size: 8,
            n_layer: 1,
            n_head: 2,
            n_embd: 16,
            ..ModelConfig::preset("tiny").unwrap()
        }
    }

    fn trainer() -> Trainer {
        Trainer::new(
            Gpt::new(&small(crate::config::Arch::Gpt), Device::Cpu, 5).unwrap(),
            OptimConfig::default(),
        )
    }

    // T-7: the validation set is a fixed number of sequences, so its loss does not change with
    // the micro-batch it is computed in (up to summation order).
    #[test]
    fn validation_loss_does_not_depend_on_the_micro_batch() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("val.bin");
        let tokens: Vec<u8> = (0..2000u16)
            .flat_map(|i| ((i * 7 + i / 5) % 23).to_le_bytes())
            .collect();
        std::fs::write(&path, tokens).unwrap();
        let val = TokenFile::open(&path, crate::data::TokenDtype::U16, 23).unwrap();
        let win = Windows { block: 8, seed: 3 };
        let t = trainer();
        let at = |mb| t.evaluate(&val, win, 48, mb).unwrap();
        let (four, sixteen, one) = (at(4), at(16), at(1));
        assert!((four - sixteen).abs() < 1e-5, "{four} vs {sixteen}");
        assert!((four - one).abs() < 1e-5, "{four} vs {one}");
        // 48 sequences, not 48 micro-batches: asking for more than there are takes them all.
        let ids = val_ids(win, val.len(), 48);
        assert_eq!(ids.len(), 48);
        let all = val_ids(win, val.len(), 10_000);
        assert_eq!(all.len() as u64, win.count(val.len()));
        let mut sorted = all.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len(), "a sequence drawn twice");
    }

    // C-5: a part's stage runs beside the next step's forward and backward because they only
    // read the parameters and AdamW moments: a copy taken on another thread during them equals
    // one taken before, and the update (which the loop fences the copy before) changes both.
    #[test]
    fn a_stage_beside_forward_and_backward_copies_the_committed_state() {
        let mut t = trainer();
        let x = Tensor::arange(4 * 8, (Kind::Int64, Device::Cpu))
            .remainder(23)
            .view([4, 8]);
        let batches = vec![(x.shallow_clone(), (&x * 5 + 1).remainder(23))];
        t.train_step(&batches, 1e-2); // moments that are not all zero
        let n = t.model.num_params() as u64;
        let range = 3..n - 5;
        let before = crate::io::part_snapshot(&t, &range).unwrap();
        let src = crate::io::PartSource::of(&t);
        let r = range.clone();
        let copy = std::thread::spawn(move || src.snapshot_into(&r, Vec::new()));
        t.local_step(&batches, 1);
        let beside = copy.join().unwrap().unwrap();
        assert_eq!(before, beside);
        t.model.params.zero_grads();
        t.train_step(&batches, 1e-2);
        let after = crate::io::part_snapshot(&t, &range).unwrap();
        for (b, a) in before.iter().zip(&after) {
            assert_ne!(b.data, a.data, "{} did not change in an update", b.name);
        }
    }

    // D-3: weighting each micro-batch by 1/total gives the full-batch mean gradient, whether the
    // micro-batches run in one process or are split 3 + 1 over two "ranks" and summed.
    #[test]
    fn accumulation_equals_the_full_batch_gradient() {
        let x = Tensor::arange(4 * 8, (Kind::Int64, Device::Cpu))
            .remainder(23)
            .view([4, 8]);
        let y = (&x * 7 + 3).remainder(23);
        let mut full = trainer();
        full.accumulate(&[(x.copy(), y.copy())], 1);
        let g_full = full.flat_grads().copy();

        let mb: Vec<_> = (0..4)
            .map(|i| (x.narrow(0, i, 1), y.narrow(0, i, 1)))
            .collect();
        let mut a = trainer();
        a.accumulate(&mb[..3], 4);
        let mut b = trainer();
        b.accumulate(&mb[3..], 4);
        let summed = a.flat_grads().copy() + b.flat_grads().copy();
        assert!(summed.allclose(&g_full, 1e-5, 1e-6, false));
    }

    // D-3 with lanes: micro-batches computed side by side (4 over 2 lanes, 3 over 2, 5 over 3,
    // 2 over 4 threads, 1 where the group's plan has 2) give the one-after-another gradient
    // and loss up to summation order, on both architectures, and the same lanes give the same
    // bits run after run.
    #[test]
    fn lanes_give_the_sequential_gradient_and_repeat_themselves() {
        for arch in [crate::config::Arch::Gpt, crate::config::Arch::Llama] {
            let cfg = small(arch);
            let fresh = |threads: usize, planned: usize| {
                let mut t = Trainer::new(
                    Gpt::new(&cfg, Device::Cpu, 5).unwrap(),
                    OptimConfig::default(),
                );
                t.use_threads(threads, true);
                t.plan_lanes(planned);
                t
            };
            let x = Tensor::arange(5 * 8, (Kind::Int64, Device::Cpu))
                .remainder(23)
                .view([5, 8]);
            let y = (&x * 7 + 3).remainder(23);
            let mb: Vec<_> = (0..5)
                .map(|i| (x.narrow(0, i, 1), y.narrow(0, i, 1)))
                .collect();
            // (micro-batches here, threads, the group's largest share)
            for (n, threads, planned) in [(4, 2, 4), (3, 2, 3), (5, 3, 5), (1, 2, 2), (2, 4, 4)] {
                let mut one = fresh(1, n);
                let l1 = one.accumulate(&mb[..n], 5);
                let g1 = one.flat_grads().copy();
                let mut side = fresh(threads, planned);
                let l2 = side.accumulate(&mb[..n], 5);
                let g2 = side.flat_grads().copy();
                assert!((l1 - l2).abs() < 1e-6, "{arch:?} {n}: loss {l1} vs {l2}");
                assert!(
                    g1.allclose(&g2, 1e-5, 1e-7, false),
                    "{arch:?} {n} micro-batches"
                );
                let mut again = fresh(threads, planned);
                again.accumulate(&mb[..n], 5);
                assert!(
                    again.flat_grads().equal(&g2),
                    "{arch:?} {n}: lanes not repeatable"
                );
            }
        }
    }

    // T-2: a non-finite gradient leaves parameters and optimizer state untouched.
    #[test]
    fn non_finite_gradient_is_not_applied() {
        let mut t = trainer();
        let before = t.model.params.flat.copy();
        let mut g = t.model.params.flat.zeros_like();
        let _ = g.fill_(f64::NAN);
        t.model.params.set_flat_grads(&g);
        assert!(t.apply_checked(1e-3).is_none());
        assert!(t.model.params.flat.equal(&before));
        assert_eq!(t.opt.t, 0);
        assert_eq!(t.step, 0);
    }

    // T-2, one rule for one process and for a rank of many (both call `local_step`): a NaN in
    // a weight makes the step bad, and a bad step changes nothing.
    #[test]
    fn a_non_finite_loss_makes_the_local_step_bad() {
        let x = Tensor::arange(8, (Kind::Int64, Device::Cpu)).view([1, 8]);
        let y = (&x + 1).remainder(23);
        let mut t = trainer();
        let good = t.local_step(&[(x.copy(), y.copy())], 1);
        assert!(!good.bad && good.loss.is_finite());
        t.model.params.zero_grads();
        let _ = tch::no_grad(|| t.model.params.flat.get(0).fill_(f64::NAN));
        let before = t.model.params.flat.copy();
        let bad = t.local_step(&[(x, y)], 1);
        assert!(bad.bad, "{bad:?}");
        assert!(t.apply_local(bad, 1e-3).is_none());
        assert!(t.model.params.flat.allclose(&before, 0.0, 0.0, true));
        assert_eq!(t.step, 0);
    }
}
