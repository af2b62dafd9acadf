//! `phalanx launch --hosts H`: the ranks on H simulated hosts (see `hosts`), and the faults that
//! only exist across hosts: a whole host lost, a host cut off by a firewall rule, and a host
//! whose links to the others turn slow (a proxy on the path, see `link_proxy`).

use crate::hosts::SimHosts;
use crate::launch::append_event;
use crate::link_proxy::{self, Slowness};
use crate::run_dir::unix_ms;
use crate::signals::{self, Signal};
use anyhow::{bail, Context, Result};
use phalanx_proto::pb;
use phalanx_runtime::events::{Cleared, Event, FaultKind, Injected};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tracing::info;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct HostArgs {
    /// Place the ranks (and spares) on H simulated hosts: network, IPC and UTS namespaces on a
    /// bridge, so that ranks on different hosts talk over TCP (needs root).
    #[arg(long, value_name = "H")]
    pub hosts: Option<usize>,
    /// Fault injection: kill every process on host HOST at once once step STEP is committed.
    #[arg(long, value_name = "STEP:HOST")]
    pub kill_host_at: Option<String>,
    /// Fault injection: cut host HOST off the network (a firewall rule inside it) once step
    /// STEP is committed ...
    #[arg(long, value_name = "STEP:HOST")]
    pub cut_host_at: Option<String>,
    /// ... for this many seconds (then its processes reach the coordinator again).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub cut_for: f64,
    /// Fault injection: the links between host HOST and the others turn slow once step STEP
    /// is committed (a proxy on their path from the start holds and paces their bytes) ...
    #[arg(long, value_name = "STEP:HOST")]
    pub slow_link_at: Option<String>,
    /// ... for this many seconds ...
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub slow_link_for: f64,
    /// ... adding this much latency each way ...
    #[arg(long, value_name = "MS", default_value_t = 20)]
    pub slow_link_ms: u64,
    /// ... with this bandwidth per connection and direction (0: no cap).
    #[arg(long, value_name = "MBIT_S", default_value_t = 100)]
    pub slow_link_mbit: u32,
}

/// A host fault to inject once a step is committed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HostFault {
    Kill {
        at: u64,
        host: usize,
    },
    Cut {
        at: u64,
        host: usize,
        for_: Duration,
    },
    SlowLink {
        at: u64,
        host: usize,
        for_: Duration,
        how: Slowness,
    },
}

impl HostFault {
    fn at(&self) -> u64 {
        match self {
            HostFault::Kill { at, .. }
            | HostFault::Cut { at, .. }
            | HostFault::SlowLink { at, .. } => *at,
        }
    }
}

impl HostArgs {
    /// The faults asked for, checked against the number of hosts.
    pub fn faults(&self) -> Result<Vec<HostFault>> {
        let hosts = self.hosts.unwrap_or(0);
        let parse = |flag: &str, v: &Option<String>| -> Result<Option<(u64, usize)>> {
            let Some(s) = v else { return Ok(None) };
            let (a, b) = s
                .split_once(':')
                .with_context(|| format!("{flag} takes STEP:HOST, e.g. 200:1"))?;
            let step = a
                .parse()
                .with_context(|| format!("{flag}: STEP must be a number"))?;
            let host: usize = b
                .parse()
                .with_context(|| format!("{flag}: HOST must be a number"))?;
            if host >= hosts {
                bail!("{flag} {s}: there are {hosts} hosts (0..{hosts}); add --hosts N");
            }
            Ok(Some((step, host)))
        };
        let mut out = Vec::new();
        if let Some((at, host)) = parse("--kill-host-at", &self.kill_host_at)? {
            out.push(HostFault::Kill { at, host });
        }
        if let Some((at, host)) = parse("--cut-host-at", &self.cut_host_at)? {
            if !(self.cut_for.is_finite() && self.cut_for >= 1.0) {
                bail!("--cut-for {}: use a number of seconds >= 1", self.cut_for);
            }
            out.push(HostFault::Cut {
                at,
                host,
                for_: Duration::from_secs_f64(self.cut_for),
            });
        }
        if let Some((at, host)) = parse("--slow-link-at", &self.slow_link_at)? {
            if !(self.slow_link_for.is_finite() && self.slow_link_for >= 1.0) {
                bail!(
                    "--slow-link-for {}: use a number of seconds >= 1",
                    self.slow_link_for
                );
            }
            if self.slow_link_ms > 10_000 {
                bail!("--slow-link-ms {}: at most 10000", self.slow_link_ms);
            }
            if self.slow_link_ms == 0 && self.slow_link_mbit == 0 {
                bail!("a slow link needs --slow-link-ms or --slow-link-mbit above 0");
            }
            out.push(HostFault::SlowLink {
                at,
                host,
                for_: Duration::from_secs_f64(self.slow_link_for),
                how: Slowness {
                    delay: Duration::from_millis(self.slow_link_ms),
                    rate_mbit_s: self.slow_link_mbit,
                },
            });
        }
        if self.hosts == Some(0) {
            bail!("--hosts 0: use at least 1 (or leave it out for one host)");
        }
        Ok(out)
    }
}

/// The host faults of one launch and what became of them.
pub struct HostFaults {
    pending: Vec<HostFault>,
    /// A cut host and when to reconnect it.
    cut: Option<(usize, Instant)>,
    /// The link proxy of the host a slow link is planned on, and when a slow link ends.
    proxy: Option<LinkProxy>,
    slowed: Option<(usize, Instant)>,
}

/// The proxy process on a host's links; it goes with its guard.
struct LinkProxy {
    child: Child,
}

impl LinkProxy {
    /// Its pid, once it is known to run: a proxy that died would leave the host's connections
    /// redirected to nothing, a partition nobody planned.
    fn running(&mut self, hosts: &SimHosts, host: usize) -> Result<u32> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "the link proxy on {} exited ({st}): the host's connections to the others are \
                 cut; see the launch log",
                hosts.name(host)
            );
        }
        Ok(self.child.id())
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HostFaults {
    pub fn new(faults: Vec<HostFault>) -> Self {
        HostFaults {
            pending: faults,
            cut: None,
            proxy: None,
            slowed: None,
        }
    }

    /// Before any worker starts: the proxy of a planned slow link on its host's path, so the
    /// job's connections are made through it.
    pub fn prepare(&mut self, hosts: &SimHosts, exe: &Path) -> Result<()> {
        let Some(&HostFault::SlowLink { host, how, .. }) = self
            .pending
            .iter()
            .find(|f| matches!(f, HostFault::SlowLink { .. }))
        else {
            return Ok(());
        };
        let mut cmd = hosts.command(host, exe);
        cmd.arg("link-proxy")
            .arg(format!("--delay-ms={}", how.delay.as_millis()))
            .arg(format!("--rate-mbit={}", how.rate_mbit_s))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().context("cannot start the link proxy")?;
        // It says when it listens; nothing may connect before.
        let mut ready = String::new();
        let out = child.stdout.take().context("the link proxy's stdout")?;
        std::io::BufReader::new(out).read_line(&mut ready)?;
        let proxy = LinkProxy { child };
        if ready.trim() != "listening" {
            bail!(
                "the link proxy on {} did not start; see the launch log",
                hosts.name(host)
            );
        }
        hosts.route_through(host, link_proxy::PORT, link_proxy::MARK)?;
        self.proxy = Some(proxy);
        Ok(())
    }

    /// Whether a fault waits for its step (the launcher polls faster then).
    pub fn pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Injects the faults whose step is committed; returns the processes killed on purpose.
    pub fn poll(
        &mut self,
        hosts: &SimHosts,
        st: &pb::StatusResponse,
        pids: &[u32],
        run_dir: &Path,
    ) -> Result<usize> {
        let mut killed = 0;
        let due: Vec<HostFault> = self
            .pending
            .iter()
            .copied()
            .filter(|f| st.committed_step >= f.at())
            .collect();
        self.pending.retain(|f| !due.contains(f));
        for f in due {
            match f {
                HostFault::Kill { host, .. } => {
                    killed += kill_host(hosts, host, st, pids, run_dir)?
                }
                HostFault::Cut { host, for_, .. } => {
                    hosts.cut_off(host)?;
                    self.cut = Some((host, Instant::now() + for_));
                    let on: Vec<u32> = on_host(hosts, host, pids);
                    let mut f = Injected::of(FaultKind::HostPartition, true);
                    f.host = Some(hosts.name(host).to_string());
                    f.ranks = ranks_of(st, &on);
                    f.pids = on;
                    f.step = Some(st.committed_step);
                    f.for_ms = Some(for_.as_millis() as u64);
                    append_event(run_dir, Event::FaultInjected(f))?;
                    info!(host = hosts.name(host), "injected: host cut off");
                }
                HostFault::SlowLink {
                    host, for_, how, ..
                } => self.slow_down(hosts, host, for_, how, st, pids, run_dir)?,
            }
        }
        Ok(killed)
    }

    #[allow(clippy::too_many_arguments)]
    fn slow_down(
        &mut self,
        hosts: &SimHosts,
        host: usize,
        for_: Duration,
        how: Slowness,
        st: &pb::StatusResponse,
        pids: &[u32],
        run_dir: &Path,
    ) -> Result<()> {
        let proxy = self.proxy.as_mut().context("no link proxy was started")?;
        let ok = signals::send(Signal::Usr1, &[proxy.running(hosts, host)?]);
        self.slowed = Some((host, Instant::now() + for_));
        let on = on_host(hosts, host, pids);
        let mut f = Injected::of(FaultKind::SlowLink, ok);
        f.host = Some(hosts.name(host).to_string());
        f.ranks = ranks_of(st, &on);
        f.pids = on;
        f.step = Some(st.committed_step);
        f.for_ms = Some(for_.as_millis() as u64);
        f.delay_ms = Some(how.delay.as_millis() as u64);
        f.rate_mbit_s = Some(how.rate_mbit_s);
        append_event(run_dir, Event::FaultInjected(f))?;
        info!(host = hosts.name(host), "injected: slow links");
        Ok(())
    }

    /// Ends a partition or a slow link whose time is up (also called when the job ends).
    pub fn heal(&mut self, hosts: &SimHosts, run_dir: &Path, now: bool) -> Result<()> {
        if let (Some((host, until)), Some(p)) = (self.slowed, self.proxy.as_mut()) {
            if now || Instant::now() >= until {
                signals::send(Signal::Usr2, &[p.running(hosts, host)?]);
                self.slowed = None;
                cleared(run_dir, FaultKind::SlowLink, hosts.name(host))?;
                info!(host = hosts.name(host), "links fast again");
            }
        }
        if let Some((host, until)) = self.cut {
            if now || Instant::now() >= until {
                hosts.reconnect(host)?;
                self.cut = None;
                cleared(run_dir, FaultKind::HostPartition, hosts.name(host))?;
                info!(host = hosts.name(host), "host reconnected");
            }
        }
        Ok(())
    }
}

/// A host fault's end, in the run's events.
fn cleared(run_dir: &Path, fault: FaultKind, host: &str) -> Result<()> {
    append_event(
        run_dir,
        Event::FaultCleared(Cleared {
            fault,
            pid: None,
            host: Some(host.to_string()),
            step: None,
            cleared_unix_ms: Some(unix_ms()),
        }),
    )
}

fn on_host(hosts: &SimHosts, host: usize, pids: &[u32]) -> Vec<u32> {
    pids.iter()
        .copied()
        .filter(|&p| hosts.runs_on(p, host))
        .collect()
}

fn ranks_of(st: &pb::StatusResponse, pids: &[u32]) -> Vec<u32> {
    st.ranks
        .iter()
        .filter(|r| pids.contains(&r.pid) && r.state() == pb::MemberState::Active)
        .filter_map(|r| r.rank)
        .collect()
}

/// A whole host lost: every process on it killed at once (SIGKILL), as when a node dies.
fn kill_host(
    hosts: &SimHosts,
    host: usize,
    st: &pb::StatusResponse,
    pids: &[u32],
    run_dir: &Path,
) -> Result<usize> {
    let on = on_host(hosts, host, pids);
    let ok = crate::signals::send(crate::signals::Signal::Kill, &on);
    let mut f = Injected::of(FaultKind::HostLost, ok);
    f.host = Some(hosts.name(host).to_string());
    f.ranks = ranks_of(st, &on);
    f.pids = on.clone();
    f.step = Some(st.committed_step);
    append_event(run_dir, Event::FaultInjected(f))?;
    info!(
        host = hosts.name(host),
        processes = on.len(),
        "injected: host lost"
    );
    Ok(on.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_faults_name_a_host_that_exists() {
        let a = HostArgs {
            hosts: Some(2),
            kill_host_at: Some("200:1".into()),
            cut_host_at: Some("50:0".into()),
            cut_for: 5.0,
            slow_link_at: Some("70:1".into()),
            slow_link_for: 3.0,
            slow_link_ms: 20,
            slow_link_mbit: 0,
        };
        let f = a.faults().unwrap();
        assert_eq!(f[0], HostFault::Kill { at: 200, host: 1 });
        assert!(matches!(
            f[1],
            HostFault::Cut {
                at: 50,
                host: 0,
                ..
            }
        ));
        assert!(matches!(
            f[2],
            HostFault::SlowLink {
                at: 70,
                host: 1,
                how: Slowness { rate_mbit_s: 0, .. },
                ..
            }
        ));
        let never_slow = HostArgs {
            slow_link_ms: 0,
            ..a.clone()
        };
        assert!(never_slow
            .faults()
            .unwrap_err()
            .to_string()
            .contains("above 0"));
        let bad = HostArgs {
            kill_host_at: Some("200:2".into()),
            ..a.clone()
        };
        assert!(bad
            .faults()
            .unwrap_err()
            .to_string()
            .contains("there are 2 hosts"));
        let none = HostArgs { hosts: None, ..a };
        assert!(none.faults().unwrap_err().to_string().contains("--hosts"));
    }
}
