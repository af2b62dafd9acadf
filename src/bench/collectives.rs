//! `phalanx bench collectives`: N local processes over UCX, one collective at several sizes,
//! reported like nccl-tests (time per op, algbw, busbw; median with min/max over iterations).
//!
//! The parent runs the address-exchange server and spawns `phalanx bench collectives
//! --worker-of ADDR --rank R` (hidden options) once per rank. Each worker times every iteration between a barrier and the end of the op;
//! an iteration's time is the slowest rank's (the op is done when every rank is done).

use super::gloo;
use crate::hosts::{self, SimHosts};
use crate::train::median;
use anyhow::{anyhow, bail, Context, Result};
use phalanx_runtime::dataplane::collectives::even_segments;
use phalanx_runtime::dataplane::links::summary;
use phalanx_runtime::dataplane::{
    advertised_ip, AddressSettings, BootstrapServer, CollConfig, TcpBootstrap, UcxConfig, UcxGroup,
};
use phalanx_runtime::{Generation, Rank};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    Allreduce,
    Broadcast,
    Allgather,
    ReduceScatter,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Allreduce => "allreduce",
            Op::Broadcast => "broadcast",
            Op::Allgather => "allgather",
            Op::ReduceScatter => "reduce-scatter",
        }
    }

    /// nccl-tests' bus-bandwidth factor: the fraction of the data each link carries.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Op::Allreduce => 2.0 * (n - 1.0) / n,
            Op::Broadcast => 1.0,
            Op::Allgather | Op::ReduceScatter => (n - 1.0) / n,
        }
    }
}

/// Tuning shared by the parent and its workers.
#[derive(Clone, Debug, clap::Args)]
pub struct Tuning {
    /// Timed iterations per size.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Message size in KiB.
    #[arg(long, default_value_t = 1024)]
    pub chunk_kb: usize,
    /// Messages in flight per direction.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Collective deadline: fail when nothing progresses for this long.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Busy-poll this long without progress before sleeping on the worker's event fd.
    #[arg(long, default_value_t = 0)]
    pub spin_us: u64,
    /// UCX endpoint error mode: `peer` (UCP_ERR_HANDLING_MODE_PEER) or `none`.
    #[arg(long, default_value = "peer")]
    pub err_mode: String,
    /// Chunks a broadcast root stages in its shared-memory window.
    #[arg(long, default_value_t = 8)]
    pub bcast_slots: usize,
    /// Keep allreduce, reduce-scatter and allgather on the ring even where every rank can map
    /// the others' shared-memory windows.
    #[arg(long)]
    pub no_mesh: bool,
    /// KiB of the buffer a shared-memory allreduce, reduce-scatter or allgather moves per round.
    #[arg(long, default_value_t = 256)]
    pub mesh_round_kb: usize,
}

/// Parses `1K,1M,16M,64M` (binary units) into byte counts.
pub fn parse_sizes(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|t| {
            let t = t.trim();
            let (num, mult) = match t.char_indices().last() {
                Some((i, 'K' | 'k')) => (&t[..i], 1usize << 10),
                Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
                Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
                _ => (t, 1),
            };
            let n: usize = num
                .parse()
                .with_context(|| format!("size {t:?}: expected e.g. 1K, 16M, 4096"))?;
            let bytes = n
                .checked_mul(mult)
                .ok_or_else(|| anyhow!("size {t:?} is too large"))?;
            if bytes % 4 != 0 {
                bail!("size {t:?}: must be a multiple of 4 bytes (float32 elements)");
            }
            Ok(bytes)
        })
        .collect()
}

fn human(b: usize) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => format!("{b}"),
    }
}

/// Where the bench runs: this host, or ranks in blocks on simulated hosts (TCP between them);
/// and whether the gloo baseline runs in the same places after it.
#[derive(Clone, Debug, clap::Args)]
pub struct Placement {
    /// Place the ranks on H simulated hosts (network namespaces on a bridge; needs root).
    #[arg(long, value_name = "H")]
    pub hosts: Option<usize>,
    /// Also run the gloo baseline (bench/gloo_collectives.py, torch.distributed) with the same
    /// ranks on the same hosts, and print its figures under the table.
    #[arg(long)]
    pub gloo: bool,
}

pub fn run(world: usize, op: Op, sizes: &str, t: &Tuning, place: &Placement) -> Result<()> {
    if !(1..=64).contains(&world) {
        bail!("--world {world}: use 1..=64 local processes");
    }
    let sizes_v = parse_sizes(sizes)?;
    let iters = t.iters.max(1);
    let sim = match place.hosts {
        Some(h) if h > world => bail!("--hosts {h}: more hosts than the {world} ranks"),
        Some(h) => Some(SimHosts::create(h, "phalanx-bench")?),
        None => None,
    };
    let host_of = |r: usize| sim.as_ref().map_or(0, |s| hosts::place(r, world, s.len()));
    let bind_ip = sim
        .as_ref()
        .map_or_else(|| "127.0.0.1".to_string(), |s| s.gateway().to_string());
    let srv = BootstrapServer::bind(&format!("{bind_ip}:0"))?;
    let addr = srv.local_addr().to_string();
    let exe = std::env::current_exe().context("locating the phalanx binary")?;
    let server =
        std::thread::spawn(move || srv.serve(world as u32, Generation(1), Duration::from_secs(60)));
    let mut kids = Vec::new();
    for r in 0..world {
        let cmd = match &sim {
            Some(s) => s.command(host_of(r), &exe),
            None => Command::new(&exe),
        };
        kids.push(spawn_rank(cmd, &addr, r, world, op, sizes, t)?);
    }
    let mut c = Collected {
        times: vec![vec![0f64; iters]; sizes_v.len()],
        reported: vec![0usize; sizes_v.len()],
        mem: vec![0u64; sizes_v.len()],
        links: Vec::new(),
    };
    let mut failures = Vec::new();
    for (r, mut k) in kids.into_iter().enumerate() {
        let out = k
            .stdout
            .take()
            .ok_or_else(|| anyhow!("rank {r}: no stdout"))?;
        c.read_rank(r, out, iters)?;
        let st = k.wait()?;
        if !st.success() {
            failures.push(format!("rank {r} exited with {st}"));
        }
    }
    let Collected {
        times,
        reported,
        mem,
        links,
    } = c;
    server
        .join()
        .map_err(|_| anyhow!("bootstrap thread panicked"))??;
    if let Some(si) = reported.iter().position(|&c| c != world) {
        failures.push(format!(
            "only {} of {world} ranks reported size {}",
            reported[si],
            human(sizes_v[si])
        ));
    }
    if !failures.is_empty() {
        bail!("benchmark failed: {}", failures.join("; "));
    }
    let tls = std::env::var("UCX_TLS").unwrap_or_else(|_| "(UCX default)".into());
    outln!(
        "# phalanx bench collectives: op {} world {world} iters {iters} warmup {} chunk {} KiB window {} bcast-slots {} mesh {} (rounds of {} KiB) err-mode {} UCX_TLS={tls}",
        op.name(),
        t.warmup,
        t.chunk_kb,
        t.window,
        t.bcast_slots,
        if t.no_mesh { "off" } else { "on" },
        t.mesh_round_kb,
        t.err_mode
    );
    if let Some(s) = &sim {
        let at: Vec<String> = (0..world)
            .map(|r| format!("rank {r} on {}", s.name(host_of(r))))
            .collect();
        outln!("# hosts: {}", at.join(", "));
    }
    for l in &links {
        outln!("# links {l}");
    }
    outln!(
        "# {:>8} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10} {:>10} {:>10} {:>13}",
        "size",
        "count(f32)",
        "time_med_us",
        "time_min_us",
        "time_max_us",
        "algbw_GB/s",
        "busbw_GB/s",
        "busbw_min",
        "busbw_max",
        "extra_rss_MiB"
    );
    for (si, &size) in sizes_v.iter().enumerate() {
        let mut v = times[si].clone();
        let med = median(&mut v);
        let (min, max) = (v[0], v[v.len() - 1]);
        let alg = |s: f64| size as f64 / s / 1e9;
        let bf = op.bus_factor(world);
        outln!(
            "  {:>8} {:>11} {:>11.1} {:>11.1} {:>11.1} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>13.1}",
            human(size),
            size / 4,
            med * 1e6,
            min * 1e6,
            max * 1e6,
            alg(med),
            alg(med) * bf,
            alg(max) * bf,
            alg(min) * bf,
            mem[si] as f64 / 1024.0
        );
    }
    if place.gloo {
        let placed: Vec<usize> = (0..world).map(host_of).collect();
        gloo::compare(op, &sizes_v, iters, t.warmup, sim.as_ref(), &placed)?;
    }
    Ok(())
}

/// What the ranks printed.
struct Collected {
    /// times[size][iter] = slowest rank's seconds.
    times: Vec<Vec<f64>>,
    /// How many ranks reported each size.
    reported: Vec<usize>,
    /// Growth of the peak RSS during the iterations of each size, largest over ranks (KiB).
    mem: Vec<u64>,
    links: Vec<String>,
}

impl Collected {
    /// Reads rank `r`'s lines: TIMES, MEM and LINKS records; anything else is passed on.
    fn read_rank(&mut self, r: usize, out: impl std::io::Read, iters: usize) -> Result<()> {
        let (times, reported, mem, links) = (
            &mut self.times,
            &mut self.reported,
            &mut self.mem,
            &mut self.links,
        );
        for line in BufReader::new(out).lines() {
            let line = line?;
            let mut f = line.split_whitespace();
            let head = f.next();
            if head == Some("MEM") {
                let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
                if let [si, kib] = v[..] {
                    if let Some(m) = mem.get_mut(si as usize) {
                        *m = (*m).max(kib);
                    }
                }
                continue;
            }
            if head == Some("LINKS") {
                links.push(format!("rank {r}: {}", f.collect::<Vec<_>>().join(" ")));
                continue;
            }
            if head != Some("TIMES") {
                // UCX's own diagnostics (e.g. UCX_PROTO_INFO=y) go to stdout: pass them on.
                eprintln!("[rank {r}] {line}");
                continue;
            }
            let si: usize = f
                .next()
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| anyhow!("bad line {line:?}"))?;
            if std::env::var_os("PHALANX_BENCH_RAW").is_some() {
                eprintln!("[rank {r}] {line}");
            }
            if let Some(c) = reported.get_mut(si) {
                *c += 1;
            }
            for (i, us) in f.enumerate().take(iters) {
                let s = us
                    .parse::<f64>()
                    .map_err(|e| anyhow!("bad time in {line:?}: {e}"))?
                    / 1e6;
                if let Some(slot) = times.get_mut(si).and_then(|v| v.get_mut(i)) {
                    *slot = slot.max(s);
                }
            }
        }
        Ok(())
    }
}

/// Starts rank `r` as `phalanx bench collectives --worker-of ADDR` with the parent's tuning.
fn spawn_rank(
    mut cmd: Command,
    addr: &str,
    r: usize,
    world: usize,
    op: Op,
    sizes: &str,
    t: &Tuning,
) -> Result<std::process::Child> {
    cmd.args(["bench", "collectives", "--worker-of", addr])
        .args(["--rank", &r.to_string(), "--world", &world.to_string()])
        .args(["--op", op.name(), "--sizes", sizes])
        .args(["--iters", &t.iters.max(1).to_string()])
        .args(["--warmup", &t.warmup.to_string()])
        .args(["--chunk-kb", &t.chunk_kb.to_string()])
        .args(["--window", &t.window.to_string()])
        .args(["--timeout-ms", &t.timeout_ms.to_string()])
        .args(["--spin-us", &t.spin_us.to_string()])
        .args(["--err-mode", &t.err_mode])
        .args(["--bcast-slots", &t.bcast_slots.to_string()])
        .args(t.no_mesh.then_some("--no-mesh"))
        .args(["--mesh-round-kb", &t.mesh_round_kb.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning rank {r}"))
}

/// One rank of the benchmark. Prints `TIMES <size index> <us> ...` per size; checks the
/// result of the last iteration of every size and fails if it is wrong.
/// This process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

pub fn worker(
    bootstrap: &str,
    rank: u32,
    world: u32,
    op: Op,
    sizes: &str,
    t: &Tuning,
) -> Result<()> {
    let cfg = UcxConfig {
        coll: CollConfig {
            chunk_bytes: t.chunk_kb.max(1) * 1024,
            window: t.window.max(1),
            timeout: Duration::from_millis(t.timeout_ms),
            bcast_slots: t.bcast_slots.max(1),
            mesh: !t.no_mesh,
            mesh_round_bytes: t.mesh_round_kb.max(1) * 1024,
        },
        spin: Duration::from_micros(t.spin_us),
        peer_error_mode: match t.err_mode.as_str() {
            "peer" => true,
            "none" => false,
            other => bail!("--err-mode {other:?}: use peer or none"),
        },
        ..UcxConfig::default()
    };
    let boot = Box::new(TcpBootstrap {
        server: bootstrap.to_string(),
    });
    // The liveness listener at the address that reaches the bootstrap server (another host's
    // ranks dial it), as a worker's reaches its coordinator.
    let ip = advertised_ip(&AddressSettings::from_env_and("", ""), bootstrap)?;
    let cfg = UcxConfig {
        liveness_ip: ip.ip.to_string(),
        ..cfg
    };
    let g = UcxGroup::connect(Rank(rank), world, Generation(1), cfg, boot)?;
    outln!("LINKS {}", summary(g.links()));
    let n = world as usize;
    for (si, size) in parse_sizes(sizes)?.into_iter().enumerate() {
        let elems = size / 4;
        // Small integers: every order of addition gives the exact sum, so the check is exact.
        let fill = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = (rank + 1) as f32);
        let mut f = vec![0f32; elems];
        let mut b = vec![0u8; size];
        let mut out = Vec::with_capacity(t.iters);
        // Touch the buffers first so that the high-water mark before the op counts them.
        f.iter_mut().for_each(|x| *x = 1.0);
        b.iter_mut().for_each(|x| *x = 1);
        let hwm_before = peak_rss_kib();
        for it in 0..t.warmup + t.iters {
            match op {
                Op::Allreduce | Op::ReduceScatter => fill(&mut f),
                Op::Allgather => {
                    let seg = phalanx_runtime::dataplane::transport::part(elems, n, rank as usize);
                    f[seg].iter_mut().for_each(|x| *x = (rank + 1) as f32);
                }
                Op::Broadcast => {
                    if rank == 0 {
                        b.iter_mut()
                            .enumerate()
                            .for_each(|(i, x)| *x = (i % 251) as u8);
                    } else {
                        // The result checked after the loop must come from the last broadcast.
                        b.iter_mut().for_each(|x| *x = 0);
                    }
                }
            }
            g.barrier()?;
            let segs = even_segments(f.len(), g.world() as usize);
            let t0 = Instant::now();
            match op {
                Op::Allreduce => g.allreduce(&mut f)?,
                Op::ReduceScatter => g.reduce_scatter(&mut f, &segs)?,
                Op::Allgather => g.allgather(&mut f, &segs)?,
                Op::Broadcast => g.broadcast(&mut b, Rank(0))?,
            }
            let dt = t0.elapsed();
            if it >= t.warmup {
                out.push(dt.as_secs_f64() * 1e6);
            }
        }
        let ok = match op {
            Op::Allreduce => f.iter().all(|&x| x == (n * (n + 1) / 2) as f32),
            Op::ReduceScatter => {
                let seg = phalanx_runtime::dataplane::transport::part(elems, n, rank as usize);
                f[seg].iter().all(|&x| x == (n * (n + 1) / 2) as f32)
            }
            Op::Allgather => (0..n).all(|k| {
                let seg = phalanx_runtime::dataplane::transport::part(elems, n, k);
                f[seg].iter().all(|&x| x == (k + 1) as f32)
            }),
            Op::Broadcast => b.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8),
        };
        if !ok {
            bail!(
                "rank {rank}: wrong {} result at size {}",
                op.name(),
                human(size)
            );
        }
        let line: Vec<String> = out.iter().map(|us| format!("{us:.1}")).collect();
        outln!("TIMES {si} {}", line.join(" "));
        if let (Some(a), Some(z)) = (hwm_before, peak_rss_kib()) {
            outln!("MEM {si} {}", z.saturating_sub(a));
        }
    }
    // Every rank's figures are out; the barrier only keeps the group up until all are. Over TCP
    // a peer that got through it first may close before this rank's last message lands there:
    // that is no failure of the measurement.
    if let Err(e) = g.barrier() {
        eprintln!("rank {rank}: a peer left during the final barrier ({e})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units_and_reject_garbage() {
        assert_eq!(
            parse_sizes("1K,1M,16M,64M").unwrap(),
            vec![1024, 1 << 20, 16 << 20, 64 << 20]
        );
        assert_eq!(parse_sizes("4096").unwrap(), vec![4096]);
        assert!(parse_sizes("3").is_err());
        assert!(parse_sizes("1X").is_err());
        assert!(parse_sizes("").is_err());
    }

    #[test]
    fn bus_factors_follow_nccl_tests() {
        assert_eq!(Op::Allreduce.bus_factor(4), 1.5);
        assert_eq!(Op::Broadcast.bus_factor(4), 1.0);
        assert_eq!(Op::Allgather.bus_factor(4), 0.75);
    }
}
