//! The only owner of sockets. Each client-port socket (one per worker, bound with
//! `SO_REUSEPORT` so the kernel spreads clients across them) is owned by one task that
//! alternates bounded batches: receive up to a few `recvmmsg` batches and hand each datagram to
//! the [`Router`] inline, then send what it decided together with what other tasks queued for
//! this socket, with `sendmmsg` (see [`io`]). In cluster mode one more task owns the cluster
//! port the same way.
//!
//! A socket loop sends what it decided for the other port (a client loop forwarding to another
//! node, the cluster loop answering a client) itself, with one `sendmmsg` on that port's socket,
//! rather than waking that port's task: on a busy machine each wake-up is a wait for a core,
//! and a cross-node connect crosses ports four times. What the socket does not take at once
//! goes to the queues below, as if it had never been tried.
//!
//! Sends that originate elsewhere (the timer task, deferred jobs) go to one of the client
//! sockets' outbound queues, chosen by destination so that one client's datagrams leave in
//! order and the load spreads over every socket. All client sockets share one address and
//! port, so the client sees the same source whichever socket sends. A loop takes at most a
//! bounded batch from its queue per turn, so queued sends never starve receives, nor the
//! reverse.

mod io;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Receive system calls per turn of a socket loop (each up to [`io::RECV_BATCH`] datagrams).
const RECV_CALLS: usize = 2;
/// Datagrams taken from a socket's outbound queue per turn.
const QUEUED_PER_TURN: usize = 2 * io::SEND_BATCH;
/// Datagrams waiting in a socket loop beyond which it stops receiving until the socket
/// drains (the kernel's buffer is full; the sender's retransmission covers what is dropped).
const PENDING_LIMIT: usize = 8192;
/// Capacity of each socket's outbound queue.
pub(crate) const QUEUE: usize = 16_384;
/// Kernel socket buffer size asked for (the kernel may cap it).
const SOCKET_BUF: usize = 4 << 20;

/// Binds `n` sockets on `addr` sharing one port with `SO_REUSEPORT` (the first picks the port
/// when `addr` has port 0).
pub(crate) fn bind_udp(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    // SO_REUSEPORT would let this node share a port another process (another sigrouter, say)
    // already holds, and take a share of its traffic: clients would flap between the two. A
    // probe without SO_REUSEPORT fails if anyone holds the port; then this node refuses to
    // start. (Port 0 asks the kernel for a free port: nothing to check.)
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            let _ = probe.set_only_v6(false);
        }
        probe.bind(&addr.into()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "UDP port {} is already held by another process",
                        addr.port()
                    ),
                )
            } else {
                e
            }
        })?;
    }
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

/// Which of `n` client socket queues serves `to`: a hash of the destination, so that one
/// client's datagrams stay in order and clients spread over every socket.
fn queue_index(to: &SocketAddr, n: usize) -> usize {
    let h = match to {
        SocketAddr::V4(a) => u64::from(a.ip().to_bits()),
        SocketAddr::V6(a) => {
            let b = a.ip().to_bits();
            (b as u64) ^ ((b >> 64) as u64)
        }
    } ^ (u64::from(to.port()) << 32);
    // Fibonacci hashing: the high 32 bits of the product depend on every bit of `h`; scaling
    // them by `n` keeps the high bits (a plain `% n` would keep the low ones).
    let mixed = h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    ((mixed * n.max(1) as u64) >> 32) as usize
}

/// Where a socket owner sends what is not for its own socket.
#[derive(Clone)]
pub(crate) struct Dispatch {
    pub(crate) router: Arc<Router>,
    /// To each client socket's owner (sends are spread by destination).
    pub(crate) client_tx: Arc<[mpsc::Sender<Transmit>]>,
    /// To the cluster socket's owner (cluster mode).
    pub(crate) cluster_tx: Option<mpsc::Sender<Transmit>>,
    /// The client sockets, for the cluster loop's own sends to clients.
    pub(crate) client_socks: Arc<[Arc<UdpSocket>]>,
    /// The cluster socket (cluster mode), for the client loops' own sends to other nodes.
    pub(crate) cluster_sock: Option<Arc<UdpSocket>>,
    pub(crate) cluster: Option<Arc<Cluster>>,
    pub(crate) jobs: Arc<Semaphore>,
    pub(crate) tracker: TaskTracker,
}

impl Dispatch {
    /// The client socket queue that serves `to`.
    fn client_queue(&self, to: &SocketAddr) -> &mpsc::Sender<Transmit> {
        &self.client_tx[queue_index(to, self.client_tx.len())]
    }

    /// Hands off everything in `out` except what `keep` says the caller sends itself.
    fn route(&self, out: &mut Outbox, keep_client: bool, keep_cluster: bool) {
        if !keep_client {
            for t in out.client.drain(..) {
                if self.client_queue(&t.to).try_send(t).is_err() {
                    self.router.metrics().tx_dropped_queue.increment(1);
                }
            }
        }
        if !keep_cluster {
            for t in out.cluster.drain(..) {
                match &self.cluster_tx {
                    Some(tx) => {
                        if tx.try_send(t).is_err() {
                            self.router.metrics().tx_dropped_queue.increment(1);
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

    /// Sends the datagrams in `q` on `sock` from this task, as many as the socket takes
    /// without waiting; leaves the rest in `q` (for the queues). A datagram the kernel refuses
    /// for another reason than a full buffer is counted and dropped, as its owner would.
    fn send_direct(&self, sock: &UdpSocket, tx: &mut io::Tx, q: &mut Vec<Transmit>) {
        let mut sent = 0;
        while sent < q.len() {
            match tx.send(sock, &q[sent..]) {
                Ok(0) => break,
                Ok(n) => {
                    self.router.metrics().tx_datagrams.increment(n as u64);
                    sent += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.router.metrics().tx_dropped_error.increment(1);
                    tracing::debug!(error = %e, to = %q[sent].to, "send failed");
                    sent += 1;
                }
            }
        }
        q.drain(..sent);
    }

    /// Sends what a socket loop decided for the other port on that port's socket (see the
    /// module docs); what it does not take is left for [`Dispatch::route`].
    fn send_other_port(&self, own: Port, tx: &mut io::Tx, out: &mut Outbox) {
        match own {
            Port::Client => {
                if let (Some(sock), false) = (&self.cluster_sock, out.cluster.is_empty()) {
                    self.send_direct(sock, tx, &mut out.cluster);
                }
            }
            Port::Cluster => {
                if !out.client.is_empty() {
                    // Any client socket will do (they share one address); the first in the
                    // batch picks it, so that the load spreads.
                    let i = queue_index(&out.client[0].to, self.client_socks.len());
                    if let Some(sock) = self.client_socks.get(i) {
                        self.send_direct(sock, tx, &mut out.client);
                    }
                }
            }
        }
    }

    /// Hands off everything in `out`.
    pub(crate) fn route_all(&self, out: &mut Outbox) {
        self.route(out, false, false);
    }

    /// Hands off everything in `out`, its node-to-node datagrams sent from this task before
    /// anything is queued for the client sockets: the drain's `Expect`s then leave before the
    /// Migrates that send the clients after them.
    pub(crate) fn route_all_cluster_first(&self, out: &mut Outbox) {
        if let (Some(sock), false) = (&self.cluster_sock, out.cluster.is_empty()) {
            let mut tx = io::Tx::new(sock);
            self.send_direct(sock, &mut tx, &mut out.cluster);
        }
        self.route(out, false, false);
    }

    fn spawn_job(&self, job: Job) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let Ok(permit) = self.jobs.clone().try_acquire_owned() else {
            // Too much waiting already: fail fast rather than queue behind it.
            jobs_refused_log();
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

/// Requests refused because too many jobs were waiting, since the last log line.
static JOBS_REFUSED: AtomicU64 = AtomicU64::new(0);
/// When that line was last written (ms since the Unix epoch).
static JOBS_REFUSED_LOGGED_MS: AtomicU64 = AtomicU64::new(0);
/// At most one log line per this many ms about refused jobs: an overloaded node refuses tens
/// of thousands per second, and a line each would add to the overload.
const JOBS_REFUSED_LOG_EVERY_MS: u64 = 10_000;

/// Counts a request refused for want of a job slot; writes a line at most every 10 s.
fn jobs_refused_log() {
    let n = JOBS_REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let last = JOBS_REFUSED_LOGGED_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= JOBS_REFUSED_LOG_EVERY_MS
        && JOBS_REFUSED_LOGGED_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        JOBS_REFUSED.fetch_sub(n, Ordering::Relaxed);
        tracing::warn!(
            refused_since_last_line = n,
            "too many deferred jobs; answering retry-later (at most one line per 10 s)"
        );
    }
}

/// Which port a socket serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    Client,
    Cluster,
}

/// Sends from the front of `pending` until it is empty or the socket is full. Returns whether
/// the socket was full. Datagrams the kernel refuses for another reason are logged and
/// dropped, never fatal.
fn flush(
    sock: &UdpSocket,
    tx: &mut io::Tx,
    router: &Router,
    pending: &mut VecDeque<Transmit>,
) -> bool {
    while !pending.is_empty() {
        let front = pending.as_slices().0;
        match tx.send(sock, front) {
            Ok(0) => return true,
            Ok(n) => {
                router.metrics().tx_datagrams.increment(n as u64);
                pending.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) => {
                if let Some(t) = pending.pop_front() {
                    router.metrics().tx_dropped_error.increment(1);
                    tracing::debug!(error = %e, to = %t.to, "send failed");
                }
            }
        }
    }
    false
}

/// Owns one socket until `stop`: receive, route, send, in bounded batches.
pub(crate) async fn run_socket(
    sock: Arc<UdpSocket>,
    port: Port,
    d: Dispatch,
    mut inbound: mpsc::Receiver<Transmit>,
    stop: CancellationToken,
) {
    let mut rx = match io::Rx::new(&sock) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %e, "socket setup failed; this socket is not served");
            return;
        }
    };
    let mut tx = io::Tx::new(&sock);
    // For this loop's own sends on the other port's socket.
    let mut other_tx = io::Tx::new(&sock);
    let mut out = Outbox::default();
    let mut pending: VecDeque<Transmit> = VecDeque::with_capacity(4 * io::SEND_BATCH);
    let mut blocked = false;
    loop {
        if stop.is_cancelled() {
            break;
        }
        // Receive a bounded batch, unless the socket cannot take our answers.
        let mut received = 0;
        if !blocked && pending.len() < PENDING_LIMIT {
            for _ in 0..RECV_CALLS {
                let now = Instant::now();
                let r = rx.recv(&sock, |batch| match port {
                    Port::Client => d.router.handle_batch(now, batch, &mut out),
                    Port::Cluster => {
                        for (src, buf) in batch {
                            d.router.handle_internal(now, *src, buf, &mut out);
                        }
                    }
                });
                match r {
                    Ok(n) => received += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // ICMP errors surface here on some platforms; they are not fatal.
                        tracing::debug!(error = %e, "recv failed");
                        break;
                    }
                }
            }
            if received > 0 {
                d.send_other_port(port, &mut other_tx, &mut out);
                match port {
                    Port::Client => {
                        pending.extend(out.client.drain(..));
                        d.route(&mut out, true, false);
                    }
                    Port::Cluster => {
                        pending.extend(out.cluster.drain(..));
                        d.route(&mut out, false, true);
                    }
                }
            }
        }
        // Take a bounded batch of what other tasks queued for this socket.
        let mut queued = 0;
        while queued < QUEUED_PER_TURN {
            match inbound.try_recv() {
                Ok(t) => {
                    pending.push_back(t);
                    queued += 1;
                }
                Err(_) => break,
            }
        }
        if !pending.is_empty() {
            blocked = flush(&sock, &mut tx, &d.router, &mut pending);
        }
        if pending.is_empty() {
            // Every answer of this turn is sent: their arena chunk is free for the next turn.
            out.reclaim();
        }
        if blocked {
            // The kernel's buffer is full: wait until it drains (or stop).
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                r = sock.writable() => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "socket not writable");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    blocked = false;
                }
            }
        } else if received == 0 && queued == 0 {
            // Idle: wait for a datagram, a queued send or the stop.
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                r = sock.readable() => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "socket not readable");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                Some(t) = inbound.recv() => pending.push_back(t),
            }
        } else {
            // Busy: let the runtime's other tasks (timers, jobs) in now and then.
            tokio::task::consume_budget().await;
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
    let mut out = Outbox::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        out.reclaim();
        d.router.tick(now, &mut out);
        d.route(&mut out, false, false);
        if now.saturating_duration_since(last_sweep) >= sweep {
            last_sweep = now;
            let gone = d.router.sweep(now, &mut out);
            d.route(&mut out, false, false);
            if !gone.is_empty() {
                tracing::debug!(count = gone.len(), "sessions expired");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients (one address, many ports, as behind a NAT; or many addresses) spread over every
    /// socket, and one client always maps to the same socket.
    #[test]
    fn queued_sends_spread_over_sockets_and_keep_a_client_on_one() {
        for n in [1usize, 2, 3, 8] {
            let mut per = vec![0usize; n];
            for i in 0..4000u32 {
                let to = if i % 2 == 0 {
                    SocketAddr::from(([203, 0, 113, 7], 1024 + i as u16))
                } else {
                    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40000))
                };
                let q = queue_index(&to, n);
                assert_eq!(q, queue_index(&to, n));
                per[q] += 1;
            }
            let even = 4000 / n;
            for c in per {
                assert!(
                    c > even * 3 / 4 && c < even * 5 / 4,
                    "uneven spread {c} of {even}"
                );
            }
        }
    }
}
