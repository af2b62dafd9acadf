//! Micro-batches per rank: the even split and the split weighted by measured speed.

use super::*;

/// Micro-batches per rank that minimise the step's compute time, given each rank's time per
/// micro-batch: everyone gets one, then each next micro-batch goes to the rank that would
/// finish it first (ties to the lower rank). Optimal for identical jobs on machines of
/// different speeds, and deterministic.
pub fn weighted_shares(micro_batches: usize, per_mb: &[f64]) -> Vec<u32> {
    let n = per_mb.len();
    if n == 0 || micro_batches < n {
        return Vec::new();
    }
    let mut shares = vec![1u32; n];
    for _ in n..micro_batches {
        let next = (0..n)
            .min_by(|&a, &b| {
                let fa = (shares[a] + 1) as f64 * per_mb[a];
                let fb = (shares[b] + 1) as f64 * per_mb[b];
                fa.total_cmp(&fb)
            })
            .expect("n > 0");
        shares[next] += 1;
    }
    shares
}

/// The even split's shares (the first `m % world` ranks take one more).
pub fn even_shares(micro_batches: usize, world: usize) -> Vec<u32> {
    (0..world)
        .map(|r| (micro_batches / world + usize::from(r < micro_batches % world)) as u32)
        .collect()
}

/// The split an assignment carries: the current generation's rebalanced one, else the even
/// one. The ranks never split the batch themselves, so there is one even split, here.
pub fn assigned_shares(s: &State, cfg: &CoreConfig) -> Vec<u32> {
    let world = s.world();
    if s.shares.len() == world {
        s.shares.clone()
    } else if world > 0 && cfg.micro_batches >= world {
        even_shares(cfg.micro_batches, world)
    } else {
        Vec::new()
    }
}

/// The predicted compute time of a step: the slowest rank's share times its speed.
pub fn makespan(shares: &[u32], per_mb: &[f64]) -> f64 {
    shares
        .iter()
        .zip(per_mb)
        .map(|(&c, &t)| c as f64 * t)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    // D-2: the even split covers the batch, gives every rank at least one micro-batch and
    // differs by at most one between ranks, for every world the batch allows.
    #[test]
    fn the_even_split_covers_the_batch_within_one() {
        for m in 1..40 {
            for world in 1..=m {
                let s = even_shares(m, world);
                assert_eq!(s.len(), world);
                assert_eq!(s.iter().map(|&c| c as usize).sum::<usize>(), m);
                let (lo, hi) = (s.iter().min().unwrap(), s.iter().max().unwrap());
                assert!(*lo >= 1 && hi - lo <= 1, "{m} over {world}: {s:?}");
            }
        }
    }

    // The coordinator always sends a split once it knows the batch: the rebalanced one while
    // it holds, else the even one.
    #[test]
    fn an_assignment_always_carries_a_split() {
        let mut st = State::new("job", 3);
        st.ranks = vec![1, 2, 3];
        let cfg = CoreConfig {
            micro_batches: 8,
            ..CoreConfig::default()
        };
        assert_eq!(assigned_shares(&st, &cfg), vec![3, 3, 2]);
        st.shares = vec![4, 3, 1];
        assert_eq!(assigned_shares(&st, &cfg), vec![4, 3, 1]);
        st.shares.clear();
        assert!(assigned_shares(&st, &CoreConfig::default()).is_empty());
    }
}
