//! Simulated hosts for `phalanx launch --hosts H`: the multi-host path on one machine.
//!
//! Each host is a holder process in its own network, IPC and UTS namespaces: its own `eth0`
//! with its own address on a bridge in the launcher's namespace (the coordinator listens on the
//! bridge), its own host name, and its own System V IPC, which is what UCX checks before it uses
//! shared memory; so ranks on one simulated host talk through shared memory and ranks on two
//! talk over TCP, as on two machines. Workers enter a host's namespaces with `nsenter`, which
//! execs (the worker keeps the pid the launcher sees). Faults that only exist across hosts: a
//! whole host lost (every process in it killed) and a host cut off by a firewall rule inside its
//! network namespace.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The simulated hosts of one launch; dropping it takes them down.
pub struct SimHosts {
    bridge: String,
    gateway: Ipv4Addr,
    hosts: Vec<SimHost>,
}

struct SimHost {
    name: String,
    addr: Ipv4Addr,
    holder: Child,
}

/// The subnet of this launch's bridge: one /24 in 10.200.0.0/13 chosen by the launcher's pid,
/// so that concurrent launches on one machine do not collide.
fn subnet(pid: u32) -> [u8; 3] {
    [10, 200 + (pid % 8) as u8, ((pid / 8) % 250) as u8]
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Says what to do when simulated hosts cannot be made here, instead of a silent fallback to
/// one host.
/// This process runs as root (effective uid 0).
pub fn is_root() -> bool {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        })
        .unwrap_or_default();
    uid == "0"
}

pub fn check_can_simulate() -> Result<()> {
    // Root is needed for namespaces, veth pairs and the bridge.
    if !is_root() {
        bail!(
            "--hosts simulates hosts with network namespaces, veth pairs and a bridge, which needs \
             root; run as root, or run without --hosts (one host)"
        );
    }
    for tool in ["ip", "nsenter", "unshare"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            bail!("--hosts needs `{tool}` on PATH (Debian: apt-get install iproute2 util-linux)");
        }
    }
    Ok(())
}

impl SimHosts {
    /// Makes `n` hosts named `<prefix>-h0`.. on a fresh bridge.
    pub fn create(n: usize, prefix: &str) -> Result<Self> {
        check_can_simulate()?;
        if n == 0 || n > 200 {
            bail!("--hosts {n}: between 1 and 200 simulated hosts");
        }
        let pid = std::process::id();
        let [a, b, c] = subnet(pid);
        let bridge = format!("phx{pid}");
        remove_stale_bridges();
        let gateway = Ipv4Addr::new(a, b, c, 1);
        run(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]))?;
        let mut hosts = SimHosts {
            bridge: bridge.clone(),
            gateway,
            hosts: Vec::new(),
        };
        run(Command::new("ip").args(["addr", "add", &format!("{gateway}/24"), "dev", &bridge]))?;
        run(Command::new("ip").args(["link", "set", &bridge, "up"]))?;
        for i in 0..n {
            let name = format!("{prefix}-h{i}");
            let addr = Ipv4Addr::new(a, b, c, 2 + i as u8);
            let holder = hosts.holder(&name)?;
            hosts.hosts.push(SimHost { name, addr, holder });
            hosts.wire(i)?;
        }
        Ok(hosts)
    }

    /// A process in new network, IPC and UTS namespaces that lives until its stdin closes
    /// (the launcher exits, even by SIGKILL).
    fn holder(&self, name: &str) -> Result<Child> {
        let child = Command::new("unshare")
            .args(["--net", "--ipc", "--uts", "--", "sh", "-c"])
            .arg(format!("hostname {name} && exec cat >/dev/null"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start a simulated host (unshare)")?;
        // The namespaces exist once unshare has run in the child, before its exec.
        let ours = std::fs::read_link("/proc/self/ns/net")?;
        let t = Instant::now();
        while std::fs::read_link(format!("/proc/{}/ns/net", child.id())).ok() == Some(ours.clone())
        {
            if t.elapsed() > Duration::from_secs(5) {
                bail!("the simulated host {name} did not get its own network namespace");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(child)
    }

    /// A veth pair: `phx<pid>h<i>` on the bridge, `eth0` in the host with its address and a
    /// default route through the bridge.
    fn wire(&self, i: usize) -> Result<()> {
        let h = &self.hosts[i];
        let outside = format!("{}h{i}", self.bridge);
        let pid = h.holder.id().to_string();
        run(Command::new("ip").args([
            "link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns", &pid,
        ]))?;
        run(Command::new("ip").args(["link", "set", &outside, "master", &self.bridge, "up"]))?;
        let inside = |args: &[&str]| {
            run(Command::new("nsenter")
                .args(["-t", &pid, "--net", "--"])
                .args(args))
        };
        inside(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", h.addr),
            "dev",
            "eth0",
        ])?;
        inside(&["ip", "link", "set", "eth0", "up"])?;
        inside(&["ip", "link", "set", "lo", "up"])?;
        inside(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &self.gateway.to_string(),
        ])?;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// The address the coordinator listens on: the bridge's, reachable from every host.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    pub fn name(&self, host: usize) -> &str {
        &self.hosts[host].name
    }

    pub fn addr(&self, host: usize) -> Ipv4Addr {
        self.hosts[host].addr
    }

    /// A command that runs `exe` on `host`: `nsenter` execs it in the host's namespaces.
    pub fn command(&self, host: usize, exe: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.hosts[host].holder.id().to_string()])
            .args(["--net", "--ipc", "--uts", "--"])
            .arg(exe);
        cmd
    }

    /// Whether process `pid` runs on `host` (shares its network namespace).
    pub fn runs_on(&self, pid: u32, host: usize) -> bool {
        let of = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
        let ns = of(pid);
        ns.is_some() && ns == of(self.hosts[host].holder.id())
    }

    /// A partition: a firewall rule inside the host drops every packet in and out except on
    /// loopback (its own ranks still reach each other; nobody else reaches them).
    pub fn cut_off(&self, host: usize) -> Result<()> {
        let rules = "table inet phalanx_cut {\n\
             chain in { type filter hook input priority 0; policy drop; iif lo accept; }\n\
             chain out { type filter hook output priority 0; policy drop; oif lo accept; }\n\
             }\n";
        self.nft(host, rules)
            .with_context(|| format!("cannot cut off {}", self.name(host)))
    }

    /// Every TCP connection between `host` and the other hosts goes through a local port:
    /// connections out of it and into it are redirected there (the coordinator's address, the
    /// host's own and connections carrying `mark` are let through). Made before the job's
    /// connections are, since a redirect applies to a connection when it is opened.
    pub fn route_through(&self, host: usize, port: u16, mark: u32) -> Result<()> {
        let h = &self.hosts[host];
        let subnet = format!("{}/24", self.gateway);
        let rules = format!(
            "table ip phalanx_link {{\n\
             chain out {{ type nat hook output priority -100; ip daddr {subnet} ip daddr != {gw} \
             ip daddr != {own} meta mark != {mark} meta l4proto tcp redirect to :{port}; }}\n\
             chain pre {{ type nat hook prerouting priority -100; iifname \"eth0\" \
             ip saddr {subnet} ip saddr != {gw} meta l4proto tcp redirect to :{port}; }}\n}}\n",
            gw = self.gateway,
            own = h.addr,
        );
        self.nft(host, &rules)
            .with_context(|| format!("cannot route {} through a proxy", h.name))
    }

    /// Loads `rules` into `host`'s firewall.
    fn nft(&self, host: usize, rules: &str) -> Result<()> {
        let pid = self.hosts[host].holder.id().to_string();
        let mut nft = Command::new("nsenter");
        nft.args(["-t", &pid, "--net", "--", "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = nft
            .spawn()
            .context("cannot run nft (Debian: apt-get install nftables)")?;
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, rules.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Ends a partition made by `cut_off`.
    pub fn reconnect(&self, host: usize) -> Result<()> {
        let pid = self.hosts[host].holder.id().to_string();
        run(Command::new("nsenter").args([
            "-t",
            &pid,
            "--net",
            "--",
            "nft",
            "delete",
            "table",
            "inet",
            "phalanx_cut",
        ]))
    }
}

impl Drop for SimHosts {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            let _ = h.holder.kill();
            let _ = h.holder.wait();
        }
        // The veth pairs go with their namespaces; the bridge is ours to remove.
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// Bridges of launches that died without cleaning up (`phx<pid>` whose pid is gone).
fn remove_stale_bridges() {
    let Ok(out) = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if let Some(pid) = name.strip_prefix("phx").and_then(|p| p.parse::<u32>().ok()) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["link", "del", name]).output();
            }
        }
    }
}

/// Which host worker slot `i` of `nproc` active ranks (then spares) runs on: the active ranks
/// in contiguous blocks, as a scheduler packs them; spares from the last host backwards, so
/// that a spare is seldom on the host it replaces a rank of.
pub fn place(i: usize, nproc: usize, hosts: usize) -> usize {
    if i < nproc {
        i * hosts / nproc.max(1)
    } else {
        hosts - 1 - (i - nproc) % hosts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_go_in_blocks_and_spares_from_the_last_host() {
        let p: Vec<usize> = (0..5).map(|i| place(i, 4, 2)).collect();
        assert_eq!(p, vec![0, 0, 1, 1, 1]);
        let p: Vec<usize> = (0..8).map(|i| place(i, 6, 3)).collect();
        assert_eq!(p, vec![0, 0, 1, 1, 2, 2, 2, 1]);
        assert_eq!(place(0, 1, 1), 0);
    }

    #[test]
    fn subnets_stay_private() {
        for pid in [1, 7, 8, 4_000_000] {
            let [a, b, _] = subnet(pid);
            assert_eq!(a, 10);
            assert!((200..208).contains(&b));
        }
    }
}
