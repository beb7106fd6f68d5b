//! Rate limits as GCRA (the generic cell rate algorithm, a token bucket kept as one number):
//! each limited thing stores only its theoretical arrival time, 8 bytes, so a session carries
//! its own limiter and a source prefix costs one map entry. Time is the router's `now`, so the
//! limits behave the same under the simulated clock of the router's tests.

use std::hash::Hash;

use dashmap::DashMap;

/// A sustained rate with a burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Quota {
    /// Nanoseconds between two cells at the sustained rate.
    interval: u64,
    /// How far ahead of now the arrival time may run: `burst` cells.
    tolerance: u64,
}

impl Quota {
    /// `rate` per second sustained, `burst` at once (both at least 1).
    pub(crate) fn per_second(rate: u32, burst: u32) -> Self {
        let interval = 1_000_000_000 / u64::from(rate.max(1));
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst.max(1))),
        }
    }
}

/// One limiter's state: the theoretical arrival time of the next cell, in nanoseconds of the
/// router's clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Gcra(u64);

impl Gcra {
    /// Takes one cell at `now_ns` if the quota allows; false (and no change) if not.
    pub(crate) fn check(&mut self, now_ns: u64, q: Quota) -> bool {
        let next = self.0.max(now_ns).saturating_add(q.interval);
        if next - now_ns > q.tolerance {
            return false;
        }
        self.0 = next;
        true
    }

    /// Whether the bucket is full again at `now_ns` (the state can be forgotten).
    pub(crate) fn idle(self, now_ns: u64) -> bool {
        self.0 <= now_ns
    }
}

/// Limiters by key (a source address prefix, say), forgotten once idle.
#[derive(Debug)]
pub(crate) struct Keyed<K: Eq + Hash> {
    quota: Quota,
    map: DashMap<K, Gcra>,
}

impl<K: Eq + Hash + Clone> Keyed<K> {
    /// No key limited yet.
    pub(crate) fn new(quota: Quota) -> Self {
        Self {
            quota,
            map: DashMap::new(),
        }
    }

    /// Takes one cell for `key` at `now_ns`.
    pub(crate) fn check(&self, key: K, now_ns: u64) -> bool {
        self.map.entry(key).or_default().check(now_ns, self.quota)
    }

    /// Forgets keys whose bucket is full again.
    pub(crate) fn forget_idle(&self, now_ns: u64) {
        self.map.retain(|_, g| !g.idle(now_ns));
    }

    /// Keys held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let q = Quota::per_second(2, 3);
        let mut g = Gcra::default();
        let t0 = 10 * S;
        assert!((0..3).all(|_| g.check(t0, q)), "the burst passes at once");
        assert!(!g.check(t0, q), "the fourth does not");
        assert!(!g.check(t0 + S / 2 - 1, q));
        assert!(g.check(t0 + S / 2, q), "one cell every half second after");
        assert!(!g.check(t0 + S / 2, q));
        assert!(!g.idle(t0 + S));
        assert!(g.idle(t0 + 2 * S));
    }

    #[test]
    fn keyed_limiters_are_independent_and_forgotten_when_idle() {
        let k = Keyed::new(Quota::per_second(1, 1));
        assert!(k.check("a", S));
        assert!(!k.check("a", S));
        assert!(k.check("b", S));
        k.forget_idle(S);
        assert_eq!(k.len(), 2);
        k.forget_idle(3 * S);
        assert_eq!(k.len(), 0);
    }
}
