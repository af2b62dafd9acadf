//! The `phalanx` command line.

#[macro_use]
mod output;
mod panic_hook;
mod plot;
mod plot_heat;
mod plot_spans;
mod progress;

mod bench;
mod cgroup;
mod chaos;
mod config;
mod control;
mod hosts;
#[cfg(test)]
mod in_process;
mod launch;
mod launch_coordinator;
mod launch_hosts;
mod launch_load;
mod launch_placed;
mod launch_schedule;
mod launch_storage;
use phalanx_model::io as model_io;
mod link_proxy;
mod report;
mod resume;
mod run_dir;
mod sample;
mod signals;
mod sim_rank;
mod train;
mod worker;

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
        /// `char`: one token per character (small vocabularies, quick runs); `gpt2`: GPT-2's
        /// BPE (50,257 tokens).
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
        /// The job config (TOML), e.g. configs/shakespeare-char.toml.
        #[arg(long)]
        config: PathBuf,
        /// Start over in a run.dir that holds a saved model or checkpoints: they are deleted.
        /// Without it such a run.dir is refused, never overwritten.
        #[arg(long)]
        force: bool,
        /// Overrides: section.key=value (e.g. train.max_steps=100).
        overrides: Vec<String>,
    },
    /// Generate text from a saved model.
    Sample {
        /// A saved model folder (a run's model/ or checkpoints/step-N/).
        #[arg(long)]
        checkpoint: PathBuf,
        /// The text the model continues.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate after the prompt.
        #[arg(long, default_value_t = 500)]
        max_new_tokens: usize,
        /// Softmax temperature: lower is more conservative, higher more varied.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sample only among the K most likely tokens (default: all).
        #[arg(long)]
        top_k: Option<i64>,
        /// Random seed of the sampling: the same seed gives the same text.
        #[arg(long, default_value_t = 1337)]
        seed: i64,
        /// `auto`, `cpu` or `cuda[:N]`.
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
    /// One rank of a job (under Slurm, PBS, mpiexec, torchrun or `phalanx launch`).
    Worker {
        /// The coordinator's URL. Default: http://$MASTER_ADDR:7070 when MASTER_ADDR is set.
        #[arg(long)]
        coordinator: Option<String>,
        /// Join as a hot spare.
        #[arg(long)]
        spare: bool,
        /// When fenced out of the job (evicted while hung), exit with code 3 instead of
        /// registering again as a spare.
        #[arg(long)]
        no_rejoin: bool,
        /// The job config (TOML); every worker and the coordinator must use the same one.
        #[arg(long)]
        config: PathBuf,
        /// CA certificate (PEM) to verify a TLS coordinator (default: plain text).
        #[arg(long, default_value = "", hide_default_value = true)]
        tls_ca: String,
        /// Overrides: section.key=value (e.g. train.max_steps=100). The job token comes from
        /// PHALANX_JOB_TOKEN.
        overrides: Vec<String>,
    },
    /// A local job: coordinator + N ranks (+ K hot spares) on this machine.
    Launch(Box<LaunchCli>),
    /// A local job with a scenario's faults placed by a seed; its invariants checked and
    /// recorded in report.json (`--scenario list` lists the scenarios).
    Chaos(chaos::ChaosCli),
    /// Run the job's coordinator (membership, generations, failure detection).
    Coordinator {
        /// Address to listen on (port 0 picks a free port; the first stdout line names it).
        #[arg(long)]
        bind: Option<String>,
        /// Job config; its [coordinator] section sets detection and policy.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Active ranks the job runs with (hot spares wait beyond this).
        #[arg(long, default_value_t = 1)]
        world: usize,
        /// Run directory for events.jsonl and the coordinator journal. Default: the config's run.dir.
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Serve on a non-loopback address without a job token (a trusted network only).
        #[arg(long)]
        insecure: bool,
        /// The config hash every worker must have (each worker logs its own at start-up).
        /// Without it, the first worker's hash becomes the job's (a config_hash_pinned event).
        #[arg(long)]
        config_hash: Option<String>,
        /// Overrides: section.key=value (e.g. coordinator.heartbeat_timeout_ms=1000).
        overrides: Vec<String>,
    },
    /// A run's report: the one its job wrote (report.json), else one built from metrics.jsonl
    /// and events.jsonl (a job run with a separate coordinator and workers). Prints it; writes
    /// report.json only with --write.
    Report {
        /// The job's run directory (run.dir).
        run_dir: PathBuf,
        /// Build the report from metrics.jsonl and events.jsonl and write report.json. A report
        /// the job wrote itself is kept unless --force is given too.
        #[arg(long)]
        write: bool,
        /// With --write: replace a report.json that is already there.
        #[arg(long, requires = "write")]
        force: bool,
    },
    /// Draw a run (PNG and SVG): train and validation loss, tokens/s, world size and generation
    /// against step, with the faults marked where they struck.
    Plot {
        /// The job's run directory (run.dir).
        run_dir: PathBuf,
        /// Folder for report.png and report.svg. Default: the run directory.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show the job's ranks as the coordinator sees them.
    Status {
        #[command(flatten)]
        at: control::AdminTarget,
        /// Print JSON instead of a table (every member, departed ones included).
        #[arg(long)]
        json: bool,
        /// Also list members that left the job (dead, evicted, drained): the coordinator keeps
        /// the last 64.
        #[arg(long)]
        all: bool,
    },
    /// Ask the coordinator to run the job with N active ranks.
    Scale {
        #[command(flatten)]
        at: control::AdminTarget,
        /// Active ranks wanted: spares are promoted to grow, ranks drained to shrink.
        #[arg(long)]
        target: u32,
    },
    /// Ask the coordinator to remove one rank at the next step boundary.
    Drain {
        #[command(flatten)]
        at: control::AdminTarget,
        /// The rank to remove, in the current generation (ranks are renumbered when the world
        /// changes; see `phalanx status`).
        #[arg(long, required_unless_present = "member", conflicts_with = "member")]
        rank: Option<u32>,
        /// The member to remove, by the id `phalanx status` lists: the same process whatever
        /// rank it holds when the drain arrives.
        #[arg(long, value_name = "ID")]
        member: Option<u64>,
    },
    /// A simulated rank (control-plane tests and benchmarks): a real session, no training.
    #[command(hide = true)]
    SimRank {
        #[arg(long)]
        coordinator: String,
        #[arg(long)]
        spare: bool,
        #[arg(long, default_value_t = 50)]
        step_ms: u64,
        #[arg(long, default_value = "phalanx")]
        job_id: String,
        #[arg(long, default_value = "sim")]
        config_hash: String,
        #[arg(long, default_value_t = 30)]
        give_up_s: u64,
        #[arg(long, default_value = "", hide_default_value = true)]
        tls_ca: String,
    },
    /// A simulated host's slow link (started by `launch` inside the host): a transparent TCP
    /// proxy, fast until SIGUSR1, slow until SIGUSR2; it ends when its stdin closes.
    #[command(hide = true)]
    LinkProxy {
        #[arg(long, default_value_t = 20)]
        delay_ms: u64,
        #[arg(long, default_value_t = 100)]
        rate_mbit: u32,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// A sharded checkpoint's cost: the stage the training loop waits for (against one step),
    /// the background drain, write throughput against the disk's bandwidth (measured in the
    /// same run); PyTorch DCP beside it with --dcp.
    Checkpoint(bench::checkpoint::Opts),
    /// How soon a crashed (SIGKILL) and a hung (SIGSTOP) rank are declared failed, over many
    /// faults on simulated rank processes, and false detections in a fault-free stretch.
    Detection(bench::detection::Opts),
    /// tokens/s of the full train path vs a bare tch loop (phalanx's overhead).
    Train {
        /// The job config (TOML) to measure.
        #[arg(long, default_value = "configs/shakespeare-char.toml")]
        config: PathBuf,
        /// Training steps per run.
        #[arg(long, default_value_t = 200)]
        steps: u64,
        /// Runs of each variant; the figures are medians over them.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Ranks (local processes): with N > 1, the per-step cost of fault tolerance, the
        /// job under `phalanx launch` against bare ranks doing the same steps; with N > 1 and
        /// train.zero=1, ZeRO-1 against replicated training (memory per rank, step time); with
        /// N > 1 and train.deterministic=true, deterministic mode's step time against the
        /// default's (one thread per rank in both).
        #[arg(long, default_value_t = 1)]
        world: usize,
        /// Compare with PyTorch instead: this nanoGPT reference script (e.g.
        /// ../shared/bench/nanogpt_ref.py) on the same model, batch, micro-batches, threads per
        /// rank and steps, in turns with `phalanx launch`: eager on one rank, DDP over gloo
        /// under torchrun on N.
        #[arg(long, value_name = "SCRIPT")]
        torch: Option<PathBuf>,
        /// Overrides: section.key=value (e.g. train.micro_batch=4).
        overrides: Vec<String>,
    },
    /// Internal: one bare rank of `bench train --world N`.
    #[command(hide = true)]
    TrainRank {
        #[arg(long)]
        bootstrap: String,
        #[arg(long)]
        rank: u32,
        #[arg(long)]
        world: u32,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        config: PathBuf,
        overrides: Vec<String>,
    },
    /// Collectives over UCX between N local processes, reported like nccl-tests.
    Collectives {
        /// Ranks (local processes).
        #[arg(long, default_value_t = 4)]
        world: usize,
        /// The collective to time.
        #[arg(long, value_enum, default_value = "allreduce")]
        op: bench::collectives::Op,
        /// Buffer sizes in bytes, with K/M/G (binary) suffixes.
        #[arg(long, default_value = "1K,1M,16M,64M")]
        sizes: String,
        #[command(flatten)]
        tuning: bench::collectives::Tuning,
        #[command(flatten)]
        placement: bench::collectives::Placement,
        /// Internal: run as one rank, registering with this bootstrap server.
        #[arg(long, hide = true)]
        worker_of: Option<String>,
        #[arg(long, hide = true, default_value_t = 0)]
        rank: u32,
    },
    /// The straggler detector's trade-off: false flags per 10,000 rank-steps under a noisy
    /// neighbour against steps to flag a 25% CPU quota, for the defaults and two other
    /// settings (real jobs; needs a cgroup CPU controller, i.e. root).
    Straggler {
        /// The job config (TOML) the jobs run.
        #[arg(long, default_value = "configs/shakespeare-char.toml")]
        config: PathBuf,
        /// Ranks of each job.
        #[arg(long, default_value_t = 4)]
        world: usize,
        /// Length of each noisy run, seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The control plane at scale: the decision core alone and the real gRPC service.
    Coordinator {
        /// Simulated ranks for the decision core (1 Hz heartbeats, simulated time).
        #[arg(long, default_value_t = 100_000)]
        ranks: usize,
        /// Simulated seconds of the decision-core run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Simulated rank sessions against a real coordinator process (0 = skip).
        #[arg(long, default_value_t = 10_000)]
        grpc_ranks: usize,
        /// Wall-clock seconds of the gRPC run.
        #[arg(long, default_value_t = 10)]
        grpc_seconds: u64,
    },
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// The campaign's checkpoints in a run directory, newest first: committed or not, the
    /// world that wrote each, its size, and whether it verifies (the one --resume would load).
    List {
        /// A run directory (its run.dir), holding checkpoints/.
        run_dir: PathBuf,
    },
    /// Check every file of a checkpoint against its manifest.
    Verify {
        /// A model or checkpoint folder (a run's model/ or checkpoints/step-N/).
        dir: PathBuf,
    },
    /// Print a checkpoint's manifest and model description.
    Inspect {
        /// A model or checkpoint folder (a run's model/ or checkpoints/step-N/).
        dir: PathBuf,
    },
    /// Write a model as a Hugging Face transformers folder (config.json, model.safetensors):
    /// GPT2LMHeadModel or LlamaForCausalLM, loadable with AutoModelForCausalLM.
    Export {
        /// The format to write; `hf` (Hugging Face transformers) is the one there is.
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// A model or checkpoint folder (a run's model/ or checkpoints/step-N/).
        dir: PathBuf,
        /// The folder to write (created; its config.json and model.safetensors are replaced).
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// Hugging Face transformers.
    Hf,
}

/// `phalanx launch`'s arguments.
#[derive(clap::Args)]
struct LaunchCli {
    /// Active ranks (worker processes) the job starts with: its world size.
    #[arg(long = "world", visible_alias = "nproc", value_name = "N")]
    nproc: usize,
    /// Hot spares: extra worker processes that replace a lost rank at once.
    #[arg(long, default_value_t = 0)]
    spares: usize,
    /// The job config (TOML), e.g. configs/shakespeare-char.toml.
    #[arg(long)]
    config: PathBuf,
    /// Fault injection: SIGKILL rank RANK once step STEP is committed (STEP:RANK). Repeat it
    /// to kill several ranks (at one step: at once).
    #[arg(long, value_name = "STEP:RANK")]
    kill_at: Vec<String>,
    /// Fault injection: SIGSTOP rank RANK once step STEP is committed ...
    #[arg(long, value_name = "STEP:RANK")]
    stop_at: Option<String>,
    /// ... and SIGCONT it this many milliseconds later.
    #[arg(long, default_value_t = 5000)]
    stop_for_ms: u64,
    /// Fault injection: once step STEP is committed, limit rank RANK's process to
    /// --slow-cpu-pct percent of one core (a cgroup CPU quota): a straggler.
    #[arg(long, value_name = "STEP:RANK")]
    slow_at: Option<String>,
    /// The straggler's share of one core, percent (see --slow-at).
    #[arg(long, default_value_t = 25)]
    slow_cpu_pct: u32,
    /// ... and lift the quota once this many more steps are committed (0: never).
    #[arg(long, default_value_t = 0)]
    slow_steps: u64,
    /// Fault injection: SIGKILL an active rank every SECS seconds (ranks 0, 1, ... in
    /// turn); the launcher starts a new spare process for each.
    #[arg(long, value_name = "SECS")]
    kill_every: Option<f64>,
    /// Restart a spare process every SECS seconds (kill it; the launcher starts a new one):
    /// the CPU cost of a process start beside the training ranks.
    #[arg(long, value_name = "SECS")]
    restart_spare_every: Option<f64>,
    /// Once step STEP is committed, ask the coordinator for N active ranks (STEP:N), as
    /// `phalanx scale` does.
    #[arg(long, value_name = "STEP:N")]
    scale_at: Option<String>,
    /// Once step STEP is committed, drain rank RANK (STEP:RANK), as `phalanx drain` does.
    #[arg(long, value_name = "STEP:RANK")]
    drain_at: Option<String>,
    /// Once step STEP is committed, SIGKILL the coordinator and start it again from its journal
    /// on the same address --coordinator-down-ms later (the coordinator then runs as a process
    /// of its own, logs/coordinator.log). The ranks train on meanwhile.
    #[arg(long, value_name = "STEP")]
    kill_coordinator_at: Option<u64>,
    /// With --kill-coordinator-at: how long the coordinator stays down.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    coordinator_down_ms: u64,
    /// Once step STEP is committed, flip a byte in a part of the newest committed checkpoint
    /// (a later --resume must name it and load the one before).
    #[arg(long, value_name = "STEP")]
    corrupt_checkpoint_at: Option<u64>,
    /// Once step STEP is committed, SIGKILL every worker process: the job dies whole and the
    /// launch ends (exit 1); continue it with --resume.
    #[arg(long, value_name = "STEP")]
    kill_job_at: Option<u64>,
    /// Once step STEP is committed, fill the checkpoint disk, and empty it once
    /// --disk-full-steps steps and --disk-full-ms have passed: run.dir/checkpoints is then a tmpfs mounted for the run (needs root; its
    /// checkpoints are copied back when the launch ends).
    #[arg(long, value_name = "STEP")]
    fill_disk_at: Option<u64>,
    /// With --fill-disk-at: the committed steps the disk stays full at least.
    #[arg(long, value_name = "N", default_value_t = 100)]
    disk_full_steps: u64,
    /// With --fill-disk-at: the time the disk stays full at least (longer than a save's write
    /// retries, 0.6 s, for a save to fail).
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    disk_full_ms: u64,
    /// A noisy neighbour: a busy-loop process takes one core for BUSY_MS every PERIOD_MS.
    #[arg(long, value_name = "BUSY_MS:PERIOD_MS")]
    noise: Option<String>,
    #[command(flatten)]
    hosts: launch_hosts::HostArgs,
    /// Continue the campaign in run.dir from its newest committed checkpoint that verifies, at
    /// this job's --world (any world size); the metrics and ledger go on. Without a checkpoint
    /// the job starts from step 0. Same as run.resume=true.
    #[arg(long)]
    resume: bool,
    /// Start over in a run.dir that holds a saved model or checkpoints: they are deleted.
    /// Without it (or --resume) such a run.dir is refused, never overwritten.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// Overrides: section.key=value (e.g. train.max_steps=100).
    overrides: Vec<String>,
}

fn main() -> ExitCode {
    panic_hook::install();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A worker's stderr is a log file under `launch`: colour only on a terminal.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PHALANX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", output::error_line(&e));
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
        } => prepare_cmd(input, tokenizer, out, val_fraction),
        Cmd::Train {
            config,
            force,
            overrides,
        } => train_cmd(&config, force, &overrides),
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
            outln!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench { what } => bench_cmd(what),
        Cmd::Worker {
            coordinator,
            spare,
            no_rejoin,
            config,
            tls_ca,
            overrides,
        } => {
            let cfg = TrainConfig::load(Some(&config), &overrides)?;
            let url = worker::coordinator_url(coordinator, !tls_ca.is_empty())?;
            let run_dir = cfg.run.dir.clone();
            run_dir::ensure(&run_dir)?;
            let code = worker::run(worker::WorkerArgs {
                url,
                tls_ca,
                spare,
                no_rejoin,
                cfg,
                run_dir,
            })?;
            Ok(ExitCode::from(code as u8))
        }
        Cmd::Launch(c) => launch_cmd(*c),
        Cmd::Coordinator {
            bind,
            config,
            world,
            run_dir,
            insecure,
            config_hash,
            overrides,
        } => {
            let cfg = TrainConfig::load(config.as_deref(), &overrides)?;
            let max_world = cfg.train.global_batch / cfg.train.micro_batch.max(1);
            if world == 0 || world > max_world {
                anyhow::bail!(
                    "--world {world}: a job needs 1 to {max_world} ranks (the micro-batches in a \
                     global batch: train.global_batch / train.micro_batch)"
                );
            }
            control::run_coordinator(
                &cfg.coordinator,
                &control::CoordinatorArgs {
                    bind,
                    world,
                    max_world,
                    run_dir: run_dir.unwrap_or(cfg.run.dir.clone()),
                    insecure,
                    config_hash,
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report {
            run_dir,
            write,
            force,
        } => {
            report::print(&report::for_cli(&run_dir, write, force)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { at, json, all } => {
            control::status(&at.opts()?, json, all, at.run_dir.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Scale { at, target } => {
            control::admin_scale(&at.opts()?, target)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Drain { at, rank, member } => {
            control::admin_drain(&at.opts()?, rank, member)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::LinkProxy {
            delay_ms,
            rate_mbit,
        } => Ok(ExitCode::from(link_proxy::run(delay_ms, rate_mbit)? as u8)),
        Cmd::SimRank {
            coordinator,
            spare,
            step_ms,
            job_id,
            config_hash,
            give_up_s,
            tls_ca,
        } => {
            let code = sim_rank::run(&sim_rank::SimArgs {
                url: coordinator,
                tls_ca,
                spare,
                step_ms,
                job_id,
                config_hash,
                give_up: std::time::Duration::from_secs(give_up_s),
            })?;
            Ok(ExitCode::from(code as u8))
        }
        Cmd::Checkpoint { what } => checkpoint_cmd(what),
        Cmd::Chaos(c) => {
            let code = chaos::run(&c, stop_on_ctrl_c()?)?;
            Ok(ExitCode::from(code as u8))
        }
        Cmd::Plot { run_dir, out } => {
            let (png, svg) = plot::run(&run_dir, out.as_deref())?;
            outln!("wrote {} and {}", png.display(), svg.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `phalanx launch`: the fault flags checked, Ctrl-C wired to a graceful stop, the job run.
fn launch_cmd(c: LaunchCli) -> Result<ExitCode> {
    let LaunchCli {
        nproc,
        spares,
        config,
        kill_at,
        stop_at,
        stop_for_ms,
        slow_at,
        slow_cpu_pct,
        slow_steps,
        kill_every,
        restart_spare_every,
        noise,
        scale_at,
        drain_at,
        kill_coordinator_at,
        coordinator_down_ms,
        corrupt_checkpoint_at,
        kill_job_at,
        fill_disk_at,
        disk_full_steps,
        disk_full_ms,
        hosts,
        resume,
        force,
        mut overrides,
    } = c;
    if resume {
        overrides.push("run.resume=true".into());
    }
    let parse = |flag: &str, v: Option<String>| -> Result<Option<(u64, u32)>> {
        let Some(s) = v else { return Ok(None) };
        let (a, b) = s
            .split_once(':')
            .with_context(|| format!("{flag} takes STEP:RANK, e.g. 100:1"))?;
        Ok(Some((
            a.parse()
                .with_context(|| format!("{flag}: STEP must be a number"))?,
            b.parse()
                .with_context(|| format!("{flag}: RANK must be a number"))?,
        )))
    };
    let kill = kill_at
        .into_iter()
        .filter_map(|k| parse("--kill-at", Some(k)).transpose())
        .collect::<Result<Vec<_>>>()?;
    let stop_at = parse("--stop-at", stop_at)?;
    let slow_at = parse("--slow-at", slow_at)?;
    let scale_at = parse("--scale-at", scale_at)?;
    let drain_at = parse("--drain-at", drain_at)?;
    if !(1..=100).contains(&slow_cpu_pct) {
        anyhow::bail!("--slow-cpu-pct {slow_cpu_pct}: use 1..=100 (percent of one core)");
    }
    let secs = |flag: &str, v: Option<f64>| -> Result<Option<std::time::Duration>> {
        match v {
            None => Ok(None),
            Some(x) if x.is_finite() && x >= 1.0 => Ok(Some(std::time::Duration::from_secs_f64(x))),
            Some(x) => anyhow::bail!("{flag} {x}: use a number of seconds >= 1"),
        }
    };
    let kill_every = secs("--kill-every", kill_every)?;
    let restart_spare_every = secs("--restart-spare-every", restart_spare_every)?;
    let noise = noise
        .as_deref()
        .map(launch_load::Noise::parse)
        .transpose()?;
    let stop = stop_on_ctrl_c()?;
    let code = launch::run(
        &launch::LaunchArgs {
            nproc,
            spares,
            config,
            overrides,
            plan: launch_schedule::Plan {
                kill,
                stop_at,
                stop_for: std::time::Duration::from_millis(stop_for_ms),
                slow_at,
                slow_cpu_pct,
                slow_steps,
                kill_every,
                restart_spare_every,
                scale_at,
                drain_at,
                kill_coordinator_at,
                coordinator_down: std::time::Duration::from_millis(coordinator_down_ms),
                corrupt_checkpoint_at,
                kill_job_at,
                fill_disk_at,
                disk_full_steps,
                disk_full_min: std::time::Duration::from_millis(disk_full_ms),
                placed: Vec::new(),
            },
            noise,
            hosts,
            progress: std::io::stderr().is_terminal(),
            force,
            worker_env: Vec::new(),
        },
        stop,
    )?;
    Ok(ExitCode::from(code as u8))
}

/// `phalanx prepare`: tokenizes the inputs and says what it wrote.
fn prepare_cmd(
    input: Vec<PathBuf>,
    tokenizer: Tok,
    out: Option<PathBuf>,
    val_fraction: f64,
) -> Result<ExitCode> {
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
    outln!(
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

/// `phalanx train`: one process, Ctrl-C saves and stops (twice: at once).
fn train_cmd(config: &std::path::Path, force: bool, overrides: &[String]) -> Result<ExitCode> {
    let cfg = TrainConfig::load(Some(config), overrides)?;
    run_dir::claim(&cfg.run.dir, force, "")?;
    let stop = stop_on_ctrl_c()?;
    let progress = cfg.run.progress && std::io::stderr().is_terminal();
    let out = train::run(&cfg, &stop, progress)?;
    let r = &out.report;
    outln!(
        "{} {} in {:.1} s: train loss {:.4}, val loss {}; model saved to {}",
        r["status"].as_str().unwrap_or(""),
        output::count(r["steps"].as_u64().unwrap_or(0), "step"),
        r["wall_s"].as_f64().unwrap_or(0.0),
        r["final_train_loss"].as_f64().unwrap_or(f64::NAN),
        r["final_val_loss"]
            .as_f64()
            .map_or("-".into(), |v| format!("{v:.4}")),
        r["model_dir"].as_str().unwrap_or(""),
    );
    let tps = |k: &str| r[k].as_f64().unwrap_or(0.0);
    outln!(
        "  tokens/s: {:.0} over the wall time, {:.0} over training time, {:.0} in the median step",
        tps("tokens_per_s_wall"),
        tps("tokens_per_s_train"),
        tps("tokens_per_s"),
    );
    Ok(if out.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// `phalanx bench ...`: each benchmark reports its figures.
fn bench_cmd(what: BenchCmd) -> Result<ExitCode> {
    match what {
        BenchCmd::Checkpoint(o) => {
            bench::checkpoint::run(&o)?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Detection(o) => {
            bench::detection::run(&o)?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Train {
            config,
            steps,
            runs,
            world,
            torch,
            overrides,
        } => {
            let cfg = TrainConfig::load(Some(&config), &overrides)?;
            if let Some(script) = torch {
                let v = bench::versus::Versus {
                    cfg: &cfg,
                    config: &config,
                    overrides: &overrides,
                    script: &script,
                    world: world.max(1),
                    steps: steps.max(20),
                    runs: runs.max(1),
                };
                bench::versus::run(&v)?;
            } else if world > 1 && cfg.train.zero == 1 {
                bench::zero::compare(&config, &overrides, world, steps.max(20), runs.max(1))?;
            } else if world > 1 && cfg.train.deterministic {
                let (steps, runs) = (steps.max(20), runs.max(1));
                bench::deterministic::compare(&config, &overrides, world, steps, runs)?;
            } else if world > 1 {
                bench::train::run_world(
                    &cfg,
                    &config,
                    &overrides,
                    world,
                    steps.max(20),
                    runs.max(1),
                )?;
            } else {
                bench::train::run(&cfg, steps.max(20), runs.max(1))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::TrainRank {
            bootstrap,
            rank,
            world,
            out,
            config,
            overrides,
        } => {
            let cfg = TrainConfig::load(Some(&config), &overrides)?;
            bench::train::bare_rank(&cfg, &bootstrap, rank, world, &out)?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Collectives {
            world,
            op,
            sizes,
            tuning,
            placement,
            worker_of,
            rank,
        } => {
            match worker_of {
                Some(addr) => {
                    bench::collectives::worker(&addr, rank, world as u32, op, &sizes, &tuning)?
                }
                None => bench::collectives::run(world, op, &sizes, &tuning, &placement)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Straggler {
            config,
            world,
            seconds,
        } => {
            bench::straggler::run(&config, world.max(2), seconds.max(10))?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Coordinator {
            ranks,
            seconds,
            grpc_ranks,
            grpc_seconds,
        } => {
            bench::coordinator::run(ranks, seconds.max(1), grpc_ranks, grpc_seconds.max(1))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `phalanx checkpoint verify|inspect`.
fn checkpoint_cmd(what: CheckpointCmd) -> Result<ExitCode> {
    let dir = match &what {
        CheckpointCmd::List { run_dir } => return checkpoint_list(run_dir),
        CheckpointCmd::Export { format, dir, out } => return checkpoint_export(*format, dir, out),
        CheckpointCmd::Verify { dir } | CheckpointCmd::Inspect { dir } => dir,
    };
    let (m, files) = phalanx_checkpoint::verify(dir)?;
    match what {
        CheckpointCmd::Verify { .. } => {
            outln!(
                "{}: OK, step {}, {} files verified",
                dir.display(),
                m.step,
                files.len()
            )
        }
        CheckpointCmd::Inspect { .. } => {
            outln!("{}", serde_json::to_string_pretty(&m)?);
            for side in [model_io::MODEL_JSON, phalanx_checkpoint::sharded::META] {
                if let Some(b) = files.get(side) {
                    outln!("{}", String::from_utf8_lossy(b));
                }
            }
        }
        CheckpointCmd::List { .. } | CheckpointCmd::Export { .. } => {
            unreachable!("answered above")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `phalanx checkpoint export --format hf DIR OUT`.
fn checkpoint_export(
    format: ExportFormat,
    dir: &std::path::Path,
    out: &std::path::Path,
) -> Result<ExitCode> {
    let ExportFormat::Hf = format;
    let (model, _, info) = model_io::load(dir, tch::Device::Cpu)?;
    phalanx_model::export::hf(&model, out)?;
    outln!(
        "{}: the model of step {} ({} layers) written as a Hugging Face folder {} ({} and {})",
        dir.display(),
        info.step,
        model.cfg.n_layer,
        out.display(),
        phalanx_model::export::CONFIG,
        phalanx_model::export::WEIGHTS
    );
    Ok(ExitCode::SUCCESS)
}

/// `phalanx checkpoint list RUN_DIR`: one line per save, newest first.
fn checkpoint_list(run_dir: &std::path::Path) -> Result<ExitCode> {
    use phalanx_checkpoint::sharded;
    let root = run_dir.join("checkpoints");
    if !root.is_dir() {
        anyhow::bail!(
            "{} has no checkpoints/: pass a run directory of a job with run.checkpoint_interval > 0",
            run_dir.display()
        );
    }
    let saves = sharded::saves(&root);
    let mut resumable = None;
    for (step, dir, committed) in &saves {
        let line = if !committed {
            "not committed (a save aborted or still being written; never loaded)".to_string()
        } else {
            match phalanx_checkpoint::verify(dir) {
                Ok((m, files)) => {
                    resumable.get_or_insert(*step);
                    let bytes: u64 = files.values().map(|b| b.len() as u64).sum();
                    let world = m.shards.as_ref().map_or(1, |s| s.world);
                    format!("committed, verified: {world} part(s), {bytes} bytes")
                }
                Err(e) => format!("committed, DOES NOT VERIFY: {e}"),
            }
        };
        outln!("step {step:>8}  {line}");
    }
    match resumable {
        Some(s) => outln!("--resume would start at step {s}"),
        None => outln!("no checkpoint verifies: --resume would start from step 0"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A flag the first Ctrl-C sets (the command stops gracefully: saves, reports); a second
/// Ctrl-C exits at once with 130.
fn stop_on_ctrl_c() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || {
        if s.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(stop)
}

#[cfg(test)]
mod cli_tests {
    use super::*;
    use clap::CommandFactory;

    /// Arguments and commands a user can see that have no help text, as "phalanx cmd arg".
    fn undescribed(c: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in c.get_arguments() {
            let id = a.get_id().as_str();
            if a.is_hide_set() || id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() {
                out.push(format!("{path} {id}"));
            }
        }
        for sub in c.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() && sub.get_name() != "help" {
                out.push(name.clone());
            }
            undescribed(sub, &name, out);
        }
    }

    // `--help` of every command describes every option a newcomer can see.
    #[test]
    fn every_visible_option_has_a_help_text() {
        let mut missing = Vec::new();
        undescribed(&Cli::command(), "phalanx", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
