//! Collectives over any [`Transport`]: ring allreduce (reduce-scatter + allgather, chunked and
//! pipelined), reduce-scatter, allgather, broadcast (through the root's shared-memory window
//! when every receiver can map it, else a pipelined chain), dissemination barrier, and striped
//! point-to-point transfer of large buffers.
//!
//! Every collective is a *schedule*: the ordered list of chunk messages this rank sends and
//! receives, each send naming the receive it depends on. One engine runs every schedule with a
//! window of `window` sends and `window` receives in flight, so memory is bounded and the next
//! step of the ring starts on a chunk as soon as that chunk arrives (the pipeline). Sends and
//! most receives touch the caller's buffer directly (zero copy); only the reduce-scatter's
//! receives land in staging buffers (`window` of `chunk_bytes` each), to be added in.

use super::mesh;
use super::transport::*;
use crate::error::RuntimeError;
use crate::ids::Rank;
use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

/// Tuning of the collectives. Defaults and the reasons for them: docs/dataplane.md.
#[derive(Debug, Clone)]
pub struct CollConfig {
    /// Bytes per message. Large enough to amortise the per-message cost, small enough that a
    /// ring step pipelines.
    pub chunk_bytes: usize,
    /// Sends and receives in flight per schedule.
    pub window: usize,
    /// An operation fails when no message completes for this long (a stopped or partitioned
    /// peer makes no progress; a slow but live one does).
    pub timeout: Duration,
    /// Slots of `chunk_bytes` in the shared-memory window a broadcast root stages its data in
    /// (when every receiver can map it): the root runs at most this many chunks ahead of the
    /// slowest receiver.
    pub bcast_slots: usize,
    /// Allreduce, reduce-scatter and allgather through every rank's shared-memory window when
    /// all ranks can map each other's (one node); off: always the ring.
    pub mesh: bool,
    /// Bytes of the buffer a mesh collective moves per round (at most half the window): small
    /// enough that what a rank puts in its window is still in the shared cache when its peers
    /// read it.
    pub mesh_round_bytes: usize,
}

impl Default for CollConfig {
    fn default() -> Self {
        CollConfig {
            chunk_bytes: 1 << 20,
            window: 4,
            timeout: Duration::from_secs(2),
            bcast_slots: 8,
            // Off until a rank throttled to a CPU quota is shown not to hold every round up
            // (the rebalanced straggler test ran no faster than the unbalanced job with it on).
            mesh: false,
            mesh_round_bytes: 256 << 10,
        }
    }
}

#[derive(Debug, Clone)]
struct SendItem {
    to: Rank,
    slot: u32,
    range: Range<usize>,
    /// Index of the receive that must have landed (and been reduced) first.
    dep: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Receive straight into the buffer.
    Direct,
    /// Receive into staging, then add into the buffer.
    Reduce,
}

#[derive(Debug, Clone)]
struct RecvItem {
    from: Rank,
    slot: u32,
    range: Range<usize>,
    action: Action,
    /// Index of a send reading the same bytes that must complete before this receive may
    /// overwrite them.
    after: Option<usize>,
}

#[derive(Debug, Default)]
struct Schedule {
    sends: Vec<SendItem>,
    recvs: Vec<RecvItem>,
    /// How many peers send to this rank at once (scales the receive window).
    sources: usize,
    /// What a `Reduce` receive adds.
    elem: Elem,
}

/// Near-equal contiguous segments of `len` elements, one per rank of `n` (the allreduce's).
pub fn even_segments(len: usize, n: usize) -> Vec<Range<usize>> {
    (0..n).map(|k| part(len, n, k)).collect()
}

fn chunks(r: Range<usize>, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk.max(1);
    (r.start..r.end)
        .step_by(chunk)
        .map(move |s| s..(s + chunk).min(r.end))
}

fn byte_range(elems: Range<usize>, size: usize) -> Range<usize> {
    elems.start * size..elems.end * size
}

/// The ring schedule of rank `r` in a world of `n` over `len` elements of type `elem`.
/// Segment `k` ends up reduced on rank `k` (its owner); the reduce-scatter passes it around the
/// ring starting at `k + 1`, each rank adding its own values, so segment `k` is summed in the
/// order `k+1, k+2, ..., k`. The allgather then ships the owner's bytes to everyone, which is
/// why every rank ends with bitwise the same result (P-2).
fn ring_schedule(
    r: usize,
    segs: &[Range<usize>],
    elem: Elem,
    chunk: usize,
    rs: bool,
    ag: bool,
) -> Schedule {
    let n = segs.len();
    let mut s = Schedule {
        sources: 1,
        elem,
        ..Default::default()
    };
    if n < 2 {
        return s;
    }
    let elem = elem.size();
    let seg = |k: usize| byte_range(segs[k % n].clone(), elem);
    let right = Rank(((r + 1) % n) as u32);
    let left = Rank(((r + n - 1) % n) as u32);
    // Chunk boundaries must fall on element boundaries.
    let chunk = (chunk / elem).max(1) * elem;
    let mut prev: Vec<usize> = Vec::new();
    // rs_sends[step][c]: the reduce-scatter send that reads the bytes the allgather's receive
    // of the same step and chunk will overwrite.
    let mut rs_sends: Vec<Vec<usize>> = Vec::new();
    if rs {
        for step in 0..n - 1 {
            let mut these = Vec::new();
            for (c, range) in chunks(seg(r + 2 * n - 1 - step), chunk).enumerate() {
                let dep = if step == 0 { None } else { Some(prev[c]) };
                let slot = s.sends.len() as u32;
                these.push(s.sends.len());
                s.sends.push(SendItem {
                    to: right,
                    slot,
                    range,
                    dep,
                });
            }
            rs_sends.push(these);
            prev.clear();
            for range in chunks(seg(r + 2 * n - 2 - step), chunk) {
                prev.push(s.recvs.len());
                let slot = s.recvs.len() as u32;
                s.recvs.push(RecvItem {
                    from: left,
                    slot,
                    range,
                    action: Action::Reduce,
                    after: None,
                });
            }
        }
    }
    for step in 0..if ag { n - 1 } else { 0 } {
        for (c, range) in chunks(seg(r + n - step), chunk).enumerate() {
            let dep = if step == 0 && !rs {
                None
            } else {
                Some(prev[c])
            };
            let slot = s.sends.len() as u32;
            s.sends.push(SendItem {
                to: right,
                slot,
                range,
                dep,
            });
        }
        prev.clear();
        for (c, range) in chunks(seg(r + 2 * n - 1 - step), chunk).enumerate() {
            prev.push(s.recvs.len());
            let slot = s.recvs.len() as u32;
            let after = rs_sends.get(step).map(|v| v[c]);
            s.recvs.push(RecvItem {
                from: left,
                slot,
                range,
                action: Action::Direct,
                after,
            });
        }
    }
    s
}

/// A chain from `root`: each rank receives every chunk from its predecessor straight into its
/// buffer and forwards it to its successor as soon as it has landed.
fn chain_schedule(n: usize, r: usize, root: usize, len: usize, chunk: usize) -> Schedule {
    let mut s = Schedule {
        sources: 1,
        ..Default::default()
    };
    if n < 2 {
        return s;
    }
    let pos = (r + n - root) % n;
    let next = Rank(((r + 1) % n) as u32);
    let prev = Rank(((r + n - 1) % n) as u32);
    for (c, range) in chunks(0..len, chunk).enumerate() {
        if pos > 0 {
            s.recvs.push(RecvItem {
                from: prev,
                slot: c as u32,
                range: range.clone(),
                action: Action::Direct,
                after: None,
            });
        }
        if pos < n - 1 {
            let dep = (pos > 0).then_some(c);
            s.sends.push(SendItem {
                to: next,
                slot: c as u32,
                range,
                dep,
            });
        }
    }
    s
}

/// Dissemination barrier: round `k` signals `r + 2^k` and waits for `r - 2^k`; after
/// `ceil(log2 n)` rounds every rank has (transitively) heard from every other.
fn barrier_schedule(n: usize, r: usize) -> Schedule {
    let mut s = Schedule {
        sources: 1,
        ..Default::default()
    };
    let mut d = 1;
    let mut k = 0u32;
    while d < n {
        s.sends.push(SendItem {
            to: Rank(((r + d) % n) as u32),
            slot: k,
            range: 0..0,
            dep: k.checked_sub(1).map(|p| p as usize),
        });
        s.recvs.push(RecvItem {
            from: Rank(((r + n - d) % n) as u32),
            slot: k,
            range: 0..0,
            action: Action::Direct,
            after: None,
        });
        d *= 2;
        k += 1;
    }
    s
}

/// The sender side of a striped transfer: stripe `index` of `senders.len()` stripes of `len`.
fn stripe_send_schedule(
    to: Rank,
    index: usize,
    stripes: usize,
    len: usize,
    chunk: usize,
) -> Schedule {
    let mut s = Schedule {
        sources: 1,
        ..Default::default()
    };
    for (c, range) in chunks(part(len, stripes, index), chunk).enumerate() {
        s.sends.push(SendItem {
            to,
            slot: c as u32,
            range,
            dep: None,
        });
    }
    s
}

/// The receiver side: every sender's stripe, interleaved chunk by chunk so all senders stream
/// at once.
fn stripe_recv_schedule(senders: &[Rank], len: usize, chunk: usize) -> Schedule {
    let mut s = Schedule {
        sources: senders.len().max(1),
        ..Default::default()
    };
    let per: Vec<Vec<Range<usize>>> = (0..senders.len())
        .map(|i| chunks(part(len, senders.len(), i), chunk).collect())
        .collect();
    let most = per.iter().map(Vec::len).max().unwrap_or(0);
    for c in 0..most {
        for (i, from) in senders.iter().enumerate() {
            if let Some(range) = per[i].get(c) {
                s.recvs.push(RecvItem {
                    from: *from,
                    slot: c as u32,
                    range: range.clone(),
                    action: Action::Direct,
                    after: None,
                });
            }
        }
    }
    s
}

#[derive(Clone, Copy)]
enum Posted {
    Send(usize),
    Recv(usize),
}

/// Runs one schedule to completion on the attached buffer.
fn run<T: Transport>(
    t: &mut T,
    op: &'static str,
    seq: u16,
    s: &Schedule,
    cfg: &CollConfig,
) -> Result<(), RuntimeError> {
    if s.sends.len() as u64 > MAX_SLOTS as u64 || s.recvs.len() as u64 > MAX_SLOTS as u64 {
        return Err(RuntimeError::InvalidArgument {
            op,
            reason: format!(
                "{} messages exceed the {MAX_SLOTS} a collective may use; raise chunk_bytes (now {})",
                s.sends.len().max(s.recvs.len()),
                cfg.chunk_bytes
            ),
        });
    }
    let window = cfg.window.max(1);
    let recv_window = window * s.sources.max(1);
    let mut posted: HashMap<ReqId, Posted> = HashMap::new();
    let mut landed = vec![false; s.recvs.len()];
    let mut sent = vec![false; s.sends.len()];
    let (mut next_send, mut next_recv) = (0, 0);
    let (mut sends_out, mut recvs_out, mut sends_done, mut recvs_done) = (0, 0, 0, 0);
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut to_reduce: Vec<(usize, Vec<u8>)> = Vec::new();
    loop {
        // Adds staged chunks whose region no send is reading any more.
        let mut i = 0;
        while i < to_reduce.len() {
            let idx = to_reduce[i].0;
            let range = s.recvs[idx].range.clone();
            if t.busy(&range, true) {
                i += 1;
                continue;
            }
            let (idx, staged) = to_reduce.swap_remove(i);
            s.elem.add(t.region_mut(range)?, &staged);
            pool.push(staged);
            landed[idx] = true;
            recvs_done += 1;
        }
        while next_recv < s.recvs.len() && recvs_out < recv_window {
            let it = &s.recvs[next_recv];
            if it.after.is_some_and(|i| !sent[i]) {
                break;
            }
            let key = MsgKey { seq, slot: it.slot };
            let id = match it.action {
                Action::Direct => {
                    if t.busy(&it.range, true) {
                        break;
                    }
                    t.recv_region(it.from, key, it.range.clone())?
                }
                Action::Reduce => {
                    let mut b = pool.pop().unwrap_or_default();
                    b.resize(it.range.len(), 0);
                    t.recv_owned(it.from, key, b)?
                }
            };
            posted.insert(id, Posted::Recv(next_recv));
            next_recv += 1;
            recvs_out += 1;
        }
        while next_send < s.sends.len() && sends_out < window {
            let it = &s.sends[next_send];
            if it.dep.is_some_and(|d| !landed[d]) || t.busy(&it.range, false) {
                break;
            }
            let id = t.send_region(it.to, MsgKey { seq, slot: it.slot }, it.range.clone())?;
            posted.insert(id, Posted::Send(next_send));
            next_send += 1;
            sends_out += 1;
        }
        if sends_done == s.sends.len() && recvs_done == s.recvs.len() {
            return Ok(());
        }
        let c = t.wait_any(op, cfg.timeout)?;
        match posted.remove(&c.id) {
            Some(Posted::Send(i)) => {
                sent[i] = true;
                sends_out -= 1;
                sends_done += 1;
            }
            Some(Posted::Recv(idx)) => {
                recvs_out -= 1;
                match c.buf {
                    Some(staged) => to_reduce.push((idx, staged)),
                    None => {
                        landed[idx] = true;
                        recvs_done += 1;
                    }
                }
            }
            // A completion this schedule did not post (e.g. an owned buffer the transport
            // hands back late): nothing to account.
            None => {}
        }
    }
}

/// Posts owned sends and receives of small messages and waits for all of them; returns the
/// received buffers in the order of `recvs`.
pub(super) fn exchange<T: Transport>(
    t: &mut T,
    op: &'static str,
    seq: u16,
    sends: Vec<(Rank, u32, Vec<u8>)>,
    recvs: &[(Rank, u32, usize)],
    timeout: Duration,
) -> Result<Vec<Vec<u8>>, RuntimeError> {
    let mut posted: HashMap<ReqId, Option<usize>> = HashMap::new();
    for (i, &(from, slot, len)) in recvs.iter().enumerate() {
        let id = t.recv_owned(from, MsgKey { seq, slot }, vec![0u8; len])?;
        posted.insert(id, Some(i));
    }
    for (to, slot, b) in sends {
        posted.insert(t.send_owned(to, MsgKey { seq, slot }, b)?, None);
    }
    let mut out = vec![Vec::new(); recvs.len()];
    while !posted.is_empty() {
        let c = t.wait_any(op, timeout)?;
        if let Some(Some(i)) = posted.remove(&c.id) {
            out[i] = c.buf.unwrap_or_default();
        }
    }
    Ok(out)
}

/// The window offer a root sends every receiver: key length (`u32::MAX`: no window), window
/// size, key; padded to a fixed length so that it is received like any fixed-size message.
pub(super) const OFFER_LEN: usize = 4096;
const OFFER_HEAD: usize = 12;
const SLOT_OFFER: u32 = 0;
const SLOT_REPLY: u32 = 1;
const SLOT_VERDICT: u32 = 2;

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

/// A window offer: the key of a window of `bytes` (`None`: this rank has no window).
pub(super) fn offer(key: Option<&[u8]>, bytes: usize) -> Vec<u8> {
    let mut offer = vec![0u8; OFFER_LEN];
    match key {
        Some(k) if k.len() <= OFFER_LEN - OFFER_HEAD => {
            offer[0..4].copy_from_slice(&(k.len() as u32).to_le_bytes());
            offer[4..12].copy_from_slice(&(bytes as u64).to_le_bytes());
            offer[OFFER_HEAD..OFFER_HEAD + k.len()].copy_from_slice(k);
        }
        _ => offer[0..4].copy_from_slice(&u32::MAX.to_le_bytes()),
    }
    offer
}

/// The key in an offer, if it offers a window of `bytes`.
pub(super) fn offered_key(offer: &[u8], bytes: usize) -> Option<&[u8]> {
    match (u32_at(offer, 0), u64_at(offer, 4)) {
        (Some(len), Some(size)) if len != u32::MAX && size == bytes as u64 => {
            offer.get(OFFER_HEAD..OFFER_HEAD + len as usize)
        }
        _ => None,
    }
}

/// Decides, once per root and group, whether `root`'s broadcasts go through its shared-memory
/// window: the root offers its window, every receiver tries to map it and answers, and the
/// root announces the verdict (yes only if every receiver mapped it), so all ranks agree.
fn negotiate_window<T: Transport>(
    t: &mut T,
    seq: u16,
    root: Rank,
    bytes: usize,
    timeout: Duration,
) -> Result<bool, RuntimeError> {
    let op = "broadcast";
    let (n, me) = (t.world(), t.rank());
    if me == root {
        let key = t.window_key(bytes)?;
        let offer = offer(key.as_deref(), bytes);
        let peers: Vec<Rank> = (0..n).map(Rank).filter(|&r| r != me).collect();
        let sends = peers
            .iter()
            .map(|&p| (p, SLOT_OFFER, offer.clone()))
            .collect();
        let recvs: Vec<_> = peers.iter().map(|&p| (p, SLOT_REPLY, 4)).collect();
        let replies = exchange(t, op, seq, sends, &recvs, timeout)?;
        let yes = key.is_some() && replies.iter().all(|r| u32_at(r, 0) == Some(1));
        let verdict = u32::from(yes).to_le_bytes().to_vec();
        let sends = peers
            .iter()
            .map(|&p| (p, SLOT_VERDICT, verdict.clone()))
            .collect();
        exchange(t, op, seq, sends, &[], timeout)?;
        Ok(yes)
    } else {
        let offer = exchange(
            t,
            op,
            seq,
            Vec::new(),
            &[(root, SLOT_OFFER, OFFER_LEN)],
            timeout,
        )?
        .pop()
        .unwrap_or_default();
        let mapped = offered_key(&offer, bytes).is_some_and(|k| t.window_map(root, k));
        let reply = u32::from(mapped).to_le_bytes().to_vec();
        let verdict = exchange(
            t,
            op,
            seq,
            vec![(root, SLOT_REPLY, reply)],
            &[(root, SLOT_VERDICT, 4)],
            timeout,
        )?
        .pop()
        .unwrap_or_default();
        Ok(u32_at(&verdict, 0) == Some(1))
    }
}

/// How a window broadcast cuts `len` bytes into chunks and window slots.
struct WindowPlan {
    seq: u16,
    len: usize,
    chunk: usize,
    slots: usize,
    nchunks: usize,
}

impl WindowPlan {
    fn new(seq: u16, len: usize, cfg: &CollConfig) -> Self {
        let chunk = cfg.chunk_bytes.max(1);
        WindowPlan {
            seq,
            len,
            chunk,
            slots: cfg.bcast_slots.max(1),
            nchunks: len.div_ceil(chunk),
        }
    }

    /// The bytes of chunk `c` in the buffer.
    fn range(&self, c: usize) -> Range<usize> {
        c * self.chunk..((c + 1) * self.chunk).min(self.len)
    }

    /// Where chunk `c` is staged in the window.
    fn at(&self, c: usize) -> usize {
        (c % self.slots) * self.chunk
    }

    /// The announcement (root to receiver) and acknowledgement (back) of chunk `c`.
    fn key(&self, c: usize) -> MsgKey {
        MsgKey {
            seq: self.seq,
            slot: c as u32,
        }
    }
}

/// Broadcast through the root's shared-memory window: the root copies chunk `c` into slot
/// `c % slots` of its window and announces it (a message carrying the total length) to every
/// receiver; each receiver copies the chunk straight from the root's window into its buffer and
/// acknowledges it. A slot is rewritten only once every receiver has acknowledged its previous
/// chunk. One copy per receiver (plus the root's one into the window), all receivers at once,
/// instead of a chain of two copies per hop through the transport's bounce buffers.
fn window_broadcast<T: Transport>(
    t: &mut T,
    seq: u16,
    root: Rank,
    len: usize,
    cfg: &CollConfig,
) -> Result<(), RuntimeError> {
    let plan = WindowPlan::new(seq, len, cfg);
    if t.rank() != root {
        return window_receive(t, root, &plan, cfg.timeout);
    }
    // The root only waits for acknowledgements: the work is the receivers' copies, which a
    // spinning root would slow down when ranks share cores.
    t.patient(true);
    let res = window_send(t, &plan, cfg.timeout);
    t.patient(false);
    res
}

fn window_send<T: Transport>(
    t: &mut T,
    plan: &WindowPlan,
    timeout: Duration,
) -> Result<(), RuntimeError> {
    let me = t.rank();
    let peers: Vec<Rank> = (0..t.world()).map(Rank).filter(|&r| r != me).collect();
    let announce = (plan.len as u64).to_le_bytes().to_vec();
    // Some(c): the acknowledgement of chunk c; None: an announcement.
    let mut posted: HashMap<ReqId, Option<usize>> = HashMap::new();
    let mut acks = vec![0usize; plan.nchunks];
    let (mut next, mut complete) = (0, 0);
    loop {
        while next < plan.nchunks && (next < plan.slots || acks[next - plan.slots] == peers.len()) {
            t.window_put(plan.at(next), plan.range(next))?;
            for &p in &peers {
                posted.insert(t.recv_owned(p, plan.key(next), Vec::new())?, Some(next));
                posted.insert(t.send_owned(p, plan.key(next), announce.clone())?, None);
            }
            next += 1;
        }
        if complete == plan.nchunks && posted.is_empty() {
            return Ok(());
        }
        let c = t.wait_any("broadcast", timeout)?;
        if let Some(Some(ch)) = posted.remove(&c.id) {
            acks[ch] += 1;
            if acks[ch] == peers.len() {
                complete += 1;
            }
        }
    }
}

fn window_receive<T: Transport>(
    t: &mut T,
    root: Rank,
    plan: &WindowPlan,
    timeout: Duration,
) -> Result<(), RuntimeError> {
    // Some(c): the announcement of chunk c; None: an acknowledgement.
    let mut posted: HashMap<ReqId, Option<usize>> = HashMap::new();
    let (mut next_post, mut done) = (0, 0);
    while next_post < plan.nchunks.min(plan.slots) {
        posted.insert(
            t.recv_owned(root, plan.key(next_post), vec![0u8; 8])?,
            Some(next_post),
        );
        next_post += 1;
    }
    while done < plan.nchunks || !posted.is_empty() {
        let c = t.wait_any("broadcast", timeout)?;
        let Some(Some(ch)) = posted.remove(&c.id) else {
            continue;
        };
        let got = c.buf.as_deref().and_then(|b| u64_at(b, 0)).unwrap_or(0);
        if got != plan.len as u64 {
            return Err(t.abort(RuntimeError::MessageLength {
                from: root,
                op: "broadcast",
                expected: plan.len,
                got: got as usize,
            }));
        }
        t.window_get(root, plan.at(ch), plan.range(ch))?;
        posted.insert(t.send_owned(root, plan.key(ch), Vec::new())?, None);
        done += 1;
        if next_post < plan.nchunks {
            posted.insert(
                t.recv_owned(root, plan.key(next_post), vec![0u8; 8])?,
                Some(next_post),
            );
            next_post += 1;
        }
    }
    Ok(())
}

/// A collective that adds or gathers values (see [`Collectives::allreduce`] and the others).
#[derive(Debug, Clone)]
pub enum Reduction {
    All,
    /// One contiguous range per rank, in rank order, the same plan on every rank.
    Scatter(Vec<Range<usize>>),
    Gather(Vec<Range<usize>>),
}

impl Reduction {
    fn op(&self) -> &'static str {
        match self {
            Reduction::All => "allreduce",
            Reduction::Scatter(_) => "reduce_scatter",
            Reduction::Gather(_) => "allgather",
        }
    }

    fn phases(&self) -> mesh::Phases {
        mesh::Phases {
            reduce: !matches!(self, Reduction::Gather(_)),
            gather: !matches!(self, Reduction::Scatter(_)),
        }
    }
}

/// The collectives of one group, over one transport.
pub struct Collectives<T: Transport> {
    t: T,
    cfg: CollConfig,
    seq: u16,
    /// Per broadcast root: whether its broadcasts go through its shared-memory window (decided
    /// by [`negotiate_window`] at its first broadcast in this group).
    windows: HashMap<Rank, bool>,
    /// Broadcasts that went through a window.
    window_bcasts: u64,
    /// Whether allreduce, reduce-scatter and allgather go through every rank's window (decided
    /// by [`mesh::negotiate`] at the first of them in this group).
    mesh: Option<bool>,
    /// Collectives so far that went through the windows.
    mesh_ops: u64,
}

impl<T: Transport> Collectives<T> {
    pub fn new(t: T, cfg: CollConfig) -> Self {
        Collectives {
            t,
            cfg,
            seq: 0,
            windows: HashMap::new(),
            window_bcasts: 0,
            mesh: None,
            mesh_ops: 0,
        }
    }

    pub fn transport(&self) -> &T {
        &self.t
    }

    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.t
    }

    pub fn config(&self) -> &CollConfig {
        &self.cfg
    }

    /// Whether `root`'s broadcasts go through its shared-memory window (`None`: not decided
    /// yet, i.e. no broadcast from `root` in this group so far).
    pub fn window_broadcast(&self, root: Rank) -> Option<bool> {
        self.windows.get(&root).copied()
    }

    /// Broadcasts so far that went through the root's shared-memory window.
    pub fn window_broadcasts(&self) -> u64 {
        self.window_bcasts
    }

    /// Whether this group's allreduce, reduce-scatter and allgather go through shared memory
    /// (`None`: not decided yet).
    pub fn mesh(&self) -> Option<bool> {
        self.mesh
    }

    /// Allreduces, reduce-scatters and allgathers so far that went through shared memory.
    pub fn mesh_collectives(&self) -> u64 {
        self.mesh_ops
    }

    pub fn rank(&self) -> Rank {
        self.t.rank()
    }

    /// The size of every rank's shared-memory window (one per rank and group, for broadcasts
    /// and the mesh alike).
    fn window_bytes(&self) -> usize {
        self.cfg.bcast_slots.max(1) * self.cfg.chunk_bytes.max(1)
    }

    /// A mesh round's bytes: as configured, at most half the window.
    fn mesh_round(&self) -> usize {
        self.cfg.mesh_round_bytes.min(self.window_bytes() / 2)
    }

    /// Whether the mesh path is taken, negotiated at the first call in the group. Every rank
    /// decides whether to negotiate from the world and the config alone, so all ask together.
    fn use_mesh(&mut self) -> Result<bool, RuntimeError> {
        let small = self.mesh_round() < mesh::MIN_ROUND_BYTES;
        if !self.cfg.mesh || self.t.world() < 2 || small {
            return Ok(false);
        }
        if let Some(yes) = self.mesh {
            return Ok(yes);
        }
        let (seq, bytes) = (self.next_seq(), self.window_bytes());
        let yes = mesh::negotiate(&mut self.t, seq, bytes, self.cfg.timeout)?;
        self.mesh = Some(yes);
        Ok(yes)
    }

    /// A mesh collective on the attached buffer: `Ok(None)` when the group does not use the
    /// mesh.
    fn run_mesh(
        &mut self,
        op: &'static str,
        (buf, elem): (OpBuf, Elem),
        segs: &[Range<usize>],
        phases: mesh::Phases,
    ) -> (OpBuf, Result<Option<()>, RuntimeError>) {
        match self.use_mesh() {
            Ok(true) => {}
            Ok(false) => return (buf, Ok(None)),
            Err(e) => return (buf, Err(e)),
        }
        let plan = mesh::Plan {
            segs,
            len: buf.bytes().len() / elem.size(),
            elem,
            phases,
            round: self.mesh_round(),
        };
        let (back, res) =
            self.with_buf(buf, |t, seq, cfg| mesh::run(t, op, seq, &plan, cfg.timeout));
        self.mesh_ops += 1;
        (back, res.map(Some))
    }

    pub fn world(&self) -> u32 {
        self.t.world()
    }

    fn next_seq(&mut self) -> u16 {
        // Sequence 0 is reserved for control messages.
        self.seq = self.seq.checked_add(1).unwrap_or(1);
        self.seq
    }

    /// Runs `f` on the transport with `buf` attached, under a fresh sequence number, and takes
    /// the buffer back whatever happened.
    fn with_buf(
        &mut self,
        buf: OpBuf,
        f: impl FnOnce(&mut T, u16, &CollConfig) -> Result<(), RuntimeError>,
    ) -> (OpBuf, Result<(), RuntimeError>) {
        let seq = self.next_seq();
        if let Err((e, buf)) = self.t.attach(buf) {
            return (buf, Err(e));
        }
        let res = f(&mut self.t, seq, &self.cfg);
        (self.t.detach(), res)
    }

    /// Runs a reducing collective on `buf`'s values, through the mesh when the group uses it,
    /// else on the ring.
    fn reduce_values<V: Values>(
        &mut self,
        r: Reduction,
        buf: &mut Vec<V>,
    ) -> Result<(), RuntimeError> {
        let (back, res) = self.reduce_buf(r, V::wrap(std::mem::take(buf)));
        *buf = V::into_vec(back);
        res
    }

    /// [`Self::reduce_values`] on a buffer of values of any [`Elem`] type: what a transport's
    /// thread runs for its callers.
    pub fn reduce_buf(&mut self, r: Reduction, buf: OpBuf) -> (OpBuf, Result<(), RuntimeError>) {
        let (n, rank) = self.me();
        let Some(elem) = buf.elem() else {
            let e = RuntimeError::InvalidArgument {
                op: r.op(),
                reason: "allreduce, reduce-scatter and allgather take a buffer of f32 or i64 \
                         values"
                    .into(),
            };
            return (buf, Err(e));
        };
        let len = buf.bytes().len() / elem.size();
        let segs = match &r {
            Reduction::All => even_segments(len, n),
            Reduction::Scatter(segs) | Reduction::Gather(segs) => {
                if let Err(e) = self.check_segments(r.op(), len, segs) {
                    return (buf, Err(e));
                }
                segs.clone()
            }
        };
        let phases = r.phases();
        let (buf, res) = self.run_mesh(r.op(), (buf, elem), &segs, phases);
        match res {
            Ok(Some(())) => return (buf, Ok(())),
            Err(e) => return (buf, Err(e)),
            Ok(None) => {}
        }
        let chunk = self.cfg.chunk_bytes;
        let s = ring_schedule(rank, &segs, elem, chunk, phases.reduce, phases.gather);
        self.with_buf(buf, |t, seq, cfg| run(t, r.op(), seq, &s, cfg))
    }

    fn run_bytes(
        &mut self,
        op: &'static str,
        buf: &mut Vec<u8>,
        s: Schedule,
    ) -> Result<(), RuntimeError> {
        let bytes = OpBuf::Bytes(std::mem::take(buf));
        let (back, res) = self.with_buf(bytes, |t, seq, cfg| run(t, op, seq, &s, cfg));
        if let OpBuf::Bytes(v) = back {
            *buf = v;
        }
        res
    }

    fn me(&self) -> (usize, usize) {
        (self.t.world() as usize, self.t.rank().0 as usize)
    }

    /// Sums `buf` elementwise over all ranks, in place. Every rank ends with bitwise identical
    /// values. Extra memory: `window` staging chunks (`window * chunk_bytes`).
    pub fn allreduce<V: Values>(&mut self, buf: &mut Vec<V>) -> Result<(), RuntimeError> {
        self.reduce_values(Reduction::All, buf)
    }

    /// Sums `buf` over all ranks and leaves segment `rank` of the sum in place (`segs`: one
    /// contiguous range per rank, in rank order, covering `buf`); the rest of `buf` holds
    /// partial sums. Element `i` of segment `k` is added in rank order `k+1, ..., k`, so with
    /// [`even_segments`] the result is bitwise the allreduce's.
    pub fn reduce_scatter<V: Values>(
        &mut self,
        buf: &mut Vec<V>,
        segs: &[Range<usize>],
    ) -> Result<(), RuntimeError> {
        self.reduce_values(Reduction::Scatter(segs.to_vec()), buf)
    }

    /// Every rank contributes its segment of `buf` (`segs` as in [`Self::reduce_scatter`]);
    /// afterwards every rank holds all segments, bitwise their owners'.
    pub fn allgather<V: Values>(
        &mut self,
        buf: &mut Vec<V>,
        segs: &[Range<usize>],
    ) -> Result<(), RuntimeError> {
        self.reduce_values(Reduction::Gather(segs.to_vec()), buf)
    }

    /// A segment plan every rank can follow: one range per rank, contiguous from 0 to `len`.
    fn check_segments(
        &self,
        op: &'static str,
        len: usize,
        segs: &[Range<usize>],
    ) -> Result<(), RuntimeError> {
        let (n, _) = self.me();
        // Each range starts where the one before ended; the last ends at `len`.
        let end = segs.iter().try_fold(0, |at, s| {
            (s.start == at && s.end >= s.start).then_some(s.end)
        });
        if segs.len() == n && end == Some(len) {
            return Ok(());
        }
        Err(RuntimeError::InvalidArgument {
            op,
            reason: format!(
                "segments {segs:?} do not cover 0..{len} in {n} contiguous ranges, one per rank; \
                 every rank must pass the same plan"
            ),
        })
    }

    /// Copies `root`'s `buf` into every rank's `buf` (same length everywhere).
    pub fn broadcast(&mut self, buf: &mut Vec<u8>, root: Rank) -> Result<(), RuntimeError> {
        let (n, r) = self.me();
        if root.0 as usize >= n {
            return Err(RuntimeError::InvalidArgument {
                op: "broadcast",
                reason: format!("root {root} is not a rank of a world of {n}"),
            });
        }
        let chunk = self.cfg.chunk_bytes.max(1);
        if buf.len().div_ceil(chunk) > MAX_SLOTS as usize {
            return Err(RuntimeError::InvalidArgument {
                op: "broadcast",
                reason: format!(
                    "{} chunks exceed the {MAX_SLOTS} a collective may use; raise chunk_bytes (now {chunk})",
                    buf.len().div_ceil(chunk)
                ),
            });
        }
        let negotiate = (n >= 2 && !self.windows.contains_key(&root)).then(|| self.next_seq());
        let seq = self.next_seq();
        let len = buf.len();
        let (back, res) = match self.t.attach(OpBuf::Bytes(std::mem::take(buf))) {
            Err((e, back)) => (back, Err(e)),
            Ok(()) => {
                let res = self.broadcast_attached(negotiate, seq, root, (n, r), len);
                (self.t.detach(), res)
            }
        };
        if let OpBuf::Bytes(v) = back {
            *buf = v;
        }
        res
    }

    fn broadcast_attached(
        &mut self,
        negotiate: Option<u16>,
        seq: u16,
        root: Rank,
        (n, r): (usize, usize),
        len: usize,
    ) -> Result<(), RuntimeError> {
        let window_bytes = self.window_bytes();
        if let Some(nseq) = negotiate {
            let yes = negotiate_window(&mut self.t, nseq, root, window_bytes, self.cfg.timeout)?;
            self.windows.insert(root, yes);
        }
        if self.windows.get(&root) == Some(&true) {
            self.window_bcasts += 1;
            window_broadcast(&mut self.t, seq, root, len, &self.cfg)
        } else {
            let s = chain_schedule(n, r, root.0 as usize, len, self.cfg.chunk_bytes);
            run(&mut self.t, "broadcast", seq, &s, &self.cfg)
        }
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&mut self) -> Result<(), RuntimeError> {
        let (n, r) = self.me();
        self.run_bytes("barrier", &mut Vec::new(), barrier_schedule(n, r))
    }

    /// Sends this rank's stripe of `buf` to `to`; `senders` lists, in the same order on every
    /// participant, the ranks that each send one stripe of the same buffer.
    pub fn send_striped(
        &mut self,
        to: Rank,
        senders: &[Rank],
        buf: &mut Vec<u8>,
    ) -> Result<(), RuntimeError> {
        let me = self.t.rank();
        let Some(index) = senders.iter().position(|s| *s == me) else {
            return Err(RuntimeError::InvalidArgument {
                op: "send_striped",
                reason: format!("rank {me} is not among the senders {senders:?}"),
            });
        };
        let s = stripe_send_schedule(to, index, senders.len(), buf.len(), self.cfg.chunk_bytes);
        self.run_bytes("send_striped", buf, s)
    }

    /// Takes part in a point-to-point operation between other ranks without sending or
    /// receiving: operations are numbered per group, so a rank that sits one out must still
    /// count it (e.g. a joiner while the state is striped to another joiner).
    pub fn skip(&mut self) {
        self.next_seq();
    }

    /// Receives `buf.len()` bytes from `senders`, each sending one stripe.
    pub fn recv_striped(
        &mut self,
        senders: &[Rank],
        buf: &mut Vec<u8>,
    ) -> Result<(), RuntimeError> {
        if senders.is_empty() {
            return Err(RuntimeError::InvalidArgument {
                op: "recv_striped",
                reason: "no senders".into(),
            });
        }
        let s = stripe_recv_schedule(senders, buf.len(), self.cfg.chunk_bytes);
        self.run_bytes("recv_striped", buf, s)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dataplane::inproc::{InProcNet, InProcTransport};
    use crate::ids::Generation;

    pub(crate) fn cfg(chunk: usize) -> CollConfig {
        CollConfig {
            chunk_bytes: chunk,
            window: 3,
            timeout: Duration::from_secs(5),
            bcast_slots: 3,
            mesh: true,
            mesh_round_bytes: 256 << 10,
        }
    }

    /// Runs `f` on `n` in-process ranks, one thread each, and returns their results in rank
    /// order.
    fn ranks<R: Send>(
        n: u32,
        chunk: usize,
        f: impl Fn(&mut Collectives<InProcTransport>) -> R + Sync,
    ) -> Vec<R> {
        let net = InProcNet::new(n);
        std::thread::scope(|sc| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let ep = net.endpoint(Rank(r), Generation(1));
                    let f = &f;
                    sc.spawn(move || f(&mut Collectives::new(ep, cfg(chunk))))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Values whose sum depends on the order of addition, so a wrong order shows.
    pub(crate) fn input(rank: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = ((i as u32).wrapping_mul(2654435761) ^ rank.wrapping_mul(40503)) % 10007;
                (x as f32 - 5000.0) * 10f32.powi((i % 7) as i32 - 3) + rank as f32 * 0.1
            })
            .collect()
    }

    /// The sequential reference of the ring's sum: element `i` of segment `k` is added in rank
    /// order `k+1, ..., n-1, 0, ..., k`.
    pub(crate) fn reference(n: u32, len: usize) -> Vec<f32> {
        reference_in(n, len, &even_segments(len, n as usize))
    }

    pub(crate) fn reference_in(n: u32, len: usize, segs: &[Range<usize>]) -> Vec<f32> {
        let ins: Vec<Vec<f32>> = (0..n).map(|r| input(r, len)).collect();
        let n = n as usize;
        let mut out = vec![0f32; len];
        for (k, seg) in segs.iter().enumerate() {
            for i in seg.clone() {
                let mut acc = ins[(k + 1) % n][i];
                for j in 2..=n {
                    acc += ins[(k + j) % n][i];
                }
                out[i] = acc;
            }
        }
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    const LENS: [usize; 7] = [0, 1, 2, 7, 13, 64, 1031];

    /// P-2: every rank gets exactly the reference sum, for world sizes 1..=8, odd sizes, sizes
    /// not divisible by the world, zero length, and chunks of 1, 3 and many elements.
    #[test]
    fn allreduce_matches_reference_bitwise() {
        for n in 1..=8u32 {
            for len in LENS {
                for chunk in [4, 12, 256, 1 << 20] {
                    let want = bits(&reference(n, len));
                    let got = ranks(n, chunk, |c| {
                        let mut b = input(c.rank().0, len);
                        c.allreduce(&mut b).unwrap();
                        bits(&b)
                    });
                    for (r, g) in got.iter().enumerate() {
                        assert_eq!(g, &want, "n={n} len={len} chunk={chunk} rank={r}");
                    }
                }
            }
        }
    }

    #[test]
    fn reference_order_matters_so_the_test_can_fail() {
        let (n, len) = (5, 1031);
        let ins: Vec<Vec<f32>> = (0..n).map(|r| input(r, len)).collect();
        let naive: Vec<f32> = (0..len).map(|i| ins.iter().map(|v| v[i]).sum()).collect();
        assert_ne!(bits(&naive), bits(&reference(n, len)));
    }

    #[test]
    fn reduce_scatter_and_allgather_match_reference() {
        for n in 1..=8u32 {
            for len in LENS {
                let want = reference(n, len);
                let segs = even_segments(len, n as usize);
                let got = ranks(n, 12, |c| {
                    let mut b = input(c.rank().0, len);
                    c.reduce_scatter(&mut b, &segs).unwrap();
                    let seg = segs[c.rank().0 as usize].clone();
                    let mine = b[seg.clone()].to_vec();
                    // Allgather of the reduced segments must rebuild the full sum.
                    let mut g = vec![f32::NAN; len];
                    g[seg.clone()].copy_from_slice(&mine);
                    c.allgather(&mut g, &segs).unwrap();
                    (seg, mine, g)
                });
                for (r, (seg, mine, g)) in got.into_iter().enumerate() {
                    assert_eq!(bits(&mine), bits(&want[seg]), "n={n} len={len} rank={r}");
                    assert_eq!(bits(&g), bits(&want), "n={n} len={len} rank={r}");
                }
            }
        }
    }

    /// A sharded optimizer's plan: unequal segments, some empty. Each segment is summed in its
    /// owner's ring order and gathered bitwise.
    #[test]
    fn uneven_segments_follow_the_plan() {
        for n in 1..=6u32 {
            for len in [0usize, 5, 1031] {
                let nu = n as usize;
                let cut = |k: usize| len * k * k / (nu * nu);
                let segs: Vec<Range<usize>> = (0..nu).map(|k| cut(k)..cut(k + 1)).collect();
                let want = bits(&reference_in(n, len, &segs));
                let got = ranks(n, 12, |c| {
                    let mut b = input(c.rank().0, len);
                    c.reduce_scatter(&mut b, &segs).unwrap();
                    c.allgather(&mut b, &segs).unwrap();
                    bits(&b)
                });
                for (r, g) in got.iter().enumerate() {
                    assert_eq!(g, &want, "n={n} len={len} rank={r} segs={segs:?}");
                }
            }
        }
    }

    /// A plan that does not cover the buffer, or has a segment per rank too few, is refused
    /// before anything is sent (every rank checks the same plan, so none waits on another).
    #[test]
    fn a_plan_that_does_not_cover_the_buffer_is_refused() {
        let whole = std::iter::once(0..10).collect();
        let bad: [Vec<Range<usize>>; 3] = [vec![0..4, 5..10], whole, vec![0..6, 6..9]];
        for segs in &bad {
            let got = ranks(2, 12, |c| {
                let mut b = input(c.rank().0, 10);
                c.reduce_scatter(&mut b, segs).unwrap_err().to_string()
            });
            for e in got {
                assert!(e.contains("do not cover 0..10"), "{e}");
            }
        }
    }

    #[test]
    fn broadcast_from_every_root() {
        for n in 1..=8u32 {
            for len in [0usize, 1, 5, 100, 1027] {
                for root in 0..n {
                    let got = ranks(n, 16, |c| {
                        let mut b: Vec<u8> = if c.rank().0 == root {
                            (0..len).map(|i| (i * 7 + root as usize) as u8).collect()
                        } else {
                            vec![0xEE; len]
                        };
                        c.broadcast(&mut b, Rank(root)).unwrap();
                        b
                    });
                    let want: Vec<u8> = (0..len).map(|i| (i * 7 + root as usize) as u8).collect();
                    assert!(
                        got.iter().all(|g| *g == want),
                        "n={n} len={len} root={root}"
                    );
                }
            }
        }
    }

    /// Runs `f` on `n` in-process ranks of a fabric prepared by `setup`.
    fn ranks_on<R: Send>(
        n: u32,
        chunk: usize,
        setup: impl Fn(&InProcNet),
        f: impl Fn(&mut Collectives<InProcTransport>) -> R + Sync,
    ) -> Vec<R> {
        let net = InProcNet::new(n);
        setup(&net);
        std::thread::scope(|sc| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let ep = net.endpoint(Rank(r), Generation(1));
                    let f = &f;
                    sc.spawn(move || f(&mut Collectives::new(ep, cfg(chunk))))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn payload(root: u32, len: usize, it: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i * 7 + root as usize * 31 + it * 13) as u8)
            .collect()
    }

    /// The window path (every rank can map the root's window) and the chain (some rank cannot:
    /// it stands for a rank on another node) give the same bytes, for every root, with the
    /// window's slots reused many times over (more chunks than slots) and across collectives.
    #[test]
    fn broadcast_through_windows_and_fallback_to_the_chain() {
        for windowless in [None, Some(0u32), Some(2)] {
            for n in [2u32, 3, 5] {
                let got = ranks_on(
                    n,
                    16,
                    |net| {
                        if let Some(w) = windowless.filter(|&w| w < n) {
                            net.windowless(Rank(w));
                        }
                    },
                    |c| {
                        let mut out = Vec::new();
                        for it in 0..3 {
                            for root in 0..n {
                                for len in [0usize, 1, 16, 47, 300] {
                                    let mut b = if c.rank().0 == root {
                                        payload(root, len, it)
                                    } else {
                                        vec![0xEE; len]
                                    };
                                    c.broadcast(&mut b, Rank(root)).unwrap();
                                    out.push(b == payload(root, len, it));
                                }
                            }
                            c.allreduce(&mut input(c.rank().0, 40)).unwrap();
                        }
                        let paths: Vec<_> = (0..n).map(|r| c.window_broadcast(Rank(r))).collect();
                        (out, paths)
                    },
                );
                let fallback = windowless.is_some_and(|w| w < n);
                for (r, (ok, paths)) in got.iter().enumerate() {
                    assert!(
                        ok.iter().all(|x| *x),
                        "n={n} windowless={windowless:?} rank={r}"
                    );
                    assert!(
                        paths.iter().all(|p| *p == Some(!fallback)),
                        "n={n} windowless={windowless:?} rank={r}: {paths:?}"
                    );
                }
            }
        }
    }

    /// Different lengths on root and receiver in the window path: an error, not a hang.
    #[test]
    fn window_broadcast_length_mismatch_is_an_error() {
        let got = ranks(3, 16, |c| {
            let len = if c.rank().0 == 1 { 100 } else { 96 };
            c.broadcast(&mut vec![1u8; len], Rank(0)).unwrap_err()
        });
        assert!(
            got.iter()
                .any(|e| matches!(e, RuntimeError::MessageLength { .. })),
            "{got:?}"
        );
        for e in &got {
            assert!(
                matches!(
                    e,
                    RuntimeError::MessageLength { .. } | RuntimeError::PeerFailed { .. }
                ),
                "{e}"
            );
        }
    }

    /// P-3 in the window path: a receiver or the root dies; every survivor fails naming it.
    #[test]
    fn window_broadcast_dead_peer_fails_every_survivor() {
        for dead in [0u32, 2] {
            let net = InProcNet::new(4);
            // Every thread is past the first broadcast before the victim dies.
            let all = std::sync::Barrier::new(4);
            let got: Vec<_> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..4u32)
                    .map(|r| {
                        let ep = net.endpoint(Rank(r), Generation(3));
                        let (net, all) = (net.clone(), &all);
                        sc.spawn(move || {
                            let mut c = Collectives::new(ep, cfg(64));
                            let mut b = vec![r as u8; 4096];
                            // One broadcast decides the window path on every rank.
                            c.broadcast(&mut b, Rank(0)).unwrap();
                            assert_eq!(c.window_broadcast(Rank(0)), Some(true));
                            all.wait();
                            if r == dead {
                                net.kill(Rank(dead));
                                return None;
                            }
                            Some(c.broadcast(&mut b, Rank(0)).unwrap_err())
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for e in got.into_iter().flatten() {
                assert!(
                    matches!(e, RuntimeError::PeerFailed { rank, .. } if rank == Rank(dead)),
                    "dead={dead}: {e}"
                );
            }
        }
    }

    #[test]
    fn barrier_and_repeated_mixed_collectives() {
        for n in 1..=8u32 {
            let got = ranks(n, 8, |c| {
                let mut out = Vec::new();
                for it in 0..5 {
                    c.barrier().unwrap();
                    let mut b = input(c.rank().0 + it, 33);
                    c.allreduce(&mut b).unwrap();
                    out.push(bits(&b));
                }
                out
            });
            assert!(got.iter().all(|g| *g == got[0]), "n={n}");
        }
    }

    #[test]
    fn striped_transfer_from_several_senders() {
        for n in 2..=6u32 {
            for len in [0usize, 1, 9, 4097] {
                let state: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                let senders: Vec<Rank> = (1..n).map(Rank).collect();
                let got = ranks(n, 64, |c| {
                    if c.rank() == Rank(0) {
                        let mut b = vec![0u8; len];
                        c.recv_striped(&senders, &mut b).unwrap();
                        Some(b)
                    } else {
                        let mut b = state.clone();
                        c.send_striped(Rank(0), &senders, &mut b).unwrap();
                        None
                    }
                });
                assert_eq!(got[0].as_deref(), Some(&state[..]), "n={n} len={len}");
            }
        }
    }

    /// P-3: a dead member turns into `PeerFailed` naming it on every survivor, and the group
    /// stays broken.
    #[test]
    fn dead_peer_fails_every_survivor_with_its_rank() {
        let net = InProcNet::new(4);
        let got: Vec<_> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4u32)
                .map(|r| {
                    let ep = net.endpoint(Rank(r), Generation(3));
                    let net = net.clone();
                    sc.spawn(move || {
                        let mut c = Collectives::new(ep, cfg(64));
                        if r == 2 {
                            net.kill(Rank(2));
                            return None;
                        }
                        let mut b = vec![1.0f32; 1000];
                        let first = c.allreduce(&mut b).unwrap_err();
                        let again = c.allreduce(&mut b).unwrap_err();
                        Some((first, again))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (first, again) in got.into_iter().flatten() {
            assert!(
                matches!(first, RuntimeError::PeerFailed { rank: Rank(2), .. }),
                "{first}"
            );
            assert!(matches!(again, RuntimeError::GroupBroken { .. }), "{again}");
        }
    }

    /// P-3: a silent (stopped) member turns into an error on every survivor within the timeout.
    #[test]
    fn silent_peer_times_out_within_the_deadline() {
        let net = InProcNet::new(3);
        let timeout = Duration::from_millis(300);
        let got: Vec<_> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..2u32)
                .map(|r| {
                    let ep = net.endpoint(Rank(r), Generation(1));
                    sc.spawn(move || {
                        let mut c = Collectives::new(ep, CollConfig { timeout, ..cfg(64) });
                        let t0 = std::time::Instant::now();
                        let e = c.allreduce(&mut vec![1.0f32; 100]).unwrap_err();
                        (e, t0.elapsed())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (e, took) in got {
            assert!(
                matches!(
                    e,
                    RuntimeError::Timeout { .. } | RuntimeError::PeerFailed { .. }
                ),
                "{e}"
            );
            assert!(took < timeout + Duration::from_millis(200), "{took:?}");
        }
    }

    /// P-1: messages of another generation are dropped and counted, never delivered.
    #[test]
    fn stale_generation_messages_are_dropped() {
        let net = InProcNet::new(2);
        let key = MsgKey { seq: 1, slot: 0 };
        // A message from generation 4 that would otherwise match rank 0's first receive.
        net.inject(
            Rank(0),
            Rank(1),
            tag(KIND_DATA, Generation(4), Rank(1), key),
            vec![0xFF; 40],
        );
        let got = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..2u32)
                .map(|r| {
                    let ep = net.endpoint(Rank(r), Generation(5));
                    sc.spawn(move || {
                        let mut c = Collectives::new(ep, cfg(1 << 20));
                        let mut b = input(r, 20);
                        c.allreduce(&mut b).unwrap();
                        (bits(&b), c.transport().dropped_stale())
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(got[0].0, bits(&reference(2, 20)));
        assert_eq!(got[1].0, got[0].0);
        assert_eq!(got[0].1, 1);
    }

    /// Bad input: a wrong-length message or a malformed control message is an error naming the
    /// sender, not a panic or a hang.
    #[test]
    fn wrong_length_and_malformed_messages_are_errors() {
        let got = ranks(2, 1 << 20, |c| {
            let len = if c.rank().0 == 0 { 10 } else { 12 };
            c.allreduce(&mut vec![1.0f32; len]).unwrap_err()
        });
        assert!(
            got.iter()
                .any(|e| matches!(e, RuntimeError::MessageLength { .. })),
            "{got:?}"
        );
        let net = InProcNet::new(2);
        let abort = tag(
            KIND_CTRL,
            Generation(1),
            Rank(1),
            MsgKey {
                seq: 0,
                slot: SLOT_ABORT,
            },
        );
        net.inject(Rank(0), Rank(1), abort, vec![1, 2, 3]);
        let mut c = Collectives::new(net.endpoint(Rank(0), Generation(1)), cfg(64));
        let e = c.allreduce(&mut vec![1.0f32; 8]).unwrap_err();
        assert!(
            matches!(e, RuntimeError::MalformedMessage { from: Rank(1), .. }),
            "{e}"
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        let got = ranks(2, 64, |c| {
            let root = c.broadcast(&mut vec![0u8; 4], Rank(9)).unwrap_err();
            let stripe = c
                .send_striped(Rank(0), &[Rank(5)], &mut vec![0u8; 4])
                .unwrap_err();
            (root, stripe)
        });
        for (a, b) in got {
            assert!(matches!(a, RuntimeError::InvalidArgument { .. }));
            assert!(matches!(b, RuntimeError::InvalidArgument { .. }));
        }
        // Too many chunks for the tag's slot field.
        let got = ranks(2, 1, |c| {
            c.broadcast(&mut vec![0u8; (MAX_SLOTS as usize) + 1], Rank(0))
                .unwrap_err()
        });
        assert!(got
            .iter()
            .all(|e| matches!(e, RuntimeError::InvalidArgument { .. })));
    }
}
