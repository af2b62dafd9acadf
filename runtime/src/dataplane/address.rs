//! The address a rank advertises to its peers: every listener a peer dials (the liveness
//! connections; UCX publishes its own interfaces in the worker address) must be reachable from
//! other hosts, so it is never loopback unless the coordinator itself is.
//!
//! Like NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME: an explicit address wins, then an interface
//! name, then the address of the interface that routes to the coordinator (which every rank
//! reaches, so its peers on the same network do too). The environment wins over the config.

use crate::RuntimeError;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

/// Environment variables that override the config (`dataplane.address`, `dataplane.interface`).
pub const ENV_ADDRESS: &str = "PHALANX_ADDRESS";
pub const ENV_IFNAME: &str = "PHALANX_SOCKET_IFNAME";

/// Where the advertised address came from, for the log and `phalanx status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressSource {
    /// `PHALANX_ADDRESS` or `dataplane.address`.
    Explicit(String),
    /// `PHALANX_SOCKET_IFNAME` or `dataplane.interface`: the interface's first IPv4 address.
    Interface(String),
    /// The local address of the route to the coordinator.
    RouteTo(SocketAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressChoice {
    pub ip: IpAddr,
    pub source: AddressSource,
}

impl std::fmt::Display for AddressChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            AddressSource::Explicit(from) => write!(f, "{} (from {from})", self.ip),
            AddressSource::Interface(name) => write!(f, "{} (interface {name})", self.ip),
            AddressSource::RouteTo(c) => write!(f, "{} (route to the coordinator {c})", self.ip),
        }
    }
}

/// The settings, each from the environment or else the config (empty = unset).
#[derive(Debug, Clone, Default)]
pub struct AddressSettings {
    pub address: Option<(String, &'static str)>,
    pub interface: Option<(String, &'static str)>,
}

impl AddressSettings {
    pub fn from_env_and(config_address: &str, config_interface: &str) -> Self {
        let pick = |env: &'static str, key: &'static str, cfg: &str| match std::env::var(env)
            .ok()
            .filter(|v| !v.trim().is_empty())
        {
            Some(v) => Some((v.trim().to_string(), env)),
            None => (!cfg.trim().is_empty()).then(|| (cfg.trim().to_string(), key)),
        };
        AddressSettings {
            address: pick(ENV_ADDRESS, "dataplane.address", config_address),
            interface: pick(ENV_IFNAME, "dataplane.interface", config_interface),
        }
    }
}

/// Chooses the address to advertise; `coordinator` is its URL (`http://host:port`).
pub fn advertised_ip(
    settings: &AddressSettings,
    coordinator: &str,
) -> Result<AddressChoice, RuntimeError> {
    if let Some((a, from)) = &settings.address {
        let ip: IpAddr = a.parse().map_err(|_| RuntimeError::Address {
            reason: format!("{from} = {a:?} is not an IP address (e.g. 10.0.0.5)"),
        })?;
        return Ok(AddressChoice {
            ip,
            source: AddressSource::Explicit(from.to_string()),
        });
    }
    if let Some((name, from)) = &settings.interface {
        let ifs = if_addrs::get_if_addrs().map_err(|e| RuntimeError::Address {
            reason: format!("cannot list the network interfaces: {e}"),
        })?;
        let listed: Vec<(String, IpAddr)> = ifs.iter().map(|i| (i.name.clone(), i.ip())).collect();
        let ip = interface_ip(&listed, name).ok_or_else(|| RuntimeError::Address {
            reason: format!(
                "{from} = {name:?} has no IP address here; interfaces: {}",
                names(&listed)
            ),
        })?;
        return Ok(AddressChoice {
            ip,
            source: AddressSource::Interface(name.clone()),
        });
    }
    let target = coordinator_addr(coordinator)?;
    Ok(AddressChoice {
        ip: route_source(target)?,
        source: AddressSource::RouteTo(target),
    })
}

/// The interface's IPv4 address, else its first address.
fn interface_ip(ifs: &[(String, IpAddr)], name: &str) -> Option<IpAddr> {
    let mine = || ifs.iter().filter(|(n, _)| n == name).map(|(_, ip)| *ip);
    mine().find(IpAddr::is_ipv4).or_else(|| mine().next())
}

fn names(ifs: &[(String, IpAddr)]) -> String {
    let mut v: Vec<String> = ifs.iter().map(|(n, ip)| format!("{n} ({ip})")).collect();
    v.dedup();
    v.join(", ")
}

/// `http://host:port` (or `host:port`) resolved to one socket address.
fn coordinator_addr(url: &str) -> Result<SocketAddr, RuntimeError> {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or(rest);
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| RuntimeError::Address {
            reason: format!("cannot resolve the coordinator address {hostport:?}"),
        })
}

/// The local address the kernel would send from to reach `target` (no packet is sent: a
/// connected UDP socket only picks a route).
fn route_source(target: SocketAddr) -> Result<IpAddr, RuntimeError> {
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let s = UdpSocket::bind(any).map_err(|e| RuntimeError::Address {
        reason: format!("cannot open a socket: {e}"),
    })?;
    s.connect(target).map_err(|e| RuntimeError::Address {
        reason: format!("no route to the coordinator {target}: {e}"),
    })?;
    s.local_addr()
        .map(|a| a.ip())
        .map_err(|e| RuntimeError::Address {
            reason: format!("no local address towards {target}: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(address: Option<&str>, interface: Option<&str>) -> AddressSettings {
        AddressSettings {
            address: address.map(|a| (a.to_string(), "dataplane.address")),
            interface: interface.map(|i| (i.to_string(), "dataplane.interface")),
        }
    }

    #[test]
    fn an_explicit_address_wins_and_a_bad_one_says_what_to_set() {
        let c = advertised_ip(&settings(Some("10.1.2.3"), Some("nope0")), "http://x:1").unwrap();
        assert_eq!(c.ip, "10.1.2.3".parse::<IpAddr>().unwrap());
        let e = advertised_ip(&settings(Some("eth0"), None), "http://127.0.0.1:1").unwrap_err();
        assert!(e.to_string().contains("not an IP address"), "{e}");
        assert!(e.to_string().contains("PHALANX_ADDRESS"), "{e}");
    }

    #[test]
    fn an_interface_gives_its_ipv4_address_or_lists_the_others() {
        let ifs = vec![
            ("eth0".to_string(), "fe80::1".parse().unwrap()),
            ("eth0".to_string(), "10.0.0.7".parse().unwrap()),
            ("lo".to_string(), "127.0.0.1".parse().unwrap()),
        ];
        assert_eq!(
            interface_ip(&ifs, "eth0"),
            Some("10.0.0.7".parse().unwrap())
        );
        assert_eq!(interface_ip(&ifs, "ib0"), None);
        let e = advertised_ip(&settings(None, Some("no-such-if9")), "http://x:1").unwrap_err();
        assert!(e.to_string().contains("interfaces: "), "{e}");
        let lo = advertised_ip(&settings(None, Some("lo")), "http://x:1").unwrap();
        assert!(lo.ip.is_loopback());
    }

    #[test]
    fn the_route_to_the_coordinator_picks_the_source_address() {
        let c = advertised_ip(&settings(None, None), "http://127.0.0.1:7070").unwrap();
        assert!(c.ip.is_loopback(), "{c}");
        assert_eq!(
            c.source,
            AddressSource::RouteTo("127.0.0.1:7070".parse().unwrap())
        );
        let e = advertised_ip(&settings(None, None), "http://no-such-host.invalid:1").unwrap_err();
        assert!(e.to_string().contains("cannot resolve"), "{e}");
    }
}
