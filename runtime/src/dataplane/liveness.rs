//! Crash detection by TCP connection: every pair of members holds one idle TCP connection.
//! When a process dies (SIGKILL, OOM, crash) its kernel closes its sockets at once, so the peer
//! reads end-of-file within milliseconds. UCX's own keepalive over shared memory takes seconds
//! to notice a dead peer; this is how a killed rank is named within 1 s (P-3). A stopped
//! (SIGSTOP) or partitioned peer keeps its connections open: that is the collective deadline's
//! job.
//!
//! Nothing is ever sent after the hello, so any readable event is end-of-file, an error, or a
//! protocol violation: all three mean the peer is gone.

use crate::error::RuntimeError;
use crate::ids::{Generation, Rank};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

const HELLO: usize = 12;

/// This rank's listening socket, bound before the address exchange.
pub struct LivenessListener {
    listener: TcpListener,
    pub addr: SocketAddr,
}

impl LivenessListener {
    pub fn bind(ip: &str) -> Result<Self, RuntimeError> {
        let at = format!("{ip}:0");
        let listener = TcpListener::bind(&at).map_err(|e| RuntimeError::Transport {
            op: "liveness listen",
            reason: format!("{at}: {e}"),
        })?;
        let addr = listener.local_addr().map_err(|e| RuntimeError::Transport {
            op: "liveness listen",
            reason: e.to_string(),
        })?;
        Ok(LivenessListener { listener, addr })
    }
}

/// One connection per peer (`None` for this rank).
pub struct Liveness {
    peers: Vec<Option<TcpStream>>,
}

fn fail(op: &'static str, peer: Rank, reason: String) -> RuntimeError {
    RuntimeError::PeerFailed {
        rank: peer,
        op,
        reason,
    }
}

impl Liveness {
    /// Builds the mesh: this rank connects to every higher rank and accepts every lower one.
    pub fn connect(
        l: LivenessListener,
        me: Rank,
        generation: Generation,
        addrs: &[SocketAddr],
        deadline: Instant,
    ) -> Result<Self, RuntimeError> {
        let world = addrs.len();
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let mut hello = [0u8; HELLO];
        hello[..4].copy_from_slice(&me.0.to_le_bytes());
        hello[4..].copy_from_slice(&generation.0.to_le_bytes());
        for (j, addr) in addrs.iter().enumerate().skip(me.0 as usize + 1) {
            let peer = Rank(j as u32);
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let mut s = TcpStream::connect_timeout(addr, left).map_err(|e| {
                fail(
                    "connect",
                    peer,
                    format!("liveness connection to {addr}: {e}"),
                )
            })?;
            s.write_all(&hello)
                .map_err(|e| fail("connect", peer, format!("liveness hello: {e}")))?;
            peers[j] = Some(s);
        }
        l.listener
            .set_nonblocking(true)
            .map_err(|e| fail("connect", me, e.to_string()))?;
        let mut missing = me.0 as usize;
        while missing > 0 {
            if Instant::now() >= deadline {
                let first = (0..me.0 as usize)
                    .find(|i| peers[*i].is_none())
                    .unwrap_or(0);
                return Err(fail(
                    "connect",
                    Rank(first as u32),
                    "never opened its liveness connection".into(),
                ));
            }
            let mut s = match l.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(fail("connect", me, format!("liveness accept: {e}"))),
            };
            let _ = s.set_nonblocking(false);
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let _ = s.set_read_timeout(Some(left));
            let mut h = [0u8; HELLO];
            if s.read_exact(&mut h).is_err() {
                continue; // not one of ours, or gone already: a real peer retries nothing, so
                          // its absence shows as the deadline above
            }
            let r = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let mut g = [0u8; 8];
            g.copy_from_slice(&h[4..]);
            if u64::from_le_bytes(g) != generation.0 || r >= me.0 as usize || peers[r].is_some() {
                continue;
            }
            peers[r] = Some(s);
            missing -= 1;
        }
        for s in peers.iter().flatten() {
            s.set_nonblocking(true)
                .map_err(|e| fail("connect", me, e.to_string()))?;
        }
        Ok(Liveness { peers })
    }

    /// The sockets to wait on, with the rank each belongs to.
    pub fn fds(&self) -> Vec<RawFd> {
        self.peers.iter().flatten().map(|s| s.as_raw_fd()).collect()
    }

    /// The first peer whose connection has closed, with the reason. Never blocks.
    pub fn check(&mut self) -> Option<(Rank, String)> {
        let mut b = [0u8; 16];
        for (r, s) in self.peers.iter_mut().enumerate() {
            let Some(sock) = s else { continue };
            let why = match sock.read(&mut b) {
                Ok(0) => "its process exited (connection closed)".to_string(),
                Ok(n) => format!("sent {n} unexpected bytes on the liveness connection"),
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    continue
                }
                Err(e) => format!("liveness connection failed: {e}"),
            };
            *s = None;
            return Some((Rank(r as u32), why));
        }
        None
    }
}

/// The published address of a rank: the liveness socket address, then UCX's worker address.
pub fn encode_address(live: SocketAddr, ucx: &[u8]) -> Vec<u8> {
    let s = live.to_string();
    let mut v = Vec::with_capacity(2 + s.len() + ucx.len());
    v.extend_from_slice(&(s.len() as u16).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
    v.extend_from_slice(ucx);
    v
}

pub fn decode_address(b: &[u8]) -> Result<(SocketAddr, &[u8]), String> {
    if b.len() < 2 {
        return Err(format!("address of {} bytes", b.len()));
    }
    let n = u16::from_le_bytes([b[0], b[1]]) as usize;
    let s = b
        .get(2..2 + n)
        .ok_or_else(|| format!("address truncated: {} bytes, socket part {n}", b.len()))?;
    let s = std::str::from_utf8(s).map_err(|_| "socket address is not UTF-8".to_string())?;
    let addr = s
        .parse()
        .map_err(|e| format!("socket address {s:?}: {e}"))?;
    Ok((addr, &b[2 + n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_garbage_is_an_error() {
        let a: SocketAddr = "127.0.0.1:4242".parse().unwrap();
        let e = encode_address(a, b"ucx-bytes");
        assert_eq!(decode_address(&e).unwrap(), (a, &b"ucx-bytes"[..]));
        for n in 0..16 {
            assert!(decode_address(&e[..n]).is_err(), "{n}");
        }
        assert!(decode_address(&[3, 0, b'x', b'y', b'z']).is_err());
    }

    /// P-3: a peer whose connection closes (as a killed process's does) is named at once.
    #[test]
    fn closed_peer_is_detected() {
        let ls: Vec<LivenessListener> = (0..3)
            .map(|_| LivenessListener::bind("127.0.0.1").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.addr).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut meshes: Vec<Liveness> = std::thread::scope(|sc| {
            let hs: Vec<_> = ls
                .into_iter()
                .enumerate()
                .map(|(r, l)| {
                    let addrs = addrs.clone();
                    sc.spawn(move || {
                        Liveness::connect(l, Rank(r as u32), Generation(1), &addrs, deadline)
                            .unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(meshes.iter_mut().all(|m| m.check().is_none()));
        assert_eq!(meshes[0].fds().len(), 2);
        drop(meshes.remove(1));
        std::thread::sleep(Duration::from_millis(20));
        for m in &mut meshes {
            let (r, why) = m.check().unwrap();
            assert_eq!(r, Rank(1));
            assert!(why.contains("exited"), "{why}");
        }
    }
}
