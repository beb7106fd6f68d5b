//! One socket of the heartbeat load: its sessions' registration, the heartbeat window, and
//! what it does with each answer (lost and late requests, `Resume` after `UnknownSession`,
//! following a `Migrate`).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sigrouter_proto::{self as proto, ErrorCode, Message, Secret};
use tokio::net::UdpSocket;
use uuid::Uuid;

use crate::stats;

/// Registers (or resumes) in flight per socket during setup.
const HELLO_WINDOW: usize = 64;
/// A hello not answered in this long is sent again, same bytes (the router deduplicates).
const HELLO_RTO: Duration = Duration::from_millis(500);
/// Pause before retrying a hello the router refused with `RateLimited`.
const HELLO_BACKOFF: Duration = Duration::from_millis(250);
/// A node's Migrate is followed once per this period (a restarted node may drain again).
const DRAIN_MEMORY: Duration = Duration::from_secs(30);
/// How often the loop looks for lost requests and the end of the run.
const CHECK_EVERY: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Not registered yet (or given up on).
    New,
    /// Heartbeating.
    Active,
    /// Waiting for `Registered` in answer to a Resume.
    Resuming,
}

pub(super) struct Sess {
    pub(super) uuid: Uuid,
    pub(super) secret: Secret,
    pub(super) server: SocketAddr,
    pub(super) state: State,
}

/// A hello (Register or Resume) in flight.
pub(super) struct Hello {
    pub(super) idx: usize,
    pub(super) sent: Instant,
    pub(super) bytes: Vec<u8>,
}

#[derive(Default)]
pub(super) struct Counts {
    pub(super) sent: u64,
    pub(super) acked: u64,
    pub(super) lost: u64,
    pub(super) late: u64,
    pub(super) bad_mac: u64,
    pub(super) undecodable: u64,
    pub(super) errors: HashMap<&'static str, u64>,
    pub(super) resumes: u64,
    pub(super) migrates: u64,
    pub(super) other_pushes: u64,
    pub(super) register_rate_limited: u64,
}

/// One socket's loop and state.
pub(super) struct Worker {
    pub(super) sock: UdpSocket,
    pub(super) sessions: Vec<Sess>,
    /// Next request id, shared by every session of this socket (so each one's ids increase).
    pub(super) rid: u64,
    /// Heartbeats in flight: rid → (session, sent at).
    pub(super) inflight: HashMap<u64, (usize, Instant)>,
    /// Same rids in send order, to find the lost ones without scanning the map.
    pub(super) order: VecDeque<(u64, Instant)>,
    pub(super) hellos: HashMap<u64, Hello>,
    /// Nodes whose Migrate this socket has followed, and when.
    pub(super) drained: HashMap<SocketAddr, Instant>,
    /// Hellos waiting to be (re)sent, with the earliest time to send.
    pub(super) hello_queue: VecDeque<(usize, Instant)>,
    pub(super) cursor: usize,
    pub(super) window: usize,
    pub(super) timeout: Duration,
    pub(super) echo: bool,
    pub(super) echo_len: usize,
    pub(super) hist: Histogram<u64>,
    pub(super) c: Counts,
    /// Failed sends (atomic only because `send` takes `&self`).
    pub(super) send_errors: AtomicU64,
    pub(super) buf: Vec<u8>,
}

impl Worker {
    fn next_rid(&mut self) -> u64 {
        self.rid += 1;
        self.rid
    }

    async fn send(&self, bytes: &[u8], to: SocketAddr) {
        let r = match self.sock.try_send_to(bytes, to) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.sock.send_to(bytes, to).await,
            r => r,
        };
        if r.is_err() {
            // ECONNREFUSED from an earlier ICMP, or a full buffer: the request will be lost.
            self.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn hello_bytes(&mut self, idx: usize, rid: u64) -> Vec<u8> {
        let s = &self.sessions[idx];
        let resume = (s.state != State::New).then_some((s.uuid, s.secret));
        crate::hello::hello(rid, resume)
    }

    /// Sends queued hellos that are due, up to the hello window.
    async fn pump_hellos(&mut self, now: Instant) {
        while self.hellos.len() < HELLO_WINDOW {
            let Some(&(idx, at)) = self.hello_queue.front() else {
                break;
            };
            if at > now {
                break;
            }
            self.hello_queue.pop_front();
            let rid = self.next_rid();
            let bytes = self.hello_bytes(idx, rid);
            let to = self.sessions[idx].server;
            self.send(&bytes, to).await;
            self.hellos.insert(
                rid,
                Hello {
                    idx,
                    sent: now,
                    bytes,
                },
            );
        }
        // Retransmit the unanswered ones, same bytes and rid.
        let due: Vec<u64> = self
            .hellos
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.sent) >= HELLO_RTO)
            .map(|(r, _)| *r)
            .collect();
        for rid in due {
            if let Some(h) = self.hellos.get_mut(&rid) {
                h.sent = now;
                let (bytes, to) = (h.bytes.clone(), self.sessions[h.idx].server);
                self.send(&bytes, to).await;
            }
        }
    }

    /// Fills the heartbeat window.
    async fn pump_heartbeats(&mut self, now: Instant) {
        let n = self.sessions.len();
        if !self.echo && n == 0 {
            return;
        }
        let mut skipped = 0;
        while self.inflight.len() < self.window {
            let rid = self.next_rid();
            let (idx, bytes, to) = if self.echo {
                let mut b = vec![0u8; self.echo_len];
                b[..8].copy_from_slice(&rid.to_le_bytes());
                (
                    0,
                    b,
                    self.sessions
                        .first()
                        .map_or(SocketAddr::from(([127, 0, 0, 1], 0)), |s| s.server),
                )
            } else {
                let idx = self.cursor % n;
                self.cursor = self.cursor.wrapping_add(1);
                let s = &self.sessions[idx];
                if s.state != State::Active {
                    skipped += 1;
                    if skipped >= n {
                        return;
                    }
                    continue;
                }
                let m = Message::Heartbeat(proto::Heartbeat { rid, uuid: s.uuid });
                let b = proto::encode(&m, Some(&s.secret)).expect("a heartbeat always encodes");
                (idx, b, s.server)
            };
            self.send(&bytes, to).await;
            self.c.sent += 1;
            self.inflight.insert(rid, (idx, now));
            self.order.push_back((rid, now));
        }
    }

    /// Counts requests older than the timeout as lost.
    fn expire(&mut self, now: Instant) {
        while let Some(&(rid, sent)) = self.order.front() {
            if now.saturating_duration_since(sent) < self.timeout {
                break;
            }
            self.order.pop_front();
            if self.inflight.remove(&rid).is_some() {
                self.c.lost += 1;
            }
        }
    }

    fn start_resume(&mut self, idx: usize, to: SocketAddr, now: Instant) {
        let s = &mut self.sessions[idx];
        if s.state == State::Resuming {
            return;
        }
        s.state = State::Resuming;
        s.server = to;
        self.c.resumes += 1;
        self.hello_queue.push_back((idx, now));
    }

    /// Handles one received datagram.
    async fn on_datagram(&mut self, n: usize, from: SocketAddr, now: Instant) {
        if self.echo {
            if n >= 8 {
                let rid = u64::from_le_bytes(self.buf[..8].try_into().expect("8 bytes"));
                self.answered(rid, now);
            }
            return;
        }
        let b = &self.buf[..n];
        let Ok(m) = proto::decode(b) else {
            self.c.undecodable += 1;
            return;
        };
        match m {
            Message::HeartbeatAck(a) => {
                let Some(&(idx, _)) = self.inflight.get(&a.rid) else {
                    self.c.late += 1;
                    return;
                };
                if !proto::verify_mac(b, &self.sessions[idx].secret) {
                    self.c.bad_mac += 1;
                    return;
                }
                self.answered(a.rid, now);
            }
            Message::Registered(r) => {
                let Some(h) = self.hellos.remove(&r.rid) else {
                    return;
                };
                let s = &mut self.sessions[h.idx];
                s.uuid = r.uuid;
                s.secret = r.secret;
                s.state = State::Active;
            }
            Message::Error(e) => self.on_error(e.rid, e.code, now),
            m if m.ty().is_push() => self.on_push(m, from, now),
            _ => self.c.undecodable += 1,
        }
    }

    fn answered(&mut self, rid: u64, now: Instant) {
        match self.inflight.remove(&rid) {
            Some((_, sent)) => {
                self.c.acked += 1;
                let us = now.saturating_duration_since(sent).as_micros();
                stats::record(&mut self.hist, u64::try_from(us).unwrap_or(u64::MAX));
            }
            None => self.c.late += 1,
        }
    }

    fn on_error(&mut self, rid: u64, code: ErrorCode, now: Instant) {
        if let Some(h) = self.hellos.remove(&rid) {
            match code {
                ErrorCode::RateLimited | ErrorCode::RetryLater | ErrorCode::Draining => {
                    self.c.register_rate_limited += 1;
                    self.hello_queue.push_back((h.idx, now + HELLO_BACKOFF));
                }
                ErrorCode::Unauthorized => {
                    // The session is gone: register anew.
                    self.sessions[h.idx].state = State::New;
                    self.hello_queue.push_back((h.idx, now));
                }
                other => *self.c.errors.entry(other.name()).or_default() += 1,
            }
            return;
        }
        let Some((idx, _)) = self.inflight.remove(&rid) else {
            self.c.late += 1;
            return;
        };
        *self.c.errors.entry(code.name()).or_default() += 1;
        if code == ErrorCode::UnknownSession {
            let to = self.sessions[idx].server;
            self.start_resume(idx, to, now);
        }
    }

    /// Follows a node's drain. A push names no session (only its MAC tells whose it is, and
    /// checking every secret of the socket per push would cost O(sessions²) over a drain), so
    /// the first `Migrate` from a node moves every session of this socket held there: the
    /// node sends one to each of them anyway. Pushes are not acknowledged: the draining node
    /// stops retransmitting once the session resumed elsewhere. Other pushes (none are
    /// expected in this test) are only counted.
    fn on_push(&mut self, m: Message, from: SocketAddr, now: Instant) {
        let Message::Migrate(mg) = m else {
            self.c.other_pushes += 1;
            return;
        };
        if self
            .drained
            .get(&from)
            .is_some_and(|t| now.saturating_duration_since(*t) < DRAIN_MEMORY)
        {
            return;
        }
        self.drained.insert(from, now);
        let to = mg.to.map_or(from, |a| a.0);
        for idx in 0..self.sessions.len() {
            let s = &self.sessions[idx];
            if s.server == from && s.state == State::Active {
                self.c.migrates += 1;
                self.start_resume(idx, to, now);
            }
        }
    }

    /// Receives what is waiting (up to a batch) and handles it.
    async fn drain_socket(&mut self) {
        for _ in 0..64 {
            match self.sock.try_recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    let now = Instant::now();
                    self.on_datagram(n, from, now).await;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
    }

    /// Waits until the socket is readable or `CHECK_EVERY` passes.
    async fn wait(&self) {
        let _ = tokio::time::timeout(CHECK_EVERY, self.sock.readable()).await;
    }

    /// Registers every session of this socket, or as many as the deadline allows.
    pub(super) async fn register_all(&mut self, deadline: Instant) {
        let now = Instant::now();
        for idx in 0..self.sessions.len() {
            self.hello_queue.push_back((idx, now));
        }
        loop {
            let now = Instant::now();
            if (self.hellos.is_empty() && self.hello_queue.is_empty()) || now >= deadline {
                break;
            }
            self.pump_hellos(now).await;
            self.wait().await;
            self.drain_socket().await;
        }
        self.hellos.clear();
        self.hello_queue.clear();
    }

    /// The measured loop.
    pub(super) async fn heartbeat_until(&mut self, end: Instant) {
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            self.expire(now);
            if !self.hello_queue.is_empty() || !self.hellos.is_empty() {
                self.pump_hellos(now).await;
            }
            self.pump_heartbeats(now).await;
            self.wait().await;
            self.drain_socket().await;
        }
        // Let the last window come back; whatever does not is lost.
        let grace = Instant::now() + self.timeout;
        while !self.inflight.is_empty() && Instant::now() < grace {
            self.wait().await;
            self.drain_socket().await;
        }
        self.c.lost += self.inflight.len() as u64;
        self.inflight.clear();
    }
}
