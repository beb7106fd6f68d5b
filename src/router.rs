//! Routing decisions, apart from socket I/O.
//!
//! [`Router::handle`] takes one datagram, its source and the time, updates the node's state and
//! appends what must be sent to `out`. It never awaits, never blocks on I/O and never holds a
//! map guard past the statement that took it, so the socket loops call it inline for every
//! packet. Time-driven work (push retransmission, connect timeouts, session expiry) lives in
//! [`Router::tick`] and [`Router::sweep`], called by one timer task.
//!
//! State:
//! - `sessions`: who is online here (see [`crate::session`]).
//! - `conns`: connections between two sessions, pending until the target answers.
//! - `pushes`: server pushes waiting for their `PushAck`.
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
    HeartbeatAck, Incoming, Message, MsgType, Payload, QueryResult, Registered, Secret, SignalPush,
    MIN_HELLO_LEN,
};
use uuid::Uuid;

use crate::config::Config;
use crate::metrics::{DropReason, Metrics};
use crate::session::{Remembered, SenderView, Sessions};

/// Requests whose id is this far below the newest one seen are stale replays: dropped.
const REPLAY_WINDOW: u64 = 1024;
/// An established connection with no Signal for this long is forgotten.
const CONN_IDLE: Duration = Duration::from_secs(3600);

/// One datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    /// The encoded datagram.
    pub bytes: Vec<u8>,
}

#[derive(Clone, Copy, Debug)]
enum ConnState {
    /// Incoming pushed to the target (push id), waiting for Accept/Reject until `deadline`.
    Pending { deadline: Instant, push: u64 },
    /// Accepted; Signals flow until either side goes away.
    Established { last: Instant },
}

#[derive(Clone, Copy, Debug)]
struct Conn {
    initiator: Uuid,
    target: Uuid,
    /// Request id of the initiator's Connect: the outcome is the answer to it.
    initiator_rid: u64,
    started: Instant,
    state: ConnState,
}

#[derive(Clone, Debug)]
struct PendingPush {
    bytes: Arc<[u8]>,
    next_at: Instant,
    rto: Duration,
    deadline: Instant,
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
    pushes: DashMap<(Uuid, u64), PendingPush>,
    hellos: DashMap<(SocketAddr, u64), (Uuid, Instant)>,
    register_limiter: DefaultKeyedRateLimiter<IpAddr>,
    session_limiter: DefaultKeyedRateLimiter<Uuid>,
    draining: AtomicBool,
    metrics: Metrics,
}

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v.max(1)).unwrap_or(NonZeroU32::MIN)
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Router {
    /// Builds an empty router from the node configuration.
    pub fn new(cfg: &Config, metrics: Metrics) -> Self {
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
            pushes: DashMap::new(),
            hellos: DashMap::new(),
            register_limiter: RateLimiter::dashmap(
                Quota::per_second(nz(cfg.register_rate)).allow_burst(nz(cfg.register_burst)),
            ),
            session_limiter: RateLimiter::dashmap(
                Quota::per_second(nz(cfg.session_rate)).allow_burst(nz(cfg.session_burst)),
            ),
            draining: AtomicBool::new(false),
            metrics,
        }
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Number of sessions held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Whether `uuid` is online on this node.
    pub fn is_local(&self, uuid: &Uuid) -> bool {
        self.sessions.contains(uuid)
    }

    /// Stops taking new sessions (Register answers `Draining`).
    pub fn set_draining(&self, v: bool) {
        self.draining.store(v, Ordering::Relaxed);
    }

    /// Handles one datagram from `src` received at `now`; appends what to send to `out`.
    pub fn handle(&self, now: Instant, src: SocketAddr, buf: &[u8], out: &mut Vec<Transmit>) {
        self.metrics.rx_datagrams.increment(1);
        if proto::is_stun(buf) {
            match stun_answer(buf, src) {
                Ok(bytes) => {
                    self.metrics.stun_answered.increment(1);
                    out.push(Transmit { to: src, bytes });
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
    fn reply_bounded(
        &self,
        to: SocketAddr,
        req_len: usize,
        msg: &Message,
        key: Option<&Secret>,
        out: &mut Vec<Transmit>,
    ) {
        match proto::encode(msg, key) {
            Ok(bytes) if bytes.len() <= req_len => out.push(Transmit { to, bytes }),
            Ok(_) => self.metrics.drop(DropReason::Amplification),
            Err(e) => tracing::error!(error = %e, ty = ?msg.ty(), "encoding an answer failed"),
        }
    }

    fn error(
        &self,
        to: SocketAddr,
        req_len: usize,
        rid: u64,
        code: ErrorCode,
        out: &mut Vec<Transmit>,
    ) {
        self.reply_bounded(
            to,
            req_len,
            &Message::Error(ErrorMsg { rid, code }),
            None,
            out,
        );
    }

    /// Per-IP limit for Register/Resume. Over the limit: a small Error (never larger than the
    /// request), so honest clients back off and floods gain nothing.
    fn hello_allowed(
        &self,
        src: SocketAddr,
        req_len: usize,
        rid: u64,
        out: &mut Vec<Transmit>,
    ) -> bool {
        if req_len < MIN_HELLO_LEN {
            self.metrics.drop(DropReason::Unpadded);
            return false;
        }
        if self.register_limiter.check_key(&src.ip()).is_err() {
            self.metrics.rate_limited.increment(1);
            self.error(src, req_len, rid, ErrorCode::RateLimited, out);
            return false;
        }
        true
    }

    fn registered(
        &self,
        now: Instant,
        rid: u64,
        uuid: Uuid,
        secret: Secret,
        src: SocketAddr,
    ) -> Message {
        let _ = now;
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
        out: &mut Vec<Transmit>,
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
                let msg = self.registered(now, m.rid, uuid, secret, src);
                self.reply_bounded(src, req_len, &msg, None, out);
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
        self.metrics.registered.increment(1);
        self.metrics.sessions.set(self.sessions.len() as f64);
        let msg = self.registered(now, m.rid, uuid, secret, src);
        self.reply_bounded(src, req_len, &msg, None, out);
    }

    fn resume(
        &self,
        now: Instant,
        src: SocketAddr,
        req_len: usize,
        m: proto::Resume,
        out: &mut Vec<Transmit>,
    ) {
        if !self.hello_allowed(src, req_len, m.rid, out) {
            return;
        }
        match self.sessions.secret(&m.uuid) {
            Some(s) if s.ct_eq(&m.secret) => {
                if !self.sessions.resume(&m.uuid, src, m.local, m.rid, now) {
                    // Expired between the two statements: take it as unknown.
                    self.error(src, req_len, m.rid, ErrorCode::Unauthorized, out);
                    return;
                }
            }
            Some(_) => {
                self.error(src, req_len, m.rid, ErrorCode::Unauthorized, out);
                return;
            }
            None => {
                // Unknown here. Single-node mode cannot check the secret of a session it never
                // held (the node restarted, or the session expired): the client registers anew.
                if self.draining.load(Ordering::Relaxed) {
                    self.error(src, req_len, m.rid, ErrorCode::Draining, out);
                    return;
                }
                self.error(src, req_len, m.rid, ErrorCode::Unauthorized, out);
                return;
            }
        }
        self.metrics.resumed.increment(1);
        let msg = self.registered(now, m.rid, m.uuid, m.secret, src);
        self.reply_bounded(src, req_len, &msg, None, out);
    }

    fn authenticated(
        &self,
        now: Instant,
        src: SocketAddr,
        buf: &[u8],
        msg: Message,
        out: &mut Vec<Transmit>,
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
            self.pushes.remove(&(uuid, a.push));
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
                out.push(Transmit {
                    to,
                    bytes: bytes.to_vec(),
                });
            }
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
                let online = q.uuids.iter().map(|u| self.sessions.contains(u)).collect();
                self.send(
                    &view,
                    Message::QueryResult(QueryResult { rid, online }),
                    out,
                );
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
                self.sessions.remove(&uuid);
                self.metrics.sessions.set(self.sessions.len() as f64);
            }
            _ => self.metrics.drop(DropReason::WrongDirection),
        }
    }

    /// Encodes an answer for the sender, MAC'd with its secret, and sends it to its address.
    fn send(&self, view: &SenderView, msg: Message, out: &mut Vec<Transmit>) -> Option<Arc<[u8]>> {
        match proto::encode(&msg, Some(&view.secret)) {
            Ok(bytes) => {
                let shared: Arc<[u8]> = bytes.as_slice().into();
                out.push(Transmit {
                    to: view.addr,
                    bytes,
                });
                Some(shared)
            }
            Err(e) => {
                tracing::error!(error = %e, ty = ?msg.ty(), "encoding an answer failed");
                None
            }
        }
    }

    /// Sends an answer and remembers it for retransmissions of the same request id.
    fn answer(
        &self,
        now: Instant,
        uuid: Uuid,
        view: &SenderView,
        rid: u64,
        msg: Message,
        out: &mut Vec<Transmit>,
    ) {
        if let Some(bytes) = self.send(view, msg, out) {
            self.sessions
                .remember(&uuid, rid, Remembered::Answer(bytes), now);
        }
    }

    /// Answers a Connect that failed at once, remembering the outcome.
    fn connect_failed(
        &self,
        now: Instant,
        uuid: Uuid,
        view: &SenderView,
        rid: u64,
        reason: FailReason,
        out: &mut Vec<Transmit>,
    ) {
        self.metrics.outcome(Some(reason));
        let msg = Message::ConnectFailed(ConnectFailed {
            rid,
            reason,
            payload: Payload::new(),
        });
        self.answer(now, uuid, view, rid, msg, out);
    }

    fn connect(
        &self,
        now: Instant,
        uuid: Uuid,
        view: &SenderView,
        c: proto::Connect,
        out: &mut Vec<Transmit>,
    ) {
        if c.to == uuid {
            self.error(view.addr, usize::MAX, c.rid, ErrorCode::BadRequest, out);
            return;
        }
        let Some((push, target)) = self.sessions.next_push(&c.to) else {
            self.connect_failed(now, uuid, view, c.rid, FailReason::Offline, out);
            return;
        };
        let connection = Uuid::new_v4();
        self.conns.insert(
            connection,
            Conn {
                initiator: uuid,
                target: c.to,
                initiator_rid: c.rid,
                started: now,
                state: ConnState::Pending {
                    deadline: now + self.connect_timeout,
                    push,
                },
            },
        );
        self.sessions
            .remember(&uuid, c.rid, Remembered::PendingConnect, now);
        let incoming = Message::Incoming(Incoming {
            push,
            connection,
            from: uuid,
            observed: Addr(view.addr),
            local: view.local.to_vec(),
            payload: c.payload,
        });
        self.push(now, c.to, push, &target.secret, target.addr, incoming, out);
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
        out: &mut Vec<Transmit>,
    ) {
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
            },
        );
        self.metrics.pushes_sent.increment(1);
        out.push(Transmit { to: addr, bytes });
    }

    fn answer_incoming(
        &self,
        now: Instant,
        uuid: Uuid,
        view: &SenderView,
        a: Answer,
        accept: bool,
        out: &mut Vec<Transmit>,
    ) {
        // Read and change the connection in one statement; act on the copy afterwards.
        let found = match self.conns.get_mut(&a.connection) {
            Some(mut c) if c.target == uuid => {
                let before = *c;
                if accept {
                    c.state = ConnState::Established { last: now };
                }
                Some(before)
            }
            _ => None,
        };
        let Some(conn) = found else {
            self.error(
                view.addr,
                usize::MAX,
                a.rid,
                ErrorCode::UnknownConnection,
                out,
            );
            return;
        };
        let ConnState::Pending { push, .. } = conn.state else {
            // Already answered under another request id: nothing more to do.
            self.answer(
                now,
                uuid,
                view,
                a.rid,
                Message::Ack(Ack { rid: a.rid }),
                out,
            );
            return;
        };
        // The answer proves the Incoming arrived.
        self.pushes.remove(&(uuid, push));
        if !accept {
            self.conns.remove(&a.connection);
        }
        self.answer(
            now,
            uuid,
            view,
            a.rid,
            Message::Ack(Ack { rid: a.rid }),
            out,
        );
        let Some(init) = self.sessions.peer(&conn.initiator) else {
            self.conns.remove(&a.connection);
            return;
        };
        let (msg, reason) = if accept {
            let m = Message::Connected(Connected {
                rid: conn.initiator_rid,
                connection: a.connection,
                peer: uuid,
                observed: Addr(view.addr),
                local: view.local.to_vec(),
                payload: a.payload,
            });
            (m, None)
        } else {
            let m = Message::ConnectFailed(ConnectFailed {
                rid: conn.initiator_rid,
                reason: FailReason::Rejected,
                payload: a.payload,
            });
            (m, Some(FailReason::Rejected))
        };
        self.metrics.outcome(reason);
        self.metrics
            .connect_seconds
            .record(now.saturating_duration_since(conn.started).as_secs_f64());
        let iview = SenderView::to_peer(init.secret, init.addr);
        self.answer(now, conn.initiator, &iview, conn.initiator_rid, msg, out);
    }

    fn signal(
        &self,
        now: Instant,
        uuid: Uuid,
        view: &SenderView,
        s: proto::Signal,
        out: &mut Vec<Transmit>,
    ) {
        let peer = match self.conns.get_mut(&s.connection) {
            Some(mut c)
                if matches!(c.state, ConnState::Established { .. })
                    && (c.initiator == uuid || c.target == uuid) =>
            {
                c.state = ConnState::Established { last: now };
                Some(if c.initiator == uuid {
                    c.target
                } else {
                    c.initiator
                })
            }
            _ => None,
        };
        let Some((push, target)) = peer.and_then(|p| self.sessions.next_push(&p).map(|t| (t, p)))
        else {
            self.error(
                view.addr,
                usize::MAX,
                s.rid,
                ErrorCode::UnknownConnection,
                out,
            );
            return;
        };
        let (push_id, tview) = push;
        let msg = Message::SignalPush(SignalPush {
            push: push_id,
            connection: s.connection,
            from: uuid,
            payload: s.payload,
        });
        self.push(now, target, push_id, &tview.secret, tview.addr, msg, out);
        self.metrics.signals_relayed.increment(1);
        self.answer(
            now,
            uuid,
            view,
            s.rid,
            Message::Ack(Ack { rid: s.rid }),
            out,
        );
    }

    /// Time-driven work that must be prompt: push retransmissions and connect timeouts.
    /// Call every few tens of milliseconds.
    pub fn tick(&self, now: Instant, out: &mut Vec<Transmit>) {
        // Collect first, act after: no guard of `pushes` is held while another map is touched.
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
                out.push(Transmit {
                    to: addr,
                    bytes: bytes.to_vec(),
                });
            }
        }
        let timed_out: Vec<(Uuid, Conn)> = self
            .conns
            .iter()
            .filter(|e| matches!(e.state, ConnState::Pending { deadline, .. } if deadline <= now))
            .map(|e| (*e.key(), *e.value()))
            .collect();
        for (id, conn) in timed_out {
            if self.conns.remove(&id).is_none() {
                continue;
            }
            if let ConnState::Pending { push, .. } = conn.state {
                self.pushes.remove(&(conn.target, push));
            }
            let Some(init) = self.sessions.peer(&conn.initiator) else {
                continue;
            };
            let view = SenderView::to_peer(init.secret, init.addr);
            self.connect_failed(
                now,
                conn.initiator,
                &view,
                conn.initiator_rid,
                FailReason::Timeout,
                out,
            );
        }
    }

    /// Slow housekeeping: expires sessions, forgets old answers and idle connections, prunes
    /// rate-limiter state. Call about once a second. Returns the expired sessions.
    pub fn sweep(&self, now: Instant) -> Vec<Uuid> {
        let gone = self
            .sessions
            .sweep(now, self.session_ttl, self.dedup_window);
        self.metrics.expired.increment(gone.len() as u64);
        self.metrics.sessions.set(self.sessions.len() as f64);
        let dedup = self.dedup_window;
        self.hellos
            .retain(|_, (_, t)| now.saturating_duration_since(*t) <= dedup);
        let dead: Vec<Uuid> = self
            .conns
            .iter()
            .filter(|e| match e.state {
                ConnState::Established { last } => now.saturating_duration_since(last) > CONN_IDLE,
                ConnState::Pending { .. } => false,
            })
            .map(|e| *e.key())
            .collect();
        for id in dead {
            self.conns.remove(&id);
        }
        let orphaned: Vec<Uuid> = self
            .conns
            .iter()
            .filter(|e| matches!(e.state, ConnState::Established { .. }))
            .map(|e| (*e.key(), e.initiator, e.target))
            .collect::<Vec<_>>()
            .into_iter()
            .filter(|(_, a, b)| !self.sessions.contains(a) || !self.sessions.contains(b))
            .map(|(id, _, _)| id)
            .collect();
        for id in orphaned {
            self.conns.remove(&id);
        }
        self.register_limiter.retain_recent();
        self.session_limiter.retain_recent();
        gone
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

#[allow(dead_code)]
fn _assert_types(_: MsgType) {}
#[allow(clippy::missing_const_for_fn)]
fn stun_answer(_b: &[u8], _s: SocketAddr) -> Result<Vec<u8>, ()> {
    Err(())
}
