//! The only owner of sockets. Each client-port socket (one per worker, bound with
//! `SO_REUSEPORT` so the kernel spreads clients across them) is owned by one task that reads a
//! bounded batch of datagrams, hands each to the [`Router`] inline and sends what it decides.
//! In cluster mode one more task owns the cluster port. Sends that originate elsewhere (the
//! timer task, deferred jobs, the other port) reach a socket's owner over a channel.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::jobs;
use crate::router::{Job, Outbox, Router, Transmit};

/// Largest receive: bigger than any valid datagram, so oversized ones are seen and counted.
const RECV_BUF: usize = 2048;
/// Datagrams handled per readiness event before yielding (a work limiter, as in quinn).
const BATCH: usize = 64;
/// How often idle and orphaned connections are forgotten.
const CONN_SWEEP: Duration = Duration::from_secs(10);
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

/// Where a socket owner sends what is not for its own socket.
#[derive(Clone)]
pub(crate) struct Dispatch {
    pub(crate) router: Arc<Router>,
    /// To the first client socket's owner.
    pub(crate) client_tx: mpsc::Sender<Transmit>,
    /// To the cluster socket's owner (cluster mode).
    pub(crate) cluster_tx: Option<mpsc::Sender<Transmit>>,
    pub(crate) cluster: Option<Arc<Cluster>>,
    pub(crate) jobs: Arc<Semaphore>,
    pub(crate) tracker: TaskTracker,
}

impl Dispatch {
    /// Hands off everything in `out` except what `keep` says the caller sends itself.
    fn route(&self, out: &mut Outbox, keep_client: bool, keep_cluster: bool) {
        if !keep_client {
            for t in out.client.drain(..) {
                if self.client_tx.try_send(t).is_err() {
                    tracing::warn!("client outbound queue full; dropped (the sender retransmits)");
                }
            }
        }
        if !keep_cluster {
            for t in out.cluster.drain(..) {
                match &self.cluster_tx {
                    Some(tx) => {
                        if tx.try_send(t).is_err() {
                            tracing::warn!("cluster outbound queue full; dropped (retransmitted)");
                        }
                    }
                    None => tracing::error!("node-to-node send without a cluster port"),
                }
            }
        }
        for job in out.jobs.drain(..) {
            self.spawn_job(job);
        }
    }

    /// Hands off everything in `out`.
    pub(crate) fn route_all(&self, out: &mut Outbox) {
        self.route(out, false, false);
    }

    fn spawn_job(&self, job: Job) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let Ok(permit) = self.jobs.clone().try_acquire_owned() else {
            // Too much waiting already: fail fast rather than queue behind it.
            tracing::warn!("too many deferred jobs; answering retry-later");
            let mut out = Outbox::default();
            self.router.reject_job(Instant::now(), job, &mut out);
            self.route(&mut out, false, false);
            return;
        };
        let me = self.clone();
        self.tracker.spawn(async move {
            let mut out = jobs::run(job, &me.router, &cluster).await;
            drop(permit);
            me.route(&mut out, false, false);
        });
    }
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

/// Which port a socket serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    Client,
    Cluster,
}

/// Owns one socket until `stop`: receive, route, send.
pub(crate) async fn run_socket(
    sock: UdpSocket,
    port: Port,
    d: Dispatch,
    mut inbound: Option<mpsc::Receiver<Transmit>>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; RECV_BUF];
    let mut out = Outbox::default();
    let mut own = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(t) = async { match inbound.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                own.push(t);
                if let Some(rx) = inbound.as_mut() {
                    while own.len() < BATCH {
                        match rx.try_recv() {
                            Ok(t) => own.push(t),
                            Err(_) => break,
                        }
                    }
                }
                flush(&sock, &d.router, &mut own).await;
            }
            r = sock.readable() => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "socket not readable");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                for _ in 0..BATCH {
                    match sock.try_recv_from(&mut buf) {
                        Ok((n, src)) => match port {
                            Port::Client => d.router.handle(Instant::now(), src, &buf[..n], &mut out),
                            Port::Cluster => d.router.handle_internal(Instant::now(), src, &buf[..n], &mut out),
                        },
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // ICMP errors surface here on some platforms; they are not fatal.
                            tracing::debug!(error = %e, "recv failed");
                            break;
                        }
                    }
                }
                match port {
                    Port::Client => {
                        own.append(&mut out.client);
                        d.route(&mut out, true, false);
                    }
                    Port::Cluster => {
                        own.append(&mut out.cluster);
                        d.route(&mut out, false, true);
                    }
                }
                flush(&sock, &d.router, &mut own).await;
            }
        }
    }
}

/// The one timer task: retransmissions and timeouts every `tick`, slow housekeeping every
/// `sweep`.
pub(crate) async fn run_timers(
    d: Dispatch,
    tick: Duration,
    sweep: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = Instant::now();
    let mut last_conn_sweep = Instant::now();
    let mut out = Outbox::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        d.router.tick(now, &mut out);
        d.route(&mut out, false, false);
        if now.saturating_duration_since(last_sweep) >= sweep {
            last_sweep = now;
            if now.saturating_duration_since(last_conn_sweep) >= CONN_SWEEP {
                last_conn_sweep = now;
                d.router.sweep_conns(now);
            }
            let gone = d.router.sweep(now, &mut out);
            d.route(&mut out, false, false);
            if !gone.is_empty() {
                tracing::debug!(count = gone.len(), "sessions expired");
            }
        }
    }
}
