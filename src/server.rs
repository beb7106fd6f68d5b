//! Wires a node together and owns its tasks: the socket loops, the timer task, the HTTP
//! endpoint and, in cluster mode, the cluster port, the node-table refresher, the registry
//! publisher and the presence writer.
//!
//! Shutdown is detect -> signal -> wait: the caller's `shutdown` future fires, readiness goes
//! off, and in cluster mode the node drains (registry says draining, clients get Migrate, the
//! node keeps serving until they have moved or the drain deadline passes); then a
//! [`CancellationToken`] stops every task and a [`TaskTracker`] waits for them within the
//! grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{tasks, Cluster, NodeTable, PresenceRx};
use crate::config::Config;
use crate::metrics::{self, Health, Metrics};
use crate::net::{self, Dispatch, Port};
use crate::router::{Outbox, Router};
use crate::store::Store;

/// How often the timer task runs retransmissions and timeouts.
const TICK: Duration = Duration::from_millis(25);
/// A drain sends one slice of Migrates per tick.
const DRAIN_TICK: Duration = Duration::from_millis(10);
/// A drain tells at least this many clients per second (small nodes empty at once).
const DRAIN_MIN_RATE: f64 = 1600.0;
/// Most clients on their way to another node at once (acknowledged their Migrate, not yet
/// resumed there): beyond, the other nodes are behind and the drain waits for them rather
/// than pile up work they would answer with retry-later.
const DRAIN_IN_TRANSIT: usize = 8192;
/// Stragglers (their Migrate given up unacknowledged) are told again this often.
const DRAIN_RETELL: Duration = Duration::from_secs(5);
/// Longest a drain waits to learn of another active node before it tells clients to resume at
/// the public address.
const DRAIN_PEER_WAIT: Duration = Duration::from_secs(5);
/// How long a drained node keeps answering other nodes after its last client left.
const DRAIN_LINGER: Duration = Duration::from_secs(1);
/// Most deferred jobs in flight at once.
const MAX_JOBS: usize = 4096;

struct ClusterParts {
    cluster: Arc<Cluster>,
    presence_rx: PresenceRx,
    socket: std::net::UdpSocket,
}

/// A bound, not yet running node.
pub struct Server {
    cfg: Config,
    router: Arc<Router>,
    sockets: Vec<std::net::UdpSocket>,
    local_addr: SocketAddr,
    http: Option<TcpListener>,
    health: Arc<Health>,
    cluster: Option<ClusterParts>,
}

impl Server {
    /// Binds the client port (and the metrics and cluster ports, if configured). Does not wait
    /// for Redis: a node starts and serves local traffic while Redis is away.
    pub async fn bind(cfg: Config) -> anyhow::Result<Self> {
        let workers = if cfg.workers == 0 {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(8)
        } else {
            cfg.workers
        };
        let sockets = net::bind_udp(cfg.listen, workers)
            .with_context(|| format!("binding UDP {}", cfg.listen))?;
        let local_addr = sockets[0].local_addr()?;
        let http = match cfg.metrics_listen {
            Some(a) => Some(
                metrics::bind_http(a)
                    .await
                    .with_context(|| format!("binding metrics HTTP {a}"))?,
            ),
            None => None,
        };
        let metrics = Metrics::with_cluster(cfg.cluster.is_some());
        let cluster = match &cfg.cluster {
            None => None,
            Some(cc) => {
                let store = Arc::new(Store::open_cluster(cc, metrics.clone())?);
                let socket = net::bind_udp(cc.cluster_listen, 1)
                    .with_context(|| format!("binding cluster UDP {}", cc.cluster_listen))?
                    .remove(0);
                let mut cc = cc.clone();
                // Port 0 (tests): publish the port actually bound.
                let bound = socket.local_addr()?;
                if cc.advertise.port() == 0 {
                    cc.advertise.set_port(bound.port());
                }
                if cc.public_addr.port() == 0 || cc.public_addr == cfg.listen {
                    cc.public_addr = local_addr;
                }
                let (cluster, presence_rx) = Cluster::new(cc, store, metrics.clone());
                tasks::claim_node_id(&cluster, cluster.cfg.registry_period).await?;
                Some(ClusterParts {
                    cluster,
                    presence_rx,
                    socket,
                })
            }
        };
        let router = Arc::new(Router::new(
            &cfg,
            metrics,
            cluster.as_ref().map(|c| c.cluster.clone()),
        ));
        Ok(Self {
            cfg,
            router,
            sockets,
            local_addr,
            http,
            health: Arc::new(Health::default()),
            cluster,
        })
    }

    /// The UDP address clients talk to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The UDP address of the cluster port (cluster mode).
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster
            .as_ref()
            .and_then(|c| c.socket.local_addr().ok())
    }

    /// The HTTP address of `/metrics`, `/healthz` and `/readyz`, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The node's router (state and metrics), for embedding and tests.
    pub fn router(&self) -> Arc<Router> {
        self.router.clone()
    }

    /// Runs until `shutdown` completes, drains (cluster mode), then stops within the grace
    /// period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        // One outbound queue per client socket: sends from timers and jobs spread over them.
        let (client_tx, client_rx): (Vec<_>, Vec<_>) = (0..self.sockets.len())
            .map(|_| mpsc::channel(net::QUEUE))
            .unzip();
        let (cluster_tx, cluster_rx) = mpsc::channel(net::QUEUE);
        let cluster = self.cluster.as_ref().map(|c| c.cluster.clone());
        let client_socks = self
            .sockets
            .into_iter()
            .map(|s| UdpSocket::from_std(s).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        // The cluster socket, and what the cluster's background tasks take.
        let (cluster_sock, cluster_bg) = match self.cluster {
            Some(ClusterParts {
                cluster,
                presence_rx,
                socket,
            }) => (
                Some(Arc::new(UdpSocket::from_std(socket)?)),
                Some((cluster, presence_rx)),
            ),
            None => (None, None),
        };
        let d = Dispatch {
            router: self.router.clone(),
            client_tx: client_tx.into(),
            client_socks: client_socks.iter().cloned().collect(),
            cluster_sock: cluster_sock.clone(),
            cluster_tx: cluster.as_ref().map(|_| cluster_tx),
            cluster: cluster.clone(),
            jobs: Arc::new(Semaphore::new(MAX_JOBS)),
            tracker: tracker.clone(),
        };
        for (sock, rx) in client_socks.into_iter().zip(client_rx) {
            tracker.spawn(net::run_socket(
                sock,
                Port::Client,
                d.clone(),
                rx,
                stop.clone(),
            ));
        }
        tracker.spawn(net::run_timers(
            d.clone(),
            TICK,
            self.cfg.sweep_interval,
            stop.clone(),
        ));
        if let Some(l) = self.http {
            tracker.spawn(metrics::serve_http(
                l,
                self.router.metrics().clone(),
                self.health.clone(),
                stop.clone(),
            ));
        }
        // Background tasks that must outlive the drain get their own token.
        let bg_stop = CancellationToken::new();
        let bg = TaskTracker::new();
        if let (Some((c, presence_rx)), Some(sock)) = (cluster_bg, cluster_sock) {
            let cc = c.cfg.clone();
            tracker.spawn(net::run_socket(
                sock,
                Port::Cluster,
                d.clone(),
                cluster_rx,
                stop.clone(),
            ));
            bg.spawn(tasks::run_refresher(
                c.clone(),
                cc.table_period,
                bg_stop.clone(),
            ));
            bg.spawn(tasks::run_registry(
                c.clone(),
                self.router.clone(),
                cc.registry_period,
                bg_stop.clone(),
            ));
            bg.spawn(tasks::run_seeds(
                c.clone(),
                cc.peers.clone(),
                bg_stop.clone(),
            ));
            bg.spawn(tasks::run_presence_writer(
                c.clone(),
                self.router.clone(),
                presence_rx,
                cc.presence_ttl,
                cc.presence_ttl / 3,
                bg_stop.clone(),
            ));
            tracing::info!(node = %c.id, cluster = %cc.advertise, "cluster mode");
        }
        self.health.set_ready(true);
        tracing::info!(listen = %self.local_addr, "sigrouter serving");
        shutdown.await;
        tracing::info!("shutting down");
        self.health.set_ready(false);
        self.router.set_draining(true);
        if let Some(c) = &cluster {
            drain(c, &self.router, &d).await;
        }
        stop.cancel();
        bg_stop.cancel();
        tracker.close();
        bg.close();
        let waited = tokio::time::timeout(self.cfg.shutdown_grace, async {
            tracker.wait().await;
            bg.wait().await;
        })
        .await;
        if waited.is_err() {
            tracing::warn!("tasks did not stop within the grace period");
        }
        Ok(())
    }
}

/// How fast a drain tells its clients: every one within `spread` (at least
/// [`DRAIN_MIN_RATE`] per second), by the clock rather than by counting ticks (a slow tick is
/// caught up), and never while [`DRAIN_IN_TRANSIT`] clients are already on their way.
#[derive(Clone, Copy, Debug)]
struct Pace {
    total: usize,
    /// Clients per second.
    rate: f64,
}

impl Pace {
    fn new(total: usize, spread: Duration) -> Self {
        let rate = (total as f64 / spread.as_secs_f64().max(1e-3)).max(DRAIN_MIN_RATE);
        Self { total, rate }
    }

    /// The usual slice of one tick.
    fn per_tick(&self) -> usize {
        (self.rate * DRAIN_TICK.as_secs_f64()).ceil().max(1.0) as usize
    }

    /// How many to tell now, `cursor` told so far, `elapsed` since the walk started,
    /// `in_transit` on their way: what the clock says is due, at most two ticks' worth (a
    /// stall is caught up gradually), and only into the room the in-transit bound leaves.
    fn next(&self, cursor: usize, elapsed: Duration, in_transit: usize) -> usize {
        let due = ((elapsed.as_secs_f64() * self.rate).ceil() as usize)
            .max(self.per_tick())
            .min(self.total);
        due.saturating_sub(cursor)
            .min(2 * self.per_tick())
            .min(DRAIN_IN_TRANSIT.saturating_sub(in_transit))
    }
}

/// Where a drain sends clients: best of two random active nodes, by the sessions each had at
/// the last renewal plus those this drain already sent it (so a drain does not herd everyone
/// onto the emptiest node).
struct Picker {
    nodes: Vec<(SocketAddr, u64)>,
}

impl Picker {
    fn new(table: &NodeTable, me: &str) -> Self {
        let nodes = table
            .active_except(me)
            .into_iter()
            // An unspecified public address (listening on 0.0.0.0 without --public-addr) is no
            // use to a client: it then resumes at the address it was configured with.
            .filter(|n| !n.public.ip().is_unspecified())
            .map(|n| (n.public, n.sessions))
            .collect();
        Self { nodes }
    }

    fn pick(&mut self) -> Option<SocketAddr> {
        let n = self.nodes.len();
        if n == 0 {
            return None;
        }
        let (a, b) = (rand::random::<usize>() % n, rand::random::<usize>() % n);
        let i = if self.nodes[a].1 <= self.nodes[b].1 {
            a
        } else {
            b
        };
        self.nodes[i].1 += 1;
        Some(self.nodes[i].0)
    }
}

/// Moves every client to another node, within the drain deadline.
///
/// The node first reads the registry (a node that drains moments after it started may not know
/// the others yet, and a Migrate without an address sends a client back through the load
/// balancer, perhaps to this very node). Then it walks its sessions in paced slices, so every
/// client is told within the first half of the drain without flooding the sockets' queues,
/// and tells stragglers again every few seconds (the same Migrate, the same push id).
async fn drain(c: &Arc<Cluster>, router: &Arc<Router>, d: &Dispatch) {
    let started = Instant::now();
    let deadline = started + c.cfg.drain;
    c.set_draining();
    if tasks::publish_self(c, &**router, c.cfg.registry_period)
        .await
        .is_none()
    {
        tracing::warn!("could not mark this node draining in Redis; continuing the drain");
    }
    let wait_for_peers = started + (c.cfg.drain / 4).min(DRAIN_PEER_WAIT);
    loop {
        let fresh = c.refresh_now(Duration::from_secs(1)).await;
        if c.table().pick_active(&c.id).is_some() {
            break;
        }
        if Instant::now() >= wait_for_peers {
            tracing::warn!(
                fresh,
                "draining with no other active node known: clients are told to resume at the public address"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let everyone = router.session_ids();
    let spread = (c.cfg.drain / 2).max(Duration::from_secs(1));
    let pace = Pace::new(everyone.len(), spread);
    let per_tick = pace.per_tick();
    let walk_started = Instant::now();
    tracing::info!(
        sessions = everyone.len(),
        per_second = pace.rate,
        "draining: telling clients where to go"
    );
    let mut cursor = 0;
    let mut stragglers: Vec<uuid::Uuid> = Vec::new();
    let mut told_all_at = None;
    // Stay until every client has moved and nothing another node waits on is left (a pending
    // connect whose target just moved is aborted towards its initiator's node first).
    // Clients in transit whose connections wait here for their new node count too: leaving
    // before that node asks would end those connections.
    while (router.session_count() > 0
        || router.in_flight() > 0
        || router.awaiting_handover(Instant::now()) > 0)
        && Instant::now() < deadline
    {
        let slice: Vec<uuid::Uuid> = if cursor < everyone.len() {
            let n = pace.next(cursor, walk_started.elapsed(), router.migrating_count());
            let end = (cursor + n).min(everyone.len());
            let s = everyone[cursor..end].to_vec();
            cursor = end;
            if cursor == everyone.len() {
                told_all_at = Some(Instant::now());
            }
            s
        } else {
            if stragglers.is_empty() && told_all_at.is_none_or(|t| t.elapsed() >= DRAIN_RETELL) {
                told_all_at = Some(Instant::now());
                stragglers = router.session_ids();
                if !stragglers.is_empty() {
                    tracing::info!(
                        left = stragglers.len(),
                        "draining: telling stragglers again"
                    );
                }
            }
            let n = per_tick.min(stragglers.len());
            stragglers.split_off(stragglers.len() - n)
        };
        if !slice.is_empty() {
            let mut out = Outbox::default();
            let mut picker = Picker::new(&c.table(), &c.id);
            router.migrate(Instant::now(), &slice, || picker.pick(), &mut out);
            d.route_all_cluster_first(&mut out);
        }
        tokio::time::sleep(DRAIN_TICK).await;
    }
    // Linger briefly: peers still holding this node in their caches get a quick "not here"
    // (and look again) instead of waiting out an unanswered forward.
    let linger = (started + c.cfg.drain).min(Instant::now() + DRAIN_LINGER);
    tasks::publish_self(c, &**router, c.cfg.registry_period).await;
    tokio::time::sleep_until(linger.into()).await;
    let waited_for = router.awaiting_handover_sample(Instant::now(), 8);
    if !waited_for.is_empty() {
        tracing::debug!(
            ?waited_for,
            "clients in transit whose new node never asked for their connections"
        );
    }
    tracing::info!(
        left = router.session_count(),
        in_flight = router.in_flight(),
        awaiting_handover = router.awaiting_handover(Instant::now()),
        secs = started.elapsed().as_secs_f64(),
        "drain finished"
    );
    tasks::unpublish_self(c).await;
    // Leave membership last: a few members hear it at once and the rest within a gossip round.
    let mut out = Outbox::default();
    router.leave_cluster(Instant::now(), &mut out);
    d.route_all(&mut out);
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_drain_tells_everyone_within_the_spread_by_the_clock() {
        // A million over 10 s: 100,000 per second, 1,000 per 10 ms tick.
        let p = Pace::new(1_000_000, Duration::from_secs(10));
        assert_eq!(p.per_tick(), 1000);
        assert_eq!(p.next(0, Duration::ZERO, 0), 1000);
        // A tick that came late (25 ms instead of 10) is caught up, two ticks at a time.
        assert_eq!(p.next(1000, ms(25), 0), 1500);
        assert_eq!(p.next(2500, ms(25), 0), 0);
        // Nothing beyond the total.
        assert_eq!(p.next(999_500, Duration::from_secs(11), 0), 500);
    }

    #[test]
    fn a_drain_waits_while_too_many_clients_are_on_their_way() {
        let p = Pace::new(1_000_000, Duration::from_secs(10));
        assert_eq!(p.next(5000, ms(60), DRAIN_IN_TRANSIT), 0);
        assert_eq!(p.next(5000, ms(60), DRAIN_IN_TRANSIT - 300), 300);
    }

    #[test]
    fn a_small_drain_goes_at_the_least_rate() {
        let p = Pace::new(100, Duration::from_secs(10));
        assert_eq!(p.per_tick(), 16);
        assert_eq!(p.next(0, Duration::ZERO, 0), 16);
        assert_eq!(p.next(96, ms(70), 0), 4);
    }
}
