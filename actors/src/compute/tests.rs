//! The compute loop's pure parts.

use super::odd_ranks;
use phalanx_runtime::Rank;

// DET-1: the fixed-point sum is the same for any grouping and order of the addends, and
// close to the float sum; large elements are clamped, tiny ones truncated to zero.
#[test]
fn fixed_point_sum_is_order_independent() {
    use super::fixed;
    let g: Vec<Vec<f32>> = (0..6)
        .map(|i| {
            (0..50)
                .map(|j| ((i * 31 + j * 7) as f32).sin() * 10f32.powi(-(j % 9)))
                .collect()
        })
        .collect();
    let q = |v: &[f32]| -> Vec<i64> {
        let mut out = vec![0i64; v.len()];
        let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let range = (f64::from(lo), f64::from(hi));
        fixed::quantize_in_place(&mut tch::Tensor::from_slice(v), range)
            .copy_data(&mut out, v.len());
        out
    };
    // World 1: one rank sums all six; world 3: ranks sum 2 each; world 4: 2,2,1,1.
    let run = |split: &[&[usize]]| {
        let ranks: Vec<Vec<i64>> = split
            .iter()
            .map(|mbs| {
                let mut acc = vec![0i64; 50];
                for &m in *mbs {
                    for (a, x) in acc.iter_mut().zip(q(&g[m])) {
                        *a += x;
                    }
                }
                acc
            })
            .collect();
        // The allreduce: wrapping integer sums, here in reverse rank order.
        let mut sum = vec![0i64; 50];
        for r in ranks.iter().rev() {
            for (s, x) in sum.iter_mut().zip(r) {
                *s = s.wrapping_add(*x);
            }
        }
        fixed::decode(&sum)
    };
    let one = run(&[&[0, 1, 2, 3, 4, 5]]);
    let three = run(&[&[0, 1], &[2, 3], &[4, 5]]);
    let four = run(&[&[0, 1], &[2, 3], &[4], &[5]]);
    assert_eq!(one, three);
    assert_eq!(one, four);
    let float: Vec<f32> = (0..50).map(|j| g.iter().map(|v| v[j]).sum()).collect();
    // Within the f32 sum's own rounding (addends are at most 1 in magnitude).
    for (a, b) in one.iter().zip(&float) {
        assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
    }
    let big = fixed::decode(&q(&[1e9, -1e9, 0.5, 3e-13, -3e-13, 9.5e-13]));
    assert_eq!(big, vec![32767.0, -32767.0, 0.5, 0.0, 0.0, 2f32.powi(-40)]);
}

// T-6: a deterministic step's loss parts and flags ride in fixed point and come back whole.
#[test]
fn fixed_point_extras_round_trip() {
    use super::{pack, unpack, Flags, Parts};
    let world = 3;
    let mut sum = vec![0i64; 2 + 2 + world as usize + 1];
    for r in 0..world {
        let parts = Parts {
            loss: 1.25 + f64::from(r),
            val: 0.5,
        };
        let flags = Flags {
            bad: r == 1,
            preempt: false,
        };
        let b = pack(vec![7i64, -7], parts, flags, Rank(r), world);
        for (s, x) in sum.iter_mut().zip(b) {
            *s += x;
        }
    }
    let got = unpack(&mut sum, 2);
    assert_eq!(sum, vec![21, -21]);
    assert!((got.loss - 6.75).abs() < 1e-9, "{}", got.loss);
    assert!((got.val - 1.5).abs() < 1e-9, "{}", got.val);
    assert_eq!(got.bad_ranks, vec![1]);
    assert!(!got.preempt);
}

// SDC-1: the odd rank out is named and the majority is the reference.
#[test]
fn the_verdict_of_a_step() {
    use super::{verdict, Verdict};
    // T-2 / T-4: the same sums give every rank the same verdict.
    assert_eq!(verdict(false, &[], false, None, 7), Verdict::Regroup);
    assert_eq!(verdict(false, &[1], true, None, 7), Verdict::Regroup);
    assert_eq!(verdict(true, &[], true, None, 7), Verdict::Commit);
    assert_eq!(verdict(true, &[2], false, None, 7), Verdict::Skip);
    assert_eq!(verdict(true, &[2], true, None, 7), Verdict::RollBack);
    assert_eq!(verdict(true, &[2], true, Some(6), 7), Verdict::RollBack);
    // The same step bad again after its rollback is skipped, not rolled back forever.
    assert_eq!(verdict(true, &[2], true, Some(7), 7), Verdict::Skip);
}

// T-2, C-8: each rank's flag and loss part ride along with the gradient and come back named;
// one rank asked to stop makes every rank stop.
#[test]
fn pack_and_unpack_name_the_bad_ranks() {
    use super::{pack, unpack, Flags, Parts};
    let world = 3;
    let sum_of = |preempt_rank: Option<u32>| {
        let mut sum = vec![0f32; 2 + 2 + world as usize + 1];
        for r in 0..world {
            let flags = Flags {
                bad: r == 1,
                preempt: preempt_rank == Some(r),
            };
            let parts = Parts {
                loss: 0.5,
                val: 1.25 * f64::from(r),
            };
            let b = pack(vec![1.0, 2.0], parts, flags, Rank(r), world);
            for (s, x) in sum.iter_mut().zip(&b) {
                *s += x;
            }
        }
        sum
    };
    let mut sum = sum_of(None);
    let got = unpack(&mut sum, 2);
    assert_eq!(sum, vec![3.0, 6.0]);
    assert!((got.loss - 1.5).abs() < 1e-6);
    assert!((got.val - 3.75).abs() < 1e-6);
    assert_eq!(got.bad_ranks, vec![1]);
    assert!(!got.preempt);
    let mut sum = sum_of(Some(2));
    let got = unpack(&mut sum, 2);
    assert_eq!(got.bad_ranks, vec![1]);
    assert!(got.preempt);
}

#[test]
fn odd_rank_out_is_found_by_majority() {
    assert_eq!(odd_ranks(&[7, 7, 9, 7]), (vec![2], 0));
    assert_eq!(odd_ranks(&[9, 7, 7]), (vec![0], 1));
    assert_eq!(odd_ranks(&[5, 5]), (vec![], 0));
    // No strict majority: the lowest rank is the reference.
    assert_eq!(odd_ranks(&[1, 2]), (vec![1], 0));
    assert_eq!(odd_ranks(&[3]), (vec![], 0));
}

// T-6, Z-1: the exact sum of squares of a fixed-point gradient adds up over any cut of the
// buffer, and its norm is the gradient's.
#[test]
fn fixed_point_squares_add_up_whatever_the_cut() {
    use super::fixed;
    let sums: Vec<i64> = (0..100_003i64)
        .map(|i| (i * 2_654_435_761 % 2_000_003 - 1_000_001) << (i % 23))
        .collect();
    let whole = fixed::sum_of_squares(&sums);
    for world in [2, 3, 7] {
        let parts: u128 = phalanx_model::zero::shard_plan(sums.len(), world)
            .into_iter()
            .map(|r| fixed::sum_of_squares(&sums[r]))
            .sum();
        assert_eq!(parts, whole, "world {world}");
    }
    let want: f64 = fixed::decode(&sums)
        .iter()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum::<f64>()
        .sqrt();
    let norm = fixed::norm(whole);
    assert!((norm - want).abs() < 1e-6 * want, "{norm} vs {want}");
    // The largest squares fit, with room to spare.
    let top = (i64::MAX as u128 * i64::MAX as u128) >> 24;
    assert_eq!(fixed::sum_of_squares(&[i64::MIN + 1, i64::MAX]), 2 * top);
}
