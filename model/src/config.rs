use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// nanoGPT: learned positions, pre-LayerNorm, GELU MLP, tied embeddings.
    Gpt,
    /// Llama-style: RMSNorm, SwiGLU MLP, rotary positions, untied output head.
    Llama,
}

/// The shape of a model. Saved next to every model file so that it can be rebuilt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Context length in tokens.
    pub block_size: usize,
    pub vocab_size: usize,
    pub dropout: f64,
    /// Biases in linear layers and LayerNorms (GPT only; nanoGPT's default is false).
    pub bias: bool,
    /// Hidden width of the SwiGLU MLP (Llama only); 0 means 8/3 x n_embd rounded up to 32.
    pub mlp_hidden: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
}

pub const PRESETS: &[&str] = &["tiny", "baby", "gpt2-124m", "llama-tiny"];

impl ModelConfig {
    /// Named presets. `vocab_size` is set later from the dataset.
    pub fn preset(name: &str) -> Result<Self> {
        let gpt = |n_layer, n_head, n_embd, block_size| ModelConfig {
            arch: Arch::Gpt,
            n_layer,
            n_head,
            n_embd,
            block_size,
            vocab_size: 0,
            dropout: 0.0,
            bias: false,
            mlp_hidden: 0,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
        };
        Ok(match name {
            "tiny" => gpt(4, 4, 128, 64),
            "baby" => gpt(6, 6, 384, 256),
            // GPT-2 small has biases, like the released checkpoint.
            "gpt2-124m" => ModelConfig {
                bias: true,
                ..gpt(12, 12, 768, 1024)
            },
            "llama-tiny" => ModelConfig {
                arch: Arch::Llama,
                ..gpt(4, 4, 128, 64)
            },
            other => {
                return Err(ModelError::UnknownPreset {
                    name: other.into(),
                    valid: PRESETS.join(", "),
                })
            }
        })
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn llama_hidden(&self) -> usize {
        if self.mlp_hidden > 0 {
            self.mlp_hidden
        } else {
            (8 * self.n_embd / 3).div_ceil(32) * 32
        }
    }

    /// Checks the shape; messages name the offending key as it appears in a config file.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, value: String, reason: &str| {
            Err(ModelError::InvalidValue {
                key: format!("model.{key}"),
                value,
                reason: reason.into(),
            })
        };
        if self.n_layer == 0 {
            return bad("n_layer", "0".into(), "a model needs at least one layer");
        }
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            return bad(
                "n_head",
                self.n_head.to_string(),
                &format!("must be > 0 and divide n_embd = {}", self.n_embd),
            );
        }
        if self.arch == Arch::Llama && self.head_dim() % 2 != 0 {
            return bad(
                "n_head",
                self.n_head.to_string(),
                "rotary embeddings need an even head dimension (n_embd / n_head)",
            );
        }
        if self.block_size == 0 {
            return bad("block_size", "0".into(), "must be at least 1");
        }
        if self.vocab_size == 0 {
            return bad("vocab_size", "0".into(), "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", self.dropout.to_string(), "must be in [0, 1)");
        }
        if self.norm_eps <= 0.0 || self.rope_theta <= 0.0 {
            return bad(
                "norm_eps",
                self.norm_eps.to_string(),
                "norm_eps and rope_theta must be > 0",
            );
        }
        Ok(())
    }
}
