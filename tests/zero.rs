//! ZeRO-1 (`train.zero = 1`) under real workers, UCX and libtorch: the optimizer's moments
//! sharded over the ranks, moved on every membership change, restored from buddy replicas in
//! memory when a rank is lost, and from the last checkpoint only when a shard's owner and its
//! copies are all gone.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

fn launch(dir: &Path, args: &[&str]) -> Launched {
    let _one_at_a_time = serial();
    let data = dataset(dir);
    let cfg = job_config(dir, &data);
    // The moves of moments are logged at info.
    let r = launch_job(dir, &cfg, Hosts::One, args, &[("PHALANX_LOG", "info")]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.report["status"], "completed", "{}", r.report);
    assert_ledger_exactly_once(&r.report);
    r
}

/// The final parameters rank 0 saved, as bytes.
fn final_params(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("model").join("model.safetensors")).unwrap()
}

fn restores(report: &Value) -> Vec<String> {
    report["optimizer_shards_lost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["restored_from"].as_str().unwrap().to_string())
        .collect()
}

// Z-1, T-6: in deterministic mode ZeRO-1 trains the parameters of replicated data parallel
// bitwise: 1 replicated rank, 3 ZeRO-1 ranks, and 4 ZeRO-1 ranks with rank 1 killed at step 20
// (Z-4: its shard restored from its buddy's copy in memory) end with the same bytes.
#[test]
fn zero_is_bitwise_replicated_training_in_deterministic_mode() {
    // Long enough that the kill (when the launcher hears of step 20, on a heartbeat) lands
    // mid-job: a deterministic step of this model takes a few ms.
    let det = [
        "train.max_steps=400",
        "optim.decay_steps=400",
        "train.deterministic=true",
    ];
    let run = |extra: &[&str]| {
        let d = test_dir();
        let mut a = det.to_vec();
        a.extend_from_slice(extra);
        let r = launch(d.path(), &a);
        (final_params(&r.run), r.report, d)
    };
    let (one, _, _d1) = run(&["--world", "1"]);
    let (three, r3, _d3) = run(&["--world", "3", "train.zero=1"]);
    let (killed, rk, _dk) = run(&["--world", "4", "train.zero=1", "--kill-at", "20:1"]);
    assert_eq!(r3["world_size_final"], 3);
    // Z-5: each of the 3 ranks holds a third of the moments (8 bytes per parameter in all),
    // and its own snapshot and one copy (12 bytes per parameter each, of a shard).
    let mem = r3["memory"].as_array().unwrap();
    assert_eq!(mem.len(), 3, "{mem:?}");
    let params = mem[0]["params_bytes"].as_u64().unwrap();
    let moments: u64 = mem
        .iter()
        .map(|m| m["optimizer_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(moments, 2 * params, "{mem:?}");
    let replicas: u64 = mem
        .iter()
        .map(|m| m["replica_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(replicas, 6 * params, "{mem:?}");
    assert_eq!(restores(&r3), Vec::<String>::new());
    assert_eq!(
        restores(&rk),
        ["replicas in memory"],
        "{}",
        rk["optimizer_shards_lost"]
    );
    assert!(one == three, "1 replicated rank vs 3 ZeRO-1 ranks");
    assert!(
        one == killed,
        "1 replicated rank vs 4 ZeRO-1 ranks with a kill"
    );
}

// Z-3: ranks 1 and 2 killed at once: rank 1's shard had its only copy on rank 2, so the job
// goes back to its last committed checkpoint, says so, and every sample is still used once.
#[test]
fn losing_a_shard_and_its_copy_returns_to_the_checkpoint() {
    let d = test_dir();
    let r = launch(
        d.path(),
        &[
            "--world",
            "4",
            "--spares",
            "1",
            "--kill-at",
            "40:1",
            "--kill-at",
            "40:2",
            "train.zero=1",
            "train.max_steps=120",
            "optim.decay_steps=120",
            "run.checkpoint_interval=20",
        ],
    );
    assert_eq!(restores(&r.report), ["checkpoint"], "{}", r.report);
    let back = &r.report["optimizer_shards_lost"][0];
    assert_eq!(back["to_step"].as_u64().unwrap() % 20, 0, "{back}");
    assert_identical_final_state(
        &r.run,
        r.report["world_size_final"].as_u64().unwrap() as usize,
    );
}

// Z-2: 4 ranks drained to 3, then scaled to 5 (two spares promoted) while training: the
// moments move to each new cut over the data plane, the drained rank's from its buddy.
#[test]
fn resizing_four_three_five_moves_the_shards_live() {
    let d = test_dir();
    let r = launch(
        d.path(),
        &[
            "--world",
            "4",
            "--spares",
            "2",
            "--drain-at",
            "30:3",
            "--scale-at",
            "70:5",
            // 8 micro-batches a step: room for 5 ranks.
            "train.global_batch=32",
            "train.zero=1",
            "train.max_steps=160",
            "optim.decay_steps=160",
        ],
    );
    let worlds: Vec<u64> = r
        .events()
        .iter()
        .filter(|e| e["kind"] == "generation")
        .map(|e| e["world"].as_u64().unwrap())
        .collect();
    assert_eq!(worlds.first(), Some(&4), "{worlds:?}");
    assert!(
        worlds.contains(&3) && worlds.last() == Some(&5),
        "{worlds:?}"
    );
    // No checkpoint here: nothing came from the disk.
    assert!(
        restores(&r.report)
            .iter()
            .all(|f| f == "replicas in memory"),
        "{}",
        r.report["optimizer_shards_lost"]
    );
    let logs = (0..8)
        .map(|i| {
            std::fs::read_to_string(r.run.join("logs").join(format!("worker-{i}.log")))
                .unwrap_or_default()
        })
        .collect::<String>();
    let moved: u64 = logs
        .lines()
        .filter(|l| l.contains("optimizer moments moved"))
        .filter_map(|l| {
            l.split("values=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    // The joiners got their shards over the data plane: moved from their holders, or, when a
    // rank had not finished the step the regroup interrupted (its moments are then stale),
    // restored from the replicas.
    assert!(
        moved > 0 || !restores(&r.report).is_empty(),
        "no moments moved between ranks"
    );
    assert_identical_final_state(&r.run, 5);
}
