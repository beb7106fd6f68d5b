//! One retransmission queue for everything the router sends until it is answered: server
//! pushes (until the client's `PushAck`) and node-to-node requests (until the other node's
//! reply). Each entry keeps its encoded datagram, retransmits it with a doubling timeout and
//! gives up at a deadline, handing its metadata back so the caller can act on the give-up.

use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// The timing of a retransmission queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Schedule {
    /// First retransmission after this long; doubles each time.
    pub(crate) initial_rto: Duration,
    /// Give up this long after the first send.
    pub(crate) deadline: Duration,
}

#[derive(Debug)]
struct Entry<M> {
    bytes: Arc<[u8]>,
    to: SocketAddr,
    next_at: Instant,
    rto: Duration,
    deadline: Instant,
    meta: M,
}

/// What is due at a tick.
#[derive(Debug)]
pub(crate) enum Due<M> {
    /// Send `bytes` again (to `to`, or wherever the destination is now).
    Resend {
        /// Where it was last sent.
        to: SocketAddr,
        /// The datagram.
        bytes: Arc<[u8]>,
    },
    /// Its deadline passed unanswered: removed; here is what it was for.
    Expired(M),
}

/// Datagrams waiting for an answer, by key.
#[derive(Debug)]
pub(crate) struct Retransmit<K: Eq + Hash, M> {
    schedule: Schedule,
    entries: DashMap<K, Entry<M>>,
}

impl<K: Eq + Hash + Copy, M> Retransmit<K, M> {
    /// An empty queue.
    pub(crate) fn new(schedule: Schedule) -> Self {
        Self {
            schedule,
            entries: DashMap::new(),
        }
    }

    /// Keeps `bytes` (just sent to `to` at `now`) for retransmission under `key`.
    pub(crate) fn insert(&self, key: K, to: SocketAddr, bytes: &[u8], now: Instant, meta: M) {
        let s = self.schedule;
        self.entries.insert(
            key,
            Entry {
                bytes: bytes.into(),
                to,
                next_at: now + s.initial_rto,
                rto: s.initial_rto,
                deadline: now + s.deadline,
                meta,
            },
        );
    }

    /// The answer came: stop retransmitting. Returns what the entry was for.
    pub(crate) fn remove(&self, key: &K) -> Option<M> {
        self.entries.remove(key).map(|(_, e)| e.meta)
    }

    /// Number of entries waiting.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Everything due at `now`: entries past their deadline are removed and returned as
    /// [`Due::Expired`]; the others are rescheduled (timeout doubled) and returned as
    /// [`Due::Resend`].
    pub(crate) fn due(&self, now: Instant) -> Vec<(K, Due<M>)> {
        // Collect first, act after: no shard guard is held while another is taken.
        let keys: Vec<(K, bool)> = self
            .entries
            .iter()
            .filter(|e| e.next_at <= now)
            .map(|e| (*e.key(), e.deadline <= now))
            .collect();
        let mut due = Vec::with_capacity(keys.len());
        for (key, expired) in keys {
            if expired {
                if let Some(meta) = self.remove(&key) {
                    due.push((key, Due::Expired(meta)));
                }
                continue;
            }
            let again = self.entries.get_mut(&key).map(|mut e| {
                e.rto = e.rto.saturating_mul(2);
                // The last wait ends at the deadline: give up on time, not a doubled
                // timeout later.
                e.next_at = (now + e.rto).min(e.deadline);
                Due::Resend {
                    to: e.to,
                    bytes: e.bytes.clone(),
                }
            });
            if let Some(d) = again {
                due.push((key, d));
            }
        }
        due
    }
}
