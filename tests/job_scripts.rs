//! The shipped job scripts, run as shipped under their scheduler's environment: Slurm's
//! variables (SLURM_JOB_NODELIST, SLURM_NTASKS, SLURM_PROCID ...) and PBS's (PBS_O_WORKDIR,
//! PBS_NODEFILE, PMI_RANK ...), with the scheduler's process launchers (`srun`, `scontrol`,
//! `mpiexec`, `ssh`) replaced by stand-ins that start the tasks on this machine
//! (tests/scheduler/). A real Slurm is the campaign issue's.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The script's command with the scheduler stand-ins first on PATH and the shipped config.
fn script(name: &str) -> Command {
    let path = format!(
        "{}:{}",
        repo().join("tests/scheduler").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("bash");
    c.arg(repo().join("examples").join(name))
        .current_dir(repo())
        .env("PATH", path)
        .env("PHALANX", env!("CARGO_BIN_EXE_phalanx"))
        .env("PHALANX_LOG", "warn")
        .env("MASTER_PORT", free_port().to_string())
        .env("CONFIG", repo().join("configs/shakespeare-char.toml"))
        .env("PHALANX_JOB_TOKEN", "job-scripts-test");
    c
}

fn overrides(dir: &Path, data: &Path) -> Vec<String> {
    vec![
        format!("data.dir={}", data.display()),
        format!("run.dir={}", dir.join("run").display()),
        "train.max_steps=30".into(),
        "optim.decay_steps=30".into(),
        "optim.warmup_steps=5".into(),
        "train.eval_sequences=8".into(),
    ]
}

/// The job ran to the end on `world` ranks: `phalanx report` on its run directory says so.
fn assert_completed(dir: &Path, world: u64, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "the script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = dir.join("run");
    let report = make_report(&run);
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["steps"], 30, "{report}");
    assert_eq!(report["world_size_final"], world, "{report}");
    assert_ledger_exactly_once(&report);
    assert_identical_final_state(&run, world as usize);
}

#[test]
fn slurm_script_runs_as_shipped() {
    let _one_at_a_time = serial();
    let d = test_dir();
    let data = shakespeare_char(d.path());
    let out = script("slurm.sbatch")
        .args(overrides(d.path(), &data))
        .env("SLURM_JOB_NODELIST", "localhost")
        .env("SLURM_NTASKS", "4")
        .env("SLURM_JOB_ID", "4242")
        .output()
        .unwrap();
    assert_completed(d.path(), 4, &out);
}

#[test]
fn pbs_script_runs_as_shipped() {
    let _one_at_a_time = serial();
    let d = test_dir();
    let data = shakespeare_char(d.path());
    let nodefile = d.path().join("nodefile");
    std::fs::write(&nodefile, "localhost\nlocalhost\nlocalhost\n").unwrap();
    let out = script("pbs.sh")
        .env("PBS_O_WORKDIR", repo())
        .env("PBS_NODEFILE", &nodefile)
        .env("PBS_JOBID", "4242.pbs")
        .env("OVERRIDES", overrides(d.path(), &data).join(" "))
        .output()
        .unwrap();
    assert_completed(d.path(), 3, &out);
}
