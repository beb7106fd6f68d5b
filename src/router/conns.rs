//! Connections between two clients: pending until the target answers, then established while
//! Signals flow. Either end may be on another node, never both.
//!
//! Like the session map, every method takes a shard guard for one statement and returns
//! copies; no guard leaves this module.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use uuid::Uuid;

use crate::timer::Timers;

/// How often each connection is looked at for idling out or losing its ends (seconds).
pub(crate) const LOOK_EVERY_S: u64 = 10;
/// Most connect timeouts handled per tick.
const TICK_SLICE: usize = 65_536;

/// The node holding the far end of a connection that spans two nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Remote {
    /// Its node id.
    pub(crate) node: Arc<str>,
    /// Its cluster-port address.
    pub(crate) addr: SocketAddr,
}

/// Where the two ends of a connection are, seen from this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Both ends are on this node.
    Local,
    /// This node holds the initiator; the target is on another node (`None` while the target
    /// is being looked up).
    Initiator(Option<Remote>),
    /// This node holds the target; the initiator is on `remote`, whose node answers the
    /// Connect.
    Target(Remote),
}

impl Role {
    /// The other node, if the connection spans two.
    pub(crate) fn remote(&self) -> Option<&Remote> {
        match self {
            Self::Local | Self::Initiator(None) => None,
            Self::Initiator(Some(r)) | Self::Target(r) => Some(r),
        }
    }
}

/// A connection's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Waiting for Accept/Reject until `deadline`; `push` is the Incoming pushed to the target
    /// from this node (`None` when the target is on another node).
    Pending {
        /// When the Connect times out.
        deadline: Instant,
        /// The local Incoming push id.
        push: Option<u64>,
    },
    /// Accepted; Signals flow until either side goes away or it idles out.
    Established {
        /// Last Signal (or the Accept).
        last: Instant,
    },
}

/// One connection.
#[derive(Clone, Debug)]
pub(crate) struct Conn {
    /// Who asked.
    pub(crate) initiator: Uuid,
    /// Who was asked.
    pub(crate) target: Uuid,
    /// Request id of the initiator's Connect (meaningful on the initiator's node).
    pub(crate) initiator_rid: u64,
    /// When the Connect arrived.
    pub(crate) started: Instant,
    /// Pending or established.
    pub(crate) state: ConnState,
    /// Where the ends are.
    pub(crate) role: Role,
}

impl Conn {
    /// The ends held by this node.
    pub(crate) fn local_ends(&self) -> impl Iterator<Item = Uuid> {
        let (i, t) = match self.role {
            Role::Local => (Some(self.initiator), Some(self.target)),
            Role::Initiator(_) => (Some(self.initiator), None),
            Role::Target(_) => (None, Some(self.target)),
        };
        i.into_iter().chain(t)
    }

    /// The end that is not `uuid`.
    pub(crate) fn other(&self, uuid: Uuid) -> Uuid {
        if self.initiator == uuid {
            self.target
        } else {
            self.initiator
        }
    }

    /// Whether the connection still waits for the target's answer.
    pub(crate) fn is_pending(&self) -> bool {
        matches!(self.state, ConnState::Pending { .. })
    }

    /// Whether `a` and `b` are its two ends, in either order.
    fn joins(&self, a: Uuid, b: Uuid) -> bool {
        (self.initiator == a && self.target == b) || (self.initiator == b && self.target == a)
    }
}

/// The connection map; connect timeouts on a timer queue, and an index of the connections of
/// each session held here, so a session that leaves or moves takes its connections along (or
/// hands them back) at once.
#[derive(Debug)]
pub(crate) struct Conns {
    map: DashMap<Uuid, Conn>,
    /// Connections by each of their ends held on this node.
    /// (A set: one session may hold thousands of connections, each added and removed in O(1).)
    by_session: DashMap<Uuid, HashSet<Uuid>>,
    /// Connect deadlines (ms of the router's clock).
    deadlines: Timers<Uuid>,
    /// When to look at each connection again (whole seconds of the router's clock): whether
    /// it idled out or lost its ends.
    looks: Timers<Uuid>,
    /// How many are pending (a drain waits for none).
    pending: AtomicUsize,
    epoch: Instant,
}

impl Conns {
    /// No connections; times are counted from `epoch`.
    pub(crate) fn new(epoch: Instant) -> Self {
        Self {
            map: DashMap::new(),
            by_session: DashMap::new(),
            deadlines: Timers::default(),
            looks: Timers::default(),
            pending: AtomicUsize::new(0),
            epoch,
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn secs(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_secs()
    }

    /// Records a new pending connection.
    pub(crate) fn start(&self, id: Uuid, conn: Conn) {
        if let ConnState::Pending { deadline, .. } = conn.state {
            self.deadlines.schedule(self.ms(deadline), id);
            self.pending.fetch_add(1, Ordering::Relaxed);
        }
        self.looks
            .schedule(self.secs(conn.started) + LOOK_EVERY_S, id);
        self.index(id, &conn);
        self.map.insert(id, conn);
    }

    fn index(&self, id: Uuid, conn: &Conn) {
        for end in conn.local_ends() {
            self.by_session.entry(end).or_default().insert(id);
        }
    }

    fn unindex(&self, id: &Uuid, conn: &Conn) {
        for end in [conn.initiator, conn.target] {
            self.by_session.remove_if_mut(&end, |_, ids| {
                ids.remove(id);
                ids.is_empty()
            });
        }
    }

    /// Carries on a connection handed over by another node (or makes one that spanned to it
    /// local): established, with `role`.
    pub(crate) fn adopt(&self, id: Uuid, conn: Conn) {
        if self.remove(&id).is_none() {
            // New here (one that was here already has its look scheduled).
            let at = match conn.state {
                ConnState::Established { last } => last,
                ConnState::Pending { .. } => conn.started,
            };
            self.looks.schedule(self.secs(at) + LOOK_EVERY_S, id);
        }
        self.index(id, &conn);
        self.map.insert(id, conn);
    }

    /// Changes where the ends of connection `id` are. False if it is unknown.
    pub(crate) fn set_role(&self, id: &Uuid, role: Role) -> bool {
        let updated = match self.map.get_mut(id) {
            Some(mut c) => {
                c.role = role;
                Some(c.clone())
            }
            None => None,
        };
        match updated {
            Some(c) => {
                self.index(*id, &c);
                true
            }
            None => false,
        }
    }

    /// Whether session `uuid` has a connection here.
    pub(crate) fn has_session(&self, uuid: &Uuid) -> bool {
        self.by_session.contains_key(uuid)
    }

    /// The connections of session `uuid` (which is leaving), taken out of the index.
    pub(crate) fn of_session(&self, uuid: &Uuid) -> Vec<(Uuid, Conn)> {
        let ids = self
            .by_session
            .remove(uuid)
            .map(|(_, v)| v)
            .unwrap_or_default();
        ids.into_iter()
            .filter_map(|id| self.get(&id).map(|c| (id, c)))
            .filter(|(_, c)| c.initiator == *uuid || c.target == *uuid)
            .collect()
    }

    /// The pending connections of session `uuid`, left in the index.
    pub(crate) fn pending_of(&self, uuid: &Uuid) -> Vec<(Uuid, Conn)> {
        let ids: Vec<Uuid> = match self.by_session.get(uuid) {
            Some(ids) => ids.iter().copied().collect(),
            None => return Vec::new(),
        };
        ids.into_iter()
            .filter_map(|id| self.get(&id).map(|c| (id, c)))
            .filter(|(_, c)| c.is_pending() && (c.initiator == *uuid || c.target == *uuid))
            .collect()
    }

    /// A copy of connection `id`.
    pub(crate) fn get(&self, id: &Uuid) -> Option<Conn> {
        self.map.get(id).map(|c| c.clone())
    }

    /// Forgets connection `id`; returns it.
    pub(crate) fn remove(&self, id: &Uuid) -> Option<Conn> {
        let c = self.map.remove(id).map(|(_, c)| c)?;
        if c.is_pending() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
        self.unindex(id, &c);
        Some(c)
    }

    /// A pending connection whose target turned out to be on this node: records the local
    /// Incoming `push` and makes it local. Returns false if it is not pending (any more).
    pub(crate) fn make_local(&self, id: &Uuid, push: u64) -> bool {
        let target = match self.map.get_mut(id) {
            Some(mut c) => match c.state {
                ConnState::Pending { deadline, .. } => {
                    c.state = ConnState::Pending {
                        deadline,
                        push: Some(push),
                    };
                    c.role = Role::Local;
                    Some(c.target)
                }
                ConnState::Established { .. } => None,
            },
            None => None,
        };
        match target {
            Some(t) => {
                self.by_session.entry(t).or_default().insert(*id);
                true
            }
            None => false,
        }
    }

    /// Records the node a pending connection's Incoming is forwarded to. Returns false if it is
    /// not pending (any more).
    pub(crate) fn forwarded_to(&self, id: &Uuid, remote: Remote) -> bool {
        match self.map.get_mut(id) {
            Some(mut c) if c.is_pending() => {
                c.role = Role::Initiator(Some(remote));
                true
            }
            _ => false,
        }
    }

    /// Records `target`'s answer to connection `id` (established on accept) and returns the
    /// connection as it was before; `None` if it is unknown, not `target`'s, or (with
    /// `pending_only`) already answered. One statement: read, change, copy out.
    pub(crate) fn answer(
        &self,
        now: Instant,
        id: &Uuid,
        target: Uuid,
        accept: bool,
        pending_only: bool,
    ) -> Option<Conn> {
        let before = match self.map.get_mut(id) {
            Some(mut c) if c.target == target && (!pending_only || c.is_pending()) => {
                let before = c.clone();
                if accept {
                    c.state = ConnState::Established { last: now };
                }
                before
            }
            _ => return None,
        };
        if before.is_pending() && accept {
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
        Some(before)
    }

    /// A Signal from `from` on established connection `id`: refreshes it and returns the other
    /// end and where the ends are. `None` if `from` is not an end of an established `id`.
    pub(crate) fn signal_from(&self, now: Instant, id: &Uuid, from: Uuid) -> Option<(Uuid, Role)> {
        match self.map.get_mut(id) {
            Some(mut c)
                if matches!(c.state, ConnState::Established { .. })
                    && (c.initiator == from || c.target == from) =>
            {
                c.state = ConnState::Established { last: now };
                let other = if c.initiator == from {
                    c.target
                } else {
                    c.initiator
                };
                Some((other, c.role.clone()))
            }
            _ => None,
        }
    }

    /// A Signal forwarded by another node between `from` and `to` on established connection
    /// `id`: refreshes it. False if no such connection joins them.
    pub(crate) fn forwarded_signal(&self, now: Instant, id: &Uuid, from: Uuid, to: Uuid) -> bool {
        match self.map.get_mut(id) {
            Some(mut c)
                if matches!(c.state, ConnState::Established { .. }) && c.joins(from, to) =>
            {
                c.state = ConnState::Established { last: now };
                true
            }
            _ => false,
        }
    }

    /// Pending connections whose deadline passed at `now` (at most one slice per call).
    pub(crate) fn timed_out(&self, now: Instant) -> Vec<(Uuid, Conn)> {
        let now_ms = self.ms(now);
        let mut out = Vec::new();
        for (at, id) in self.deadlines.take_due(now_ms, TICK_SLICE) {
            if let Some(c) = self.get(&id) {
                match c.state {
                    ConnState::Pending { deadline, .. } if self.ms(deadline) <= now_ms => {
                        out.push((id, c))
                    }
                    // Not yet (a deadline inside the same millisecond): look again.
                    ConnState::Pending { .. } => self.deadlines.schedule(at + 1, id),
                    ConnState::Established { .. } => {}
                }
            }
        }
        out
    }

    /// How many connections are pending right now.
    pub(crate) fn pending_count(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Looks at the connections due for a look (each every [`LOOK_EVERY_S`] seconds, never
    /// all at once): forgets the established ones for which `forget(conn, last Signal)` says
    /// so, and looks again later at the others. Returns how many it forgot.
    pub(crate) fn look_due(&self, now: Instant, forget: impl Fn(&Conn, Instant) -> bool) -> usize {
        let next = self.secs(now) + LOOK_EVERY_S;
        let mut forgotten = 0;
        self.looks.run_due(self.secs(now), |_, id| {
            let c = self.get(id)?;
            if let ConnState::Established { last } = c.state {
                if forget(&c, last) {
                    self.remove(id);
                    forgotten += 1;
                    return None;
                }
            }
            Some(next)
        });
        forgotten
    }
}
