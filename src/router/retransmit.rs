//! One retransmission queue for everything the router sends until it is answered: server
//! pushes (until the client's `PushAck`) and node-to-node requests (until the other node's
//! reply). Each entry keeps its encoded datagram, retransmits it with a doubling timeout and
//! gives up at its deadline, handing its metadata back so the caller can act on the give-up.
//! Due entries come from a timer queue, so a tick costs what is due, not what is waiting.

use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::timer::Timers;

/// Most entries handled per tick (the rest are handled at the next tick).
const TICK_SLICE: usize = 65_536;

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
    /// When it is due again, ms of the queue's clock (also its key in the timer queue).
    next_ms: u64,
    rto_ms: u64,
    deadline_ms: u64,
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
    initial_rto_ms: u64,
    deadline_ms: u64,
    entries: DashMap<K, Entry<M>>,
    timers: Timers<K>,
    epoch: Instant,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<K: Eq + Hash + Copy, M> Retransmit<K, M> {
    /// An empty queue; times are counted from `epoch`.
    pub(crate) fn new(schedule: Schedule, epoch: Instant) -> Self {
        Self {
            initial_rto_ms: ms(schedule.initial_rto).max(1),
            deadline_ms: ms(schedule.deadline),
            entries: DashMap::new(),
            timers: Timers::default(),
            epoch,
        }
    }

    fn now_ms(&self, now: Instant) -> u64 {
        ms(now.saturating_duration_since(self.epoch))
    }

    /// Keeps `bytes` (just sent to `to` at `now`) for retransmission under `key`.
    pub(crate) fn insert(&self, key: K, to: SocketAddr, bytes: &[u8], now: Instant, meta: M) {
        let now_ms = self.now_ms(now);
        let deadline_ms = now_ms.saturating_add(self.deadline_ms);
        let next_ms = now_ms.saturating_add(self.initial_rto_ms).min(deadline_ms);
        self.entries.insert(
            key,
            Entry {
                bytes: bytes.into(),
                to,
                next_ms,
                rto_ms: self.initial_rto_ms,
                deadline_ms,
                meta,
            },
        );
        self.timers.schedule(next_ms, key);
    }

    /// The answer came: stop retransmitting. Returns what the entry was for.
    pub(crate) fn remove(&self, key: &K) -> Option<M> {
        self.entries.remove(key).map(|(_, e)| e.meta)
    }

    /// Whether `key` is still waiting for its answer.
    pub(crate) fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Number of entries waiting.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Everything due at `now`: entries past their deadline are removed and returned as
    /// [`Due::Expired`]; the others are rescheduled (timeout doubled, the last wait ending at
    /// the deadline) and returned as [`Due::Resend`].
    pub(crate) fn due(&self, now: Instant) -> Vec<(K, Due<M>)> {
        let now_ms = self.now_ms(now);
        let mut due = Vec::new();
        for (at, key) in self.timers.take_due(now_ms, TICK_SLICE) {
            // One statement with the entry's guard; the guard is gone before anything else.
            let action = match self.entries.get_mut(&key) {
                // Answered (removed) or replaced since: a stale timer.
                Some(e) if e.next_ms != at => None,
                None => None,
                Some(e) if now_ms >= e.deadline_ms => Some(None),
                Some(mut e) => {
                    e.rto_ms = e.rto_ms.saturating_mul(2);
                    e.next_ms = now_ms.saturating_add(e.rto_ms).min(e.deadline_ms);
                    Some(Some((e.next_ms, e.to, e.bytes.clone())))
                }
            };
            match action {
                None => {}
                Some(None) => {
                    if let Some(meta) = self.remove(&key) {
                        due.push((key, Due::Expired(meta)));
                    }
                }
                Some(Some((next, to, bytes))) => {
                    self.timers.schedule(next, key);
                    due.push((key, Due::Resend { to, bytes }));
                }
            }
        }
        due
    }
}
