//! Z-4: buddy replicas of ZeRO-1 shards. Every `zero.replica_interval` steps (and when a
//! generation starts) each rank snapshots its shard (parameters and moments at that step) and
//! sends it to the next `zero.replicas` ranks, which keep it in memory. When a shard's owner is
//! lost, the job goes back to the newest step whose snapshots still cover the whole buffer,
//! without reading the disk; each snapshot's digest, made by its owner, is checked first.

use super::zero_plan::Held;
use super::*;
use phalanx_model::zero::shard_plan;
use std::ops::Range;

/// One shard's parameters and moments at a step.
#[derive(Debug, Clone)]
pub(super) struct Snap {
    pub covers: Range<usize>,
    pub step: u64,
    /// The optimizer's update count at `step`.
    pub t: u64,
    /// The owner's digest of `data`.
    pub digest: u64,
    /// Parameters, then first moments, then second moments of `covers`.
    pub data: Vec<f32>,
}

/// What a rank keeps: its own last snapshot and the copies of its predecessors'.
#[derive(Debug, Default)]
pub(super) struct Replicas {
    pub own: Option<Snap>,
    pub copies: Vec<Snap>,
}

impl Replicas {
    fn all(&self) -> impl Iterator<Item = &Snap> {
        self.own.iter().chain(&self.copies)
    }

    /// Bytes of snapshots held: this rank's own and its copies of others'.
    pub fn bytes(&self) -> usize {
        self.all().map(|c| 4 * c.data.len()).sum()
    }
}

fn digest(data: &[f32]) -> u64 {
    data.iter().fold(0x9E37_79B9_7F4A_7C15u64, |h, f| {
        (h.rotate_left(5) ^ u64::from(f.to_bits())).wrapping_mul(0x0100_0000_01B3)
    })
}

/// This rank's shard as it is now.
fn snapshot(s: &Setup) -> Snap {
    let covers = s.trainer.opt.covers();
    let mut data = s.trainer.model.params.host_range(covers.clone());
    let (m, v) = s.trainer.opt.moments();
    data.extend(m);
    data.extend(v);
    Snap {
        covers,
        step: s.trainer.step,
        t: s.trainer.opt.t,
        digest: digest(&data),
        data,
    }
}

const HEAD: usize = 24;

fn encode(s: &Snap) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEAD + 4 * s.data.len());
    for x in [s.step, s.t, s.digest] {
        b.extend(x.to_le_bytes());
    }
    b.extend(s.data.iter().flat_map(|f| f.to_le_bytes()));
    b
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"))
}

fn decode(b: &[u8], covers: Range<usize>) -> Snap {
    let data = b[HEAD..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Snap {
        covers,
        step: u64_at(b, 0),
        t: u64_at(b, 1),
        digest: u64_at(b, 2),
        data,
    }
}

/// Z-4: snapshots this rank's shard and sends it to the next `k` ranks, one pairing at a time
/// (every rank counts every pairing, so the group's operations line up).
pub(super) fn refresh(
    group: &dyn Group,
    s: &Setup,
    reps: &mut Replicas,
    k: u32,
) -> Result<(), RuntimeError> {
    let (me, world) = (group.rank().0, group.world());
    let n = s.trainer.model.num_params() as usize;
    let plan = shard_plan(n, world);
    let mine = snapshot(s);
    let mut copies = Vec::new();
    for d in 1..=k.min(world.saturating_sub(1)) {
        for src in 0..world {
            let dst = (src + d) % world;
            if src == me {
                let mut b = encode(&mine);
                group.send_striped(Rank(dst), &[Rank(me)], &mut b)?;
            } else if dst == me {
                let len = plan[src as usize].len();
                let mut b = vec![0u8; HEAD + 12 * len];
                group.recv_striped(&[Rank(src)], &mut b)?;
                copies.push(decode(&b, plan[src as usize].clone()));
            } else {
                group.skip()?;
            }
        }
    }
    reps.own = Some(mine);
    reps.copies = copies;
    Ok(())
}

/// What every rank holds, by slot (its own snapshot, then its copies): `(covers, step, t)`.
/// A snapshot whose digest no longer matches its data is not offered.
fn gather_snaps(
    group: &dyn Group,
    reps: &Replicas,
    slots: usize,
) -> Result<Vec<(u32, usize, Held, u64)>, RuntimeError> {
    let mine: Vec<&Snap> = reps.all().filter(|s| digest(&s.data) == s.digest).collect();
    let mut out = Vec::new();
    for slot in 0..slots {
        let s = mine.get(slot);
        let start = group.gather_u64(s.map_or(0, |s| s.covers.start as u64))?;
        let end = group.gather_u64(s.map_or(0, |s| s.covers.end as u64))?;
        let step = group.gather_u64(s.map_or(u64::MAX, |s| s.step))?;
        let t = group.gather_u64(s.map_or(0, |s| s.t))?;
        for r in 0..start.len() {
            if step[r] != u64::MAX {
                let held = Held {
                    covers: start[r] as usize..end[r] as usize,
                    t: t[r],
                };
                out.push((r as u32, slot, held, step[r]));
            }
        }
    }
    Ok(out)
}

/// Where one stretch of values at the restore step comes from: a rank and its slot.
struct Source {
    rank: u32,
    slot: usize,
    values: Range<usize>,
}

/// The newest step whose snapshots cover all `n` values, and a source for every stretch.
fn choose(n: usize, snaps: &[(u32, usize, Held, u64)]) -> Option<(u64, u64, Vec<Source>)> {
    let mut steps: Vec<u64> = snaps.iter().map(|s| s.3).collect();
    steps.sort_unstable();
    steps.dedup();
    for &step in steps.iter().rev() {
        let at: Vec<&(u32, usize, Held, u64)> = snaps.iter().filter(|s| s.3 == step).collect();
        let mut cuts: Vec<usize> = vec![0, n];
        for s in &at {
            cuts.extend([s.2.covers.start.min(n), s.2.covers.end.min(n)]);
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut sources: Vec<Source> = Vec::new();
        let mut whole = true;
        for piece in cuts.windows(2).map(|c| c[0]..c[1]) {
            let from = at
                .iter()
                .find(|s| s.2.covers.start <= piece.start && piece.end <= s.2.covers.end);
            let Some(f) = from else {
                whole = false;
                break;
            };
            match sources.last_mut() {
                Some(l) if l.rank == f.0 && l.slot == f.1 && l.values.end == piece.start => {
                    l.values.end = piece.end
                }
                _ => sources.push(Source {
                    rank: f.0,
                    slot: f.1,
                    values: piece,
                }),
            }
        }
        if whole {
            return Some((step, at[0].2.t, sources));
        }
    }
    None
}

/// Z-4: when moments were lost, every rank goes back to the newest step the snapshots cover:
/// the parameters from the snapshots, and the moments of this rank's shard of the new cut.
/// `None` when they do not cover a step (the job goes back to its checkpoint instead).
pub(super) fn restore(
    group: &dyn Group,
    s: &mut Setup,
    reps: &Replicas,
    k: u32,
) -> Result<Option<u64>, RuntimeError> {
    let n = s.trainer.model.num_params() as usize;
    let me = group.rank().0;
    let snaps = gather_snaps(group, reps, 1 + k as usize)?;
    let Some((step, t, sources)) = choose(n, &snaps) else {
        return Ok(None);
    };
    let want = shard_plan(n, group.world())[me as usize].clone();
    let mine: Vec<&Snap> = reps.all().filter(|s| digest(&s.data) == s.digest).collect();
    let mut params = vec![0f32; n];
    let mut m = vec![0f32; want.len()];
    let mut v = vec![0f32; want.len()];
    for src in &sources {
        let len = src.values.len();
        let mut b = if src.rank == me {
            let snap = mine[src.slot];
            let (base, sl) = (snap.covers.start, snap.covers.len());
            let r = src.values.start - base..src.values.end - base;
            let pick = |k: usize| &snap.data[k * sl + r.start..k * sl + r.end];
            (0..3)
                .flat_map(|k| pick(k).iter().flat_map(|f| f.to_le_bytes()))
                .collect()
        } else {
            vec![0u8; 12 * len]
        };
        group.broadcast(&mut b, Rank(src.rank))?;
        let at = |k: usize, i: usize| {
            let o = 4 * (k * len + i);
            f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
        };
        for i in 0..len {
            let x = src.values.start + i;
            params[x] = at(0, i);
            if want.contains(&x) {
                m[x - want.start] = at(1, i);
                v[x - want.start] = at(2, i);
            }
        }
    }
    let t_ = &mut s.trainer;
    t_.model.params.set_host(&params);
    t_.model.params.zero_grads();
    t_.opt.set_shard(want, &m, &v);
    t_.opt.t = t;
    t_.step = step;
    Ok(Some(step))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(rank: u32, slot: usize, covers: Range<usize>, step: u64) -> (u32, usize, Held, u64) {
        (rank, slot, Held { covers, t: step }, step)
    }

    // Z-4: the newest step the snapshots cover is chosen, each stretch from one holder.
    #[test]
    fn the_newest_covered_step_is_chosen() {
        // Rank 1 of 3 was lost: rank 2 holds its copy of step 20 (and its own), rank 0 its own
        // of 20 and a copy of rank 2's of step 10.
        let snaps = vec![
            snap(0, 0, 0..100, 20),
            snap(0, 1, 200..300, 10),
            snap(2, 0, 200..300, 20),
            snap(2, 1, 100..200, 20),
        ];
        let (step, _, src) = choose(300, &snaps).unwrap();
        assert_eq!(step, 20);
        let covered: usize = src.iter().map(|s| s.values.len()).sum();
        assert_eq!(covered, 300);
        assert!(src
            .iter()
            .any(|s| s.rank == 2 && s.slot == 1 && s.values == (100..200)));
    }

    // Z-4: a shard with no snapshot left (owner and buddy both lost) covers no step.
    #[test]
    fn a_hole_covers_no_step() {
        let snaps = vec![snap(0, 0, 0..100, 20), snap(2, 0, 200..300, 20)];
        assert!(choose(300, &snaps).is_none());
    }

    // Z-4: a corrupted copy is not offered: its digest no longer matches its data.
    #[test]
    fn a_corrupted_copy_fails_its_digest() {
        let data = vec![1.0f32, 2.0, 3.0];
        let mut s = Snap {
            covers: 0..1,
            step: 1,
            t: 1,
            digest: digest(&data),
            data,
        };
        assert_eq!(digest(&s.data), s.digest);
        s.data[1] = f32::NAN;
        assert_ne!(digest(&s.data), s.digest);
        let round = decode(&encode(&s), 0..1);
        assert_eq!(round.digest, s.digest);
        assert_eq!(round.step, 1);
    }
}
