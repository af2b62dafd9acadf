//! The `phalanx` command line.

mod bench;
mod config;
mod model_io;
mod run_dir;
mod sample;
mod train;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use config::TrainConfig;
use phalanx_model::prepare::{prepare, PrepareOptions, TokenizerKind};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "phalanx",
    version,
    about = "Fault-tolerant, elastic pretraining of GPT-style models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Tok {
    Char,
    Gpt2,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tokenize text files into train.bin / val.bin / meta.json.
    Prepare {
        /// Text files or folders (folders: every .txt file below). Default: the Shakespeare plays.
        #[arg(long, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "char")]
        tokenizer: Tok,
        /// Output folder. Default: data/shakespeare-<tokenizer> for the default corpus,
        /// data/<first input's name>-<tokenizer> otherwise.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Share of the text held out for validation, as whole files.
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
    },
    /// Train a model in this process.
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Overrides: section.key=value (e.g. train.max_steps=100).
        overrides: Vec<String>,
    },
    /// Generate text from a saved model.
    Sample {
        /// A saved model folder (a run's model/ or checkpoints/step-N/).
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 500)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<i64>,
        #[arg(long, default_value_t = 1337)]
        seed: i64,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Inspect and verify saved models and checkpoints.
    Checkpoint {
        #[command(subcommand)]
        what: CheckpointCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// tokens/s of the full train path vs a bare tch loop (phalanx's overhead).
    Train {
        #[arg(long, default_value = "configs/shakespeare-char.toml")]
        config: PathBuf,
        #[arg(long, default_value_t = 200)]
        steps: u64,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        overrides: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// Check every file of a checkpoint against its manifest.
    Verify { dir: PathBuf },
    /// Print a checkpoint's manifest and model description.
    Inspect { dir: PathBuf },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PHALANX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Prepare {
            input,
            tokenizer,
            out,
            val_fraction,
        } => {
            let (kind, name) = match tokenizer {
                Tok::Char => (TokenizerKind::Char, "char"),
                Tok::Gpt2 => (TokenizerKind::Gpt2, "gpt2"),
            };
            let stem = input
                .first()
                .and_then(|p| p.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "shakespeare".into());
            let out = out.unwrap_or_else(|| PathBuf::from(format!("data/{stem}-{name}")));
            let r = prepare(&PrepareOptions {
                inputs: input,
                tokenizer: kind,
                out: out.clone(),
                val_fraction,
            })?;
            let val_files = r.meta.sources.iter().filter(|s| s.split == "val").count();
            println!(
                "{}: {} files ({} held out for validation), tokenizer {}, vocab {}, {} train + {} val tokens ({})",
                out.display(),
                r.meta.sources.len(),
                val_files,
                r.meta.tokenizer,
                r.meta.vocab_size,
                r.meta.train_tokens,
                r.meta.val_tokens,
                serde_json::to_value(r.meta.dtype)?.as_str().unwrap_or("?"),
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Train { config, overrides } => {
            let cfg = TrainConfig::load(Some(&config), &overrides)?;
            let stop = Arc::new(AtomicBool::new(false));
            let s = stop.clone();
            ctrlc::set_handler(move || {
                if s.swap(true, Ordering::SeqCst) {
                    // A second Ctrl-C means now.
                    std::process::exit(130);
                }
            })
            .context("cannot install the Ctrl-C handler")?;
            let progress = cfg.run.progress && std::io::stderr().is_terminal();
            let out = train::run(&cfg, &stop, progress)?;
            let r = &out.report;
            println!(
                "{} {} steps: train loss {:.4}, val loss {}, {:.0} tokens/s, {:.1} s; model saved to {}",
                r["status"].as_str().unwrap_or(""),
                r["steps"],
                r["final_train_loss"].as_f64().unwrap_or(f64::NAN),
                r["final_val_loss"].as_f64().map_or("-".into(), |v| format!("{v:.4}")),
                r["tokens_per_s"].as_f64().unwrap_or(0.0),
                r["wall_s"].as_f64().unwrap_or(0.0),
                r["model_dir"].as_str().unwrap_or(""),
            );
            Ok(if out.interrupted {
                ExitCode::from(130)
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Sample {
            checkpoint,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            seed,
            device,
        } => {
            let text = sample::run(&sample::SampleOpts {
                checkpoint: &checkpoint,
                prompt: &prompt,
                max_new_tokens,
                temperature,
                top_k,
                seed,
                device: &device,
            })?;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            what:
                BenchCmd::Train {
                    config,
                    steps,
                    runs,
                    overrides,
                },
        } => {
            let cfg = TrainConfig::load(Some(&config), &overrides)?;
            bench::run(&cfg, steps.max(20), runs.max(1))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Checkpoint { what } => {
            let dir = match &what {
                CheckpointCmd::Verify { dir } | CheckpointCmd::Inspect { dir } => dir,
            };
            let (m, files) = phalanx_checkpoint::verify(dir)?;
            match what {
                CheckpointCmd::Verify { .. } => {
                    println!(
                        "{}: OK, step {}, {} files verified",
                        dir.display(),
                        m.step,
                        files.len()
                    )
                }
                CheckpointCmd::Inspect { .. } => {
                    println!("{}", serde_json::to_string_pretty(&m)?);
                    if let Some(b) = files.get(model_io::MODEL_JSON) {
                        println!("{}", String::from_utf8_lossy(b));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
