//! [`Group`]: what a training loop needs from one generation's data plane, whatever carries
//! it. The UCX group of a worker process implements it, and so does [`InProcGroup`], whose
//! ranks are threads of one process: the same loop then runs N ranks in a unit test.

use super::collectives::{CollConfig, Collectives};
use super::inproc::{InProcNet, InProcTransport};
use super::links::PeerLink;
use super::ucx::UcxGroup;
use crate::error::RuntimeError;
use crate::ids::{Generation, Rank};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

/// One rank's membership in one generation's group. Every member calls the same operations in
/// the same order (P-2); the first failure breaks the group, which is then dropped.
pub trait Group: Send {
    fn rank(&self) -> Rank;
    fn world(&self) -> u32;
    fn generation(&self) -> Generation;
    /// Element-wise sum over the ranks, in place.
    fn allreduce(&self, buf: &mut Vec<f32>) -> Result<(), RuntimeError>;
    /// Element-wise sum of integers over the ranks, in place. Wrapping, so exact and the same
    /// in any order whenever the true sum fits.
    fn allreduce_i64(&self, buf: &mut Vec<i64>) -> Result<(), RuntimeError>;
    /// The sum over the ranks of segment `rank` of `buf` (`segs`: one contiguous range per
    /// rank, the same plan on every rank), in place; the rest of `buf` is scratch.
    fn reduce_scatter(&self, buf: &mut Vec<f32>, segs: &[Range<usize>])
        -> Result<(), RuntimeError>;
    /// [`Group::reduce_scatter`] of integers, summed as [`Group::allreduce_i64`] does.
    fn reduce_scatter_i64(
        &self,
        buf: &mut Vec<i64>,
        segs: &[Range<usize>],
    ) -> Result<(), RuntimeError>;
    /// Every rank's segment of `buf` to every rank.
    fn allgather(&self, buf: &mut Vec<f32>, segs: &[Range<usize>]) -> Result<(), RuntimeError>;
    /// `root`'s bytes to every rank; the others pass a buffer of the same length.
    fn broadcast(&self, buf: &mut Vec<u8>, root: Rank) -> Result<(), RuntimeError>;
    fn barrier(&self) -> Result<(), RuntimeError>;
    /// `buf` to `to`, each of `senders` sending its stripe.
    fn send_striped(
        &self,
        to: Rank,
        senders: &[Rank],
        buf: &mut Vec<u8>,
    ) -> Result<(), RuntimeError>;
    fn recv_striped(&self, senders: &[Rank], buf: &mut Vec<u8>) -> Result<(), RuntimeError>;
    /// Counts a point-to-point operation this rank takes no part in.
    fn skip(&self) -> Result<(), RuntimeError>;
    /// Time this rank's waits were descheduled: its own slowness, not its peers'.
    fn stalled(&self) -> Duration {
        Duration::ZERO
    }
    /// The transport to each peer, as wired up.
    fn links(&self) -> Vec<PeerLink> {
        Vec::new()
    }

    /// Every rank's `mine`, by rank: a slot per rank of one integer allreduce, exact.
    fn gather_u64(&self, mine: u64) -> Result<Vec<u64>, RuntimeError> {
        let mut slots = vec![0i64; self.world() as usize];
        slots[self.rank().0 as usize] = mine as i64;
        self.allreduce_i64(&mut slots)?;
        Ok(slots.into_iter().map(|v| v as u64).collect())
    }
}

impl Group for UcxGroup {
    fn rank(&self) -> Rank {
        UcxGroup::rank(self)
    }
    fn world(&self) -> u32 {
        UcxGroup::world(self)
    }
    fn generation(&self) -> Generation {
        UcxGroup::generation(self)
    }
    fn allreduce(&self, buf: &mut Vec<f32>) -> Result<(), RuntimeError> {
        UcxGroup::allreduce(self, buf)
    }
    fn allreduce_i64(&self, buf: &mut Vec<i64>) -> Result<(), RuntimeError> {
        UcxGroup::allreduce(self, buf)
    }
    fn reduce_scatter_i64(
        &self,
        buf: &mut Vec<i64>,
        segs: &[Range<usize>],
    ) -> Result<(), RuntimeError> {
        UcxGroup::reduce_scatter(self, buf, segs)
    }
    fn reduce_scatter(
        &self,
        buf: &mut Vec<f32>,
        segs: &[Range<usize>],
    ) -> Result<(), RuntimeError> {
        UcxGroup::reduce_scatter(self, buf, segs)
    }
    fn allgather(&self, buf: &mut Vec<f32>, segs: &[Range<usize>]) -> Result<(), RuntimeError> {
        UcxGroup::allgather(self, buf, segs)
    }
    fn broadcast(&self, buf: &mut Vec<u8>, root: Rank) -> Result<(), RuntimeError> {
        UcxGroup::broadcast(self, buf, root)
    }
    fn barrier(&self) -> Result<(), RuntimeError> {
        UcxGroup::barrier(self)
    }
    fn send_striped(
        &self,
        to: Rank,
        senders: &[Rank],
        buf: &mut Vec<u8>,
    ) -> Result<(), RuntimeError> {
        UcxGroup::send_striped(self, to, senders, buf)
    }
    fn recv_striped(&self, senders: &[Rank], buf: &mut Vec<u8>) -> Result<(), RuntimeError> {
        UcxGroup::recv_striped(self, senders, buf)
    }
    fn skip(&self) -> Result<(), RuntimeError> {
        UcxGroup::skip(self)
    }
    fn stalled(&self) -> Duration {
        UcxGroup::stalled(self)
    }
    fn links(&self) -> Vec<PeerLink> {
        UcxGroup::links(self).to_vec()
    }
}

/// A rank of an in-process group. Dropping it marks the rank dead on its fabric, as a process
/// that closed its endpoints looks to its peers.
pub struct InProcGroup {
    coll: Mutex<Collectives<InProcTransport>>,
    net: InProcNet,
    rank: Rank,
    world: u32,
    generation: Generation,
}

impl InProcGroup {
    pub fn new(
        net: &InProcNet,
        rank: Rank,
        world: u32,
        generation: Generation,
        cfg: CollConfig,
    ) -> Self {
        InProcGroup {
            coll: Mutex::new(Collectives::new(net.endpoint(rank, generation), cfg)),
            net: net.clone(),
            rank,
            world,
            generation,
        }
    }
}

impl Drop for InProcGroup {
    fn drop(&mut self) {
        self.net.kill(self.rank);
    }
}

impl Group for InProcGroup {
    fn rank(&self) -> Rank {
        self.rank
    }
    fn world(&self) -> u32 {
        self.world
    }
    fn generation(&self) -> Generation {
        self.generation
    }
    fn allreduce(&self, buf: &mut Vec<f32>) -> Result<(), RuntimeError> {
        self.coll.lock().allreduce(buf)
    }
    fn allreduce_i64(&self, buf: &mut Vec<i64>) -> Result<(), RuntimeError> {
        self.coll.lock().allreduce(buf)
    }
    fn reduce_scatter_i64(
        &self,
        buf: &mut Vec<i64>,
        segs: &[Range<usize>],
    ) -> Result<(), RuntimeError> {
        self.coll.lock().reduce_scatter(buf, segs)
    }
    fn reduce_scatter(
        &self,
        buf: &mut Vec<f32>,
        segs: &[Range<usize>],
    ) -> Result<(), RuntimeError> {
        self.coll.lock().reduce_scatter(buf, segs)
    }
    fn allgather(&self, buf: &mut Vec<f32>, segs: &[Range<usize>]) -> Result<(), RuntimeError> {
        self.coll.lock().allgather(buf, segs)
    }
    fn broadcast(&self, buf: &mut Vec<u8>, root: Rank) -> Result<(), RuntimeError> {
        self.coll.lock().broadcast(buf, root)
    }
    fn barrier(&self) -> Result<(), RuntimeError> {
        self.coll.lock().barrier()
    }
    fn send_striped(
        &self,
        to: Rank,
        senders: &[Rank],
        buf: &mut Vec<u8>,
    ) -> Result<(), RuntimeError> {
        self.coll.lock().send_striped(to, senders, buf)
    }
    fn recv_striped(&self, senders: &[Rank], buf: &mut Vec<u8>) -> Result<(), RuntimeError> {
        self.coll.lock().recv_striped(senders, buf)
    }
    fn skip(&self) -> Result<(), RuntimeError> {
        self.coll.lock().skip();
        Ok(())
    }
}

/// The fabrics of in-process ranks, one per generation: the first rank to join a generation
/// creates its fabric, the others join it.
#[derive(Default)]
pub struct InProcFabrics {
    nets: Mutex<HashMap<Generation, InProcNet>>,
}

impl InProcFabrics {
    pub fn join(
        &self,
        rank: Rank,
        world: u32,
        generation: Generation,
        cfg: CollConfig,
    ) -> InProcGroup {
        let net = self
            .nets
            .lock()
            .entry(generation)
            .or_insert_with(|| InProcNet::new(world))
            .clone();
        InProcGroup::new(&net, rank, world, generation, cfg)
    }

    /// Marks `rank` of `generation` dead, as a crashed process looks to its peers.
    pub fn kill(&self, rank: Rank, generation: Generation) {
        if let Some(n) = self.nets.lock().get(&generation) {
            n.kill(rank);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The provided gather is exact for any u64 (one slot per rank of an integer allreduce).
    #[test]
    fn gather_u64_is_exact() {
        let fabrics = InProcFabrics::default();
        let values = [u64::MAX, 0, 0x1234_5678_9ABC_DEF0];
        let got: Vec<Vec<u64>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..3u32)
                .map(|r| {
                    let g = fabrics.join(Rank(r), 3, Generation(1), CollConfig::default());
                    sc.spawn(move || g.gather_u64(values[r as usize]).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for g in got {
            assert_eq!(g, values);
        }
    }
}
