//! Presence: where each client is. Writes go through a channel ([`PresenceOp`]) to one
//! batching writer task; reads hit a short-lived local cache ([`PresenceCache`]) first, Redis
//! on a miss (only from deferred jobs, never from a socket loop).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::timer::AgeOut;

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
///
/// Each answer is looked at again once it is older than the longest time any is trusted; a
/// sweep looks only at what is due, never at the whole cache.
#[derive(Debug)]
pub(super) struct PresenceCache {
    entries: DashMap<Uuid, Cached>,
    ages: AgeOut<Uuid>,
}

impl Default for PresenceCache {
    fn default() -> Self {
        Self {
            entries: DashMap::new(),
            ages: AgeOut::new(PRESENCE_CACHE_TTL, Instant::now()),
        }
    }
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
        self.ages.written(uuid, now);
    }

    /// Forgets a cached location.
    pub(super) fn remove(&self, uuid: &Uuid) {
        self.entries.remove(uuid);
    }

    /// Forgets the entries due for a look that are older than the longest time any is trusted.
    /// An entry refreshed since stays.
    pub(super) fn sweep(&self, now: Instant) {
        self.ages.sweep(&self.entries, now, |c| c.at);
    }

    /// Entries held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep forgets only answers past the TTL and keeps one refreshed since.
    #[test]
    fn sweeps_forget_only_old_answers() {
        let cache = PresenceCache::default();
        let t0 = Instant::now();
        let node: Option<Arc<str>> = Some("n1".into());
        for i in 0..100 {
            cache.insert(Uuid::from_u128(i), node.clone(), t0);
        }
        let refreshed = Uuid::from_u128(0);
        let later = Uuid::from_u128(u128::MAX);
        cache.insert(refreshed, node.clone(), t0 + Duration::from_secs(20));
        cache.insert(later, None, t0 + Duration::from_secs(20));

        cache.sweep(t0 + Duration::from_secs(30));
        assert_eq!(cache.len(), 101, "nothing is past the TTL yet");
        let t = t0 + Duration::from_secs(32);
        cache.sweep(t);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&refreshed, t), Some(node.clone()));
        assert!(cache.entries.contains_key(&later));
        cache.sweep(t0 + Duration::from_secs(52));
        assert_eq!(cache.len(), 0);
    }
}
