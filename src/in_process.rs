//! A whole job in one process, for tests: the coordinator service and each rank's supervision
//! tree (control agent, loader, communicator, the real compute loop, checkpointer) as threads
//! of the test, the control plane over real gRPC on loopback, the data plane in-process
//! (`InProcFabrics`, which keeps the UCX transport's rules). A job of 4 ranks with a failure
//! and a heal takes seconds here; the same scenarios over UCX between processes are in
//! `tests/multi_rank.rs`.

use crate::config::TrainConfig;
use crate::control::{service_opts, CoordinatorArgs};
use crate::worker::{rank_params, WorkerArgs};
use anyhow::Result;
use phalanx_actors::rank::{self, RankHandle};
use phalanx_model::prepare::{prepare, PrepareOptions, TokenizerKind};
use phalanx_runtime::dataplane::InProcFabrics;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Job {
    pub cfg: TrainConfig,
    pub run_dir: PathBuf,
    url: String,
    fabrics: Arc<InProcFabrics>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    coordinator: Option<std::thread::JoinHandle<Result<()>>>,
}

/// A small corpus, prepared with the character tokenizer, in `dir/data`.
pub fn dataset(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("plays");
    std::fs::create_dir_all(&src)?;
    let line =
        "FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n\nALL:\nSpeak, speak.\n\n";
    for (i, name) in ["coriolanus", "tempest", "lear"].iter().enumerate() {
        std::fs::write(src.join(format!("{name}.txt")), line.repeat(150 + 40 * i))?;
    }
    let out = dir.join("data");
    prepare(&PrepareOptions {
        inputs: vec![src],
        tokenizer: TokenizerKind::Char,
        out: out.clone(),
        val_fraction: 0.1,
    })?;
    Ok(out)
}

impl Job {
    /// The coordinator of a job of `world` ranks over `dir`, with `overrides` on a tiny model.
    pub fn start(dir: &Path, world: usize, overrides: &[&str]) -> Result<Job> {
        let data = dataset(dir)?;
        let run_dir = dir.join("run");
        let mut o: Vec<String> = vec![
            format!("data.dir={}", data.display()),
            format!("run.dir={}", run_dir.display()),
            "model.n_layer=1".into(),
            "model.n_head=2".into(),
            "model.n_embd=32".into(),
            "model.block_size=32".into(),
            "train.global_batch=16".into(),
            "train.micro_batch=4".into(),
            "train.device=cpu".into(),
            "train.threads=1".into(),
            "train.eval_sequences=8".into(),
            "optim.warmup_steps=5".into(),
            "coordinator.evict_stragglers=false".into(),
        ];
        o.extend(overrides.iter().map(|s| s.to_string()));
        let cfg = TrainConfig::load(None, &o)?;
        std::fs::create_dir_all(&run_dir)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let opts = service_opts(
            &cfg.coordinator,
            &CoordinatorArgs {
                bind: None,
                world,
                max_world: cfg.train.global_batch / cfg.train.micro_batch,
                run_dir: run_dir.clone(),
                insecure: false,
                config_hash: None,
            },
        )?;
        let (tx, coordinator) = crate::launch_coordinator::serve_on_a_thread(opts, listener)?;
        Ok(Job {
            cfg,
            run_dir,
            url,
            fabrics: Arc::new(InProcFabrics::default()),
            shutdown: Some(tx),
            coordinator: Some(coordinator),
        })
    }

    /// Starts a rank (a spare when `spare`), its data plane on this job's fabrics.
    pub fn rank(&self, spare: bool) -> Result<RankHandle> {
        let a = WorkerArgs {
            url: self.url.clone(),
            tls_ca: String::new(),
            spare,
            no_rejoin: true,
            cfg: self.cfg.clone(),
            run_dir: self.run_dir.clone(),
        };
        let first = crate::train::setup(&self.cfg)?;
        let mut params = rank_params(&a, &self.cfg, &first)?;
        params.data_plane = phalanx_actors::comm::in_process(self.fabrics.clone());
        Ok(rank::start(params, first)?)
    }

    pub fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.coordinator.take().map(|c| c.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("the coordinator thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Waits until `cond` holds, or fails after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > limit {
            anyhow::bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_runtime::events::{self, Event, GenerationFormed};

    fn generations(run_dir: &Path) -> Vec<GenerationFormed> {
        let text = std::fs::read_to_string(run_dir.join("events.jsonl")).unwrap_or_default();
        events::read(&text)
            .0
            .into_iter()
            .filter_map(|r| match r.event {
                Event::Generation(g) => Some(g),
                _ => None,
            })
            .collect()
    }

    // K-1, R-1, D-4, G-2 through the real compute loop in seconds: 4 in-process ranks train; one
    // crashes at a chosen step; the others regroup to 3 and go on; a new rank joins as a spare,
    // is promoted and healed from the holders; the job finishes with every step's samples
    // consumed exactly once and every rank holding the same state.
    #[test]
    fn four_in_process_ranks_lose_one_heal_a_joiner_and_finish() -> Result<()> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("PHALANX_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir()?;
        let job = Job::start(
            dir.path(),
            4,
            &[
                "train.max_steps=60",
                "optim.decay_steps=60",
                "coordinator.min_world=2",
            ],
        )?;
        let t = Instant::now();
        let mut ranks: Vec<RankHandle> = (0..4).map(|_| job.rank(false)).collect::<Result<_>>()?;
        wait_for("step 15", Duration::from_secs(60), || ranks[2].step() >= 15)?;
        let crashed_at = ranks[2].step();
        ranks.remove(2).crash();
        wait_for("the regroup to 3", Duration::from_secs(30), || {
            generations(&job.run_dir).iter().any(|g| g.world == 3)
        })?;
        ranks.push(job.rank(true)?);
        for r in ranks {
            assert_eq!(r.wait()?, rank::EXIT_DONE);
        }
        let wall = t.elapsed();
        let gens = generations(&job.run_dir);
        let worlds: Vec<usize> = gens.iter().map(|g| g.world).collect();
        assert_eq!(worlds.first(), Some(&4), "{gens:?}");
        assert!(worlds.contains(&3), "{gens:?}");
        assert_eq!(worlds.last(), Some(&4), "the joiner is promoted: {gens:?}");
        let joined = gens.last().unwrap();
        assert_eq!(joined.promoted.len(), 1, "one promoted: {gens:?}");
        assert!(
            joined.heal.iter().any(|(m, _)| *m == joined.promoted[0]),
            "the joiner is healed: {gens:?}"
        );
        let report = crate::report::from_run_dir(&job.run_dir)?;
        assert_eq!(report["steps"], 60, "{report}");
        assert_eq!(
            report["ledger"]["exactly_once"], true,
            "{}",
            report["ledger"]
        );
        assert_eq!(report["ledger"]["steps"], 60, "{}", report["ledger"]);
        let fps = std::fs::read_to_string(job.run_dir.join("fingerprints.jsonl"))?;
        let last: Vec<serde_json::Value> = fps
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let final_gen = last.iter().filter_map(|f| f["generation"].as_u64()).max();
        let states: std::collections::BTreeSet<String> = last
            .iter()
            .filter(|f| f["generation"].as_u64() == final_gen)
            .map(|f| f["state_sha256"].to_string())
            .collect();
        assert_eq!(states.len(), 1, "{fps}");
        assert_eq!(
            last.iter()
                .filter(|f| f["generation"].as_u64() == final_gen)
                .count(),
            4,
            "{fps}"
        );
        eprintln!(
            "crashed at step {crashed_at}; worlds {worlds:?}; 60 steps in {:.1} s",
            wall.as_secs_f64()
        );
        job.stop()
    }
}
