//! Hugging Face export: a model trained here, written by `phalanx checkpoint export --format hf`,
//! loads with `transformers` (`AutoModelForCausalLM`, from the venv) and gives the logits phalanx
//! gives on the same tokens: GPT (as GPT2LMHeadModel) and Llama (as LlamaForCausalLM), from a
//! whole model and from a sharded checkpoint.

mod common;
use common::*;
use std::path::{Path, PathBuf};

const TOKENS: [i64; 12] = [1, 5, 9, 2, 7, 3, 3, 8, 0, 4, 6, 2];

/// The logits phalanx computes for `TOKENS` with the model in `dir`.
fn ours(dir: &Path) -> Vec<f32> {
    let (model, _, _) = phalanx_model::io::load(dir, tch::Device::Cpu).unwrap();
    let x = tch::Tensor::from_slice(&TOKENS).view([1, -1]);
    let logits = tch::no_grad(|| model.forward(&x, false));
    Vec::<f32>::try_from(&logits.view([-1])).unwrap()
}

/// The logits transformers computes for `TOKENS` with the exported folder `hf`.
fn theirs(hf: &Path) -> Vec<f32> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let code = "import sys, json, torch\n\
                from transformers import AutoModelForCausalLM\n\
                m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n\
                with torch.no_grad():\n    \
                    out = m(torch.tensor([json.loads(sys.argv[2])])).logits\n\
                print(json.dumps(out.reshape(-1).tolist()))\n";
    let out = std::process::Command::new(&python)
        .args(["-c", code])
        .arg(hf)
        .arg(format!("{TOKENS:?}"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; run scripts/setup", python.display()));
    assert!(
        out.status.success(),
        "transformers could not load the export (scripts/setup installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn export(dir: &Path, from: &Path, to: &Path) {
    let r = run(
        &[
            "checkpoint",
            "export",
            "--format",
            "hf",
            from.to_str().unwrap(),
            to.to_str().unwrap(),
        ],
        dir,
    );
    assert!(r.ok(), "{}", r.stderr());
}

fn assert_same_logits(model: &Path, hf: &Path) {
    let (a, b) = (ours(model), theirs(hf));
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "logits differ by up to {worst}");
}

/// A short single-process run of `arch`; its run directory.
fn trained(dir: &Path, arch: &str) -> PathBuf {
    let data = dataset(dir);
    let run_dir = dir.join(format!("run-{arch}"));
    let mut o = small(&data, &run_dir);
    o.push(format!("model.arch={arch}"));
    o.push("train.max_steps=10".into());
    o.push("train.eval_interval=0".into());
    let r = train(dir, &o);
    assert!(r.ok(), "{}", r.stderr());
    run_dir
}

#[test]
fn gpt_and_llama_exports_give_the_same_logits_in_transformers() {
    let d = test_dir();
    for arch in ["gpt", "llama"] {
        let run_dir = trained(d.path(), arch);
        let hf = d.path().join(format!("hf-{arch}"));
        export(d.path(), &run_dir.join("model"), &hf);
        assert_same_logits(&run_dir.join("model"), &hf);
    }
}

// A sharded checkpoint (C-5) exports like a whole model.
#[test]
fn a_sharded_checkpoint_exports_too() {
    let _one_at_a_time = serial();
    let d = test_dir();
    let data = dataset(d.path());
    let cfg = job_config(d.path(), &data);
    let r = launch_job(
        d.path(),
        &cfg,
        Hosts::One,
        &[
            "--world",
            "2",
            "train.max_steps=10",
            "optim.decay_steps=10",
            "run.checkpoint_interval=10",
        ],
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let ck = r.run.join("checkpoints/step-10");
    let hf = d.path().join("hf");
    export(d.path(), &ck, &hf);
    assert_same_logits(&ck, &hf);
}
