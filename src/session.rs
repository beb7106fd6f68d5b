//! The session map: who is online on this node, where they are, and what they were last told.
//!
//! # Locking rules
//! Sessions live in a [`DashMap`] (sharded `RwLock`s). Every method here takes a shard guard for
//! one statement, copies out what the caller needs, and drops it before returning: no guard ever
//! leaves this module, so none can be held across an `.await` or while another method of the
//! same map is called (dashmap's same-shard self-deadlock). Callers get clones, never `Ref`s.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use sigrouter_proto::{Addr, Secret};
use uuid::Uuid;

/// How many answers a session remembers for retransmitted requests.
const DEDUP_SLOTS: usize = 16;

/// What a session remembers about one request id.
#[derive(Clone, Debug)]
pub(crate) enum Remembered {
    /// The answer that was sent (already encoded and MAC'd).
    Answer(Arc<[u8]>),
    /// A request whose answer is not known yet (a Connect waiting for the target, a request
    /// forwarded to another node): retransmissions wait for it.
    Pending,
}

/// One client session.
#[derive(Debug)]
struct Session {
    secret: Secret,
    addr: SocketAddr,
    local: Arc<[Addr]>,
    last_seen: Instant,
    /// Highest request id seen with a valid MAC: only a newer one may move the address.
    max_rid: u64,
    next_push: u64,
    recent: VecDeque<(u64, Instant, Remembered)>,
}

/// What a request handler needs to know about the sender, copied out of the map.
#[derive(Clone, Debug)]
pub(crate) struct SenderView {
    /// The session secret (keys the MAC of answers).
    pub(crate) secret: Secret,
    /// The session address after this request (moved if the request rebinds it).
    pub(crate) addr: SocketAddr,
    /// The session's local addresses.
    pub(crate) local: Arc<[Addr]>,
    /// Whether this request moved the address (a NAT rebinding).
    pub(crate) rebound: bool,
    /// Highest request id seen so far.
    pub(crate) max_rid: u64,
    /// The answer remembered for this request id, if it is a retransmission.
    pub(crate) remembered: Option<Remembered>,
}

/// A peer's reachability, copied out for Incoming and Connected.
#[derive(Clone, Debug)]
pub(crate) struct PeerView {
    pub(crate) secret: Secret,
    pub(crate) addr: SocketAddr,
}

/// The concurrent session map.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    map: DashMap<Uuid, Session>,
}

impl Sessions {
    /// Number of sessions.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether `uuid` is online here.
    pub(crate) fn contains(&self, uuid: &Uuid) -> bool {
        self.map.contains_key(uuid)
    }

    /// Inserts a new session (or replaces one, on Resume).
    pub(crate) fn insert(
        &self,
        uuid: Uuid,
        secret: Secret,
        addr: SocketAddr,
        local: Vec<Addr>,
        rid: u64,
        now: Instant,
    ) {
        self.map.insert(
            uuid,
            Session {
                secret,
                addr,
                local: local.into(),
                last_seen: now,
                max_rid: rid,
                next_push: 1,
                recent: VecDeque::with_capacity(DEDUP_SLOTS),
            },
        );
    }

    /// The secret of a session, to check a MAC.
    pub(crate) fn secret(&self, uuid: &Uuid) -> Option<Secret> {
        self.map.get(uuid).map(|s| s.secret)
    }

    /// Records an authenticated request from `src` (MAC already checked): refreshes liveness,
    /// moves the address when the request id is the newest seen, and returns the sender's view.
    pub(crate) fn touch(
        &self,
        uuid: &Uuid,
        src: SocketAddr,
        rid: u64,
        now: Instant,
    ) -> Option<SenderView> {
        let mut s = self.map.get_mut(uuid)?;
        s.last_seen = now;
        let mut rebound = false;
        if rid > s.max_rid {
            s.max_rid = rid;
            if s.addr != src {
                s.addr = src;
                rebound = true;
            }
        }
        let remembered = s
            .recent
            .iter()
            .find(|(r, _, _)| *r == rid)
            .map(|(_, _, m)| m.clone());
        Some(SenderView {
            secret: s.secret,
            addr: s.addr,
            local: s.local.clone(),
            rebound,
            max_rid: s.max_rid,
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
        let Some(mut s) = self.map.get_mut(uuid) else {
            return false;
        };
        s.addr = src;
        s.local = local.into();
        s.max_rid = rid;
        s.last_seen = now;
        true
    }

    /// Refreshes liveness only (PushAck: no request id, never moves the address).
    pub(crate) fn keepalive(&self, uuid: &Uuid, now: Instant) {
        if let Some(mut s) = self.map.get_mut(uuid) {
            s.last_seen = now;
        }
    }

    /// Remembers the outcome of request `rid`, replacing an earlier entry for it.
    pub(crate) fn remember(&self, uuid: &Uuid, rid: u64, what: Remembered, now: Instant) {
        if let Some(mut s) = self.map.get_mut(uuid) {
            if let Some(slot) = s.recent.iter_mut().find(|(r, _, _)| *r == rid) {
                slot.1 = now;
                slot.2 = what;
                return;
            }
            if s.recent.len() == DEDUP_SLOTS {
                s.recent.pop_front();
            }
            s.recent.push_back((rid, now, what));
        }
    }

    /// A peer's secret, address and local addresses.
    pub(crate) fn peer(&self, uuid: &Uuid) -> Option<PeerView> {
        self.map.get(uuid).map(|s| PeerView {
            secret: s.secret,
            addr: s.addr,
        })
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

    /// Removes a session.
    pub(crate) fn remove(&self, uuid: &Uuid) -> bool {
        self.map.remove(uuid).is_some()
    }

    /// Removes sessions silent for longer than `ttl` and forgets answers older than `dedup`.
    /// Returns the expired UUIDs.
    pub(crate) fn sweep(&self, now: Instant, ttl: Duration, dedup: Duration) -> Vec<Uuid> {
        let mut gone = Vec::new();
        self.map.retain(|uuid, s| {
            if now.saturating_duration_since(s.last_seen) > ttl {
                gone.push(*uuid);
                return false;
            }
            while s.recent.front().is_some_and(|(_, t, m)| {
                !matches!(m, Remembered::Pending) && now.saturating_duration_since(*t) > dedup
            }) {
                s.recent.pop_front();
            }
            true
        });
        gone
    }

    /// A snapshot of every session's UUID.
    pub(crate) fn uuids(&self) -> Vec<Uuid> {
        self.map.iter().map(|e| *e.key()).collect()
    }

    /// Every session with its Resume verifier (for presence re-publication).
    pub(crate) fn verifiers(&self) -> Vec<(Uuid, [u8; 32])> {
        let secrets: Vec<(Uuid, Secret)> = self.map.iter().map(|e| (*e.key(), e.secret)).collect();
        secrets
            .into_iter()
            .map(|(u, s)| (u, s.verifier()))
            .collect()
    }
}
