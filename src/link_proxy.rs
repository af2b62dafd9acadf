//! A slow link between simulated hosts: a transparent TCP proxy inside one host's network
//! namespace (this kernel has no `tc netem`). Firewall rules in that host (`SimHosts::
//! route_through`) send every TCP connection between it and the other hosts through the proxy,
//! which reads where each was going (`SO_ORIGINAL_DST`) and carries the bytes on. It is on the
//! path from the start of the job, so the data plane's connections are made through it; it
//! passes bytes straight on until SIGUSR1 makes the link slow (each chunk held for the delay,
//! the bandwidth capped), and SIGUSR2 makes it fast again. It exits when its stdin closes (the
//! launcher is gone, even by SIGKILL).

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The port the proxy listens on inside its host: below the ephemeral range UCX's listeners
/// take their ports from.
pub const PORT: u16 = 7999;
/// The mark on the proxy's own connections, which the redirect rules let through.
pub const MARK: u32 = 0x7068;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Slowness {
    /// Added to every chunk's way through the proxy, each direction.
    pub delay: Duration,
    /// Bandwidth of each direction of each connection while slow, in megabits per second.
    pub rate_mbit_s: u32,
}

/// Serves until stdin closes; slow: `delay_ms` more each way, `rate_mbit_s` (0: no cap).
pub fn run(delay_ms: u64, rate_mbit_s: u32) -> Result<i32> {
    let slow = Slowness {
        delay: Duration::from_millis(delay_ms),
        rate_mbit_s,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(slow))
}

async fn serve(slow: Slowness) -> Result<i32> {
    let listener = TcpListener::bind(("0.0.0.0", PORT))
        .await
        .with_context(|| format!("the link proxy cannot listen on port {PORT}"))?;
    let is_slow = Arc::new(AtomicBool::new(false));
    // Before the launcher hears of the proxy: SIGUSR1's default action would end it.
    use tokio::signal::unix::{signal, SignalKind};
    let slow_sig = signal(SignalKind::user_defined1())?;
    let fast_sig = signal(SignalKind::user_defined2())?;
    tokio::spawn(follow_signals(slow_sig, fast_sig, is_slow.clone()));
    // The launcher routes the host's connections here only once this is read.
    println!("listening");
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            n = stdin.read(&mut sink) => if n.map_or(true, |n| n == 0) { return Ok(0) },
            conn = listener.accept() => {
                let (inbound, _) = conn.context("the link proxy cannot accept")?;
                let is_slow = is_slow.clone();
                tokio::spawn(async move {
                    // A connection that cannot be carried on is dropped, as a lost route would.
                    let _ = carry(inbound, slow, is_slow).await;
                });
            }
        }
    }
}

async fn follow_signals(
    mut slow: tokio::signal::unix::Signal,
    mut fast: tokio::signal::unix::Signal,
    is_slow: Arc<AtomicBool>,
) {
    loop {
        tokio::select! {
            _ = slow.recv() => is_slow.store(true, Ordering::SeqCst),
            _ = fast.recv() => is_slow.store(false, Ordering::SeqCst),
        }
    }
}

/// One redirected connection: opened on to where it was going, then both directions carried.
async fn carry(inbound: TcpStream, slow: Slowness, is_slow: Arc<AtomicBool>) -> Result<()> {
    let to = socket2::SockRef::from(&inbound)
        .original_dst_v4()?
        .as_socket()
        .context("no original destination")?;
    let outbound = connect_marked(to).await?;
    inbound.set_nodelay(true)?;
    let (in_r, in_w) = inbound.into_split();
    let (out_r, out_w) = outbound.into_split();
    let there = tokio::spawn(pipe(in_r, out_w, slow, is_slow.clone()));
    let back = pipe(out_r, in_w, slow, is_slow).await;
    let _ = there.await;
    back
}

/// A connection the redirect rules let through: the proxy's own.
async fn connect_marked(to: SocketAddr) -> Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_mark(MARK)?;
    s.set_nonblocking(true)?;
    let s = TcpSocket::from_std_stream(std::net::TcpStream::from(s));
    let stream = s.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One direction: a reader that stamps each chunk with when it arrived, and a writer that
/// sends it on at once, or while slow after the delay and at the capped rate. The reader does
/// not wait for the writer (up to a bound), so the delay adds latency, not a stop-and-wait.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    slow: Slowness,
    is_slow: Arc<AtomicBool>,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, bool, Vec<u8>)>(256);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            let chunk = (
                Instant::now(),
                is_slow.load(Ordering::SeqCst),
                buf[..n].to_vec(),
            );
            if tx.send(chunk).await.is_err() {
                return Ok(());
            }
        }
    });
    let mut free_at = Instant::now();
    while let Some((read_at, was_slow, bytes)) = rx.recv().await {
        if was_slow {
            tokio::time::sleep_until(read_at + slow.delay).await;
            free_at = free_at.max(Instant::now()) + wire_time(bytes.len(), slow.rate_mbit_s);
            tokio::time::sleep_until(free_at).await;
        }
        to.write_all(&bytes).await?;
    }
    let _ = to.shutdown().await;
    reader.await??;
    Ok(())
}

/// How long `bytes` take on a link of `rate_mbit_s` (0: no cap).
pub fn wire_time(bytes: usize, rate_mbit_s: u32) -> Duration {
    if rate_mbit_s == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(bytes as f64 * 8.0 / (rate_mbit_s as f64 * 1e6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_megabyte_takes_80_ms_at_100_mbit() {
        assert_eq!(wire_time(1_000_000, 100), Duration::from_millis(80));
        assert_eq!(wire_time(1_000_000, 0), Duration::ZERO);
    }
}
