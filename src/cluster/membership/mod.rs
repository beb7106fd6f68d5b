//! Cluster membership over the cluster port: SWIM with suspicion and piggybacked
//! dissemination, implemented by the `foca` crate and driven here without I/O.
//!
//! [`Membership`] wraps one `foca` instance. Callers feed it what arrived (a SWIM message from
//! another node, already authenticated by the cluster envelope) and the time, and take what it
//! decided: datagrams for other members (their payloads go into a [`super::wire::Body::Swim`]
//! envelope) and whether the view changed. Timers are kept here, ordered by due time, and run
//! by [`Membership::tick`]: nothing in this module sleeps, reads a clock or touches a socket, so
//! the router's simulated-time harness drives it like the rest of the router.
//!
//! - Identity ([`MemberId`]): node id (unique in the cluster), internal and public addresses,
//!   start time. A node that restarts with the same id wins over its previous life (later
//!   start); a node declared down by mistake renews its identity and rejoins by itself.
//! - Metadata ([`Meta`]): lifecycle state and session count travel as `foca` custom
//!   broadcasts, re-sent every `meta_period` and at once when the state changes (drain).
//! - Seeds: nodes from the Redis registry (announced to directly, their id is known) and
//!   `--peers` addresses (asked to announce themselves with a `Join`, since only their address
//!   is known). A node known to one member reaches the others with the next gossip round.

mod member;
mod merge;
mod meta;
#[cfg(test)]
mod tests;

pub use member::{Event, MemberError, MemberId, MemberView, Meta};
pub use merge::merge;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use foca::{AccumulatingRuntime, Foca, Header, OwnedNotification, State, Timer};
use rand_09::rngs::SmallRng;
use rand_09::SeedableRng;

use crate::cluster::table::{NodeInfo, NodeState};
use meta::{lock, Codec, MetaHandler, Metas};

/// Largest SWIM payload: leaves room for the envelope (two node ids, timestamps, MAC) inside
/// the largest cluster datagram.
pub const MAX_SWIM_PAYLOAD: usize = 1100;

/// Timings of the protocol.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Each member probes one other every period.
    pub probe_period: Duration,
    /// How long a direct probe waits before asking others to probe indirectly.
    pub probe_rtt: Duration,
    /// A suspect member that does not refute in this long is declared down.
    pub suspect_to_down: Duration,
    /// How often updates are gossiped to a few members.
    pub gossip_period: Duration,
    /// How often a member announces itself to a random member.
    pub announce_period: Duration,
    /// How often a member re-broadcasts its metadata.
    pub meta_period: Duration,
}

impl Settings {
    /// Settings for a LAN with probes every `probe_period`.
    pub fn lan(probe_period: Duration, meta_period: Duration) -> Self {
        Self {
            probe_period,
            probe_rtt: (probe_period * 3 / 10).max(Duration::from_millis(50)),
            suspect_to_down: probe_period * 3,
            gossip_period: Duration::from_millis(200).min(probe_period),
            announce_period: probe_period * 5,
            meta_period,
        }
    }

    fn foca(&self) -> foca::Config {
        let mut c = foca::Config::simple();
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.num_indirect_probes = NonZeroUsize::new(3).expect("non-zero");
        c.max_transmissions = NonZeroU8::new(6).expect("non-zero");
        c.suspect_to_down_after = self.suspect_to_down;
        c.remove_down_after = Duration::from_secs(600);
        c.max_packet_size = NonZeroUsize::new(MAX_SWIM_PAYLOAD).expect("non-zero");
        c.notify_down_members = true;
        c.periodic_announce = Some(foca::PeriodicParams {
            frequency: self.announce_period,
            num_members: NonZeroUsize::new(1).expect("non-zero"),
        });
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: self.announce_period * 3,
            num_members: NonZeroUsize::new(1).expect("non-zero"),
        });
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_period,
            num_members: NonZeroUsize::new(3).expect("non-zero"),
        });
        c
    }
}

/// A timer `foca` asked for, due at `at`.
struct Due {
    at: Instant,
    n: u64,
    timer: Timer<MemberId>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.n) == (other.at, other.n)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.n).cmp(&(other.at, other.n))
    }
}

type Swim = Foca<MemberId, Codec, SmallRng, MetaHandler>;

/// This node's membership state machine (see the module documentation).
pub struct Membership {
    foca: Swim,
    rt: AccumulatingRuntime<MemberId>,
    timers: BinaryHeap<Reverse<Due>>,
    timer_n: u64,
    metas: Metas,
    metas_changed: Arc<std::sync::atomic::AtomicBool>,
    settings: Settings,
    state: NodeState,
    sessions: u64,
    unpublished: bool,
    version: String,
    meta_seq: u64,
    next_meta: Option<Instant>,
    outbox: Vec<(MemberId, Vec<u8>)>,
    joins: Vec<SocketAddr>,
    events: Vec<Event>,
    changed: bool,
    left: bool,
}

impl Membership {
    /// A member that knows nobody yet. `seed` seeds its random choices (tests fix it).
    pub fn new(me: MemberId, settings: Settings, seed: u64) -> Self {
        let metas: Metas = Arc::default();
        let metas_changed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler = MetaHandler {
            metas: metas.clone(),
            changed: metas_changed.clone(),
        };
        let foca = Foca::with_custom_broadcast(
            me,
            settings.foca(),
            SmallRng::seed_from_u64(seed),
            Codec,
            handler,
        );
        Self {
            foca,
            rt: AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            timer_n: 0,
            metas,
            metas_changed,
            settings,
            state: NodeState::Active,
            sessions: 0,
            unpublished: false,
            version: env!("CARGO_PKG_VERSION").to_string(),
            meta_seq: 0,
            next_meta: None,
            outbox: Vec::new(),
            joins: Vec::new(),
            events: Vec::new(),
            changed: false,
            left: false,
        }
    }

    /// This node's current identity (it changes when the node rejoins after a false "down").
    pub fn me(&self) -> &MemberId {
        self.foca.identity()
    }

    /// Sessions this node held at the last tick.
    pub fn sessions(&self) -> u64 {
        self.sessions
    }

    /// Active members other than this node.
    pub fn active_count(&self) -> usize {
        self.foca.num_members()
    }

    /// Handles a SWIM message from node `from` (the authenticated envelope's sender).
    pub fn handle(&mut self, now: Instant, from: &str, data: &[u8]) -> Result<(), MemberError> {
        if self.left {
            return Ok(());
        }
        let mut peek = data;
        let header: Header<MemberId> = rmp_serde::from_read(&mut peek)
            .map_err(|e| MemberError::Foca(format!("header: {e}")))?;
        if header.src.id != from {
            return Err(MemberError::Spoofed);
        }
        let r = self.foca.handle_data(data, &mut self.rt);
        self.settle(now);
        r.map_err(|e| MemberError::Foca(e.to_string()))
    }

    /// Announces this node to `to` (a seed, or a node that asked with a `Join`).
    pub fn announce(&mut self, now: Instant, to: MemberId) {
        if self.left || to.id == self.me().id {
            return;
        }
        if let Err(e) = self.foca.announce(to, &mut self.rt) {
            tracing::debug!(error = %e, "announce failed");
        }
        self.settle(now);
    }

    /// Seeds from the Redis registry: announces to every node it lists that membership does
    /// not know as active (nor as a down member of the same life or a later one).
    pub fn seed(&mut self, now: Instant, nodes: &[NodeInfo]) {
        let known: HashMap<String, (bool, u64)> = self
            .foca
            .iter_membership_state()
            .map(|m| {
                (
                    m.id().id.clone(),
                    (m.state() != State::Down, m.id().started_ms),
                )
            })
            .collect();
        let me = self.me().id.clone();
        for n in nodes {
            if n.id == me {
                continue;
            }
            let skip = match known.get(&n.id) {
                Some((true, _)) => true,
                Some((false, started)) => *started >= n.started_ms,
                None => false,
            };
            if !skip {
                let to = MemberId {
                    id: n.id.clone(),
                    internal: n.internal,
                    public: n.public,
                    started_ms: n.started_ms,
                    bump: 0,
                };
                self.announce(now, to);
            }
        }
    }

    /// Asks the nodes at `addrs` (their ids unknown) to announce themselves to this node.
    pub fn join(&mut self, addrs: &[SocketAddr]) {
        if !self.left {
            let me = self.me().internal;
            self.joins.extend(addrs.iter().filter(|a| **a != me));
        }
    }

    /// Says whether Redis lacks some of this node's presence writes; a change is broadcast at
    /// once.
    pub fn set_unpublished(&mut self, now: Instant, unpublished: bool) {
        if self.unpublished != unpublished && !self.left {
            self.unpublished = unpublished;
            self.broadcast_meta(now);
            if let Err(e) = self.foca.gossip(&mut self.rt) {
                tracing::debug!(error = %e, "gossip failed");
            }
            self.settle(now);
        }
    }

    /// Sets this node's lifecycle state; a change is broadcast at once.
    pub fn set_state(&mut self, now: Instant, state: NodeState) {
        if self.state != state {
            self.state = state;
            self.broadcast_meta(now);
            if let Err(e) = self.foca.gossip(&mut self.rt) {
                tracing::debug!(error = %e, "gossip failed");
            }
            self.settle(now);
        }
    }

    /// Leaves the cluster: tells a few members this node is gone. Nothing is sent after this.
    pub fn leave(&mut self, now: Instant) {
        if self.left {
            return;
        }
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            tracing::debug!(error = %e, "leave failed");
        }
        self.settle(now);
        self.left = true;
        self.timers.clear();
    }

    /// Runs the timers due at `now` and re-broadcasts this node's metadata when it is time.
    pub fn tick(&mut self, now: Instant, sessions: u64) {
        if self.left {
            return;
        }
        while self.timers.peek().is_some_and(|Reverse(d)| d.at <= now) {
            let Some(Reverse(d)) = self.timers.pop() else {
                break;
            };
            if let Err(e) = self.foca.handle_timer(d.timer, &mut self.rt) {
                tracing::debug!(error = %e, "membership timer");
            }
            self.settle(now);
        }
        self.sessions = sessions;
        if self.next_meta.is_none_or(|t| now >= t) {
            self.broadcast_meta(now);
            self.settle(now);
        }
    }

    fn broadcast_meta(&mut self, now: Instant) {
        let sessions = self.sessions;
        self.meta_seq += 1;
        let me = self.me().clone();
        let meta = Meta {
            id: me.id,
            started_ms: me.started_ms,
            state: self.state,
            sessions,
            version: self.version.clone(),
            seq: self.meta_seq,
            unpublished: self.unpublished,
        };
        match rmp_serde::to_vec_named(&meta) {
            Ok(bytes) => {
                if let Err(e) = self.foca.add_broadcast(&bytes) {
                    tracing::debug!(error = %e, "metadata broadcast");
                }
            }
            Err(e) => tracing::error!(error = %e, "encoding metadata"),
        }
        self.next_meta = Some(now + self.settings.meta_period);
    }

    /// Takes what `foca` produced: sends, timers, notifications.
    fn settle(&mut self, now: Instant) {
        while let Some((to, data)) = self.rt.to_send() {
            self.outbox.push((to, data.to_vec()));
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            self.timer_n += 1;
            self.timers.push(Reverse(Due {
                at: now + after,
                n: self.timer_n,
                timer,
            }));
        }
        while let Some(n) = self.rt.to_notify() {
            match n {
                OwnedNotification::MemberUp(m) => self.events.push(Event::Up(m.id)),
                OwnedNotification::MemberDown(m) => self.events.push(Event::Down(m.id)),
                OwnedNotification::Rejoin(m) => {
                    tracing::warn!(bump = m.bump, "declared down by the cluster; rejoined")
                }
                OwnedNotification::Defunct => {
                    tracing::warn!("declared down by the cluster")
                }
                _ => {}
            }
            self.changed = true;
        }
        if self
            .metas_changed
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            self.changed = true;
        }
    }

    /// SWIM datagrams to send, with their destination member.
    pub fn take_outbox(&mut self) -> Vec<(MemberId, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    /// Addresses to send a `Join` to.
    pub fn take_joins(&mut self) -> Vec<SocketAddr> {
        std::mem::take(&mut self.joins)
    }

    /// Members that came up or went down since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Whether the view changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Every member known, down ones included, with its metadata for its current life.
    pub fn view(&self) -> Vec<MemberView> {
        let metas = lock(&self.metas);
        self.foca
            .iter_membership_state()
            .map(|m| MemberView {
                id: m.id().clone(),
                active: m.state() != State::Down,
                meta: metas
                    .get(&m.id().id)
                    .filter(|x| x.started_ms == m.id().started_ms)
                    .cloned(),
            })
            .collect()
    }
}
