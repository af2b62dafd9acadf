//! Shared-memory windows of a [`UcxTransport`]: this rank's window, its key for peers, and the
//! peers' windows mapped here (see `Transport::window_key` and the broadcast that uses them).
//!
//! A key is the window's address and length in its owner's process (8 bytes each, little
//! endian) followed by the packed rkey.
#![forbid(unsafe_code)]

use super::ffi::{Endpoint, MemWindow, RemoteWindow};
use super::transport::{peer_ep, UcxTransport};
use crate::dataplane::transport::check_window;
use crate::error::RuntimeError;
use crate::ids::Rank;
use std::ops::Range;
use std::sync::atomic::{fence, Ordering};

impl UcxTransport {
    pub(super) fn own_window_key(&mut self, bytes: usize) -> Result<Option<Vec<u8>>, RuntimeError> {
        self.check_open("window_key")?;
        if bytes == 0 {
            return Ok(None);
        }
        if self.window.is_none() {
            self.window = MemWindow::alloc(&self.context, bytes);
        }
        match &self.window {
            None => Ok(None),
            Some(w) if w.len() != bytes => Err(RuntimeError::InvalidArgument {
                op: "window_key",
                reason: format!("a window of {} bytes exists, {bytes} asked", w.len()),
            }),
            Some(w) => Ok(w.pack_key().map(|packed| {
                let mut key = Vec::with_capacity(16 + packed.len());
                key.extend_from_slice(&w.addr().to_le_bytes());
                key.extend_from_slice(&(w.len() as u64).to_le_bytes());
                key.extend_from_slice(&packed);
                key
            })),
        }
    }

    pub(super) fn map_peer_window(&mut self, peer: Rank, key: &[u8]) -> bool {
        if self.check_open("window_map").is_err() || key.len() <= 16 {
            return false;
        }
        if peer_ep(&self.eps, self.world, "window_map", peer).is_err() {
            return false;
        }
        let (Some(addr), Some(len)) = (u64_le(key, 0), u64_le(key, 8)) else {
            return false;
        };
        let Ok(len) = usize::try_from(len) else {
            return false;
        };
        match self.eps.get_mut(peer.0 as usize) {
            Some(Some(ep)) => ep.map_window(addr, len, &key[16..]),
            _ => false,
        }
    }

    pub(super) fn put_own_window(
        &mut self,
        at: usize,
        src: Range<usize>,
    ) -> Result<(), RuntimeError> {
        self.check_open("window_put")?;
        let Some(w) = self.window.as_mut() else {
            return Err(RuntimeError::InvalidArgument {
                op: "window_put",
                reason: "no window".into(),
            });
        };
        check_window("window_put", at, src.len(), w.len())?;
        let bytes = self.buf.region(src)?;
        // Readers acknowledged (by message) that they are done with these bytes; their reads
        // happen before our writes.
        fence(Ordering::SeqCst);
        w.write("window_put", at, bytes)?;
        // The copy is globally visible before the announcement that follows.
        fence(Ordering::SeqCst);
        Ok(())
    }

    pub(super) fn get_peer_window(
        &mut self,
        peer: Rank,
        at: usize,
        dst: Range<usize>,
    ) -> Result<(), RuntimeError> {
        self.check_open("window_get")?;
        let w = mapped(&self.eps, peer, "window_get")?;
        check_window("window_get", at, dst.len(), w.len())?;
        let out = self.buf.region_mut(dst)?;
        // The announcement that these bytes are written was received before this read.
        fence(Ordering::SeqCst);
        w.read("window_get", at, out)?;
        // Our reads complete before the acknowledgement that follows.
        fence(Ordering::SeqCst);
        Ok(())
    }
}

impl UcxTransport {
    pub(super) fn read_peer_window(
        &mut self,
        peer: Rank,
        at: usize,
        out: &mut [u8],
    ) -> Result<(), RuntimeError> {
        self.check_open("window_read")?;
        let w = mapped(&self.eps, peer, "window_read")?;
        // As in `get_peer_window`: the reads sit between the announcement and the
        // acknowledgement.
        fence(Ordering::SeqCst);
        w.read("window_read", at, out)?;
        fence(Ordering::SeqCst);
        Ok(())
    }
}

/// `peer`'s window as mapped here.
fn mapped<'a>(
    eps: &'a [Option<Endpoint>],
    peer: Rank,
    op: &'static str,
) -> Result<&'a RemoteWindow, RuntimeError> {
    eps.get(peer.0 as usize)
        .and_then(|ep| ep.as_ref()?.window())
        .ok_or_else(|| RuntimeError::InvalidArgument {
            op,
            reason: format!("rank {peer}'s window is not mapped"),
        })
}

fn u64_le(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}
