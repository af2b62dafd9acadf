//! The gloo baseline beside `phalanx bench collectives --gloo`: bench/gloo_collectives.py
//! (torch.distributed over gloo) with the same ranks on the same (simulated) hosts, each size
//! in turn, timed the same way (barrier, op, slowest rank per iteration).

use super::collectives::Op;
use crate::hosts::SimHosts;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SCRIPT: &str = "bench/gloo_collectives.py";

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PHALANX_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(".venv/bin/python");
    if venv.exists() {
        venv.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("0.0.0.0:0")?
        .local_addr()?
        .port())
}

/// Runs the gloo script once per size with `placed[r]` the host of rank r; prints rank 0's line.
pub fn compare(
    op: Op,
    sizes: &[usize],
    iters: usize,
    warmup: usize,
    sim: Option<&SimHosts>,
    placed: &[usize],
) -> Result<()> {
    let name = match op {
        Op::Allreduce => "allreduce",
        Op::Broadcast => "broadcast",
        _ => bail!("--gloo: the gloo baseline covers --op allreduce and broadcast"),
    };
    if !Path::new(SCRIPT).exists() {
        bail!("--gloo needs {SCRIPT}: run the bench from the repository root");
    }
    let world = placed.len();
    let master = sim.map_or_else(
        || "127.0.0.1".to_string(),
        |s| s.addr(placed[0]).to_string(),
    );
    for &size in sizes {
        let port = free_port()?.to_string();
        let mut kids = Vec::new();
        for (r, &h) in placed.iter().enumerate() {
            let py = python();
            let mut cmd = match sim {
                Some(s) => s.command(h, &py),
                None => Command::new(&py),
            };
            cmd.arg(SCRIPT)
                .args(["--ops", name, "--size-mib"])
                .arg(format!("{}", size as f64 / (1 << 20) as f64))
                .args([
                    "--iters",
                    &iters.to_string(),
                    "--warmup",
                    &warmup.to_string(),
                ])
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", "0")
                .env("MASTER_ADDR", &master)
                .env("MASTER_PORT", &port)
                // As torchrun sets it for several processes per machine.
                .env("OMP_NUM_THREADS", "1")
                .stdout(Stdio::piped())
                // c10d warns about host names it cannot resolve on simulated hosts; shown only
                // when a rank fails.
                .stderr(Stdio::piped());
            if sim.is_some() {
                cmd.env("GLOO_SOCKET_IFNAME", "eth0");
            }
            kids.push(
                cmd.spawn()
                    .with_context(|| format!("cannot start {} {SCRIPT}", py.display()))?,
            );
        }
        let mut failed = Vec::new();
        for (r, mut k) in kids.into_iter().enumerate() {
            if let Some(out) = k.stdout.take() {
                for line in BufReader::new(out).lines() {
                    let line = line?;
                    if line.starts_with("gloo ") {
                        outln!("# {line}");
                    }
                }
            }
            let mut err = String::new();
            if let Some(mut e) = k.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            let st = k.wait()?;
            if !st.success() {
                failed.push(format!("rank {r} exited with {st}: {}", err.trim()));
            }
        }
        if !failed.is_empty() {
            bail!("the gloo baseline failed: {}", failed.join("; "));
        }
    }
    Ok(())
}
