//! Bringing every rank to the same committed state (G-2): fingerprints, the healing
//! transfer, the replica check (T-5).

use super::*;

pub(super) fn tensor_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu).view([-1])).unwrap_or_default()
}

/// SHA-256 of parameters and optimizer state: equal on every member at a commit (G-2).
pub fn state_fingerprint(s: &Setup) -> String {
    use sha2::{Digest, Sha256};
    let t = &s.trainer;
    let mut h = Sha256::new();
    for x in [&t.model.params.flat, &t.opt.m, &t.opt.v] {
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
pub(super) fn sync_state(group: &dyn Group, s: &mut Setup) -> Result<Option<Healed>, RuntimeError> {
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
    if holders.len() == 1 {
        transfer_state(group, s, holders[0].0)?;
        return Ok(Some(Healed::From(holders[0].0)));
    }
    let me = group.rank();
    let need = state_len(s);
    // One round per joiner, on every rank, so that the group's operation count stays equal.
    let mut buf = if holders.contains(&me) {
        state_bytes(s)
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
        load_state(s, &buf)?;
    }
    Ok(Some(Healed::Striped(holders.iter().map(|r| r.0).collect())))
}

pub(super) fn state_len(s: &Setup) -> usize {
    3 * s.trainer.model.num_params() as usize * 4 + 16
}

/// Parameters, optimizer moments, step and optimizer step count, little-endian.
pub(super) fn state_bytes(s: &Setup) -> Vec<u8> {
    let t = &s.trainer;
    let mut floats = tensor_vec(&t.model.params.flat);
    floats.extend(tensor_vec(&t.opt.m));
    floats.extend(tensor_vec(&t.opt.v));
    let mut buf: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
    buf.extend(t.step.to_le_bytes());
    buf.extend(t.opt.t.to_le_bytes());
    buf
}

pub(super) fn load_state(s: &mut Setup, buf: &[u8]) -> Result<(), RuntimeError> {
    let need = state_len(s);
    if buf.len() != need {
        return Err(RuntimeError::InvalidArgument {
            op: "state transfer",
            reason: format!("received {} bytes, expected {need}", buf.len()),
        });
    }
    let t = &mut s.trainer;
    let n = t.model.num_params() as usize;
    let floats: Vec<f32> = buf[..3 * n * 4]
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
        t.opt
            .m
            .copy_(&Tensor::from_slice(&floats[n..2 * n]).to_device(dev));
        t.opt
            .v
            .copy_(&Tensor::from_slice(&floats[2 * n..]).to_device(dev));
    });
    let tail = &buf[3 * n * 4..];
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
) -> Result<(), RuntimeError> {
    let mut buf = if group.rank().0 == leader {
        state_bytes(s)
    } else {
        // Every rank passes a buffer of the broadcast's size.
        vec![0u8; state_len(s)]
    };
    group.broadcast(&mut buf, Rank(leader))?;
    if group.rank().0 != leader {
        load_state(s, &buf)?;
    }
    Ok(())
}

/// A 64-bit digest of parameters and optimizer state, for the periodic cross-rank comparison
/// (fixed, so every build of phalanx computes the same value).
pub fn quick_fingerprint(s: &Setup) -> u64 {
    let t = &s.trainer;
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for x in [&t.model.params.flat, &t.opt.m, &t.opt.v] {
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
pub(super) fn check_replicas(group: &dyn Group, s: &mut Setup) -> Result<Vec<u32>, RuntimeError> {
    let digests = group.gather_u64(quick_fingerprint(s))?;
    let (odd, leader) = odd_ranks(&digests);
    if !odd.is_empty() {
        transfer_state(group, s, leader)?;
    }
    Ok(odd)
}
