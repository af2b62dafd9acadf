//! Allreduce, reduce-scatter and allgather through the ranks' shared-memory windows, for a group
//! whose ranks all share a node (P-11): each rank puts its values in its own window, reduces its
//! segment straight from its peers' windows, publishes the result there, and copies every other
//! segment from its owner's window. Per rank that is one copy in, a read of each peer's segment
//! and one copy out, instead of the ring's `2 (n-1)` hops through the transport's bounce buffers.
//!
//! Messages only order the accesses (a rank announces what it wrote, and says when it is done
//! reading a peer's window), so a dead or silent peer is found as on the ring: the wait for its
//! next message fails. Segment `k` is summed by its owner in the ring's order `k+1, ..., k`, so
//! the result is bitwise the ring's, and the same on every rank (P-2).
//!
//! The window is cut in two halves; the buffer goes through them in rounds of half a window, so a
//! rank may fill one half while its peers still read the other.

use super::collectives::{exchange, offer, offered_key, OFFER_LEN};
use super::transport::*;
use crate::error::RuntimeError;
use crate::ids::Rank;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::time::Duration;

/// Rounds smaller than this would be ruled by their messages: such a group keeps the ring.
pub(super) const MIN_ROUND_BYTES: usize = 4096;

/// Bytes a reduction reads from a peer's window at a time (staging that stays in cache).
const STAGE_BYTES: usize = 64 * 1024;

const SLOT_OFFER: u32 = 0;
const SLOT_MAPPED: u32 = 1;

/// Decides, once per group, whether its reductions and gathers go through shared memory: every
/// rank offers its window to every other, maps theirs, and tells every peer whether it mapped
/// them all. Yes only if every rank did, so every rank takes the same path.
pub(super) fn negotiate<T: Transport>(
    t: &mut T,
    seq: u16,
    bytes: usize,
    timeout: Duration,
) -> Result<bool, RuntimeError> {
    let op = "allreduce";
    let me = t.rank();
    let peers: Vec<Rank> = (0..t.world()).map(Rank).filter(|&r| r != me).collect();
    let key = t.window_key(bytes)?;
    let mine = offer(key.as_deref(), bytes);
    let sends = peers
        .iter()
        .map(|&p| (p, SLOT_OFFER, mine.clone()))
        .collect();
    let recvs: Vec<_> = peers.iter().map(|&p| (p, SLOT_OFFER, OFFER_LEN)).collect();
    let offers = exchange(t, op, seq, sends, &recvs, timeout)?;
    let mut mapped = key.is_some();
    for (&p, o) in peers.iter().zip(&offers) {
        mapped = mapped && offered_key(o, bytes).is_some_and(|k| t.window_map(p, k));
    }
    let bit = vec![u8::from(mapped)];
    let sends = peers
        .iter()
        .map(|&p| (p, SLOT_MAPPED, bit.clone()))
        .collect();
    let recvs: Vec<_> = peers.iter().map(|&p| (p, SLOT_MAPPED, 1)).collect();
    let bits = exchange(t, op, seq, sends, &recvs, timeout)?;
    Ok(mapped && bits.iter().all(|b| b.first() == Some(&1)))
}

/// What a mesh collective does with the attached buffer of values.
#[derive(Debug, Clone, Copy)]
pub(super) struct Phases {
    /// Sum every rank's values into each rank's own segment.
    pub reduce: bool,
    /// Copy every other rank's segment from its owner.
    pub gather: bool,
}

/// Messages of round `i` between one pair of ranks: slot `3 i + kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// The sender's values for the round are in its window (carries the buffer's length).
    Ready = 0,
    /// The sender's segment of the round is final in its window (carries the length).
    Published = 1,
    /// The sender has read all it needs of the receiver's window for the round.
    Done = 2,
}

/// The rounds a buffer goes through the window halves in.
struct Rounds {
    len: usize,
    elems: usize,
    half: usize,
    size: usize,
}

impl Rounds {
    fn new(len: usize, round_bytes: usize, elem: Elem) -> Self {
        let size = elem.size();
        let elems = (round_bytes / size).max(1);
        Rounds {
            len,
            elems,
            half: elems * size,
            size,
        }
    }

    fn count(&self) -> usize {
        self.len.div_ceil(self.elems)
    }

    fn range(&self, i: usize) -> Range<usize> {
        i * self.elems..((i + 1) * self.elems).min(self.len)
    }

    /// Where element `e` of round `i` sits in a window.
    fn at(&self, i: usize, e: usize) -> usize {
        (i % 2) * self.half + (e - i * self.elems) * self.size
    }

    /// The bytes of the elements `r` in the buffer.
    fn bytes(&self, r: &Range<usize>) -> Range<usize> {
        r.start * self.size..r.end * self.size
    }
}

fn meet(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let s = a.start.max(b.start);
    s..a.end.min(b.end).max(s)
}

/// One mesh collective in progress: what it posted, and what arrived.
struct Mesh<'a, T: Transport> {
    t: &'a mut T,
    op: &'static str,
    seq: u16,
    timeout: Duration,
    /// The buffer's length in bytes, which every rank announces: a peer with another length in
    /// bytes breaks the group.
    bytes: usize,
    elem: Elem,
    peers: Vec<Rank>,
    /// Receives by id: slot and sender. Sends are not tracked past their completion.
    posted: HashMap<ReqId, Option<(u32, Rank)>>,
    arrived: HashSet<(u32, Rank)>,
    /// Published segments not copied yet, in arrival order.
    to_copy: Vec<(usize, Rank)>,
}

/// One mesh collective: the attached buffer's `len` values of type `elem`, `segs` each rank's
/// segment (every rank passes the same), `round` the bytes per round (at most half a window).
pub(super) struct Plan<'a> {
    pub segs: &'a [Range<usize>],
    pub len: usize,
    pub elem: Elem,
    pub phases: Phases,
    pub round: usize,
}

/// Runs one mesh collective on the attached buffer.
pub(super) fn run<T: Transport>(
    t: &mut T,
    op: &'static str,
    seq: u16,
    plan: &Plan,
    timeout: Duration,
) -> Result<(), RuntimeError> {
    let Plan {
        segs,
        len,
        elem,
        phases,
        round,
    } = *plan;
    let rounds = Rounds::new(len, round, elem);
    if rounds.count() * 3 > MAX_SLOTS as usize {
        return Err(RuntimeError::InvalidArgument {
            op,
            reason: format!(
                "{} rounds exceed what a collective may use; raise mesh_round_bytes (at most half \
                 of chunk_bytes x bcast_slots)",
                rounds.count()
            ),
        });
    }
    let me = t.rank();
    let peers = (0..t.world()).map(Rank).filter(|&r| r != me).collect();
    let mut m = Mesh {
        t,
        op,
        seq,
        timeout,
        bytes: len * elem.size(),
        elem,
        peers,
        posted: HashMap::new(),
        arrived: HashSet::new(),
        to_copy: Vec::new(),
    };
    for i in 0..rounds.count() {
        if i >= 2 {
            m.wait_all(i - 2, Kind::Done)?;
        }
        m.round(&rounds, i, segs, phases)?;
    }
    for i in rounds.count().saturating_sub(2)..rounds.count() {
        m.wait_all(i, Kind::Done)?;
    }
    while !m.posted.is_empty() {
        m.wait_one()?;
    }
    Ok(())
}

fn slot(i: usize, k: Kind) -> u32 {
    (i * 3) as u32 + k as u32
}

impl<T: Transport> Mesh<'_, T> {
    fn round(
        &mut self,
        rounds: &Rounds,
        i: usize,
        segs: &[Range<usize>],
        phases: Phases,
    ) -> Result<(), RuntimeError> {
        let me = self.t.rank().0 as usize;
        let range = rounds.range(i);
        let mine = meet(&segs[me], &range);
        let kinds = [
            (phases.reduce, Kind::Ready),
            (phases.gather, Kind::Published),
            (true, Kind::Done),
        ];
        for (on, kind) in kinds {
            if on {
                self.post_recvs(i, kind)?;
            }
        }
        if phases.reduce {
            // Peers read only their own segments: this rank's stays out.
            let parts = if mine.is_empty() {
                [range.clone(), 0..0]
            } else {
                [range.start..mine.start, mine.end..range.end]
            };
            for part in parts {
                if !part.is_empty() {
                    self.t
                        .window_put(rounds.at(i, part.start), rounds.bytes(&part))?;
                }
            }
            self.announce(i, Kind::Ready)?;
            self.wait_all(i, Kind::Ready)?;
            self.reduce(rounds, i, &mine)?;
        }
        if phases.gather {
            if !mine.is_empty() {
                self.t
                    .window_put(rounds.at(i, mine.start), rounds.bytes(&mine))?;
            }
            self.announce(i, Kind::Published)?;
            self.gather(rounds, i, segs)?;
        }
        self.announce(i, Kind::Done)
    }

    fn post_recvs(&mut self, i: usize, kind: Kind) -> Result<(), RuntimeError> {
        let len = if kind == Kind::Done { 0 } else { 8 };
        for p in self.peers.clone() {
            let key = MsgKey {
                seq: self.seq,
                slot: slot(i, kind),
            };
            let id = self.t.recv_owned(p, key, vec![0u8; len])?;
            self.posted.insert(id, Some((key.slot, p)));
        }
        Ok(())
    }

    fn announce(&mut self, i: usize, kind: Kind) -> Result<(), RuntimeError> {
        let body = if kind == Kind::Done {
            Vec::new()
        } else {
            (self.bytes as u64).to_le_bytes().to_vec()
        };
        for p in self.peers.clone() {
            let key = MsgKey {
                seq: self.seq,
                slot: slot(i, kind),
            };
            let id = self.t.send_owned(p, key, body.clone())?;
            self.posted.insert(id, None);
        }
        Ok(())
    }

    /// Waits for one completion and records it; a peer announcing another length breaks the
    /// group (it would read or write past what this rank holds).
    fn wait_one(&mut self) -> Result<(), RuntimeError> {
        let c = self.t.wait_any(self.op, self.timeout)?;
        let Some(Some((slot, from))) = self.posted.remove(&c.id) else {
            return Ok(());
        };
        if slot % 3 != Kind::Done as u32 {
            let got = c.buf.as_deref().and_then(|b| b.try_into().ok());
            let got = got.map_or(0, u64::from_le_bytes);
            if got != self.bytes as u64 {
                return Err(self.t.abort(RuntimeError::MessageLength {
                    from,
                    op: self.op,
                    expected: self.bytes,
                    got: got as usize,
                }));
            }
        }
        if slot % 3 == Kind::Published as u32 {
            self.to_copy.push((slot as usize / 3, from));
        }
        self.arrived.insert((slot, from));
        Ok(())
    }

    fn wait_all(&mut self, i: usize, kind: Kind) -> Result<(), RuntimeError> {
        let s = slot(i, kind);
        while !self.peers.iter().all(|&p| self.arrived.contains(&(s, p))) {
            self.wait_one()?;
        }
        for p in &self.peers {
            self.arrived.remove(&(s, *p));
        }
        Ok(())
    }

    /// Sums this rank's segment of round `i` in the ring's order: the next rank's values, then
    /// each following peer's, then this rank's own (already in the buffer).
    fn reduce(
        &mut self,
        rounds: &Rounds,
        i: usize,
        mine: &Range<usize>,
    ) -> Result<(), RuntimeError> {
        let n = self.t.world() as usize;
        let me = self.t.rank().0 as usize;
        let per = STAGE_BYTES / rounds.size;
        // u64 storage: aligned for every type of values.
        let words = rounds.bytes(&(0..per.min(mine.len()))).end.div_ceil(8);
        let mut acc_words = vec![0u64; words];
        let mut stage_words = acc_words.clone();
        let elem = self.elem;
        let mut at = mine.start;
        while at < mine.end {
            let piece = at..(at + per).min(mine.end);
            let bytes = rounds.bytes(&piece);
            let acc = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut acc_words)[..bytes.len()];
            let stage = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut stage_words)[..bytes.len()];
            let off = rounds.at(i, piece.start);
            self.t.window_read(Rank(((me + 1) % n) as u32), off, acc)?;
            for j in 2..n {
                let from = Rank(((me + j) % n) as u32);
                self.t.window_read(from, off, stage)?;
                elem.add(acc, stage);
            }
            elem.add(self.t.region_mut(bytes)?, acc);
            at = piece.end;
        }
        Ok(())
    }

    /// Copies every peer's segment of round `i` from its window as soon as it is published.
    fn gather(
        &mut self,
        rounds: &Rounds,
        i: usize,
        segs: &[Range<usize>],
    ) -> Result<(), RuntimeError> {
        let range = rounds.range(i);
        let mut copied = 0;
        while copied < self.peers.len() {
            if self.to_copy.is_empty() {
                self.wait_one()?;
                continue;
            }
            let (round, from) = self.to_copy.remove(0);
            debug_assert_eq!(round, i, "a later round published before this one was read");
            let seg = meet(&segs[from.0 as usize], &range);
            if !seg.is_empty() {
                self.t
                    .window_get(from, rounds.at(i, seg.start), rounds.bytes(&seg))?;
            }
            self.arrived.remove(&(slot(i, Kind::Published), from));
            copied += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "mesh_tests.rs"]
mod tests;
