//! Duplicate suppression for server pushes, over a bounded window.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};

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

/// The last `cap` push keys seen, oldest evicted first.
#[derive(Debug)]
pub(crate) struct PushWindow {
    seen: HashSet<PushKey>,
    order: VecDeque<PushKey>,
    cap: usize,
}

impl PushWindow {
    /// A window remembering at most `cap` pushes (at least one).
    pub(crate) fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self {
            seen: HashSet::with_capacity(cap),
            order: VecDeque::with_capacity(cap),
            cap,
        }
    }

    /// Whether this push was already surfaced.
    pub(crate) fn contains(&self, k: &PushKey) -> bool {
        self.seen.contains(k)
    }

    /// Records a surfaced push. Returns false if it was already there.
    pub(crate) fn insert(&mut self, k: PushKey) -> bool {
        if !self.seen.insert(k) {
            return false;
        }
        self.order.push_back(k);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
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

    #[test]
    fn duplicates_are_recognised_and_distinct_bodies_are_not() {
        let mut w = PushWindow::new(8);
        let a = PushKey::new(1, b"hello");
        assert!(!w.contains(&a));
        assert!(w.insert(a));
        assert!(w.contains(&PushKey::new(1, b"hello")));
        assert!(!w.insert(PushKey::new(1, b"hello")));
        // Same id, different body: another node's push, not a duplicate.
        assert!(!w.contains(&PushKey::new(1, b"other")));
        assert!(!w.contains(&PushKey::new(2, b"hello")));
    }

    #[test]
    fn window_is_bounded_and_evicts_oldest() {
        let mut w = PushWindow::new(3);
        for id in 0..10u64 {
            assert!(w.insert(PushKey::new(id, b"x")));
            assert!(w.len() <= 3);
        }
        assert!(!w.contains(&PushKey::new(6, b"x")));
        for id in 7..10u64 {
            assert!(w.contains(&PushKey::new(id, b"x")));
        }
    }
}
