//! Bad input gets a clear error that says what to do, exit code 1, and never a panic.

mod common;
use common::*;
use std::path::Path;

#[test]
fn prepare_non_utf8_file_is_named() {
    let d = test_dir();
    let f = d.path().join("latin1.txt");
    std::fs::write(&f, b"ROMEO:\nO caf\xe9!\n").unwrap();
    run(
        &["prepare", "--input", f.to_str().unwrap(), "--out", "o"],
        d.path(),
    )
    .assert_user_error("latin1.txt is not UTF-8");
}

#[test]
fn prepare_empty_folder_and_missing_path() {
    let d = test_dir();
    std::fs::create_dir(d.path().join("empty")).unwrap();
    run(&["prepare", "--input", "empty", "--out", "o"], d.path())
        .assert_user_error("no .txt files");
    run(&["prepare", "--input", "nope", "--out", "o"], d.path())
        .assert_user_error("does not exist");
    run(
        &["prepare", "--input", "empty", "--val-fraction", "1.5"],
        d.path(),
    )
    .assert_user_error("--val-fraction");
}

#[test]
fn prepare_default_corpus_and_gpt2() {
    let d = test_dir();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/shakespeare");
    let r = run(&["prepare", "--tokenizer", "gpt2", "--out", "g"], d.path());
    assert!(r.ok(), "{}", r.stderr());
    assert!(corpus.is_dir());
    let meta = read_json(&d.path().join("g/meta.json"));
    assert_eq!(meta["vocab_size"], 50257);
    assert_eq!(meta["dtype"], "u16");
    assert!(meta["sources"].as_array().unwrap().len() > 30);
    // Another tokenizer into the same folder is refused, not a silent overwrite.
    run(&["prepare", "--tokenizer", "char", "--out", "g"], d.path())
        .assert_user_error("made with the gpt2 tokenizer");
    assert_eq!(
        read_json(&d.path().join("g/meta.json"))["vocab_size"],
        50257
    );
}

#[test]
fn train_missing_and_empty_dataset() {
    let d = test_dir();
    let run_dir = d.path().join("run");
    train(d.path(), &small(&d.path().join("missing"), &run_dir))
        .assert_user_error("phalanx prepare");
    let data = dataset(d.path());
    std::fs::write(data.join("train.bin"), b"").unwrap();
    train(d.path(), &small(&data, &run_dir)).assert_user_error("train.bin");
    std::fs::write(data.join("train.bin"), b"abc").unwrap();
    train(d.path(), &small(&data, &run_dir)).assert_user_error("truncated");
}

#[test]
fn train_bad_config() {
    let d = test_dir();
    let data = dataset(d.path());
    let run_dir = d.path().join("run");
    let with = |extra: &str| {
        let mut o = small(&data, &run_dir);
        o.push(extra.into());
        train(d.path(), &o)
    };
    with("train.max_step=5").assert_user_error("did you mean `train.max_steps`");
    with("train.max_steps=many").assert_user_error("max_steps");
    with("optim.lr=-0.1").assert_user_error("optim.lr");
    with("model.n_head=3").assert_user_error("n_head");
    with("model.preset=huge").assert_user_error("valid presets");
    with("train.micro_batch=3").assert_user_error("multiple of train.micro_batch");
    // A config file with a misspelt key.
    let cfg = d.path().join("bad.toml");
    std::fs::write(&cfg, "[train]\nglobal_bach = 8\n").unwrap();
    run(&["train", "--config", cfg.to_str().unwrap()], d.path())
        .assert_user_error("did you mean `train.global_batch`");
    run(&["train", "--config", "nope.toml"], d.path()).assert_user_error("cannot read config");
}

#[test]
fn cuda_without_gpu_is_refused() {
    if tch::Cuda::is_available() {
        return; // this machine has a GPU: nothing to refuse
    }
    let d = test_dir();
    let data = dataset(d.path());
    let mut o = small(&data, &d.path().join("run"));
    o.push("train.device=cuda".into());
    train(d.path(), &o).assert_user_error("no CUDA device");
}

#[test]
fn sample_from_missing_or_truncated_model() {
    let d = test_dir();
    run(
        &["sample", "--checkpoint", "nope", "--prompt", "A"],
        d.path(),
    )
    .assert_user_error("does not exist");
    let data = dataset(d.path());
    let run_dir = d.path().join("run");
    let mut o = small(&data, &run_dir);
    o.push("train.max_steps=2".into());
    assert!(train(d.path(), &o).ok());
    let model = run_dir.join("model");
    let m = model.to_str().unwrap();
    // The run directory instead of its model: pointed to the model.
    run(
        &[
            "sample",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--prompt",
            "A",
        ],
        d.path(),
    )
    .assert_user_error("pass --checkpoint");
    // A character the model never saw.
    run(
        &["sample", "--checkpoint", m, "--prompt", "\u{263A}"],
        d.path(),
    )
    .assert_user_error("not in the model's character vocabulary");
    let f = model.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    run(&["sample", "--checkpoint", m, "--prompt", "A"], d.path()).assert_user_error("truncated");
    std::fs::remove_file(model.join("manifest.json")).unwrap();
    run(&["sample", "--checkpoint", m, "--prompt", "A"], d.path())
        .assert_user_error("not a phalanx checkpoint");
}
