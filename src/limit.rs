//! Rate limits as GCRA (the generic cell rate algorithm, a token bucket kept as one number):
//! each limited thing stores only its theoretical arrival time, 8 bytes, so a session carries
//! its own limiter and a source prefix costs one map entry. Time is the router's `now`, so the
//! limits behave the same under the simulated clock of the router's tests.

use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use ipnet::IpNet;

use crate::timer::Timers;

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

/// Limiters by key (a source address prefix, say), forgotten once idle. Each key is looked at
/// again when its bucket could be full (in whole seconds of the router's clock), so forgetting
/// costs O(keys due), not a walk of the map.
#[derive(Debug)]
pub(crate) struct Keyed<K: Eq + Hash> {
    quota: Quota,
    map: DashMap<K, Gcra>,
    looks: Timers<K>,
}

impl<K: Eq + Hash + Clone> Keyed<K> {
    /// No key limited yet.
    pub(crate) fn new(quota: Quota) -> Self {
        Self {
            quota,
            map: DashMap::new(),
            looks: Timers::default(),
        }
    }

    /// Takes one cell for `key` at `now_ns`.
    pub(crate) fn check(&self, key: K, now_ns: u64) -> bool {
        match self.map.entry(key) {
            dashmap::Entry::Occupied(mut o) => o.get_mut().check(now_ns, self.quota),
            dashmap::Entry::Vacant(v) => {
                let mut g = Gcra::default();
                let ok = g.check(now_ns, self.quota);
                self.looks.schedule(full_at_s(g), v.key().clone());
                v.insert(g);
                ok
            }
        }
    }

    /// Forgets the keys due for a look whose bucket is full again; looks again later at the
    /// others.
    pub(crate) fn forget_idle(&self, now_ns: u64) {
        self.looks.run_due(now_ns / NS_PER_S, |_, key| {
            let mut busy = None;
            self.map.remove_if(key, |_, g| {
                let idle = g.idle(now_ns);
                if !idle {
                    busy = Some(full_at_s(*g));
                }
                idle
            });
            busy
        });
    }

    /// Keys held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// Nanoseconds per second.
const NS_PER_S: u64 = 1_000_000_000;

/// The first whole second (of the router's clock) at which bucket `g` is surely full again.
fn full_at_s(g: Gcra) -> u64 {
    g.0 / NS_PER_S + 1
}

/// One limiter shared by every thread (a node-wide budget): the same GCRA on an atomic.
#[derive(Debug)]
pub(crate) struct Shared {
    quota: Quota,
    tat: AtomicU64,
}

impl Shared {
    /// A full bucket.
    pub(crate) fn new(quota: Quota) -> Self {
        Self {
            quota,
            tat: AtomicU64::new(0),
        }
    }

    /// Whether more than half the burst is used at `now_ns` (the bucket is less than half
    /// full). Reads only.
    pub(crate) fn more_than_half_used(&self, now_ns: u64) -> bool {
        let ahead = self.tat.load(Ordering::Relaxed).saturating_sub(now_ns);
        ahead > self.quota.tolerance / 2
    }

    /// Takes one cell at `now_ns` if the quota allows.
    pub(crate) fn check(&self, now_ns: u64) -> bool {
        let mut cur = self.tat.load(Ordering::Relaxed);
        loop {
            let mut g = Gcra(cur);
            if !g.check(now_ns, self.quota) {
                return false;
            }
            match self
                .tat
                .compare_exchange_weak(cur, g.0, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
}

/// What a per-source limit keys on: the source's prefix (a host usually owns a whole IPv6
/// /64), or, behind a trusted UDP proxy where every client shares the proxy's IP, the full
/// address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum SourceKey {
    /// An IPv4 prefix (IPv4-mapped IPv6 sources count as IPv4).
    V4(u32),
    /// An IPv6 prefix.
    V6(u128),
    /// A client behind a trusted proxy.
    Proxied(SocketAddr),
}

/// Turns source addresses into limit keys.
#[derive(Clone, Debug)]
pub(crate) struct Sources {
    v4_mask: u32,
    v6_mask: u128,
    proxies: Vec<IpNet>,
}

impl Sources {
    /// Prefix lengths (clamped to 32 and 128) and the trusted proxies.
    pub(crate) fn new(prefix_v4: u8, prefix_v6: u8, proxies: Vec<IpNet>) -> Self {
        let v4 = u32::from(prefix_v4.min(32));
        let v6 = u32::from(prefix_v6.min(128));
        Self {
            v4_mask: u32::MAX.checked_shl(32 - v4).unwrap_or(0),
            v6_mask: u128::MAX.checked_shl(128 - v6).unwrap_or(0),
            proxies,
        }
    }

    /// The key of `src`.
    pub(crate) fn key(&self, src: SocketAddr) -> SourceKey {
        let ip = match src.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if self.proxies.iter().any(|p| p.contains(&ip)) {
            return SourceKey::Proxied(SocketAddr::new(ip, src.port()));
        }
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(u32::from(v4) & self.v4_mask),
            IpAddr::V6(v6) => SourceKey::V6(u128::from(v6) & self.v6_mask),
        }
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
    fn sources_share_a_prefix_unless_behind_a_trusted_proxy() {
        let s = Sources::new(32, 64, vec!["10.0.0.0/8".parse().unwrap()]);
        let k = |a: &str| s.key(a.parse().unwrap());
        assert_eq!(k("[2001:db8::1]:1"), k("[2001:db8::ffff:1]:2"), "one /64");
        assert_ne!(k("[2001:db8::1]:1"), k("[2001:db8:0:1::1]:1"));
        assert_eq!(k("192.0.2.1:1"), k("192.0.2.1:2"));
        assert_ne!(k("192.0.2.1:1"), k("192.0.2.2:1"));
        assert_eq!(
            k("[::ffff:192.0.2.1]:1"),
            k("192.0.2.1:9"),
            "mapped IPv4 is IPv4"
        );
        assert_ne!(
            k("10.1.2.3:1000"),
            k("10.1.2.3:1001"),
            "behind the proxy: per port"
        );
        let wide = Sources::new(24, 48, vec![]);
        let k = |a: &str| wide.key(a.parse().unwrap());
        assert_eq!(k("192.0.2.1:1"), k("192.0.2.200:1"));
        assert_eq!(k("[2001:db8::1]:1"), k("[2001:db8:0:ffff::1]:1"));
        assert_eq!(
            Sources::new(0, 0, vec![]).key("1.2.3.4:5".parse().unwrap()),
            SourceKey::V4(0)
        );
    }

    #[test]
    fn a_shared_budget_across_threads() {
        let b = Shared::new(Quota::per_second(1000, 100));
        let taken: usize = std::thread::scope(|sc| {
            let h: Vec<_> = (0..4)
                .map(|_| sc.spawn(|| (0..100).filter(|_| b.check(S)).count()))
                .collect();
            h.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 100, "exactly the burst, however the threads race");
        assert!(b.check(S + 1_000_000));
    }

    #[test]
    fn a_shared_budget_says_when_more_than_half_is_used() {
        let b = Shared::new(Quota::per_second(10, 10));
        assert!(!b.more_than_half_used(S));
        assert!((0..5).all(|_| b.check(S)));
        assert!(!b.more_than_half_used(S), "exactly half");
        assert!(b.check(S));
        assert!(b.more_than_half_used(S));
        // It refills at the sustained rate: one cell per 100 ms.
        assert!(!b.more_than_half_used(S + S / 10));
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
        // A key still in use when its look comes is looked at again later, then forgotten.
        assert!(k.check("c", 3 * S));
        assert!(k.check("c", 4 * S + S / 2));
        k.forget_idle(5 * S);
        assert_eq!(k.len(), 1, "its bucket refills only at 5.5 s");
        k.forget_idle(6 * S);
        assert_eq!(k.len(), 0);
    }
}
