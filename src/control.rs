//! `phalanx coordinator`, `phalanx status`, and the simulated rank used by the control-plane
//! tests and benchmarks.

use crate::config::CoordinatorSection;
use anyhow::{bail, Context, Result};
use phalanx_proto::pb;
use phalanx_runtime::coordinator::client::{self, ClientOpts};
use phalanx_runtime::coordinator::core::{CoreConfig, StragglerConfig};
use phalanx_runtime::coordinator::observed;
use phalanx_runtime::coordinator::service::{self, ServiceOpts};
use phalanx_runtime::dataplane::links::summary;
use phalanx_runtime::dataplane::PeerLink;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

pub fn core_config(c: &CoordinatorSection, max_world: usize) -> CoreConfig {
    CoreConfig {
        heartbeat_interval: ms(c.heartbeat_interval_ms),
        heartbeat_timeout: ms(c.heartbeat_timeout_ms),
        rejoin_grace: ms(c.rejoin_grace_ms),
        min_world: c.min_world,
        max_world,
        // A job's world is bounded by its micro-batches per step: the two are one number.
        micro_batches: max_world,
        hang_floor: ms(c.hang_timeout_floor_ms),
        hang_k: c.hang_k,
        progress_timeout: ms(c.progress_timeout_ms),
        straggler: StragglerConfig {
            window: c.straggler_window,
            ratio: c.straggler_ratio,
            min_excess: ms(c.straggler_min_excess_ms),
            flag_after: c.straggler_flag_after,
            severe_ratio: c.straggler_severe_ratio,
            unflag_after: c.straggler_unflag_after,
            clear_ratio: c.straggler_clear_ratio,
            evict: c.evict_stragglers,
            min_gain: c.straggler_min_gain,
            flag_after_time: ms(c.straggler_flag_after_ms),
            severe_after_time: ms(c.straggler_severe_after_ms),
            act_after: ms(c.straggler_act_after_ms),
            evict_after: ms(c.straggler_evict_after_ms),
            cooldown: ms(c.straggler_cooldown_ms),
            max_evictions: c.straggler_max_evictions,
            eviction_window: ms(c.straggler_eviction_window_ms),
            startup_grace: ms(c.straggler_startup_grace_ms),
        },
    }
}

fn read(p: &str, what: &str) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("cannot read {what} {p}"))
}

pub fn server_tls(c: &CoordinatorSection) -> Result<Option<ServerTlsConfig>> {
    if c.tls_cert.is_empty() {
        return Ok(None);
    }
    let id = Identity::from_pem(
        read(&c.tls_cert, "coordinator.tls_cert")?,
        read(&c.tls_key, "coordinator.tls_key")?,
    );
    Ok(Some(ServerTlsConfig::new().identity(id)))
}

pub fn client_tls(ca: &str, url: &str) -> Result<Option<ClientTlsConfig>> {
    if ca.is_empty() {
        if url.starts_with("https://") {
            bail!("{url} uses TLS: pass --tls-ca (or coordinator.tls_ca) with the CA certificate");
        }
        return Ok(None);
    }
    let host = url
        .split("://")
        .nth(1)
        .and_then(|r| r.split([':', '/']).next())
        .unwrap_or("localhost");
    Ok(Some(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(ca, "TLS CA")?))
            .domain_name(host),
    ))
}

pub struct CoordinatorArgs {
    pub bind: Option<String>,
    pub world: usize,
    pub max_world: usize,
    pub run_dir: PathBuf,
    /// Serve on a non-loopback address without a job token (a trusted network only).
    pub insecure: bool,
    /// The config hash every worker must have; `None`: the first worker's.
    pub config_hash: Option<String>,
}

pub fn service_opts(c: &CoordinatorSection, a: &CoordinatorArgs) -> Result<ServiceOpts> {
    let mut opts = ServiceOpts::new(&c.job_id, a.world);
    opts.token = c.token();
    opts.core = core_config(c, a.max_world);
    opts.journal = Some(a.run_dir.join("coordinator-journal.json"));
    opts.events = Some(a.run_dir.join("events.jsonl"));
    opts.step_times = Some(a.run_dir.join("step_times.jsonl"));
    opts.tick = ms(c.tick_ms);
    opts.keepalive_interval = ms(c.keepalive_interval_ms);
    opts.keepalive_timeout = ms(c.keepalive_timeout_ms);
    opts.tls = server_tls(c)?;
    opts.admin_token = Some(admin_token(c, &a.run_dir)?);
    opts.config_hash = a.config_hash.clone();
    Ok(opts)
}

/// `<run dir>/coordinator.url`, where `status --run-dir` finds the coordinator (as after
/// `phalanx launch`); an address bound to every interface is reached on loopback from here.
fn write_url(run_dir: &std::path::Path, mut addr: std::net::SocketAddr, tls: bool) -> Result<()> {
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    crate::run_dir::ensure(run_dir)?;
    let scheme = if tls { "https" } else { "http" };
    std::fs::write(
        run_dir.join("coordinator.url"),
        format!("{scheme}://{addr}\n"),
    )
    .with_context(|| format!("cannot write {}/coordinator.url", run_dir.display()))
}

/// 128 random bits as hex, or an error: a token is never weak because the random source failed.
pub fn random_token() -> Result<String> {
    Ok(phalanx_runtime::random::hex_secret("a job token")?)
}

/// Writes a secret readable by this user only.
pub fn write_secret(path: &std::path::Path, secret: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(secret.as_bytes())?;
    Ok(())
}

/// The configured admin token, or a new one written to `<run dir>/admin-token`.
fn admin_token(c: &CoordinatorSection, run_dir: &std::path::Path) -> Result<String> {
    if let Some(t) = c.admin_token() {
        return Ok(t);
    }
    let t = random_token()?;
    crate::run_dir::ensure(run_dir)?;
    write_secret(&run_dir.join("admin-token"), &t)?;
    Ok(t)
}

/// Closed by default: a coordinator others can reach needs a job token (or --insecure), and
/// is told loudly that without TLS its token travels in clear.
fn check_exposure(
    c: &CoordinatorSection,
    addr: std::net::SocketAddr,
    insecure: bool,
) -> Result<()> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if c.token().is_none() && !insecure {
        bail!(
            "refusing to serve on {addr} without a job token: anyone who reaches it could join or steer the job. Set PHALANX_JOB_TOKEN (or coordinator.token), or pass --insecure on a trusted network"
        );
    }
    if c.tls_cert.is_empty() {
        tracing::warn!(
            %addr,
            "serving without TLS on a non-loopback address: tokens and directives travel in clear; set coordinator.tls_cert and tls_key"
        );
    }
    Ok(())
}

pub fn run_coordinator(c: &CoordinatorSection, a: &CoordinatorArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let bind = match a.bind.clone() {
            Some(b) => b,
            None => master_port_bind()?.unwrap_or_else(|| c.bind.clone()),
        };
        let listener = tokio::net::TcpListener::bind(&bind)
            .await
            .with_context(|| format!("cannot listen on {bind}; pick another --bind address"))?;
        let addr = listener.local_addr()?;
        check_exposure(c, addr, a.insecure)?;
        crate::run_dir::new_job_of_campaign(&a.run_dir)?;
        let opts = service_opts(c, a)?;
        write_url(&a.run_dir, addr, opts.tls.is_some())?;
        // The first line on stdout is the address, so that a launcher (or a test) that asked
        // for port 0 learns the port.
        outln!("phalanx coordinator listening on {addr}");
        std::io::stdout().flush()?;
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            // A graceful shutdown waits for every session to end, and ranks keep theirs open
            // on purpose. The journal is already on disk, so bound the wait.
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_secs(2));
                std::process::exit(0);
            });
        };
        service::run(opts, listener, shutdown).await?;
        Ok(())
    })
}

pub fn client_opts(url: &str, tls_ca: &str) -> Result<ClientOpts> {
    let url = with_scheme(url, !tls_ca.is_empty());
    let mut o = ClientOpts::new(&url);
    o.tls = client_tls(tls_ca, &url)?;
    Ok(o)
}

/// `host:port` as the coordinator prints it, or a URL: the scheme follows TLS when missing.
pub fn with_scheme(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{}://{addr}", if tls { "https" } else { "http" })
    }
}

/// Where an admin command (status, scale, drain) finds the coordinator and its token.
#[derive(clap::Args, Debug)]
pub struct AdminTarget {
    /// The coordinator's address: a URL, or host:port as `phalanx coordinator` prints it. The
    /// token comes from PHALANX_ADMIN_TOKEN.
    #[arg(long, required_unless_present = "run_dir", conflicts_with = "run_dir")]
    pub coordinator: Option<String>,
    /// The job's run directory instead: the address from its coordinator.url and the token
    /// from its admin-token (PHALANX_ADMIN_TOKEN, when set, wins).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// CA certificate (PEM) to verify a TLS coordinator.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub tls_ca: String,
}

impl AdminTarget {
    pub fn opts(&self) -> Result<ClientOpts> {
        let Some(dir) = &self.run_dir else {
            let url = self.coordinator.as_deref().unwrap_or_default();
            return admin_opts(url, &self.tls_ca);
        };
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p)
                .map(|s| s.trim().to_string())
                .with_context(|| {
                    format!(
                        "cannot read {}: is {} the run directory of a job started by `phalanx \
                         launch` or `phalanx coordinator`?",
                        p.display(),
                        dir.display()
                    )
                })
        };
        let mut o = admin_opts(&read("coordinator.url")?, &self.tls_ca)?;
        if std::env::var("PHALANX_ADMIN_TOKEN").map_or(true, |t| t.is_empty()) {
            o.token = Some(read("admin-token")?);
        }
        Ok(o)
    }
}

/// An admin client (status, scale, drain): PHALANX_ADMIN_TOKEN, else the job token.
pub fn admin_opts(url: &str, tls_ca: &str) -> Result<ClientOpts> {
    let mut o = client_opts(url, tls_ca)?;
    if let Some(t) = std::env::var("PHALANX_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        o.token = Some(t);
    }
    Ok(o)
}

/// `phalanx status`; with the run directory, each rank's training-state memory too (Z-5).
pub fn status(
    opts: &ClientOpts,
    as_json: bool,
    all: bool,
    run_dir: Option<&std::path::Path>,
) -> Result<()> {
    let memory = run_dir.map(crate::report::memory).unwrap_or_default();
    let opts = opts.clone();
    let rt = tokio::runtime::Runtime::new()?;
    let s = rt.block_on(async {
        let mut c = client::connect(&opts).await?;
        let r = c
            .status(client::request(pb::StatusRequest {}, &opts))
            .await
            .map_err(client::status_error)?;
        Ok::<_, anyhow::Error>(r.into_inner())
    })?;
    if as_json {
        let ranks: Vec<_> = s
            .ranks
            .iter()
            .map(|r| {
                json!({"member": r.member_id, "rank": r.rank, "host": r.host, "pid": r.pid,
                       "role": role_name(r.role), "state": state_name(r.state), "step": r.step,
                       "step_ms": r.last_step_time_us as f64 / 1e3,
                       "heartbeat_age_ms": r.heartbeat_age_ms, "flags": r.flags,
                       "address": r.address, "links": links_of(r)})
            })
            .collect();
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "job": s.job_id, "generation": s.generation, "step": s.committed_step,
                "world": s.world, "target_world": s.target_world, "ranks": ranks,
                "memory": memory,
            }))?
        );
        return Ok(());
    }
    outln!(
        "job {}  generation {}  step {}  world {}/{}",
        s.job_id,
        s.generation,
        s.committed_step,
        s.world,
        s.target_world
    );
    outln!(
        "{:>5} {:>6} {:<16} {:<15} {:>7} {:<8} {:>8} {:>9} {:>8}  flags / transports",
        "rank",
        "member",
        "host",
        "address",
        "pid",
        "state",
        "step",
        "step_ms",
        "hb_age"
    );
    let (shown, hidden) = shown(&s.ranks, all);
    for r in shown {
        outln!(
            "{:>5} {:>6} {:<16} {:<15} {:>7} {:<8} {:>8} {:>9.1} {:>6}ms  {}",
            r.rank.map_or("-".into(), |x| x.to_string()),
            r.member_id,
            r.host,
            r.address,
            r.pid,
            state_name(r.state),
            r.step,
            r.last_step_time_us as f64 / 1e3,
            r.heartbeat_age_ms,
            [r.flags.join(","), summary(&links_of(r))]
                .iter()
                .filter(|x| !x.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    if hidden > 0 {
        outln!("({hidden} member(s) that left the job not shown; --all lists them)");
    }
    print_memory(&memory);
    Ok(())
}

/// One line per rank of the newest generation that recorded its memory.
fn print_memory(memory: &[phalanx_runtime::metrics::MemoryLine]) {
    let kib = |b: u64| b / 1024;
    for m in memory {
        outln!(
            "rank {} memory (generation {}): parameters {} KiB, gradients {} KiB, optimizer {} KiB, replicas {} KiB, peak RSS {} MiB",
            m.rank,
            m.generation,
            kib(m.params_bytes),
            kib(m.grads_bytes),
            kib(m.optimizer_bytes),
            kib(m.replica_bytes),
            m.peak_rss_kib.unwrap_or(0) / 1024
        );
    }
}

/// A rank's group transports as reported (a malformed entry is left out, not fatal here).
fn links_of(r: &pb::RankStatus) -> Vec<PeerLink> {
    observed::from_pb(&r.links).unwrap_or_default()
}

/// A member's state as `status` prints it (and `--json` gives it).
/// The members the table lists: those in the job (active and spares), or every one with
/// `all`; and how many it leaves out.
fn shown(ranks: &[pb::RankStatus], all: bool) -> (Vec<&pb::RankStatus>, usize) {
    let in_job = |r: &&pb::RankStatus| {
        matches!(
            pb::MemberState::try_from(r.state),
            Ok(pb::MemberState::Active | pb::MemberState::Spare)
        )
    };
    let shown: Vec<_> = ranks.iter().filter(|r| all || in_job(r)).collect();
    let hidden = ranks.len() - shown.len();
    (shown, hidden)
}

fn state_name(s: i32) -> &'static str {
    match pb::MemberState::try_from(s) {
        Ok(pb::MemberState::Active) => "active",
        Ok(pb::MemberState::Spare) => "spare",
        Ok(pb::MemberState::Dead) => "dead",
        Ok(pb::MemberState::Evicted) => "evicted",
        _ => "?",
    }
}

fn role_name(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Active) => "active",
        Ok(pb::Role::Spare) => "spare",
        _ => "?",
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

pub fn admin_scale(opts: &ClientOpts, target: u32) -> Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut c = client::connect(opts).await?;
        let r = c
            .scale(client::request(
                pb::ScaleRequest {
                    target_world: target,
                },
                opts,
            ))
            .await
            .map_err(client::status_error)?;
        outln!("{}", r.into_inner().message);
        Ok(())
    })
}

/// Asks for a drain of a rank or of a member (`--rank` / `--member`; `--rank` wins).
pub fn admin_drain(opts: &ClientOpts, rank: Option<u32>, member: Option<u64>) -> Result<()> {
    let who = match (rank, member) {
        (Some(r), _) => Some(pb::drain_request::Who::Rank(r)),
        (None, Some(m)) => Some(pb::drain_request::Who::MemberId(m)),
        (None, None) => anyhow::bail!("name who leaves: --rank N or --member ID"),
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut c = client::connect(opts).await?;
        let r = c
            .drain(client::request(pb::DrainRequest { who }, opts))
            .await
            .map_err(client::status_error)?;
        outln!("{}", r.into_inner().message);
        Ok(())
    })
}

/// Like torchrun's: with MASTER_PORT set and no --bind, the coordinator listens on that port on
/// every interface (the workers dial MASTER_ADDR:MASTER_PORT).
fn master_port_bind() -> Result<Option<String>> {
    let Ok(port) = std::env::var("MASTER_PORT") else {
        return Ok(None);
    };
    match port.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(Some(format!("0.0.0.0:{p}"))),
        _ => bail!("MASTER_PORT = {port:?} is not a port number (1-65535); fix it or pass --bind"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `status` lists the job as it is: departed members only with --all.
    #[test]
    fn status_lists_departed_members_only_when_asked() {
        let m = |id: u64, state: pb::MemberState| pb::RankStatus {
            member_id: id,
            state: state as i32,
            ..Default::default()
        };
        let ranks = [
            m(1, pb::MemberState::Active),
            m(2, pb::MemberState::Dead),
            m(3, pb::MemberState::Spare),
            m(4, pb::MemberState::Evicted),
        ];
        let (shown_now, hidden) = shown(&ranks, false);
        let ids: Vec<u64> = shown_now.iter().map(|r| r.member_id).collect();
        assert_eq!((ids, hidden), (vec![1, 3], 2));
        assert_eq!(shown(&ranks, true), (ranks.iter().collect(), 0));
    }
}
