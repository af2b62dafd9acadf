//! phalanx-model: everything a rank computes with and nothing it talks over.
//!
//! GPT (nanoGPT architecture) and Llama-style models written directly against libtorch
//! with every parameter a view into one flat f32 buffer, so that parameters, gradients
//! and optimizer state move as single contiguous buffers (what the data plane and the
//! checkpointer need). Also: AdamW on flat buffers, the LR schedule, tokenizers, token
//! datasets and the deterministic, world-size-independent sampler; the model's state I/O through
//! the checkpoint format (`io`) and the construction of a run's model, data and sampler (`setup`).
//!
//! No async code and no networking here (see docs/design.md's layout table).

pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod export;
pub mod gpt;
pub mod io;
pub mod lanes;
pub mod optim;
pub mod prepare;
pub mod sampler;
pub mod setup;
pub mod tokenizer;
pub mod trainer;
pub mod zero;

pub use config::{Arch, ModelConfig};
pub use error::ModelError;
pub use setup::Setup;

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
