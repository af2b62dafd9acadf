//! Saving and loading a model (and its optimizer state) through the checkpoint format.
//!
//! The checkpoint crate knows files and digests; this room knows which tensors make a model.

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gpt::Gpt;
use crate::tokenizer::Tokenizer;
use crate::trainer::Trainer;
use crate::Result;
use phalanx_checkpoint::{sharded, Contents, TensorData};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::Path;
use tch::Device;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIM_FILE: &str = "optimizer.safetensors";
pub const MODEL_JSON: &str = "model.json";

/// `model.json`: how to rebuild the model and its tokenizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub model: ModelConfig,
    pub tokenizer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<String>,
    pub step: u64,
    pub adam_t: u64,
}

fn flat_tensor(name: &str, t: &tch::Tensor) -> Result<TensorData> {
    let data = Vec::<f32>::try_from(&t.to_device(Device::Cpu).view([-1]))?;
    Ok(TensorData {
        name: name.into(),
        shape: vec![data.len()],
        data,
    })
}

/// A copy of the model and optimizer state, ready to be written by [`write`] on any thread.
pub fn snapshot(trainer: &Trainer, tokenizer: &str, vocab: Option<String>) -> Result<Contents> {
    let mut c = Contents::default();
    let params = trainer
        .model
        .params
        .export()
        .into_iter()
        .map(|(name, shape, data)| TensorData { name, shape, data })
        .collect();
    c.tensors.insert(MODEL_FILE.into(), params);
    // Under ZeRO-1 no rank holds all the moments: the model is saved without them (its
    // checkpoints hold them, one shard per part).
    if trainer.opt.is_whole(trainer.model.num_params() as usize) {
        c.tensors.insert(
            OPTIM_FILE.into(),
            vec![
                flat_tensor("exp_avg", &trainer.opt.m)?,
                flat_tensor("exp_avg_sq", &trainer.opt.v)?,
            ],
        );
    }
    let info = ModelInfo {
        model: trainer.model.cfg.clone(),
        tokenizer: tokenizer.into(),
        vocab,
        step: trainer.step,
        adam_t: trainer.opt.t,
    };
    c.json.insert(
        MODEL_JSON.into(),
        serde_json::to_value(info).expect("ModelInfo serializes"),
    );
    Ok(c)
}

/// The names of the flat tensors in a part of a sharded checkpoint (C-5).
pub const FLAT_PARAMS: &str = "params";
pub const FLAT_EXP_AVG: &str = "exp_avg";
pub const FLAT_EXP_AVG_SQ: &str = "exp_avg_sq";

/// `range` of a flat tensor `t` that holds the values from `base` on, copied into `buf` (grown
/// only when too small: a buffer a previous save handed back costs no allocation and no first
/// touch of fresh pages).
fn flat_slice_into(
    name: &str,
    (t, base): &(tch::Tensor, u64),
    range: &Range<u64>,
    mut buf: Vec<f32>,
) -> Result<TensorData> {
    let len = (range.end - range.start) as usize;
    let held = *base..*base + t.numel() as u64;
    if range.start < held.start || range.end > held.end {
        return Err(ModelError::Parameter {
            name: name.into(),
            reason: format!(
                "values {range:?} asked of a tensor that holds {held:?}; a checkpoint part must \
                 be cut by the plan of the ZeRO-1 shards (a bug: please report it)"
            ),
        });
    }
    let part = t
        .detach()
        .to_device(Device::Cpu)
        .view([-1])
        .narrow(0, (range.start - base) as i64, len as i64)
        .contiguous();
    buf.resize(len, 0.0);
    part.f_copy_data(&mut buf, len)?;
    Ok(TensorData {
        name: name.into(),
        shape: vec![len],
        data: buf,
    })
}

/// A copy of this rank's range of the flat parameters and AdamW moments (the part it writes).
pub fn part_snapshot(trainer: &Trainer, range: &Range<u64>) -> Result<Vec<TensorData>> {
    part_snapshot_into(trainer, range, Vec::new())
}

/// [`part_snapshot`] into the buffers of an earlier part (C-5: the stage the training loop
/// waits for is then a copy into memory it already holds).
pub fn part_snapshot_into(
    trainer: &Trainer,
    range: &Range<u64>,
    buffers: Vec<Vec<f32>>,
) -> Result<Vec<TensorData>> {
    PartSource::of(trainer).snapshot_into(range, buffers)
}

/// The flat tensors a checkpoint part is copied from, sharing the trainer's storage (no copy).
/// A stage can then run on another thread while the next step's forward and backward only
/// read them; whoever holds one must let it finish before the parameters or the AdamW moments
/// are written again (C-5).
pub struct PartSource {
    /// Each tensor with the first flat value it holds (the moments of a ZeRO-1 shard start at
    /// the shard).
    tensors: [(&'static str, (tch::Tensor, u64)); 3],
}

impl PartSource {
    pub fn of(trainer: &Trainer) -> PartSource {
        let base = trainer.opt.base as u64;
        PartSource {
            tensors: [
                (FLAT_PARAMS, (trainer.model.params.flat.shallow_clone(), 0)),
                (FLAT_EXP_AVG, (trainer.opt.m.shallow_clone(), base)),
                (FLAT_EXP_AVG_SQ, (trainer.opt.v.shallow_clone(), base)),
            ],
        }
    }

    /// `range` of each flat tensor, copied into `buffers` (reused when given).
    pub fn snapshot_into(
        &self,
        range: &Range<u64>,
        mut buffers: Vec<Vec<f32>>,
    ) -> Result<Vec<TensorData>> {
        // Grad mode is per thread: a stage on its own thread records no graph either.
        tch::no_grad(|| {
            self.tensors
                .iter()
                .map(|(name, t)| flat_slice_into(name, t, range, buffers.pop().unwrap_or_default()))
                .collect()
        })
    }
}

/// Rank 0's side file of a sharded checkpoint: how to rebuild the model and where training is.
pub fn meta(trainer: &Trainer, tokenizer: &str, vocab: Option<String>) -> serde_json::Value {
    serde_json::to_value(ModelInfo {
        model: trainer.model.cfg.clone(),
        tokenizer: tokenizer.into(),
        vocab,
        step: trainer.step,
        adam_t: trainer.opt.t,
    })
    .expect("ModelInfo serializes")
}

/// Puts a verified sharded checkpoint into `trainer`, whatever world wrote it (the parts are
/// put together here). Returns its step.
pub fn restore_sharded(v: &sharded::Verified, trainer: &mut Trainer) -> Result<u64> {
    let bad = |reason: String| ModelError::NotAModel {
        path: v.dir.clone(),
        reason,
    };
    let info: ModelInfo = serde_json::from_value(v.json(sharded::META)?)
        .map_err(|e| bad(format!("{} is invalid: {e}", sharded::META)))?;
    if info.model != trainer.model.cfg {
        return Err(bad("is a checkpoint of another model configuration; \
                        resume with the config that wrote it"
            .into()));
    }
    let n = trainer.model.num_params() as u64;
    if v.total()? != n {
        return Err(bad(format!(
            "holds {} values, the model has {n}",
            v.total()?
        )));
    }
    let dev = trainer.model.device();
    // Whole tensors, or the values a ZeRO-1 shard's moments hold.
    let put = |dst: &tch::Tensor, name: &str, from: usize| -> Result<()> {
        let data = v.assemble(name)?;
        let len = dst.numel();
        tch::no_grad(|| {
            dst.view([-1])
                .copy_(&tch::Tensor::from_slice(&data[from..from + len]).to_device(dev))
        });
        Ok(())
    };
    put(&trainer.model.params.flat, FLAT_PARAMS, 0)?;
    put(&trainer.opt.m, FLAT_EXP_AVG, trainer.opt.base)?;
    put(&trainer.opt.v, FLAT_EXP_AVG_SQ, trainer.opt.base)?;
    trainer.step = info.step;
    trainer.opt.t = info.adam_t;
    trainer.model.params.zero_grads();
    Ok(info.step)
}

/// Writes a snapshot atomically (C-1): the directory is complete and verifiable, or absent.
pub fn write(dir: &Path, step: u64, c: &Contents) -> Result<()> {
    phalanx_checkpoint::save(dir, step, c).map_err(|source| ModelError::Save {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(())
}

pub fn save(dir: &Path, trainer: &Trainer, tokenizer: &str, vocab: Option<String>) -> Result<()> {
    let c = snapshot(trainer, tokenizer, vocab)?;
    write(dir, trainer.step, &c)
}

/// Puts a saved model and its optimizer state into `trainer` (a rollback). The checkpoint is
/// verified first and must be of the same model; returns its step.
pub fn restore(dir: &Path, trainer: &mut Trainer) -> Result<u64> {
    let (_, contents) = phalanx_checkpoint::load(dir)?;
    let bad = |reason: String| ModelError::NotAModel {
        path: dir.to_path_buf(),
        reason,
    };
    let info: ModelInfo = contents
        .json
        .get(MODEL_JSON)
        .ok_or_else(|| bad(format!("has no {MODEL_JSON}")))
        .and_then(|v| {
            serde_json::from_value(v.clone())
                .map_err(|e| bad(format!("{MODEL_JSON} is invalid: {e}")))
        })?;
    if info.model != trainer.model.cfg {
        return Err(bad("is a checkpoint of another model configuration".into()));
    }
    let params = contents
        .tensors
        .get(MODEL_FILE)
        .ok_or_else(|| bad(format!("has no {MODEL_FILE}")))?;
    let optim = contents
        .tensors
        .get(OPTIM_FILE)
        .ok_or_else(|| bad(format!("has no {OPTIM_FILE}")))?;
    let moment = |name: &str| {
        optim
            .iter()
            .find(|t| t.name == name)
            .filter(|t| t.data.len() as i64 == trainer.model.num_params())
            .ok_or_else(|| bad(format!("{OPTIM_FILE} has no {name} of the model's size")))
    };
    let (m, v) = (moment("exp_avg")?, moment("exp_avg_sq")?);
    let tensors: Vec<_> = params
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.data.clone()))
        .collect();
    trainer.model.params.import(&tensors)?;
    let dev = trainer.model.device();
    tch::no_grad(|| {
        trainer
            .opt
            .m
            .copy_(&tch::Tensor::from_slice(&m.data).to_device(dev));
        trainer
            .opt
            .v
            .copy_(&tch::Tensor::from_slice(&v.data).to_device(dev));
    });
    trainer.step = info.step;
    trainer.opt.t = info.adam_t;
    trainer.model.params.zero_grads();
    Ok(info.step)
}

/// The newest committed checkpoint under `dir` (`step-N` folders) from before `step` that
/// verifies, and the newer ones skipped with why (C-6).
pub fn latest_checkpoint(
    dir: &Path,
    before: u64,
) -> (
    Option<sharded::Verified>,
    Vec<(std::path::PathBuf, phalanx_checkpoint::CheckpointError)>,
) {
    sharded::newest_valid(dir, Some(before))
}

/// `model.json` is data from a file: before it sizes anything, it must describe exactly the
/// parameters the file holds (a crafted one would otherwise allocate what it likes).
fn check_shapes(m: &ModelConfig, params: &[TensorData]) -> std::result::Result<(), String> {
    let held: u64 = params
        .iter()
        .map(|t| t.shape.iter().map(|&d| d as u64).product::<u64>())
        .sum();
    let sizes = [m.n_embd, m.vocab_size, m.block_size, m.mlp_hidden];
    if m.n_layer > params.len() || sizes.iter().any(|&x| x as u64 > held) {
        return Err(format!(
            "{MODEL_JSON} describes a model larger than its {MODEL_FILE} ({} tensors, {held} \
             values): the folder is damaged or not a phalanx model",
            params.len()
        ));
    }
    m.validate().map_err(|e| format!("{MODEL_JSON}: {e}"))?;
    let want = crate::gpt::param_shapes(m);
    // A safetensors file lists its tensors by name, not in the model's order.
    let held: std::collections::HashMap<&str, &[usize]> = params
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    let same = want.len() == params.len()
        && want.iter().all(|(n, s)| {
            held.get(n.as_str()).is_some_and(|h| {
                h.len() == s.len() && s.iter().zip(h.iter()).all(|(&a, &b)| a as usize == b)
            })
        });
    if !same {
        return Err(format!(
            "the parameters in {MODEL_FILE} do not have the shapes {MODEL_JSON} describes"
        ));
    }
    Ok(())
}

/// Loads a saved model for inference: verifies the checkpoint, rebuilds model and tokenizer.
/// A whole model (a run's `model/`) or a sharded checkpoint (`checkpoints/step-N/`).
pub fn load(dir: &Path, device: Device) -> Result<(Gpt, Tokenizer, ModelInfo)> {
    phalanx_checkpoint::recover(dir)?;
    let (manifest, files) = phalanx_checkpoint::verify(dir)?;
    if manifest.shards.is_some() {
        let v = sharded::Verified {
            step: manifest.step,
            dir: dir.to_path_buf(),
            manifest,
            files,
        };
        return load_sharded(&v, device);
    }
    let (_, contents) = phalanx_checkpoint::load(dir)?;
    let bad = |reason: String| ModelError::NotAModel {
        path: dir.to_path_buf(),
        reason,
    };
    let Some(info) = contents.json.get(MODEL_JSON) else {
        return Err(bad(format!(
            "has no {MODEL_JSON}: it is not a phalanx model"
        )));
    };
    let info: ModelInfo = serde_json::from_value(info.clone())
        .map_err(|e| bad(format!("{MODEL_JSON} is invalid: {e}")))?;
    let Some(params) = contents.tensors.get(MODEL_FILE) else {
        return Err(bad(format!(
            "has no {MODEL_FILE}: it is not a phalanx model"
        )));
    };
    check_shapes(&info.model, params).map_err(bad)?;
    let model = Gpt::new(&info.model, device, 0)?;
    let tensors: Vec<_> = params
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.data.clone()))
        .collect();
    model.params.import(&tensors)?;
    let tok = Tokenizer::from_meta(&info.tokenizer, info.vocab.as_deref())?;
    if tok.vocab_size() != info.model.vocab_size {
        return Err(bad(format!(
            "tokenizer has {} tokens but the model {}; the model file is inconsistent",
            tok.vocab_size(),
            info.model.vocab_size
        )));
    }
    Ok((model, tok, info))
}

/// A model from the parts of a sharded checkpoint (its parameters only).
fn load_sharded(v: &sharded::Verified, device: Device) -> Result<(Gpt, Tokenizer, ModelInfo)> {
    let bad = |reason: String| ModelError::NotAModel {
        path: v.dir.clone(),
        reason,
    };
    let info: ModelInfo = serde_json::from_value(v.json(sharded::META)?)
        .map_err(|e| bad(format!("{} is invalid: {e}", sharded::META)))?;
    info.model
        .validate()
        .map_err(|e| bad(format!("{}: {e}", sharded::META)))?;
    let held = v.total()?;
    let want: u64 = crate::gpt::param_shapes(&info.model)
        .iter()
        .map(|(_, s)| s.iter().product::<i64>() as u64)
        .sum();
    if held != want {
        return Err(bad(format!(
            "holds {held} values but {} describes a model of {want}",
            sharded::META
        )));
    }
    // The parts' data, checked against the plan, before anything is sized from the files.
    let flat = v.assemble(FLAT_PARAMS)?;
    let model = Gpt::new(&info.model, device, 0)?;
    tch::no_grad(|| {
        model
            .params
            .flat
            .view([-1])
            .copy_(&tch::Tensor::from_slice(&flat).to_device(device))
    });
    let tok = Tokenizer::from_meta(&info.tokenizer, info.vocab.as_deref())?;
    Ok((model, tok, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        let mut m = ModelConfig::preset("tiny").unwrap();
        m.n_layer = 1;
        m.n_embd = 8;
        m.n_head = 2;
        m.block_size = 4;
        m.vocab_size = 5;
        m
    }

    fn file_of(m: &ModelConfig) -> Vec<TensorData> {
        crate::gpt::param_shapes(m)
            .into_iter()
            .map(|(name, shape)| {
                let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                let n = shape.iter().product();
                TensorData {
                    name,
                    shape,
                    data: vec![0.0; n],
                }
            })
            .collect()
    }

    // A crafted model.json (a huge width, a billion layers, another shape) is refused before
    // anything is sized from it.
    #[test]
    fn model_json_must_match_the_parameter_file() {
        let m = tiny();
        let mut params = file_of(&m);
        params.reverse();
        check_shapes(&m, &params).unwrap();
        for bad in [
            ModelConfig {
                n_embd: 1 << 40,
                ..m.clone()
            },
            ModelConfig {
                n_layer: 1_000_000_000,
                ..m.clone()
            },
            ModelConfig {
                vocab_size: 6,
                ..m.clone()
            },
        ] {
            let e = check_shapes(&bad, &params).unwrap_err();
            assert!(e.contains("model.json"), "{e}");
        }
    }
}
