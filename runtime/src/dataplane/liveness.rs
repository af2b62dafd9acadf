//! Crash detection by TCP connection: every pair of members holds one idle TCP connection.
//! When a process dies (SIGKILL, OOM, crash) its kernel closes its sockets at once, so the peer
//! reads end-of-file within milliseconds. UCX's own keepalive over shared memory takes seconds
//! to notice a dead peer; this is how a killed rank is named within 1 s (P-3). A stopped
//! (SIGSTOP) or partitioned peer keeps its connections open: that is the collective deadline's
//! job.
//!
//! Nothing is ever sent after the hello, so any readable event is end-of-file, an error, or a
//! protocol violation: all three mean the peer is gone.

use super::admission::{GroupKey, Purpose, MAC_LEN};
use crate::error::RuntimeError;
use crate::ids::{Generation, Rank};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// The hello: rank u32, generation u64 (little endian), then their MAC under the generation's
/// key, so that only a member can take a rank's place in the mesh (P-9).
const HELLO_BODY: usize = 12;
const HELLO: usize = HELLO_BODY + MAC_LEN;
/// A connection must say hello within this long: a silent one (a port scan, a stray client)
/// is closed without holding up the real peers.
const HELLO_TIMEOUT: Duration = Duration::from_millis(1000);
/// Connections waiting for their hello at once; beyond this, new ones are closed at once.
const MAX_PENDING: usize = 256;

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

fn hello(me: Rank, generation: Generation, key: &GroupKey) -> [u8; HELLO] {
    let mut h = [0u8; HELLO];
    h[..4].copy_from_slice(&me.0.to_le_bytes());
    h[4..HELLO_BODY].copy_from_slice(&generation.0.to_le_bytes());
    let mac = key.mac(Purpose::Liveness, &h[..HELLO_BODY]);
    h[HELLO_BODY..].copy_from_slice(&mac);
    h
}

/// The rank a hello speaks for, if it is signed with `key` for `generation`.
fn hello_rank(h: &[u8; HELLO], generation: Generation, key: &GroupKey) -> Option<Rank> {
    if !key.verify(Purpose::Liveness, &h[..HELLO_BODY], &h[HELLO_BODY..]) {
        return None;
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&h[4..HELLO_BODY]);
    (u64::from_le_bytes(g) == generation.0)
        .then(|| Rank(u32::from_le_bytes([h[0], h[1], h[2], h[3]])))
}

/// An accepted connection that has not said hello yet.
struct Pending {
    s: TcpStream,
    got: Vec<u8>,
    until: Instant,
}

enum Heard {
    Waiting,
    Hello([u8; HELLO]),
    Gone,
}

impl Pending {
    /// Reads what has arrived, never blocking.
    fn poll(&mut self, now: Instant) -> Heard {
        let mut b = [0u8; HELLO];
        loop {
            match self.s.read(&mut b[..HELLO - self.got.len()]) {
                Ok(0) => return Heard::Gone,
                Ok(n) => {
                    self.got.extend_from_slice(&b[..n]);
                    if self.got.len() == HELLO {
                        let mut h = [0u8; HELLO];
                        h.copy_from_slice(&self.got);
                        return Heard::Hello(h);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return if now >= self.until {
                        Heard::Gone
                    } else {
                        Heard::Waiting
                    };
                }
                Err(_) => return Heard::Gone,
            }
        }
    }
}

/// The lower ranks' connections being accepted: every connection is served at once, each with
/// its own short timeout, so no one connection can hold up the others.
struct Accepting<'a> {
    listener: &'a TcpListener,
    me: Rank,
    generation: Generation,
    key: &'a GroupKey,
    pending: Vec<Pending>,
    /// Connections closed for a hello that was not a member's (for the error message).
    refused: usize,
}

impl Accepting<'_> {
    /// Takes every waiting connection and every complete hello; true if anything happened.
    fn step(
        &mut self,
        peers: &mut [Option<TcpStream>],
        deadline: Instant,
    ) -> Result<bool, RuntimeError> {
        let mut busy = false;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    busy = true;
                    if self.pending.len() >= MAX_PENDING || s.set_nonblocking(true).is_err() {
                        self.refused += 1;
                        continue;
                    }
                    let until = (Instant::now() + HELLO_TIMEOUT).min(deadline);
                    self.pending.push(Pending {
                        s,
                        got: Vec::new(),
                        until,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(fail("connect", self.me, format!("liveness accept: {e}"))),
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            match self.pending[i].poll(now) {
                Heard::Waiting => i += 1,
                Heard::Gone => {
                    busy = true;
                    self.pending.swap_remove(i);
                }
                Heard::Hello(h) => {
                    busy = true;
                    let p = self.pending.swap_remove(i);
                    match hello_rank(&h, self.generation, self.key) {
                        Some(r) if r.0 < self.me.0 && peers[r.0 as usize].is_none() => {
                            peers[r.0 as usize] = Some(p.s);
                        }
                        _ => self.refused += 1,
                    }
                }
            }
        }
        Ok(busy)
    }
}

impl Liveness {
    /// Builds the mesh: this rank connects to every higher rank and accepts every lower one.
    /// Every hello carries the generation's key (P-9).
    pub fn connect(
        l: LivenessListener,
        me: Rank,
        generation: Generation,
        key: &GroupKey,
        addrs: &[SocketAddr],
        deadline: Instant,
    ) -> Result<Self, RuntimeError> {
        let world = addrs.len();
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let hello = hello(me, generation, key);
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
        let mut acc = Accepting {
            listener: &l.listener,
            me,
            generation,
            key,
            pending: Vec::new(),
            refused: 0,
        };
        while peers[..me.0 as usize].iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                let first = (0..me.0 as usize)
                    .find(|i| peers[*i].is_none())
                    .unwrap_or(0);
                let refused = match acc.refused {
                    0 => String::new(),
                    n => format!(
                        " ({n} other connections were closed: no hello signed with this \
                         generation's key in time)"
                    ),
                };
                return Err(fail(
                    "connect",
                    Rank(first as u32),
                    format!("never opened its liveness connection{refused}"),
                ));
            }
            if !acc.step(&mut peers, deadline)? {
                std::thread::sleep(Duration::from_millis(2));
            }
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
                        let key = GroupKey::in_process();
                        Liveness::connect(l, Rank(r as u32), Generation(1), &key, &addrs, deadline)
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

    /// P-9: before the real rank 0 connects, a silent connection, a stranger claiming rank 0
    /// without the key, and a hello of another generation arrive: the mesh still forms with the
    /// real rank 0 in well under the silent connection's timeout.
    #[test]
    fn strangers_and_silent_connections_do_not_take_or_hold_a_slot() {
        let key = GroupKey::random().unwrap();
        let l1 = LivenessListener::bind("127.0.0.1").unwrap();
        let l0 = LivenessListener::bind("127.0.0.1").unwrap();
        let addrs = vec![l0.addr, l1.addr];
        let _silent = TcpStream::connect(l1.addr).unwrap();
        let mut stranger = TcpStream::connect(l1.addr).unwrap();
        let wrong = GroupKey::random().unwrap();
        stranger
            .write_all(&hello(Rank(0), Generation(1), &wrong))
            .unwrap();
        let mut stale = TcpStream::connect(l1.addr).unwrap();
        stale
            .write_all(&hello(Rank(0), Generation(0), &key))
            .unwrap();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let (m1, m0) = std::thread::scope(|sc| {
            let a =
                sc.spawn(|| Liveness::connect(l1, Rank(1), Generation(1), &key, &addrs, deadline));
            std::thread::sleep(Duration::from_millis(50));
            let b =
                sc.spawn(|| Liveness::connect(l0, Rank(0), Generation(1), &key, &addrs, deadline));
            (a.join().unwrap(), b.join().unwrap())
        });
        let (mut m1, _m0) = (m1.unwrap(), m0.unwrap());
        assert!(start.elapsed() < HELLO_TIMEOUT, "{:?}", start.elapsed());
        // The stranger's connection is not the one watched: closing it is no failure of rank 0.
        drop(stranger);
        drop(stale);
        std::thread::sleep(Duration::from_millis(20));
        assert!(m1.check().is_none());
    }

    /// P-9: a rank whose only lower peer is a stranger (no key) fails at the deadline and says
    /// what it closed.
    #[test]
    fn a_hello_without_the_key_is_refused() {
        let key = GroupKey::random().unwrap();
        let l1 = LivenessListener::bind("127.0.0.1").unwrap();
        let l0 = LivenessListener::bind("127.0.0.1").unwrap();
        let addrs = vec![l0.addr, l1.addr];
        let mut stranger = TcpStream::connect(l1.addr).unwrap();
        let wrong = GroupKey::random().unwrap();
        stranger
            .write_all(&hello(Rank(0), Generation(1), &wrong))
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(300);
        let e = Liveness::connect(l1, Rank(1), Generation(1), &key, &addrs, deadline)
            .err()
            .unwrap();
        let why = e.to_string();
        assert!(why.contains("1 other connections were closed"), "{why}");
    }
}
