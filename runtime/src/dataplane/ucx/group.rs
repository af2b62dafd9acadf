//! [`UcxGroup`]: the handle the runtime holds. UCX objects must stay on the thread that made
//! them, so one thread owns the transport and serves `Collectives` over it; the handle talks
//! to that thread through channels, one command and one reply at a time.
#![forbid(unsafe_code)]

use super::transport::UcxTransport;
use super::{UcxConfig, UcxStats};
use crate::dataplane::bootstrap::AddressExchange;
use crate::dataplane::collectives::{Collectives, Reduction};
use crate::dataplane::links::PeerLink;
use crate::dataplane::transport::{OpBuf, Transport, Values};
use crate::error::RuntimeError;
use crate::ids::{Generation, Rank};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

enum Cmd {
    Reduce(Reduction, OpBuf),
    Broadcast(Vec<u8>, Rank),
    Barrier,
    SendStriped(Rank, Vec<Rank>, Vec<u8>),
    RecvStriped(Vec<Rank>, Vec<u8>),
    Skip,
    /// Test hook: send raw bytes with a raw tag to a peer (stale or malformed traffic).
    Raw(Rank, u64, Vec<u8>),
    Stats,
}

enum Reply {
    Connected(Result<(Arc<AtomicU64>, Vec<PeerLink>), RuntimeError>),
    Values(OpBuf, Result<(), RuntimeError>),
    Bytes(Vec<u8>, Result<(), RuntimeError>),
    Stats(UcxStats),
}

/// One rank's membership in one generation's UCX group. Dropping it tears the group down on
/// this rank; the next generation is a new `UcxGroup` in the same process.
pub struct UcxGroup {
    tx: Option<mpsc::Sender<Cmd>>,
    rx: mpsc::Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
    rank: Rank,
    world: u32,
    generation: Generation,
    stalled: Arc<AtomicU64>,
    links: Vec<PeerLink>,
}

fn gone(op: &'static str, generation: Generation) -> RuntimeError {
    RuntimeError::GroupBroken {
        op,
        generation,
        cause: "the data-plane thread has exited".into(),
    }
}

impl UcxGroup {
    /// Builds this rank's side of the group: a thread with its own UCP context and worker,
    /// addresses exchanged through `exchange`, endpoints and handshake to every peer.
    pub fn connect(
        rank: Rank,
        world: u32,
        generation: Generation,
        cfg: UcxConfig,
        mut exchange: Box<dyn AddressExchange>,
    ) -> Result<Self, RuntimeError> {
        let (tx, cmd_rx) = mpsc::channel::<Cmd>();
        let (reply_tx, rx) = mpsc::channel::<Reply>();
        let thread = std::thread::Builder::new()
            .name(format!("ucx-g{generation}-r{rank}"))
            .spawn(move || {
                let t =
                    match UcxTransport::connect(rank, world, generation, &cfg, exchange.as_mut()) {
                        Ok(t) => t,
                        Err(e) => {
                            let _ = reply_tx.send(Reply::Connected(Err(e)));
                            return;
                        }
                    };
                if reply_tx
                    .send(Reply::Connected(Ok((t.stalled.clone(), t.links()))))
                    .is_err()
                {
                    return;
                }
                serve(Collectives::new(t, cfg.coll), cmd_rx, reply_tx);
            })
            .map_err(|e| RuntimeError::Transport {
                op: "spawn",
                reason: e.to_string(),
            })?;
        let g = UcxGroup {
            tx: Some(tx),
            rx,
            thread: Some(thread),
            rank,
            world,
            generation,
            stalled: Arc::new(AtomicU64::new(0)),
            links: Vec::new(),
        };
        match g.rx.recv() {
            Ok(Reply::Connected(Ok((stalled, links)))) => {
                let mut g = g;
                g.stalled = stalled;
                g.links = links;
                Ok(g)
            }
            Ok(Reply::Connected(Err(e))) => Err(e),
            _ => Err(gone("connect", generation)),
        }
    }

    pub fn rank(&self) -> Rank {
        self.rank
    }
    /// The transport to each peer, as UCX wired the endpoints up (after the handshake).
    pub fn links(&self) -> &[PeerLink] {
        &self.links
    }
    pub fn world(&self) -> u32 {
        self.world
    }
    /// Total time this rank's data-plane waits were descheduled (see `STALL_MIN`): part of its
    /// own slowness, unlike the time it waited for peers.
    pub fn stalled(&self) -> Duration {
        Duration::from_nanos(self.stalled.load(Ordering::Relaxed))
    }
    pub fn generation(&self) -> Generation {
        self.generation
    }

    fn call(&self, op: &'static str, cmd: Cmd) -> Result<Reply, RuntimeError> {
        let tx = self.tx.as_ref().ok_or_else(|| gone(op, self.generation))?;
        tx.send(cmd).map_err(|_| gone(op, self.generation))?;
        self.rx.recv().map_err(|_| gone(op, self.generation))
    }

    fn values_op<V: Values>(
        &self,
        op: &'static str,
        buf: &mut Vec<V>,
        r: Reduction,
    ) -> Result<(), RuntimeError> {
        match self.call(op, Cmd::Reduce(r, V::wrap(std::mem::take(buf))))? {
            Reply::Values(b, res) => {
                *buf = V::into_vec(b);
                res
            }
            _ => Err(gone(op, self.generation)),
        }
    }

    fn bytes_op(&self, op: &'static str, cmd: Cmd, buf: &mut Vec<u8>) -> Result<(), RuntimeError> {
        match self.call(op, cmd)? {
            Reply::Bytes(b, res) => {
                *buf = b;
                res
            }
            _ => Err(gone(op, self.generation)),
        }
    }

    /// See [`Collectives::allreduce`]. After an error `buf` may be empty or hold partial sums.
    pub fn allreduce<V: Values>(&self, buf: &mut Vec<V>) -> Result<(), RuntimeError> {
        self.values_op("allreduce", buf, Reduction::All)
    }

    /// See [`Collectives::reduce_scatter`].
    pub fn reduce_scatter<V: Values>(
        &self,
        buf: &mut Vec<V>,
        segs: &[Range<usize>],
    ) -> Result<(), RuntimeError> {
        self.values_op("reduce_scatter", buf, Reduction::Scatter(segs.to_vec()))
    }

    /// See [`Collectives::allgather`].
    pub fn allgather<V: Values>(
        &self,
        buf: &mut Vec<V>,
        segs: &[Range<usize>],
    ) -> Result<(), RuntimeError> {
        self.values_op("allgather", buf, Reduction::Gather(segs.to_vec()))
    }

    pub fn broadcast(&self, buf: &mut Vec<u8>, root: Rank) -> Result<(), RuntimeError> {
        let b = std::mem::take(buf);
        self.bytes_op("broadcast", Cmd::Broadcast(b, root), buf)
    }

    pub fn barrier(&self) -> Result<(), RuntimeError> {
        self.bytes_op("barrier", Cmd::Barrier, &mut Vec::new())
    }

    pub fn send_striped(
        &self,
        to: Rank,
        senders: &[Rank],
        buf: &mut Vec<u8>,
    ) -> Result<(), RuntimeError> {
        let b = std::mem::take(buf);
        self.bytes_op(
            "send_striped",
            Cmd::SendStriped(to, senders.to_vec(), b),
            buf,
        )
    }

    /// Counts a point-to-point operation this rank takes no part in (see `Collectives::skip`).
    pub fn skip(&self) -> Result<(), RuntimeError> {
        self.bytes_op("skip", Cmd::Skip, &mut Vec::new())
    }

    pub fn recv_striped(&self, senders: &[Rank], buf: &mut Vec<u8>) -> Result<(), RuntimeError> {
        let b = std::mem::take(buf);
        self.bytes_op("recv_striped", Cmd::RecvStriped(senders.to_vec(), b), buf)
    }

    /// Sends raw bytes under a raw tag, bypassing the collectives: for fault-injection tests
    /// (stale generations, malformed control messages).
    pub fn send_raw(&self, to: Rank, raw_tag: u64, bytes: Vec<u8>) -> Result<(), RuntimeError> {
        self.bytes_op("send_raw", Cmd::Raw(to, raw_tag, bytes), &mut Vec::new())
    }

    pub fn stats(&self) -> Result<UcxStats, RuntimeError> {
        match self.call("stats", Cmd::Stats)? {
            Reply::Stats(s) => Ok(s),
            _ => Err(gone("stats", self.generation)),
        }
    }
}

impl Drop for UcxGroup {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; it then closes endpoints and the worker.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut c: Collectives<UcxTransport>, rx: mpsc::Receiver<Cmd>, tx: mpsc::Sender<Reply>) {
    while let Ok(cmd) = rx.recv() {
        let reply = match cmd {
            Cmd::Reduce(r, b) => {
                let (b, res) = c.reduce_buf(r, b);
                Reply::Values(b, res)
            }
            Cmd::Broadcast(mut b, root) => {
                let r = c.broadcast(&mut b, root);
                Reply::Bytes(b, r)
            }
            Cmd::Barrier => Reply::Bytes(Vec::new(), c.barrier()),
            Cmd::Skip => {
                c.skip();
                Reply::Bytes(Vec::new(), Ok(()))
            }
            Cmd::SendStriped(to, senders, mut b) => {
                let r = c.send_striped(to, &senders, &mut b);
                Reply::Bytes(b, r)
            }
            Cmd::RecvStriped(senders, mut b) => {
                let r = c.recv_striped(&senders, &mut b);
                Reply::Bytes(b, r)
            }
            Cmd::Raw(to, t, bytes) => {
                let r = c.transport_mut().send_raw(to, t, bytes);
                Reply::Bytes(Vec::new(), r)
            }
            Cmd::Stats => Reply::Stats(UcxStats {
                dropped_stale: c.transport().dropped_stale(),
                forged: c.transport().forged,
                window_broadcasts: c.window_broadcasts(),
                mesh_collectives: c.mesh_collectives(),
            }),
        };
        if tx.send(reply).is_err() {
            break;
        }
    }
}
