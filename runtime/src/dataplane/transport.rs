//! The transport contract the collectives run on, and the wire format shared by every transport.
//!
//! A transport moves byte messages between the ranks of one group (one generation). The
//! collectives post sends and receives and wait for completions; a transport never blocks
//! longer than the timeout it is given and turns a dead or silent peer into an error.
//!
//! Zero copy: an operation *attaches* its buffer to the transport, and sends and receives name
//! byte ranges of it. While a range is in flight the transport refuses to hand it out
//! (`region`/`region_mut`) and refuses overlapping posts, so the collectives cannot race the
//! network even by mistake; they ask [`Transport::busy`] first and defer instead.

use super::admission::{GroupKey, Purpose, MAC_LEN};
use crate::error::RuntimeError;
use crate::ids::{Generation, Rank};
use std::ops::Range;
use std::time::Duration;

/// Identifies one posted operation until it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqId(pub u64);

/// What a message belongs to within a generation: the collective's sequence number and the
/// message's index within that collective's schedule between one pair of ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsgKey {
    pub seq: u16,
    pub slot: u32,
}

/// The buffer an operation works on. `F32` and `I64` keep the caller's vector (no conversion
/// copy); the transport sees it as bytes.
#[derive(Debug, Default)]
pub enum OpBuf {
    #[default]
    None,
    F32(Vec<f32>),
    I64(Vec<i64>),
    Bytes(Vec<u8>),
}

impl OpBuf {
    pub fn bytes(&self) -> &[u8] {
        match self {
            OpBuf::None => &[],
            OpBuf::F32(v) => f32_bytes(v),
            OpBuf::I64(v) => bytemuck::cast_slice(v),
            OpBuf::Bytes(v) => v,
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            OpBuf::None => &mut [],
            OpBuf::F32(v) => f32_bytes_mut(v),
            OpBuf::I64(v) => bytemuck::cast_slice_mut(v),
            OpBuf::Bytes(v) => v,
        }
    }

    /// The type of the values a reducing collective adds, for a buffer of values.
    pub fn elem(&self) -> Option<Elem> {
        match self {
            OpBuf::F32(_) => Some(Elem::F32),
            OpBuf::I64(_) => Some(Elem::I64),
            OpBuf::None | OpBuf::Bytes(_) => None,
        }
    }
}

/// What a reducing collective adds: f32 (gradients), or i64 with wrapping addition, which is
/// exact and associative, so an integer sum is the same in any order or grouping (deterministic
/// mode's fixed-point gradients, T-6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Elem {
    #[default]
    F32,
    I64,
}

impl Elem {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::I64 => 8,
        }
    }

    /// `dst[i] += src[i]` over values of this type stored as native-endian bytes.
    pub fn add(self, dst: &mut [u8], src: &[u8]) {
        match self {
            Elem::F32 => add_f32(dst, src),
            Elem::I64 => add_i64(dst, src),
        }
    }
}

/// The vectors a reducing collective takes: each is one [`OpBuf`] variant.
pub trait Values: Sized + Send + 'static {
    fn wrap(v: Vec<Self>) -> OpBuf;
    /// The vector back; empty when `b` holds another type (never, for a buffer this type
    /// wrapped).
    fn into_vec(b: OpBuf) -> Vec<Self>;
}

impl Values for f32 {
    fn wrap(v: Vec<f32>) -> OpBuf {
        OpBuf::F32(v)
    }
    fn into_vec(b: OpBuf) -> Vec<f32> {
        match b {
            OpBuf::F32(v) => v,
            _ => Vec::new(),
        }
    }
}

impl Values for i64 {
    fn wrap(v: Vec<i64>) -> OpBuf {
        OpBuf::I64(v)
    }
    fn into_vec(b: OpBuf) -> Vec<i64> {
        match b {
            OpBuf::I64(v) => v,
            _ => Vec::new(),
        }
    }
}

pub(crate) fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

pub(crate) fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    bytemuck::cast_slice_mut(v)
}

/// A completed operation: receives into owned buffers give the buffer back, as do owned sends.
#[derive(Debug)]
pub struct Completion {
    pub id: ReqId,
    pub buf: Option<Vec<u8>>,
}

/// One group's point-to-point messaging. Implemented by UCX (`ucx/`) and in-process
/// (`inproc.rs`, for tests of the algorithms).
pub trait Transport {
    fn rank(&self) -> Rank;
    fn world(&self) -> u32;
    fn generation(&self) -> Generation;

    /// Hands the operation's buffer to the transport. At most one buffer is attached; a broken
    /// group refuses it. On refusal the buffer comes back with the error.
    fn attach(&mut self, buf: OpBuf) -> Result<(), (RuntimeError, OpBuf)>;
    /// Takes the buffer back. Anything still in flight is cancelled first; after a failure the
    /// contents are unspecified.
    fn detach(&mut self) -> OpBuf;
    /// The attached bytes of `r`, if no receive into them is in flight.
    fn region(&self, r: Range<usize>) -> Result<&[u8], RuntimeError>;
    /// The attached bytes of `r` for writing, if nothing touching them is in flight.
    fn region_mut(&mut self, r: Range<usize>) -> Result<&mut [u8], RuntimeError>;
    /// True when an in-flight operation overlaps `r` in a way that forbids `write` (or reading,
    /// when `write` is false).
    fn busy(&self, r: &Range<usize>, write: bool) -> bool;

    fn send_region(
        &mut self,
        to: Rank,
        key: MsgKey,
        r: Range<usize>,
    ) -> Result<ReqId, RuntimeError>;
    fn recv_region(
        &mut self,
        from: Rank,
        key: MsgKey,
        r: Range<usize>,
    ) -> Result<ReqId, RuntimeError>;
    /// Sends an owned buffer (small control messages).
    fn send_owned(&mut self, to: Rank, key: MsgKey, buf: Vec<u8>) -> Result<ReqId, RuntimeError>;
    /// Receives exactly `buf.len()` bytes into an owned buffer (staging for reductions).
    fn recv_owned(&mut self, from: Rank, key: MsgKey, buf: Vec<u8>) -> Result<ReqId, RuntimeError>;

    /// Waits until one posted operation completes. Fails with `Timeout` when nothing completes
    /// within `timeout`, with `PeerFailed` when a peer dies or another member reports a failure.
    /// After an error the group is broken for good: every later call fails with `GroupBroken`.
    fn wait_any(&mut self, op: &'static str, timeout: Duration)
        -> Result<Completion, RuntimeError>;

    /// Messages of another generation (or otherwise not addressed to this group) dropped so far.
    fn dropped_stale(&self) -> u64;

    /// Breaks the group because of `err`, found by the collective rather than the transport
    /// (e.g. a peer announced a different length): tells every member, as a failure seen in
    /// [`Transport::wait_any`] would, and returns `err`.
    fn abort(&mut self, err: RuntimeError) -> RuntimeError;

    /// While on, a wait without progress naps briefly instead of yielding the core: for a rank
    /// whose only job is to wait while its peers work (a broadcast root whose window is full),
    /// where even yielding takes half of a core it shares with a peer. Default: off.
    fn patient(&mut self, on: bool) {
        let _ = on;
    }

    // Shared-memory windows (optional). A window is a region of this rank's memory, allocated
    // once per group, that ranks on the same node map and read directly: one copy from the
    // writer's window into the reader's buffer, instead of two through the transport's bounce
    // buffers. The collectives order every access with messages (the writer announces what it
    // wrote, readers acknowledge what they read), so the transport only moves bytes.

    /// Allocates (first call) this rank's window of `bytes` and returns the key a peer passes to
    /// [`Transport::window_map`], or `None` when the transport has no shared memory. Later calls
    /// return the same window; asking for a different size is an error.
    fn window_key(&mut self, bytes: usize) -> Result<Option<Vec<u8>>, RuntimeError> {
        let _ = bytes;
        Ok(None)
    }

    /// Maps `peer`'s window from its key. False when it cannot be read directly from here
    /// (another node, a transport without shared memory, a malformed key).
    fn window_map(&mut self, peer: Rank, key: &[u8]) -> bool {
        let _ = (peer, key);
        false
    }

    /// Copies the attached bytes `src` into this rank's window at offset `at`.
    fn window_put(&mut self, at: usize, src: Range<usize>) -> Result<(), RuntimeError> {
        let _ = (at, src);
        Err(no_window("window_put"))
    }

    /// Copies `dst.len()` bytes of `peer`'s mapped window from offset `at` into the attached
    /// bytes `dst`.
    fn window_get(&mut self, peer: Rank, at: usize, dst: Range<usize>) -> Result<(), RuntimeError> {
        let _ = (peer, at, dst);
        Err(no_window("window_get"))
    }

    /// Copies `out.len()` bytes of `peer`'s mapped window from offset `at` into `out`, memory of
    /// the caller's (staging for a reduction), not the attached buffer.
    fn window_read(&mut self, peer: Rank, at: usize, out: &mut [u8]) -> Result<(), RuntimeError> {
        let _ = (peer, at, out);
        Err(no_window("window_read"))
    }
}

fn no_window(op: &'static str) -> RuntimeError {
    RuntimeError::InvalidArgument {
        op,
        reason: "no shared-memory window (none allocated, or not mapped)".into(),
    }
}

/// Checks a window access of `len` bytes at `at` against a window of `size` bytes.
pub fn check_window(
    op: &'static str,
    at: usize,
    len: usize,
    size: usize,
) -> Result<(), RuntimeError> {
    match at.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(RuntimeError::InvalidArgument {
            op,
            reason: format!("{len} bytes at offset {at} outside the {size}-byte window"),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------------------------

/// Message kinds, the top two bits of a tag.
pub const KIND_DATA: u64 = 0;
pub const KIND_CTRL: u64 = 1;

pub const GEN_BITS: u32 = 14;
pub const SRC_BITS: u32 = 12;
pub const SEQ_BITS: u32 = 16;
pub const SLOT_BITS: u32 = 20;

const SLOT_SHIFT: u32 = 0;
const SEQ_SHIFT: u32 = SLOT_BITS;
const SRC_SHIFT: u32 = SEQ_SHIFT + SEQ_BITS;
const GEN_SHIFT: u32 = SRC_SHIFT + SRC_BITS;
const KIND_SHIFT: u32 = GEN_SHIFT + GEN_BITS;

/// The largest world a tag can address.
pub const MAX_WORLD: u32 = 1 << SRC_BITS;
/// The most messages one collective may exchange between one pair of ranks.
pub const MAX_SLOTS: u32 = 1 << SLOT_BITS;

pub const KIND_MASK: u64 = 0b11 << KIND_SHIFT;
pub const GEN_MASK: u64 = ((1 << GEN_BITS) - 1) << GEN_SHIFT;
pub const SRC_MASK: u64 = ((1 << SRC_BITS) - 1) << SRC_SHIFT;
pub const FULL_MASK: u64 = u64::MAX;

/// The generation as it appears in a tag (its low bits). Full generations travel in the
/// connection handshake and in control messages; the tag bits drop stray messages cheaply.
pub fn gen_bits(g: Generation) -> u64 {
    (g.0 & ((1 << GEN_BITS) - 1)) << GEN_SHIFT
}

/// Packs a tag. Callers guarantee `src < MAX_WORLD` and `slot < MAX_SLOTS` (checked when the
/// group is built and when a schedule is planned).
pub fn tag(kind: u64, g: Generation, src: Rank, key: MsgKey) -> u64 {
    debug_assert!(src.0 < MAX_WORLD && key.slot < MAX_SLOTS);
    (kind << KIND_SHIFT)
        | gen_bits(g)
        | ((src.0 as u64) << SRC_SHIFT)
        | ((key.seq as u64) << SEQ_SHIFT)
        | ((key.slot as u64 & ((1 << SLOT_BITS) - 1)) << SLOT_SHIFT)
}

/// The fields of a tag, for diagnostics and for the stale-message sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagFields {
    pub kind: u64,
    pub gen_low: u64,
    pub src: u32,
    pub key: MsgKey,
}

pub fn untag(t: u64) -> TagFields {
    TagFields {
        kind: t >> KIND_SHIFT,
        gen_low: (t & GEN_MASK) >> GEN_SHIFT,
        src: ((t & SRC_MASK) >> SRC_SHIFT) as u32,
        key: MsgKey {
            seq: ((t >> SEQ_SHIFT) & ((1 << SEQ_BITS) - 1)) as u16,
            slot: ((t >> SLOT_SHIFT) & ((1 << SLOT_BITS) - 1)) as u32,
        },
    }
}

/// Probe patterns `(tag, mask)` that together match every message whose tag is *not* of kind
/// data/control in generation `g`: one pattern per generation bit (that bit differs from `g`'s)
/// plus one for the invalid kinds. Tag matching cannot say "not equal"; a set of single-bit
/// patterns can.
pub fn stale_patterns(g: Generation) -> Vec<(u64, u64)> {
    let mine = gen_bits(g);
    let mut v = Vec::with_capacity(GEN_BITS as usize + 1);
    for b in 0..GEN_BITS {
        let bit = 1u64 << (GEN_SHIFT + b);
        v.push((!mine & bit, bit));
    }
    let high = 1u64 << (KIND_SHIFT + 1);
    v.push((high, high));
    v
}

/// Control messages: the connection handshake and the abort that spreads a failure to every
/// member. 24 bytes, little endian: magic, kind, rank/subject, world, full generation; then the
/// MAC of those bytes under the generation's key (P-9).
const CTRL_BODY: usize = 24;
pub const CTRL_LEN: usize = CTRL_BODY + MAC_LEN;
const CTRL_MAGIC: u32 = 0x5048_5831; // "PHX1"

/// Reserved slots of control messages (sequence number 0, never used by a collective).
pub const SLOT_HELLO: u32 = 0;
pub const SLOT_ABORT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctrl {
    /// Sent once on every connection: who I am, in which group.
    Hello {
        rank: Rank,
        world: u32,
        generation: Generation,
    },
    /// `reporter` saw a failure; `subject` names the failed rank, or `None` for a timeout.
    Abort {
        reporter: Rank,
        subject: Option<Rank>,
        generation: Generation,
        timeout: bool,
    },
}

/// Why a control message was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtrlError {
    /// Not signed with this generation's key: not from a member; dropped, never acted on.
    NotAMember,
    /// Signed by a member, but not a message this version understands.
    Malformed(String),
}

impl std::fmt::Display for CtrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CtrlError::NotAMember => f.write_str(
                "not signed with this generation's key (not from a member of the group)",
            ),
            CtrlError::Malformed(why) => f.write_str(why),
        }
    }
}

pub fn encode_ctrl(c: &Ctrl, key: &GroupKey) -> Vec<u8> {
    let mut b = Vec::with_capacity(CTRL_LEN);
    b.extend_from_slice(&CTRL_MAGIC.to_le_bytes());
    let (kind, a, w, g) = match *c {
        Ctrl::Hello {
            rank,
            world,
            generation,
        } => (1u32, rank.0, world, generation.0),
        Ctrl::Abort {
            reporter,
            subject,
            generation,
            timeout,
        } => {
            let kind = if timeout { 3 } else { 2 };
            (
                kind,
                subject.map_or(u32::MAX, |r| r.0),
                reporter.0,
                generation.0,
            )
        }
    };
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&a.to_le_bytes());
    b.extend_from_slice(&w.to_le_bytes());
    b.extend_from_slice(&g.to_le_bytes());
    let mac = key.mac(Purpose::Control, &b);
    b.extend_from_slice(&mac);
    b
}

/// Parses a control message; every malformed input is an error string, never a panic.
pub fn decode_ctrl(b: &[u8], key: &GroupKey) -> Result<Ctrl, CtrlError> {
    if b.len() != CTRL_LEN {
        return Err(CtrlError::Malformed(format!(
            "control message of {} bytes, expected {CTRL_LEN}",
            b.len()
        )));
    }
    let (b, mac) = b.split_at(CTRL_BODY);
    if !key.verify(Purpose::Control, b, mac) {
        return Err(CtrlError::NotAMember);
    }
    decode_body(b).map_err(CtrlError::Malformed)
}

fn decode_body(b: &[u8]) -> Result<Ctrl, String> {
    let u = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if u(0) != CTRL_MAGIC {
        return Err(format!(
            "bad magic {:#010x} (not a phalanx peer, or another version)",
            u(0)
        ));
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&b[16..24]);
    let generation = Generation(u64::from_le_bytes(g));
    match u(4) {
        1 => Ok(Ctrl::Hello {
            rank: Rank(u(8)),
            world: u(12),
            generation,
        }),
        k @ (2 | 3) => Ok(Ctrl::Abort {
            reporter: Rank(u(12)),
            subject: (u(8) != u32::MAX).then_some(Rank(u(8))),
            generation,
            timeout: k == 3,
        }),
        k => Err(format!("unknown control kind {k}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping shared by the transports
// ---------------------------------------------------------------------------------------------

/// The ranges of the attached buffer that posted operations read (sends) or write (receives).
#[derive(Debug, Default)]
pub struct InFlight {
    ops: Vec<(ReqId, Range<usize>, bool)>,
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

impl InFlight {
    /// A new read conflicts with in-flight writes; a new write with anything in flight.
    pub fn busy(&self, r: &Range<usize>, write: bool) -> bool {
        self.ops
            .iter()
            .any(|(_, o, w)| (write || *w) && overlaps(o, r))
    }

    pub fn add(&mut self, id: ReqId, r: Range<usize>, write: bool) {
        if !r.is_empty() {
            self.ops.push((id, r, write));
        }
    }

    pub fn remove(&mut self, id: ReqId) {
        self.ops.retain(|(i, _, _)| *i != id);
    }

    pub fn clear(&mut self) {
        self.ops.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Checks a range against the attached length and the in-flight set before a post.
pub fn check_range(
    op: &'static str,
    len: usize,
    inflight: &InFlight,
    r: &Range<usize>,
    write: bool,
) -> Result<(), RuntimeError> {
    if r.start > r.end || r.end > len {
        return Err(RuntimeError::InvalidArgument {
            op,
            reason: format!("range {r:?} outside the {len}-byte buffer"),
        });
    }
    if inflight.busy(r, write) {
        return Err(RuntimeError::InvalidArgument {
            op,
            reason: format!("range {r:?} overlaps an operation in flight"),
        });
    }
    Ok(())
}

/// The checked view of `r` in an attached buffer, shared by every transport's `region`.
pub fn region<'a>(
    buf: &'a OpBuf,
    inflight: &InFlight,
    r: Range<usize>,
) -> Result<&'a [u8], RuntimeError> {
    check_range("region", buf.bytes().len(), inflight, &r, false)?;
    Ok(&buf.bytes()[r])
}

/// The checked mutable view of `r` in an attached buffer, shared by every transport's
/// `region_mut`.
pub fn region_mut<'a>(
    buf: &'a mut OpBuf,
    inflight: &InFlight,
    r: Range<usize>,
) -> Result<&'a mut [u8], RuntimeError> {
    check_range("region_mut", buf.bytes().len(), inflight, &r, true)?;
    Ok(&mut buf.bytes_mut()[r])
}

/// `dst[i] += src[i]` over f32 values stored as native-endian bytes. Every rank reduces a
/// given chunk in the same order (the ring's), and only the chunk's owner's result is kept,
/// so the sum is bitwise identical everywhere.
pub fn add_f32(dst: &mut [u8], src: &[u8]) {
    add_each::<f32>(dst, src, |a, b| a + b);
}

/// `dst[i] = dst[i].wrapping_add(src[i])` over i64 values stored as native-endian bytes.
pub fn add_i64(dst: &mut [u8], src: &[u8]) {
    add_each::<i64>(dst, src, i64::wrapping_add);
}

/// `dst[i] = add(dst[i], src[i])` over values of `T` stored as native-endian bytes.
fn add_each<T: bytemuck::Pod>(dst: &mut [u8], src: &[u8], add: impl Fn(T, T) -> T) {
    debug_assert_eq!(dst.len(), src.len());
    match (
        bytemuck::try_cast_slice_mut::<u8, T>(dst),
        bytemuck::try_cast_slice::<u8, T>(src),
    ) {
        (Ok(d), Ok(s)) => {
            for (d, s) in d.iter_mut().zip(s) {
                *d = add(*d, *s);
            }
        }
        // Misaligned staging memory: same arithmetic, byte-wise loads.
        (Err(_), _) | (_, Err(_)) => {
            let n = std::mem::size_of::<T>();
            for (d, s) in dst.chunks_exact_mut(n).zip(src.chunks_exact(n)) {
                let v = add(
                    bytemuck::pod_read_unaligned(d),
                    bytemuck::pod_read_unaligned(s),
                );
                d.copy_from_slice(bytemuck::bytes_of(&v));
            }
        }
    }
}

/// Part `i` of `len` items split into `parts` contiguous parts whose sizes differ by at most
/// one (the first `len % parts` get one more).
pub fn part(len: usize, parts: usize, i: usize) -> Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// The error a member's wait fails with when a peer's abort arrives (every transport spreads
/// aborts the same way, P-6).
pub fn abort_error(
    op: &'static str,
    reporter: Rank,
    subject: Option<Rank>,
    timeout: bool,
    generation: Generation,
    after: Duration,
) -> RuntimeError {
    match subject {
        Some(rank) => RuntimeError::PeerFailed {
            rank,
            op,
            reason: format!("reported by rank {reporter}"),
        },
        // The reporter only knows that nothing arrived; which peer hangs is not known.
        None if timeout => RuntimeError::Timeout {
            op,
            after,
            generation,
        },
        None => RuntimeError::GroupBroken {
            op,
            generation,
            cause: format!("rank {reporter} aborted the group"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_round_trips_every_field() {
        let key = MsgKey {
            seq: 0xBEEF,
            slot: MAX_SLOTS - 1,
        };
        let t = tag(KIND_CTRL, Generation(0x3FFF + 7), Rank(MAX_WORLD - 1), key);
        let f = untag(t);
        assert_eq!(f.kind, KIND_CTRL);
        assert_eq!(f.gen_low, (0x3FFF + 7) & 0x3FFF);
        assert_eq!(f.src, MAX_WORLD - 1);
        assert_eq!(f.key, key);
    }

    /// P-1: a stale-generation tag is matched by some sweep pattern; a current one by none.
    #[test]
    fn stale_patterns_match_exactly_other_generations() {
        let key = MsgKey { seq: 3, slot: 9 };
        let matches =
            |t: u64, g: Generation| stale_patterns(g).iter().any(|&(pt, m)| t & m == pt & m);
        for g in [0u64, 1, 5, 0x3FFF, 1 << 20] {
            let g = Generation(g);
            for kind in [KIND_DATA, KIND_CTRL] {
                assert!(!matches(tag(kind, g, Rank(2), key), g));
                for other in [g.0 + 1, g.0 ^ 0x2000, g.0.wrapping_sub(1)] {
                    assert!(matches(tag(kind, Generation(other), Rank(2), key), g));
                }
            }
            assert!(matches(tag(KIND_DATA, g, Rank(2), key) | (1 << 63), g));
        }
    }

    #[test]
    fn ctrl_round_trips_and_rejects_garbage() {
        let key = GroupKey::random().unwrap();
        for c in [
            Ctrl::Hello {
                rank: Rank(3),
                world: 4,
                generation: Generation(77),
            },
            Ctrl::Abort {
                reporter: Rank(1),
                subject: Some(Rank(2)),
                generation: Generation(9),
                timeout: false,
            },
            Ctrl::Abort {
                reporter: Rank(0),
                subject: None,
                generation: Generation(9),
                timeout: true,
            },
        ] {
            assert_eq!(decode_ctrl(&encode_ctrl(&c, &key), &key).unwrap(), c);
        }
        let hello = Ctrl::Hello {
            rank: Rank(1),
            world: 2,
            generation: Generation(1),
        };
        let good = encode_ctrl(&hello, &key);
        for n in 0..good.len() {
            assert!(
                decode_ctrl(&good[..n], &key).is_err(),
                "truncated to {n} accepted"
            );
        }
        // P-9: any change, or another generation's key, and it is not from a member.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 1;
            assert_eq!(
                decode_ctrl(&bad, &key),
                Err(CtrlError::NotAMember),
                "byte {i}"
            );
        }
        let other = GroupKey::random().unwrap();
        assert_eq!(decode_ctrl(&good, &other), Err(CtrlError::NotAMember));
        assert_eq!(
            decode_ctrl(&encode_ctrl(&hello, &other), &key),
            Err(CtrlError::NotAMember)
        );
        // A member's message this version does not understand is malformed, not foreign.
        let resign = |mut body: Vec<u8>| {
            body.truncate(CTRL_BODY);
            let mac = key.mac(Purpose::Control, &body);
            body.extend_from_slice(&mac);
            body
        };
        let mut bad = good.clone();
        bad[0] ^= 1;
        let e = decode_ctrl(&resign(bad), &key).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
        let mut bad = good;
        bad[4] = 9;
        let e = decode_ctrl(&resign(bad), &key).unwrap_err();
        assert!(e.to_string().contains("kind"), "{e}");
    }

    #[test]
    fn parts_cover_exactly_and_differ_by_at_most_one() {
        for len in 0..40 {
            for parts in 1..9 {
                let mut next = 0;
                for i in 0..parts {
                    let r = part(len, parts, i);
                    assert_eq!(r.start, next);
                    assert!(r.len() == len / parts || r.len() == len / parts + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn inflight_blocks_conflicting_access_only() {
        let mut f = InFlight::default();
        f.add(ReqId(1), 0..10, false);
        f.add(ReqId(2), 20..30, true);
        assert!(!f.busy(&(5..8), false), "two reads do not conflict");
        assert!(f.busy(&(5..8), true));
        assert!(f.busy(&(25..26), false));
        assert!(!f.busy(&(10..20), true));
        f.remove(ReqId(2));
        assert!(!f.busy(&(25..26), true));
    }

    #[test]
    fn add_i64_wraps_and_agrees_misaligned() {
        let a: Vec<i64> = vec![i64::MAX, -5, 1 << 61, 0];
        let b: Vec<i64> = vec![1, 7, 1 << 61, -1];
        let mut d1 = bytemuck::cast_slice::<i64, u8>(&a).to_vec();
        Elem::I64.add(&mut d1, bytemuck::cast_slice(&b));
        let mut raw = [0u8; 4 * 8 + 1];
        raw[1..].copy_from_slice(bytemuck::cast_slice(&a));
        add_i64(&mut raw[1..], bytemuck::cast_slice(&b));
        assert_eq!(d1, raw[1..]);
        let want: Vec<i64> = vec![i64::MIN, 2, 1 << 62, -1];
        assert_eq!(d1, bytemuck::cast_slice::<i64, u8>(&want));
    }

    #[test]
    fn add_f32_aligned_and_misaligned_agree() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.37).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 / (i as f32 + 1.0)).collect();
        let mut d1 = f32_bytes(&a).to_vec();
        add_f32(&mut d1, f32_bytes(&b));
        let mut raw = [0u8; 37 * 4 + 1];
        raw[1..].copy_from_slice(f32_bytes(&a));
        add_f32(&mut raw[1..], f32_bytes(&b));
        assert_eq!(d1, raw[1..]);
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(d1, f32_bytes(&want));
    }
}
