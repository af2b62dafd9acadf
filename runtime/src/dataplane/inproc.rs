//! An in-process transport: the ranks are threads sharing mailboxes. It exists so that the
//! collective algorithms can be tested exhaustively and fast; it follows the same rules as the
//! UCX transport (generation check, abort spreading, timeouts, exact lengths), and can kill a
//! rank or inject raw messages for fault tests.

use super::admission::GroupKey;
use super::transport::*;
use crate::error::RuntimeError;
use crate::ids::{Generation, Rank};
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct Envelope {
    tag: u64,
    src: Rank,
    data: Vec<u8>,
}

/// A shared-memory window: ranks are threads, so a window is a shared byte vector.
type Window = Arc<Mutex<Vec<u8>>>;

struct Shared {
    boxes: Mutex<Vec<VecDeque<Envelope>>>,
    dead: Mutex<Vec<bool>>,
    cv: Condvar,
    /// Every window allocated on this fabric, by key.
    windows: Mutex<HashMap<u64, Window>>,
    /// Ranks that have no shared memory (as if on another node): they neither offer nor map
    /// windows.
    windowless: Mutex<Vec<bool>>,
}

/// The fabric the in-process ranks of one test share.
#[derive(Clone)]
pub struct InProcNet {
    shared: Arc<Shared>,
    world: u32,
}

impl InProcNet {
    pub fn new(world: u32) -> Self {
        let world = world.max(1);
        InProcNet {
            shared: Arc::new(Shared {
                boxes: Mutex::new((0..world).map(|_| VecDeque::new()).collect()),
                dead: Mutex::new(vec![false; world as usize]),
                cv: Condvar::new(),
                windows: Mutex::new(HashMap::new()),
                windowless: Mutex::new(vec![false; world as usize]),
            }),
            world,
        }
    }

    /// The transport of `rank` in generation `generation`.
    pub fn endpoint(&self, rank: Rank, generation: Generation) -> InProcTransport {
        InProcTransport {
            net: self.clone(),
            rank,
            generation,
            buf: OpBuf::None,
            inflight: InFlight::default(),
            recvs: Vec::new(),
            done: VecDeque::new(),
            next_id: 1,
            broken: None,
            dropped: 0,
            window: None,
            mapped: HashMap::new(),
        }
    }

    /// Makes `rank` unable to offer or map shared-memory windows, as a rank on another node.
    pub fn windowless(&self, rank: Rank) {
        if let Some(w) = lock(&self.shared.windowless).get_mut(rank.0 as usize) {
            *w = true;
        }
    }

    fn has_windows(&self, rank: Rank) -> bool {
        !lock(&self.shared.windowless)
            .get(rank.0 as usize)
            .copied()
            .unwrap_or(true)
    }

    /// Marks `rank` dead, as a crashed process would look to its peers.
    pub fn kill(&self, rank: Rank) {
        if let Some(d) = lock(&self.shared.dead).get_mut(rank.0 as usize) {
            *d = true;
        }
        self.shared.cv.notify_all();
    }

    /// Delivers raw bytes with a raw tag to `to`, as a faulty or stale peer might.
    pub fn inject(&self, to: Rank, src: Rank, tag: u64, data: Vec<u8>) {
        if let Some(b) = lock(&self.shared.boxes).get_mut(to.0 as usize) {
            b.push_back(Envelope { tag, src, data });
        }
        self.shared.cv.notify_all();
    }

    fn deliver(&self, to: Rank, env: Envelope) {
        self.inject(to, env.src, env.tag, env.data);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread must not turn every other rank's call into a panic too.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Target {
    Region(Range<usize>),
    Owned(Vec<u8>),
}

struct PostedRecv {
    id: ReqId,
    from: Rank,
    tag: u64,
    target: Target,
}

pub struct InProcTransport {
    net: InProcNet,
    rank: Rank,
    generation: Generation,
    buf: OpBuf,
    inflight: InFlight,
    recvs: Vec<PostedRecv>,
    done: VecDeque<Completion>,
    next_id: u64,
    broken: Option<String>,
    dropped: u64,
    /// This rank's window, with its key.
    window: Option<(u64, Window)>,
    /// Peers' windows this rank has mapped.
    mapped: HashMap<Rank, Window>,
}

impl InProcTransport {
    fn id(&mut self) -> ReqId {
        self.next_id += 1;
        ReqId(self.next_id)
    }

    fn post_send(&mut self, to: Rank, key: MsgKey, data: Vec<u8>, back: Option<Vec<u8>>) -> ReqId {
        let id = self.id();
        let t = tag(KIND_DATA, self.generation, self.rank, key);
        self.net.deliver(
            to,
            Envelope {
                tag: t,
                src: self.rank,
                data,
            },
        );
        self.done.push_back(Completion { id, buf: back });
        id
    }

    fn check_open(&self, op: &'static str) -> Result<(), RuntimeError> {
        match &self.broken {
            Some(cause) => Err(RuntimeError::GroupBroken {
                op,
                generation: self.generation,
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn check_peer(&self, op: &'static str, peer: Rank) -> Result<(), RuntimeError> {
        if peer.0 >= self.net.world || peer == self.rank {
            return Err(RuntimeError::InvalidArgument {
                op,
                reason: format!(
                    "peer {peer} is not another member of a world of {}",
                    self.net.world
                ),
            });
        }
        Ok(())
    }

    /// Records the failure, tells every other member, and returns it.
    fn fail(&mut self, err: RuntimeError) -> RuntimeError {
        if self.broken.is_none() {
            let (subject, timeout) = match &err {
                RuntimeError::PeerFailed { rank, .. } => (Some(*rank), false),
                RuntimeError::Timeout { .. } => (None, true),
                RuntimeError::MalformedMessage { from, .. }
                | RuntimeError::MessageLength { from, .. } => (Some(*from), false),
                _ => (None, false),
            };
            let abort = encode_ctrl(
                &Ctrl::Abort {
                    reporter: self.rank,
                    subject,
                    generation: self.generation,
                    timeout,
                },
                &GroupKey::in_process(),
            );
            let t = tag(
                KIND_CTRL,
                self.generation,
                self.rank,
                MsgKey {
                    seq: 0,
                    slot: SLOT_ABORT,
                },
            );
            for r in 0..self.net.world {
                if r != self.rank.0 {
                    self.net.deliver(
                        Rank(r),
                        Envelope {
                            tag: t,
                            src: self.rank,
                            data: abort.clone(),
                        },
                    );
                }
            }
            self.broken = Some(err.to_string());
        }
        self.recvs.clear();
        self.inflight.clear();
        err
    }

    /// Matches one mailbox message against the posted receives. `Ok(None)`: nothing matched.
    fn try_match(
        &mut self,
        op: &'static str,
        wait: Duration,
    ) -> Result<Option<Completion>, RuntimeError> {
        let mut boxes = lock(&self.net.shared.boxes);
        let mine = &mut boxes[self.rank.0 as usize];
        let mut i = 0;
        while i < mine.len() {
            let env = &mine[i];
            let f = untag(env.tag);
            if f.kind > KIND_CTRL || gen_bits(Generation(f.gen_low)) != gen_bits(self.generation) {
                mine.remove(i);
                self.dropped += 1;
                continue;
            }
            if f.kind == KIND_CTRL && f.key.slot == SLOT_ABORT {
                let env = mine.remove(i).unwrap_or_else(|| unreachable!());
                drop(boxes);
                return Err(match decode_ctrl(&env.data, &GroupKey::in_process()) {
                    Ok(Ctrl::Abort {
                        reporter,
                        subject,
                        generation,
                        timeout,
                    }) if generation == self.generation => {
                        abort_error(op, reporter, subject, timeout, self.generation, wait)
                    }
                    Ok(Ctrl::Abort { .. }) | Ok(Ctrl::Hello { .. }) => {
                        // Another generation's abort (full generation differs): stale, drop.
                        self.dropped += 1;
                        return Ok(None);
                    }
                    Err(e) => RuntimeError::MalformedMessage {
                        from: env.src,
                        op,
                        reason: e.to_string(),
                    },
                });
            }
            if let Some(p) = self
                .recvs
                .iter()
                .position(|p| p.tag == env.tag && p.from == env.src)
            {
                let env = mine.remove(i).unwrap_or_else(|| unreachable!());
                drop(boxes);
                let posted = self.recvs.remove(p);
                let want = match &posted.target {
                    Target::Region(r) => r.len(),
                    Target::Owned(b) => b.len(),
                };
                if env.data.len() != want {
                    return Err(RuntimeError::MessageLength {
                        from: env.src,
                        op,
                        expected: want,
                        got: env.data.len(),
                    });
                }
                self.inflight.remove(posted.id);
                let buf = match posted.target {
                    Target::Region(r) => {
                        self.buf.bytes_mut()[r].copy_from_slice(&env.data);
                        None
                    }
                    Target::Owned(mut b) => {
                        b.copy_from_slice(&env.data);
                        Some(b)
                    }
                };
                return Ok(Some(Completion { id: posted.id, buf }));
            }
            i += 1;
        }
        Ok(None)
    }
}

impl Transport for InProcTransport {
    fn rank(&self) -> Rank {
        self.rank
    }
    fn world(&self) -> u32 {
        self.net.world
    }
    fn generation(&self) -> Generation {
        self.generation
    }

    fn attach(&mut self, buf: OpBuf) -> Result<(), (RuntimeError, OpBuf)> {
        if let Err(e) = self.check_open("attach") {
            return Err((e, buf));
        }
        if !matches!(self.buf, OpBuf::None) {
            let e = RuntimeError::InvalidArgument {
                op: "attach",
                reason: "a buffer is already attached".into(),
            };
            return Err((e, buf));
        }
        self.buf = buf;
        Ok(())
    }

    fn detach(&mut self) -> OpBuf {
        self.recvs.clear();
        self.inflight.clear();
        self.done.clear();
        std::mem::take(&mut self.buf)
    }

    fn region(&self, r: Range<usize>) -> Result<&[u8], RuntimeError> {
        super::transport::region(&self.buf, &self.inflight, r)
    }

    fn region_mut(&mut self, r: Range<usize>) -> Result<&mut [u8], RuntimeError> {
        super::transport::region_mut(&mut self.buf, &self.inflight, r)
    }

    fn busy(&self, r: &Range<usize>, write: bool) -> bool {
        self.inflight.busy(r, write)
    }

    fn send_region(
        &mut self,
        to: Rank,
        key: MsgKey,
        r: Range<usize>,
    ) -> Result<ReqId, RuntimeError> {
        self.check_open("send")?;
        self.check_peer("send", to)?;
        check_range("send", self.buf.bytes().len(), &self.inflight, &r, false)?;
        // The copy releases the region at once, like an eager send.
        let data = self.buf.bytes()[r].to_vec();
        Ok(self.post_send(to, key, data, None))
    }

    fn recv_region(
        &mut self,
        from: Rank,
        key: MsgKey,
        r: Range<usize>,
    ) -> Result<ReqId, RuntimeError> {
        self.check_open("recv")?;
        self.check_peer("recv", from)?;
        check_range("recv", self.buf.bytes().len(), &self.inflight, &r, true)?;
        let id = self.id();
        self.inflight.add(id, r.clone(), true);
        let t = tag(KIND_DATA, self.generation, from, key);
        self.recvs.push(PostedRecv {
            id,
            from,
            tag: t,
            target: Target::Region(r),
        });
        Ok(id)
    }

    fn send_owned(&mut self, to: Rank, key: MsgKey, buf: Vec<u8>) -> Result<ReqId, RuntimeError> {
        self.check_open("send")?;
        self.check_peer("send", to)?;
        Ok(self.post_send(to, key, buf.clone(), Some(buf)))
    }

    fn recv_owned(&mut self, from: Rank, key: MsgKey, buf: Vec<u8>) -> Result<ReqId, RuntimeError> {
        self.check_open("recv")?;
        self.check_peer("recv", from)?;
        let id = self.id();
        let t = tag(KIND_DATA, self.generation, from, key);
        self.recvs.push(PostedRecv {
            id,
            from,
            tag: t,
            target: Target::Owned(buf),
        });
        Ok(id)
    }

    fn wait_any(
        &mut self,
        op: &'static str,
        timeout: Duration,
    ) -> Result<Completion, RuntimeError> {
        self.check_open(op)?;
        if let Some(c) = self.done.pop_front() {
            return Ok(c);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_match(op, timeout) {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => {}
                Err(e) => return Err(self.fail(e)),
            }
            // A peer that is gone fails the wait when this rank still expects something from
            // it that is not here: a rank that finished and left has sent all it had to.
            let dead = {
                let dead = lock(&self.net.shared.dead);
                let boxes = lock(&self.net.shared.boxes);
                let mine = &boxes[self.rank.0 as usize];
                dead.iter().enumerate().position(|(r, &d)| {
                    let r = Rank(r as u32);
                    d && r != self.rank
                        && self.recvs.iter().any(|p| p.from == r)
                        && !mine.iter().any(|e| e.src == r)
                })
            };
            if let Some(r) = dead {
                return Err(self.fail(RuntimeError::PeerFailed {
                    rank: Rank(r as u32),
                    op,
                    reason: "the peer is gone".into(),
                }));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.fail(RuntimeError::Timeout {
                    op,
                    after: timeout,
                    generation: self.generation,
                }));
            }
            // Re-check under the lock so a delivery between the scan and the wait is not missed.
            let boxes = lock(&self.net.shared.boxes);
            // Unmatched messages may be waiting (for a later slot): poll those often, sleep
            // longer on an empty mailbox, where every delivery notifies.
            let cap = if boxes[self.rank.0 as usize].is_empty() {
                20
            } else {
                1
            };
            let wait = (deadline - now).min(Duration::from_millis(cap));
            drop(self.net.shared.cv.wait_timeout(boxes, wait));
        }
    }

    fn dropped_stale(&self) -> u64 {
        self.dropped
    }

    fn abort(&mut self, err: RuntimeError) -> RuntimeError {
        self.fail(err)
    }

    fn window_key(&mut self, bytes: usize) -> Result<Option<Vec<u8>>, RuntimeError> {
        if !self.net.has_windows(self.rank) {
            return Ok(None);
        }
        if let Some((key, w)) = &self.window {
            let size = lock(w).len();
            if size != bytes {
                return Err(RuntimeError::InvalidArgument {
                    op: "window_key",
                    reason: format!("window of {size} bytes exists, {bytes} asked"),
                });
            }
            return Ok(Some(key.to_le_bytes().to_vec()));
        }
        let w: Window = Arc::new(Mutex::new(vec![0u8; bytes]));
        let mut all = lock(&self.net.shared.windows);
        let key = all.len() as u64 + 1;
        all.insert(key, w.clone());
        self.window = Some((key, w));
        Ok(Some(key.to_le_bytes().to_vec()))
    }

    fn window_map(&mut self, peer: Rank, key: &[u8]) -> bool {
        if !self.net.has_windows(self.rank) {
            return false;
        }
        let Ok(k) = <[u8; 8]>::try_from(key) else {
            return false;
        };
        match lock(&self.net.shared.windows).get(&u64::from_le_bytes(k)) {
            Some(w) => {
                self.mapped.insert(peer, w.clone());
                true
            }
            None => false,
        }
    }

    fn window_put(&mut self, at: usize, src: Range<usize>) -> Result<(), RuntimeError> {
        self.check_open("window_put")?;
        let Some((_, w)) = &self.window else {
            return Err(RuntimeError::InvalidArgument {
                op: "window_put",
                reason: "no window".into(),
            });
        };
        let mut w = lock(w);
        check_window("window_put", at, src.len(), w.len())?;
        let bytes = super::transport::region(&self.buf, &self.inflight, src)?;
        w[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn window_get(&mut self, peer: Rank, at: usize, dst: Range<usize>) -> Result<(), RuntimeError> {
        self.check_open("window_get")?;
        let out = super::transport::region_mut(&mut self.buf, &self.inflight, dst)?;
        read_mapped(&self.mapped, peer, at, out, "window_get")
    }

    fn window_read(&mut self, peer: Rank, at: usize, out: &mut [u8]) -> Result<(), RuntimeError> {
        self.check_open("window_read")?;
        read_mapped(&self.mapped, peer, at, out, "window_read")
    }
}

/// Copies `out.len()` bytes at `at` of `peer`'s window, as mapped by this rank, into `out`.
fn read_mapped(
    mapped: &HashMap<Rank, Window>,
    peer: Rank,
    at: usize,
    out: &mut [u8],
    op: &'static str,
) -> Result<(), RuntimeError> {
    let Some(w) = mapped.get(&peer) else {
        return Err(RuntimeError::InvalidArgument {
            op,
            reason: format!("rank {peer}'s window is not mapped"),
        });
    };
    let w = lock(w);
    check_window(op, at, out.len(), w.len())?;
    let n = out.len();
    out.copy_from_slice(&w[at..at + n]);
    Ok(())
}
