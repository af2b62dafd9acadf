//! Address exchange before a UCX group is built: every member publishes its worker address and
//! learns everyone else's.
//!
//! [`AddressExchange`] is the seam: in a job the coordinator's Rendezvous does it (it knows the
//! members of a generation and checks each one's secret). Benchmarks and tests without a
//! coordinator use a [`BootstrapServer`] (run by the bench, a test, or rank 0 on a thread): it
//! gathers one framed message per rank over TCP and answers everyone with the full table and a
//! fresh group key. It checks nobody: use it on trusted machines only.
//!
//! Frames, little endian:
//! - request: magic `PXB1`, generation u64, rank u32, world u32, length u32, address bytes.
//! - reply: magic `PXB1`, status u32 (0 = ok), then either the 32-byte group key and `world` x
//!   (length u32, bytes), or (length u32, UTF-8 reason).

use super::admission::{GroupKey, KEY_LEN};
use crate::error::RuntimeError;
use crate::ids::{Generation, Rank};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x3142_5850; // "PXB1"
/// A UCX worker address is a few hundred bytes; anything far larger is not one.
const MAX_ADDR: usize = 64 * 1024;

/// Publishes `local` for `rank` of `world` in `generation` and returns every member's address
/// in rank order, with the generation's key. Blocks at most `timeout`.
pub trait AddressExchange: Send {
    fn exchange(
        &mut self,
        rank: Rank,
        world: u32,
        generation: Generation,
        local: &[u8],
        timeout: Duration,
    ) -> Result<Exchanged, RuntimeError>;
}

/// What an exchange hands every member: the addresses by rank, and the generation's key that
/// signs what the members say to each other (P-9).
#[derive(Debug, Clone)]
pub struct Exchanged {
    pub addresses: Vec<Vec<u8>>,
    pub key: GroupKey,
}

/// The client side: the server's address.
#[derive(Debug, Clone)]
pub struct TcpBootstrap {
    pub server: String,
}

fn err(addr: &str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Bootstrap {
        addr: addr.to_string(),
        reason: reason.into(),
    }
}

fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_blob(s: &mut impl Read, what: &str) -> Result<Vec<u8>, String> {
    let n = read_u32(s).map_err(|e| format!("reading the length of {what}: {e}"))? as usize;
    if n > MAX_ADDR {
        return Err(format!("{what} claims {n} bytes (at most {MAX_ADDR})"));
    }
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)
        .map_err(|e| format!("reading {what} ({n} bytes): {e}"))?;
    Ok(v)
}

impl AddressExchange for TcpBootstrap {
    fn exchange(
        &mut self,
        rank: Rank,
        world: u32,
        generation: Generation,
        local: &[u8],
        timeout: Duration,
    ) -> Result<Exchanged, RuntimeError> {
        let addr = self.server.as_str();
        if local.len() > MAX_ADDR {
            return Err(err(
                addr,
                format!("local address of {} bytes is too long", local.len()),
            ));
        }
        let target: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| err(addr, format!("not a socket address: {e}")))?
            .next()
            .ok_or_else(|| err(addr, "resolves to no address"))?;
        let deadline = Instant::now() + timeout;
        // The server may start after the ranks: retry refused connections until the deadline.
        let mut s = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(err(
                    addr,
                    format!("no bootstrap server answered within {timeout:?}"),
                ));
            }
            match TcpStream::connect_timeout(&target, left) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(20).min(left)),
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let io = |e: std::io::Error| err(addr, format!("talking to the server: {e}"));
        s.set_read_timeout(Some(left)).map_err(io)?;
        s.set_write_timeout(Some(left)).map_err(io)?;
        let mut req = Vec::with_capacity(24 + local.len());
        req.extend_from_slice(&MAGIC.to_le_bytes());
        req.extend_from_slice(&generation.0.to_le_bytes());
        req.extend_from_slice(&rank.0.to_le_bytes());
        req.extend_from_slice(&world.to_le_bytes());
        req.extend_from_slice(&(local.len() as u32).to_le_bytes());
        req.extend_from_slice(local);
        s.write_all(&req).map_err(io)?;
        let magic =
            read_u32(&mut s).map_err(|e| err(addr, format!("waiting for the table: {e}")))?;
        if magic != MAGIC {
            return Err(err(
                addr,
                format!("bad reply magic {magic:#010x}: not a phalanx bootstrap server"),
            ));
        }
        let status = read_u32(&mut s).map_err(io)?;
        if status != 0 {
            let why = read_blob(&mut s, "the error").map_err(|e| err(addr, e))?;
            return Err(err(
                addr,
                format!("server refused: {}", String::from_utf8_lossy(&why)),
            ));
        }
        let mut key = [0u8; KEY_LEN];
        s.read_exact(&mut key)
            .map_err(|e| err(addr, format!("reading the group key: {e}")))?;
        let addresses = (0..world)
            .map(|r| read_blob(&mut s, &format!("rank {r}'s address")).map_err(|e| err(addr, e)))
            .collect::<Result<_, _>>()?;
        Ok(Exchanged {
            addresses,
            key: GroupKey::from_bytes(&key)?,
        })
    }
}

/// Gathers the addresses of one generation's members and answers every one of them.
pub struct BootstrapServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl BootstrapServer {
    /// Binds `addr` (e.g. `127.0.0.1:0` for any free port).
    pub fn bind(addr: &str) -> Result<Self, RuntimeError> {
        let listener =
            TcpListener::bind(addr).map_err(|e| err(addr, format!("cannot listen: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| err(&addr_str(&listener), e.to_string()))?;
        Ok(BootstrapServer { listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves one exchange: waits for `world` ranks of `generation` (each rank once), then
    /// sends everyone the table. A connection that sends garbage is answered with an error and
    /// does not count; the whole exchange fails after `timeout`.
    pub fn serve(
        &self,
        world: u32,
        generation: Generation,
        timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let a = self.addr.to_string();
        let deadline = Instant::now() + timeout;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| err(&a, e.to_string()))?;
        let mut slots: Vec<Option<(TcpStream, Vec<u8>)>> = (0..world).map(|_| None).collect();
        let mut have = 0;
        while have < world {
            if Instant::now() >= deadline {
                let missing: Vec<u32> = (0..world)
                    .filter(|r| slots[*r as usize].is_none())
                    .collect();
                return Err(err(
                    &a,
                    format!("ranks {missing:?} did not register within {timeout:?}"),
                ));
            }
            let mut s = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(err(&a, format!("accept: {e}"))),
            };
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(left.min(Duration::from_secs(5))));
            match read_request(&mut s, world, generation) {
                Ok((rank, bytes)) if slots[rank as usize].is_none() => {
                    slots[rank as usize] = Some((s, bytes));
                    have += 1;
                }
                Ok((rank, _)) => refuse(&mut s, &format!("rank {rank} registered twice")),
                Err(why) => refuse(&mut s, &why),
            }
        }
        let key = GroupKey::random()?;
        let mut table = Vec::new();
        table.extend_from_slice(&MAGIC.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        table.extend_from_slice(key.as_bytes());
        for (_, bytes) in slots.iter().flatten() {
            table.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            table.extend_from_slice(bytes);
        }
        for (s, _) in slots.iter_mut().flatten() {
            // A rank that went away after registering finds out from its own peers.
            let _ = s.write_all(&table);
        }
        Ok(())
    }
}

fn addr_str(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

fn read_request(
    s: &mut TcpStream,
    world: u32,
    generation: Generation,
) -> Result<(u32, Vec<u8>), String> {
    let magic = read_u32(s).map_err(|e| format!("reading the request: {e}"))?;
    if magic != MAGIC {
        return Err(format!("bad magic {magic:#010x}"));
    }
    let mut g = [0u8; 8];
    s.read_exact(&mut g)
        .map_err(|e| format!("truncated request: {e}"))?;
    let g = Generation(u64::from_le_bytes(g));
    let rank = read_u32(s).map_err(|e| format!("truncated request: {e}"))?;
    let w = read_u32(s).map_err(|e| format!("truncated request: {e}"))?;
    let bytes = read_blob(s, "the address")?;
    if g != generation {
        return Err(format!(
            "generation {g} registered with the server of generation {generation}"
        ));
    }
    if w != world || rank >= world {
        return Err(format!(
            "rank {rank} of world {w} registered with a server for world {world}"
        ));
    }
    Ok((rank, bytes))
}

fn refuse(s: &mut TcpStream, why: &str) {
    let mut b = Vec::new();
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&(why.len() as u32).to_le_bytes());
    b.extend_from_slice(why.as_bytes());
    let _ = s.write_all(&b);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(
        server: SocketAddr,
        rank: u32,
        world: u32,
        g: u64,
    ) -> Result<Exchanged, RuntimeError> {
        TcpBootstrap {
            server: server.to_string(),
        }
        .exchange(
            Rank(rank),
            world,
            Generation(g),
            format!("addr-{rank}").as_bytes(),
            Duration::from_secs(5),
        )
    }

    #[test]
    fn every_rank_gets_the_full_table() {
        let srv = BootstrapServer::bind("127.0.0.1:0").unwrap();
        let at = srv.local_addr();
        std::thread::scope(|sc| {
            let s = sc.spawn(|| srv.serve(3, Generation(7), Duration::from_secs(5)));
            let hs: Vec<_> = (0..3)
                .map(|r| sc.spawn(move || client(at, r, 3, 7)))
                .collect();
            let mut keys = Vec::new();
            for h in hs {
                let t = h.join().unwrap().unwrap();
                assert_eq!(
                    t.addresses,
                    vec![b"addr-0".to_vec(), b"addr-1".to_vec(), b"addr-2".to_vec()]
                );
                keys.push(t.key);
            }
            // One key for the generation, the same on every rank, and not a fixed one.
            assert!(keys.iter().all(|k| *k == keys[0]));
            assert_ne!(keys[0], GroupKey::in_process());
            s.join().unwrap().unwrap();
        });
    }

    #[test]
    fn wrong_generation_or_rank_is_refused_with_a_reason() {
        let srv = BootstrapServer::bind("127.0.0.1:0").unwrap();
        let at = srv.local_addr();
        std::thread::scope(|sc| {
            let s = sc.spawn(|| srv.serve(1, Generation(2), Duration::from_millis(800)));
            let e = client(at, 0, 1, 1).unwrap_err().to_string();
            assert!(e.contains("generation 1"), "{e}");
            let e = client(at, 5, 1, 2).unwrap_err().to_string();
            assert!(e.contains("rank 5"), "{e}");
            // Garbage and a truncated request: refused, the server keeps serving.
            let mut raw = TcpStream::connect(at).unwrap();
            raw.write_all(b"GARBAGE!").unwrap();
            let mut raw = TcpStream::connect(at).unwrap();
            raw.write_all(&MAGIC.to_le_bytes()).unwrap();
            drop(raw);
            let e = s.join().unwrap().unwrap_err().to_string();
            assert!(e.contains("did not register"), "{e}");
        });
    }

    #[test]
    fn unreachable_server_is_a_clear_error() {
        // Bind and drop to get a port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t0 = Instant::now();
        let e = TcpBootstrap {
            server: format!("127.0.0.1:{port}"),
        }
        .exchange(Rank(0), 2, Generation(1), b"x", Duration::from_millis(300))
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(
            e.to_string().contains("no bootstrap server answered"),
            "{e}"
        );
        let e = TcpBootstrap {
            server: "not an address".into(),
        }
        .exchange(Rank(0), 2, Generation(1), b"x", Duration::from_millis(300))
        .unwrap_err();
        assert!(matches!(e, RuntimeError::Bootstrap { .. }), "{e}");
    }
}
