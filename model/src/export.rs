//! Export to Hugging Face transformers: `config.json` and `model.safetensors` with the names and
//! layouts of `GPT2LMHeadModel` (Arch::Gpt) or `LlamaForCausalLM` (Arch::Llama), so a model
//! trained here loads with `AutoModelForCausalLM.from_pretrained(OUT)` and gives the same
//! logits. GPT-2's Conv1D keeps its weights as [in, out] (a Linear's transpose); a model trained
//! without biases gets zero biases, which HF's GPT-2 always has; the output layer is the tied
//! embedding. phalanx's rotary embedding already uses HF's half-split layout, so Llama's query
//! and key weights need no permutation.

use crate::config::{Arch, ModelConfig};
use crate::error::ModelError;
use crate::gpt::Gpt;
use crate::Result;
use phalanx_checkpoint::sharded::write_file;
use phalanx_checkpoint::TensorData;
use serde_json::json;
use std::path::Path;
use tch::Device;

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";

/// Writes `model` as a Hugging Face model folder `out`.
pub fn hf(model: &Gpt, out: &Path) -> Result<()> {
    let tensors = match model.cfg.arch {
        Arch::Gpt => gpt2_tensors(model)?,
        Arch::Llama => llama_tensors(model)?,
    };
    let bytes =
        phalanx_checkpoint::encode_for_hf(&tensors).map_err(|reason| ModelError::NotAModel {
            path: out.to_path_buf(),
            reason,
        })?;
    write_file(out, WEIGHTS, &bytes)?;
    let config = serde_json::to_vec_pretty(&hf_config(&model.cfg)).expect("JSON serializes");
    write_file(out, CONFIG, &config)?;
    Ok(())
}

fn hf_config(c: &ModelConfig) -> serde_json::Value {
    match c.arch {
        Arch::Gpt => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.block_size,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": 4 * c.n_embd,
            // phalanx's MLP uses the exact (erf) GELU, not GPT-2's tanh approximation.
            "activation_function": "gelu",
            "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
            // GPT-2's are 50256, outside a character vocabulary.
            "bos_token_id": null,
            "eos_token_id": null,
        }),
        Arch::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.n_embd,
            "intermediate_size": c.llama_hidden(),
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_head,
            "max_position_embeddings": c.block_size,
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
            "bos_token_id": null,
            "eos_token_id": null,
        }),
    }
}

/// A parameter as HF stores it (`transpose`: a Linear's weight as a Conv1D's).
fn take(model: &Gpt, from: &str, to: &str, transpose: bool) -> Result<TensorData> {
    let t = model.params.get(from).detach().to_device(Device::Cpu);
    let t = if transpose { t.tr().contiguous() } else { t };
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let data = Vec::<f32>::try_from(&t.view([-1]))?;
    Ok(TensorData {
        name: to.into(),
        shape,
        data,
    })
}

/// A bias: the model's, or zeros where it was trained without.
fn bias(model: &Gpt, name: &str, len: usize) -> Result<TensorData> {
    if model.cfg.bias {
        return take(model, name, name, false);
    }
    Ok(TensorData {
        name: name.into(),
        shape: vec![len],
        data: vec![0.0; len],
    })
}

fn gpt2_tensors(model: &Gpt) -> Result<Vec<TensorData>> {
    let c = model.cfg.n_embd;
    let mut out = vec![
        take(
            model,
            "transformer.wte.weight",
            "transformer.wte.weight",
            false,
        )?,
        take(
            model,
            "transformer.wpe.weight",
            "transformer.wpe.weight",
            false,
        )?,
    ];
    for l in 0..model.cfg.n_layer {
        let h = format!("transformer.h.{l}");
        for ln in ["ln_1", "ln_2"] {
            let w = format!("{h}.{ln}.weight");
            out.push(take(model, &w, &w, false)?);
            out.push(bias(model, &format!("{h}.{ln}.bias"), c)?);
        }
        for (name, len) in [
            ("attn.c_attn", 3 * c),
            ("attn.c_proj", c),
            ("mlp.c_fc", 4 * c),
            ("mlp.c_proj", c),
        ] {
            let w = format!("{h}.{name}.weight");
            out.push(take(model, &w, &w, true)?);
            out.push(bias(model, &format!("{h}.{name}.bias"), len)?);
        }
    }
    out.push(take(
        model,
        "transformer.ln_f.weight",
        "transformer.ln_f.weight",
        false,
    )?);
    out.push(bias(model, "transformer.ln_f.bias", c)?);
    Ok(out)
}

fn llama_tensors(model: &Gpt) -> Result<Vec<TensorData>> {
    let mut out = vec![
        take(
            model,
            "tok_embeddings.weight",
            "model.embed_tokens.weight",
            false,
        )?,
        take(model, "norm.weight", "model.norm.weight", false)?,
        take(model, "output.weight", "lm_head.weight", false)?,
    ];
    for l in 0..model.cfg.n_layer {
        let (h, o) = (format!("layers.{l}"), format!("model.layers.{l}"));
        let names = [
            ("attention_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
            ("attention.wq", "self_attn.q_proj"),
            ("attention.wk", "self_attn.k_proj"),
            ("attention.wv", "self_attn.v_proj"),
            ("attention.wo", "self_attn.o_proj"),
            ("feed_forward.w1", "mlp.gate_proj"),
            ("feed_forward.w2", "mlp.down_proj"),
            ("feed_forward.w3", "mlp.up_proj"),
        ];
        for (ours, theirs) in names {
            out.push(take(
                model,
                &format!("{h}.{ours}.weight"),
                &format!("{o}.{theirs}.weight"),
                false,
            )?);
        }
    }
    Ok(out)
}
