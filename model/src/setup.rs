//! What a training run builds before its first step: the dataset, the model and its optimizer,
//! the sampler and the sample windows, on one device with a thread count.

use crate::config::ModelConfig;
use crate::data::Dataset;
use crate::device::{resolve_device, set_threads};
use crate::error::ModelError;
use crate::gpt::Gpt;
use crate::optim::OptimConfig;
use crate::sampler::Sampler;
use crate::trainer::{Trainer, Windows};
use crate::Result;
use std::path::Path;

/// Everything a training run needs before its first step.
pub struct Setup {
    pub ds: Dataset,
    pub trainer: Trainer,
    pub sampler: Sampler,
    pub win: Windows,
    pub threads: usize,
}

/// The parts of a run's configuration that decide what is built.
pub struct SetupSpec<'a> {
    pub data_dir: &'a Path,
    pub device: &'a str,
    /// 0 = one per core.
    pub threads: usize,
    /// Micro-batches side by side, one per thread (`crate::lanes`).
    pub lanes: bool,
    pub seed: u64,
    pub global_batch: usize,
    pub micro_batch: usize,
    pub optim: OptimConfig,
}

impl Setup {
    /// Opens the dataset and builds the model `model(vocab_size)` describes: the vocabulary is
    /// the dataset's, so the model's shape is known only once the data is open.
    pub fn build(
        spec: &SetupSpec,
        model: impl FnOnce(usize) -> Result<ModelConfig>,
    ) -> Result<Setup> {
        let threads = set_threads(spec.threads);
        let device = resolve_device(spec.device)?;
        let ds = Dataset::open(spec.data_dir)?;
        let mcfg = model(ds.meta.vocab_size)?;
        let win = Windows {
            block: mcfg.block_size,
            seed: spec.seed,
        };
        let n = win.count(ds.train.len());
        if n == 0 {
            return Err(ModelError::TooFewTokens {
                dir: spec.data_dir.to_path_buf(),
                tokens: ds.train.len(),
                block: mcfg.block_size,
            });
        }
        let sampler = Sampler::new(spec.seed, n, spec.global_batch, spec.micro_batch)?;
        let model = Gpt::new(&mcfg, device, spec.seed as i64)?;
        let mut trainer = Trainer::new(model, spec.optim.clone());
        trainer.use_threads(threads, spec.lanes);
        // One process computes them all; a rank of a job plans again for its group's shares.
        trainer.plan_lanes(sampler.micro_batches_per_step());
        Ok(Setup {
            ds,
            trainer,
            sampler,
            win,
            threads,
        })
    }
}
