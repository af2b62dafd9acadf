//! The coordinator's side of a sharded checkpoint's two-phase commit (C-5). Every rank of a
//! generation votes with its durable part (in its heartbeats); once every rank of the current
//! generation has voted for a step, rank 0 is told to write the manifest that commits it, and
//! says so in its heartbeats. A new generation aborts the saves of older ones: their parts stay
//! on disk without a manifest, never loaded, and retention removes them.

use crate::ids::{Generation, Rank};
use phalanx_proto::pb;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// An order unanswered this long is sent again (a session may have broken in between).
const REORDER_AFTER: Duration = Duration::from_secs(2);

/// Saves in progress and the newest commit.
#[derive(Debug, Default)]
pub struct Saves {
    pending: BTreeMap<u64, Pending>,
    /// Saves said aborted (by step), so that late votes for them are not said again.
    aborted: std::collections::BTreeSet<u64>,
    /// Parts said failed (step, rank), likewise.
    failed: std::collections::BTreeSet<(u64, u32)>,
    /// The newest step rank 0 reported committed.
    pub committed: u64,
}

#[derive(Debug)]
struct Pending {
    generation: Generation,
    world: u32,
    parts: BTreeMap<u32, pb::CheckpointPart>,
    ordered_at: Option<Instant>,
}

/// What the membership says about a voter.
#[derive(Debug, Clone, Copy)]
pub struct Voter {
    /// The rank it holds in the current generation, if it is an active rank.
    pub rank: Option<Rank>,
    pub generation: Generation,
    pub world: u32,
}

/// A save to commit: every part of it is durable.
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub step: u64,
    pub generation: Generation,
    pub parts: Vec<pb::CheckpointPart>,
}

/// A part that could not be written, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Failed {
    pub step: u64,
    pub rank: u32,
    pub error: String,
}

/// A save that can never complete.
#[derive(Debug, Clone, PartialEq)]
pub struct Aborted {
    pub step: u64,
    pub generation: Generation,
    pub voted: u32,
    pub world: u32,
}

/// What a vote brings about.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Commit(Order),
    /// A rank could not write its part: the save cannot commit.
    Failed(Failed),
    /// A part of a save whose generation ended before every part was durable: the first
    /// late vote for a save nobody else voted for in time says so.
    Aborted(Aborted),
}

impl Saves {
    /// A vote: the commit order once every rank voted, or the abort of a save a lost rank
    /// left behind.
    pub fn on_vote(
        &mut self,
        now: Instant,
        part: &pb::CheckpointPart,
        who: Voter,
    ) -> Option<Outcome> {
        if !part.error.is_empty() {
            if !self.failed.insert((part.step, part.rank)) {
                return None;
            }
            while self.failed.len() > 256 {
                self.failed.pop_first();
            }
            self.pending.remove(&part.step);
            return Some(Outcome::Failed(Failed {
                step: part.step,
                rank: part.rank,
                error: part.error.clone(),
            }));
        }
        let stale = Generation(part.generation) < who.generation;
        if stale && part.step > self.committed && self.aborted.insert(part.step) {
            self.trim_aborted();
            return Some(Outcome::Aborted(Aborted {
                step: part.step,
                generation: Generation(part.generation),
                voted: 1,
                world: part.world,
            }));
        }
        self.vote(now, part, who).map(Outcome::Commit)
    }

    fn trim_aborted(&mut self) {
        while self.aborted.len() > 64 {
            self.aborted.pop_first();
        }
    }

    /// Counts a vote from a rank of the current generation for a step not yet committed; the
    /// order to commit once every rank voted (again if an earlier order went unanswered).
    pub fn vote(&mut self, now: Instant, part: &pb::CheckpointPart, who: Voter) -> Option<Order> {
        let current = Generation(part.generation) == who.generation
            && part.world == who.world
            && who.rank == Some(Rank(part.rank));
        if !current || part.step <= self.committed {
            return None;
        }
        let p = self.pending.entry(part.step).or_insert_with(|| Pending {
            generation: who.generation,
            world: who.world,
            parts: BTreeMap::new(),
            ordered_at: None,
        });
        if p.generation != who.generation {
            return None;
        }
        p.parts.insert(part.rank, part.clone());
        let complete = p.parts.len() as u32 == p.world;
        let due = p
            .ordered_at
            .is_none_or(|t| now.saturating_duration_since(t) >= REORDER_AFTER);
        if !(complete && due) {
            return None;
        }
        p.ordered_at = Some(now);
        Some(Order {
            step: part.step,
            generation: p.generation,
            parts: p.parts.values().cloned().collect(),
        })
    }

    /// Rank 0 wrote the manifest of `step`: the newly committed save, if it is one.
    pub fn committed(&mut self, step: u64) -> Option<Vec<pb::CheckpointPart>> {
        if step <= self.committed {
            return None;
        }
        self.committed = step;
        let done = self
            .pending
            .remove(&step)
            .map(|p| p.parts.into_values().collect());
        // Older saves still pending lost the race to a newer commit: nothing loads them.
        self.pending.retain(|&s, _| s > step);
        done.or(Some(Vec::new()))
    }

    /// A new generation: the saves of older ones can never gather every vote.
    pub fn abort_before(&mut self, generation: Generation) -> Vec<Aborted> {
        let gone: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.generation < generation)
            .map(|(&s, _)| s)
            .collect();
        self.aborted.extend(gone.iter().copied());
        self.trim_aborted();
        gone.into_iter()
            .filter_map(|s| self.pending.remove(&s).map(|p| (s, p)))
            .map(|(step, p)| Aborted {
                step,
                generation: p.generation,
                voted: p.parts.len() as u32,
                world: p.world,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(step: u64, generation: u64, rank: u32, world: u32) -> pb::CheckpointPart {
        pb::CheckpointPart {
            step,
            generation,
            rank,
            world,
            ..Default::default()
        }
    }

    fn voter(rank: u32, generation: u64, world: u32) -> Voter {
        Voter {
            rank: Some(Rank(rank)),
            generation: Generation(generation),
            world,
        }
    }

    // C-5: the commit is ordered only when every rank of the generation voted, once (again
    // only after an unanswered while), and never for a step already committed.
    #[test]
    fn every_rank_votes_before_the_commit() {
        let t = Instant::now();
        let mut s = Saves::default();
        assert!(s.vote(t, &part(10, 1, 0, 3), voter(0, 1, 3)).is_none());
        assert!(s.vote(t, &part(10, 1, 2, 3), voter(2, 1, 3)).is_none());
        // A repeated vote is one vote.
        assert!(s.vote(t, &part(10, 1, 2, 3), voter(2, 1, 3)).is_none());
        let o = s.vote(t, &part(10, 1, 1, 3), voter(1, 1, 3)).unwrap();
        assert_eq!(o.step, 10);
        assert_eq!(o.parts.len(), 3);
        assert!(s.vote(t, &part(10, 1, 1, 3), voter(1, 1, 3)).is_none());
        let later = t + REORDER_AFTER;
        assert!(s.vote(later, &part(10, 1, 1, 3), voter(1, 1, 3)).is_some());
        assert_eq!(s.committed(10).map(|p| p.len()), Some(3));
        assert!(s.vote(later, &part(10, 1, 1, 3), voter(1, 1, 3)).is_none());
        assert!(s.committed(10).is_none());
    }

    // C-5: a rank lost during a save aborts it: votes of another generation, world or rank
    // are not counted, and a new generation aborts the older saves.
    #[test]
    fn a_lost_rank_aborts_the_save() {
        let t = Instant::now();
        let mut s = Saves::default();
        s.vote(t, &part(20, 1, 0, 4), voter(0, 1, 4));
        s.vote(t, &part(20, 1, 1, 4), voter(1, 1, 4));
        // The sender is not that rank, or the generation moved on.
        assert!(s.vote(t, &part(20, 1, 2, 4), voter(3, 1, 4)).is_none());
        assert!(s.vote(t, &part(20, 1, 2, 4), voter(2, 2, 3)).is_none());
        let a = s.abort_before(Generation(2));
        assert_eq!(
            a,
            vec![Aborted {
                step: 20,
                generation: Generation(1),
                voted: 2,
                world: 4
            }]
        );
        // A late vote of the old generation for a save nobody voted for in time is said
        // aborted once; for one already said aborted, not again.
        let late = s.on_vote(t, &part(25, 1, 0, 4), voter(0, 2, 3));
        assert!(matches!(
            late,
            Some(Outcome::Aborted(Aborted { step: 25, .. }))
        ));
        assert!(s.on_vote(t, &part(25, 1, 2, 4), voter(1, 2, 3)).is_none());
        assert!(s.on_vote(t, &part(20, 1, 2, 4), voter(1, 2, 3)).is_none());
        // A part that could not be written is said once, and its save never commits.
        let mut broken = part(30, 2, 1, 2);
        broken.error = "No space left on device".into();
        s.vote(t, &part(30, 2, 0, 2), voter(0, 2, 2));
        let f = s.on_vote(t, &broken, voter(1, 2, 2));
        assert!(matches!(
            f,
            Some(Outcome::Failed(Failed {
                step: 30,
                rank: 1,
                ..
            }))
        ));
        assert!(s.on_vote(t, &broken, voter(1, 2, 2)).is_none());
        assert!(s.vote(t, &part(30, 2, 1, 2), voter(1, 2, 2)).is_none());
        // The next save, in the new generation, commits.
        s.vote(t, &part(40, 2, 0, 2), voter(0, 2, 2));
        assert!(s.vote(t, &part(40, 2, 1, 2), voter(1, 2, 2)).is_some());
    }
}
