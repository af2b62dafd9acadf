//! The UCP C API as the transport uses it: the only `unsafe` code of the data plane.
//!
//! Every UCX handle is owned by one value that releases it in `Drop`, and each value holds (an
//! `Rc` of) what its handle needs: requests, endpoints and the attached buffer keep the worker
//! alive, the worker and memory windows keep the context, and an endpoint owns the remote key
//! unpacked on it. So whatever order the transport drops things in, UCX sees children released
//! before their parents: rkey before endpoint, endpoint and requests before worker, worker and
//! memory before context.
//!
//! Memory UCX may read or write until a request completes is owned here, never borrowed: an
//! owned buffer travels with its [`Request`], and the attached operation buffer lives in [`Lent`],
//! which hands out views only of ranges no request holds. A request dropped before it completes
//! gives its buffer (and keeps its range of the attached buffer) to the worker, which frees them
//! only after `ucp_worker_destroy`, when UCX can no longer touch them.
//!
//! Raw handles and `Rc` make every type here `!Send`: UCX objects stay on the thread that made
//! them, as `UCS_THREAD_MODE_SINGLE` requires.
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use crate::dataplane::transport::{check_range, check_window, region, region_mut, InFlight};
use crate::dataplane::transport::{OpBuf, ReqId};
use crate::error::RuntimeError;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::ffi::{c_void, CStr, CString};
use std::fmt;
use std::ops::Range;
use std::os::raw::c_char;
use std::rc::Rc;
use ucx_rs::sys;

/// A UCX status code.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Status(sys::ucs_status_t);

impl Status {
    pub(super) const OK: Status = Status(sys::ucs_status_t_UCS_OK);
    pub(super) const TRUNCATED: Status = Status(sys::ucs_status_t_UCS_ERR_MESSAGE_TRUNCATED);
    const IN_PROGRESS: Status = Status(sys::ucs_status_t_UCS_INPROGRESS);
    const INVALID_PARAM: Status = Status(sys::ucs_status_t_UCS_ERR_INVALID_PARAM);

    fn check(st: sys::ucs_status_t) -> Result<(), Status> {
        if st == sys::ucs_status_t_UCS_OK {
            Ok(())
        } else {
            Err(Status(st))
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", ucx_rs::status_string(self.0), self.0)
    }
}

/// Request parameters that always get a request back (`NO_IMM_CMPL`), so completion is
/// handled in exactly one place.
fn request_params() -> sys::ucp_request_param_t {
    // SAFETY: an all-zero ucp_request_param_t is the documented "no optional fields" value.
    let mut p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
    p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    p
}

// ---------------------------------------------------------------------------------------------
// Configuration and context
// ---------------------------------------------------------------------------------------------

/// UCP settings read from the `UCX_*` environment, adjusted before the context is made.
pub(super) struct Config(*mut sys::ucp_config_t);

impl Config {
    pub(super) fn from_env() -> Result<Config, Status> {
        let mut config: *mut sys::ucp_config_t = std::ptr::null_mut();
        // SAFETY: NULL prefix and file mean "UCX_ from the environment"; valid out-pointer.
        Status::check(unsafe {
            sys::ucp_config_read(std::ptr::null(), std::ptr::null(), &mut config)
        })?;
        Ok(Config(config))
    }

    pub(super) fn set(&mut self, key: &str, value: &str) -> Result<(), Status> {
        let (k, v) = (
            CString::new(key).unwrap_or_default(),
            CString::new(value).unwrap_or_default(),
        );
        // SAFETY: `self.0` is live; both strings are NUL-terminated and outlive the call.
        Status::check(unsafe { sys::ucp_config_modify(self.0, k.as_ptr(), v.as_ptr()) })
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        // SAFETY: read by ucp_config_read and released exactly once, here.
        unsafe { sys::ucp_config_release(self.0) };
    }
}

struct ContextHandle(sys::ucp_context_h);

impl Drop for ContextHandle {
    fn drop(&mut self) {
        // SAFETY: the last `Context` is gone, and with it every worker and memory window that
        // held one: nothing of this context is left, and it is cleaned up once.
        unsafe { sys::ucp_cleanup(self.0) };
    }
}

/// A UCP context with tag matching and wakeup.
#[derive(Clone)]
pub(super) struct Context(Rc<ContextHandle>);

impl Context {
    pub(super) fn new(config: &Config) -> Result<Context, Status> {
        // SAFETY: an all-zero ucp_params_t is "no optional fields"; the features are set below.
        let mut p: sys::ucp_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = sys::ucp_params_field_UCP_PARAM_FIELD_FEATURES as u64;
        p.features =
            (sys::ucp_feature_UCP_FEATURE_TAG | sys::ucp_feature_UCP_FEATURE_WAKEUP) as u64;
        let mut ctx: sys::ucp_context_h = std::ptr::null_mut();
        // SAFETY: `p` and the live `config` are valid for the call (UCX copies the config);
        // ucp_init is a static inline, this is its real entry.
        Status::check(unsafe {
            sys::ucp_init_version(
                sys::UCP_API_MAJOR,
                sys::UCP_API_MINOR,
                &p,
                config.0,
                &mut ctx,
            )
        })?;
        Ok(Context(Rc::new(ContextHandle(ctx))))
    }
}

// ---------------------------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------------------------

struct WorkerHandle {
    h: sys::ucp_worker_h,
    /// What UCX may still touch until the worker is destroyed: endpoint error slots, and the
    /// buffers of requests dropped before they completed. Dropped after `ucp_worker_destroy`.
    kept: RefCell<Vec<Box<dyn Any>>>,
    _context: Context,
}

impl WorkerHandle {
    fn keep(&self, x: Box<dyn Any>) {
        self.kept.borrow_mut().push(x);
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        // SAFETY: the last holder is gone: every endpoint was closed and every request freed
        // (each holds this handle). Destroyed once, on the owning thread (handles are !Send);
        // `kept` and the context are dropped only after this.
        unsafe { sys::ucp_worker_destroy(self.h) };
    }
}

/// A single-threaded UCP worker.
pub(super) struct Worker(Rc<WorkerHandle>);

impl Worker {
    pub(super) fn new(context: &Context) -> Result<Worker, Status> {
        // SAFETY: an all-zero ucp_worker_params_t is "no optional fields".
        let mut wp: sys::ucp_worker_params_t = unsafe { std::mem::zeroed() };
        wp.field_mask = sys::ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
        wp.thread_mode = sys::ucs_thread_mode_t_UCS_THREAD_MODE_SINGLE;
        let mut h: sys::ucp_worker_h = std::ptr::null_mut();
        // SAFETY: live context, valid params and out-pointer.
        Status::check(unsafe { sys::ucp_worker_create((context.0).0, &wp, &mut h) })?;
        Ok(Worker(Rc::new(WorkerHandle {
            h,
            kept: RefCell::new(Vec::new()),
            _context: context.clone(),
        })))
    }

    /// The worker's event fd, if it has one (it was created with `UCP_FEATURE_WAKEUP`).
    pub(super) fn event_fd(&self) -> Option<i32> {
        let mut efd: i32 = -1;
        // SAFETY: live worker; `efd` is a valid out-pointer.
        let st = unsafe { sys::ucp_worker_get_efd(self.0.h, &mut efd) };
        Status::check(st).ok().map(|_| efd)
    }

    /// Arms the event fd; an error (`UCS_ERR_BUSY`) means events are pending.
    pub(super) fn arm(&self) -> Result<(), Status> {
        // SAFETY: live worker created with UCP_FEATURE_WAKEUP, on its owning thread.
        Status::check(unsafe { sys::ucp_worker_arm(self.0.h) })
    }

    /// One round of progress; whether anything happened. Endpoint error callbacks run here.
    pub(super) fn progress(&self) -> bool {
        // SAFETY: live worker, called from its owning thread; no Rust reference into a buffer
        // UCX may write is held (those buffers are only reachable through this module's types,
        // which hand out views only of ranges no request holds).
        unsafe { sys::ucp_worker_progress(self.0.h) != 0 }
    }

    /// The worker's address, to publish to peers.
    pub(super) fn address(&self) -> Result<Vec<u8>, Status> {
        let mut addr: *mut sys::ucp_address_t = std::ptr::null_mut();
        let mut len: usize = 0;
        // SAFETY: live worker, valid out-pointers.
        Status::check(unsafe { sys::ucp_worker_get_address(self.0.h, &mut addr, &mut len) })?;
        // SAFETY: UCX returned `len` readable bytes at `addr`, valid until released below.
        let v = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        // SAFETY: `addr` came from ucp_worker_get_address on this worker and is released once.
        unsafe { sys::ucp_worker_release_address(self.0.h, addr) };
        Ok(v)
    }

    /// An endpoint to the worker at `addr` (a peer's published address, not empty). With
    /// `peer_mode`, UCX reports a failed peer through [`Endpoint::failure`].
    pub(super) fn connect(&self, addr: &[u8], peer_mode: bool) -> Result<Endpoint, Status> {
        if addr.is_empty() {
            return Err(Status::INVALID_PARAM);
        }
        let health = Rc::new(Cell::new(sys::ucs_status_t_UCS_OK));
        // SAFETY: an all-zero ucp_ep_params_t is the documented "no fields set" value.
        let mut p: sys::ucp_ep_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = (sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
            | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
            | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLER)
            as u64;
        p.address = addr.as_ptr() as *const sys::ucp_address_t;
        p.err_mode = if peer_mode {
            sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER
        } else {
            sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_NONE
        };
        p.err_handler.cb = Some(on_ep_error);
        p.err_handler.arg = Rc::as_ptr(&health) as *mut c_void;
        let mut h: sys::ucp_ep_h = std::ptr::null_mut();
        // SAFETY: live worker; `p` is fully initialised and `addr` outlives the call (UCX
        // copies what it needs). UCX parses the address without a length: the bytes must be
        // a worker address as published by a member (they come from the group's exchange).
        // The error-handler argument is kept by the worker below, so it outlives every
        // callback (see on_ep_error).
        Status::check(unsafe { sys::ucp_ep_create(self.0.h, &p, &mut h) })?;
        self.0.keep(Box::new(health.clone()));
        Ok(Endpoint {
            h,
            health,
            window: None,
            worker: self.0.clone(),
        })
    }

    /// Receives a message matching `tag` under `mask` into `buf`, which the request owns until
    /// it completes.
    pub(super) fn recv(&self, tag: u64, mask: u64, mut buf: Vec<u8>) -> Result<Request, Status> {
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        // SAFETY: the request owns `buf` (a Vec's heap storage does not move with the Vec), so
        // it stays valid and untouched until the request completes, or, if it is dropped first,
        // until the worker is destroyed (see Request's Drop).
        unsafe { self.recv_raw(tag, mask, ptr, len, Some(buf), None) }
    }

    /// Posts a receive into `ptr..ptr + len`.
    ///
    /// # Safety
    ///
    /// The memory must stay valid, and nothing else may read or write it, until the returned
    /// request completes or, if it is dropped before that, until the worker is destroyed:
    /// either `owned` holds it or `lease` holds its range of a [`Lent`] buffer.
    unsafe fn recv_raw(
        &self,
        tag: u64,
        mask: u64,
        ptr: *mut u8,
        len: usize,
        owned: Option<Vec<u8>>,
        lease: Option<(Lease, Range<usize>)>,
    ) -> Result<Request, Status> {
        let p = request_params();
        // SAFETY: live worker; the caller reserves the memory for UCX (see above).
        let sp = unsafe { sys::ucp_tag_recv_nbx(self.0.h, ptr as *mut c_void, len, tag, mask, &p) };
        Request::posted(sp, true, len, owned, lease, &self.0)
    }

    /// Removes one unexpected message matching `tag` under `mask` and receives it into a
    /// scratch buffer of `size(length)` bytes (a shorter one truncates it): its sender's tag,
    /// and the request, which completes once the message is gone.
    pub(super) fn take_unexpected(
        &self,
        tag: u64,
        mask: u64,
        size: impl FnOnce(usize) -> usize,
    ) -> Option<(u64, Result<Request, Status>)> {
        let mut info = sys::ucp_tag_recv_info_t::default();
        // SAFETY: live worker; `info` is a valid out-pointer; remove=1 hands the message to us,
        // and it is received (and so released) right below.
        let msg = unsafe { sys::ucp_tag_probe_nb(self.0.h, tag, mask, 1, &mut info) };
        if msg.is_null() {
            return None;
        }
        let mut scratch = vec![0u8; size(info.length)];
        let (ptr, len) = (scratch.as_mut_ptr(), scratch.len());
        let p = request_params();
        // SAFETY: `msg` came from ucp_tag_probe_nb(remove=1) and is received once; the request
        // owns `scratch` until it completes (see Worker::recv).
        let sp = unsafe { sys::ucp_tag_msg_recv_nbx(self.0.h, ptr as *mut c_void, len, msg, &p) };
        let req = Request::posted(sp, true, len, Some(scratch), None, &self.0);
        Some((info.sender_tag, req))
    }
}

/// Called by UCX (on the owning thread, inside `ucp_worker_progress`) when an endpoint fails.
///
/// # Safety
///
/// `arg` must point to a live `Cell<ucs_status_t>` not referenced elsewhere during the call:
/// `Worker::connect` registers only such cells, kept alive by the worker.
unsafe extern "C" fn on_ep_error(arg: *mut c_void, _ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    // SAFETY: `arg` is the address of an endpoint's `Rc<Cell<ucs_status_t>>` contents, which
    // its worker keeps until after `ucp_worker_destroy`, so it outlives every callback; the
    // callback runs on the worker's thread and nothing holds a reference into the `Cell`
    // across a worker call, so the shared reference is sound.
    let cell = unsafe { &*(arg as *const Cell<sys::ucs_status_t>) };
    cell.set(status);
}

/// Waits for events on `fds` for up to `timeout_ms`; an interrupted or failed poll only ends
/// the wait early, which the caller's loop absorbs.
pub(super) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) {
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfds of its length; a closed
    // or invalid fd in it is reported in `revents`, never dereferenced.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
}

// ---------------------------------------------------------------------------------------------
// Endpoints and remote windows
// ---------------------------------------------------------------------------------------------

/// An endpoint to one peer, with the peer's memory window when it is mapped. Dropping it
/// force-closes it without waiting; [`Endpoint::close`] hands back the close request instead.
pub(super) struct Endpoint {
    /// Null once closed.
    h: sys::ucp_ep_h,
    /// Set by `on_ep_error` (`UCS_OK` while healthy).
    health: Rc<Cell<sys::ucs_status_t>>,
    /// Unpacked on this endpoint, so destroyed before it closes.
    window: Option<RemoteWindow>,
    worker: Rc<WorkerHandle>,
}

impl Endpoint {
    /// The status UCX reported when the endpoint failed.
    pub(super) fn failure(&self) -> Option<Status> {
        Status::check(self.health.get()).err()
    }

    /// Sends `buf` with `tag`; the request owns it until it completes.
    pub(super) fn send(&self, tag: u64, buf: Vec<u8>) -> Result<Request, Status> {
        let (ptr, len) = (buf.as_ptr(), buf.len());
        // SAFETY: the request owns `buf` (see Worker::recv) and nothing writes it.
        unsafe { self.send_raw(tag, ptr, len, Some(buf), None) }
    }

    /// Posts a send of `ptr..ptr + len`.
    ///
    /// # Safety
    ///
    /// The memory must stay valid and unwritten until the returned request completes or, if it
    /// is dropped before that, until the worker is destroyed: either `owned` holds it or `lease`
    /// holds its range of a [`Lent`] buffer.
    unsafe fn send_raw(
        &self,
        tag: u64,
        ptr: *const u8,
        len: usize,
        owned: Option<Vec<u8>>,
        lease: Option<(Lease, Range<usize>)>,
    ) -> Result<Request, Status> {
        let p = request_params();
        // SAFETY: `self.h` is a live endpoint of the worker (not closed: `close` consumes the
        // endpoint); the caller keeps the memory valid and unwritten (see above).
        let sp = unsafe { sys::ucp_tag_send_nbx(self.h, ptr as *const c_void, len, tag, &p) };
        Request::posted(sp, false, len, owned, lease, &self.worker)
    }

    /// The endpoint's lanes as (transport, device) names, `None` if UCX cannot say.
    pub(super) fn lanes(&self) -> Option<Vec<(String, String)>> {
        const MAX_LANES: usize = 16;
        let mut entries: [sys::ucp_transport_entry_t; MAX_LANES] =
            // SAFETY: a transport entry is two pointers; null is a valid value for both.
            unsafe { std::mem::zeroed() };
        // SAFETY: an all-zero ucp_ep_attr_t is "no fields"; the transports field is set below.
        let mut attr: sys::ucp_ep_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask = sys::ucp_ep_attr_field_UCP_EP_ATTR_FIELD_TRANSPORTS as u64;
        attr.transports.entries = entries.as_mut_ptr();
        attr.transports.num_entries = MAX_LANES as u32;
        attr.transports.entry_size = std::mem::size_of::<sys::ucp_transport_entry_t>();
        // SAFETY: live endpoint; `entries` holds `num_entries` entries of `entry_size` bytes and
        // outlives the call.
        Status::check(unsafe { sys::ucp_ep_query(self.h, &mut attr) }).ok()?;
        let n = (attr.transports.num_entries as usize).min(MAX_LANES);
        let name = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: UCX returned a NUL-terminated string valid while the endpoint is
                // open; it is copied at once.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        Some(
            entries[..n]
                .iter()
                .map(|e| (name(e.transport_name), name(e.device_name)))
                .collect(),
        )
    }

    /// Maps the peer's window (`len` bytes at the peer's `addr`, with the rkey `packed` the peer
    /// sent), replacing any earlier one. False, and no window, if UCX cannot map it here as
    /// one contiguous range (another node, TCP, garbage).
    pub(super) fn map_window(&mut self, addr: u64, len: usize, packed: &[u8]) -> bool {
        if len == 0 || addr.checked_add(len as u64).is_none() {
            return false;
        }
        self.window = None;
        let mut rkey: sys::ucp_rkey_h = std::ptr::null_mut();
        // SAFETY: live endpoint; `packed` is the packed rkey the peer sent (UCX validates what it
        // parses and fails on garbage); valid out-pointer.
        let st =
            unsafe { sys::ucp_ep_rkey_unpack(self.h, packed.as_ptr() as *const c_void, &mut rkey) };
        if Status::check(st).is_err() {
            return false;
        }
        // From here the rkey is destroyed by RemoteWindow's Drop, whatever happens.
        let mut w = RemoteWindow {
            rkey,
            ptr: std::ptr::null(),
            len,
        };
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
            return false;
        }
        w.ptr = first as *const u8;
        self.window = Some(w);
        true
    }

    pub(super) fn window(&self) -> Option<&RemoteWindow> {
        self.window.as_ref()
    }

    /// Closes the endpoint: flushing what was sent, or, with `force`, at once (which completes
    /// its outstanding requests with an error). The close request, if it did not finish at once.
    pub(super) fn close(mut self, force: bool) -> Option<Request> {
        self.close_raw(force)
    }

    fn close_raw(&mut self, force: bool) -> Option<Request> {
        // UCX requires an rkey to be destroyed before its endpoint.
        self.window = None;
        let h = std::mem::replace(&mut self.h, std::ptr::null_mut());
        if h.is_null() {
            return None;
        }
        // SAFETY: an all-zero ucp_request_param_t is "no optional fields" (a flush close).
        let mut p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
        if force {
            p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = sys::ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE;
        }
        // SAFETY: `h` is a live endpoint, closed exactly once (nulled above).
        let sp = unsafe { sys::ucp_ep_close_nbx(h, &p) };
        match ucx_rs::decode_status_ptr(sp) {
            Ok(Some(req)) => Some(Request {
                h: req,
                recv: false,
                len: 0,
                owned: None,
                lease: None,
                worker: self.worker.clone(),
            }),
            _ => None,
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // Not closed by the transport: close it at once; the close request is freed by the
        // worker when it finishes (or when the worker is destroyed).
        drop(self.close_raw(true));
    }
}

/// A peer's memory window mapped into this process (`ucp_rkey_ptr`). Only its [`Endpoint`]
/// holds one, so its rkey is always destroyed before that endpoint closes.
pub(super) struct RemoteWindow {
    rkey: sys::ucp_rkey_h,
    ptr: *const u8,
    len: usize,
}

impl RemoteWindow {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Copies `out.len()` bytes at offset `at` of the peer's window into `out`.
    pub(super) fn read(
        &self,
        op: &'static str,
        at: usize,
        out: &mut [u8],
    ) -> Result<(), RuntimeError> {
        check_window(op, at, out.len(), self.len)?;
        // SAFETY: `ptr + at .. + out.len()` lies inside the window as mapped into this process
        // (checked against the length verified with ucp_rkey_ptr at map time); the mapping lives
        // as long as the rkey, that is as long as `self`. The window is never seen as a Rust
        // reference, only copied from: a peer writing it meanwhile (a protocol breach) could
        // only change the bytes copied, not their bounds. `out` is private memory, so the
        // ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), out.as_mut_ptr(), out.len()) };
        Ok(())
    }
}

impl Drop for RemoteWindow {
    fn drop(&mut self) {
        // SAFETY: the rkey came from ucp_ep_rkey_unpack on the endpoint that owns this window,
        // which is still open (it drops its window before closing), and is destroyed once;
        // nothing reads through `ptr` afterwards (it dies with `self`).
        unsafe { sys::ucp_rkey_destroy(self.rkey) };
    }
}

// ---------------------------------------------------------------------------------------------
// This rank's memory window
// ---------------------------------------------------------------------------------------------

/// This rank's shared-memory window: memory UCX allocated (`ucp_mem_map` with
/// `UCP_MEM_MAP_ALLOCATE`, from a shared-memory domain when there is one) so that peers on the
/// same node can map it.
pub(super) struct MemWindow {
    memh: sys::ucp_mem_h,
    addr: *mut u8,
    len: usize,
    context: Context,
}

impl MemWindow {
    /// A window of `bytes`, or `None` if UCX cannot allocate one.
    pub(super) fn alloc(context: &Context, bytes: usize) -> Option<MemWindow> {
        // SAFETY: an all-zero ucp_mem_map_params_t is "no optional fields".
        let mut p: sys::ucp_mem_map_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = (sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_LENGTH
            | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_FLAGS)
            as u64;
        p.length = bytes;
        p.flags = sys::UCP_MEM_MAP_ALLOCATE;
        let mut memh: sys::ucp_mem_h = std::ptr::null_mut();
        // SAFETY: live context, valid params and out-pointer.
        Status::check(unsafe { sys::ucp_mem_map((context.0).0, &p, &mut memh) }).ok()?;
        // From here the memory is unmapped by Drop, whatever happens.
        let mut w = MemWindow {
            memh,
            addr: std::ptr::null_mut(),
            len: bytes,
            context: context.clone(),
        };
        // SAFETY: zeroed attributes; the field mask says what to fill.
        let mut attr: sys::ucp_mem_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask = (sys::ucp_mem_attr_field_UCP_MEM_ATTR_FIELD_ADDRESS
            | sys::ucp_mem_attr_field_UCP_MEM_ATTR_FIELD_LENGTH) as u64;
        // SAFETY: `memh` is the live handle just mapped; `attr` is a valid out-pointer.
        let st = unsafe { sys::ucp_mem_query(memh, &mut attr) };
        if Status::check(st).is_err() || attr.address.is_null() || attr.length < bytes {
            return None;
        }
        w.addr = attr.address as *mut u8;
        Some(w)
    }

    /// The window's address in this process, as peers translate it.
    pub(super) fn addr(&self) -> u64 {
        self.addr as u64
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The packed rkey peers unpack to map the window.
    pub(super) fn pack_key(&self) -> Option<Vec<u8>> {
        let mut buf: *mut c_void = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: live context and memory handle of it; valid out-pointers.
        let st = unsafe { sys::ucp_rkey_pack((self.context.0).0, self.memh, &mut buf, &mut size) };
        if Status::check(st).is_err() || buf.is_null() {
            return None;
        }
        // SAFETY: UCX returned `size` readable bytes at `buf`, valid until released below.
        let key = unsafe { std::slice::from_raw_parts(buf as *const u8, size) }.to_vec();
        // SAFETY: `buf` came from ucp_rkey_pack and is released once.
        unsafe { sys::ucp_rkey_buffer_release(buf) };
        Some(key)
    }

    /// Copies `src` to offset `at` of the window.
    pub(super) fn write(
        &mut self,
        op: &'static str,
        at: usize,
        src: &[u8],
    ) -> Result<(), RuntimeError> {
        check_window(op, at, src.len(), self.len)?;
        // SAFETY: `addr + at .. + src.len()` lies inside the window (checked above), memory UCX
        // allocated for this context and keeps mapped until Drop. The window is never seen as
        // a Rust reference, only copied to and from, so peers reading it meanwhile alias no
        // reference (that they read only announced bytes is the transport's protocol); `src`
        // is not the window, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.addr.add(at), src.len()) };
        Ok(())
    }
}

impl Drop for MemWindow {
    fn drop(&mut self) {
        // SAFETY: mapped on this context (kept alive by `self.context`) and unmapped once; no
        // UCX request ever uses it (it is only copied to and from), and peers that mapped it
        // keep their own mapping of the shared pages.
        unsafe { sys::ucp_mem_unmap((self.context.0).0, self.memh) };
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and the attached buffer
// ---------------------------------------------------------------------------------------------

/// A range of the attached buffer held by a request: it stays in the buffer's in-flight set
/// (under an id only the buffer hands out) until the request is known to have completed.
struct Lease {
    inflight: Rc<RefCell<InFlight>>,
    id: ReqId,
}

/// One posted operation. Dropping it frees the UCX request; if it had not completed, UCX
/// releases it when it does, and its buffer and range stay reserved until the worker is
/// destroyed.
pub(super) struct Request {
    /// Null: completed when posted.
    h: *mut c_void,
    recv: bool,
    /// Bytes the operation covers: the send's length, the receive buffer's size.
    len: usize,
    owned: Option<Vec<u8>>,
    lease: Option<Lease>,
    worker: Rc<WorkerHandle>,
}

impl Request {
    /// Wraps what a `*_nbx` call returned. On a synchronous failure UCX holds nothing, so
    /// `owned` is dropped and `lease` never taken.
    fn posted(
        sp: sys::ucs_status_ptr_t,
        recv: bool,
        len: usize,
        owned: Option<Vec<u8>>,
        lease: Option<(Lease, Range<usize>)>,
        worker: &Rc<WorkerHandle>,
    ) -> Result<Request, Status> {
        // NO_IMM_CMPL makes Ok(None) unreachable in UCX 1.22; handled for other versions.
        let h = ucx_rs::decode_status_ptr(sp)
            .map_err(Status)?
            .unwrap_or(std::ptr::null_mut());
        // A receive writes its range, a send reads it.
        let lease = lease.map(|(l, r)| {
            l.inflight.borrow_mut().add(l.id, r, recv);
            l
        });
        Ok(Request {
            h,
            recv,
            len,
            owned,
            lease,
            worker: worker.clone(),
        })
    }

    pub(super) fn is_recv(&self) -> bool {
        self.recv
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// `None` while in progress; then the status and the length received (for a send, its
    /// length).
    pub(super) fn test(&self) -> Option<(Status, usize)> {
        let (st, len) = if self.h.is_null() {
            (Status::OK, self.len)
        } else if self.recv {
            let mut info = sys::ucp_tag_recv_info_t::default();
            // SAFETY: `h` is a live receive request of this worker, not yet freed (only Drop
            // frees it); `info` is a valid out-pointer.
            let st = unsafe { sys::ucp_tag_recv_request_test(self.h, &mut info) };
            (Status(st), info.length)
        } else {
            // SAFETY: `h` is a live request of this worker, not yet freed.
            (
                Status(unsafe { sys::ucp_request_check_status(self.h) }),
                self.len,
            )
        };
        (st != Status::IN_PROGRESS).then_some((st, len))
    }

    /// Asks UCX to cancel a receive; it then completes (with `UCS_ERR_CANCELED`).
    pub(super) fn cancel(&self) {
        if self.recv && !self.h.is_null() {
            // SAFETY: live receive request of this worker, not yet freed.
            unsafe { sys::ucp_request_cancel(self.worker.h, self.h) };
        }
    }

    /// Frees the request and gives back its owned buffer, if it has completed (else the buffer
    /// stays with the worker: UCX may still use it).
    pub(super) fn into_buf(mut self) -> Option<Vec<u8>> {
        if self.test().is_some() {
            self.owned.take()
        } else {
            None
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        let done = self.h.is_null() || self.test().is_some();
        if !self.h.is_null() {
            // SAFETY: a request of this worker (alive: `self.worker`), freed exactly once, here.
            // If it is still in progress UCX releases it when it completes.
            unsafe { sys::ucp_request_free(self.h) };
        }
        if done {
            if let Some(l) = &self.lease {
                l.inflight.borrow_mut().remove(l.id);
            }
        } else if let Some(b) = self.owned.take() {
            // UCX may still write it: it lives until the worker is destroyed.
            self.worker.keep(Box::new(b));
        }
        // An unfinished request's lease stays in the in-flight set, so the attached buffer
        // keeps that range reserved, and is itself kept by the worker (see Lent's Drop).
    }
}

/// The buffer attached for one operation, lent by range to UCX requests. Views are only of
/// ranges no request holds, and the storage is never reallocated or freed while a range is
/// lent (the `Vec` itself is never handed out, and a lent buffer is not given back).
pub(super) struct Lent {
    buf: OpBuf,
    inflight: Rc<RefCell<InFlight>>,
    /// The last lease id handed out.
    leases: u64,
    worker: Rc<WorkerHandle>,
}

impl Lent {
    pub(super) fn new(worker: &Worker) -> Lent {
        Lent {
            buf: OpBuf::None,
            inflight: Rc::default(),
            leases: 0,
            worker: worker.0.clone(),
        }
    }

    /// Attaches `buf`, unless a buffer is attached already.
    pub(super) fn attach(&mut self, buf: OpBuf) -> Result<(), OpBuf> {
        if !matches!(self.buf, OpBuf::None) {
            return Err(buf);
        }
        self.buf = buf;
        Ok(())
    }

    /// The attached buffer, unless a request still holds a range of it (then it stays here).
    pub(super) fn detach(&mut self) -> OpBuf {
        if !self.inflight.borrow().is_empty() {
            return OpBuf::None;
        }
        std::mem::take(&mut self.buf)
    }

    pub(super) fn len(&self) -> usize {
        self.buf.bytes().len()
    }

    pub(super) fn busy(&self, r: &Range<usize>, write: bool) -> bool {
        self.inflight.borrow().busy(r, write)
    }

    /// Checks `r` against the buffer's length and the ranges in flight, as a post would.
    pub(super) fn check(
        &self,
        op: &'static str,
        r: &Range<usize>,
        write: bool,
    ) -> Result<(), RuntimeError> {
        check_range(op, self.len(), &self.inflight.borrow(), r, write)
    }

    pub(super) fn region(&self, r: Range<usize>) -> Result<&[u8], RuntimeError> {
        region(&self.buf, &self.inflight.borrow(), r)
    }

    pub(super) fn region_mut(&mut self, r: Range<usize>) -> Result<&mut [u8], RuntimeError> {
        region_mut(&mut self.buf, &self.inflight.borrow(), r)
    }

    /// A lease on `r` for a request of `worker`, if `r` is inside the buffer and free for the
    /// access (`write` for a receive). Only the worker the buffer was made for can hold it:
    /// that worker keeps the buffer if a request never completes.
    fn lease(&mut self, worker: &Rc<WorkerHandle>, r: &Range<usize>, write: bool) -> Option<Lease> {
        if !Rc::ptr_eq(worker, &self.worker) || self.check("lease", r, write).is_err() {
            return None;
        }
        self.leases += 1;
        Some(Lease {
            inflight: self.inflight.clone(),
            id: ReqId(self.leases),
        })
    }

    /// Sends range `r` (free of writes in flight; the caller checks it first, for a precise
    /// error) to `ep`; the range stays lent, read-only, until the request completes.
    pub(super) fn send(
        &mut self,
        ep: &Endpoint,
        tag: u64,
        r: Range<usize>,
    ) -> Result<Request, Status> {
        let lease = self
            .lease(&ep.worker, &r, false)
            .ok_or(Status::INVALID_PARAM)?;
        let bytes = &self.buf.bytes()[r.clone()];
        let (ptr, len) = (bytes.as_ptr(), bytes.len());
        // SAFETY: the range is inside the buffer and no write holds it (checked by `lease`);
        // the lease keeps it in the in-flight set, so no view writes it, and the buffer is
        // neither given back nor freed (nor its storage moved) before the request completes or
        // the endpoint's worker, which is this buffer's, is destroyed.
        unsafe { ep.send_raw(tag, ptr, len, None, Some((lease, r))) }
    }

    /// Receives into range `r` (free of anything in flight; the caller checks it first); the
    /// range stays lent until the request completes.
    pub(super) fn recv(
        &mut self,
        worker: &Worker,
        tag: u64,
        mask: u64,
        r: Range<usize>,
    ) -> Result<Request, Status> {
        let lease = self
            .lease(&worker.0, &r, true)
            .ok_or(Status::INVALID_PARAM)?;
        let bytes = &mut self.buf.bytes_mut()[r.clone()];
        let (ptr, len) = (bytes.as_mut_ptr(), bytes.len());
        // SAFETY: the range is inside the buffer and nothing in flight touches it (checked by
        // `lease`); the lease keeps it reserved as in `send`.
        unsafe { worker.recv_raw(tag, mask, ptr, len, None, Some((lease, r))) }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if !self.inflight.borrow().is_empty() {
            // A request that never completed may still use it: it lives until the worker is
            // destroyed.
            self.worker.keep(Box::new(std::mem::take(&mut self.buf)));
        }
    }
}
