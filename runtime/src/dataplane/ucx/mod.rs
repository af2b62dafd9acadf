//! The UCX transport: one OS thread owns the UCP context, worker and endpoints of a group; the
//! rest of the runtime talks to it through [`UcxGroup`] over channels. UCX objects never leave
//! that thread (the raw handles make the transport `!Send`, so the compiler enforces it).
//!
//! A group is one generation: building the next generation builds a new worker with a new
//! address, so a fenced-out rank that wakes up still holds endpoints to workers that no longer
//! exist and cannot reach the new group at all (P-1); tags carry the generation's low bits as
//! well, and a sweep drops and counts anything of another generation that reaches a worker.
//!
//! Failure handling: endpoints use `UCP_ERR_HANDLING_MODE_PEER` with UCX keepalive; a failed
//! endpoint, a failed request or a wait without progress for `timeout` breaks the group, and the
//! rank that notices tells every other member with an abort message so that all of them fail
//! within milliseconds rather than each waiting out its own deadline (P-3).
//!
//! This is the only module of the workspace with `unsafe` code: the UCP C API.
#![allow(unsafe_code)]

mod group;

pub use group::UcxGroup;

use super::admission::GroupKey;
use super::bootstrap::{AddressExchange, Exchanged};
use super::collectives::CollConfig;
use super::links::PeerLink;
use super::liveness::{decode_address, encode_address, Liveness, LivenessListener};
use super::transport::*;
use crate::error::RuntimeError;
use crate::ids::{Generation, Rank};
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ucx_rs::sys;

/// Settings of a UCX group. Defaults and their reasons: docs/dataplane.md.
#[derive(Debug, Clone)]
pub struct UcxConfig {
    pub coll: CollConfig,
    /// UCX keepalive interval, unless `UCX_KEEPALIVE_INTERVAL` is set in the environment.
    pub keepalive: Duration,
    /// Bound on building the group: address exchange plus the handshake with every peer.
    pub connect_timeout: Duration,
    /// How long the worker thread busy-polls without progress before it starts yielding the
    /// core (and, after 5 ms, sleeping on the worker's event fd). 0: yield at once, which is
    /// fastest when ranks share cores; a rank with a core of its own may spin a few us.
    pub spin: Duration,
    /// Address the crash-detection connections listen on (this node's address on a cluster).
    pub liveness_ip: String,
    /// `UCP_ERR_HANDLING_MODE_PEER` on every endpoint. Off, UCX may use transports without
    /// peer-failure support (CMA single-copy reads); crashes are still seen through the
    /// liveness connections and hangs through the deadline. See docs/dataplane.md.
    pub peer_error_mode: bool,
}

impl Default for UcxConfig {
    fn default() -> Self {
        UcxConfig {
            coll: CollConfig::default(),
            keepalive: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(30),
            spin: Duration::ZERO,
            liveness_ip: "127.0.0.1".into(),
            peer_error_mode: true,
        }
    }
}

/// Counters a group reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UcxStats {
    /// Messages of another generation (or malformed tags) dropped by the sweep.
    pub dropped_stale: u64,
    /// Control messages not signed with the generation's key, dropped unread (P-9).
    pub forged: u64,
    /// Broadcasts that went through the root's shared-memory window (the rest took the chain).
    pub window_broadcasts: u64,
}

fn status_str(s: sys::ucs_status_t) -> String {
    format!("{} ({s})", ucx_rs::status_string(s))
}

fn ucx_err(op: &'static str, s: sys::ucs_status_t) -> RuntimeError {
    RuntimeError::Transport {
        op,
        reason: status_str(s),
    }
}

/// Called by UCX (on the owning thread, inside `ucp_worker_progress`) when an endpoint fails.
unsafe extern "C" fn on_ep_error(arg: *mut c_void, _ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    // SAFETY: `arg` is the address of one `Cell<sys::ucs_status_t>` of `UcxTransport::failed`, a boxed slice
    // that outlives every endpoint (endpoints are closed before it is dropped), and the callback
    // runs on the thread that owns the transport, so the `Cell` is never shared.
    let cell = unsafe { &*(arg as *const Cell<sys::ucs_status_t>) };
    cell.set(status);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReqKind {
    /// A send or receive a collective posted.
    Data,
    /// Receive of a stale message, only to remove it.
    Drain,
    /// Handshake and abort messages.
    Ctrl,
}

struct Req {
    ptr: *mut c_void,
    recv: bool,
    kind: ReqKind,
    peer: Rank,
    expected: usize,
    owned: Option<Vec<u8>>,
}

enum SendSource {
    Region(Range<usize>),
    Owned(Vec<u8>),
}

enum RecvTarget {
    Region(Range<usize>),
    Owned(Vec<u8>),
}

/// This rank's shared-memory window: memory UCX allocated (`ucp_mem_map` with
/// `UCP_MEM_MAP_ALLOCATE`, from a shared-memory domain when there is one) so that peers on the
/// same node can map it (`ucp_rkey_ptr`).
struct LocalWindow {
    memh: sys::ucp_mem_h,
    addr: *mut u8,
    len: usize,
}

/// A peer's window mapped into this process.
struct PeerWindow {
    rkey: sys::ucp_rkey_h,
    ptr: *const u8,
    len: usize,
}

/// The UCP objects of one group, owned by one thread.
pub struct UcxTransport {
    context: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    efd: Option<i32>,
    eps: Vec<sys::ucp_ep_h>,
    /// Per-rank status set by `on_ep_error` (0 = healthy).
    failed: Box<[Cell<sys::ucs_status_t>]>,
    rank: Rank,
    world: u32,
    generation: Generation,
    buf: OpBuf,
    inflight: InFlight,
    reqs: HashMap<ReqId, Req>,
    next_id: u64,
    broken: Option<String>,
    /// Set when a request could not be retired after a failure: UCX may still write the
    /// attached buffer, so it is never handed back (it is leaked instead).
    poisoned: bool,
    dropped: u64,
    /// Control messages not signed with the generation's key (P-9), dropped.
    forged: u64,
    abort_recv: Option<(ReqId, Vec<u8>)>,
    last_sweep: Instant,
    spin: Duration,
    live: Option<Liveness>,
    /// The generation's key from the exchange: signs and checks every control message.
    key: GroupKey,
    peer_mode: bool,
    window: Option<LocalWindow>,
    mapped: HashMap<Rank, PeerWindow>,
    /// Idle waits nap instead of yielding (see `Transport::patient`).
    patient: bool,
    /// Nanoseconds this rank's waits were descheduled beyond what they asked for (see
    /// `STALL_MIN`): time the rank itself held its peers up, not time it waited for them.
    stalled: Arc<AtomicU64>,
}

const CTRL_SLOT_BUF: usize = 64;

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
            context,
            worker,
            efd: None,
            eps: vec![std::ptr::null_mut(); world as usize],
            failed: (0..world).map(|_| Cell::new(0)).collect(),
            rank,
            world,
            generation,
            buf: OpBuf::None,
            inflight: InFlight::default(),
            reqs: HashMap::new(),
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
            window: None,
            mapped: HashMap::new(),
            patient: false,
            stalled: Arc::new(AtomicU64::new(0)),
        };
        let mut efd: i32 = -1;
        // SAFETY: `t.worker` is a live worker created with UCP_FEATURE_WAKEUP; `efd` is a valid
        // out-pointer.
        if unsafe { sys::ucp_worker_get_efd(t.worker, &mut efd) } == sys::ucs_status_t_UCS_OK {
            t.efd = Some(efd);
        }
        let listener = LivenessListener::bind(&cfg.liveness_ip)?;
        let local = encode_address(listener.addr, &t.address()?);
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
    fn links(&self) -> Vec<PeerLink> {
        const MAX_LANES: usize = 16;
        let mut out = Vec::new();
        for (r, &ep) in self.eps.iter().enumerate() {
            if ep.is_null() {
                continue;
            }
            let mut entries: [sys::ucp_transport_entry_t; MAX_LANES] =
                // SAFETY: a transport entry is two pointers; null is a valid value for both.
                unsafe { std::mem::zeroed() };
            // SAFETY: an all-zero ucp_ep_attr_t is "no fields"; the transports field is set below.
            let mut attr: sys::ucp_ep_attr_t = unsafe { std::mem::zeroed() };
            attr.field_mask = sys::ucp_ep_attr_field_UCP_EP_ATTR_FIELD_TRANSPORTS as u64;
            attr.transports.entries = entries.as_mut_ptr();
            attr.transports.num_entries = MAX_LANES as u32;
            attr.transports.entry_size = std::mem::size_of::<sys::ucp_transport_entry_t>();
            // SAFETY: live endpoint of this worker; `entries` holds `num_entries` entries of
            // `entry_size` bytes and outlives the call.
            let st = unsafe { sys::ucp_ep_query(ep, &mut attr) };
            if st != sys::ucs_status_t_UCS_OK {
                continue;
            }
            let n = (attr.transports.num_entries as usize).min(MAX_LANES);
            let name = |p: *const std::os::raw::c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    // SAFETY: UCX returned a NUL-terminated string valid while the endpoint is
                    // open; it is copied at once.
                    unsafe { std::ffi::CStr::from_ptr(p) }
                        .to_string_lossy()
                        .into_owned()
                }
            };
            let lanes: Vec<(String, String)> = entries[..n]
                .iter()
                .map(|e| (name(e.transport_name), name(e.device_name)))
                .collect();
            out.push(PeerLink::new(Rank(r as u32), lanes));
        }
        out
    }

    fn address(&self) -> Result<Vec<u8>, RuntimeError> {
        let mut addr: *mut sys::ucp_address_t = std::ptr::null_mut();
        let mut len: usize = 0;
        // SAFETY: live worker, valid out-pointers.
        let st = unsafe { sys::ucp_worker_get_address(self.worker, &mut addr, &mut len) };
        if st != sys::ucs_status_t_UCS_OK {
            return Err(ucx_err("worker_get_address", st));
        }
        // SAFETY: UCX returned `len` readable bytes at `addr`, valid until released below.
        let v = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        // SAFETY: `addr` came from ucp_worker_get_address on this worker and is released once.
        unsafe { sys::ucp_worker_release_address(self.worker, addr) };
        Ok(v)
    }

    fn connect_ep(&mut self, peer: Rank, addr: &[u8]) -> Result<(), RuntimeError> {
        if addr.is_empty() {
            return Err(RuntimeError::Bootstrap {
                addr: "address exchange".into(),
                reason: format!("rank {peer} published an empty worker address"),
            });
        }
        // SAFETY: an all-zero ucp_ep_params_t is the documented "no fields set" value.
        let mut p: sys::ucp_ep_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = (sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
            | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
            | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLER)
            as u64;
        p.address = addr.as_ptr() as *const sys::ucp_address_t;
        p.err_mode = if self.peer_mode {
            sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER
        } else {
            sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_NONE
        };
        p.err_handler.cb = Some(on_ep_error);
        p.err_handler.arg =
            &self.failed[peer.0 as usize] as *const Cell<sys::ucs_status_t> as *mut c_void;
        let mut ep: sys::ucp_ep_h = std::ptr::null_mut();
        // SAFETY: live worker; `p` is fully initialised and `addr` outlives the call (UCX copies
        // what it needs); the error-handler argument outlives the endpoint (see on_ep_error).
        let st = unsafe { sys::ucp_ep_create(self.worker, &p, &mut ep) };
        if st != sys::ucs_status_t_UCS_OK {
            return Err(RuntimeError::PeerFailed {
                rank: peer,
                op: "connect",
                reason: format!(
                    "cannot create an endpoint to its address: {}",
                    status_str(st)
                ),
            });
        }
        self.eps[peer.0 as usize] = ep;
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

    fn post_abort_recv(&mut self) -> Result<(), RuntimeError> {
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
        self.abort_recv = Some((id, Vec::new()));
        Ok(())
    }

    fn id(&mut self) -> ReqId {
        self.next_id += 1;
        ReqId(self.next_id)
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

    fn check_peer(&self, op: &'static str, peer: Rank) -> Result<sys::ucp_ep_h, RuntimeError> {
        match self.eps.get(peer.0 as usize) {
            Some(ep) if !ep.is_null() => Ok(*ep),
            _ => Err(RuntimeError::InvalidArgument {
                op,
                reason: format!(
                    "peer {peer} is not another live member of a world of {}",
                    self.world
                ),
            }),
        }
    }

    fn region_ptr(&mut self, r: &Range<usize>) -> *mut u8 {
        // `r` was checked against the buffer's length by the caller.
        self.buf.bytes_mut()[r.clone()].as_mut_ptr()
    }

    fn post_send_raw(
        &mut self,
        to: Rank,
        t: u64,
        src: SendSource,
        kind: ReqKind,
    ) -> Result<ReqId, RuntimeError> {
        let ep = self.check_peer("send", to)?;
        let (ptr, len, owned) = match src {
            SendSource::Region(r) => {
                let len = r.len();
                (self.region_ptr(&r) as *const u8, len, None)
            }
            SendSource::Owned(v) => (v.as_ptr(), v.len(), Some(v)),
        };
        // SAFETY: an all-zero ucp_request_param_t means "no optional fields".
        let mut p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
        // Always get a request back, so completion is handled in exactly one place.
        p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        // SAFETY: `ep` is a live endpoint of this worker; `ptr..ptr+len` stays valid and unwritten
        // until the request completes: owned buffers are kept in `self.reqs`, regions are in the
        // in-flight set (no writer is handed out) and the attached buffer is not released while
        // requests are outstanding (`detach` retires them, or leaks the buffer).
        let sp = unsafe { sys::ucp_tag_send_nbx(ep, ptr as *const c_void, len, t, &p) };
        let req = ucx_rs::decode_status_ptr(sp).map_err(|st| RuntimeError::PeerFailed {
            rank: to,
            op: "send",
            reason: status_str(st),
        })?;
        let id = self.id();
        match req {
            Some(ptr) => {
                self.reqs.insert(
                    id,
                    Req {
                        ptr,
                        recv: false,
                        kind,
                        peer: to,
                        expected: len,
                        owned,
                    },
                );
            }
            // NO_IMM_CMPL makes this unreachable in UCX 1.22; handled for other versions.
            None => {
                let done = std::ptr::null_mut();
                self.reqs.insert(
                    id,
                    Req {
                        ptr: done,
                        recv: false,
                        kind,
                        peer: to,
                        expected: len,
                        owned,
                    },
                );
            }
        }
        Ok(id)
    }

    fn post_recv_raw(
        &mut self,
        from: Rank,
        t: u64,
        mask: u64,
        target: RecvTarget,
        kind: ReqKind,
    ) -> Result<ReqId, RuntimeError> {
        let (ptr, len, owned) = match target {
            RecvTarget::Region(r) => {
                let len = r.len();
                (self.region_ptr(&r), len, None)
            }
            RecvTarget::Owned(mut v) => (v.as_mut_ptr(), v.len(), Some(v)),
        };
        // SAFETY: see post_send_raw.
        let mut p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
        p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        // SAFETY: live worker; `ptr..ptr+len` is exclusively reserved for UCX until the request
        // completes (owned buffers are held in `self.reqs`; regions are in the in-flight set as
        // writes, so nothing else reads or writes them; the attached buffer outlives them).
        let sp =
            unsafe { sys::ucp_tag_recv_nbx(self.worker, ptr as *mut c_void, len, t, mask, &p) };
        let req = ucx_rs::decode_status_ptr(sp).map_err(|st| ucx_err("tag_recv", st))?;
        let id = self.id();
        let ptr = req.unwrap_or(std::ptr::null_mut());
        self.reqs.insert(
            id,
            Req {
                ptr,
                recv: true,
                kind,
                peer: from,
                expected: len,
                owned,
            },
        );
        Ok(id)
    }

    fn progress(&mut self) -> bool {
        let mut any = false;
        // SAFETY: live worker, called from its owning thread.
        while unsafe { sys::ucp_worker_progress(self.worker) } != 0 {
            any = true;
        }
        any
    }

    /// Polls every request once; returns the first that completed, with its status and length.
    /// The abort receive is polled first: an abort that arrived is seen before a data
    /// completion of the same poll (P-6), and a forged one is counted before the operation
    /// it came during can return (P-9).
    fn poll_reqs(&mut self) -> Option<(ReqId, Req, sys::ucs_status_t, usize)> {
        let mut done = None;
        let abort = self.abort_recv.as_ref().map(|(a, _)| *a);
        let first = abort.and_then(|a| self.reqs.get(&a).map(|r| (a, r)));
        let rest = self.reqs.iter().filter(|(id, _)| Some(**id) != abort);
        for (id, r) in first.into_iter().chain(rest.map(|(id, r)| (*id, r))) {
            let (st, len) = if r.ptr.is_null() {
                (sys::ucs_status_t_UCS_OK, r.expected)
            } else if r.recv {
                let mut info = sys::ucp_tag_recv_info_t::default();
                // SAFETY: `r.ptr` is a live receive request of this worker; `info` is valid.
                let st = unsafe { sys::ucp_tag_recv_request_test(r.ptr, &mut info) };
                (st, info.length)
            } else {
                // SAFETY: `r.ptr` is a live, not yet freed request of this worker.
                (unsafe { sys::ucp_request_check_status(r.ptr) }, r.expected)
            };
            if st != sys::ucs_status_t_UCS_INPROGRESS {
                done = Some((id, st, len));
                break;
            }
        }
        let (id, st, len) = done?;
        let r = self.reqs.remove(&id)?;
        if !r.ptr.is_null() {
            // SAFETY: the request completed and is freed exactly once.
            unsafe { sys::ucp_request_free(r.ptr) };
        }
        self.inflight.remove(id);
        Some((id, r, st, len))
    }
}

impl UcxTransport {
    /// Destroys the rkeys of every mapped peer window (before endpoints close, as UCX asks).
    fn unmap_peer_windows(&mut self) {
        for (_, w) in self.mapped.drain() {
            // SAFETY: the rkey came from ucp_ep_rkey_unpack on an endpoint that is still open
            // (this runs before endpoints are closed) and is destroyed exactly once; nothing
            // reads through `w.ptr` afterwards (the map entry is gone).
            unsafe { sys::ucp_rkey_destroy(w.rkey) };
        }
    }

    fn alloc_window(&mut self, bytes: usize) -> Option<LocalWindow> {
        // SAFETY: an all-zero ucp_mem_map_params_t is "no optional fields".
        let mut p: sys::ucp_mem_map_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = (sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_LENGTH
            | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_FLAGS)
            as u64;
        p.length = bytes;
        p.flags = sys::UCP_MEM_MAP_ALLOCATE;
        let mut memh: sys::ucp_mem_h = std::ptr::null_mut();
        // SAFETY: live context, valid params and out-pointer.
        let st = unsafe { sys::ucp_mem_map(self.context, &p, &mut memh) };
        if st != sys::ucs_status_t_UCS_OK {
            return None;
        }
        // SAFETY: zeroed attributes; the field mask says what to fill.
        let mut attr: sys::ucp_mem_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask = (sys::ucp_mem_attr_field_UCP_MEM_ATTR_FIELD_ADDRESS
            | sys::ucp_mem_attr_field_UCP_MEM_ATTR_FIELD_LENGTH) as u64;
        // SAFETY: `memh` is the live handle just mapped; `attr` is a valid out-pointer.
        let st = unsafe { sys::ucp_mem_query(memh, &mut attr) };
        if st != sys::ucs_status_t_UCS_OK || attr.address.is_null() || attr.length < bytes {
            // SAFETY: unmapped once, never used.
            unsafe { sys::ucp_mem_unmap(self.context, memh) };
            return None;
        }
        Some(LocalWindow {
            memh,
            addr: attr.address as *mut u8,
            len: bytes,
        })
    }

    fn pack_window_key(&self, w: &LocalWindow) -> Option<Vec<u8>> {
        let mut buf: *mut c_void = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: live context and memory handle of it; valid out-pointers.
        let st = unsafe { sys::ucp_rkey_pack(self.context, w.memh, &mut buf, &mut size) };
        if st != sys::ucs_status_t_UCS_OK || buf.is_null() {
            return None;
        }
        let mut key = Vec::with_capacity(16 + size);
        key.extend_from_slice(&(w.addr as u64).to_le_bytes());
        key.extend_from_slice(&(w.len as u64).to_le_bytes());
        // SAFETY: UCX returned `size` readable bytes at `buf`, valid until released below.
        key.extend_from_slice(unsafe { std::slice::from_raw_parts(buf as *const u8, size) });
        // SAFETY: `buf` came from ucp_rkey_pack and is released once.
        unsafe { sys::ucp_rkey_buffer_release(buf) };
        Some(key)
    }
}

const SWEEP_EVERY: Duration = Duration::from_millis(10);

/// A request UCX finished: its id, status and received length.
struct Done {
    id: ReqId,
    st: sys::ucs_status_t,
    len: usize,
}
/// After `spin` without progress, yield the core for this long before sleeping on the fd.
const YIELD_FOR: Duration = Duration::from_millis(5);
/// A wait loop iteration that comes back this much later than it asked to (a yield, a nap, a
/// poll's timeout) was descheduled: CPU contention, a cgroup CPU quota running out, a stop.
/// Shorter gaps are the ordinary scheduling of ranks that share cores.
const STALL_MIN: Duration = Duration::from_millis(10);
/// What a patient wait sleeps instead of yielding (see `Transport::patient`).
const PATIENT_NAP: Duration = Duration::from_micros(50);
/// Scratch size for draining stale messages; longer ones are truncated, which drops them too.
const DRAIN_BUF: usize = 64 * 1024;

impl UcxTransport {
    /// The one wait loop: progress, endpoint failures, aborts from peers, completions, the
    /// stale-message sweep, the deadline, and sleeping on the worker's event fd when idle.
    fn wait_inner(
        &mut self,
        op: &'static str,
        timeout: Duration,
        connecting: bool,
    ) -> Result<Completion, RuntimeError> {
        self.check_open(op)?;
        let deadline = Instant::now() + timeout;
        let mut last_activity = Instant::now();
        // The previous iteration's start and how long it meant to sleep.
        let (mut prev, mut planned) = (last_activity, Duration::ZERO);
        loop {
            let top = Instant::now();
            let gap = top.duration_since(prev);
            if gap > planned + STALL_MIN {
                self.stalled
                    .fetch_add((gap - planned).as_nanos() as u64, Ordering::Relaxed);
            }
            (prev, planned) = (top, Duration::ZERO);
            let mut active = self.progress();
            if let Some(r) = self.failed.iter().position(|c| c.get() != 0) {
                let st = self.failed[r].get();
                return Err(self.fail(RuntimeError::PeerFailed {
                    rank: Rank(r as u32),
                    op,
                    reason: format!("UCX reported the endpoint failed: {}", status_str(st)),
                }));
            }
            while let Some((id, req, st, len)) = self.poll_reqs() {
                active = true;
                let done = Done { id, st, len };
                if let Some(c) = self.on_completion(op, timeout, connecting, done, req)? {
                    return Ok(c);
                }
            }
            let now = Instant::now();
            if now.duration_since(self.last_sweep) >= SWEEP_EVERY || !active {
                if let Some((r, why)) = self.live.as_mut().and_then(|l| l.check()) {
                    return Err(self.fail(RuntimeError::PeerFailed {
                        rank: r,
                        op,
                        reason: why,
                    }));
                }
            }
            if now.duration_since(self.last_sweep) >= SWEEP_EVERY {
                self.sweep();
                self.last_sweep = now;
            }
            if now >= deadline {
                let e = RuntimeError::Timeout {
                    op,
                    after: timeout,
                    generation: self.generation,
                };
                return Err(self.fail(e));
            }
            if active {
                last_activity = now;
                continue;
            }
            let idle = now.duration_since(last_activity);
            if idle < self.spin {
                continue;
            }
            // The worker's event fd does not fire for every shared-memory event (measured: an
            // op that sleeps on it as soon as it idles runs 4x slower), so a short idle yields
            // the core to the peers this rank is waiting for (or, when patient, naps: a yield
            // still takes half a shared core from a peer doing the work), and only a long one
            // sleeps.
            if idle < YIELD_FOR {
                if self.patient {
                    planned = PATIENT_NAP;
                    std::thread::sleep(PATIENT_NAP);
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            planned = (deadline - now).min(Duration::from_millis(1));
            self.sleep(planned);
        }
    }

    /// One finished request of a wait: a completion to return, an error that fails the
    /// group, or `None` to keep waiting (a drained stale message, a forged abort, a send).
    fn on_completion(
        &mut self,
        op: &'static str,
        timeout: Duration,
        connecting: bool,
        done: Done,
        req: Req,
    ) -> Result<Option<Completion>, RuntimeError> {
        let Done { id, st, len } = done;
        match (req.kind, req.recv) {
            (ReqKind::Drain, _) => {}
            (ReqKind::Ctrl, false) => {
                if st != sys::ucs_status_t_UCS_OK && connecting {
                    return Err(self.fail(RuntimeError::PeerFailed {
                        rank: req.peer,
                        op,
                        reason: format!("handshake send failed: {}", status_str(st)),
                    }));
                }
            }
            (ReqKind::Ctrl, true) if self.abort_recv.as_ref().is_some_and(|(a, _)| *a == id) => {
                self.abort_recv = None;
                let bytes = req.owned.unwrap_or_default();
                let parsed = if st == sys::ucs_status_t_UCS_OK {
                    decode_ctrl(&bytes[..len.min(bytes.len())], &self.key)
                } else {
                    Err(CtrlError::Malformed(format!(
                        "abort message not received: {}",
                        status_str(st)
                    )))
                };
                match parsed {
                    Ok(Ctrl::Abort {
                        reporter,
                        subject,
                        generation,
                        timeout: to,
                    }) if generation == self.generation => {
                        let e = abort_error(op, reporter, subject, to, self.generation, timeout);
                        return Err(self.fail(e));
                    }
                    Ok(_) => {
                        self.dropped += 1;
                        self.post_abort_recv()?;
                    }
                    Err(CtrlError::NotAMember) => {
                        // P-9: only a member can fail the group; this one is dropped.
                        self.forged += 1;
                        self.dropped += 1;
                        self.post_abort_recv()?;
                    }
                    Err(reason) => {
                        return Err(self.fail(RuntimeError::MalformedMessage {
                            from: Rank(u32::MAX),
                            op,
                            reason: format!("control message: {reason}"),
                        }))
                    }
                }
            }
            (_, recv) => {
                if st == sys::ucs_status_t_UCS_ERR_MESSAGE_TRUNCATED {
                    return Err(self.fail(RuntimeError::MalformedMessage {
                        from: req.peer,
                        op,
                        reason: format!(
                            "message longer than the {} bytes expected; every rank must pass a buffer of the same length",
                            req.expected
                        ),
                    }));
                }
                if st != sys::ucs_status_t_UCS_OK {
                    return Err(self.fail(RuntimeError::PeerFailed {
                        rank: req.peer,
                        op,
                        reason: format!(
                            "{} failed: {}",
                            if recv { "receive" } else { "send" },
                            status_str(st)
                        ),
                    }));
                }
                if recv && len != req.expected && req.kind == ReqKind::Data {
                    return Err(self.fail(RuntimeError::MessageLength {
                        from: req.peer,
                        op,
                        expected: req.expected,
                        got: len,
                    }));
                }
                let mut buf = req.owned;
                if let (Some(b), true) = (buf.as_mut(), req.kind == ReqKind::Ctrl) {
                    b.truncate(len);
                }
                return Ok(Some(Completion { id, buf }));
            }
        }
        Ok(None)
    }

    /// Sleeps until the worker has an event or `max` passes.
    fn sleep(&mut self, max: Duration) {
        let Some(fd) = self.efd else {
            std::thread::yield_now();
            return;
        };
        // SAFETY: live worker created with UCP_FEATURE_WAKEUP, on its owning thread.
        let st = unsafe { sys::ucp_worker_arm(self.worker) };
        if st != sys::ucs_status_t_UCS_OK {
            // UCS_ERR_BUSY: events are pending, go and progress them.
            return;
        }
        // The worker's events, and any liveness connection closing.
        let mut fds = vec![libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        for s in self.live.as_ref().map(|l| l.fds()).unwrap_or_default() {
            fds.push(libc::pollfd {
                fd: s,
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            });
        }
        let ms = max.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of pollfds of its length; the fds (the worker's event fd
        // and the liveness sockets) stay open for the call. An EINTR or error return only ends
        // the sleep early.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    }

    /// Removes every unexpected message whose tag is not of this generation (or of an invalid
    /// kind), counting each (P-1).
    fn sweep(&mut self) {
        for (t, m) in stale_patterns(self.generation) {
            loop {
                let mut info = sys::ucp_tag_recv_info_t::default();
                // SAFETY: live worker; `info` is a valid out-pointer; remove=1 hands the message
                // to us, and it is received (and so released) right below.
                let msg = unsafe { sys::ucp_tag_probe_nb(self.worker, t, m, 1, &mut info) };
                if msg.is_null() {
                    break;
                }
                self.dropped += 1;
                let mut scratch = vec![0u8; DRAIN_BUF.min(info.length.max(1))];
                // SAFETY: see post_recv_raw: a zeroed param is "no optional fields".
                let mut p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
                p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
                // SAFETY: `msg` came from ucp_tag_probe_nb(remove=1) and is received once;
                // `scratch` is held in `self.reqs` until the request completes.
                let sp = unsafe {
                    sys::ucp_tag_msg_recv_nbx(
                        self.worker,
                        scratch.as_mut_ptr() as *mut c_void,
                        scratch.len(),
                        msg,
                        &p,
                    )
                };
                if let Ok(Some(ptr)) = ucx_rs::decode_status_ptr(sp) {
                    let id = self.id();
                    let peer = Rank(untag(info.sender_tag).src);
                    self.reqs.insert(
                        id,
                        Req {
                            ptr,
                            recv: true,
                            kind: ReqKind::Drain,
                            peer,
                            expected: scratch.len(),
                            owned: Some(scratch),
                        },
                    );
                }
            }
        }
    }

    /// Breaks the group: tells every live peer, then retires every request so that UCX no
    /// longer touches our buffers. Returns `err` for the caller to report.
    fn fail(&mut self, err: RuntimeError) -> RuntimeError {
        if self.broken.is_some() {
            return err;
        }
        self.broken = Some(err.to_string());
        let (subject, timeout) = match &err {
            RuntimeError::PeerFailed { rank, .. } => {
                (Some(*rank).filter(|r| r.0 < self.world), false)
            }
            RuntimeError::Timeout { .. } => (None, true),
            RuntimeError::MalformedMessage { from, .. }
            | RuntimeError::MessageLength { from, .. } => {
                (Some(*from).filter(|r| r.0 < self.world), false)
            }
            _ => (None, false),
        };
        let abort = encode_ctrl(
            &Ctrl::Abort {
                reporter: self.rank,
                subject,
                generation: self.generation,
                timeout,
            },
            &self.key,
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
        let mut sent = Vec::new();
        for r in 0..self.world {
            let alive = self.failed[r as usize].get() == 0;
            if r != self.rank.0 && alive && !self.eps[r as usize].is_null() {
                if let Ok(id) =
                    self.post_send_raw(Rank(r), t, SendSource::Owned(abort.clone()), ReqKind::Ctrl)
                {
                    sent.push(id);
                }
            }
        }
        // Give the aborts a moment to leave before the endpoints are closed under them.
        let until = Instant::now() + Duration::from_millis(50);
        while sent.iter().any(|id| self.reqs.contains_key(id)) && Instant::now() < until {
            self.progress();
            while self.poll_reqs().is_some() {}
        }
        self.retire();
        err
    }

    /// Cancels receives and force-closes every endpoint (which completes every outstanding
    /// send), then waits a bounded time for all requests to report completion.
    fn retire(&mut self) {
        // Mapped windows go first: UCX requires an rkey to be destroyed before its endpoint.
        self.unmap_peer_windows();
        for r in self.reqs.values() {
            if r.recv && !r.ptr.is_null() {
                // SAFETY: live request of this worker, not yet freed.
                unsafe { sys::ucp_request_cancel(self.worker, r.ptr) };
            }
        }
        let mut closing = Vec::new();
        for ep in self.eps.iter_mut() {
            if ep.is_null() {
                continue;
            }
            // SAFETY: zeroed param = no optional fields; then request a forced close.
            let mut p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
            p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = sys::ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE;
            // SAFETY: `*ep` is a live endpoint, closed exactly once (nulled right after).
            let sp = unsafe { sys::ucp_ep_close_nbx(*ep, &p) };
            if let Ok(Some(req)) = ucx_rs::decode_status_ptr(sp) {
                closing.push(req);
            }
            *ep = std::ptr::null_mut();
        }
        // With peer error mode UCX completes every request of a force-closed endpoint; without
        // it some never complete, and waiting longer would only delay the error.
        let bound = if self.peer_mode { 500 } else { 50 };
        let until = Instant::now() + Duration::from_millis(bound);
        loop {
            self.progress();
            while self.poll_reqs().is_some() {}
            closing.retain(|&req| {
                // SAFETY: live close request, freed once when done.
                let st = unsafe { sys::ucp_request_check_status(req) };
                if st != sys::ucs_status_t_UCS_INPROGRESS {
                    // SAFETY: completed request, freed exactly once.
                    unsafe { sys::ucp_request_free(req) };
                    false
                } else {
                    true
                }
            });
            if (self.reqs.is_empty() && closing.is_empty()) || Instant::now() >= until {
                break;
            }
            std::thread::yield_now();
        }
        if !self.reqs.is_empty() || !closing.is_empty() {
            // UCX may still write into the attached buffer or an owned one: keep all of them
            // until the worker is destroyed in Drop, and never hand the buffer back.
            self.poisoned = true;
            for req in closing {
                self.reqs.insert(
                    ReqId(u64::MAX - self.reqs.len() as u64),
                    Req {
                        ptr: req,
                        recv: false,
                        kind: ReqKind::Ctrl,
                        peer: self.rank,
                        expected: 0,
                        owned: None,
                    },
                );
            }
        }
        self.inflight.clear();
        self.abort_recv = None;
    }
}

impl Drop for UcxTransport {
    fn drop(&mut self) {
        if self.broken.is_none() {
            // The standing abort receive is ours to cancel, or UCX reports it leaked.
            if let Some((id, _)) = self.abort_recv.take() {
                if let Some(r) = self.reqs.get(&id) {
                    // SAFETY: live receive request of this worker.
                    unsafe { sys::ucp_request_cancel(self.worker, r.ptr) };
                }
            }
            self.unmap_peer_windows();
            // Orderly teardown: flush what we sent to peers that may still be receiving it.
            let mut closing = Vec::new();
            for ep in self.eps.iter_mut().filter(|e| !e.is_null()) {
                // SAFETY: zeroed param = flush-close with no optional fields.
                let p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
                // SAFETY: live endpoint, closed once, nulled right after.
                let sp = unsafe { sys::ucp_ep_close_nbx(*ep, &p) };
                match ucx_rs::decode_status_ptr(sp) {
                    Ok(Some(req)) => closing.push((req, *ep)),
                    _ => *ep = std::ptr::null_mut(),
                }
            }
            let until = Instant::now() + Duration::from_secs(1);
            while !(closing.is_empty() && self.reqs.is_empty()) && Instant::now() < until {
                self.progress();
                while self.poll_reqs().is_some() {}
                closing.retain(|&(req, _)| {
                    // SAFETY: live close request of this worker.
                    let st = unsafe { sys::ucp_request_check_status(req) };
                    if st != sys::ucs_status_t_UCS_INPROGRESS {
                        // SAFETY: completed request, freed exactly once.
                        unsafe { sys::ucp_request_free(req) };
                        false
                    } else {
                        true
                    }
                });
            }
            for (req, _) in closing {
                // SAFETY: a close that did not finish in time: let UCX free it when it does;
                // the worker is destroyed below, which releases everything it owns.
                unsafe { sys::ucp_request_free(req) };
            }
            for ep in self.eps.iter_mut() {
                *ep = std::ptr::null_mut();
            }
            self.broken = Some("closed".into());
        } else {
            self.retire();
        }
        // Requests still held (only after a failed retire) belong to the worker; it frees them.
        self.reqs.clear();
        if let Some(w) = self.window.take() {
            // SAFETY: the window was mapped on this context and is unmapped once; no UCX request
            // ever uses it (it is only read and written with plain copies), and peers that
            // mapped it keep their own mapping of the shared pages.
            unsafe { sys::ucp_mem_unmap(self.context, w.memh) };
        }
        // SAFETY: every endpoint is closed; the worker and then the context are destroyed once,
        // on the owning thread. Buffers UCX might have touched are dropped only after this.
        unsafe {
            sys::ucp_worker_destroy(self.worker);
            sys::ucp_cleanup(self.context);
        }
    }
}

/// Creates the UCP context (tag matching + wakeup) and a single-threaded worker.
fn init(cfg: &UcxConfig) -> Result<(sys::ucp_context_h, sys::ucp_worker_h), RuntimeError> {
    let mut config: *mut sys::ucp_config_t = std::ptr::null_mut();
    // SAFETY: NULL prefix and file mean "UCX_ from the environment"; valid out-pointer.
    let st = unsafe { sys::ucp_config_read(std::ptr::null(), std::ptr::null(), &mut config) };
    if st != sys::ucs_status_t_UCS_OK {
        return Err(ucx_err("config_read", st));
    }
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
        let (k, v) = (
            CString::new(key).unwrap_or_default(),
            CString::new(value).unwrap_or_default(),
        );
        // SAFETY: `config` is live; both strings are NUL-terminated and outlive the call.
        let st = unsafe { sys::ucp_config_modify(config, k.as_ptr(), v.as_ptr()) };
        if st != sys::ucs_status_t_UCS_OK {
            // SAFETY: `config` is released exactly once.
            unsafe { sys::ucp_config_release(config) };
            return Err(RuntimeError::Transport {
                op: "config_modify",
                reason: format!("{key}={value}: {}", status_str(st)),
            });
        }
    }
    // SAFETY: zeroed params = no optional fields.
    let mut p: sys::ucp_params_t = unsafe { std::mem::zeroed() };
    p.field_mask = sys::ucp_params_field_UCP_PARAM_FIELD_FEATURES as u64;
    p.features = (sys::ucp_feature_UCP_FEATURE_TAG | sys::ucp_feature_UCP_FEATURE_WAKEUP) as u64;
    let mut ctx: sys::ucp_context_h = std::ptr::null_mut();
    // SAFETY: `p` and `config` are valid; ucp_init is a static inline, this is its real entry.
    let st = unsafe {
        sys::ucp_init_version(sys::UCP_API_MAJOR, sys::UCP_API_MINOR, &p, config, &mut ctx)
    };
    // SAFETY: `config` is released exactly once, after ucp_init_version copied it.
    unsafe { sys::ucp_config_release(config) };
    if st != sys::ucs_status_t_UCS_OK {
        return Err(ucx_err("init", st));
    }
    // SAFETY: zeroed params = no optional fields.
    let mut wp: sys::ucp_worker_params_t = unsafe { std::mem::zeroed() };
    wp.field_mask = sys::ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
    wp.thread_mode = sys::ucs_thread_mode_t_UCS_THREAD_MODE_SINGLE;
    let mut worker: sys::ucp_worker_h = std::ptr::null_mut();
    // SAFETY: live context, valid params and out-pointer.
    let st = unsafe { sys::ucp_worker_create(ctx, &wp, &mut worker) };
    if st != sys::ucs_status_t_UCS_OK {
        // SAFETY: the context is cleaned up once; no worker exists.
        unsafe { sys::ucp_cleanup(ctx) };
        return Err(ucx_err("worker_create", st));
    }
    Ok((ctx, worker))
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
        if !matches!(self.buf, OpBuf::None) {
            let e = RuntimeError::InvalidArgument {
                op: "attach",
                reason: "a buffer is already attached".into(),
            };
            return Err((e, buf));
        }
        self.buf = buf;
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
        check_range("send", self.buf.bytes().len(), &self.inflight, &r, false)?;
        let t = tag(KIND_DATA, self.generation, self.rank, key);
        let id = self.post_send_raw(to, t, SendSource::Region(r.clone()), ReqKind::Data)?;
        self.inflight.add(id, r, false);
        Ok(id)
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
        let t = tag(KIND_DATA, self.generation, from, key);
        let id = self.post_recv_raw(
            from,
            t,
            FULL_MASK,
            RecvTarget::Region(r.clone()),
            ReqKind::Data,
        )?;
        self.inflight.add(id, r, true);
        Ok(id)
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
        self.check_open("window_key")?;
        if bytes == 0 {
            return Ok(None);
        }
        if self.window.is_none() {
            self.window = self.alloc_window(bytes);
        }
        match &self.window {
            None => Ok(None),
            Some(w) if w.len != bytes => Err(RuntimeError::InvalidArgument {
                op: "window_key",
                reason: format!("a window of {} bytes exists, {bytes} asked", w.len),
            }),
            Some(w) => Ok(self.pack_window_key(w)),
        }
    }

    fn window_map(&mut self, peer: Rank, key: &[u8]) -> bool {
        if self.check_open("window_map").is_err() || key.len() <= 16 {
            return false;
        }
        let Ok(ep) = self.check_peer("window_map", peer) else {
            return false;
        };
        let (Some(addr), Some(len)) = (u64_le(key, 0), u64_le(key, 8)) else {
            return false;
        };
        let Ok(len) = usize::try_from(len) else {
            return false;
        };
        if len == 0 || addr.checked_add(len as u64).is_none() {
            return false;
        }
        if let Some(old) = self.mapped.remove(&peer) {
            // SAFETY: an rkey of a live endpoint, destroyed once (replaced below).
            unsafe { sys::ucp_rkey_destroy(old.rkey) };
        }
        let mut rkey: sys::ucp_rkey_h = std::ptr::null_mut();
        // SAFETY: live endpoint; `key[16..]` is the packed rkey the peer sent (UCX validates
        // what it parses and fails on garbage); valid out-pointer.
        let st =
            unsafe { sys::ucp_ep_rkey_unpack(ep, key[16..].as_ptr() as *const c_void, &mut rkey) };
        if st != sys::ucs_status_t_UCS_OK {
            return false;
        }
        let (mut first, mut last): (*mut c_void, *mut c_void) =
            (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: live rkey; valid out-pointers. ucp_rkey_ptr only translates addresses (the
        // segment was attached when the rkey was unpacked); UCS_ERR_UNREACHABLE when no
        // transport can map the peer's memory (another node, TCP), INVALID_ADDR when an
        // address is outside the peer's segment.
        let ok = unsafe {
            sys::ucp_rkey_ptr(rkey, addr, &mut first) == sys::ucs_status_t_UCS_OK
                && sys::ucp_rkey_ptr(rkey, addr + len as u64 - 1, &mut last)
                    == sys::ucs_status_t_UCS_OK
        };
        // The whole window must be one contiguous mapping here.
        if !ok || first.is_null() || (last as usize).wrapping_sub(first as usize) != len - 1 {
            // SAFETY: unpacked above, destroyed once, never used.
            unsafe { sys::ucp_rkey_destroy(rkey) };
            return false;
        }
        self.mapped.insert(
            peer,
            PeerWindow {
                rkey,
                ptr: first as *const u8,
                len,
            },
        );
        true
    }

    fn window_put(&mut self, at: usize, src: Range<usize>) -> Result<(), RuntimeError> {
        self.check_open("window_put")?;
        let Some(w) = &self.window else {
            return Err(RuntimeError::InvalidArgument {
                op: "window_put",
                reason: "no window".into(),
            });
        };
        check_window("window_put", at, src.len(), w.len)?;
        let dst = w.addr;
        let bytes = super::transport::region(&self.buf, &self.inflight, src)?;
        // Readers acknowledged (by message) that they are done with these bytes; their reads
        // happen before our writes.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: `dst + at .. + len` lies inside this rank's window (checked above), memory
        // UCX allocated for this context and keeps mapped until Drop; `bytes` is a checked view
        // of the attached buffer (not the window, so the ranges do not overlap). Peers only read
        // this slot after the announcement sent after this copy, and this slot's previous
        // chunk was acknowledged by every reader, so nobody reads these bytes concurrently.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.add(at), bytes.len()) };
        // The copy is globally visible before the announcement that follows.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn window_get(&mut self, peer: Rank, at: usize, dst: Range<usize>) -> Result<(), RuntimeError> {
        self.check_open("window_get")?;
        let Some(w) = self.mapped.get(&peer) else {
            return Err(RuntimeError::InvalidArgument {
                op: "window_get",
                reason: format!("rank {peer}'s window is not mapped"),
            });
        };
        check_window("window_get", at, dst.len(), w.len)?;
        let src = w.ptr;
        let out = super::transport::region_mut(&mut self.buf, &self.inflight, dst)?;
        // The announcement that these bytes are written was received before this read.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: `src + at .. + len` lies inside the peer's window as mapped into this process
        // (checked against the length verified with ucp_rkey_ptr at map time); the mapping lives
        // until the rkey is destroyed, which only happens with the map entry removed. The peer
        // wrote these bytes before announcing them and does not rewrite them until this rank
        // acknowledges (after this copy); a faulty peer writing anyway could only change the
        // bytes copied, not their bounds. `out` is a checked exclusive view of the attached
        // buffer, which is private memory, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.add(at), out.as_mut_ptr(), out.len()) };
        // Our reads complete before the acknowledgement that follows.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

fn u64_le(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

impl UcxTransport {
    /// Posts a raw-tagged send and waits (briefly) for it to leave.
    fn send_raw(&mut self, to: Rank, raw_tag: u64, bytes: Vec<u8>) -> Result<(), RuntimeError> {
        self.check_open("send_raw")?;
        let id = self.post_send_raw(to, raw_tag, SendSource::Owned(bytes), ReqKind::Ctrl)?;
        let until = Instant::now() + Duration::from_secs(2);
        while self.reqs.contains_key(&id) && Instant::now() < until {
            self.progress();
            // Only retire this request; others belong to no collective right now except the
            // standing abort receive, which poll_reqs would hand out: keep polling narrowly.
            if let Some(r) = self.reqs.get(&id) {
                // SAFETY: live send request of this worker.
                let st = unsafe { sys::ucp_request_check_status(r.ptr) };
                if st != sys::ucs_status_t_UCS_INPROGRESS {
                    if let Some(r) = self.reqs.remove(&id) {
                        // SAFETY: completed request, freed exactly once.
                        unsafe { sys::ucp_request_free(r.ptr) };
                    }
                }
            }
        }
        Ok(())
    }
}
