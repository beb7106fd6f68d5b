//! Cluster state behind clear seams.
//!
//! - [`NodeTable`]: an immutable snapshot of the registry behind [`ArcSwap`]. Exactly one task,
//!   the refresher in [`tasks`], builds and stores new snapshots; everything else only loads.
//!   A request that misses a node calls [`Cluster::wait_for_node`]: it nudges the refresher
//!   (nudges coalesce into one Redis read) and waits for a newer generation with a deadline,
//!   holding nothing, then gives up with retry-later. The post-mortem's deadlock (a read guard
//!   held while asking for the write guard) has no place to happen: there is no guard to hold.
//!   `/metrics` shows the table's age and the age of the oldest waiting request, computed at
//!   scrape time, so a stuck refresher or a wait without an end shows even if every task hangs.
//! - Presence: where each client is. Writes go through a channel to one batching writer task;
//!   reads hit a short-lived local cache first, Redis on a miss (only from deferred jobs, never
//!   from a socket loop).
//! - [`wire`]: the authenticated node-to-node datagram format.

pub mod lookup;
pub mod tasks;
pub mod wire;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};
use uuid::Uuid;

use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::store::Store;

/// How long a cached presence answer is trusted (a failed forward invalidates it sooner).
const PRESENCE_CACHE_TTL: Duration = Duration::from_secs(30);
/// How long "not online anywhere" is cached.
const NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(1);
/// Node-to-node datagrams older or newer than this are refused as replays.
const FRESHNESS_MS: u64 = 30_000;
/// At most one log line per this many milliseconds about refused node-to-node datagrams.
const REFUSED_LOG_EVERY_MS: u64 = 10_000;

/// A node's lifecycle state in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes new sessions.
    Active,
    /// Moving its clients away; never chosen for new sessions.
    Draining,
}

/// One node's registry record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// Client-facing address.
    pub public: SocketAddr,
    /// Internal (node-to-node) address.
    pub internal: SocketAddr,
    /// Lifecycle state.
    pub state: NodeState,
    /// Software version.
    pub version: String,
    /// Sessions held at the last renewal.
    pub sessions: u64,
    /// Start time, ms since the Unix epoch.
    pub started_ms: u64,
    /// The record is void after this time, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// An immutable snapshot of the live nodes.
#[derive(Debug, Default)]
pub struct NodeTable {
    /// Increases with every snapshot the refresher stores.
    pub generation: u64,
    nodes: HashMap<String, Arc<NodeInfo>>,
}

impl NodeTable {
    /// Builds a snapshot.
    pub fn new(generation: u64, nodes: impl IntoIterator<Item = NodeInfo>) -> Self {
        Self {
            generation,
            nodes: nodes
                .into_iter()
                .map(|n| (n.id.clone(), Arc::new(n)))
                .collect(),
        }
    }

    /// A node by id.
    pub fn get(&self, id: &str) -> Option<Arc<NodeInfo>> {
        self.nodes.get(id).cloned()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every active node other than `except`.
    pub fn active_except(&self, except: &str) -> Vec<Arc<NodeInfo>> {
        self.nodes
            .values()
            .filter(|n| n.state == NodeState::Active && n.id != except)
            .cloned()
            .collect()
    }

    /// Best of two random active nodes other than `except` (fewer sessions wins): spreads
    /// clients without herding them all onto the newest, emptiest node.
    pub fn pick_active(&self, except: &str) -> Option<Arc<NodeInfo>> {
        let active: Vec<&Arc<NodeInfo>> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Active && n.id != except)
            .collect();
        let mut rng = rand::thread_rng();
        let two: Vec<&&Arc<NodeInfo>> = active.choose_multiple(&mut rng, 2).collect();
        two.into_iter()
            .min_by_key(|n| n.sessions)
            .map(|n| Arc::clone(n))
    }
}

/// What the cluster's background tasks need to know of the sessions this node holds. The
/// router implements it, so cluster code never depends on the router.
pub trait LocalSessions: Send + Sync {
    /// Number of sessions held.
    fn session_count(&self) -> usize;
    /// Every session held, with its Resume verifier (for presence re-publication).
    fn presence_snapshot(&self) -> Vec<(Uuid, [u8; 32])>;
}

/// A presence write for the batching writer.
#[derive(Clone, Debug)]
pub enum PresenceOp {
    /// The client is held here; `verifier` validates its Resume elsewhere.
    Put(Uuid, [u8; 32]),
    /// The client left this node.
    Del(Uuid),
}

#[derive(Clone, Debug)]
struct Cached {
    node: Option<Arc<str>>,
    at: Instant,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
    presence: DashMap<Uuid, Cached>,
    presence_tx: mpsc::Sender<PresenceOp>,
    /// Set when Redis may have lost our writes: the writer re-publishes every session.
    pub republish: AtomicBool,
    seq: AtomicU64,
    seen: DashMap<(Arc<str>, u64), (wire::Status, Instant)>,
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

impl Cluster {
    /// Builds the state; returns it with the receiving end of the presence channel (for the
    /// writer task).
    pub fn new(
        cfg: ClusterConfig,
        store: Arc<Store>,
        metrics: Metrics,
    ) -> (Arc<Self>, mpsc::Receiver<PresenceOp>) {
        let (presence_tx, rx) = mpsc::channel(65_536);
        let (generation, _) = watch::channel(0);
        metrics.set_cluster_keys(
            &crate::config::key_fingerprint(&cfg.cluster_key),
            cfg.cluster_next_key
                .as_deref()
                .map(crate::config::key_fingerprint)
                .as_deref(),
        );
        let c = Arc::new(Self {
            id: cfg.node_id.as_str().into(),
            cfg,
            store,
            table: ArcSwap::from_pointee(NodeTable::default()),
            generation,
            nudge: Notify::new(),
            nudged: AtomicBool::new(false),
            published: Notify::new(),
            presence: DashMap::new(),
            presence_tx,
            republish: AtomicBool::new(false),
            // Random start: a restarted node must not reuse sequence numbers that the others
            // still remember from its previous life (they would answer from memory).
            seq: AtomicU64::new(rand::random::<u64>() >> 1),
            seen: DashMap::new(),
            draining: AtomicBool::new(false),
            started_ms: now_ms(),
            metrics: metrics.clone(),
            waiters: Mutex::default(),
            waiter_ids: AtomicU64::new(0),
            refreshed_ms: AtomicU64::new(0),
            clock: Instant::now(),
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

    /// Stores a new snapshot. Only the refresher task calls this.
    pub(crate) fn store_table(&self, nodes: Vec<NodeInfo>) {
        let generation = self.table.load().generation + 1;
        self.metrics.cluster_nodes.set(nodes.len() as f64);
        self.table
            .store(Arc::new(NodeTable::new(generation, nodes)));
        self.metrics.table_refreshes.increment(1);
        self.refreshed_ms.store(self.clock_ms(), Ordering::Relaxed);
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
        let c = self.presence.get(uuid).map(|c| c.clone())?;
        let ttl = if c.node.is_some() {
            PRESENCE_CACHE_TTL
        } else {
            NEGATIVE_CACHE_TTL
        };
        (now.saturating_duration_since(c.at) <= ttl).then_some(c.node)
    }

    /// Remembers a lookup.
    pub fn cache_presence(&self, uuid: Uuid, node: Option<Arc<str>>, now: Instant) {
        self.presence.insert(uuid, Cached { node, at: now });
    }

    /// Forgets a cached location (after a failed forward).
    pub fn invalidate(&self, uuid: &Uuid) {
        self.presence.remove(uuid);
    }

    /// Queues a presence write; never waits. A full queue marks a full re-publication.
    pub fn publish(&self, op: PresenceOp) {
        if self.presence_tx.try_send(op).is_err() {
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

    /// Marks this node draining (the registry task publishes it).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Builds an authenticated datagram for node `to`; returns its sequence number too.
    pub fn envelope(&self, to: &str, seq: Option<u64>, body: wire::Body) -> Option<(u64, Vec<u8>)> {
        let seq = seq.unwrap_or_else(|| self.seq.fetch_add(1, Ordering::Relaxed));
        let env = wire::Envelope {
            from: self.id.to_string(),
            to: to.to_string(),
            ts: now_ms(),
            seq,
            body,
        };
        // Always the first key: the second one is only ever accepted (key rotation).
        wire::encode(&env, &self.cfg.cluster_key).map(|b| (seq, b))
    }

    /// Authenticates an internal datagram: MAC (by this node's key, or its second, accepted
    /// key), addressed to us, fresh. `Err` is a counted drop, and logged at most once per
    /// 10 s with the number refused since the last line.
    pub fn open(&self, buf: &[u8]) -> Result<wire::Envelope, wire::WireError> {
        let r = self.authenticate(buf);
        if let Err(e) = r {
            self.refused(e, buf);
        }
        r
    }

    fn authenticate(&self, buf: &[u8]) -> Result<wire::Envelope, wire::WireError> {
        let mut keys: Vec<&[u8]> = vec![&self.cfg.cluster_key];
        keys.extend(self.cfg.cluster_next_key.as_deref());
        let (env, _) = wire::decode_any(buf, &keys)?;
        if env.to != *self.id || env.from == *self.id {
            return Err(wire::WireError::Misaddressed);
        }
        if now_ms().abs_diff(env.ts) > FRESHNESS_MS {
            return Err(wire::WireError::Stale);
        }
        Ok(env)
    }

    /// Counts a refused datagram; writes the rate-limited log line.
    fn refused(&self, e: wire::WireError, buf: &[u8]) {
        self.metrics.cluster_refused(e.into());
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = self.clock_ms();
        let last = self.refused_logged_ms.load(Ordering::Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= REFUSED_LOG_EVERY_MS;
        if !due
            || self
                .refused_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let refused = self.refused.swap(0, Ordering::Relaxed);
        // Unauthenticated text: bounded, and logged escaped (Debug) so it cannot forge lines.
        let claimed_from: String = wire::claimed_sender(buf)
            .unwrap_or_default()
            .chars()
            .take(64)
            .collect();
        let hint = match e {
            wire::WireError::BadMac => {
                "the sender uses another cluster key: check SIGROUTER_CLUSTER_KEY_FILE (and SIGROUTER_CLUSTER_NEXT_KEY_FILE during a rotation) on every node"
            }
            wire::WireError::Stale => "clocks apart by more than 30 s, or a replay",
            wire::WireError::Misaddressed => {
                "meant for another node id: briefly after a restart at a reused address, or two nodes share a node id"
            }
            wire::WireError::Malformed => "not sigrouter node traffic",
        };
        tracing::warn!(
            reason = e.name(),
            claimed_from = ?claimed_from,
            refused_since_last_line = refused,
            hint,
            "refused node-to-node datagrams (counted in sigrouter_cluster_refused_total by reason; at most one line per 10 s)"
        );
    }

    /// The reply already given to request (`from`, `seq`), if it is a repeat.
    pub fn seen(&self, from: &str, seq: u64) -> Option<wire::Status> {
        self.seen.get(&(Arc::from(from), seq)).map(|e| e.0)
    }

    /// Remembers the reply to request (`from`, `seq`).
    pub fn remember(&self, from: &str, seq: u64, status: wire::Status, now: Instant) {
        self.seen.insert((Arc::from(from), seq), (status, now));
    }

    /// Forgets replies older than the freshness window (repeats older than that are refused
    /// by [`Cluster::open`] anyway).
    pub fn sweep(&self, now: Instant) {
        let keep = Duration::from_millis(FRESHNESS_MS * 2);
        self.seen
            .retain(|_, (_, t)| now.saturating_duration_since(*t) <= keep);
        self.presence
            .retain(|_, c| now.saturating_duration_since(c.at) <= PRESENCE_CACHE_TTL);
    }
}
