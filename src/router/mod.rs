//! Routing decisions, apart from socket I/O.
//!
//! [`Router::handle`] takes one datagram, its source and the time, updates the node's state and
//! appends what must happen to an [`Outbox`]: datagrams for clients, datagrams for other nodes,
//! and [`Job`]s that need cluster state this node does not have at hand (a Redis lookup, a
//! newer node table). It never awaits, never blocks on I/O and never holds a map guard past the
//! statement that took it, so the socket loops call it inline for every packet. Jobs run
//! elsewhere and come back through the `complete_*` methods. Time-driven work (retransmissions,
//! timeouts, expiry) lives in [`Router::tick`] and [`Router::sweep`], called by one timer task.
//!
//! # Layout
//! - `outbox`: [`Transmit`], [`Outbox`], [`Job`]: what a call decided.
//! - `state`: the state every handler shares and the primitives they send with (answers, the
//!   one way to send an error, pushes and node-to-node requests kept for retransmission).
//! - `conns`: connections, with an explicit [role](conns::Role) for where their ends are.
//! - `retransmit`: one retransmission queue, used by client pushes and node requests alike.
//! - `token`: address-validation tokens (Retry), stateless.
//! - `hello`: Register and Resume. `connect`: Connect to the target's answer. `relay`:
//!   Signal and PushAck. `query`: Query. `peer`: requests from other nodes and replies to
//!   ours. `timers`: tick and sweeps. `drain`: Migrate. `whohas`: presence lookups asked of
//!   the other nodes when Redis cannot answer.
//!
//! Handler modules depend on `state` and the data modules, never the other way round; this
//! file only dispatches.

mod connect;
mod conns;
mod drain;
mod hello;
mod leave;
mod outbox;
mod peer;
mod query;
mod relay;
mod retransmit;
mod state;
mod timers;
pub mod token;
mod whohas;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use sigrouter_proto::{
    self as proto, Addr, DecodeError, ErrorCode, FailReason, HeartbeatAck, Message,
};
use uuid::Uuid;

pub use outbox::{ConnectLookup, Job, Outbox, ResumeLookup, Transmit};

/// How long a draining node waits, after a client acknowledged its `Migrate`, for the
/// client's new node to ask for its connections (see [`Router::awaiting_handover`]).
pub const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
pub(crate) use whohas::Waiter;

use crate::cluster::{Cluster, LocalSessions, NodeInfo};
use crate::config::Config;
use crate::metrics::{DropReason, Metrics};
use crate::session::{Remembered, Seen, Touch};
use hello::Hello;
use leave::Why;
use state::{ErrorTo, State};

/// The node's routing state and decisions. Shared by every socket loop (`Arc<Router>`).
pub struct Router {
    st: State,
    asks: whohas::Asks,
}

impl Router {
    /// Builds an empty router. `cluster` is `None` in the embedded single-node mode.
    pub fn new(cfg: &Config, metrics: Metrics, cluster: Option<Arc<Cluster>>) -> Self {
        Self {
            st: State::new(cfg, metrics, cluster),
            asks: whohas::Asks::default(),
        }
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.st.metrics
    }

    /// The cluster state, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.st.cluster.as_ref()
    }

    /// Number of sessions held.
    pub fn session_count(&self) -> usize {
        self.st.sessions.len()
    }

    /// Whether `uuid` is online on this node.
    pub fn is_local(&self, uuid: &Uuid) -> bool {
        self.st.sessions.contains(uuid)
    }

    /// Every session held, with its Resume verifier (for presence re-publication).
    pub fn presence_snapshot(&self) -> Vec<(Uuid, [u8; 32])> {
        self.st.sessions.verifiers()
    }

    /// Work that another node or client still waits on: pending connections and unanswered
    /// node-to-node requests. A draining node stays up until this is zero (or its deadline).
    pub fn in_flight(&self) -> usize {
        self.st.conns.pending_count() + self.st.node_requests.len() + self.asks.len()
    }

    /// Sessions that acknowledged a `Migrate` and whose new node has not said `Moved` yet:
    /// clients resuming elsewhere right now. A drain tells no more clients while too many are
    /// on their way (the other nodes are behind).
    pub fn migrating_count(&self) -> usize {
        self.st.migrating.len()
    }

    /// Clients that acknowledged a `Migrate` at most [`HANDOVER_WAIT`] before `now` and still
    /// have connections here, while their new node has not said `Moved`: their connections go
    /// over to it only when it does, so a draining node stays up for them a little. (A client
    /// resumes within a round trip or two of its acknowledgement; one that has not asked after
    /// that long is not waited for.)
    pub fn awaiting_handover(&self, now: Instant) -> usize {
        self.awaiting(now).count()
    }

    /// Up to `n` of the clients [`Router::awaiting_handover`] counts (for a log line).
    pub fn awaiting_handover_sample(&self, now: Instant, n: usize) -> Vec<Uuid> {
        self.awaiting(now).take(n).collect()
    }

    fn awaiting(&self, now: Instant) -> impl Iterator<Item = Uuid> + '_ {
        self.st
            .migrating
            .iter()
            .filter(move |e| {
                now.saturating_duration_since(e.value().0) <= HANDOVER_WAIT
                    && self.st.conns.has_session(e.key())
            })
            .map(|e| *e.key())
    }

    /// Stops taking new sessions (Register answers `Draining`).
    pub fn set_draining(&self, v: bool) {
        self.st.draining.store(v, Ordering::Relaxed);
    }

    /// Handles one client datagram from `src` received at `now`.
    pub fn handle(&self, now: Instant, src: SocketAddr, buf: &[u8], out: &mut Outbox) {
        let decoded = (!proto::is_stun(buf)).then(|| proto::decode(buf));
        self.dispatch(now, src, buf, decoded, out);
    }

    /// Handles a batch of client datagrams received at `now` (what one receive system call
    /// brought), as [`Router::handle`] does one by one. First it decodes every datagram and
    /// starts loading the session-map entries they name into the cache, then it handles
    /// them: with a million sessions each lookup is a cache miss, and this way the misses of
    /// a batch overlap instead of following one another.
    pub fn handle_batch(&self, now: Instant, batch: &[(SocketAddr, &[u8])], out: &mut Outbox) {
        const AHEAD: usize = 64;
        for chunk in batch.chunks(AHEAD) {
            let mut decoded: [Option<Result<Message, DecodeError>>; AHEAD] =
                [const { None }; AHEAD];
            for ((_, buf), d) in chunk.iter().zip(decoded.iter_mut()) {
                if proto::is_stun(buf) {
                    continue;
                }
                let r = proto::decode(buf);
                if let Some(uuid) = r.as_ref().ok().and_then(Message::sender) {
                    self.st.sessions.prefetch(&uuid);
                }
                *d = Some(r);
            }
            // By now the entries' control bytes and buckets are (mostly) in the cache: find
            // each entry and start loading the session record it points to.
            for d in decoded.iter().take(chunk.len()) {
                if let Some(uuid) = d.as_ref().and_then(|r| r.as_ref().ok()?.sender()) {
                    self.st.sessions.prefetch_record(&uuid);
                }
            }
            for ((src, buf), d) in chunk.iter().zip(decoded.iter_mut()) {
                self.dispatch(now, *src, buf, d.take(), out);
            }
        }
    }

    /// Handles one datagram, already decoded (`None`: a STUN datagram).
    fn dispatch(
        &self,
        now: Instant,
        src: SocketAddr,
        buf: &[u8],
        decoded: Option<Result<Message, DecodeError>>,
        out: &mut Outbox,
    ) {
        let st = &self.st;
        st.metrics.rx_datagrams.increment(1);
        let Some(decoded) = decoded else {
            if !st.stun_limiter.check(st.sources.key(src), st.ns(now)) {
                st.metrics.drop(DropReason::RateLimited);
                return;
            }
            match crate::stun::answer(buf, src) {
                Ok(bytes) => {
                    st.metrics.stun_answered.increment(1);
                    out.send_client(src, bytes);
                }
                Err(_) => st.metrics.drop(DropReason::Stun),
            }
            return;
        };
        let msg = match decoded {
            Ok(m) => m,
            Err(e) => {
                st.metrics.drop(DropReason::Decode(e));
                return;
            }
        };
        let ty = msg.ty();
        if (ty as u8) >= 0x80 {
            st.metrics.drop(DropReason::WrongDirection);
            return;
        }
        st.metrics.request(ty);
        match msg {
            Message::Register(m) => {
                let h = Hello {
                    src,
                    len: buf.len(),
                    rid: m.rid,
                };
                hello::register(st, now, h, m, out);
            }
            Message::Resume(m) => {
                let h = Hello {
                    src,
                    len: buf.len(),
                    rid: m.rid,
                };
                hello::resume(st, now, h, m, out);
            }
            other => self.authenticated(now, src, buf, other, out),
        }
    }

    /// The gate every authenticated request passes: session known, MAC valid, rate limit,
    /// retransmission or replay; then the handler of its type.
    fn authenticated(
        &self,
        now: Instant,
        src: SocketAddr,
        buf: &[u8],
        msg: Message,
        out: &mut Outbox,
    ) {
        let st = &self.st;
        let Some(uuid) = msg.sender() else {
            st.metrics.drop(DropReason::WrongDirection);
            return;
        };
        let rid = msg.rid().unwrap_or(0);
        let from_source = ErrorTo::Source {
            src,
            req_len: buf.len(),
        };
        if let Message::PushAck(a) = msg {
            // No request id, no answer: only the MAC, then the push it acknowledges.
            match st.sessions.secret(&uuid) {
                Some(secret) if proto::verify_mac(buf, &secret) => {
                    relay::push_ack(st, now, uuid, a, out)
                }
                Some(_) => st.metrics.drop(DropReason::BadMac),
                None => {}
            }
            return;
        }
        let verify = |secret: &proto::Secret| proto::verify_mac(buf, secret);
        let view = match st.sessions.touch(&uuid, src, rid, now, verify) {
            Touch::Gone => {
                // Not held here: tell the client to Resume. The Error is smaller than any
                // authenticated request (those carry a 16-byte MAC), so this cannot amplify.
                st.error(now, from_source, rid, ErrorCode::UnknownSession, out);
                return;
            }
            Touch::BadMac => {
                st.metrics.drop(DropReason::BadMac);
                return;
            }
            Touch::RateLimited => {
                st.metrics.rate_limited.increment(1);
                st.error(now, from_source, rid, ErrorCode::RateLimited, out);
                return;
            }
            Touch::Seen(view) => view,
        };
        if view.rebound {
            st.metrics.rebinds.increment(1);
        }
        match (view.seen, &view.remembered) {
            (Seen::New { .. }, _) => {}
            (Seen::Duplicate, Some(Remembered::Answer(bytes))) => {
                st.metrics.duplicates.increment(1);
                // Answer a retransmission where the session lives; to a new source only when
                // that cannot amplify (a replay from a spoofed address gains nothing).
                let to = if src == view.addr || bytes.len() <= buf.len() {
                    src
                } else {
                    view.addr
                };
                out.send_client(to, bytes);
                return;
            }
            (Seen::Duplicate, Some(Remembered::Pending)) => {
                // The answer comes when the outcome is known (a retransmission of a forwarded
                // request is covered by the node-to-node retransmission).
                st.metrics.duplicates.increment(1);
                return;
            }
            // Reads have no effect: a retransmission is answered afresh.
            (Seen::Duplicate, None) if matches!(msg, Message::Heartbeat(_) | Message::Query(_)) => {
                st.metrics.duplicates.increment(1);
            }
            // Seen before and no longer remembered, or below the window: a replay.
            (Seen::Duplicate, None) | (Seen::Stale, _) => {
                st.metrics.drop(DropReason::Replay);
                return;
            }
        }
        match msg {
            Message::Heartbeat(_) => {
                let ack = Message::HeartbeatAck(HeartbeatAck {
                    rid,
                    observed: Addr(view.addr),
                });
                st.send(&view, ack, out);
            }
            Message::Query(q) => {
                st.metrics.routed.increment(1);
                query::query(st, now, uuid, &view, q, out);
            }
            Message::Connect(c) => {
                st.metrics.routed.increment(1);
                connect::connect(st, now, uuid, &view, c, out);
            }
            Message::Accept(a) => {
                st.metrics.routed.increment(1);
                connect::answer_incoming(st, now, uuid, &view, a, true, out);
            }
            Message::Reject(a) => {
                st.metrics.routed.increment(1);
                connect::answer_incoming(st, now, uuid, &view, a, false, out);
            }
            Message::Signal(s) => {
                st.metrics.routed.increment(1);
                relay::signal(st, now, uuid, &view, s, out);
            }
            Message::Bye(_) => {
                st.ack(now, &view, rid, out);
                leave::leave(st, now, uuid, Why::Bye, out);
            }
            _ => st.metrics.drop(DropReason::WrongDirection),
        }
    }

    /// Handles one datagram from another node, received on the cluster port.
    pub fn handle_internal(&self, now: Instant, src: SocketAddr, buf: &[u8], out: &mut Outbox) {
        peer::handle(&self.st, &self.asks, now, src, buf, out);
    }

    /// Asks the other nodes where `uuids` are (Redis could not say), for `waiter`; with a
    /// `verifier`, the holder checks it. The outcome arrives with their answers or by the
    /// lookup's deadline (in [`Router::tick`]).
    pub(crate) fn ask_peers(
        &self,
        now: Instant,
        uuids: Vec<Uuid>,
        verifier: Option<[u8; 32]>,
        waiter: Waiter,
        out: &mut Outbox,
    ) {
        whohas::start(&self.st, &self.asks, now, uuids, verifier, waiter, out);
    }

    /// Tells a few members this node is leaving the cluster (end of drain).
    pub fn leave_cluster(&self, now: Instant, out: &mut Outbox) {
        if let Some(c) = &self.st.cluster {
            for (to, bytes) in c.membership_leave(now) {
                out.send_node(to, bytes);
            }
        }
    }

    /// Takes a Resume whose old node's `Expect` arrived after the Resume itself (and before
    /// its job ran): returns true if it was answered so, with no directory lookup.
    pub(crate) fn resume_expected(
        &self,
        now: Instant,
        src: SocketAddr,
        req_len: usize,
        m: &proto::Resume,
        out: &mut Outbox,
    ) -> bool {
        let Some((verifier, old)) = drain::take_expected(&self.st, &m.uuid, &m.secret) else {
            return false;
        };
        let h = Hello {
            src,
            len: req_len,
            rid: m.rid,
        };
        hello::take_over(&self.st, now, h, m.clone(), verifier, old, out);
        true
    }

    /// Completes a Resume job: `found` is what the directory holds for the UUID.
    pub fn complete_resume(
        &self,
        now: Instant,
        src: SocketAddr,
        req_len: usize,
        m: proto::Resume,
        found: ResumeLookup,
        out: &mut Outbox,
    ) {
        let h = Hello {
            src,
            len: req_len,
            rid: m.rid,
        };
        hello::complete_resume(&self.st, now, h, m, found, out);
    }

    /// Completes a Query job: `online` per asked UUID, or `None` if the directory failed.
    pub fn complete_query(
        &self,
        uuid: Uuid,
        rid: u64,
        online: Option<Vec<bool>>,
        out: &mut Outbox,
    ) {
        self.st.job_done(uuid);
        query::complete_query(&self.st, Instant::now(), uuid, rid, online, out);
    }

    /// Completes a Connect job: forward to the node found, or fail the pending connection.
    pub fn complete_connect(
        &self,
        now: Instant,
        lookup: ConnectLookup,
        found: Result<Arc<NodeInfo>, FailReason>,
        out: &mut Outbox,
    ) {
        if let Some(initiator) = lookup.initiator() {
            self.st.job_done(initiator);
        }
        connect::complete_connect(&self.st, now, lookup, found, out);
    }

    /// Fails a job that could not be run (too many in flight): retry-later for its client.
    pub fn reject_job(&self, now: Instant, job: Job, out: &mut Outbox) {
        match job {
            Job::Connect(l) => {
                if let Some(initiator) = l.initiator() {
                    self.st.job_done(initiator);
                }
                connect::fail_pending(&self.st, now, l.conn, FailReason::RetryLater, out)
            }
            Job::Resume { src, req_len, msg } => {
                let to = ErrorTo::Source { src, req_len };
                self.st.error(now, to, msg.rid, ErrorCode::RetryLater, out);
            }
            Job::Query { uuid, rid, .. } => self.complete_query(uuid, rid, None, out),
        }
    }

    /// Every session held now (a snapshot of their ids), for a drain to walk in slices.
    pub fn session_ids(&self) -> Vec<Uuid> {
        self.st.sessions.uuids()
    }

    /// Tells each of `uuids` still here, with a `Migrate` push, to resume at `to()` (None: the
    /// same public address, from a new local port). A session whose Migrate is still being
    /// retransmitted is skipped; one whose Migrate was given up is told again with the same
    /// push id. Returns how many Migrates were sent.
    pub fn migrate(
        &self,
        now: Instant,
        uuids: &[Uuid],
        to: impl FnMut() -> Option<SocketAddr>,
        out: &mut Outbox,
    ) -> usize {
        drain::migrate(&self.st, now, uuids, to, out)
    }

    /// [`Router::migrate`] for every session held.
    pub fn migrate_all(
        &self,
        now: Instant,
        to: impl FnMut() -> Option<SocketAddr>,
        out: &mut Outbox,
    ) -> usize {
        self.migrate(now, &self.session_ids(), to, out)
    }

    /// Time-driven work that must be prompt: retransmissions and timeouts. Call every few tens
    /// of milliseconds.
    pub fn tick(&self, now: Instant, out: &mut Outbox) {
        timers::tick(&self.st, now, out);
        if let Some(c) = &self.st.cluster {
            for (to, bytes) in c.membership_tick(now, self.st.sessions.len() as u64) {
                out.send_node(to, bytes);
            }
        }
        whohas::tick(&self.st, &self.asks, now, out);
    }

    /// Slow housekeeping: expires sessions (handing back connections that waited on them),
    /// forgets old answers, idle connections and idle rate-limiter state. Each looks only at
    /// what is due, never at everything. Call about once a second. Returns the expired
    /// sessions.
    pub fn sweep(&self, now: Instant, out: &mut Outbox) -> Vec<Uuid> {
        timers::sweep(&self.st, now, out)
    }
}

impl LocalSessions for Router {
    fn session_count(&self) -> usize {
        Router::session_count(self)
    }

    fn presence_snapshot(&self) -> Vec<(Uuid, [u8; 32])> {
        Router::presence_snapshot(self)
    }

    fn holds(&self, uuid: &Uuid) -> bool {
        self.is_local(uuid)
    }
}

#[cfg(test)]
mod tests;
