//! Cluster state behind clear seams.
//!
//! - [`NodeTable`]: an immutable snapshot of the registry and the membership view behind
//!   [`ArcSwap`]. Exactly one task, the refresher in [`tasks`], builds and stores new
//!   snapshots; everything else only loads. A request that misses a node calls
//!   [`Cluster::wait_for_node`]: it nudges the refresher (nudges coalesce into one Redis read)
//!   and waits for a newer generation with a deadline, holding nothing, then gives up with
//!   retry-later. The post-mortem's deadlock (a read guard held while asking for the write
//!   guard) has no place to happen: there is no guard to hold.
//!   `/metrics` shows the table's age and the age of the oldest waiting request, computed at
//!   scrape time, so a stuck refresher or a wait without an end shows even if every task hangs.
//! - Presence (`presence.rs`): where each client is. Writes go through a channel to one
//!   batching writer task; reads hit a short-lived local cache first, Redis on a miss (only
//!   from deferred jobs, never from a socket loop).
//! - [`wire`]: the authenticated node-to-node datagram format; `envelope.rs` seals and opens
//!   it for this node (refusals counted and logged at a bounded rate).
//! - [`membership`]: SWIM membership over the cluster port, merged with the registry into the
//!   node table by the refresher, so nodes know each other while Redis is away; `members.rs`
//!   drives it for this node.

mod envelope;
pub mod lookup;
mod members;
pub mod membership;
mod presence;
mod table;
pub mod tasks;
pub mod wire;

pub use presence::{LocalSessions, PresenceOp, PresenceRx};
pub use table::{NodeInfo, NodeState, NodeTable};

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use tokio::sync::{mpsc, watch, Notify};
use uuid::Uuid;

use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::timer::AgeOut;
use membership::{MemberId, Membership};
use presence::PresenceCache;

/// A presence write waiting on Redis longer than this tells the other nodes (see
/// [`Cluster::presence_behind`]).
const WRITE_STUCK_MS: u64 = 100;
/// Node-to-node datagrams older or newer than this are refused as replays.
const FRESHNESS_MS: u64 = 30_000;
/// Presence writes waiting for the writer. A full queue costs a full re-publication of every
/// session (and until it is done, records missing in Redis), so it holds several seconds of a
/// drain's arrivals at 100,000 a second: about 56 bytes each, 15 MB when full.
const PRESENCE_QUEUE: usize = 262_144;
/// How long replies given and one-shot datagrams seen are remembered: longer than a datagram
/// stays fresh, so a replay is either remembered or stale.
const REPLAY_MEMORY: Duration = Duration::from_millis(FRESHNESS_MS * 2);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// HMAC-SHA256 of `data` under `key`.
fn derive_key(key: &[u8], data: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// A node's cluster state, shared by its socket loops, deferred jobs and background tasks.
pub struct Cluster {
    /// This node's id.
    pub id: Arc<str>,
    /// Settings.
    pub cfg: ClusterConfig,
    /// Redis.
    pub store: Arc<Store>,
    table: ArcSwap<NodeTable>,
    generation: watch::Sender<u64>,
    nudge: Notify,
    nudged: AtomicBool,
    published: Notify,
    presence: PresenceCache,
    presence_tx: mpsc::Sender<(PresenceOp, u64)>,
    /// Set when Redis may have lost our writes: the writer re-publishes every session.
    pub republish: AtomicBool,
    seq: AtomicU64,
    seen: DashMap<(Arc<str>, u64), (wire::Status, Instant)>,
    /// When to forget entries of `seen`.
    seen_ages: AgeOut<(Arc<str>, u64)>,
    draining: AtomicBool,
    /// When this node started, ms since the Unix epoch.
    pub started_ms: u64,
    metrics: Metrics,
    /// Start times of the requests waiting in [`Cluster::wait_for_node`] (with a unique id).
    waiters: Mutex<BTreeSet<(Instant, u64)>>,
    waiter_ids: AtomicU64,
    /// When the node table was last refreshed successfully, ms since `clock`.
    refreshed_ms: AtomicU64,
    clock: Instant,
    /// Refused node-to-node datagrams since the last log line, and when that line was written
    /// (ms since `clock`, `u64::MAX`: never).
    refused: AtomicU64,
    refused_logged_ms: AtomicU64,
    /// SWIM membership. Locked only in synchronous code, for one call, never across an await.
    membership: Mutex<Membership>,
    members_changed: Notify,
    /// One-shot datagrams (membership, lookups) seen recently: (sender, seq, is a reply).
    oneshot: DashMap<(Arc<str>, u64, bool), Instant>,
    /// When to forget entries of `oneshot`.
    oneshot_ages: AgeOut<(Arc<str>, u64, bool)>,
    /// Keys derived session secrets (see [`Cluster::session_secret`]).
    secret_key: [u8; 32],
    /// When the presence writer's current Redis call began (ms since the epoch; 0: idle).
    presence_busy_since: AtomicU64,
    /// Presence writes waiting for a retry.
    presence_backlog: AtomicU64,
    /// Resumes whose cause waits for the next node table: the node that held the session,
    /// and when the resume arrived ([`Cluster::count_resume`]).
    unsure_resumes: Mutex<VecDeque<(Arc<str>, Instant)>>,
}

/// Most resumes waiting for the next node table to say their cause; beyond, a resume is
/// counted by the table at hand.
const MAX_UNSURE_RESUMES: usize = 65_536;

/// Removes its request from the waiting set when the wait ends (or its future is dropped).
struct Waiting<'a> {
    cluster: &'a Cluster,
    entry: (Instant, u64),
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.cluster
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.entry);
        self.cluster.metrics.waiting_requests.decrement(1.0);
    }
}

/// Datagrams for other nodes: (internal address, bytes).
pub type Sends = Vec<(SocketAddr, Vec<u8>)>;

impl Cluster {
    /// Builds the state; returns it with the receiving end of the presence channel (for the
    /// writer task).
    pub fn new(cfg: ClusterConfig, store: Arc<Store>, metrics: Metrics) -> (Arc<Self>, PresenceRx) {
        let (presence_tx, rx) = mpsc::channel(PRESENCE_QUEUE);
        let (generation, _) = watch::channel(0);
        metrics.set_cluster_keys(
            &crate::config::key_fingerprint(&cfg.cluster_key),
            cfg.cluster_next_key
                .as_deref()
                .map(crate::config::key_fingerprint)
                .as_deref(),
        );
        let started_ms = now_ms();
        let me = MemberId {
            id: cfg.node_id.clone(),
            internal: cfg.advertise,
            public: cfg.public_addr,
            started_ms,
            bump: 0,
        };
        let settings = membership::Settings::lan(cfg.probe_period, cfg.registry_period);
        let membership = Membership::new(me, settings, rand::random());
        let secret_key = derive_key(&cfg.cluster_key, b"sigrouter-v1-session-secret-key");
        let clock = Instant::now();
        let c = Arc::new(Self {
            id: cfg.node_id.as_str().into(),
            cfg,
            store,
            table: ArcSwap::from_pointee(NodeTable::default()),
            generation,
            nudge: Notify::new(),
            nudged: AtomicBool::new(false),
            published: Notify::new(),
            presence: PresenceCache::default(),
            presence_tx,
            republish: AtomicBool::new(false),
            // Random start: a restarted node must not reuse sequence numbers that the others
            // still remember from its previous life (they would answer from memory).
            seq: AtomicU64::new(rand::random::<u64>() >> 1),
            seen: DashMap::new(),
            seen_ages: AgeOut::new(REPLAY_MEMORY, clock),
            draining: AtomicBool::new(false),
            started_ms,
            metrics: metrics.clone(),
            membership: Mutex::new(membership),
            members_changed: Notify::new(),
            oneshot: DashMap::new(),
            oneshot_ages: AgeOut::new(REPLAY_MEMORY, clock),
            secret_key,
            presence_busy_since: AtomicU64::new(0),
            presence_backlog: AtomicU64::new(0),
            waiters: Mutex::default(),
            waiter_ids: AtomicU64::new(0),
            refreshed_ms: AtomicU64::new(0),
            clock,
            refused: AtomicU64::new(0),
            refused_logged_ms: AtomicU64::new(u64::MAX),
            unsure_resumes: Mutex::default(),
        });
        let weak = Arc::downgrade(&c);
        metrics.on_render(move || {
            if let Some(c) = weak.upgrade() {
                c.metrics.table_age_seconds.set(c.table_age().as_secs_f64());
                c.metrics
                    .oldest_waiting_seconds
                    .set(c.oldest_wait().as_secs_f64());
            }
        });
        (c, rx)
    }

    fn clock_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Time since the node table was last refreshed from Redis successfully (since the node
    /// started, before the first refresh).
    pub fn table_age(&self) -> Duration {
        Duration::from_millis(
            self.clock_ms()
                .saturating_sub(self.refreshed_ms.load(Ordering::Relaxed)),
        )
    }

    /// How long the oldest request waiting on cluster state has waited (zero when none).
    pub fn oldest_wait(&self) -> Duration {
        let oldest = self
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .first()
            .map(|(t, _)| *t);
        oldest.map_or(Duration::ZERO, |t| t.elapsed())
    }

    fn start_waiting(&self) -> Waiting<'_> {
        let entry = (
            Instant::now(),
            self.waiter_ids.fetch_add(1, Ordering::Relaxed),
        );
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(entry);
        self.metrics.waiting_requests.increment(1.0);
        Waiting {
            cluster: self,
            entry,
        }
    }

    /// The current snapshot (a cheap `Arc` clone; nothing is held).
    pub fn table(&self) -> Arc<NodeTable> {
        self.table.load_full()
    }

    /// A node from the current snapshot.
    pub fn node(&self, id: &str) -> Option<Arc<NodeInfo>> {
        // One load, one lookup, Guard dropped at the end of the statement.
        self.table.load().get(id)
    }

    /// Stores the registry's `nodes` merged with the membership view, and this node itself
    /// if neither lists it. Only the refresher task calls this. Unless `always`, an unchanged
    /// table is not stored again.
    /// (`fresh`: the registry was just read successfully; the table's age restarts.)
    pub(crate) fn store_merged(&self, registry: &[NodeInfo], always: bool, fresh: bool) {
        let view = self.membership_view();
        let unsettled = view
            .iter()
            .any(|m| m.active && m.meta.as_ref().is_some_and(|x| x.unpublished));
        let mut nodes = membership::merge(registry, &view);
        if !nodes.iter().any(|n| *n.id == *self.id) {
            nodes.push(self.own_info());
        }
        if !always {
            let current = self.table.load();
            let same = current.len() == nodes.len()
                && current.unsettled == unsettled
                && nodes
                    .iter()
                    .all(|n| current.get(&n.id).is_some_and(|c| *c == *n));
            if same {
                return;
            }
        }
        self.store_table_flagged(nodes, unsettled);
        if fresh {
            self.refreshed_ms.store(self.clock_ms(), Ordering::Relaxed);
        }
    }

    /// Whether Redis may lack presence records: it came back from a failure moments ago (and
    /// may have lost its data), or another node says its presence writes failed or are stuck.
    /// A "nowhere" from Redis is then checked with the other nodes.
    pub fn presence_unsettled(&self) -> bool {
        self.store.recovered_within(self.recovery_grace()) || self.table.load().unsettled
    }

    /// Whether this node's presence writes are behind: some failed and wait for a retry, a
    /// re-publication is due after a failure, or a write has been waiting on Redis for more
    /// than [`WRITE_STUCK_MS`].
    pub fn presence_behind(&self) -> bool {
        let busy = self.presence_busy_since.load(Ordering::Relaxed);
        self.presence_backlog.load(Ordering::Relaxed) > 0
            || self.republish.load(Ordering::Relaxed)
            || (busy != 0 && now_ms().saturating_sub(busy) > WRITE_STUCK_MS)
    }

    /// The presence writer reports its state (see [`Cluster::presence_behind`]).
    pub(crate) fn presence_progress(&self, busy_since_ms: u64, backlog: usize) {
        self.presence_busy_since
            .store(busy_since_ms, Ordering::Relaxed);
        self.presence_backlog
            .store(backlog as u64, Ordering::Relaxed);
    }

    /// This node's record as membership would describe it.
    fn own_info(&self) -> NodeInfo {
        NodeInfo {
            id: self.id.to_string(),
            public: self.cfg.public_addr,
            internal: self.cfg.advertise,
            state: if self.is_draining() {
                NodeState::Draining
            } else {
                NodeState::Active
            },
            version: env!("CARGO_PKG_VERSION").to_string(),
            sessions: self.lock_membership().sessions(),
            started_ms: self.started_ms,
            expires_ms: 0,
        }
    }

    /// Counts a resume, here, of a session node `old` held: `migrate` when `old` is draining
    /// (it told the client to move), `failover` otherwise. The table may not show yet a drain
    /// that began a moment ago (it is read every few seconds, and the first clients arrive
    /// within milliseconds): when it does not list `old` as draining, the resume is counted
    /// once a table read that started after it is stored (this nudges one). A draining node
    /// publishes its state before it sends its first `Migrate`, so that read shows it.
    pub fn count_resume(&self, old: &str) {
        let table = self.table.load_full();
        if table
            .get(old)
            .is_some_and(|n| n.state == NodeState::Draining)
        {
            self.metrics.resumed_migrate.increment(1);
            return;
        }
        {
            let mut q = self
                .unsure_resumes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if q.len() < MAX_UNSURE_RESUMES {
                q.push_back((old.into(), Instant::now()));
                drop(q);
                self.nudge();
                return;
            }
        }
        self.metrics.resumed_failover.increment(1);
    }

    /// Counts the resumes [`Cluster::count_resume`] left for a table read that started at
    /// `read_started` or later, by the table now stored. The refresher calls it after each
    /// stored read.
    pub fn count_unsure_resumes(&self, read_started: Instant) {
        let table = self.table.load_full();
        let mut q = self
            .unsure_resumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while q.front().is_some_and(|(_, at)| *at < read_started) {
            let Some((old, _)) = q.pop_front() else {
                break;
            };
            if table
                .get(&old)
                .is_some_and(|n| n.state == NodeState::Draining)
            {
                self.metrics.resumed_migrate.increment(1);
            } else {
                self.metrics.resumed_failover.increment(1);
            }
        }
    }

    /// Stores a new snapshot (the simulated-time tests write tables by hand).
    #[cfg(test)]
    pub(crate) fn store_table(&self, nodes: Vec<NodeInfo>) {
        self.store_table_flagged(nodes, false);
    }

    fn store_table_flagged(&self, nodes: Vec<NodeInfo>, unsettled: bool) {
        let generation = self.table.load().generation + 1;
        self.metrics.cluster_nodes.set(nodes.len() as f64);
        let mut t = NodeTable::new(generation, nodes);
        t.unsettled = unsettled;
        self.table.store(Arc::new(t));
        self.metrics.table_refreshes.increment(1);
        self.generation.send_replace(generation);
    }

    /// Asks the refresher for a new snapshot now. Nudges coalesce: all those that arrive
    /// before the refresher reads Redis are served by that one read.
    pub fn nudge(&self) {
        if !self.nudged.swap(true, Ordering::AcqRel) {
            self.nudge.notify_one();
        }
    }

    /// Waits for a nudge (refresher only).
    pub(crate) async fn nudged(&self) {
        self.nudge.notified().await;
    }

    /// Signals that this node's first registry publication was attempted.
    pub(crate) fn mark_first_published(&self) {
        self.published.notify_one();
    }

    /// Waits for [`Cluster::mark_first_published`].
    pub(crate) async fn first_published(&self) {
        self.published.notified().await;
    }

    /// Takes the pending nudge, if any (refresher only, just before it reads Redis).
    pub(crate) fn take_nudge(&self) -> bool {
        self.nudged.swap(false, Ordering::AcqRel)
    }

    /// Finds node `id`, waiting up to `deadline` for a newer snapshot if it is missing.
    /// Holds no lock or guard while it waits.
    pub async fn wait_for_node(&self, id: &str, deadline: Duration) -> Option<Arc<NodeInfo>> {
        if let Some(n) = self.node(id) {
            return Some(n);
        }
        let mut rx = self.generation.subscribe();
        let start_gen = *rx.borrow_and_update();
        self.nudge();
        let waiting = self.start_waiting();
        let started = Instant::now();
        let found = tokio::time::timeout(deadline, async {
            loop {
                if rx.changed().await.is_err() {
                    return None;
                }
                let g = *rx.borrow_and_update();
                if g > start_gen {
                    return self.node(id);
                }
            }
        })
        .await
        .ok()
        .flatten();
        drop(waiting);
        self.metrics
            .table_wait_seconds
            .record(started.elapsed().as_secs_f64());
        found
    }

    /// Asks the refresher for a new snapshot and waits (up to `deadline`, holding nothing) until
    /// one is stored. False if none came in time (Redis slow or away): the last one stays.
    pub async fn refresh_now(&self, deadline: Duration) -> bool {
        let mut rx = self.generation.subscribe();
        let start_gen = *rx.borrow_and_update();
        self.nudge();
        tokio::time::timeout(deadline, async {
            loop {
                if rx.changed().await.is_err() {
                    return false;
                }
                if *rx.borrow_and_update() > start_gen {
                    return true;
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// The cached location of a client: `Some(Some(node))`, `Some(None)` for "nowhere", or
    /// `None` when the cache has nothing fresh.
    pub fn cached_presence(&self, uuid: &Uuid, now: Instant) -> Option<Option<Arc<str>>> {
        self.presence.get(uuid, now)
    }

    /// Remembers a lookup.
    pub fn cache_presence(&self, uuid: Uuid, node: Option<Arc<str>>, now: Instant) {
        self.presence.insert(uuid, node, now);
    }

    /// Forgets a cached location (after a failed forward).
    pub fn invalidate(&self, uuid: &Uuid) {
        self.presence.remove(uuid);
    }

    /// Queues a presence write; never waits. A full queue marks a full re-publication.
    pub fn publish(&self, op: PresenceOp) {
        if self.presence_tx.try_send((op, now_ms())).is_err() {
            self.republish.store(true, Ordering::Relaxed);
        }
    }

    /// How long after a Redis recovery an absent presence record means "retry later" rather
    /// than "offline": long enough for every node to notice and re-publish.
    pub fn recovery_grace(&self) -> Duration {
        (self.cfg.registry_period * 3).max(Duration::from_secs(3))
    }

    /// Whether this node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks this node draining (the registry task publishes it; membership broadcasts it
    /// with its next datagrams, at the latest at the next tick).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.lock_membership()
            .set_state(Instant::now(), NodeState::Draining);
    }

    /// The secret of a session this cluster creates for client `uuid`: a MAC of the UUID under
    /// a key derived from the cluster key. Any node can then check a Resume when neither Redis
    /// nor the node that held the session can (a node killed during a Redis outage).
    pub fn session_secret(&self, uuid: &Uuid) -> [u8; 32] {
        derive_key(&self.secret_key, uuid.as_bytes())
    }

    fn lock_membership(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.membership.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets replies older than the freshness window (repeats older than that are refused
    /// by [`Cluster::open`] anyway).
    pub fn sweep(&self, now: Instant) {
        self.seen_ages.sweep(&self.seen, now, |(_, t)| *t);
        self.oneshot_ages.sweep(&self.oneshot, now, |t| *t);
        self.presence.sweep(now);
    }
}
