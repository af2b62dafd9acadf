//! `phalanx sample`: text from a saved model.

use anyhow::Result;
use phalanx_model::io as model_io;

pub struct SampleOpts<'a> {
    pub checkpoint: &'a std::path::Path,
    pub prompt: &'a str,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub seed: i64,
    pub device: &'a str,
}

pub fn run(o: &SampleOpts) -> Result<String> {
    let (dir, model_dir) = (o.checkpoint, o.checkpoint.join("model"));
    if !dir.join(phalanx_checkpoint::MANIFEST).exists() && model_dir.is_dir() {
        anyhow::bail!(
            "{} is a run directory, not a saved model; its model is {}: pass --checkpoint {}",
            dir.display(),
            model_dir.display(),
            model_dir.display()
        );
    }
    let device = phalanx_model::device::resolve_device(o.device)?;
    let (model, tok, _) = model_io::load(o.checkpoint, device)?;
    let prompt: Vec<i64> = tok.encode(o.prompt)?.into_iter().map(i64::from).collect();
    if prompt.is_empty() {
        anyhow::bail!("the prompt is empty; pass --prompt TEXT with at least one character");
    }
    let out = model.generate(&prompt, o.max_new_tokens, o.temperature, o.top_k, o.seed);
    let ids: Vec<u32> = out.into_iter().map(|t| t as u32).collect();
    Ok(tok.decode(&ids)?)
}
