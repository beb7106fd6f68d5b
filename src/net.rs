//! The only owner of sockets. Each client-port socket (one per worker, bound with
//! `SO_REUSEPORT` so the kernel spreads clients across them) is owned by one task that reads a
//! bounded batch of datagrams, hands each to the [`Router`] inline and sends what it decides.
//! Time-driven sends (retransmissions, timeouts) reach the first socket's owner over a channel.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::router::{Router, Transmit};

/// Largest receive: bigger than any valid datagram, so oversized ones are seen and counted.
const RECV_BUF: usize = 2048;
/// Datagrams handled per readiness event before yielding (a work limiter, as in quinn).
const BATCH: usize = 64;
/// Kernel socket buffer size asked for (the kernel may cap it).
const SOCKET_BUF: usize = 4 << 20;

/// Binds `n` sockets on `addr` sharing one port with `SO_REUSEPORT` (the first picks the port
/// when `addr` has port 0).
pub(crate) fn bind_udp(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let mut out: Vec<std::net::UdpSocket> = Vec::with_capacity(n.max(1));
    let mut at = addr;
    for _ in 0..n.max(1) {
        let s = Socket::new(Domain::for_address(at), Type::DGRAM, Some(Protocol::UDP))?;
        if at.is_ipv6() {
            // Serve IPv4 and IPv6 on a [::] listener where the platform allows.
            let _ = s.set_only_v6(false);
        }
        #[cfg(unix)]
        s.set_reuse_port(true)?;
        let _ = s.set_recv_buffer_size(SOCKET_BUF);
        let _ = s.set_send_buffer_size(SOCKET_BUF);
        s.set_nonblocking(true)?;
        s.bind(&at.into())?;
        let sock: std::net::UdpSocket = s.into();
        at = sock.local_addr()?;
        out.push(sock);
    }
    Ok(out)
}

/// Sends every queued transmit; failures are logged and counted, never fatal.
async fn flush(sock: &UdpSocket, router: &Router, out: &mut Vec<Transmit>) {
    for t in out.drain(..) {
        let r = match sock.try_send_to(&t.bytes, t.to) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => sock.send_to(&t.bytes, t.to).await,
            r => r,
        };
        match r {
            Ok(_) => router.metrics().tx_datagrams.increment(1),
            Err(e) => tracing::debug!(error = %e, to = %t.to, "send failed"),
        }
    }
}

/// Owns one client-port socket until `stop`: receive, route, send.
pub(crate) async fn run_socket(
    sock: UdpSocket,
    router: Arc<Router>,
    mut outbound: Option<mpsc::Receiver<Transmit>>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; RECV_BUF];
    let mut out = Vec::with_capacity(8);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(t) = async { match outbound.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                out.push(t);
                if let Some(rx) = outbound.as_mut() {
                    while out.len() < BATCH {
                        match rx.try_recv() {
                            Ok(t) => out.push(t),
                            Err(_) => break,
                        }
                    }
                }
                flush(&sock, &router, &mut out).await;
            }
            r = sock.readable() => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "socket not readable");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                for _ in 0..BATCH {
                    match sock.try_recv_from(&mut buf) {
                        Ok((n, src)) => router.handle(Instant::now(), src, &buf[..n], &mut out),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // ICMP errors surface here on some platforms; they are not fatal.
                            tracing::debug!(error = %e, "recv failed");
                            break;
                        }
                    }
                    if out.len() >= BATCH {
                        flush(&sock, &router, &mut out).await;
                    }
                }
                flush(&sock, &router, &mut out).await;
            }
        }
    }
}

/// The one timer task: push retransmissions and connect timeouts every `tick`, slow
/// housekeeping every `sweep`. Sends through the first socket's owner.
pub(crate) async fn run_timers(
    router: Arc<Router>,
    tx: mpsc::Sender<Transmit>,
    tick: Duration,
    sweep: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = Instant::now();
    let mut out = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        router.tick(now, &mut out);
        for t in out.drain(..) {
            if tx.try_send(t).is_err() {
                tracing::warn!("outbound queue full; a retransmission waits for the next tick");
                break;
            }
        }
        out.clear();
        if now.saturating_duration_since(last_sweep) >= sweep {
            last_sweep = now;
            let gone = router.sweep(now);
            if !gone.is_empty() {
                tracing::debug!(count = gone.len(), "sessions expired");
            }
        }
    }
}
