//! Micro-batches per rank: the even split and the split weighted by measured speed.

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

/// The predicted compute time of a step: the slowest rank's share times its speed.
pub fn makespan(shares: &[u32], per_mb: &[f64]) -> f64 {
    shares
        .iter()
        .zip(per_mb)
        .map(|(&c, &t)| c as f64 * t)
        .fold(0.0, f64::max)
}
