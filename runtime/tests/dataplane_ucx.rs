//! The UCX transport with real UCX transfers (shared memory / TCP on loopback, whatever
//! `UCX_TLS` selects), ranks as threads of one process: every collective against a sequential
//! reference, and bad input. Process-level faults are in `dataplane_faults.rs`.

use phalanx_runtime::dataplane::collectives::even_segments;
use phalanx_runtime::dataplane::transport::{
    encode_ctrl, tag, Ctrl, MsgKey, CTRL_LEN, KIND_CTRL, KIND_DATA, SLOT_ABORT,
};
use phalanx_runtime::dataplane::{
    AddressExchange, BootstrapServer, CollConfig, Exchanged, GroupKey, TcpBootstrap, UcxConfig,
    UcxGroup,
};
use phalanx_runtime::{Generation, Rank, RuntimeError};
use std::time::Duration;

fn cfg(chunk: usize) -> UcxConfig {
    UcxConfig {
        coll: CollConfig {
            chunk_bytes: chunk,
            window: 4,
            timeout: Duration::from_secs(5),
            mesh: true,
            ..CollConfig::default()
        },
        connect_timeout: Duration::from_secs(20),
        ..UcxConfig::default()
    }
}

/// Runs `f` on `n` UCX ranks (threads), each with its own UCP context and worker.
fn ucx_ranks<R: Send>(n: u32, g: u64, c: UcxConfig, f: impl Fn(UcxGroup) -> R + Sync) -> Vec<R> {
    let srv = BootstrapServer::bind("127.0.0.1:0").unwrap();
    let at = srv.local_addr().to_string();
    std::thread::scope(|sc| {
        let s = sc.spawn(|| srv.serve(n, Generation(g), Duration::from_secs(20)));
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (at, c, f) = (at.clone(), c.clone(), &f);
                sc.spawn(move || {
                    let boot = Box::new(TcpBootstrap { server: at });
                    let grp = UcxGroup::connect(Rank(r), n, Generation(g), c, boot).unwrap();
                    f(grp)
                })
            })
            .collect();
        let out = hs.into_iter().map(|h| h.join().unwrap()).collect();
        s.join().unwrap().unwrap();
        out
    })
}

fn input(rank: u32, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = ((i as u32).wrapping_mul(2654435761) ^ rank.wrapping_mul(40503)) % 10007;
            (x as f32 - 5000.0) * 10f32.powi((i % 7) as i32 - 3) + rank as f32 * 0.1
        })
        .collect()
}

/// The ring's order of addition: segment k is summed over ranks k+1, ..., k.
fn reference(n: u32, len: usize) -> Vec<u32> {
    reference_in(n, len, &even_segments(len, n as usize))
}

fn reference_in(n: u32, len: usize, segs: &[std::ops::Range<usize>]) -> Vec<u32> {
    let ins: Vec<Vec<f32>> = (0..n).map(|r| input(r, len)).collect();
    let n = n as usize;
    let mut out = vec![0f32; len];
    for (k, seg) in segs.iter().enumerate() {
        for i in seg.clone() {
            let mut acc = ins[(k + 1) % n][i];
            for j in 2..=n {
                acc += ins[(k + j) % n][i];
            }
            out[i] = acc;
        }
    }
    out.iter().map(|x| x.to_bits()).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A plan of unequal segments (cut at len * k^2 / n^2), as a sharded optimizer's may be.
fn skewed(len: usize, n: usize) -> Vec<std::ops::Range<usize>> {
    let cut = |k: usize| len * k * k / (n * n);
    (0..n).map(|k| cut(k)..cut(k + 1)).collect()
}

/// P-2 over UCX: allreduce, reduce-scatter, allgather, broadcast, barrier and striped transfer
/// give the reference result, bitwise, on every rank (odd sizes, several chunks per segment).
#[test]
fn ucx_collectives_match_the_reference() {
    let n = 4;
    let lens = [0usize, 1, 3, 1001, 300_007];
    let got = ucx_ranks(n, 1, cfg(64 * 1024), |g| {
        let r = g.rank().0;
        let mut out = Vec::new();
        for &len in &lens {
            let mut b = input(r, len);
            g.allreduce(&mut b).unwrap();
            out.push(bits(&b));
            for segs in [even_segments(len, n as usize), skewed(len, n as usize)] {
                let mut b = input(r, len);
                g.reduce_scatter(&mut b, &segs).unwrap();
                let seg = segs[r as usize].clone();
                let mut full = vec![f32::NAN; len];
                full[seg.clone()].copy_from_slice(&b[seg]);
                g.allgather(&mut full, &segs).unwrap();
                out.push(bits(&full));
            }
        }
        // P-12: integers, whose partial sums wrap while the total fits (ranks 0 and 2 add
        // 2^62 each, ranks 1 and 3 take 2^62 + i each away).
        let big = 1i64 << 62;
        let mut ints: Vec<i64> = (0..100_003i64)
            .map(|i| if r % 2 == 0 { big } else { -big - i })
            .collect();
        g.allreduce(&mut ints).unwrap();
        let ints_ok = ints.iter().enumerate().all(|(i, &v)| v == -2 * i as i64);
        g.barrier().unwrap();
        let mut bc: Vec<u8> = if r == 2 {
            (0..777_777).map(|i| (i % 253) as u8).collect()
        } else {
            vec![0; 777_777]
        };
        g.broadcast(&mut bc, Rank(2)).unwrap();
        let bc_ok = bc.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8);
        // Again from another root, into a dirty buffer (the window's slots are reused).
        let mut bc: Vec<u8> = if r == 0 {
            (0..777_777).map(|i| (i % 253) as u8).collect()
        } else {
            vec![0x5A; 777_777]
        };
        g.broadcast(&mut bc, Rank(0)).unwrap();
        let bc_ok = bc_ok && bc.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8);
        let state: Vec<u8> = (0..1_000_003).map(|i| (i % 241) as u8).collect();
        let senders = [Rank(1), Rank(2), Rank(3)];
        let striped = if r == 0 {
            let mut b = vec![0u8; state.len()];
            g.recv_striped(&senders, &mut b).unwrap();
            b == state
        } else {
            g.send_striped(Rank(0), &senders, &mut state.clone())
                .unwrap();
            true
        };
        // A rank that drops its group closes its liveness connections, which its peers read
        // as "exited": leave together, after a barrier, so that no peer is still receiving.
        g.barrier().unwrap();
        let st = g.stats().unwrap();
        let paths = (st.window_broadcasts, st.mesh_collectives);
        (out, bc_ok && ints_ok, striped, st.dropped_stale, paths)
    });
    // Shared memory (UCX's default between local ranks) carries broadcasts through the root's
    // window and the reductions and gathers through every rank's (P-11, 5 lengths x 5 calls,
    // and the integer sum);
    // TCP cannot map them, and the chain and the ring take over.
    let want_windows = match std::env::var("UCX_TLS").as_deref() {
        Err(_) => Some((2, 26)),
        Ok("tcp,self") | Ok("tcp") => Some((0, 0)),
        Ok(_) => None,
    };
    for (r, (out, bc_ok, striped, dropped, windows)) in got.into_iter().enumerate() {
        for (i, &len) in lens.iter().enumerate() {
            let want = reference(n, len);
            assert_eq!(out[3 * i], want, "allreduce len={len} rank={r}");
            assert_eq!(
                out[3 * i + 1],
                want,
                "reduce_scatter+allgather len={len} rank={r}"
            );
            let uneven = reference_in(n, len, &skewed(len, n as usize));
            assert_eq!(out[3 * i + 2], uneven, "uneven segments len={len} rank={r}");
        }
        assert!(bc_ok, "broadcast and integer sum rank={r}");
        if let Some(w) = want_windows {
            assert_eq!(
                windows, w,
                "(broadcasts, reductions) through windows, rank={r}"
            );
        }
        assert!(striped, "striped transfer");
        assert_eq!(dropped, 0);
    }
}

/// P-1 over UCX: a message tagged with another generation is dropped and counted, and the
/// collective that follows is still exact.
#[test]
fn ucx_drops_stale_generation_messages() {
    let got = ucx_ranks(2, 9, cfg(1 << 20), |g| {
        let r = g.rank().0;
        if r == 1 {
            // Looks like the first message of the next allreduce, but from generation 8.
            let stale = tag(
                KIND_DATA,
                Generation(8),
                Rank(1),
                MsgKey { seq: 1, slot: 0 },
            );
            g.send_raw(Rank(0), stale, vec![0xAB; 64]).unwrap();
            // Also a message with an invalid kind.
            g.send_raw(
                Rank(0),
                tag(
                    KIND_DATA,
                    Generation(9),
                    Rank(1),
                    MsgKey { seq: 1, slot: 0 },
                ) | (1 << 63),
                vec![1; 8],
            )
            .unwrap();
        }
        g.barrier().unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let mut b = input(r, 16);
        g.allreduce(&mut b).unwrap();
        (bits(&b), g.stats().unwrap().dropped_stale)
    });
    assert_eq!(got[0].0, reference(2, 16));
    assert_eq!(got[1].0, reference(2, 16));
    assert_eq!(got[0].1, 2, "rank 0 dropped both stray messages");
}

/// Bad input over UCX: different buffer lengths on different ranks are errors on every rank;
/// nothing panics or hangs.
#[test]
fn ucx_bad_input_is_an_error_not_a_hang() {
    let got = ucx_ranks(3, 1, cfg(1 << 20), |g| {
        let len = if g.rank().0 == 1 { 1000 } else { 1004 };
        let t0 = std::time::Instant::now();
        let e = g.allreduce(&mut vec![1.0f32; len]).unwrap_err();
        (e, t0.elapsed())
    });
    for (e, took) in &got {
        assert!(took < &Duration::from_secs(3), "{took:?}");
        assert!(
            matches!(
                e,
                RuntimeError::MessageLength { .. }
                    | RuntimeError::MalformedMessage { .. }
                    | RuntimeError::PeerFailed { .. }
            ),
            "{e}"
        );
    }
    assert!(got.iter().any(|(e, _)| matches!(
        e,
        RuntimeError::MessageLength { .. } | RuntimeError::MalformedMessage { .. }
    )));
}

/// P-10: rank 2 never calls the allreduce (a hung peer). Ranks 0 and 1 wait; 300 ms in, the
/// mark says generation 6 replaced generation 5 after a failure, and they give up at once,
/// long before their 5 s deadline: with `Abandoned`, or, if the other one's abort arrives
/// first, `GroupBroken`. The same mark at 5 (their own generation) gives nothing up: the 3
/// ranks first finish an allreduce together.
#[test]
fn a_replaced_generation_is_given_up_at_once() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let mark = Arc::new(AtomicU64::new(5));
    let c = UcxConfig {
        abandoned_below: Some(mark.clone()),
        ..cfg(1 << 20)
    };
    let got = ucx_ranks(3, 5, c, |g| {
        let mut ok = vec![1.0f32; 1000];
        g.allreduce(&mut ok).unwrap();
        assert_eq!(ok[0], 3.0);
        if g.rank().0 == 2 {
            std::thread::sleep(Duration::from_millis(1500));
            return None;
        }
        if g.rank().0 == 0 {
            let m = mark.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                m.store(6, Ordering::SeqCst);
            });
        }
        let t0 = std::time::Instant::now();
        let e = g.allreduce(&mut vec![1.0f32; 1000]).unwrap_err();
        Some((e, t0.elapsed()))
    });
    for (e, took) in got.iter().flatten() {
        assert!(
            matches!(
                e,
                RuntimeError::Abandoned { .. } | RuntimeError::GroupBroken { .. }
            ),
            "{e}"
        );
        assert!(
            *took >= Duration::from_millis(250) && *took < Duration::from_millis(1500),
            "{took:?}"
        );
    }
    assert_eq!(got.iter().flatten().count(), 2);
    assert!(got
        .iter()
        .flatten()
        .any(|(e, _)| matches!(e, RuntimeError::Abandoned { .. })));
}

/// P-9: an abort that is not signed with the generation's key (a stranger's, or garbage) is
/// dropped unread: the group goes on, and counts it.
#[test]
fn an_unsigned_abort_is_dropped_not_obeyed() {
    let got = ucx_ranks(2, 4, cfg(1 << 20), |g| {
        if g.rank().0 == 1 {
            let abort = tag(
                KIND_CTRL,
                Generation(4),
                Rank(1),
                MsgKey {
                    seq: 0,
                    slot: SLOT_ABORT,
                },
            );
            let forged = encode_ctrl(
                &Ctrl::Abort {
                    reporter: Rank(1),
                    subject: Some(Rank(0)),
                    generation: Generation(4),
                    timeout: false,
                },
                &GroupKey::random().unwrap(),
            );
            g.send_raw(Rank(0), abort, forged).unwrap();
            g.send_raw(Rank(0), abort, vec![0xAB; CTRL_LEN]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut b = input(g.rank().0, 64);
        g.allreduce(&mut b).unwrap();
        (bits(&b), g.stats().unwrap().forged)
    });
    assert_eq!(got[0].0, reference(2, 64));
    assert_eq!(got[1].0, reference(2, 64));
    assert_eq!(got[0].1, 2, "rank 0 dropped both unsigned aborts");
}

/// An exchange that hands this rank another key than its peers get: a rank that is not a
/// member of the generation as far as they can tell.
struct WrongKey(TcpBootstrap);

impl AddressExchange for WrongKey {
    fn exchange(
        &mut self,
        rank: Rank,
        world: u32,
        generation: Generation,
        local: &[u8],
        timeout: Duration,
    ) -> Result<Exchanged, RuntimeError> {
        let mut x = self.0.exchange(rank, world, generation, local, timeout)?;
        x.key = GroupKey::random()?;
        Ok(x)
    }
}

/// P-9: a rank without the generation's key cannot join the group: its liveness hello is
/// refused and its handshake fails, and the group is not built on any rank.
#[test]
fn a_rank_without_the_key_cannot_join() {
    let srv = BootstrapServer::bind("127.0.0.1:0").unwrap();
    let at = srv.local_addr().to_string();
    let c = UcxConfig {
        connect_timeout: Duration::from_secs(3),
        ..cfg(1 << 20)
    };
    let errs: Vec<RuntimeError> = std::thread::scope(|sc| {
        let s = sc.spawn(|| srv.serve(2, Generation(1), Duration::from_secs(10)));
        let hs: Vec<_> = (0..2u32)
            .map(|r| {
                let (at, c) = (at.clone(), c.clone());
                sc.spawn(move || {
                    let tcp = TcpBootstrap { server: at };
                    let boot: Box<dyn AddressExchange> = if r == 0 {
                        Box::new(WrongKey(tcp))
                    } else {
                        Box::new(tcp)
                    };
                    UcxGroup::connect(Rank(r), 2, Generation(1), c, boot)
                        .err()
                        .expect("a group with a stranger in it")
                })
            })
            .collect();
        let out = hs.into_iter().map(|h| h.join().unwrap()).collect();
        s.join().unwrap().unwrap();
        out
    });
    let rank1 = errs[1].to_string();
    assert!(rank1.contains("liveness"), "{rank1}");
    assert!(rank1.contains("closed"), "{rank1}");
}

#[test]
fn unreachable_bootstrap_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = UcxConfig {
        connect_timeout: Duration::from_millis(500),
        ..UcxConfig::default()
    };
    let boot = Box::new(TcpBootstrap {
        server: format!("127.0.0.1:{port}"),
    });
    let e = UcxGroup::connect(Rank(0), 2, Generation(1), c, boot)
        .err()
        .unwrap();
    assert!(matches!(e, RuntimeError::Bootstrap { .. }), "{e}");
}
