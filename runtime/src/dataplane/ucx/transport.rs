//! [`UcxTransport`]: building a group (context, worker, endpoints, handshake), the
//! [`Transport`] contract over it, and its teardown. Requests and their completion are in
//! `requests.rs`, shared-memory windows in `window.rs`, the UCP calls in `ffi.rs`.
#![forbid(unsafe_code)]

use super::ffi::{Config, Context, Endpoint, Lent, MemWindow, Request, Worker};
use super::requests::{RecvTarget, Req, ReqKind, SendSource, CTRL_SLOT_BUF};
use super::{ucx_err, UcxConfig};
use crate::dataplane::admission::GroupKey;
use crate::dataplane::bootstrap::{AddressExchange, Exchanged};
use crate::dataplane::links::PeerLink;
use crate::dataplane::liveness::{decode_address, encode_address, Liveness, LivenessListener};
use crate::dataplane::transport::*;
use crate::error::RuntimeError;
use crate::ids::{Generation, Rank};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The UCP objects of one group, owned by one thread.
///
/// The UCX handles release themselves in the right order whatever order the fields drop in
/// (see `ffi.rs`); `Drop` only decides how gracefully endpoints close.
pub struct UcxTransport {
    pub(super) reqs: HashMap<ReqId, Req>,
    /// One per rank; `None` for this rank and once closed.
    pub(super) eps: Vec<Option<Endpoint>>,
    pub(super) window: Option<MemWindow>,
    pub(super) buf: Lent,
    pub(super) worker: Worker,
    pub(super) context: Context,
    pub(super) efd: Option<i32>,
    pub(super) rank: Rank,
    pub(super) world: u32,
    pub(super) generation: Generation,
    pub(super) next_id: u64,
    pub(super) broken: Option<String>,
    /// Set when a request could not be retired after a failure: UCX may still write the
    /// attached buffer, so it is never handed back (the worker keeps it until destroyed).
    pub(super) poisoned: bool,
    pub(super) dropped: u64,
    /// Control messages not signed with the generation's key (P-9), dropped.
    pub(super) forged: u64,
    pub(super) abort_recv: Option<ReqId>,
    pub(super) last_sweep: Instant,
    pub(super) spin: Duration,
    pub(super) live: Option<Liveness>,
    /// The generation's key from the exchange: signs and checks every control message.
    pub(super) key: GroupKey,
    pub(super) peer_mode: bool,
    /// Idle waits nap instead of yielding (see `Transport::patient`).
    pub(super) patient: bool,
    /// Nanoseconds this rank's waits were descheduled beyond what they asked for (see
    /// `STALL_MIN`): time the rank itself held its peers up, not time it waited for them.
    pub(super) stalled: Arc<AtomicU64>,
    /// See `UcxConfig::abandoned_below`.
    pub(super) abandoned_below: Option<Arc<AtomicU64>>,
}

impl UcxTransport {
    /// Creates the context and worker, exchanges addresses, connects to every peer and checks
    /// each peer's handshake (same generation, expected rank, same world).
    pub fn connect(
        rank: Rank,
        world: u32,
        generation: Generation,
        cfg: &UcxConfig,
        exchange: &mut dyn AddressExchange,
    ) -> Result<Self, RuntimeError> {
        if world == 0 || world > MAX_WORLD || rank.0 >= world {
            return Err(RuntimeError::InvalidArgument {
                op: "connect",
                reason: format!("rank {rank} of world {world} (worlds of 1..={MAX_WORLD})"),
            });
        }
        let deadline = Instant::now() + cfg.connect_timeout;
        let (context, worker) = init(cfg)?;
        let mut t = UcxTransport {
            reqs: HashMap::new(),
            eps: (0..world).map(|_| None).collect(),
            window: None,
            buf: Lent::new(&worker),
            efd: worker.event_fd(),
            worker,
            context,
            rank,
            world,
            generation,
            next_id: 0,
            broken: None,
            poisoned: false,
            dropped: 0,
            forged: 0,
            abort_recv: None,
            last_sweep: Instant::now(),
            spin: cfg.spin,
            live: None,
            key: GroupKey::in_process(),
            peer_mode: cfg.peer_error_mode,
            patient: false,
            stalled: Arc::new(AtomicU64::new(0)),
            abandoned_below: cfg.abandoned_below.clone(),
        };
        let listener = LivenessListener::bind(&cfg.liveness_ip)?;
        let address = t
            .worker
            .address()
            .map_err(|st| ucx_err("worker_get_address", st))?;
        let local = encode_address(listener.addr, &address);
        let Exchanged {
            addresses: table,
            key,
        } = exchange.exchange(rank, world, generation, &local, cfg.connect_timeout)?;
        t.key = key;
        if table.len() != world as usize {
            return Err(RuntimeError::Bootstrap {
                addr: "address exchange".into(),
                reason: format!("{} addresses for a world of {world}", table.len()),
            });
        }
        let mut live_addrs = Vec::with_capacity(table.len());
        for (r, entry) in table.iter().enumerate() {
            let (live, ucx) = decode_address(entry).map_err(|e| RuntimeError::Bootstrap {
                addr: "address exchange".into(),
                reason: format!("rank {r}'s address: {e}"),
            })?;
            live_addrs.push(live);
            if r as u32 != rank.0 {
                t.connect_ep(Rank(r as u32), ucx)?;
            }
        }
        t.live = Some(Liveness::connect(
            listener,
            rank,
            generation,
            &t.key,
            &live_addrs,
            deadline,
        )?);
        t.handshake(deadline)?;
        t.post_abort_recv()?;
        Ok(t)
    }

    /// The lanes of every endpoint (`ucp_ep_query`): which transport reaches each peer.
    pub(super) fn links(&self) -> Vec<PeerLink> {
        let eps = self.eps.iter().enumerate();
        eps.filter_map(|(r, ep)| Some(PeerLink::new(Rank(r as u32), ep.as_ref()?.lanes()?)))
            .collect()
    }

    fn connect_ep(&mut self, peer: Rank, addr: &[u8]) -> Result<(), RuntimeError> {
        if addr.is_empty() {
            return Err(RuntimeError::Bootstrap {
                addr: "address exchange".into(),
                reason: format!("rank {peer} published an empty worker address"),
            });
        }
        let ep =
            self.worker
                .connect(addr, self.peer_mode)
                .map_err(|st| RuntimeError::PeerFailed {
                    rank: peer,
                    op: "connect",
                    reason: format!("cannot create an endpoint to its address: {st}"),
                })?;
        self.eps[peer.0 as usize] = Some(ep);
        Ok(())
    }

    /// Every rank sends `Hello` to every other and checks what it receives: this also wires up
    /// every endpoint, so keepalive watches all peers, not only ring neighbours.
    fn handshake(&mut self, deadline: Instant) -> Result<(), RuntimeError> {
        let hello = encode_ctrl(
            &Ctrl::Hello {
                rank: self.rank,
                world: self.world,
                generation: self.generation,
            },
            &self.key,
        );
        let key = MsgKey {
            seq: 0,
            slot: SLOT_HELLO,
        };
        let mut recvs = HashMap::new();
        for r in 0..self.world {
            if r == self.rank.0 {
                continue;
            }
            let id = self.post_recv_raw(
                Rank(r),
                tag(KIND_CTRL, self.generation, Rank(r), key),
                FULL_MASK,
                RecvTarget::Owned(vec![0u8; CTRL_SLOT_BUF]),
                ReqKind::Ctrl,
            )?;
            recvs.insert(id, Rank(r));
            self.post_send_raw(
                Rank(r),
                tag(KIND_CTRL, self.generation, self.rank, key),
                SendSource::Owned(hello.clone()),
                ReqKind::Ctrl,
            )?;
        }
        while !recvs.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let c = self.wait_inner("connect", left, true)?;
            let Some(from) = recvs.remove(&c.id) else {
                continue;
            };
            let bytes = c.buf.unwrap_or_default();
            match decode_ctrl(&bytes, &self.key) {
                Ok(Ctrl::Hello { rank, world, generation })
                    if rank == from && world == self.world && generation == self.generation => {}
                Ok(other) => {
                    return Err(self.fail(RuntimeError::MalformedMessage {
                        from,
                        op: "connect",
                        reason: format!(
                            "handshake {other:?} does not match rank {from} of world {} in generation {}",
                            self.world, self.generation
                        ),
                    }))
                }
                Err(e) => return Err(self.fail(RuntimeError::MalformedMessage { from, op: "connect", reason: format!("handshake: {e}") })),
            }
        }
        Ok(())
    }

    pub(super) fn post_abort_recv(&mut self) -> Result<(), RuntimeError> {
        let t = tag(
            KIND_CTRL,
            self.generation,
            Rank(0),
            MsgKey {
                seq: 0,
                slot: SLOT_ABORT,
            },
        );
        let id = self.post_recv_raw(
            self.rank,
            t,
            FULL_MASK & !SRC_MASK,
            RecvTarget::Owned(vec![0u8; CTRL_SLOT_BUF]),
            ReqKind::Ctrl,
        )?;
        self.abort_recv = Some(id);
        Ok(())
    }

    pub(super) fn check_open(&self, op: &'static str) -> Result<(), RuntimeError> {
        match &self.broken {
            Some(cause) => Err(RuntimeError::GroupBroken {
                op,
                generation: self.generation,
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    pub(super) fn check_peer(&self, op: &'static str, peer: Rank) -> Result<(), RuntimeError> {
        peer_ep(&self.eps, self.world, op, peer).map(|_| ())
    }

    /// Orderly teardown of a healthy group: cancel the standing abort receive (or UCX reports
    /// it leaked) and flush what we sent to peers that may still be receiving it.
    fn close(&mut self) {
        if let Some(id) = self.abort_recv.take() {
            if let Some(r) = self.reqs.get(&id) {
                r.req.cancel();
            }
        }
        let mut closing: Vec<Request> = self
            .eps
            .iter_mut()
            .filter_map(|ep| ep.take()?.close(false))
            .collect();
        let until = Instant::now() + Duration::from_secs(1);
        while !(closing.is_empty() && self.reqs.is_empty()) && Instant::now() < until {
            self.progress();
            self.drain_completed();
            closing.retain(|req| req.test().is_none());
        }
        // A close that did not finish in time is released by UCX when it does; the worker,
        // destroyed after this, releases everything it still owns.
        drop(closing);
        self.broken = Some("closed".into());
    }
}

/// The endpoint to `peer`, which must be another member.
pub(super) fn peer_ep<'a>(
    eps: &'a [Option<Endpoint>],
    world: u32,
    op: &'static str,
    peer: Rank,
) -> Result<&'a Endpoint, RuntimeError> {
    match eps.get(peer.0 as usize) {
        Some(Some(ep)) => Ok(ep),
        _ => Err(RuntimeError::InvalidArgument {
            op,
            reason: format!("peer {peer} is not another live member of a world of {world}"),
        }),
    }
}

impl Drop for UcxTransport {
    fn drop(&mut self) {
        if self.broken.is_none() {
            self.close();
        } else {
            self.retire();
        }
        // Requests still held (only after a failed retire) are freed now; UCX releases each
        // when it finishes, and the worker keeps their buffers until it is destroyed.
        self.reqs.clear();
        self.window = None;
    }
}

/// Creates the UCP context (tag matching + wakeup) and a single-threaded worker.
fn init(cfg: &UcxConfig) -> Result<(Context, Worker), RuntimeError> {
    let mut config = Config::from_env().map_err(|st| ucx_err("config_read", st))?;
    let keepalive = format!("{}ms", cfg.keepalive.as_millis().max(1));
    // phalanx's defaults; a UCX_* variable in the environment always wins. Reasons: docs/dataplane.md.
    let mut defaults: Vec<(&str, &str)> = vec![
        ("KEEPALIVE_INTERVAL", &keepalive),
        // Without it the shared-memory transport does not offer peer-failure handling, and
        // UCX, asked for UCP_ERR_HANDLING_MODE_PEER, falls back to TCP over loopback.
        ("POSIX_ERROR_HANDLING", "y"),
    ];
    if !cfg.peer_error_mode {
        // Large messages: the receiver reads the sender's pages directly (CMA, one copy).
        // UCX offers this only without peer error mode (CMA cannot invalidate memory); with
        // it, the scheme would turn every message eager and unbounded in memory.
        defaults.push(("RNDV_SCHEME", "get_zcopy"));
    }
    for (key, value) in defaults {
        if std::env::var_os(format!("UCX_{key}")).is_some() {
            continue;
        }
        config
            .set(key, value)
            .map_err(|st| RuntimeError::Transport {
                op: "config_modify",
                reason: format!("{key}={value}: {st}"),
            })?;
    }
    let context = Context::new(&config).map_err(|st| ucx_err("init", st))?;
    // UCX copied what it needs.
    drop(config);
    let worker = Worker::new(&context).map_err(|st| ucx_err("worker_create", st))?;
    Ok((context, worker))
}

impl Transport for UcxTransport {
    fn rank(&self) -> Rank {
        self.rank
    }
    fn world(&self) -> u32 {
        self.world
    }
    fn generation(&self) -> Generation {
        self.generation
    }

    fn attach(&mut self, buf: OpBuf) -> Result<(), (RuntimeError, OpBuf)> {
        if let Err(e) = self.check_open("attach") {
            return Err((e, buf));
        }
        if let Err(buf) = self.buf.attach(buf) {
            let e = RuntimeError::InvalidArgument {
                op: "attach",
                reason: "a buffer is already attached".into(),
            };
            return Err((e, buf));
        }
        // Each operation starts with a clean unexpected queue: whatever of another generation
        // arrived since the last one is dropped now, not only while waiting.
        self.progress();
        self.sweep();
        self.last_sweep = Instant::now();
        Ok(())
    }

    fn detach(&mut self) -> OpBuf {
        if self.reqs.values().any(|r| r.kind == ReqKind::Data) && self.broken.is_none() {
            // The collective gave up with operations in flight (an error outside wait_any):
            // the peers are mid-schedule, so the group cannot continue.
            let e = RuntimeError::GroupBroken {
                op: "detach",
                generation: self.generation,
                cause: "an operation was abandoned with messages in flight".into(),
            };
            let _ = self.fail(e);
        }
        if self.poisoned {
            return OpBuf::None;
        }
        self.buf.detach()
    }

    fn region(&self, r: Range<usize>) -> Result<&[u8], RuntimeError> {
        self.buf.region(r)
    }

    fn region_mut(&mut self, r: Range<usize>) -> Result<&mut [u8], RuntimeError> {
        self.buf.region_mut(r)
    }

    fn busy(&self, r: &Range<usize>, write: bool) -> bool {
        self.buf.busy(r, write)
    }

    fn send_region(
        &mut self,
        to: Rank,
        key: MsgKey,
        r: Range<usize>,
    ) -> Result<ReqId, RuntimeError> {
        self.check_open("send")?;
        self.buf.check("send", &r, false)?;
        let t = tag(KIND_DATA, self.generation, self.rank, key);
        self.post_send_raw(to, t, SendSource::Region(r), ReqKind::Data)
    }

    fn recv_region(
        &mut self,
        from: Rank,
        key: MsgKey,
        r: Range<usize>,
    ) -> Result<ReqId, RuntimeError> {
        self.check_open("recv")?;
        self.check_peer("recv", from)?;
        self.buf.check("recv", &r, true)?;
        let t = tag(KIND_DATA, self.generation, from, key);
        self.post_recv_raw(from, t, FULL_MASK, RecvTarget::Region(r), ReqKind::Data)
    }

    fn send_owned(&mut self, to: Rank, key: MsgKey, buf: Vec<u8>) -> Result<ReqId, RuntimeError> {
        self.check_open("send")?;
        let t = tag(KIND_DATA, self.generation, self.rank, key);
        self.post_send_raw(to, t, SendSource::Owned(buf), ReqKind::Data)
    }

    fn recv_owned(&mut self, from: Rank, key: MsgKey, buf: Vec<u8>) -> Result<ReqId, RuntimeError> {
        self.check_open("recv")?;
        self.check_peer("recv", from)?;
        let t = tag(KIND_DATA, self.generation, from, key);
        self.post_recv_raw(from, t, FULL_MASK, RecvTarget::Owned(buf), ReqKind::Data)
    }

    fn wait_any(
        &mut self,
        op: &'static str,
        timeout: Duration,
    ) -> Result<Completion, RuntimeError> {
        self.wait_inner(op, timeout, false)
    }

    fn dropped_stale(&self) -> u64 {
        self.dropped
    }

    fn abort(&mut self, err: RuntimeError) -> RuntimeError {
        self.fail(err)
    }

    fn patient(&mut self, on: bool) {
        self.patient = on;
    }

    fn window_key(&mut self, bytes: usize) -> Result<Option<Vec<u8>>, RuntimeError> {
        self.own_window_key(bytes)
    }

    fn window_map(&mut self, peer: Rank, key: &[u8]) -> bool {
        self.map_peer_window(peer, key)
    }

    fn window_put(&mut self, at: usize, src: Range<usize>) -> Result<(), RuntimeError> {
        self.put_own_window(at, src)
    }

    fn window_get(&mut self, peer: Rank, at: usize, dst: Range<usize>) -> Result<(), RuntimeError> {
        self.get_peer_window(peer, at, dst)
    }

    fn window_read(&mut self, peer: Rank, at: usize, out: &mut [u8]) -> Result<(), RuntimeError> {
        self.read_peer_window(peer, at, out)
    }
}
