//! The node's routing state and the primitives every handler sends with: answers (remembered
//! or not), the one way to send an error, server pushes and node-to-node requests, both kept
//! for retransmission until answered.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use sigrouter_proto::{Ack, Addr, ErrorCode, ErrorMsg, Message, Registered, Secret};
use uuid::Uuid;

use super::conns::{Conns, Remote};
use super::outbox::Outbox;
use super::retransmit::{Retransmit, Schedule};
use super::token::Tokens;
use crate::cluster::wire::Body;
use crate::cluster::{Cluster, PresenceOp};
use crate::config::{AddressValidation, Config};
use crate::limit::{Keyed, Quota, Shared, SourceKey, Sources};
use crate::metrics::{DropReason, Metrics};
use crate::session::{self, PeerView, Remembered, Seen, SenderView, Sessions};
use crate::timer::AgeOut;

/// A client another node (draining) sent here, as it told us.
#[derive(Clone, Debug)]
pub(crate) struct Expected {
    /// The verifier of its session secret.
    pub(crate) verifier: [u8; 32],
    /// The node it comes from.
    pub(crate) from: Arc<str>,
    /// When we were told.
    pub(crate) at: Instant,
}

/// How long a moving session's connections wait for its new node, and how long Signals for a
/// connection that moved on are passed on.
const MOVE_MEMORY: Duration = Duration::from_secs(30);
/// First retransmission of a node-to-node request.
const NODE_REQUEST_RTO: Duration = Duration::from_millis(100);
/// A node-to-node request unanswered for this long fails (retry-later for the client).
const NODE_REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Most deferred jobs (lookups) one session may have in flight; past that its requests that
/// need one get retry-later at once, so one client cannot hold the node's job slots.
pub(crate) const MAX_JOBS_PER_SESSION: u16 = 8;

/// How long `--address-validation pressure` keeps validating after the last sign of pressure.
pub(crate) const PRESSURE_HOLD: Duration = Duration::from_secs(30);

/// Timings and bounds from the configuration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// Heartbeat interval told to clients.
    pub(crate) heartbeat: Duration,
    /// A session silent this long expires.
    pub(crate) session_ttl: Duration,
    /// How long a Connect's target has to answer.
    pub(crate) connect_timeout: Duration,
    /// How long answers are remembered for retransmitted requests.
    pub(crate) dedup_window: Duration,
    /// Most sessions held.
    pub(crate) max_sessions: usize,
    /// When Register and Resume from a new address must prove their source address.
    pub(crate) address_validation: AddressValidation,
}

/// What a server push is: a Migrate, once acknowledged, lets the session go from a draining
/// node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PushKind {
    /// Incoming, SignalPush.
    Plain,
    /// Migrate.
    Migrate,
}

/// What to do when a node-to-node request is answered (or not, by its deadline).
#[derive(Clone, Debug)]
pub(crate) enum OnReply {
    /// Answer the client's request `rid` with Ack (an error if the other node refused it,
    /// retry-later if it never answered).
    AckClient {
        /// The session that asked.
        uuid: Uuid,
        /// Its request id.
        rid: u64,
    },
    /// A forwarded Incoming: on "not here" look the target up afresh, once (`retried`).
    Incoming {
        /// The connection.
        conn: Uuid,
        /// Its target.
        target: Uuid,
        /// The Incoming, to forward again after a fresh lookup.
        body: Body,
        /// Whether this was already the fresh lookup's forward.
        retried: bool,
    },
    /// Nothing.
    Nothing,
}

/// Where an error goes.
pub(crate) enum ErrorTo<'a> {
    /// The source of an unauthenticated request (Register, Resume) of `req_len` bytes: never
    /// answered with more bytes than it sent.
    Source {
        /// Source address.
        src: SocketAddr,
        /// Request size.
        req_len: usize,
    },
    /// The sender of the authenticated request being handled; remembered, so a retransmission
    /// gets the same error.
    Sender(&'a SenderView),
    /// A session answered after the fact (a job or another node finished); remembered as the
    /// answer to the request id.
    Session(Uuid),
}

/// A session about to get a server push: its next push id and where to send it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PushTarget {
    pub(crate) uuid: Uuid,
    pub(crate) push: u64,
    pub(crate) secret: Secret,
    pub(crate) addr: SocketAddr,
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Everything the router knows. Shared by every socket loop through the `Router`.
pub(crate) struct State {
    pub(crate) settings: Settings,
    /// Who is online here.
    pub(crate) sessions: Sessions,
    /// Connections, pending and established.
    pub(crate) conns: Conns,
    /// Server pushes waiting for their PushAck, by (session, push id).
    pub(crate) pushes: Retransmit<(Uuid, u64), PushKind>,
    /// Node-to-node requests waiting for the other node's reply, by sequence number.
    pub(crate) node_requests: Retransmit<u64, OnReply>,
    /// How source addresses map to limit keys.
    pub(crate) sources: Sources,
    /// Register/Resume per source prefix.
    pub(crate) register_limiter: Keyed<SourceKey>,
    /// STUN answers per source prefix.
    pub(crate) stun_limiter: Keyed<SourceKey>,
    /// New sessions per second, node-wide.
    pub(crate) new_sessions: Shared,
    /// Deferred jobs in flight per session (a session with none has no entry).
    pub(crate) jobs_by_session: DashMap<Uuid, u16>,
    /// Sessions that acknowledged a Migrate and have not resumed elsewhere yet, with when and
    /// their Resume verifier: their connections wait here to be handed over.
    pub(crate) migrating: DashMap<Uuid, (Instant, [u8; 32])>,
    /// When to forget entries of `migrating`.
    pub(crate) migrating_ages: AgeOut<Uuid>,
    /// The Migrate each session was told while the node drains (push id, target), so telling it
    /// again repeats the same move.
    pub(crate) migrations: DashMap<Uuid, (u64, Option<Addr>)>,
    /// Connections whose end here moved to another node, with that node: a Signal still sent
    /// here for them is passed on for a while.
    pub(crate) moved_conns: DashMap<Uuid, (Remote, Instant)>,
    /// When to forget entries of `moved_conns`.
    pub(crate) moved_conns_ages: AgeOut<Uuid>,
    /// Clients draining nodes sent here, with what their Resume is checked against.
    pub(crate) expected: DashMap<Uuid, Expected>,
    /// When to forget entries of `expected` (a client that never came).
    pub(crate) expected_ages: AgeOut<Uuid>,
    /// Keys the UUIDs this node derives for new sessions (a random key per process, its HMAC
    /// state computed once: each UUID then costs two SHA-256 blocks instead of four).
    uuid_mac: Hmac<Sha256>,
    /// Issues and checks address-validation tokens (rotating secrets, nothing per token).
    pub(crate) tokens: Tokens,
    /// Until when (router clock, ns) the node counts as under pressure ([`State::under_pressure`]).
    pressure_until: AtomicU64,
    /// Time zero of the compact clocks (rate limiters, session timestamps).
    pub(crate) epoch: Instant,
    /// Set while the node drains: no new sessions.
    pub(crate) draining: AtomicBool,
    /// Cluster state (None: the embedded single-node mode).
    pub(crate) cluster: Option<Arc<Cluster>>,
    pub(crate) metrics: Metrics,
}

impl State {
    pub(crate) fn new(cfg: &Config, metrics: Metrics, cluster: Option<Arc<Cluster>>) -> Self {
        metrics.max_sessions.set(cfg.max_sessions as f64);
        let epoch = Instant::now();
        let mut uuid_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut uuid_key);
        let uuid_mac = <Hmac<Sha256> as Mac>::new_from_slice(&uuid_key).expect("any key length");
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            settings: Settings {
                heartbeat: cfg.heartbeat,
                session_ttl: cfg.session_ttl,
                connect_timeout: cfg.connect_timeout,
                dedup_window: cfg.dedup_window,
                max_sessions: cfg.max_sessions,
                address_validation: cfg.address_validation,
            },
            sessions: Sessions::new(
                session::Limits {
                    ttl_ms: ms(cfg.session_ttl),
                    keep_ms: ms(cfg.dedup_window),
                    quota: Quota::per_second(cfg.session_rate, cfg.session_burst),
                },
                epoch,
            ),
            conns: Conns::new(epoch),
            pushes: Retransmit::new(
                Schedule {
                    initial_rto: cfg.push_initial_rto,
                    deadline: cfg.push_deadline,
                },
                epoch,
            ),
            node_requests: Retransmit::new(
                Schedule {
                    initial_rto: NODE_REQUEST_RTO,
                    deadline: NODE_REQUEST_DEADLINE,
                },
                epoch,
            ),
            sources: Sources::new(
                cfg.limit_prefix_v4,
                cfg.limit_prefix_v6,
                cfg.trusted_proxies.clone(),
            ),
            register_limiter: Keyed::new(Quota::per_second(cfg.register_rate, cfg.register_burst)),
            stun_limiter: Keyed::new(Quota::per_second(cfg.stun_rate, cfg.stun_burst)),
            new_sessions: Shared::new(Quota::per_second(
                cfg.new_session_rate,
                cfg.new_session_burst,
            )),
            jobs_by_session: DashMap::new(),
            migrating: DashMap::new(),
            migrating_ages: AgeOut::new(MOVE_MEMORY, epoch),
            migrations: DashMap::new(),
            moved_conns: DashMap::new(),
            moved_conns_ages: AgeOut::new(MOVE_MEMORY, epoch),
            expected: DashMap::new(),
            expected_ages: AgeOut::new(MOVE_MEMORY, epoch),
            uuid_mac,
            tokens: Tokens::new(),
            pressure_until: AtomicU64::new(0),
            epoch,
            draining: AtomicBool::new(false),
            cluster,
            metrics,
        }
    }

    /// The HMAC that derives session UUIDs, keyed and ready for the derivation's input.
    pub(crate) fn uuid_mac(&self) -> Hmac<Sha256> {
        self.uuid_mac.clone()
    }

    /// Nanoseconds of the router's clock at `now`.
    pub(crate) fn ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes one of session `uuid`'s job slots; false when it has none left.
    pub(crate) fn job_start(&self, uuid: Uuid) -> bool {
        let mut n = self.jobs_by_session.entry(uuid).or_insert(0);
        if *n >= MAX_JOBS_PER_SESSION {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back one of session `uuid`'s job slots.
    pub(crate) fn job_done(&self, uuid: Uuid) {
        self.jobs_by_session.remove_if_mut(&uuid, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }

    /// This node as the far end of a connection, for other nodes.
    pub(crate) fn me(&self) -> Option<Remote> {
        self.cluster.as_ref().map(|c| Remote {
            node: c.id.clone(),
            addr: c.cfg.advertise,
        })
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the node is under pressure, for `--address-validation pressure`: its node-wide
    /// budget of new sessions is more than half used, or it holds more than 90% of its session
    /// cap, or either was so within the last [`PRESSURE_HOLD`]. (Per-prefix limits are not a
    /// signal: one prefix is held by its own limit, and a flood of forged sources spreads over
    /// many prefixes, which the budget sees.) The hold matters: once validation is on, a flood
    /// of forged sources no longer spends the budget, which refills in seconds; without the
    /// hold, validation would turn off again and the flood would take half the burst each
    /// time.
    pub(crate) fn under_pressure(&self, now: Instant) -> bool {
        let ns = self.ns(now);
        let signal = self.new_sessions.more_than_half_used(ns)
            || self.sessions.len().saturating_mul(10)
                > self.settings.max_sessions.saturating_mul(9);
        if signal {
            let until = ns.saturating_add(PRESSURE_HOLD.as_nanos() as u64);
            self.pressure_until.fetch_max(until, Ordering::Relaxed);
            return true;
        }
        ns < self.pressure_until.load(Ordering::Relaxed)
    }

    /// Queues a presence write (cluster mode).
    pub(crate) fn publish(&self, op: PresenceOp) {
        if let Some(c) = &self.cluster {
            c.publish(op);
        }
    }

    /// Updates the sessions gauge.
    pub(crate) fn count_sessions(&self) {
        self.metrics.sessions.set(self.sessions.len() as f64);
    }

    /// The answer to a Register or Resume.
    pub(crate) fn registered(
        &self,
        rid: u64,
        uuid: Uuid,
        secret: Secret,
        src: SocketAddr,
    ) -> Message {
        Message::Registered(Registered {
            rid,
            uuid,
            secret,
            observed: Addr(src),
            heartbeat_ms: millis(self.settings.heartbeat),
            ttl_ms: millis(self.settings.session_ttl),
        })
    }

    /// Sends an unauthenticated answer, but only if it is no larger than the request.
    pub(crate) fn reply_bounded(
        &self,
        to: SocketAddr,
        req_len: usize,
        msg: &Message,
        out: &mut Outbox,
    ) {
        match out.encode(msg, None).map(<[u8]>::len) {
            Ok(len) if len <= req_len => out.send_encoded(to),
            Ok(_) => self.metrics.drop(DropReason::Amplification),
            Err(e) => tracing::error!(error = %e, ty = ?msg.ty(), "encoding an answer failed"),
        }
    }

    /// Sends an error: the one way every handler answers with one. To the source of an
    /// unauthenticated request it is a plain `Error`, never larger than the request; to a
    /// session it is a `SessionError`, MAC'd with the session key, and remembered.
    pub(crate) fn error(
        &self,
        now: Instant,
        to: ErrorTo<'_>,
        rid: u64,
        code: ErrorCode,
        out: &mut Outbox,
    ) {
        match to {
            ErrorTo::Source { src, req_len } => {
                let msg = Message::Error(ErrorMsg::new(rid, code));
                self.reply_bounded(src, req_len, &msg, out);
            }
            ErrorTo::Sender(view) => {
                let msg = Message::SessionError(ErrorMsg::new(rid, code));
                self.remember_and_send(now, view, rid, &msg, true, out);
            }
            ErrorTo::Session(uuid) => {
                if let Some(p) = self.sessions.peer(&uuid) {
                    let view = SenderView::to_peer(uuid, p);
                    let msg = Message::SessionError(ErrorMsg::new(rid, code));
                    self.remember_and_send(now, &view, rid, &msg, true, out);
                }
            }
        }
    }

    /// Encodes `msg` (MAC'd with the session secret if `mac`), remembers it as the answer to
    /// the session's request `rid` and sends it to the session's address.
    fn remember_and_send(
        &self,
        now: Instant,
        view: &SenderView,
        rid: u64,
        msg: &Message,
        mac: bool,
        out: &mut Outbox,
    ) {
        match out.encode(msg, mac.then_some(&view.secret)) {
            Ok(bytes) => {
                self.sessions
                    .remember(&view.uuid, rid, Remembered::Answer(bytes.into()), now);
                out.send_encoded(view.addr);
            }
            Err(e) => tracing::error!(error = %e, ty = ?msg.ty(), "encoding an answer failed"),
        }
    }

    /// Sends an answer for the sender, MAC'd with its secret, to its address (not remembered:
    /// heartbeat acks and query results are answered afresh when asked again). Encoded into
    /// the outbox's reused buffers: no allocation.
    pub(crate) fn send(&self, view: &SenderView, msg: Message, out: &mut Outbox) {
        match out.encode(&msg, Some(&view.secret)) {
            Ok(_) => out.send_encoded(view.addr),
            Err(e) => tracing::error!(error = %e, ty = ?msg.ty(), "encoding an answer failed"),
        }
    }

    /// Sends an answer and remembers it for retransmissions of the same request id.
    pub(crate) fn answer(
        &self,
        now: Instant,
        view: &SenderView,
        rid: u64,
        msg: Message,
        out: &mut Outbox,
    ) {
        self.remember_and_send(now, view, rid, &msg, true, out);
    }

    /// Acknowledges request `rid` (remembered, like every answer with an effect).
    pub(crate) fn ack(&self, now: Instant, view: &SenderView, rid: u64, out: &mut Outbox) {
        self.answer(now, view, rid, Message::Ack(Ack { rid }), out);
    }

    /// Answers session `uuid`'s request `rid` (looked up afresh: the answer may come long after
    /// the request, from a job or another node).
    pub(crate) fn answer_later(
        &self,
        now: Instant,
        uuid: Uuid,
        rid: u64,
        msg: Message,
        out: &mut Outbox,
    ) {
        if let Some(p) = self.sessions.peer(&uuid) {
            self.answer(now, &SenderView::to_peer(uuid, p), rid, msg, out);
        }
    }

    /// Takes the next push id of session `uuid`, with what is needed to send it.
    pub(crate) fn next_push(&self, uuid: &Uuid) -> Option<PushTarget> {
        self.sessions.next_push(uuid).map(|(push, p)| PushTarget {
            uuid: *uuid,
            push,
            secret: p.secret,
            addr: p.addr,
        })
    }

    /// Sends a push and keeps it for retransmission until acknowledged.
    pub(crate) fn push(&self, now: Instant, to: PushTarget, msg: Message, out: &mut Outbox) {
        let kind = if matches!(msg, Message::Migrate(_)) {
            PushKind::Migrate
        } else {
            PushKind::Plain
        };
        let bytes = match out.encode(&msg, Some(&to.secret)) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, ty = ?msg.ty(), "encoding a push failed");
                return;
            }
        };
        self.pushes
            .insert((to.uuid, to.push), to.addr, bytes, now, kind);
        self.metrics.pushes_sent.increment(1);
        out.send_encoded(to.addr);
    }

    /// Sends a node-to-node request and keeps it for retransmission until answered.
    pub(crate) fn node_request(
        &self,
        now: Instant,
        to: &Remote,
        body: Body,
        on_reply: OnReply,
        out: &mut Outbox,
    ) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let Some((seq, bytes)) = cluster.envelope(&to.node, None, body) else {
            tracing::error!("encoding a node-to-node datagram failed");
            return;
        };
        self.node_requests
            .insert(seq, to.addr, &bytes, now, on_reply);
        self.metrics.forwarded.increment(1);
        out.send_node(to.addr, bytes);
    }
}

impl SenderView {
    /// A view for answering a session that is not the sender of the current request.
    pub(crate) fn to_peer(uuid: Uuid, p: PeerView) -> Self {
        Self {
            uuid,
            secret: p.secret,
            addr: p.addr,
            rebound: false,
            seen: Seen::New { newest: false },
            remembered: None,
        }
    }
}
