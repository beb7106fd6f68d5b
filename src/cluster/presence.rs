//! Presence: where each client is. Writes go through a channel ([`PresenceOp`]) to one
//! batching writer task; reads hit a short-lived local cache ([`PresenceCache`]) first, Redis
//! on a miss (only from deferred jobs, never from a socket loop).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::mpsc;
use uuid::Uuid;

/// How long a cached presence answer is trusted (a failed forward invalidates it sooner).
const PRESENCE_CACHE_TTL: Duration = Duration::from_secs(30);
/// How long "not online anywhere" is cached.
const NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(1);

/// What the cluster's background tasks need to know of the sessions this node holds. The
/// router implements it, so cluster code never depends on the router.
pub trait LocalSessions: Send + Sync {
    /// Number of sessions held.
    fn session_count(&self) -> usize;
    /// Every session held, with its Resume verifier (for presence re-publication).
    fn presence_snapshot(&self) -> Vec<(Uuid, [u8; 32])>;
    /// Whether client `uuid` is held here now.
    fn holds(&self, uuid: &Uuid) -> bool;
}

/// The receiving end of the presence channel: each write with the wall-clock time (ms) it was
/// decided at, so a claim retried after a Redis outage cannot overwrite a later one.
pub type PresenceRx = mpsc::Receiver<(PresenceOp, u64)>;

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

/// Recent presence answers: a node, or "nowhere" (kept for a shorter time).
#[derive(Debug, Default)]
pub(super) struct PresenceCache {
    entries: DashMap<Uuid, Cached>,
}

impl PresenceCache {
    /// The cached location of a client: `Some(Some(node))`, `Some(None)` for "nowhere", or
    /// `None` when the cache has nothing fresh.
    pub(super) fn get(&self, uuid: &Uuid, now: Instant) -> Option<Option<Arc<str>>> {
        let c = self.entries.get(uuid).map(|c| c.clone())?;
        let ttl = if c.node.is_some() {
            PRESENCE_CACHE_TTL
        } else {
            NEGATIVE_CACHE_TTL
        };
        (now.saturating_duration_since(c.at) <= ttl).then_some(c.node)
    }

    /// Remembers a lookup.
    pub(super) fn insert(&self, uuid: Uuid, node: Option<Arc<str>>, now: Instant) {
        self.entries.insert(uuid, Cached { node, at: now });
    }

    /// Forgets a cached location.
    pub(super) fn remove(&self, uuid: &Uuid) {
        self.entries.remove(uuid);
    }

    /// Forgets entries older than the longest time any is trusted.
    pub(super) fn sweep(&self, now: Instant) {
        self.entries
            .retain(|_, c| now.saturating_duration_since(c.at) <= PRESENCE_CACHE_TTL);
    }
}
