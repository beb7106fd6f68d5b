//! Cluster membership over the cluster port: SWIM with suspicion and piggybacked
//! dissemination, implemented by the `foca` crate and driven here without I/O.
//!
//! [`Membership`] wraps one `foca` instance. Callers feed it what arrived (a SWIM message from
//! another node, already authenticated by the cluster envelope) and the time, and take what it
//! decided: datagrams for other members (their payloads go into a [`super::wire::Body::Swim`]
//! envelope) and whether the view changed. Timers are kept here, ordered by due time, and run
//! by [`Membership::tick`]: nothing in this file sleeps, reads a clock or touches a socket, so
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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use foca::{
    AccumulatingRuntime, BroadcastHandler, Foca, Header, Invalidates, OwnedNotification, State,
    Timer,
};
use rand_09::rngs::SmallRng;
use rand_09::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{NodeInfo, NodeState};

/// Largest SWIM payload: leaves room for the envelope (two node ids, timestamps, MAC) inside
/// the largest cluster datagram.
pub const MAX_SWIM_PAYLOAD: usize = 1100;
/// Most nodes whose metadata is remembered (far above any real cluster).
const MAX_METAS: usize = 4096;

/// A member's identity in the SWIM protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberId {
    /// Node id (the member's address in `foca`'s terms: unique in the cluster).
    pub id: String,
    /// Internal (cluster port) address.
    pub internal: SocketAddr,
    /// Client-facing address.
    pub public: SocketAddr,
    /// Process start, ms since the Unix epoch: a restarted node wins over its previous life.
    pub started_ms: u64,
    /// Bumped when the node rejoins after being declared down by mistake.
    #[serde(default)]
    pub bump: u16,
}

impl foca::Identity for MemberId {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> String {
        self.id.clone()
    }

    fn win_addr_conflict(&self, other: &Self) -> bool {
        (self.started_ms, self.bump) > (other.started_ms, other.bump)
    }
}

/// What a node says about itself besides its identity (a `foca` custom broadcast).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Node id.
    pub id: String,
    /// The life of the node this describes (see [`MemberId::started_ms`]).
    pub started_ms: u64,
    /// Lifecycle state.
    pub state: NodeState,
    /// Sessions held when sent.
    pub sessions: u64,
    /// Software version.
    pub version: String,
    /// Increases with every broadcast of this node: newer replaces older.
    pub seq: u64,
    /// Redis lacks some of this node's clients' presence (writes failed or stuck): a
    /// "nowhere" from Redis is to be checked with the nodes.
    #[serde(default)]
    pub unpublished: bool,
}

/// Why a SWIM message was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The message names another sender than the envelope that carried it.
    #[error("SWIM sender does not match the envelope")]
    Spoofed,
    /// `foca` refused it (malformed, from ourselves, stale…).
    #[error("SWIM message refused: {0}")]
    Foca(String),
}

/// A change seen in the membership, for metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A member became active.
    Up(String),
    /// A member was declared down (or left).
    Down(String),
}

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

/// `foca`'s wire format for headers and members: MessagePack with field names, so a newer
/// node may add fields that an older one ignores.
struct Codec;

/// A SWIM message that does not encode or decode.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CodecError(String);

impl foca::Codec<MemberId> for Codec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<MemberId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        rmp_serde::encode::write_named(&mut buf.writer(), header)
            .map_err(|e| CodecError(e.to_string()))
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<MemberId>, Self::Error> {
        rmp_serde::from_read(buf.reader()).map_err(|e| CodecError(e.to_string()))
    }

    fn encode_member(
        &mut self,
        member: &foca::Member<MemberId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        rmp_serde::encode::write_named(&mut buf.writer(), member)
            .map_err(|e| CodecError(e.to_string()))
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<foca::Member<MemberId>, Self::Error> {
        rmp_serde::from_read(buf.reader()).map_err(|e| CodecError(e.to_string()))
    }
}

/// Identifies a metadata broadcast: a newer one of the same node replaces it in the queue.
struct MetaKey {
    id: String,
    seq: u64,
}

impl Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.id == other.id && self.seq >= other.seq
    }
}

/// The newest metadata of every node, filled by the broadcast handler.
type Metas = Arc<Mutex<HashMap<String, Meta>>>;

fn lock(m: &Metas) -> std::sync::MutexGuard<'_, HashMap<String, Meta>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps the newest [`Meta`] of each node; tells `foca` to pass on only what is new.
struct MetaHandler {
    metas: Metas,
    changed: Arc<std::sync::atomic::AtomicBool>,
}

impl BroadcastHandler<MemberId> for MetaHandler {
    type Key = MetaKey;
    type Error = CodecError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&MemberId>,
    ) -> Result<Option<MetaKey>, CodecError> {
        let meta: Meta = rmp_serde::from_slice(data).map_err(|e| CodecError(e.to_string()))?;
        let mut metas = lock(&self.metas);
        let newer = metas
            .get(&meta.id)
            .is_none_or(|m| (meta.started_ms, meta.seq) > (m.started_ms, m.seq));
        if !newer || (metas.len() >= MAX_METAS && !metas.contains_key(&meta.id)) {
            return Ok(None);
        }
        let key = MetaKey {
            id: meta.id.clone(),
            seq: meta.seq,
        };
        metas.insert(meta.id.clone(), meta);
        // Our own broadcasts (no sender) change nothing in the view.
        if sender.is_some() {
            self.changed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Some(key))
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

/// One member as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// Its identity.
    pub id: MemberId,
    /// Alive or suspect (true), or declared down (false).
    pub active: bool,
    /// Its newest metadata for this life, if any arrived yet.
    pub meta: Option<Meta>,
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

/// The node table from the Redis registry and the membership view: a member declared down
/// hides a registry record of the same life (or an older one); an active member is listed even
/// without a registry record (Redis may be down), with its metadata; a node only in the
/// registry is listed as the registry says. Draining wins over active for the same life.
pub fn merge(redis: &[NodeInfo], view: &[MemberView]) -> Vec<NodeInfo> {
    let mut out: HashMap<String, NodeInfo> = HashMap::with_capacity(redis.len() + view.len());
    for r in redis {
        out.insert(r.id.clone(), r.clone());
    }
    for m in view {
        let id = &m.id;
        let rec = out.get(&id.id);
        // A registry record of a later life than the member we know: the node restarted and
        // membership has not caught up yet; the registry is right.
        if rec.is_some_and(|r| r.started_ms > id.started_ms) {
            continue;
        }
        if !m.active {
            out.remove(&id.id);
            continue;
        }
        let same_life = rec.filter(|r| r.started_ms == id.started_ms);
        let draining = m
            .meta
            .as_ref()
            .is_some_and(|x| x.state == NodeState::Draining)
            || same_life.is_some_and(|r| r.state == NodeState::Draining);
        let info = NodeInfo {
            id: id.id.clone(),
            public: id.public,
            internal: id.internal,
            state: if draining {
                NodeState::Draining
            } else {
                NodeState::Active
            },
            version: m
                .meta
                .as_ref()
                .map(|x| x.version.clone())
                .or_else(|| same_life.map(|r| r.version.clone()))
                .unwrap_or_default(),
            sessions: m
                .meta
                .as_ref()
                .map(|x| x.sessions)
                .or_else(|| same_life.map(|r| r.sessions))
                .unwrap_or(0),
            started_ms: id.started_ms,
            expires_ms: same_life.map_or(0, |r| r.expires_ms),
        };
        out.insert(id.id.clone(), info);
    }
    let mut v: Vec<NodeInfo> = out.into_values().collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> MemberId {
        MemberId {
            id: format!("n{n}"),
            internal: SocketAddr::from(([10, 0, 0, n], 7401)),
            public: SocketAddr::from(([198, 51, 100, n], 7400)),
            started_ms: 1000,
            bump: 0,
        }
    }

    fn settings() -> Settings {
        Settings::lan(Duration::from_millis(500), Duration::from_secs(2))
    }

    /// Members exchanging datagrams by hand, with one clock. `drop` loses everything sent to
    /// the members it names.
    struct Net {
        m: Vec<Membership>,
        now: Instant,
        down: Vec<usize>,
    }

    impl Net {
        fn new(n: u8) -> Self {
            Self {
                m: (1..=n)
                    .map(|i| Membership::new(id(i), settings(), u64::from(i)))
                    .collect(),
                now: Instant::now(),
                down: Vec::new(),
            }
        }

        fn index(&self, node: &str) -> usize {
            self.m.iter().position(|m| m.me().id == node).unwrap()
        }

        /// Delivers until nothing is in flight.
        fn deliver(&mut self) {
            loop {
                let mut sent = Vec::new();
                for (i, m) in self.m.iter_mut().enumerate() {
                    for (to, data) in m.take_outbox() {
                        sent.push((i, to, data));
                    }
                }
                if sent.is_empty() {
                    return;
                }
                for (from, to, data) in sent {
                    let j = self.index(&to.id);
                    if self.down.contains(&j) || self.down.contains(&from) {
                        continue;
                    }
                    let from_id = self.m[from].me().id.clone();
                    let now = self.now;
                    let _ = self.m[j].handle(now, &from_id, &data);
                }
            }
        }

        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(25);
                for (i, m) in self.m.iter_mut().enumerate() {
                    if !self.down.contains(&i) {
                        m.tick(self.now, i as u64);
                    }
                }
                self.deliver();
            }
        }

        fn active(&self, i: usize) -> Vec<String> {
            let mut v: Vec<String> = self.m[i]
                .view()
                .into_iter()
                .filter(|v| v.active)
                .map(|v| v.id.id)
                .collect();
            v.sort();
            v
        }
    }

    #[test]
    fn a_node_known_to_one_member_is_known_to_all_within_a_round() {
        let mut net = Net::new(4);
        // n1..n3 form a cluster.
        for i in 1..3 {
            let to = net.m[0].me().clone();
            let now = net.now;
            net.m[i].announce(now, to);
        }
        net.deliver();
        net.run(Duration::from_secs(1));
        assert_eq!(net.active(0), ["n2", "n3"]);
        assert_eq!(net.active(2), ["n1", "n2"]);
        // n4 announces to n2 only: within one gossip round everyone knows it.
        let to = net.m[1].me().clone();
        let now = net.now;
        net.m[3].announce(now, to);
        net.deliver();
        net.run(settings().gossip_period);
        assert_eq!(net.active(0), ["n2", "n3", "n4"]);
        assert_eq!(net.active(2), ["n1", "n2", "n4"]);
        assert_eq!(net.active(3), ["n1", "n2", "n3"]);
        // Metadata travels too.
        net.run(Duration::from_secs(2));
        let v = net.m[0].view();
        let n4 = v.iter().find(|v| v.id.id == "n4").unwrap();
        assert_eq!(n4.meta.as_ref().map(|m| m.sessions), Some(3));
    }

    #[test]
    fn a_silent_member_is_suspected_then_declared_down_and_a_leaving_one_at_once() {
        let mut net = Net::new(3);
        for i in 1..3 {
            let to = net.m[0].me().clone();
            let now = net.now;
            net.m[i].announce(now, to);
        }
        net.deliver();
        net.run(Duration::from_secs(1));
        assert_eq!(net.active(0), ["n2", "n3"]);
        // n3 goes silent (killed): down within probe periods + suspicion.
        net.down.push(2);
        let s = settings();
        net.run(s.probe_period * 4 + s.suspect_to_down);
        assert_eq!(net.active(0), ["n2"]);
        assert_eq!(net.active(1), ["n1"]);
        // n2 leaves: n1 knows at once.
        let now = net.now;
        net.m[1].leave(now);
        net.deliver();
        assert_eq!(net.active(0), Vec::<String>::new());
    }

    #[test]
    fn draining_and_unpublished_writes_are_broadcast_at_once() {
        let mut net = Net::new(2);
        let to = net.m[0].me().clone();
        let now = net.now;
        net.m[1].announce(now, to);
        net.deliver();
        net.run(Duration::from_millis(100));
        let now = net.now;
        net.m[1].set_state(now, NodeState::Draining);
        net.deliver();
        let v = net.m[0].view();
        assert_eq!(
            v[0].meta.as_ref().map(|m| m.state),
            Some(NodeState::Draining)
        );
        assert_eq!(merge(&[], &v)[0].state, NodeState::Draining);
        // So is "Redis lacks some of my presence writes", and its end.
        for behind in [true, false] {
            let now = net.now;
            net.m[1].set_unpublished(now, behind);
            net.deliver();
            let v = net.m[0].view();
            assert_eq!(v[0].meta.as_ref().map(|m| m.unpublished), Some(behind));
        }
    }

    #[test]
    fn spoofed_sender_is_refused() {
        let mut a = Membership::new(id(1), settings(), 1);
        let mut b = Membership::new(id(2), settings(), 2);
        let now = Instant::now();
        b.announce(now, id(1));
        let (_, data) = b.take_outbox().pop().unwrap();
        assert!(matches!(
            a.handle(now, "n3", &data),
            Err(MemberError::Spoofed)
        ));
        assert!(a.handle(now, "n2", &data).is_ok());
        assert!(a.handle(now, "n2", b"garbage").is_err());
    }

    #[test]
    fn merge_rules() {
        let rec = |n: u8, started: u64, state| NodeInfo {
            id: format!("n{n}"),
            public: id(n).public,
            internal: id(n).internal,
            state,
            version: "r".into(),
            sessions: 7,
            started_ms: started,
            expires_ms: 99,
        };
        let view = |n: u8, started: u64, active| MemberView {
            id: MemberId {
                started_ms: started,
                ..id(n)
            },
            active,
            meta: None,
        };
        let redis = [
            rec(1, 1000, NodeState::Active),
            rec(2, 1000, NodeState::Draining),
            rec(3, 2000, NodeState::Active),
            rec(4, 1000, NodeState::Active),
        ];
        let members = [
            view(2, 1000, true),  // draining in the registry: stays draining
            view(3, 1000, false), // down, but the registry has a later life
            view(4, 1000, false), // down: hidden
            view(5, 1000, true),  // only in membership
        ];
        let t = merge(&redis, &members);
        let ids: Vec<(&str, NodeState)> = t.iter().map(|n| (n.id.as_str(), n.state)).collect();
        assert_eq!(
            ids,
            [
                ("n1", NodeState::Active),
                ("n2", NodeState::Draining),
                ("n3", NodeState::Active),
                ("n5", NodeState::Active)
            ]
        );
        assert_eq!(t[3].internal, id(5).internal);
    }
}
