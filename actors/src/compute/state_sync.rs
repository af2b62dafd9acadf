//! Bringing every rank to the same committed state (G-2): fingerprints, the healing
//! transfer, the replica check (T-5).

use super::*;

pub(super) fn tensor_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu).view([-1])).unwrap_or_default()
}

/// The state every member holds alike: parameters and, unless ZeRO-1 shards them, the
/// optimizer moments.
fn replicated(s: &Setup, zero: bool) -> Vec<&Tensor> {
    let t = &s.trainer;
    if zero {
        vec![&t.model.params.flat]
    } else {
        vec![&t.model.params.flat, &t.opt.m, &t.opt.v]
    }
}

/// SHA-256 of the replicated state: equal on every member at a commit (G-2).
pub fn state_fingerprint(s: &Setup, zero: bool) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for x in replicated(s, zero) {
        for f in tensor_vec(x) {
            h.update(f.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// How a rank of a new generation got the committed state (logged, and it names the lowest
/// rank that held it).
#[derive(Debug)]
pub(super) enum Healed {
    /// Broadcast from the one rank that held it.
    From(u32),
    /// Each holder sent a stripe to every rank that lacked it.
    Striped(Vec<u32>),
}

/// Brings every rank of a new generation to the committed state of the most advanced ones:
/// the ranks learn each other's step (an allreduce of one-hot steps); if they differ, the
/// ranks at the highest step send parameters, optimizer state and step to the others, striped
/// over all of them when there are several (a joiner then pulls from every holder at once),
/// broadcast from the one otherwise.
pub(super) fn sync_state(
    group: &dyn Group,
    s: &mut Setup,
    zero: bool,
) -> Result<Option<Healed>, RuntimeError> {
    let world = group.world() as usize;
    let all = group.gather_u64(s.trainer.step)?;
    let max = *all.iter().max().unwrap_or(&0);
    if all.iter().all(|&x| x == max) {
        return Ok(None);
    }
    let holders: Vec<Rank> = (0..world as u32)
        .filter(|&r| all[r as usize] == max)
        .map(Rank)
        .collect();
    let me = group.rank();
    if holders.len() == 1 {
        transfer_state(group, s, holders[0].0, zero)?;
        forget_moments(s, zero, !holders.contains(&me));
        return Ok(Some(Healed::From(holders[0].0)));
    }
    let need = state_len(s, zero);
    // One round per joiner, on every rank, so that the group's operation count stays equal.
    let mut buf = if holders.contains(&me) {
        state_bytes(s, zero)
    } else {
        vec![0u8; need]
    };
    for j in (0..world as u32).map(Rank).filter(|r| !holders.contains(r)) {
        if holders.contains(&me) {
            group.send_striped(j, &holders, &mut buf)?;
        } else if j == me {
            group.recv_striped(&holders, &mut buf)?;
        } else {
            group.skip()?;
        }
    }
    if !holders.contains(&me) {
        load_state(s, &buf, zero)?;
    }
    forget_moments(s, zero, !holders.contains(&me));
    Ok(Some(Healed::Striped(holders.iter().map(|r| r.0).collect())))
}

/// Z-2: a healed rank's own ZeRO-1 moments are of an older step (or none), though its update
/// count is now the holders': it holds no moments until the reshard gives it its shard.
fn forget_moments(s: &mut Setup, zero: bool, healed: bool) {
    if zero && healed {
        s.trainer.opt.set_shard(0..0, &[], &[]);
    }
}

/// Bytes of a state transfer: the replicated tensors, step and optimizer step count.
pub(super) fn state_len(s: &Setup, zero: bool) -> usize {
    let tensors = if zero { 1 } else { 3 };
    tensors * s.trainer.model.num_params() as usize * 4 + 16
}

/// The replicated tensors, step and optimizer step count, little-endian (ZeRO-1's moments
/// move in their own plan, Z-2).
pub(super) fn state_bytes(s: &Setup, zero: bool) -> Vec<u8> {
    let t = &s.trainer;
    let floats: Vec<f32> = replicated(s, zero)
        .into_iter()
        .flat_map(tensor_vec)
        .collect();
    let mut buf: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
    buf.extend(t.step.to_le_bytes());
    buf.extend(t.opt.t.to_le_bytes());
    buf
}

pub(super) fn load_state(s: &mut Setup, buf: &[u8], zero: bool) -> Result<(), RuntimeError> {
    let need = state_len(s, zero);
    if buf.len() != need {
        return Err(RuntimeError::InvalidArgument {
            op: "state transfer",
            reason: format!("received {} bytes, expected {need}", buf.len()),
        });
    }
    let t = &mut s.trainer;
    let n = t.model.num_params() as usize;
    let floats: Vec<f32> = buf[..need - 16]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    tch::no_grad(|| {
        let dev = t.model.device();
        t.model
            .params
            .flat
            .shallow_clone()
            .copy_(&Tensor::from_slice(&floats[..n]).to_device(dev));
        if !zero {
            t.opt
                .m
                .copy_(&Tensor::from_slice(&floats[n..2 * n]).to_device(dev));
            t.opt
                .v
                .copy_(&Tensor::from_slice(&floats[2 * n..]).to_device(dev));
        }
    });
    let tail = &buf[need - 16..];
    t.step = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes"));
    t.opt.t = u64::from_le_bytes(tail[8..16].try_into().expect("8 bytes"));
    t.model.params.zero_grads();
    Ok(())
}

/// `leader` broadcasts parameters, optimizer state and step; every other rank takes them.
pub(super) fn transfer_state(
    group: &dyn Group,
    s: &mut Setup,
    leader: u32,
    zero: bool,
) -> Result<(), RuntimeError> {
    let mut buf = if group.rank().0 == leader {
        state_bytes(s, zero)
    } else {
        // Every rank passes a buffer of the broadcast's size.
        vec![0u8; state_len(s, zero)]
    };
    group.broadcast(&mut buf, Rank(leader))?;
    if group.rank().0 != leader {
        load_state(s, &buf, zero)?;
    }
    Ok(())
}

/// A 64-bit digest of parameters and optimizer state, for the periodic cross-rank comparison
/// (fixed, so every build of phalanx computes the same value).
pub fn quick_fingerprint(s: &Setup, zero: bool) -> u64 {
    let t = &s.trainer;
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for x in replicated(s, zero) {
        for f in tensor_vec(x) {
            h = (h.rotate_left(5) ^ f.to_bits() as u64).wrapping_mul(0x0100_0000_01B3);
        }
    }
    h ^ t.step
}

/// The ranks whose digest differs from the majority's, and the rank to heal them from. Without
/// a strict majority the lowest rank's digest is taken as the reference.
pub fn odd_ranks(digests: &[u64]) -> (Vec<u32>, u32) {
    let mut counts: std::collections::BTreeMap<u64, usize> = Default::default();
    for d in digests {
        *counts.entry(*d).or_default() += 1;
    }
    let reference = counts
        .iter()
        .find(|(_, &c)| c * 2 > digests.len())
        .map_or(digests.first().copied().unwrap_or(0), |(d, _)| *d);
    let odd = (0..digests.len() as u32)
        .filter(|&r| digests[r as usize] != reference)
        .collect();
    let leader = digests.iter().position(|d| *d == reference).unwrap_or(0) as u32;
    (odd, leader)
}

/// Silent-data-corruption check: every rank's digest goes to every rank; ranks that differ
/// from the majority are named and healed from it.
pub(super) fn check_replicas(
    group: &dyn Group,
    s: &mut Setup,
    zero: bool,
) -> Result<Vec<u32>, RuntimeError> {
    let digests = group.gather_u64(quick_fingerprint(s, zero))?;
    let (odd, leader) = odd_ranks(&digests);
    if !odd.is_empty() {
        transfer_state(group, s, leader, zero)?;
    }
    Ok(odd)
}
