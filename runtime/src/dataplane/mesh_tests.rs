//! The mesh path (P-11) against the ring's reference, its fallback, and its failures.

use crate::dataplane::collectives::tests::{input, reference, reference_in};
use crate::dataplane::collectives::{CollConfig, Collectives};
use crate::dataplane::inproc::{InProcNet, InProcTransport};
use crate::error::RuntimeError;
use crate::ids::{Generation, Rank};
use std::ops::Range;
use std::time::Duration;

/// Windows of 8 KiB: rounds of 1024 elements, so a few thousand elements take several rounds
/// and both halves of the window are reused.
fn cfg() -> CollConfig {
    CollConfig {
        chunk_bytes: 4096,
        window: 3,
        timeout: Duration::from_secs(5),
        bcast_slots: 2,
        mesh: true,
        mesh_round_bytes: 4096,
    }
}

fn ranks_on<R: Send>(
    n: u32,
    setup: impl Fn(&InProcNet),
    f: impl Fn(&mut Collectives<InProcTransport>) -> R + Sync,
) -> Vec<R> {
    let net = InProcNet::new(n);
    setup(&net);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let ep = net.endpoint(Rank(r), Generation(1));
                let f = &f;
                sc.spawn(move || f(&mut Collectives::new(ep, cfg())))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

// P-11, P-2: through the windows every rank gets bitwise the ring's reference, over several
// rounds (both window halves reused) and lengths that end mid-round, with the mesh taken.
#[test]
fn mesh_allreduce_is_bitwise_the_ring() {
    for n in 2..=5u32 {
        for len in [0usize, 1, 1023, 1024, 5000] {
            let want = bits(&reference(n, len));
            let got = ranks_on(
                n,
                |_| {},
                |c| {
                    let mut out = Vec::new();
                    for _ in 0..3 {
                        let mut b = input(c.rank().0, len);
                        c.allreduce(&mut b).unwrap();
                        out.push(bits(&b));
                    }
                    (out, c.mesh(), c.mesh_collectives())
                },
            );
            for (r, (out, mesh, ops)) in got.iter().enumerate() {
                assert_eq!(*mesh, Some(true), "n={n} len={len} rank={r}");
                assert_eq!(*ops, 3);
                for o in out {
                    assert_eq!(o, &want, "n={n} len={len} rank={r}");
                }
            }
        }
    }
}

// P-11: reduce-scatter and allgather on a sharded optimizer's uneven plan (some segments
// empty), mixed with broadcasts through the same windows.
#[test]
fn mesh_reduce_scatter_and_allgather_follow_an_uneven_plan() {
    for n in 2..=5u32 {
        let len = 4100usize;
        let nu = n as usize;
        let cut = |k: usize| len * k * k / (nu * nu);
        let segs: Vec<Range<usize>> = (0..nu).map(|k| cut(k)..cut(k + 1)).collect();
        let want = reference_in(n, len, &segs);
        let got = ranks_on(
            n,
            |_| {},
            |c| {
                let me = c.rank().0 as usize;
                let mut b = input(c.rank().0, len);
                c.reduce_scatter(&mut b, &segs).unwrap();
                let mine = bits(&b[segs[me].clone()]);
                let mut bytes = vec![c.rank().0 as u8; 9000];
                c.broadcast(&mut bytes, Rank(0)).unwrap();
                let mut g = vec![f32::NAN; len];
                g[segs[me].clone()].copy_from_slice(&b[segs[me].clone()]);
                c.allgather(&mut g, &segs).unwrap();
                (mine, bits(&g), bytes, c.mesh())
            },
        );
        for (r, (mine, g, bytes, mesh)) in got.into_iter().enumerate() {
            assert_eq!(mesh, Some(true));
            assert_eq!(mine, bits(&want[segs[r].clone()]), "n={n} rank={r}");
            assert_eq!(g, bits(&want), "n={n} rank={r}");
            assert!(bytes.iter().all(|&x| x == 0), "n={n} rank={r}");
        }
    }
}

// P-11: one rank that cannot map the others' windows (another node) sends the whole group to
// the ring, with the same bits.
#[test]
fn one_rank_without_windows_sends_the_group_to_the_ring() {
    let (n, len) = (4u32, 3000);
    let want = bits(&reference(n, len));
    let got = ranks_on(
        n,
        |net| net.windowless(Rank(2)),
        |c| {
            let mut b = input(c.rank().0, len);
            c.allreduce(&mut b).unwrap();
            (bits(&b), c.mesh(), c.mesh_collectives())
        },
    );
    for (r, (b, mesh, ops)) in got.into_iter().enumerate() {
        assert_eq!(b, want, "rank={r}");
        assert_eq!((mesh, ops), (Some(false), 0), "rank={r}");
    }
}

// P-3, P-11: a rank that dies between mesh allreduces fails every survivor naming it.
#[test]
fn a_dead_peer_fails_every_survivor_of_a_mesh_allreduce() {
    let net = InProcNet::new(4);
    let all = std::sync::Barrier::new(4);
    let got: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4u32)
            .map(|r| {
                let ep = net.endpoint(Rank(r), Generation(3));
                let (net, all) = (net.clone(), &all);
                sc.spawn(move || {
                    let mut c = Collectives::new(ep, cfg());
                    let mut b = vec![1.0f32; 5000];
                    c.allreduce(&mut b).unwrap();
                    assert_eq!(c.mesh(), Some(true));
                    all.wait();
                    if r == 1 {
                        net.kill(Rank(1));
                        return None;
                    }
                    Some(c.allreduce(&mut b).unwrap_err())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in got.into_iter().flatten() {
        assert!(
            matches!(e, RuntimeError::PeerFailed { rank: Rank(1), .. }),
            "{e}"
        );
    }
}

// P-5, P-11: different lengths on different ranks are an error on the mesh too, not a read
// past a buffer or a hang.
#[test]
fn different_lengths_are_an_error_not_a_hang() {
    let got = ranks_on(
        3,
        |_| {},
        |c| {
            let mut b = vec![1.0f32; 5000];
            c.allreduce(&mut b).unwrap();
            let len = if c.rank().0 == 2 { 4000 } else { 5000 };
            c.allreduce(&mut vec![1.0f32; len]).unwrap_err()
        },
    );
    assert!(
        got.iter()
            .any(|e| matches!(e, RuntimeError::MessageLength { .. })),
        "{got:?}"
    );
    for e in &got {
        assert!(
            matches!(
                e,
                RuntimeError::MessageLength { .. } | RuntimeError::PeerFailed { .. }
            ),
            "{e}"
        );
    }
}

/// Rank `r`'s integers: large enough that partial sums wrap around while the total fits.
fn ints(r: u32, len: usize) -> Vec<i64> {
    (0..len)
        .map(|i| {
            let x = (i as i64).wrapping_mul(0x9E37_79B9) ^ i64::from(r) << 20;
            let big = if (i + r as usize) % 3 == 0 {
                1i64 << 62
            } else {
                -(1i64 << 61)
            };
            if r % 2 == 0 {
                big
            } else {
                x % (1 << 40)
            }
        })
        .collect()
}

fn int_sum(n: u32, len: usize) -> Vec<i64> {
    (0..len)
        .map(|i| {
            let s: i128 = (0..n).map(|r| i128::from(ints(r, len)[i])).sum();
            i64::try_from(s).expect("the test's totals fit in i64")
        })
        .collect()
}

// P-12: integer allreduce and reduce-scatter are exact, also when partial sums wrap, on the
// mesh and on the ring, in a group that also reduces f32 (the types' messages never mix).
#[test]
fn integer_sums_are_exact_on_the_mesh_and_on_the_ring() {
    for n in [2u32, 3, 5] {
        let len = 3000;
        let want = int_sum(n, len);
        let segs: Vec<Range<usize>> = (0..n as usize)
            .map(|k| len * k / n as usize..len * (k + 1) / n as usize)
            .collect();
        for windowless in [false, true] {
            let got = ranks_on(
                n,
                |net| {
                    if windowless {
                        net.windowless(Rank(0))
                    }
                },
                |c| {
                    let me = c.rank().0 as usize;
                    let mut f = input(c.rank().0, len);
                    c.allreduce(&mut f).unwrap();
                    let mut a = ints(c.rank().0, len);
                    c.allreduce(&mut a).unwrap();
                    let mut s = ints(c.rank().0, len);
                    c.reduce_scatter(&mut s, &segs).unwrap();
                    (a, s[segs[me].clone()].to_vec(), bits(&f), c.mesh())
                },
            );
            for (r, (a, s, f, mesh)) in got.into_iter().enumerate() {
                assert_eq!(mesh, Some(!windowless), "n={n} rank={r}");
                assert_eq!(a, want, "n={n} rank={r} windowless={windowless}");
                assert_eq!(s, want[segs[r].clone()], "n={n} rank={r}");
                assert_eq!(f, bits(&reference(n, len)), "n={n} rank={r}");
            }
        }
    }
}
