//! Z-2: the plan that moves ZeRO-1 moments to a new generation's shards, as a pure function of
//! what every rank says it holds. Every rank computes the same plan from the same gathered
//! descriptions, so the broadcasts that carry it line up on every rank.

use std::ops::Range;

/// What one rank holds: the moments of `covers`, at update count `t`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub covers: Range<usize>,
    pub t: u64,
}

/// One broadcast: `from` sends the moments of `values` (it holds them at the target count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub from: u32,
    pub values: Range<usize>,
}

/// Values nobody holds at the target count: the owner and every copy are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub values: Range<usize>,
}

/// Whether `h` holds `r` at count `t`.
fn holds(h: &Held, r: &Range<usize>, t: u64) -> bool {
    h.t == t && h.covers.start <= r.start && r.end <= h.covers.end
}

/// The broadcasts that give every rank `r` the moments of `want[r]` at count `t`: each
/// stretch of values comes from the lowest rank holding it, and is sent only when some rank
/// wants it and does not hold it already. Adjacent stretches with the same sender are one
/// broadcast. Empty when every rank already holds its new shard.
pub fn plan(n: usize, held: &[Held], want: &[Range<usize>], t: u64) -> Result<Vec<Move>, Lost> {
    let mut cuts: Vec<usize> = vec![0, n];
    for h in held {
        cuts.extend([h.covers.start.min(n), h.covers.end.min(n)]);
    }
    for w in want {
        cuts.extend([w.start, w.end]);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut moves: Vec<Move> = Vec::new();
    for piece in cuts.windows(2).map(|c| c[0]..c[1]) {
        let Some(from) = held.iter().position(|h| holds(h, &piece, t)) else {
            return Err(Lost { values: piece });
        };
        let needed = want
            .iter()
            .zip(held)
            .any(|(w, h)| w.start <= piece.start && piece.end <= w.end && !holds(h, &piece, t));
        if !needed {
            continue;
        }
        let from = from as u32;
        match moves.last_mut() {
            Some(m) if m.from == from && m.values.end == piece.start => m.values.end = piece.end,
            _ => moves.push(Move {
                from,
                values: piece,
            }),
        }
    }
    Ok(moves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_model::zero::shard_plan;

    fn held(plan: &[Range<usize>], t: u64) -> Vec<Held> {
        plan.iter()
            .map(|r| Held {
                covers: r.clone(),
                t,
            })
            .collect()
    }

    // Z-2: the same shards again (a compute restarted in place, a regroup that kept the world)
    // move nothing.
    #[test]
    fn the_same_cut_moves_nothing() {
        let p = shard_plan(10_000, 4);
        assert_eq!(plan(10_000, &held(&p, 7), &p, 7), Ok(vec![]));
    }

    // Z-2: the job's start (every rank holds all zero moments at count 0) moves nothing.
    #[test]
    fn whole_fresh_optimizers_move_nothing() {
        let all = vec![
            Held {
                covers: 0..5000,
                t: 0
            };
            3
        ];
        assert_eq!(plan(5000, &all, &shard_plan(5000, 3), 0), Ok(vec![]));
    }

    // Z-2: 4 -> 5: every value of the new cut comes from its old owner, each rank is sent only
    // what it lacks, and the joiner all of its shard.
    #[test]
    fn four_to_five_moves_what_each_lacks_from_its_owner() {
        let n = 256 * 40 + 3;
        let (old, new) = (shard_plan(n, 4), shard_plan(n, 5));
        let mut h = held(&old, 9);
        h.push(Held { covers: 0..n, t: 0 });
        let moves = plan(n, &h, &new, 9).unwrap();
        for m in &moves {
            assert!(holds(&h[m.from as usize], &m.values, 9), "{m:?}");
        }
        let sent: usize = moves.iter().map(|m| m.values.len()).sum();
        assert!(sent < n, "{moves:?}");
        // Every wanted value is held or sent.
        for (r, w) in new.iter().enumerate() {
            for x in [w.start, w.end - 1] {
                let here = holds(&h[r], &(x..x + 1), 9);
                assert!(
                    here || moves.iter().any(|m| m.values.contains(&x)),
                    "rank {r} value {x}"
                );
            }
        }
    }

    // Z-2: 4 -> 3 with rank 2 killed: its shard had no other holder, so those values are lost
    // (the job goes back to its last checkpoint).
    #[test]
    fn a_lost_owner_loses_its_values() {
        let n = 256 * 40;
        let old = shard_plan(n, 4);
        let mut h = held(&old, 9);
        h.remove(2);
        let lost = plan(n, &h, &shard_plan(n, 3), 9).unwrap_err();
        assert_eq!(lost.values.start, old[2].start);
        assert!(lost.values.end <= old[2].end);
    }

    // Z-2: a rank at another update count (it failed the last step) is no source; when it is
    // the only holder, the values are lost.
    #[test]
    fn a_stale_holder_is_no_source() {
        let n = 256 * 8;
        let p = shard_plan(n, 2);
        let mut h = held(&p, 5);
        h[1].t = 4;
        assert_eq!(
            plan(n, &h, &p, 5),
            Err(Lost {
                values: p[1].clone()
            })
        );
    }

    // Z-2: a joiner (fresh, whole zeros at count 0) is no source of a later count; it gets its
    // shard from the holders.
    #[test]
    fn a_joiner_gets_its_shard_from_the_holders() {
        let n = 256 * 12;
        let old = shard_plan(n, 2);
        let new = shard_plan(n, 3);
        let mut h = held(&old, 3);
        h.push(Held { covers: 0..n, t: 0 });
        let moves = plan(n, &h, &new, 3).unwrap();
        let to_joiner: usize = moves
            .iter()
            .map(|m| {
                let (a, b) = (
                    m.values.start.max(new[2].start),
                    m.values.end.min(new[2].end),
                );
                b.saturating_sub(a)
            })
            .sum();
        assert_eq!(to_joiner, new[2].len());
        assert!(moves.iter().all(|m| m.from < 2));
    }
}
