//! Routing decisions, apart from socket I/O.
//!
//! [`Router::handle`] takes one datagram, its source and the time, updates the node's state and
//! appends what must happen to an [`Outbox`]: datagrams for clients, datagrams for other nodes,
//! and [`Job`]s that need cluster state this node does not have at hand (a Redis lookup, a
//! newer node table). It never awaits, never blocks on I/O and never holds a map guard past the
//! statement that took it, so the socket loops call it inline for every packet. Jobs run
//! elsewhere ([`crate::cluster::jobs`]) and come back through the `complete_*` methods.
//! Time-driven work (retransmissions, timeouts, expiry) lives in [`Router::tick`] and
//! [`Router::sweep`], called by one timer task.
//!
//! State:
//! - `sessions`: who is online here (see `session`).
//! - `conns`: connections, pending until the target answers; either end may be on another
//!   node (`remote`), never both.
//! - `pushes`: server pushes waiting for their `PushAck`.
//! - `fwd`: node-to-node requests waiting for the other node's reply, retransmitted until
//!   then: a forwarded push keeps its delivery guarantee across the hop.
//! - `hellos`: recent `Register` answers by (source, request id), so a retransmitted Register
//!   gets the same UUID instead of a second session.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::RngCore;
use sigrouter_proto::{
    self as proto, Ack, Addr, Answer, ConnectFailed, Connected, ErrorCode, ErrorMsg, FailReason,
    HeartbeatAck, Incoming, Message, Migrate, Payload, QueryResult, Registered, Secret, SignalPush,
    MIN_HELLO_LEN,
};
use uuid::Uuid;

use crate::cluster::wire::{Body, Status};
use crate::cluster::{Cluster, NodeInfo, NodeState, PresenceOp};
use crate::config::Config;
use crate::metrics::{DropReason, Metrics};
use crate::session::{Remembered, SenderView, Sessions};

/// Requests whose id is this far below the newest one seen are stale replays: dropped.
const REPLAY_WINDOW: u64 = 1024;
/// An established connection with no Signal for this long is forgotten.
const CONN_IDLE: Duration = Duration::from_secs(600);
/// First retransmission of a node-to-node request.
const FWD_RTO: Duration = Duration::from_millis(100);
/// A node-to-node request unanswered for this long fails (retry-later for the client).
const FWD_DEADLINE: Duration = Duration::from_secs(2);

/// What the directory said about a resuming client: `Ok(Some((verifier, node)))`, `Ok(None)`
/// when it knows nothing, `Err(())` when it could not be read.
pub type ResumeLookup = Result<Option<([u8; 32], Arc<str>)>, ()>;

/// One datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    /// The encoded datagram.
    pub bytes: Vec<u8>,
}

/// Work that needs cluster state not at hand: run off the socket loop, with deadlines.
#[derive(Clone, Debug)]
pub enum Job {
    /// Find the node holding `target` and forward the Incoming of connection `conn`.
    Connect {
        /// The connection (pending on this node).
        conn: Uuid,
        /// The target client.
        target: Uuid,
        /// Skip the presence cache (a forward just found the client gone).
        fresh: bool,
        /// The Incoming to forward.
        body: Body,
    },
    /// Validate a Resume for a session this node does not hold.
    Resume {
        /// Source of the Resume.
        src: SocketAddr,
        /// Its size (bounds the answer).
        req_len: usize,
        /// The request.
        msg: proto::Resume,
    },
    /// Answer a Query naming clients not held here.
    Query {
        /// The asking session.
        uuid: Uuid,
        /// Its request id.
        rid: u64,
        /// The clients asked about.
        uuids: Vec<Uuid>,
    },
}

/// What one call into the router decided.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Datagrams for clients (sent from the client port).
    pub client: Vec<Transmit>,
    /// Datagrams for other nodes (sent from the cluster port).
    pub cluster: Vec<Transmit>,
    /// Jobs to run off the socket loop.
    pub jobs: Vec<Job>,
}

impl Outbox {
    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.client.is_empty() && self.cluster.is_empty() && self.jobs.is_empty()
    }
}

#[derive(Clone, Copy, Debug)]
enum ConnState {
    /// Waiting for Accept/Reject until `deadline`; `push` is the local Incoming push (0 when
    /// the target is on another node).
    Pending { deadline: Instant, push: u64 },
    /// Accepted; Signals flow until either side goes away.
    Established { last: Instant },
}

/// The far end of a connection that spans two nodes.
#[derive(Clone, Debug)]
struct Remote {
    node: Arc<str>,
    addr: SocketAddr,
}

#[derive(Clone, Debug)]
struct Conn {
    initiator: Uuid,
    target: Uuid,
    /// Request id of the initiator's Connect (on the initiator's node).
    initiator_rid: u64,
    started: Instant,
    state: ConnState,
    /// The node holding the other end, if not this one.
    remote: Option<Remote>,
    /// This node holds the target and the initiator is on `remote`.
    target_side: bool,
}

#[derive(Clone, Debug)]
struct PendingPush {
    bytes: Arc<[u8]>,
    next_at: Instant,
    rto: Duration,
    deadline: Instant,
    /// A Migrate: once acknowledged, the client is on its way elsewhere.
    migrate: bool,
}

/// What to do when a node-to-node request is answered (or not).
#[derive(Clone, Debug)]
enum Then {
    /// Answer the client's request `rid` with Ack (or an error).
    AckClient { uuid: Uuid, rid: u64 },
    /// A forwarded Incoming: on NotHere look the target up afresh (once: `retried`).
    Incoming {
        conn: Uuid,
        target: Uuid,
        body: Body,
        retried: bool,
    },
    /// Nothing.
    Nothing,
}

#[derive(Clone, Debug)]
struct PendingFwd {
    bytes: Arc<[u8]>,
    to: SocketAddr,
    next_at: Instant,
    rto: Duration,
    deadline: Instant,
    then: Then,
}

/// The node's routing state and decisions. Shared by every socket loop (`Arc<Router>`).
pub struct Router {
    heartbeat: Duration,
    session_ttl: Duration,
    connect_timeout: Duration,
    push_initial_rto: Duration,
    push_deadline: Duration,
    dedup_window: Duration,
    max_sessions: usize,
    sessions: Sessions,
    conns: DashMap<Uuid, Conn>,
    /// Ids of connections that were pending when inserted (cleaned lazily by `tick`), so the
    /// 25 ms tick does not walk every established connection.
    pending: DashMap<Uuid, ()>,
    pushes: DashMap<(Uuid, u64), PendingPush>,
    fwd: DashMap<u64, PendingFwd>,
    hellos: DashMap<(SocketAddr, u64), (Uuid, Instant)>,
    register_limiter: DefaultKeyedRateLimiter<IpAddr>,
    session_limiter: DefaultKeyedRateLimiter<Uuid>,
    draining: AtomicBool,
    cluster: Option<Arc<Cluster>>,
    metrics: Metrics,
}

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v.max(1)).unwrap_or(NonZeroU32::MIN)
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Router {
    /// Builds an empty router. `cluster` is `None` in the embedded single-node mode.
    pub fn new(cfg: &Config, metrics: Metrics, cluster: Option<Arc<Cluster>>) -> Self {
        metrics.max_sessions.set(cfg.max_sessions as f64);
        Self {
            heartbeat: cfg.heartbeat,
            session_ttl: cfg.session_ttl,
            connect_timeout: cfg.connect_timeout,
            push_initial_rto: cfg.push_initial_rto,
            push_deadline: cfg.push_deadline,
            dedup_window: cfg.dedup_window,
            max_sessions: cfg.max_sessions,
            sessions: Sessions::default(),
            conns: DashMap::new(),
            pending: DashMap::new(),
            pushes: DashMap::new(),
            fwd: DashMap::new(),
            hellos: DashMap::new(),
            register_limiter: RateLimiter::dashmap(
                Quota::per_second(nz(cfg.register_rate)).allow_burst(nz(cfg.register_burst)),
            ),
            session_limiter: RateLimiter::dashmap(
                Quota::per_second(nz(cfg.session_rate)).allow_burst(nz(cfg.session_burst)),
            ),
            draining: AtomicBool::new(false),
            cluster,
            metrics,
        }
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The cluster state, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Number of sessions held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Whether `uuid` is online on this node.
    pub fn is_local(&self, uuid: &Uuid) -> bool {
        self.sessions.contains(uuid)
    }

    /// Every session held, with its Resume verifier (for presence re-publication).
    pub fn presence_snapshot(&self) -> Vec<(Uuid, [u8; 32])> {
        self.sessions.verifiers()
    }

    /// Work that another node or client still waits on: pending connections and unanswered
    /// node-to-node requests. A draining node stays up until this is zero (or its deadline).
    pub fn in_flight(&self) -> usize {
        let pending: Vec<Uuid> = self.pending.iter().map(|e| *e.key()).collect();
        let pending = pending
            .iter()
            .filter(|id| {
                self.conns
                    .get(*id)
                    .is_some_and(|c| matches!(c.state, ConnState::Pending { .. }))
            })
            .count();
        pending + self.fwd.len()
    }

    /// Stops taking new sessions (Register answers `Draining`).
    pub fn set_draining(&self, v: bool) {
        self.draining.store(v, Ordering::Relaxed);
    }

    fn publish(&self, op: PresenceOp) {
        if let Some(c) = &self.cluster {
            c.publish(op);
        }
    }

    /// Handles one client datagram from `src` received at `now`.
    pub fn handle(&self, now: Instant, src: SocketAddr, buf: &[u8], out: &mut Outbox) {
        self.metrics.rx_datagrams.increment(1);
        if proto::is_stun(buf) {
            match crate::stun::answer(buf, src) {
                Ok(bytes) => {
                    self.metrics.stun_answered.increment(1);
                    out.client.push(Transmit { to: src, bytes });
                }
                Err(_) => self.metrics.drop(DropReason::Stun),
            }
            return;
        }
        let msg = match proto::decode(buf) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.drop(DropReason::Decode(e));
                return;
            }
        };
        let ty = msg.ty();
        if (ty as u8) >= 0x80 {
            self.metrics.drop(DropReason::WrongDirection);
            return;
        }
        self.metrics.request(ty);
        match msg {
            Message::Register(m) => self.register(now, src, buf.len(), m, out),
            Message::Resume(m) => self.resume(now, src, buf.len(), m, out),
            other => self.authenticated(now, src, buf, other, out),
        }
    }

    /// Sends an unauthenticated answer, but only if it is no larger than the request.
    fn reply_bounded(&self, to: SocketAddr, req_len: usize, msg: &Message, out: &mut Outbox) {
        match proto::encode(msg, None) {
            Ok(bytes) if bytes.len() <= req_len => out.client.push(Transmit { to, bytes }),
            Ok(_) => self.metrics.drop(DropReason::Amplification),
            Err(e) => tracing::error!(error = %e, ty = ?msg.ty(), "encoding an answer failed"),
        }
    }

    fn error(&self, to: SocketAddr, req_len: usize, rid: u64, code: ErrorCode, out: &mut Outbox) {
        self.reply_bounded(to, req_len, &Message::Error(ErrorMsg { rid, code }), out);
    }

    /// Per-IP limit for Register/Resume. Over the limit: a small Error (never larger than the
    /// request), so honest clients back off and floods gain nothing.
    fn hello_allowed(&self, src: SocketAddr, req_len: usize, rid: u64, out: &mut Outbox) -> bool {
        if req_len < MIN_HELLO_LEN {
            self.metrics.drop(DropReason::Unpadded);
            return false;
        }
        if self.register_limiter.check_key(&src.ip()).is_err() {
            self.metrics.rate_limited_source.increment(1);
            self.error(src, req_len, rid, ErrorCode::RateLimited, out);
            return false;
        }
        true
    }

    fn registered(&self, rid: u64, uuid: Uuid, secret: Secret, src: SocketAddr) -> Message {
        Message::Registered(Registered {
            rid,
            uuid,
            secret,
            observed: Addr(src),
            heartbeat_ms: millis(self.heartbeat),
            ttl_ms: millis(self.session_ttl),
        })
    }

    fn register(
        &self,
        now: Instant,
        src: SocketAddr,
        req_len: usize,
        m: proto::Register,
        out: &mut Outbox,
    ) {
        if req_len < MIN_HELLO_LEN {
            self.metrics.drop(DropReason::Unpadded);
            return;
        }
        // A retransmitted Register gets the session it already created.
        let known = self.hellos.get(&(src, m.rid)).map(|e| e.0);
        if let Some(uuid) = known {
            if let Some(secret) = self.sessions.secret(&uuid) {
                self.metrics.duplicates.increment(1);
                let msg = self.registered(m.rid, uuid, secret, src);
                self.reply_bounded(src, req_len, &msg, out);
                return;
            }
        }
        if !self.hello_allowed(src, req_len, m.rid, out) {
            return;
        }
        if self.draining.load(Ordering::Relaxed) {
            self.error(src, req_len, m.rid, ErrorCode::Draining, out);
            return;
        }
        if self.sessions.len() >= self.max_sessions {
            self.metrics.capacity_refused.increment(1);
            self.error(src, req_len, m.rid, ErrorCode::Capacity, out);
            return;
        }
        let uuid = Uuid::new_v4();
        let mut secret = [0u8; proto::SECRET_LEN];
        rand::thread_rng().fill_bytes(&mut secret);
        let secret = Secret(secret);
        self.sessions.insert(uuid, secret, src, m.local, m.rid, now);
        self.hellos.insert((src, m.rid), (uuid, now));
        self.publish(PresenceOp::Put(uuid, secret.verifier()));
        self.metrics.registered.increment(1);
        self.metrics.sessions.set(self.sessions.len() as f64);
        let msg = self.registered(m.rid, uuid, secret, src);
        self.reply_bounded(src, req_len, &msg, out);
    }

    fn resume(
        &self,
        now: Instant,
        src: SocketAddr,
        req_len: usize,
        m: proto::Resume,
        out: &mut Outbox,
    ) {
        if !self.hello_allowed(src, req_len, m.rid, out) {
            return;
        }
        match self.sessions.secret(&m.uuid) {
            Some(s) if s.ct_eq(&m.secret) => {
                if self.draining.load(Ordering::Relaxed) {
                    // Still here while draining: the client was told to move; keep it moving.
                    self.error(src, req_len, m.rid, ErrorCode::Draining, out);
                    return;
                }
                if !self.sessions.resume(&m.uuid, src, m.local, m.rid, now) {
                    self.error(src, req_len, m.rid, ErrorCode::Unauthorized, out);
                    return;
                }
                self.metrics.resumed.increment(1);
                let msg = self.registered(m.rid, m.uuid, m.secret, src);
                self.reply_bounded(src, req_len, &msg, out);
            }
            Some(_) => self.error(src, req_len, m.rid, ErrorCode::Unauthorized, out),
            None if self.draining.load(Ordering::Relaxed) => {
                self.error(src, req_len, m.rid, ErrorCode::Draining, out);
            }
            None if self.cluster.is_some() => {
                // Held elsewhere (or was): the presence directory can vouch for the secret.
                out.jobs.push(Job::Resume {
                    src,
                    req_len,
                    msg: m,
                });
            }
            // Single-node mode cannot check the secret of a session it never held (the node
            // restarted, or the session expired): the client registers anew.
            None => self.error(src, req_len, m.rid, ErrorCode::Unauthorized, out),
        }
    }

    /// Completes a Resume job: `verifier` is what the directory holds for the UUID (`None`:
    /// unknown), `old` the node that held it. `Err(())` means the directory could not be read.
    pub fn complete_resume(
        &self,
        now: Instant,
        src: SocketAddr,
        req_len: usize,
        m: proto::Resume,
        found: ResumeLookup,
        out: &mut Outbox,
    ) {
        let (verifier, old) = match found {
            Ok(Some(v)) => v,
            Ok(None) => return self.error(src, req_len, m.rid, ErrorCode::Unauthorized, out),
            Err(()) => return self.error(src, req_len, m.rid, ErrorCode::RetryLater, out),
        };
        let ok: bool =
            subtle::ConstantTimeEq::ct_eq(&m.secret.verifier()[..], &verifier[..]).into();
        if !ok {
            return self.error(src, req_len, m.rid, ErrorCode::Unauthorized, out);
        }
        if self.sessions.len() >= self.max_sessions {
            self.metrics.capacity_refused.increment(1);
            return self.error(src, req_len, m.rid, ErrorCode::Capacity, out);
        }
        self.sessions
            .insert(m.uuid, m.secret, src, m.local.clone(), m.rid, now);
        self.publish(PresenceOp::Put(m.uuid, verifier));
        self.metrics.resumed.increment(1);
        self.metrics.sessions.set(self.sessions.len() as f64);
        if let Some(c) = &self.cluster {
            c.cache_presence(m.uuid, Some(c.id.clone()), now);
            // Tell the old node to let go, so its drain finishes early and it stops answering
            // for this client.
            if *old != *c.id {
                if let Some(node) = c.node(&old) {
                    self.forward(
                        now,
                        c,
                        &node.id,
                        node.internal,
                        Body::Moved { uuid: m.uuid },
                        Then::Nothing,
                        out,
                    );
                }
            }
        }
        let msg = self.registered(m.rid, m.uuid, m.secret, src);
        self.reply_bounded(src, req_len, &msg, out);
    }

    fn authenticated(
        &self,
        now: Instant,
        src: SocketAddr,
        buf: &[u8],
        msg: Message,
        out: &mut Outbox,
    ) {
        let Some(uuid) = msg.sender() else {
            self.metrics.drop(DropReason::WrongDirection);
            return;
        };
        let rid = msg.rid().unwrap_or(0);
        let Some(secret) = self.sessions.secret(&uuid) else {
            // Not held here: tell the client to Resume. The Error is smaller than any
            // authenticated request (those carry a 16-byte MAC), so this cannot amplify.
            if !matches!(msg, Message::PushAck(_)) {
                self.error(src, buf.len(), rid, ErrorCode::UnknownSession, out);
            }
            return;
        };
        if !proto::verify_mac(buf, &secret) {
            self.metrics.drop(DropReason::BadMac);
            return;
        }
        if let Message::PushAck(a) = msg {
            self.sessions.keepalive(&uuid, now);
            let acked = self.pushes.remove(&(uuid, a.push));
            if acked.is_some_and(|(_, p)| p.migrate) && self.draining.load(Ordering::Relaxed) {
                // The client is moving: let go now, so connects waiting for it here are
                // handed back at once (retry-later) instead of waiting on a client that will
                // answer elsewhere. The new node re-publishes its presence.
                self.sessions.remove(&uuid);
                self.metrics.sessions.set(self.sessions.len() as f64);
            }
            return;
        }
        if self.session_limiter.check_key(&uuid).is_err() {
            self.metrics.rate_limited.increment(1);
            self.error(src, buf.len(), rid, ErrorCode::RateLimited, out);
            return;
        }
        let Some(view) = self.sessions.touch(&uuid, src, rid, now) else {
            return;
        };
        if view.rebound {
            self.metrics.rebinds.increment(1);
        }
        if let Some(rem) = view.remembered.clone() {
            self.metrics.duplicates.increment(1);
            if let Remembered::Answer(bytes) = rem {
                // Answer a retransmission where the session lives; to a new source only when that
                // cannot amplify (a replay from a spoofed address gains nothing).
                let to = if src == view.addr || bytes.len() <= buf.len() {
                    src
                } else {
                    view.addr
                };
                out.client.push(Transmit {
                    to,
                    bytes: bytes.to_vec(),
                });
            }
            // Pending: the answer comes when the outcome is known (a retransmission of a
            // forwarded request is covered by the node-to-node retransmission).
            return;
        }
        if view.stale(rid, REPLAY_WINDOW) {
            self.metrics.drop(DropReason::BadMac);
            return;
        }
        match msg {
            Message::Heartbeat(_) => {
                let ack = Message::HeartbeatAck(HeartbeatAck {
                    rid,
                    observed: Addr(view.addr),
                });
                self.send(&view, ack, out);
            }
            Message::Query(q) => {
                self.metrics.routed.increment(1);
                self.query(now, uuid, &view, q, out);
            }
            Message::Connect(c) => {
                self.metrics.routed.increment(1);
                self.connect(now, uuid, &view, c, out);
            }
            Message::Accept(a) => {
                self.metrics.routed.increment(1);
                self.answer_incoming(now, uuid, &view, a, true, out);
            }
            Message::Reject(a) => {
                self.metrics.routed.increment(1);
                self.answer_incoming(now, uuid, &view, a, false, out);
            }
            Message::Signal(s) => {
                self.metrics.routed.increment(1);
                self.signal(now, uuid, &view, s, out);
            }
            Message::Bye(_) => {
                self.send(&view, Message::Ack(Ack { rid }), out);
                if self.sessions.remove(&uuid) {
                    self.publish(PresenceOp::Del(uuid));
                }
                self.metrics.sessions.set(self.sessions.len() as f64);
            }
            _ => self.metrics.drop(DropReason::WrongDirection),
        }
    }

    /// Encodes an answer for the sender, MAC'd with its secret, and sends it to its address.
    fn send(&self, view: &SenderView, msg: Message, out: &mut Outbox) {
        if let Some(bytes) = self.encode_for(view, &msg) {
            out.client.push(Transmit {
                to: view.addr,
                bytes,
            });
        }
    }

    fn encode_for(&self, view: &SenderView, msg: &Message) -> Option<Vec<u8>> {
        proto::encode(msg, Some(&view.secret))
            .map_err(|e| tracing::error!(error = %e, ty = ?msg.ty(), "encoding an answer failed"))
            .ok()
    }

    /// Sends an answer and remembers it for retransmissions of the same request id. (Only
    /// answers that are remembered pay for the shared copy; heartbeat acks do not.)
    fn answer(
        &self,
        now: Instant,
        uuid: Uuid,
        view: &SenderView,
        rid: u64,
        msg: Message,
        out: &mut Outbox,
    ) {
        if let Some(bytes) = self.encode_for(view, &msg) {
            let shared: Arc<[u8]> = bytes.as_slice().into();
            self.sessions
                .remember(&uuid, rid, Remembered::Answer(shared), now);
            out.client.push(Transmit {
                to: view.addr,
                bytes,
            });
        }
    }

    /// Acknowledges request `rid` (remembered, like every answer with an effect).
    fn ack(&self, now: Instant, uuid: Uuid, view: &SenderView, rid: u64, out: &mut Outbox) {
        self.answer(now, uuid, view, rid, Message::Ack(Ack { rid }), out);
    }

    /// Answers session `uuid`'s request `rid` (looked up afresh: the answer may come long after
    /// the request, from a job or another node).
    fn answer_later(&self, now: Instant, uuid: Uuid, rid: u64, msg: Message, out: &mut Outbox) {
        if let Some(p) = self.sessions.peer(&uuid) {
            let view = SenderView::to_peer(p.secret, p.addr);
            self.answer(now, uuid, &view, rid, msg, out);
        }
    }

    /// An Error for an authenticated request (not remembered: the client may retry it).
    fn error_to(&self, view: &SenderView, rid: u64, code: ErrorCode, out: &mut Outbox) {
        self.reply_bounded(
            view.addr,
            usize::MAX,
            &Message::Error(ErrorMsg { rid, code }),
            out,
        );
    }

    fn query(
        &self,
        now: Instant,
        uuid: Uuid,
        view: &SenderView,
        q: proto::Query,
        out: &mut Outbox,
    ) {
        let mut online = Vec::with_capacity(q.uuids.len());
        let mut unknown = false;
        for u in &q.uuids {
            if self.sessions.contains(u) {
                online.push(true);
                continue;
            }
            match &self.cluster {
                None => online.push(false),
                Some(c) => match c.cached_presence(u, now) {
                    Some(Some(node)) => online.push(*node != *c.id && c.node(&node).is_some()),
                    Some(None) => online.push(false),
                    None => {
                        unknown = true;
                        break;
                    }
                },
            }
        }
        if unknown {
            out.jobs.push(Job::Query {
                uuid,
                rid: q.rid,
                uuids: q.uuids,
            });
            return;
        }
        self.send(
            view,
            Message::QueryResult(QueryResult { rid: q.rid, online }),
            out,
        );
    }

    /// Completes a Query job: `online` per asked UUID, or `None` if the directory failed.
    pub fn complete_query(
        &self,
        uuid: Uuid,
        rid: u64,
        online: Option<Vec<bool>>,
        out: &mut Outbox,
    ) {
        let Some(p) = self.sessions.peer(&uuid) else {
            return;
        };
        let view = SenderView::to_peer(p.secret, p.addr);
        match online {
            Some(online) => {
                self.send(
                    &view,
                    Message::QueryResult(QueryResult { rid, online }),
                    out,
                );
            }
            None => self.error_to(&view, rid, ErrorCode::RetryLater, out),
        }
    }

    /// Answers a Connect that failed, remembering the outcome.
    fn connect_failed(
        &self,
        now: Instant,
        uuid: Uuid,
        rid: u64,
        reason: FailReason,
        out: &mut Outbox,
    ) {
        self.metrics.outcome(Some(reason));
        let msg = Message::ConnectFailed(ConnectFailed {
            rid,
            reason,
            payload: Payload::new(),
        });
        self.answer_later(now, uuid, rid, msg, out);
    }

    fn connect(
        &self,
        now: Instant,
        uuid: Uuid,
        view: &SenderView,
        c: proto::Connect,
        out: &mut Outbox,
    ) {
        if c.to == uuid {
            self.error_to(view, c.rid, ErrorCode::BadRequest, out);
            return;
        }
        let connection = Uuid::new_v4();
        // Local first: a target on this node never touches Redis or the network.
        if let Some((push, target)) = self.sessions.next_push(&c.to) {
            self.start_pending(now, connection, uuid, c.to, c.rid, push);
            let incoming = Message::Incoming(Incoming {
                push,
                connection,
                from: uuid,
                observed: Addr(view.addr),
                local: view.local.to_vec(),
                payload: c.payload,
            });
            self.push(now, c.to, push, &target.secret, target.addr, incoming, out);
            return;
        }
        let Some(cluster) = &self.cluster else {
            self.connect_failed(now, uuid, c.rid, FailReason::Offline, out);
            return;
        };
        let cached = cluster.cached_presence(&c.to, now);
        if matches!(cached, Some(None)) {
            tracing::debug!(target = %c.to, "offline (cached: nowhere)");
            self.connect_failed(now, uuid, c.rid, FailReason::Offline, out);
            return;
        }
        self.start_pending(now, connection, uuid, c.to, c.rid, 0);
        let body = Body::Incoming {
            conn: connection,
            from: uuid,
            to: c.to,
            observed: Addr(view.addr),
            local: view.local.to_vec(),
            payload: c.payload,
        };
        // A fresh cache entry naming a known, active node: forward now, no Redis, no waiting.
        // (A draining node is moving its clients away: the directory knows better.)
        if let Some(Some(node_id)) = cached {
            let node = cluster
                .node(&node_id)
                .filter(|n| n.state == NodeState::Active);
            if let Some(node) = node {
                self.forward_incoming(now, connection, c.to, &node, body, false, out);
                return;
            }
        }
        out.jobs.push(Job::Connect {
            conn: connection,
            target: c.to,
            fresh: false,
            body,
        });
    }

    /// Records a pending connection on the initiator's node (`push`: the local Incoming push,
    /// 0 while the target is elsewhere) and marks the Connect's request id as pending.
    fn start_pending(
        &self,
        now: Instant,
        id: Uuid,
        initiator: Uuid,
        target: Uuid,
        rid: u64,
        push: u64,
    ) {
        self.conns.insert(
            id,
            Conn {
                initiator,
                target,
                initiator_rid: rid,
                started: now,
                state: ConnState::Pending {
                    deadline: now + self.connect_timeout,
                    push,
                },
                remote: None,
                target_side: false,
            },
        );
        self.pending.insert(id, ());
        self.sessions
            .remember(&initiator, rid, Remembered::Pending, now);
    }

    /// Completes a Connect job: forward to `node`, or fail the pending connection.
    #[allow(clippy::too_many_arguments)]
    pub fn complete_connect(
        &self,
        now: Instant,
        conn: Uuid,
        target: Uuid,
        body: Body,
        fresh: bool,
        found: Result<Arc<NodeInfo>, FailReason>,
        out: &mut Outbox,
    ) {
        // It may have arrived here meanwhile (moving between nodes): deliver locally.
        if self.deliver_pending_locally(now, conn, target, &body, out) {
            return;
        }
        match found {
            Ok(node) => self.forward_incoming(now, conn, target, &node, body, fresh, out),
            Err(reason) => self.fail_pending(now, conn, reason, out),
        }
    }

    /// Turns a pending connection whose target turned out to be local into a local one.
    /// Returns false if the target is not here.
    fn deliver_pending_locally(
        &self,
        now: Instant,
        conn: Uuid,
        target: Uuid,
        body: &Body,
        out: &mut Outbox,
    ) -> bool {
        let Body::Incoming {
            from,
            observed,
            local,
            payload,
            ..
        } = body
        else {
            return false;
        };
        let Some((push, t)) = self.sessions.next_push(&target) else {
            return false;
        };
        let pending = match self.conns.get_mut(&conn) {
            Some(mut c) => match c.state {
                ConnState::Pending { deadline, .. } => {
                    c.state = ConnState::Pending { deadline, push };
                    c.remote = None;
                    true
                }
                ConnState::Established { .. } => false,
            },
            None => false,
        };
        if pending {
            let msg = Message::Incoming(Incoming {
                push,
                connection: conn,
                from: *from,
                observed: *observed,
                local: local.clone(),
                payload: payload.clone(),
            });
            self.push(now, target, push, &t.secret, t.addr, msg, out);
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_incoming(
        &self,
        now: Instant,
        conn: Uuid,
        target: Uuid,
        node: &NodeInfo,
        body: Body,
        retried: bool,
        out: &mut Outbox,
    ) {
        let Some(cluster) = &self.cluster else { return };
        let known = match self.conns.get_mut(&conn) {
            Some(mut c) if matches!(c.state, ConnState::Pending { .. }) => {
                c.remote = Some(Remote {
                    node: node.id.as_str().into(),
                    addr: node.internal,
                });
                true
            }
            _ => false,
        };
        if known {
            let then = Then::Incoming {
                conn,
                target,
                body: body.clone(),
                retried,
            };
            self.forward(now, cluster, &node.id, node.internal, body, then, out);
        }
    }

    /// Fails a pending connection (if still pending) with `reason`.
    #[track_caller]
    fn fail_pending(&self, now: Instant, conn: Uuid, reason: FailReason, out: &mut Outbox) {
        let Some((_, c)) = self.conns.remove(&conn) else {
            return;
        };
        tracing::debug!(
            target: "sigrouter::connect_failed",
            %conn,
            reason = reason.name(),
            at = %std::panic::Location::caller(),
            remote = ?c.remote.as_ref().map(|r| r.node.clone()),
            "connect failed"
        );
        if let ConnState::Pending { push, .. } = c.state {
            if push != 0 {
                self.pushes.remove(&(c.target, push));
            }
            if self.sessions.contains(&c.initiator) {
                self.connect_failed(now, c.initiator, c.initiator_rid, reason, out);
            }
        }
    }

    /// Sends a push and keeps it for retransmission until acknowledged.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        now: Instant,
        to: Uuid,
        id: u64,
        key: &Secret,
        addr: SocketAddr,
        msg: Message,
        out: &mut Outbox,
    ) {
        let migrate = matches!(msg, Message::Migrate(_));
        let bytes = match proto::encode(&msg, Some(key)) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, ty = ?msg.ty(), "encoding a push failed");
                return;
            }
        };
        self.pushes.insert(
            (to, id),
            PendingPush {
                bytes: bytes.as_slice().into(),
                next_at: now + self.push_initial_rto,
                rto: self.push_initial_rto,
                deadline: now + self.push_deadline,
                migrate,
            },
        );
        self.metrics.pushes_sent.increment(1);
        out.client.push(Transmit { to: addr, bytes });
    }

    /// Sends a node-to-node request and keeps it for retransmission until answered.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        now: Instant,
        cluster: &Cluster,
        node: &str,
        addr: SocketAddr,
        body: Body,
        then: Then,
        out: &mut Outbox,
    ) {
        let Some((seq, bytes)) = cluster.envelope(node, None, body) else {
            tracing::error!("encoding a node-to-node datagram failed");
            return;
        };
        self.fwd.insert(
            seq,
            PendingFwd {
                bytes: bytes.as_slice().into(),
                to: addr,
                next_at: now + FWD_RTO,
                rto: FWD_RTO,
                deadline: now + FWD_DEADLINE,
                then,
            },
        );
        self.metrics.forwarded.increment(1);
        out.cluster.push(Transmit { to: addr, bytes });
    }

    fn answer_incoming(
        &self,
        now: Instant,
        uuid: Uuid,
        view: &SenderView,
        a: Answer,
        accept: bool,
        out: &mut Outbox,
    ) {
        let Some(conn) = self.record_answer(now, a.connection, uuid, accept, false) else {
            self.error_to(view, a.rid, ErrorCode::UnknownConnection, out);
            return;
        };
        let ConnState::Pending { push, .. } = conn.state else {
            // Already answered under another request id: nothing more to do.
            self.ack(now, uuid, view, a.rid, out);
            return;
        };
        // The answer proves the Incoming arrived.
        self.pushes.remove(&(uuid, push));
        if !accept {
            self.conns.remove(&a.connection);
        }
        if let (Some(remote), Some(cluster)) = (&conn.remote, &self.cluster) {
            // The initiator is on another node: the Ack waits for that node's reply.
            self.sessions
                .remember(&uuid, a.rid, Remembered::Pending, now);
            let body = Body::Answered {
                conn: a.connection,
                accept,
                peer: uuid,
                observed: Addr(view.addr),
                local: view.local.to_vec(),
                payload: a.payload,
            };
            let then = Then::AckClient { uuid, rid: a.rid };
            self.forward(now, cluster, &remote.node, remote.addr, body, then, out);
            return;
        }
        self.ack(now, uuid, view, a.rid, out);
        self.deliver_outcome(
            now,
            &conn,
            a.connection,
            accept,
            uuid,
            Addr(view.addr),
            view.local.to_vec(),
            a.payload,
            out,
        );
    }

    /// Records `target`'s answer to connection `id` (established on accept) and returns the
    /// connection as it was before; `None` if it is unknown, not `target`'s, or (with
    /// `pending_only`) already answered. One statement: read, change, copy out.
    fn record_answer(
        &self,
        now: Instant,
        id: Uuid,
        target: Uuid,
        accept: bool,
        pending_only: bool,
    ) -> Option<Conn> {
        match self.conns.get_mut(&id) {
            Some(mut c)
                if c.target == target
                    && (!pending_only || matches!(c.state, ConnState::Pending { .. })) =>
            {
                let before = c.clone();
                if accept {
                    c.state = ConnState::Established { last: now };
                }
                Some(before)
            }
            _ => None,
        }
    }

    /// Tells the (local) initiator of `conn` how its Connect ended.
    #[allow(clippy::too_many_arguments)]
    fn deliver_outcome(
        &self,
        now: Instant,
        conn: &Conn,
        id: Uuid,
        accept: bool,
        peer: Uuid,
        observed: Addr,
        local: Vec<Addr>,
        payload: Payload,
        out: &mut Outbox,
    ) {
        if !self.sessions.contains(&conn.initiator) {
            self.conns.remove(&id);
            return;
        }
        let (msg, reason) = if accept {
            let m = Message::Connected(Connected {
                rid: conn.initiator_rid,
                connection: id,
                peer,
                observed,
                local,
                payload,
            });
            (m, None)
        } else {
            let m = Message::ConnectFailed(ConnectFailed {
                rid: conn.initiator_rid,
                reason: FailReason::Rejected,
                payload,
            });
            (m, Some(FailReason::Rejected))
        };
        self.metrics.outcome(reason);
        self.metrics
            .connect_seconds
            .record(now.saturating_duration_since(conn.started).as_secs_f64());
        self.answer_later(now, conn.initiator, conn.initiator_rid, msg, out);
    }

    fn signal(
        &self,
        now: Instant,
        uuid: Uuid,
        view: &SenderView,
        s: proto::Signal,
        out: &mut Outbox,
    ) {
        let peer = match self.conns.get_mut(&s.connection) {
            Some(mut c)
                if matches!(c.state, ConnState::Established { .. })
                    && (c.initiator == uuid || c.target == uuid) =>
            {
                c.state = ConnState::Established { last: now };
                let other = if c.initiator == uuid {
                    c.target
                } else {
                    c.initiator
                };
                Some((other, c.remote.clone()))
            }
            _ => None,
        };
        let Some((other, remote)) = peer else {
            self.error_to(view, s.rid, ErrorCode::UnknownConnection, out);
            return;
        };
        if let (Some(remote), Some(cluster)) = (&remote, &self.cluster) {
            self.sessions
                .remember(&uuid, s.rid, Remembered::Pending, now);
            let body = Body::Signal {
                conn: s.connection,
                from: uuid,
                to: other,
                payload: s.payload,
            };
            let then = Then::AckClient { uuid, rid: s.rid };
            self.forward(now, cluster, &remote.node, remote.addr, body, then, out);
            return;
        }
        if !self.push_signal(now, s.connection, uuid, other, s.payload, out) {
            self.error_to(view, s.rid, ErrorCode::UnknownConnection, out);
            return;
        }
        self.ack(now, uuid, view, s.rid, out);
    }

    fn push_signal(
        &self,
        now: Instant,
        conn: Uuid,
        from: Uuid,
        to: Uuid,
        payload: Payload,
        out: &mut Outbox,
    ) -> bool {
        let Some((push_id, tview)) = self.sessions.next_push(&to) else {
            return false;
        };
        let msg = Message::SignalPush(SignalPush {
            push: push_id,
            connection: conn,
            from,
            payload,
        });
        self.push(now, to, push_id, &tview.secret, tview.addr, msg, out);
        self.metrics.signals_relayed.increment(1);
        true
    }

    /// Handles one datagram from another node, received on the cluster port.
    pub fn handle_internal(&self, now: Instant, src: SocketAddr, buf: &[u8], out: &mut Outbox) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let Ok(env) = cluster.open(buf) else {
            self.metrics.drop(DropReason::ClusterAuth);
            return;
        };
        self.metrics.forwarded_in.increment(1);
        if let Body::Reply { status } = env.body {
            self.complete_forward(now, env.seq, Some(status), out);
            return;
        }
        // A repeat (our reply was lost): answer the same, do nothing twice.
        let status = match cluster.seen(&env.from, env.seq) {
            Some(s) => s,
            None => {
                let kind = body_name(&env.body);
                let s = self.apply_internal(now, &env.from, src, env.body, out);
                tracing::debug!(from = %env.from, seq = env.seq, kind, status = ?s, "node request");
                cluster.remember(&env.from, env.seq, s, now);
                s
            }
        };
        if let Some((_, bytes)) = cluster.envelope(&env.from, Some(env.seq), Body::Reply { status })
        {
            out.cluster.push(Transmit { to: src, bytes });
        }
    }

    fn apply_internal(
        &self,
        now: Instant,
        from_node: &str,
        src: SocketAddr,
        body: Body,
        out: &mut Outbox,
    ) -> Status {
        match body {
            Body::Incoming {
                conn,
                from,
                to,
                observed,
                local,
                payload,
            } => {
                let Some((push, target)) = self.sessions.next_push(&to) else {
                    return Status::NotHere;
                };
                self.conns.insert(
                    conn,
                    Conn {
                        initiator: from,
                        target: to,
                        initiator_rid: 0,
                        started: now,
                        state: ConnState::Pending {
                            deadline: now + self.connect_timeout,
                            push,
                        },
                        remote: Some(Remote {
                            node: from_node.into(),
                            addr: src,
                        }),
                        target_side: true,
                    },
                );
                self.pending.insert(conn, ());
                let msg = Message::Incoming(Incoming {
                    push,
                    connection: conn,
                    from,
                    observed,
                    local,
                    payload,
                });
                self.push(now, to, push, &target.secret, target.addr, msg, out);
                Status::Ok
            }
            Body::Answered {
                conn,
                accept,
                peer,
                observed,
                local,
                payload,
            } => {
                let Some(c) = self.record_answer(now, conn, peer, accept, true) else {
                    return Status::UnknownConnection;
                };
                if !accept {
                    self.conns.remove(&conn);
                }
                self.deliver_outcome(now, &c, conn, accept, peer, observed, local, payload, out);
                Status::Ok
            }
            Body::Signal {
                conn,
                from,
                to,
                payload,
            } => {
                let ok = match self.conns.get_mut(&conn) {
                    Some(mut c)
                        if matches!(c.state, ConnState::Established { .. })
                            && ((c.initiator == from && c.target == to)
                                || (c.initiator == to && c.target == from)) =>
                    {
                        c.state = ConnState::Established { last: now };
                        true
                    }
                    _ => false,
                };
                if !ok {
                    return Status::UnknownConnection;
                }
                if self.push_signal(now, conn, from, to, payload, out) {
                    Status::Ok
                } else {
                    Status::NotHere
                }
            }
            Body::Abort { conn } => {
                // The target left its node before answering: the initiator tries again.
                let ours = self.conns.get(&conn).is_some_and(|c| {
                    !c.target_side && matches!(c.state, ConnState::Pending { .. })
                });
                if ours {
                    self.fail_pending(now, conn, FailReason::RetryLater, out);
                }
                Status::Ok
            }
            Body::Moved { uuid } => {
                // The presence now names the new node: do not delete it.
                self.sessions.remove(&uuid);
                self.metrics.sessions.set(self.sessions.len() as f64);
                Status::Ok
            }
            Body::Reply { .. } => Status::Ok,
        }
    }

    /// Completes node-to-node request `seq` (`None`: it timed out).
    fn complete_forward(&self, now: Instant, seq: u64, status: Option<Status>, out: &mut Outbox) {
        let Some((_, f)) = self.fwd.remove(&seq) else {
            return; // a repeat reply
        };
        tracing::debug!(seq, ?status, then = ?f.then, "node request answered");
        match f.then {
            Then::Nothing => {}
            Then::AckClient { uuid, rid } => match status {
                Some(Status::Ok) => {
                    self.answer_later(now, uuid, rid, Message::Ack(Ack { rid }), out)
                }
                Some(_) => self.answer_error(now, uuid, rid, ErrorCode::UnknownConnection, out),
                None => self.answer_error(now, uuid, rid, ErrorCode::RetryLater, out),
            },
            Then::Incoming {
                conn,
                target,
                body,
                retried,
            } => match status {
                Some(Status::Ok) => {}
                Some(_) if !retried => {
                    // The client moved or left since the lookup: look again, once, afresh.
                    if let Some(c) = &self.cluster {
                        c.invalidate(&target);
                    }
                    out.jobs.push(Job::Connect {
                        conn,
                        target,
                        fresh: true,
                        body,
                    });
                }
                Some(_) => {
                    // Still not where the directory says: it is moving; the client retries.
                    if let Some(c) = &self.cluster {
                        c.invalidate(&target);
                    }
                    self.fail_pending(now, conn, FailReason::RetryLater, out);
                }
                None => {
                    if let Some(c) = &self.cluster {
                        c.invalidate(&target);
                    }
                    self.fail_pending(now, conn, FailReason::RetryLater, out);
                }
            },
        }
    }

    /// An Error remembered as the answer to `rid` (the client retries with a new id).
    fn answer_error(&self, now: Instant, uuid: Uuid, rid: u64, code: ErrorCode, out: &mut Outbox) {
        let Some(p) = self.sessions.peer(&uuid) else {
            return;
        };
        if let Ok(bytes) = proto::encode(&Message::Error(ErrorMsg { rid, code }), None) {
            self.sessions
                .remember(&uuid, rid, Remembered::Answer(bytes.as_slice().into()), now);
            out.client.push(Transmit { to: p.addr, bytes });
        }
    }

    /// Pushes Migrate to every session: resume at `to(uuid)` (None: the same public address,
    /// from a new local port). Returns how many were told.
    pub fn migrate_all(
        &self,
        now: Instant,
        mut to: impl FnMut() -> Option<SocketAddr>,
        out: &mut Outbox,
    ) -> usize {
        let mut n = 0;
        for uuid in self.sessions.uuids() {
            let Some((push, p)) = self.sessions.next_push(&uuid) else {
                continue;
            };
            let msg = Message::Migrate(Migrate {
                push,
                to: to().map(Addr),
            });
            self.push(now, uuid, push, &p.secret, p.addr, msg, out);
            n += 1;
        }
        self.metrics.migrates.increment(n as u64);
        n
    }

    /// Time-driven work that must be prompt: retransmissions and timeouts. Call every few tens
    /// of milliseconds.
    pub fn tick(&self, now: Instant, out: &mut Outbox) {
        // Collect first, act after: no guard of one map is held while another is touched.
        let due: Vec<((Uuid, u64), bool)> = self
            .pushes
            .iter()
            .filter(|e| e.next_at <= now)
            .map(|e| (*e.key(), e.deadline <= now))
            .collect();
        for (key, expired) in due {
            if expired {
                if self.pushes.remove(&key).is_some() {
                    self.metrics.pushes_expired.increment(1);
                }
                continue;
            }
            let Some(addr) = self.sessions.addr(&key.0) else {
                self.pushes.remove(&key);
                continue;
            };
            let bytes = self.pushes.get_mut(&key).map(|mut p| {
                p.rto = p.rto.saturating_mul(2);
                p.next_at = now + p.rto;
                p.bytes.clone()
            });
            if let Some(bytes) = bytes {
                self.metrics.push_retransmits.increment(1);
                out.client.push(Transmit {
                    to: addr,
                    bytes: bytes.to_vec(),
                });
            }
        }
        let due: Vec<(u64, bool)> = self
            .fwd
            .iter()
            .filter(|e| e.next_at <= now)
            .map(|e| (*e.key(), e.deadline <= now))
            .collect();
        for (seq, expired) in due {
            if expired {
                self.complete_forward(now, seq, None, out);
                continue;
            }
            let again = self.fwd.get_mut(&seq).map(|mut f| {
                f.rto = f.rto.saturating_mul(2);
                f.next_at = now + f.rto;
                (f.to, f.bytes.clone())
            });
            if let Some((to, bytes)) = again {
                out.cluster.push(Transmit {
                    to,
                    bytes: bytes.to_vec(),
                });
            }
        }
        let ids: Vec<Uuid> = self.pending.iter().map(|e| *e.key()).collect();
        let mut pending: Vec<(Uuid, Conn, bool)> = Vec::with_capacity(ids.len());
        for id in ids {
            let conn = self.conns.get(&id).map(|c| c.value().clone());
            match conn {
                Some(c) => match c.state {
                    ConnState::Pending { deadline, .. } => pending.push((id, c, deadline <= now)),
                    ConnState::Established { .. } => {
                        self.pending.remove(&id);
                    }
                },
                None => {
                    self.pending.remove(&id);
                }
            }
        }
        for (id, conn, expired) in pending {
            if expired {
                tracing::debug!(
                    conn = %id,
                    initiator = %conn.initiator,
                    target = %conn.target,
                    remote = ?conn.remote.as_ref().map(|r| r.node.clone()),
                    target_side = conn.target_side,
                    target_here = self.sessions.contains(&conn.target),
                    initiator_here = self.sessions.contains(&conn.initiator),
                    "connect timed out"
                );
                // Only the initiator's node answers the Connect; a target-side pending entry
                // (initiator remote) just goes away.
                self.fail_pending(now, id, FailReason::Timeout, out);
                continue;
            }
            // The target left (moved to another node, said Bye, expired) before answering:
            // tell the initiator at once rather than after the timeout.
            // (An initiator-side entry whose target is elsewhere has no local push: push 0,
            // remote unset while its lookup runs. Its target was never here.)
            let local_push = matches!(conn.state, ConnState::Pending { push, .. } if push != 0);
            let target_here = conn.target_side || (conn.remote.is_none() && local_push);
            if target_here && !self.sessions.contains(&conn.target) {
                match (&conn.remote, &self.cluster) {
                    (Some(remote), Some(cluster)) if conn.target_side => {
                        self.conns.remove(&id);
                        let body = Body::Abort { conn: id };
                        self.forward(
                            now,
                            cluster,
                            &remote.node,
                            remote.addr,
                            body,
                            Then::Nothing,
                            out,
                        );
                    }
                    _ => self.fail_pending(now, id, FailReason::RetryLater, out),
                }
            }
        }
    }

    /// Slow housekeeping: expires sessions, forgets old answers and idle connections, prunes
    /// rate-limiter state. Call about once a second. Returns the expired sessions.
    pub fn sweep(&self, now: Instant) -> Vec<Uuid> {
        let gone = self
            .sessions
            .sweep(now, self.session_ttl, self.dedup_window);
        for u in &gone {
            self.publish(PresenceOp::Del(*u));
        }
        self.metrics.expired.increment(gone.len() as u64);
        self.metrics.sessions.set(self.sessions.len() as f64);
        let dedup = self.dedup_window;
        self.hellos
            .retain(|_, (_, t)| now.saturating_duration_since(*t) <= dedup);
        if let Some(c) = &self.cluster {
            c.sweep(now);
        }
        self.register_limiter.retain_recent();
        self.session_limiter.retain_recent();
        gone
    }

    /// Forgets established connections that went idle or lost their local end. Walks every
    /// connection: call it every few seconds, not every tick.
    pub fn sweep_conns(&self, now: Instant) {
        let established: Vec<(Uuid, Uuid, Uuid, bool, Instant)> = self
            .conns
            .iter()
            .filter_map(|e| match e.state {
                ConnState::Established { last } => {
                    Some((*e.key(), e.initiator, e.target, e.remote.is_some(), last))
                }
                ConnState::Pending { .. } => None,
            })
            .collect();
        for (id, a, b, remote, last) in established {
            let idle = now.saturating_duration_since(last) > CONN_IDLE;
            // An end on another node is that node's business; ours must still be here.
            let gone = if remote {
                !self.sessions.contains(&a) && !self.sessions.contains(&b)
            } else {
                !self.sessions.contains(&a) || !self.sessions.contains(&b)
            };
            if idle || gone {
                self.conns.remove(&id);
            }
        }
    }
}

impl SenderView {
    /// A view for sending to a session that is not the sender of the current request.
    fn to_peer(secret: Secret, addr: SocketAddr) -> Self {
        Self {
            secret,
            addr,
            local: Arc::from(Vec::new()),
            rebound: false,
            remembered: None,
            max_rid: 0,
        }
    }

    /// Whether `rid` is too far below the newest request id to be anything but a replay.
    fn stale(&self, rid: u64, window: u64) -> bool {
        rid.saturating_add(window) < self.max_rid
    }
}

impl Router {
    /// Fails a job that could not be run (too many in flight): retry-later for its client.
    pub fn reject_job(&self, now: Instant, job: Job, out: &mut Outbox) {
        match job {
            Job::Connect { conn, .. } => self.fail_pending(now, conn, FailReason::RetryLater, out),
            Job::Resume { src, req_len, msg } => {
                self.error(src, req_len, msg.rid, ErrorCode::RetryLater, out)
            }
            Job::Query { uuid, rid, .. } => self.complete_query(uuid, rid, None, out),
        }
    }
}

fn body_name(b: &Body) -> &'static str {
    match b {
        Body::Incoming { .. } => "incoming",
        Body::Answered { .. } => "answered",
        Body::Signal { .. } => "signal",
        Body::Abort { .. } => "abort",
        Body::Moved { .. } => "moved",
        Body::Reply { .. } => "reply",
    }
}
