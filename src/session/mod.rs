//! The session map: who is online on this node, where they are, and what they were last told.
//!
//! A session is one compact record (about 170 bytes, boxed so the map's buckets stay small):
//! the secret and its presence verifier (computed once), the address and local addresses, the
//! replay window, the rate limiter's state, the next push id, and the remembered answers,
//! allocated only when a request with an effect arrives. A counter keeps the number of
//! sessions, so nobody walks the shards to count them. Expiry is scheduled on a [`Timers`]
//! queue: each session is looked at about once per TTL, not every sweep.
//!
//! # Locking rules
//! Sessions live in a [`DashMap`] (sharded `RwLock`s). Every method here takes a shard guard for
//! one statement, copies out what the caller needs, and drops it before returning: no guard ever
//! leaves this module, so none can be held across an `.await` or while another method of the
//! same map is called (dashmap's same-shard self-deadlock). Callers get copies, never `Ref`s.

mod replies;
mod window;

use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use sigrouter_proto::{Addr, Secret};
use uuid::Uuid;

pub(crate) use replies::Remembered;
use replies::Replies;
use window::ReplayWindow;
pub(crate) use window::Seen;
#[cfg(test)]
pub(crate) use window::WINDOW;

use crate::limit::{Gcra, Quota};
use crate::timer::Timers;

const NS_PER_MS: u64 = 1_000_000;
const NS_PER_S: u64 = 1_000_000_000;

/// Hashes a UUID by its own bits. Every key inserted is random (chosen by this node, or a
/// Resume the directory vouched for), so no one can aim keys at one bucket; lookups of chosen
/// keys only probe.
#[derive(Default, Clone, Copy)]
pub(crate) struct UuidHasher(u64);

impl Hasher for UuidHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(b);
        }
    }

    fn write_usize(&mut self, _: usize) {} // the length prefix of the 16 bytes

    fn finish(&self) -> u64 {
        // Mix the halves once so both the shard (high bits) and the bucket (low bits) vary.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

type Build = BuildHasherDefault<UuidHasher>;

/// Asks the CPU to start loading the cache line at `p` (a hint: never faults, never waits).
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never dereferences in the language's sense: any address is allowed.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Where a session's push ids start on this node: random, so that pushes a client gets from
/// different nodes (or from one node after a restart) do not repeat ids. A client drops a push
/// whose id and body it saw in the last 30 s as a retransmission (and acknowledges it); behind
/// a load balancer every node's `Migrate` names the same address, so with ids counted from 1
/// on every node a client moved twice got a second `Migrate` byte for byte like the first,
/// acknowledged it and stayed, and the drained node let it go: it was unreachable until it
/// found the node gone. Below 2^32, so an id still encodes in 5 bytes.
fn first_push_id() -> u64 {
    u64::from(rand::random::<u32>()) + 1
}

/// One client session.
#[derive(Debug)]
struct Session {
    secret: Secret,
    /// SHA-256 verifier of the secret, for presence records (computed once).
    verifier: [u8; 32],
    addr: SocketAddr,
    local: Option<Box<[Addr]>>,
    last_seen_ms: u64,
    window: ReplayWindow,
    /// The next push id: starts at a random point ([`first_push_id`]).
    next_push: u64,
    limiter: Gcra,
    /// When the expiry check of this session is scheduled (s of the router's clock); a queue
    /// entry for another time is stale.
    check_at_s: u64,
    replies: Option<Box<Replies>>,
}

/// A new session's contents.
#[derive(Debug)]
pub(crate) struct NewSession {
    pub(crate) secret: Secret,
    pub(crate) verifier: [u8; 32],
    pub(crate) addr: SocketAddr,
    pub(crate) local: Vec<Addr>,
    /// The request id of the Register or Resume that opened it.
    pub(crate) rid: u64,
}

/// What a request handler needs to know about the sender, copied out of the map.
#[derive(Clone, Debug)]
pub(crate) struct SenderView {
    /// The session.
    pub(crate) uuid: Uuid,
    /// The session secret (keys the MAC of answers).
    pub(crate) secret: Secret,
    /// The session address after this request (moved if the request rebinds it).
    pub(crate) addr: SocketAddr,
    /// Whether this request moved the address (a NAT rebinding).
    pub(crate) rebound: bool,
    /// What the replay window made of the request id.
    pub(crate) seen: Seen,
    /// The answer remembered for this request id, if it is a retransmission.
    pub(crate) remembered: Option<Remembered>,
}

/// The outcome of [`Sessions::touch`].
#[derive(Clone, Debug)]
pub(crate) enum Touch {
    /// No such session.
    Gone,
    /// The request's MAC does not match the session's secret: nothing recorded.
    BadMac,
    /// Over the session's rate limit: nothing recorded.
    RateLimited,
    /// Recorded.
    Seen(SenderView),
}

/// A peer's reachability, copied out for Incoming and Connected.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerView {
    pub(crate) secret: Secret,
    pub(crate) addr: SocketAddr,
}

/// Settings of the session map.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// A session silent this long expires.
    pub(crate) ttl_ms: u64,
    /// How long answers are remembered for retransmissions.
    pub(crate) keep_ms: u64,
    /// Requests per session.
    pub(crate) quota: Quota,
}

/// The concurrent session map.
#[derive(Debug)]
pub(crate) struct Sessions {
    map: DashMap<Uuid, Box<Session>, Build>,
    count: AtomicUsize,
    expiry: Timers<Uuid>,
    limits: Limits,
    /// Time zero of the compact timestamps in the records.
    epoch: Instant,
}

impl Sessions {
    /// An empty map.
    pub(crate) fn new(limits: Limits, epoch: Instant) -> Self {
        Self {
            // Many small shards: a shard grows (and rehashes under its write lock) in small
            // steps even at a million sessions.
            map: DashMap::with_hasher_and_shard_amount(Build::default(), 256),
            count: AtomicUsize::new(0),
            expiry: Timers::default(),
            limits,
            epoch,
        }
    }

    fn ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Number of sessions (a counter: no shard is locked).
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether `uuid` is online here.
    pub(crate) fn contains(&self, uuid: &Uuid) -> bool {
        self.map.contains_key(uuid)
    }

    fn check_at(&self, last_seen_ms: u64) -> u64 {
        (last_seen_ms + self.limits.ttl_ms) / 1000 + 1
    }

    /// Inserts a session (or replaces one, on Resume). Returns true if it is new here.
    pub(crate) fn insert(&self, uuid: Uuid, s: NewSession, now: Instant) -> bool {
        let now_ns = self.ns(now);
        let now_ms = now_ns / NS_PER_MS;
        let check_at_s = self.check_at(now_ms);
        let fresh = self
            .map
            .insert(
                uuid,
                Box::new(Session {
                    secret: s.secret,
                    verifier: s.verifier,
                    addr: s.addr,
                    local: (!s.local.is_empty()).then(|| s.local.into_boxed_slice()),
                    last_seen_ms: now_ms,
                    window: ReplayWindow::starting_at(s.rid),
                    next_push: first_push_id(),
                    limiter: Gcra::default(),
                    check_at_s,
                    replies: None,
                }),
            )
            .is_none();
        if fresh {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        self.expiry.schedule(check_at_s, uuid);
        fresh
    }

    /// Starts loading the map entry of `uuid` into the cache: its control bytes and its most
    /// likely bucket. Only a hint: it looks nothing up, changes nothing, and does nothing when
    /// the shard is being written.
    pub(crate) fn prefetch(&self, uuid: &Uuid) {
        let hash = self.map.hash_usize(uuid);
        let shard = &self.map.shards()[self.map.determine_shard(hash)];
        let Some(table) = shard.try_read() else {
            return;
        };
        if table.is_empty() {
            return;
        }
        // hashbrown probes from `hash & mask`: the control group there, and (usually) the
        // bucket of the same index, which sits below the control bytes.
        let i = hash & (table.buckets() - 1);
        let ctrl = table.data_end().as_ptr().cast::<u8>().wrapping_add(i);
        // SAFETY: `i` is below `buckets()`, as `bucket` requires; the pointer is only used as
        // a prefetch hint.
        let bucket = unsafe { table.bucket(i) }.as_ptr();
        prefetch(ctrl);
        prefetch(bucket.cast::<u8>());
    }

    /// Starts loading the session record of `uuid` into the cache (its entry is found under
    /// the shard's read lock, so best after [`Sessions::prefetch`] brought the entry in). Only
    /// a hint: changes nothing, and does nothing when the shard is being written.
    pub(crate) fn prefetch_record(&self, uuid: &Uuid) {
        let hash = self.map.hash_usize(uuid);
        let shard = &self.map.shards()[self.map.determine_shard(hash)];
        let Some(table) = shard.try_read() else {
            return;
        };
        let Some(bucket) = table.find(hash as u64, |(k, _)| k == uuid) else {
            return;
        };
        // SAFETY: the bucket was just found in `table`, whose read guard is held.
        let rec: &Session = unsafe { bucket.as_ref() }.1.get();
        let p = (rec as *const Session).cast::<u8>();
        for off in (0..size_of::<Session>()).step_by(64) {
            prefetch(p.wrapping_add(off));
        }
    }

    /// The secret of a session, to check a MAC.
    pub(crate) fn secret(&self, uuid: &Uuid) -> Option<Secret> {
        self.map.get(uuid).map(|s| s.secret)
    }

    /// Records an authenticated request from `src` whose MAC `verify` accepts with the
    /// session's secret: refreshes liveness, runs the replay window, takes a cell of the
    /// session's rate limit for a new request, moves the address when the request id is the
    /// newest seen, and returns the sender's view. One map access for the whole gate (the MAC
    /// is checked on the record found, not on a copy looked up before).
    pub(crate) fn touch(
        &self,
        uuid: &Uuid,
        src: SocketAddr,
        rid: u64,
        now: Instant,
        verify: impl FnOnce(&Secret) -> bool,
    ) -> Touch {
        let now_ns = self.ns(now);
        let Some(mut s) = self.map.get_mut(uuid) else {
            return Touch::Gone;
        };
        if !verify(&s.secret) {
            return Touch::BadMac;
        }
        // Only a new request takes a cell: a retransmission is answered from memory (or waits
        // for its pending answer) and costs nothing, so `RateLimited` always means "not
        // carried out", and the client may retry with a new request id.
        // A valid MAC proves the client is there, refused or not.
        s.last_seen_ms = now_ns / NS_PER_MS;
        let seen = s.window.peek(rid);
        if matches!(seen, Seen::New { .. }) && !s.limiter.check(now_ns, self.limits.quota) {
            return Touch::RateLimited;
        }
        s.window.mark(rid);
        let mut rebound = false;
        if seen == (Seen::New { newest: true }) && s.addr != src {
            s.addr = src;
            rebound = true;
        }
        let remembered = match seen {
            Seen::Duplicate => s
                .replies
                .as_ref()
                .and_then(|r| r.get(rid, now_ns / NS_PER_MS, self.limits.keep_ms)),
            _ => None,
        };
        Touch::Seen(SenderView {
            uuid: *uuid,
            secret: s.secret,
            addr: s.addr,
            rebound,
            seen,
            remembered,
        })
    }

    /// Takes a session back after Resume (secret already checked): new address, local
    /// addresses and request-id base. Returns false if the session is gone.
    pub(crate) fn resume(
        &self,
        uuid: &Uuid,
        src: SocketAddr,
        local: Vec<Addr>,
        rid: u64,
        now: Instant,
    ) -> bool {
        let now_ns = self.ns(now);
        let Some(mut s) = self.map.get_mut(uuid) else {
            return false;
        };
        s.addr = src;
        s.local = (!local.is_empty()).then(|| local.into_boxed_slice());
        s.window = ReplayWindow::starting_at(rid);
        s.replies = None;
        s.last_seen_ms = now_ns / NS_PER_MS;
        true
    }

    /// Refreshes liveness only (PushAck: no request id, never moves the address).
    pub(crate) fn keepalive(&self, uuid: &Uuid, now: Instant) {
        let now_ns = self.ns(now);
        if let Some(mut s) = self.map.get_mut(uuid) {
            s.last_seen_ms = now_ns / NS_PER_MS;
        }
    }

    /// Remembers the outcome of request `rid`, replacing an earlier entry for it.
    pub(crate) fn remember(&self, uuid: &Uuid, rid: u64, what: Remembered, now: Instant) {
        let now_ns = self.ns(now);
        if let Some(mut s) = self.map.get_mut(uuid) {
            let s = &mut **s;
            let replies = s.replies.get_or_insert_with(Box::default);
            replies.put(
                rid,
                what,
                now_ns / NS_PER_MS,
                &s.window,
                self.limits.keep_ms,
            );
        }
    }

    /// A peer's secret and address.
    pub(crate) fn peer(&self, uuid: &Uuid) -> Option<PeerView> {
        self.map.get(uuid).map(|s| PeerView {
            secret: s.secret,
            addr: s.addr,
        })
    }

    /// A session's Resume verifier.
    pub(crate) fn verifier(&self, uuid: &Uuid) -> Option<[u8; 32]> {
        self.map.get(uuid).map(|s| s.verifier)
    }

    /// A session's local addresses.
    pub(crate) fn local(&self, uuid: &Uuid) -> Vec<Addr> {
        self.map
            .get(uuid)
            .and_then(|s| s.local.as_ref().map(|l| l.to_vec()))
            .unwrap_or_default()
    }

    /// Takes the next push id of a session, with what is needed to send it.
    pub(crate) fn next_push(&self, uuid: &Uuid) -> Option<(u64, PeerView)> {
        let mut s = self.map.get_mut(uuid)?;
        let id = s.next_push;
        s.next_push = s.next_push.saturating_add(1);
        Some((
            id,
            PeerView {
                secret: s.secret,
                addr: s.addr,
            },
        ))
    }

    /// The current address of a session (pushes follow a rebinding).
    pub(crate) fn addr(&self, uuid: &Uuid) -> Option<SocketAddr> {
        self.map.get(uuid).map(|s| s.addr)
    }

    /// Removes a session; returns its Resume verifier if it was here.
    pub(crate) fn take(&self, uuid: &Uuid) -> Option<[u8; 32]> {
        let (_, s) = self.map.remove(uuid)?;
        self.count.fetch_sub(1, Ordering::Relaxed);
        Some(s.verifier)
    }

    /// Removes sessions silent for longer than the TTL, among those whose check is due;
    /// reschedules the others and forgets their old answers. Looks at what is due a slice at a
    /// time (each session's shard lock is held for that session only), at most
    /// [`crate::timer::PASS`] per call. Returns the expired UUIDs.
    pub(crate) fn expire(&self, now: Instant) -> Vec<Uuid> {
        let now_ns = self.ns(now);
        let now_ms = now_ns / NS_PER_MS;
        let mut gone = Vec::new();
        self.expiry.run_due(now_ns / NS_PER_S, |at, uuid| {
            let mut expired = false;
            let mut again = None;
            if let Some(mut s) = self.map.get_mut(uuid) {
                if s.check_at_s != at {
                    return None; // rescheduled or replaced since
                }
                if now_ms.saturating_sub(s.last_seen_ms) > self.limits.ttl_ms {
                    expired = true;
                } else {
                    let s = &mut **s;
                    s.check_at_s = self
                        .check_at(s.last_seen_ms)
                        .max(at + 1)
                        .max(now_ns / NS_PER_S + 1);
                    again = Some(s.check_at_s);
                    if let Some(r) = &mut s.replies {
                        r.prune(now_ms, &s.window, self.limits.keep_ms);
                        if r.is_empty() {
                            s.replies = None;
                        }
                    }
                }
            }
            // Removed only if still silent (a request may have arrived in between).
            if expired
                && self
                    .map
                    .remove_if(uuid, |_, s| {
                        now_ms.saturating_sub(s.last_seen_ms) > self.limits.ttl_ms
                    })
                    .is_some()
            {
                self.count.fetch_sub(1, Ordering::Relaxed);
                gone.push(*uuid);
            }
            again
        });
        gone
    }

    /// A snapshot of every session's UUID.
    pub(crate) fn uuids(&self) -> Vec<Uuid> {
        self.map.iter().map(|e| *e.key()).collect()
    }

    /// Every session with its Resume verifier (for presence re-publication).
    pub(crate) fn verifiers(&self) -> Vec<(Uuid, [u8; 32])> {
        self.map.iter().map(|e| (*e.key(), e.verifier)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_record_stays_small() {
        // The budget is 300 bytes a session at a million sessions, map and timers included.
        let size = size_of::<Session>();
        assert!(size <= 192, "{size}");
    }
}
