//! Presence: where each client is. Writes go through a channel ([`PresenceOp`]) to one
//! batching writer task; reads hit a short-lived local cache ([`PresenceCache`]) first, Redis
//! on a miss (only from deferred jobs, never from a socket loop).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::timer::Timers;

/// How long a cached presence answer is trusted (a failed forward invalidates it sooner).
const PRESENCE_CACHE_TTL: Duration = Duration::from_secs(30);
/// How long "not online anywhere" is cached.
const NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(1);
/// Most cache entries a sweep looks at (the rest wait for the next sweep), so that no sweep
/// holds the cache's shard locks for long however many entries fall due together.
const SWEEP_SLICE: usize = 16_384;

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
/// Each answer is scheduled to be forgotten once it is older than the longest time any is
/// trusted; a sweep looks only at what is due (at most [`SWEEP_SLICE`] entries), never at the
/// whole cache.
#[derive(Debug)]
pub(super) struct PresenceCache {
    entries: DashMap<Uuid, Cached>,
    /// When to look at an entry again (whole seconds since `epoch`).
    expiry: Timers<Uuid>,
    epoch: Instant,
}

impl Default for PresenceCache {
    fn default() -> Self {
        Self {
            entries: DashMap::new(),
            expiry: Timers::default(),
            epoch: Instant::now(),
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

    fn secs(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_secs()
    }

    /// Remembers a lookup.
    pub(super) fn insert(&self, uuid: Uuid, node: Option<Arc<str>>, now: Instant) {
        self.entries.insert(uuid, Cached { node, at: now });
        // The first whole second at which the entry is surely older than the TTL.
        let due = self.secs(now) + PRESENCE_CACHE_TTL.as_secs() + 1;
        self.expiry.schedule(due, uuid);
    }

    /// Forgets a cached location.
    pub(super) fn remove(&self, uuid: &Uuid) {
        self.entries.remove(uuid);
    }

    /// Forgets entries older than the longest time any is trusted, among those due (one
    /// slice per call). An entry refreshed since it was scheduled stays.
    pub(super) fn sweep(&self, now: Instant) {
        for (_, uuid) in self.expiry.take_due(self.secs(now), SWEEP_SLICE) {
            self.entries.remove_if(&uuid, |_, c| {
                now.saturating_duration_since(c.at) > PRESENCE_CACHE_TTL
            });
        }
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

    /// A sweep forgets only answers past the TTL, keeps one refreshed since, and looks at no
    /// more than one slice of due entries per call.
    #[test]
    fn sweeps_forget_what_is_due_in_slices() {
        let cache = PresenceCache::default();
        let t0 = cache.epoch;
        let node: Option<Arc<str>> = Some("n1".into());
        let n = SWEEP_SLICE + 100;
        for i in 0..n {
            cache.insert(Uuid::from_u128(i as u128), node.clone(), t0);
        }
        let refreshed = Uuid::from_u128(0);
        let later = Uuid::from_u128(u128::MAX);
        cache.insert(refreshed, node.clone(), t0 + Duration::from_secs(20));
        cache.insert(later, None, t0 + Duration::from_secs(20));

        cache.sweep(t0 + Duration::from_secs(30));
        assert_eq!(cache.len(), n + 1, "nothing is past the TTL yet");

        let t = t0 + Duration::from_secs(32);
        cache.sweep(t);
        // One slice of the due entries looked at (the refreshed one may be among them).
        let left = cache.len();
        assert!(
            (n + 1 - SWEEP_SLICE..=n + 2 - SWEEP_SLICE).contains(&left),
            "{left} left"
        );
        cache.sweep(t);
        assert_eq!(cache.len(), 2, "the rest at the next sweep");
        assert_eq!(cache.get(&refreshed, t), Some(node.clone()));
        assert!(cache.entries.contains_key(&later));

        cache.sweep(t0 + Duration::from_secs(52));
        assert_eq!(cache.len(), 0);
    }
}
