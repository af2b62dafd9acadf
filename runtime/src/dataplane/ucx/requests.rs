//! Requests of a [`UcxTransport`] and their completion: posting, the one wait loop, what each
//! completion means, the stale-message sweep, and breaking the group on a failure.
#![forbid(unsafe_code)]

use super::ffi::{self, Request, Status};
use super::transport::{peer_ep, UcxTransport};
use super::ucx_err;
use crate::dataplane::transport::*;
use crate::error::RuntimeError;
use crate::ids::Rank;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum ReqKind {
    /// A send or receive a collective posted.
    Data,
    /// Receive of a stale message, only to remove it.
    Drain,
    /// Handshake and abort messages.
    Ctrl,
}

/// A posted request and what it is for.
pub(super) struct Req {
    pub(super) req: Request,
    pub(super) kind: ReqKind,
    pub(super) peer: Rank,
}

pub(super) enum SendSource {
    Region(Range<usize>),
    Owned(Vec<u8>),
}

pub(super) enum RecvTarget {
    Region(Range<usize>),
    Owned(Vec<u8>),
}

/// A request UCX finished, already freed: its status and received length, and its buffer.
struct Done {
    id: ReqId,
    st: Status,
    len: usize,
    kind: ReqKind,
    recv: bool,
    peer: Rank,
    expected: usize,
    owned: Option<Vec<u8>>,
}

pub(super) const CTRL_SLOT_BUF: usize = 64;
const SWEEP_EVERY: Duration = Duration::from_millis(10);
/// After `spin` without progress, wait this long (yielding, then napping) before sleeping on
/// the worker's event fd.
const YIELD_FOR: Duration = Duration::from_millis(5);
/// ... but only this long before napping instead: a rank that arrives long before its peers
/// (a straggler given less work, a rank whose share is small) would otherwise spend its CPU, or
/// its cgroup quota, yielding in a loop. Measured: a rank at 12% of a core, rebalanced to one
/// micro-batch, spent as much CPU yielding as computing; its step went from 100 ms to 66 ms with
/// naps, and the 4-rank training step and the collectives' times did not change.
const YIELD_THEN_NAP: Duration = Duration::from_micros(200);
/// A wait loop iteration that comes back this much later than it asked to (a yield, a nap, a
/// poll's timeout) was descheduled: CPU contention, a cgroup CPU quota running out, a stop.
/// Shorter gaps are the ordinary scheduling of ranks that share cores.
const STALL_MIN: Duration = Duration::from_millis(10);
/// What a patient wait sleeps instead of yielding (see `Transport::patient`).
const PATIENT_NAP: Duration = Duration::from_micros(50);
/// Scratch size for draining stale messages; longer ones are truncated, which drops them too.
const DRAIN_BUF: usize = 64 * 1024;

impl UcxTransport {
    /// Keeps a posted request until it completes; its id.
    fn track(&mut self, req: Request, kind: ReqKind, peer: Rank) -> ReqId {
        self.next_id += 1;
        let id = ReqId(self.next_id);
        self.reqs.insert(id, Req { req, kind, peer });
        id
    }

    pub(super) fn post_send_raw(
        &mut self,
        to: Rank,
        t: u64,
        src: SendSource,
        kind: ReqKind,
    ) -> Result<ReqId, RuntimeError> {
        let ep = peer_ep(&self.eps, self.world, "send", to)?;
        let posted = match src {
            SendSource::Region(r) => self.buf.send(ep, t, r),
            SendSource::Owned(v) => ep.send(t, v),
        };
        let req = posted.map_err(|st| RuntimeError::PeerFailed {
            rank: to,
            op: "send",
            reason: st.to_string(),
        })?;
        Ok(self.track(req, kind, to))
    }

    pub(super) fn post_recv_raw(
        &mut self,
        from: Rank,
        t: u64,
        mask: u64,
        target: RecvTarget,
        kind: ReqKind,
    ) -> Result<ReqId, RuntimeError> {
        let posted = match target {
            RecvTarget::Region(r) => self.buf.recv(&self.worker, t, mask, r),
            RecvTarget::Owned(v) => self.worker.recv(t, mask, v),
        };
        let req = posted.map_err(|st| ucx_err("tag_recv", st))?;
        Ok(self.track(req, kind, from))
    }

    pub(super) fn progress(&mut self) -> bool {
        let mut any = false;
        while self.worker.progress() {
            any = true;
        }
        any
    }

    /// Polls every request once; returns the first that completed, freed, with its status and
    /// length. The abort receive is polled first: an abort that arrived is seen before a data
    /// completion of the same poll (P-6), and a forged one is counted before the operation
    /// it came during can return (P-9).
    fn poll_reqs(&mut self) -> Option<Done> {
        let abort = self.abort_recv;
        let first = abort.and_then(|a| self.reqs.get(&a).map(|r| (a, r)));
        let rest = self.reqs.iter().filter(|(id, _)| Some(**id) != abort);
        let (id, st, len) = first
            .into_iter()
            .chain(rest.map(|(id, r)| (*id, r)))
            .find_map(|(id, r)| r.req.test().map(|(st, len)| (id, st, len)))?;
        let Req { req, kind, peer } = self.reqs.remove(&id)?;
        let (recv, expected) = (req.is_recv(), req.len());
        let owned = req.into_buf();
        Some(Done {
            id,
            st,
            len,
            kind,
            recv,
            peer,
            expected,
            owned,
        })
    }

    /// Polls every request until none has completed, dropping what completed.
    pub(super) fn drain_completed(&mut self) {
        while self.poll_reqs().is_some() {}
    }

    /// The one wait loop: progress, endpoint failures, aborts from peers, completions, the
    /// stale-message sweep, the deadline, and sleeping on the worker's event fd when idle.
    pub(super) fn wait_inner(
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
            if let Some((r, st)) = self.failed_peer() {
                return Err(self.fail(RuntimeError::PeerFailed {
                    rank: r,
                    op,
                    reason: format!("UCX reported the endpoint failed: {st}"),
                }));
            }
            while let Some(done) = self.poll_reqs() {
                active = true;
                if let Some(c) = self.on_completion(op, timeout, connecting, done)? {
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
            // Only while nothing moves: bytes still arriving may finish the collective.
            if !active && self.abandoned() {
                let e = RuntimeError::Abandoned {
                    op,
                    generation: self.generation,
                };
                return Err(self.fail(e));
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
                if self.patient || idle >= YIELD_THEN_NAP {
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

    /// P-10: the coordinator replaced this generation after a member failed; waiting on for the
    /// deadline would only delay the next one. The mark never goes down: generations only grow,
    /// also across a coordinator restart, which resumes from its journal (written before any
    /// rank hears of a generation; a failed write is an event, `journal_error`).
    fn abandoned(&self) -> bool {
        self.abandoned_below
            .as_ref()
            .is_some_and(|a| a.load(Ordering::Relaxed) > self.generation.0)
    }

    /// The lowest rank whose endpoint UCX reported failed, and the status it reported.
    fn failed_peer(&self) -> Option<(Rank, Status)> {
        let mut eps = self.eps.iter().enumerate();
        eps.find_map(|(r, ep)| Some((Rank(r as u32), ep.as_ref()?.failure()?)))
    }

    /// One finished request of a wait: a completion to return, an error that fails the
    /// group, or `None` to keep waiting (a drained stale message, a forged abort, a send).
    fn on_completion(
        &mut self,
        op: &'static str,
        timeout: Duration,
        connecting: bool,
        done: Done,
    ) -> Result<Option<Completion>, RuntimeError> {
        let st = done.st;
        match (done.kind, done.recv) {
            (ReqKind::Drain, _) => {}
            (ReqKind::Ctrl, false) => {
                if st != Status::OK && connecting {
                    return Err(self.fail(RuntimeError::PeerFailed {
                        rank: done.peer,
                        op,
                        reason: format!("handshake send failed: {st}"),
                    }));
                }
            }
            (ReqKind::Ctrl, true) if self.abort_recv == Some(done.id) => {
                self.abort_recv = None;
                self.on_abort(op, timeout, done)?;
            }
            (_, recv) => return self.on_data(op, recv, done).map(Some),
        }
        Ok(None)
    }

    /// The standing abort receive completed: fail the group if a member of this generation
    /// sent it, or drop it and post the receive again.
    fn on_abort(
        &mut self,
        op: &'static str,
        timeout: Duration,
        done: Done,
    ) -> Result<(), RuntimeError> {
        let bytes = done.owned.unwrap_or_default();
        let parsed = if done.st == Status::OK {
            decode_ctrl(&bytes[..done.len.min(bytes.len())], &self.key)
        } else {
            Err(CtrlError::Malformed(format!(
                "abort message not received: {}",
                done.st
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
                Err(self.fail(e))
            }
            Ok(_) => {
                self.dropped += 1;
                self.post_abort_recv()
            }
            Err(CtrlError::NotAMember) => {
                // P-9: only a member can fail the group; this one is dropped.
                self.forged += 1;
                self.dropped += 1;
                self.post_abort_recv()
            }
            Err(reason) => Err(self.fail(RuntimeError::MalformedMessage {
                from: Rank(u32::MAX),
                op,
                reason: format!("control message: {reason}"),
            })),
        }
    }

    /// A data or handshake request completed: its completion, or the error it reports.
    fn on_data(
        &mut self,
        op: &'static str,
        recv: bool,
        done: Done,
    ) -> Result<Completion, RuntimeError> {
        let Done { id, st, len, .. } = done;
        if st == Status::TRUNCATED {
            return Err(self.fail(RuntimeError::MalformedMessage {
                from: done.peer,
                op,
                reason: format!(
                    "message longer than the {} bytes expected; every rank must pass a buffer of the same length",
                    done.expected
                ),
            }));
        }
        if st != Status::OK {
            return Err(self.fail(RuntimeError::PeerFailed {
                rank: done.peer,
                op,
                reason: format!("{} failed: {st}", if recv { "receive" } else { "send" },),
            }));
        }
        if recv && len != done.expected && done.kind == ReqKind::Data {
            return Err(self.fail(RuntimeError::MessageLength {
                from: done.peer,
                op,
                expected: done.expected,
                got: len,
            }));
        }
        let mut buf = done.owned;
        if let (Some(b), true) = (buf.as_mut(), done.kind == ReqKind::Ctrl) {
            b.truncate(len);
        }
        Ok(Completion { id, buf })
    }

    /// Sleeps until the worker has an event or `max` passes.
    fn sleep(&mut self, max: Duration) {
        let Some(fd) = self.efd else {
            std::thread::yield_now();
            return;
        };
        if self.worker.arm().is_err() {
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
        ffi::poll(&mut fds, ms);
    }

    /// Removes every unexpected message whose tag is not of this generation (or of an invalid
    /// kind), counting each (P-1).
    pub(super) fn sweep(&mut self) {
        for (t, m) in stale_patterns(self.generation) {
            let scratch = |len: usize| DRAIN_BUF.min(len.max(1));
            while let Some((sender, posted)) = self.worker.take_unexpected(t, m, scratch) {
                self.dropped += 1;
                if let Ok(req) = posted {
                    self.track(req, ReqKind::Drain, Rank(untag(sender).src));
                }
            }
        }
    }

    /// Breaks the group: tells every live peer, then retires every request so that UCX no
    /// longer touches our buffers. Returns `err` for the caller to report.
    pub(super) fn fail(&mut self, err: RuntimeError) -> RuntimeError {
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
            let alive = self.eps[r as usize]
                .as_ref()
                .is_some_and(|ep| ep.failure().is_none());
            if alive {
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
            self.drain_completed();
        }
        self.retire();
        err
    }

    /// Cancels receives and force-closes every endpoint (which completes every outstanding
    /// send), then waits a bounded time for all requests to report completion.
    pub(super) fn retire(&mut self) {
        for r in self.reqs.values() {
            r.req.cancel();
        }
        // Closing an endpoint destroys the rkey of its mapped window first, as UCX requires.
        let mut closing: Vec<Request> = self
            .eps
            .iter_mut()
            .filter_map(|ep| ep.take()?.close(true))
            .collect();
        // With peer error mode UCX completes every request of a force-closed endpoint; without
        // it some never complete, and waiting longer would only delay the error.
        let bound = if self.peer_mode { 500 } else { 50 };
        let until = Instant::now() + Duration::from_millis(bound);
        loop {
            self.progress();
            self.drain_completed();
            closing.retain(|req| req.test().is_none());
            if (self.reqs.is_empty() && closing.is_empty()) || Instant::now() >= until {
                break;
            }
            std::thread::yield_now();
        }
        if !self.reqs.is_empty() || !closing.is_empty() {
            // UCX may still write into the attached buffer or an owned one: the requests keep
            // them (and their ranges of the attached buffer stay lent) until the worker is
            // destroyed, and the attached buffer is never handed back.
            self.poisoned = true;
            for req in closing {
                let id = ReqId(u64::MAX - self.reqs.len() as u64);
                self.reqs.insert(
                    id,
                    Req {
                        req,
                        kind: ReqKind::Ctrl,
                        peer: self.rank,
                    },
                );
            }
        }
        self.abort_recv = None;
    }

    /// Posts a raw-tagged send and waits (briefly) for it to leave.
    pub(super) fn send_raw(
        &mut self,
        to: Rank,
        raw_tag: u64,
        bytes: Vec<u8>,
    ) -> Result<(), RuntimeError> {
        self.check_open("send_raw")?;
        let id = self.post_send_raw(to, raw_tag, SendSource::Owned(bytes), ReqKind::Ctrl)?;
        let until = Instant::now() + Duration::from_secs(2);
        while self.reqs.contains_key(&id) && Instant::now() < until {
            self.progress();
            // Only retire this request; others belong to no collective right now except the
            // standing abort receive, which poll_reqs would hand out: keep polling narrowly.
            if self.reqs.get(&id).is_some_and(|r| r.req.test().is_some()) {
                self.reqs.remove(&id);
            }
        }
        Ok(())
    }
}
