//! A timer queue that costs O(what is due), not O(everything scheduled).
//!
//! Handlers schedule from any thread through a lock-free intake (a crossbeam `SegQueue`); only
//! the timer task takes the ordered map, when it asks what is due, so the request path never
//! waits on it. Entries are hints: the owner checks each due key against its own record (the
//! key may have been answered, removed or rescheduled since) and skips stale ones, so nothing
//! is ever searched for or cancelled here.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crossbeam::queue::SegQueue;

/// Keys to look at again at a given time (in the owner's unit: milliseconds, seconds…).
#[derive(Debug)]
pub(crate) struct Timers<K> {
    intake: SegQueue<(u64, K)>,
    /// Due time -> keys. Only the timer task locks it (uncontended), and never across an await.
    due: Mutex<BTreeMap<u64, Vec<K>>>,
}

impl<K> Default for Timers<K> {
    fn default() -> Self {
        Self {
            intake: SegQueue::new(),
            due: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<K> Timers<K> {
    /// Asks to see `key` again at `at`. Never blocks.
    pub(crate) fn schedule(&self, at: u64, key: K) {
        self.intake.push((at, key));
    }

    /// Up to `limit` keys due at or before `now`, earliest first, with their due times; the
    /// rest stay for the next call (a slice of work per tick, however much is due).
    pub(crate) fn take_due(&self, now: u64, limit: usize) -> Vec<(u64, K)> {
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((at, key)) = self.intake.pop() {
            due.entry(at).or_default().push(key);
        }
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(mut first) = due.first_entry() else {
                break;
            };
            if *first.key() > now {
                break;
            }
            let at = *first.key();
            let keys = first.get_mut();
            while out.len() < limit {
                match keys.pop() {
                    Some(k) => out.push((at, k)),
                    None => break,
                }
            }
            if keys.is_empty() {
                first.remove();
            }
        }
        out
    }

    /// Entries scheduled and not yet taken (for tests and gauges; takes the lock).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        due.values().map(Vec::len).sum::<usize>() + self.intake.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_is_due_in_slices() {
        let t = Timers::default();
        t.schedule(30, 'c');
        t.schedule(10, 'a');
        t.schedule(20, 'b');
        t.schedule(20, 'B');
        assert!(t.take_due(9, 10).is_empty());
        assert_eq!(t.take_due(10, 10), vec![(10, 'a')]);
        let mut two = t.take_due(25, 1);
        two.extend(t.take_due(25, 1));
        two.sort();
        assert_eq!(two, vec![(20, 'B'), (20, 'b')]);
        assert!(t.take_due(25, 10).is_empty());
        assert_eq!(t.len(), 1);
        assert_eq!(t.take_due(100, 10), vec![(30, 'c')]);
    }
}
