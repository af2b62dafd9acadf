//! The deterministic sampler: a pure function `(seed, epoch, step, world, rank) -> sample ids`.
//!
//! An epoch is a pseudo-random permutation of all sample ids, computed per id in O(1) by a
//! Feistel network with cycle walking, so no rank stores or communicates a permutation. Step
//! `s` of an epoch takes positions `[s * global_batch, (s + 1) * global_batch)` of it, cut into
//! micro-batches of fixed size; ranks take contiguous runs of micro-batches. The global batch of
//! a step therefore does not depend on the world size (D-2 in docs/semantics.md).

use crate::{ModelError, Result};
use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sampler {
    seed: u64,
    num_samples: u64,
    global_batch: usize,
    micro_batch: usize,
}

/// splitmix64's finalizer: a cheap, well-mixed 64-bit hash.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const ROUNDS: u64 = 4;

/// Position -> sample id under the permutation of `epoch`. A bijection on `[0, n)`.
pub fn permute(seed: u64, epoch: u64, position: u64, n: u64) -> u64 {
    assert!(position < n, "position {position} outside [0, {n})");
    if n <= 1 {
        return 0;
    }
    let bits = (64 - (n - 1).leading_zeros()).max(2);
    let bits = bits + bits % 2;
    let half = bits / 2;
    let mask = (1u64 << half) - 1;
    let key = mix64(seed ^ mix64(epoch.wrapping_add(0x5EED)));
    let encrypt = |x: u64| {
        let (mut l, mut r) = (x >> half, x & mask);
        for i in 0..ROUNDS {
            let f = mix64(r ^ mix64(key.wrapping_add(i))) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << half) | r
    };
    // The domain is at most 4n, so cycle walking takes < 4 rounds on average.
    let mut y = encrypt(position);
    while y >= n {
        y = encrypt(y);
    }
    y
}

/// Micro-batches `[0, m)` split as contiguous runs of the given sizes, in rank order (D-2).
/// The coordinator sends the split with every assignment (even, or rebalanced away from a
/// straggler); `None` when it does not fit this batch and world, which a rank must not guess.
pub fn split_counts(m: usize, counts: &[u32], world: usize, rank: usize) -> Option<Range<usize>> {
    if rank >= world
        || counts.len() != world
        || counts.contains(&0)
        || counts.iter().map(|&c| c as usize).sum::<usize>() != m
    {
        return None;
    }
    let start: usize = counts[..rank].iter().map(|&c| c as usize).sum();
    Some(start..start + counts[rank] as usize)
}

impl Sampler {
    pub fn new(
        seed: u64,
        num_samples: u64,
        global_batch: usize,
        micro_batch: usize,
    ) -> Result<Self> {
        let bad = |key: &str, value: usize, reason: String| {
            Err(ModelError::InvalidValue {
                key: key.into(),
                value: value.to_string(),
                reason,
            })
        };
        if micro_batch == 0 {
            return bad("train.micro_batch", 0, "must be at least 1".into());
        }
        if global_batch == 0 || global_batch % micro_batch != 0 {
            return bad(
                "train.global_batch",
                global_batch,
                format!("must be a positive multiple of train.micro_batch = {micro_batch}"),
            );
        }
        if num_samples < global_batch as u64 {
            return bad(
                "train.global_batch",
                global_batch,
                format!(
                    "the training split has only {num_samples} samples; use a smaller global \
                     batch or block size, or more data"
                ),
            );
        }
        Ok(Sampler {
            seed,
            num_samples,
            global_batch,
            micro_batch,
        })
    }

    pub fn num_samples(&self) -> u64 {
        self.num_samples
    }

    pub fn global_batch(&self) -> usize {
        self.global_batch
    }

    pub fn micro_batch(&self) -> usize {
        self.micro_batch
    }

    /// Micro-batches in one global batch: the largest useful world size.
    pub fn micro_batches_per_step(&self) -> usize {
        self.global_batch / self.micro_batch
    }

    /// Whole steps per epoch; the remainder of an epoch's permutation is not used.
    pub fn steps_per_epoch(&self) -> u64 {
        self.num_samples / self.global_batch as u64
    }

    /// A run's step counter -> (epoch, step within the epoch).
    pub fn locate(&self, global_step: u64) -> (u64, u64) {
        let spe = self.steps_per_epoch();
        (global_step / spe, global_step % spe)
    }

    /// The sample ids of micro-batch `mb` of a step.
    pub fn micro_batch_ids(&self, epoch: u64, step: u64, mb: usize) -> Vec<u64> {
        let first = step * self.global_batch as u64 + (mb * self.micro_batch) as u64;
        (first..first + self.micro_batch as u64)
            .map(|p| permute(self.seed, epoch, p, self.num_samples))
            .collect()
    }

    /// The whole global batch of a step, in micro-batch order.
    pub fn global_batch_ids(&self, epoch: u64, step: u64) -> Vec<u64> {
        (0..self.micro_batches_per_step())
            .flat_map(|mb| self.micro_batch_ids(epoch, step, mb))
            .collect()
    }

    /// The micro-batch indices rank `rank` computes under a generation's split (`counts`
    /// micro-batches per rank, from the coordinator); `None` when the split does not fit.
    pub fn rank_micro_batches(
        &self,
        counts: &[u32],
        world: usize,
        rank: usize,
    ) -> Option<Range<usize>> {
        split_counts(self.micro_batches_per_step(), counts, world, rank)
    }

    /// `(seed, epoch, step, split, rank) -> sample ids`, grouped by micro-batch.
    pub fn rank_samples(
        &self,
        epoch: u64,
        step: u64,
        counts: &[u32],
        rank: usize,
    ) -> Option<Vec<Vec<u64>>> {
        let mbs = self.rank_micro_batches(counts, counts.len(), rank)?;
        Some(
            mbs.map(|mb| self.micro_batch_ids(epoch, step, mb))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    proptest! {
        // D-1: the permutation of an epoch is a bijection, so every sample appears exactly once.
        #[test]
        fn permutation_is_a_bijection(seed in any::<u64>(), epoch in 0u64..5, n in 1u64..3000) {
            let mut seen = vec![false; n as usize];
            for p in 0..n {
                let s = permute(seed, epoch, p, n) as usize;
                prop_assert!(!seen[s]);
                seen[s] = true;
            }
        }

        // D-2: for every world size from 1 to the number of micro-batches and any split the
        // coordinator may send (each rank at least one micro-batch), the rank slices are
        // disjoint and concatenate, in rank order, to the global batch.
        #[test]
        fn rank_slices_partition_the_global_batch(
            seed in any::<u64>(), mbs in 1usize..24, micro in 1usize..5, step in 0u64..4,
            cuts in proptest::collection::vec(any::<u32>(), 24),
        ) {
            let s = Sampler::new(seed, 10_000, mbs * micro, micro).unwrap();
            let global = s.global_batch_ids(0, step);
            for world in 1..=mbs {
                let counts = composition(mbs, world, &cuts);
                let mut joined = Vec::new();
                for rank in 0..world {
                    let r = s.rank_samples(0, step, &counts, rank).unwrap();
                    prop_assert!(!r.is_empty());
                    joined.extend(r.into_iter().flatten());
                }
                prop_assert_eq!(&joined, &global);
            }
        }
    }

    /// `m` split into `world` positive parts, the extra micro-batches placed by `cuts`.
    fn composition(m: usize, world: usize, cuts: &[u32]) -> Vec<u32> {
        let mut c = vec![1u32; world];
        for i in 0..m - world {
            c[cuts[i % cuts.len()] as usize % world] += 1;
        }
        c
    }

    // D-2: an uneven split still concatenates to the global batch in rank order; a split that
    // does not fit the world or the batch is refused, never replaced by a guess.
    #[test]
    fn uneven_split_partitions_the_global_batch() {
        let s = Sampler::new(3, 5000, 32, 2).unwrap();
        let counts = [5u32, 5, 4, 2];
        let joined: Vec<usize> = (0..4)
            .flat_map(|r| s.rank_micro_batches(&counts, 4, r).unwrap())
            .collect();
        assert_eq!(joined, (0..16).collect::<Vec<_>>());
        assert_eq!(s.rank_micro_batches(&counts, 4, 3), Some(14..16));
        assert_eq!(s.rank_micro_batches(&[], 4, 1), None);
        assert_eq!(s.rank_micro_batches(&[9, 9, 9, 9], 4, 1), None);
        assert_eq!(s.rank_micro_batches(&[8, 8], 4, 1), None);
        assert_eq!(s.rank_micro_batches(&[16, 0], 2, 0), None);
        assert_eq!(s.rank_micro_batches(&[8, 8], 2, 2), None);
    }

    #[test]
    fn every_sample_once_per_epoch_across_steps() {
        let s = Sampler::new(7, 1000, 32, 4).unwrap();
        let mut seen = HashSet::new();
        for step in 0..s.steps_per_epoch() {
            for id in s.global_batch_ids(0, step) {
                assert!(seen.insert(id), "sample {id} repeated");
            }
        }
        // 1000 = 31 x 32 + 8: the 8 left over are not used this epoch.
        assert_eq!(seen.len(), 31 * 32);
        // A new epoch is another order.
        assert_ne!(s.global_batch_ids(0, 0), s.global_batch_ids(1, 0));
    }

    #[test]
    fn global_batch_is_independent_of_world_size() {
        let a = Sampler::new(1, 5000, 48, 2).unwrap();
        for world in [1, 2, 3, 5, 24] {
            let counts = composition(24, world, &[7, 1, 3]);
            let joined: Vec<u64> = (0..world)
                .flat_map(|r| {
                    a.rank_samples(3, 9, &counts, r)
                        .unwrap()
                        .into_iter()
                        .flatten()
                })
                .collect();
            assert_eq!(joined, a.global_batch_ids(3, 9));
        }
    }

    #[test]
    fn bad_batch_sizes_are_refused() {
        assert!(Sampler::new(1, 100, 10, 3).is_err());
        assert!(Sampler::new(1, 100, 0, 1).is_err());
        assert!(Sampler::new(1, 100, 10, 0).is_err());
        assert!(Sampler::new(1, 5, 10, 1).is_err());
    }
}
