//! What a session remembers about its recent requests, so a retransmission gets the answer
//! already given and does nothing twice. Allocated only when a request with an effect arrives
//! (heartbeats never pay for it), bounded by the replay window: an entry lives while its id is
//! inside the window and, once answered, for the dedup time. A pending entry (the answer is not
//! known yet) is never evicted while a retransmission of it can still arrive.

use std::collections::VecDeque;
use std::sync::Arc;

use super::window::ReplayWindow;

/// What a session remembers about one request id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Remembered {
    /// The answer that was sent (already encoded and MAC'd).
    Answer(Arc<[u8]>),
    /// A request whose answer is not known yet (a Connect waiting for the target, a request
    /// forwarded to another node): retransmissions wait for it.
    Pending,
}

#[derive(Clone, Debug)]
struct Entry {
    rid: u64,
    /// When it was recorded, ms of the router's clock.
    at_ms: u64,
    what: Remembered,
}

/// The remembered requests of one session, in request-id order. Ids mostly arrive in order,
/// so a new entry is nearly always appended; lookups are binary searches, and forgetting
/// looks only at the oldest entries (what the window left behind and answers past their
/// time, up to the first entry that must stay). An expired answer behind a pending request
/// stays until that one goes, but `get` no longer returns it, and the window bounds them all.
#[derive(Clone, Debug, Default)]
pub(crate) struct Replies {
    entries: VecDeque<Entry>,
}

impl Replies {
    /// What is remembered for `rid` at `now_ms` (an answer older than `keep_ms` is not).
    pub(crate) fn get(&self, rid: u64, now_ms: u64, keep_ms: u64) -> Option<Remembered> {
        self.find(rid)
            .ok()
            .map(|i| &self.entries[i])
            .filter(|e| e.live(now_ms, keep_ms))
            .map(|e| e.what.clone())
    }

    /// Remembers `what` for `rid` (replacing what was there) and forgets what can no longer be
    /// asked for.
    pub(crate) fn put(
        &mut self,
        rid: u64,
        what: Remembered,
        now_ms: u64,
        window: &ReplayWindow,
        keep_ms: u64,
    ) {
        self.prune(now_ms, window, keep_ms);
        if !window.covers(rid) {
            return; // a retransmission of it would be refused as stale anyway
        }
        let entry = Entry {
            rid,
            at_ms: now_ms,
            what,
        };
        match self.find(rid) {
            Ok(i) => self.entries[i] = entry,
            Err(i) if i == self.entries.len() => self.entries.push_back(entry),
            Err(i) => self.entries.insert(i, entry),
        }
    }

    /// Forgets the oldest entries while they are outside the window or answers older than
    /// `keep_ms`.
    pub(crate) fn prune(&mut self, now_ms: u64, window: &ReplayWindow, keep_ms: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| !window.covers(e.rid) || !e.live(now_ms, keep_ms))
        {
            self.entries.pop_front();
        }
    }

    /// Whether nothing is remembered.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where `rid` is (`Err`: where it would go).
    fn find(&self, rid: u64) -> Result<usize, usize> {
        // Most lookups are for the newest request.
        match self.entries.back() {
            Some(e) if e.rid == rid => Ok(self.entries.len() - 1),
            Some(e) if e.rid < rid => Err(self.entries.len()),
            _ => self.entries.binary_search_by_key(&rid, |e| e.rid),
        }
    }
}

impl Entry {
    /// Whether it may still be returned: pending, or answered within `keep_ms`.
    fn live(&self, now_ms: u64, keep_ms: u64) -> bool {
        self.what == Remembered::Pending || now_ms.saturating_sub(self.at_ms) <= keep_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(b: u8) -> Remembered {
        Remembered::Answer(Arc::from(vec![b]))
    }

    #[test]
    fn pending_outlives_answers_and_nothing_outlives_the_window() {
        let mut w = ReplayWindow::starting_at(1);
        let mut r = Replies::default();
        w.check(2);
        r.put(2, Remembered::Pending, 0, &w, 30_000);
        // Far more requests than any fixed-size cache would hold: the pending one stays.
        for rid in 3..100 {
            w.check(rid);
            r.put(rid, answer(rid as u8), 1, &w, 30_000);
        }
        assert_eq!(r.get(2, 1, 30_000), Some(Remembered::Pending));
        assert_eq!(r.get(50, 1, 30_000), Some(answer(50)));
        // Answers are forgotten after the dedup time; the pending entry is not.
        assert_eq!(r.get(50, 40_000, 30_000), None);
        r.prune(40_000, &w, 30_000);
        assert_eq!(r.get(2, 40_000, 30_000), Some(Remembered::Pending));
        // Once the window has moved past it, nothing can ask for it: forgotten.
        w.check(2 + super::super::window::WINDOW);
        r.prune(40_000, &w, 30_000);
        assert!(r.is_empty());
    }

    #[test]
    fn requests_out_of_order_are_found_and_replaced() {
        let mut w = ReplayWindow::starting_at(1);
        let mut r = Replies::default();
        for rid in [5, 3, 9, 4] {
            w.check(rid);
            r.put(rid, Remembered::Pending, 0, &w, 30_000);
        }
        for rid in [3, 4, 5, 9] {
            assert_eq!(r.get(rid, 0, 30_000), Some(Remembered::Pending), "{rid}");
        }
        assert_eq!(r.get(6, 0, 30_000), None);
        r.put(4, answer(4), 10, &w, 30_000);
        assert_eq!(r.get(4, 10, 30_000), Some(answer(4)));
        assert_eq!(r.get(3, 10, 30_000), Some(Remembered::Pending));
        // An answer past its time is not returned, even while a pending one keeps it stored.
        assert_eq!(r.get(4, 40_011, 30_000), None);
    }
}
