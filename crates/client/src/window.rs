//! Duplicate suppression for server pushes, over a bounded window.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

/// Identity of one push: its id plus a hash of its body. A retransmission repeats both. The
/// body hash keeps a push from a *different* node that happens to reuse an id (after a
/// migration or re-home) from being mistaken for a duplicate and lost: surfacing a push twice
/// is harmless to the application, dropping one is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PushKey {
    id: u64,
    body: u64,
}

impl PushKey {
    /// The key of push `id` whose datagram body (without the MAC) is `body`.
    pub(crate) fn new(id: u64, body: &[u8]) -> Self {
        let mut h = DefaultHasher::new();
        body.hash(&mut h);
        Self {
            id,
            body: h.finish(),
        }
    }
}

/// The push keys seen in the last `keep` (at most `cap` of them), oldest evicted first.
#[derive(Debug)]
pub(crate) struct PushWindow {
    seen: HashSet<PushKey>,
    order: VecDeque<(PushKey, Instant)>,
    keep: Duration,
    cap: usize,
}

impl PushWindow {
    /// A window remembering each push for `keep`, and never more than `cap` pushes.
    pub(crate) fn new(keep: Duration, cap: usize) -> Self {
        Self {
            seen: HashSet::new(),
            order: VecDeque::new(),
            keep,
            cap: cap.max(1),
        }
    }

    /// Whether this push was already surfaced.
    pub(crate) fn contains(&self, k: &PushKey) -> bool {
        self.seen.contains(k)
    }

    /// Records a push surfaced at `now`. Returns false if it was already there.
    pub(crate) fn insert(&mut self, k: PushKey, now: Instant) -> bool {
        if !self.seen.insert(k) {
            return false;
        }
        self.order.push_back((k, now));
        while let Some(&(old, t)) = self.order.front() {
            if self.order.len() <= self.cap && now.saturating_duration_since(t) <= self.keep {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        true
    }

    /// How many pushes are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: Duration = Duration::from_secs(30);

    #[test]
    fn duplicates_are_recognised_and_distinct_bodies_are_not() {
        let now = Instant::now();
        let mut w = PushWindow::new(KEEP, 8);
        let a = PushKey::new(1, b"hello");
        assert!(!w.contains(&a));
        assert!(w.insert(a, now));
        assert!(w.contains(&PushKey::new(1, b"hello")));
        assert!(!w.insert(PushKey::new(1, b"hello"), now));
        // Same id, different body: another node's push, not a duplicate.
        assert!(!w.contains(&PushKey::new(1, b"other")));
        assert!(!w.contains(&PushKey::new(2, b"hello")));
    }

    #[test]
    fn window_is_bounded_and_evicts_oldest() {
        let now = Instant::now();
        let mut w = PushWindow::new(KEEP, 3);
        for id in 0..10u64 {
            assert!(w.insert(PushKey::new(id, b"x"), now));
            assert!(w.len() <= 3);
        }
        assert!(!w.contains(&PushKey::new(6, b"x")));
        for id in 7..10u64 {
            assert!(w.contains(&PushKey::new(id, b"x")));
        }
    }

    #[test]
    fn entries_are_kept_for_the_whole_period_then_forgotten() {
        let t0 = Instant::now();
        let mut w = PushWindow::new(Duration::from_secs(10), 1000);
        w.insert(PushKey::new(1, b"a"), t0);
        w.insert(PushKey::new(2, b"b"), t0 + Duration::from_secs(6));
        // Both still remembered at 10 s after the first.
        w.insert(PushKey::new(3, b"c"), t0 + Duration::from_secs(10));
        assert!(w.contains(&PushKey::new(1, b"a")));
        // Past the period: the first is forgotten when the next push comes.
        w.insert(PushKey::new(4, b"d"), t0 + Duration::from_secs(11));
        assert!(!w.contains(&PushKey::new(1, b"a")));
        assert!(w.contains(&PushKey::new(2, b"b")));
        assert_eq!(w.len(), 3);
    }
}
