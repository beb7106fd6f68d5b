//! A timer queue that costs O(what is due), not O(everything scheduled).
//!
//! Handlers schedule from any thread through a lock-free intake (a crossbeam `SegQueue`); only
//! the timer task takes the ordered map, when it asks what is due, so the request path never
//! waits on it. Entries are hints: the owner checks each due key against its own record (the
//! key may have been answered, removed or rescheduled since) and skips stale ones, so nothing
//! is ever searched for or cancelled here.

use std::collections::BTreeMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam::queue::SegQueue;
use dashmap::DashMap;

/// Keys taken from the ordered map at a time (its lock is held for one slice, never longer).
pub(crate) const SLICE: usize = 4_096;
/// Most keys one housekeeping pass looks at; what is left is due at the next pass. At one pass
/// a second this keeps up with a million entries looked at every four seconds.
pub(crate) const PASS: usize = 262_144;

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

    /// Hands the keys due at `now` to `look`, a slice at a time, at most [`PASS`] of them;
    /// `look` returns when to see the key again (`None`: forget it; a time not after `now`
    /// counts as `now + 1`, so one pass never sees a key twice). Returns how many it looked at.
    pub(crate) fn run_due(&self, now: u64, mut look: impl FnMut(u64, &K) -> Option<u64>) -> usize {
        let mut seen = 0;
        while seen < PASS {
            let due = self.take_due(now, SLICE.min(PASS - seen));
            let n = due.len();
            for (at, key) in due {
                if let Some(again) = look(at, &key) {
                    self.schedule(again.max(now + 1), key);
                }
            }
            seen += n;
            if n < SLICE {
                break;
            }
        }
        seen
    }

    /// Entries scheduled and not yet taken (for tests and gauges; takes the lock).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        due.values().map(Vec::len).sum::<usize>() + self.intake.len()
    }
}

/// Forgets map entries some time after they were written, looking only at what is due: each
/// write schedules one look (in whole seconds), and the look removes the entry if it is older
/// than `keep` by then, or looks again when it will be (it was written again since).
#[derive(Debug)]
pub(crate) struct AgeOut<K> {
    looks: Timers<K>,
    epoch: Instant,
    keep: Duration,
}

impl<K: Eq + Hash> AgeOut<K> {
    /// Entries are kept `keep` after their last write.
    pub(crate) fn new(keep: Duration, epoch: Instant) -> Self {
        Self {
            looks: Timers::default(),
            epoch,
            keep,
        }
    }

    fn secs(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_secs()
    }

    /// The first whole second at which an entry written at `at` is surely older than `keep`.
    fn due(&self, at: Instant) -> u64 {
        let keep = self.keep.as_secs() + u64::from(self.keep.subsec_nanos() > 0);
        self.secs(at) + keep + 1
    }

    /// Records that `key` was written at `at`.
    pub(crate) fn written(&self, key: K, at: Instant) {
        self.looks.schedule(self.due(at), key);
    }

    /// Removes from `map` the entries due for a look that are older than `keep` at `now`
    /// (`stamp`: when an entry was written). Returns how many it looked at.
    pub(crate) fn sweep<V>(
        &self,
        map: &DashMap<K, V>,
        now: Instant,
        stamp: impl Fn(&V) -> Instant,
    ) -> usize {
        self.looks.run_due(self.secs(now), |_, key| {
            let mut young = None;
            map.remove_if(key, |_, v| {
                let at = stamp(v);
                let old = now.saturating_duration_since(at) > self.keep;
                if !old {
                    young = Some(at);
                }
                old
            });
            // Written again since (that write's own look may come first; the entry then
            // has two, until it goes), or stamped before the epoch.
            young.map(|at| self.due(at))
        })
    }

    /// Looks scheduled and not yet taken.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.looks.len()
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

    /// A pass looks at every due key in slices (more than one slice's worth here), never at a
    /// key not yet due, and never twice at a key it asked to see again.
    #[test]
    fn a_pass_runs_every_due_key_once() {
        let t = Timers::default();
        let n = SLICE as u64 * 2 + 7;
        for k in 0..n {
            t.schedule(k % 5, k);
        }
        t.schedule(50, u64::MAX);
        let mut looked = Vec::new();
        let seen = t.run_due(10, |_, k| {
            looked.push(*k);
            // Ask for the even ones again "now": that means the next second.
            (k % 2 == 0).then_some(0)
        });
        assert_eq!(seen as u64, n);
        looked.sort_unstable();
        assert_eq!(looked, (0..n).collect::<Vec<_>>());
        assert_eq!(t.len() as u64, n.div_ceil(2) + 1);
        assert!(t.take_due(10, usize::MAX).is_empty());
        assert_eq!(t.take_due(11, usize::MAX).len() as u64, n.div_ceil(2));
    }

    /// An entry goes once it is older than `keep`; one written again since stays until its
    /// own time; a look at an entry already gone costs nothing more.
    #[test]
    fn age_out_forgets_only_what_is_old() {
        let t0 = Instant::now();
        let ages = AgeOut::new(Duration::from_millis(2_500), t0);
        let map: DashMap<u32, Instant> = DashMap::new();
        for (k, at) in [(1, t0), (2, t0), (3, t0 + Duration::from_secs(1))] {
            map.insert(k, at);
            ages.written(k, at);
        }
        map.remove(&2);
        let again = t0 + Duration::from_secs(3);
        map.insert(1, again);
        ages.written(1, again);

        ages.sweep(&map, t0 + Duration::from_millis(2_400), |t| *t);
        assert_eq!(map.len(), 2, "nothing is older than 2.5 s yet");
        ages.sweep(&map, t0 + Duration::from_secs(4), |t| *t);
        assert!(map.contains_key(&1), "written again at 3 s");
        assert!(map.contains_key(&3), "its look is not due");
        ages.sweep(&map, t0 + Duration::from_secs(5), |t| *t);
        assert!(!map.contains_key(&3));
        ages.sweep(&map, t0 + Duration::from_secs(7), |t| *t);
        assert!(map.is_empty());
        assert_eq!(ages.len(), 0);
    }
}
