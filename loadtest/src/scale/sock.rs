//! One client socket of the generator and the sessions it carries: registration (windowed
//! hellos, retried) and the heartbeat loop of a measured phase.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sigrouter_proto::{self as proto, ErrorCode, Message, Secret};
use tokio::net::UdpSocket;
use uuid::Uuid;

use crate::stats;

/// Hellos (Register or Resume) in flight per socket during registration.
const HELLO_WINDOW: usize = 128;
/// A hello not answered in this long is sent again, same bytes (the router deduplicates).
const HELLO_RTO: Duration = Duration::from_millis(500);
/// Pause before retrying a hello the router refused with `RateLimited`.
const HELLO_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait of a socket task for an answer before it looks at the clock again.
const TICK: Duration = Duration::from_millis(1);
/// Datagrams read per wake-up before the task sends again.
const RECV_BATCH: usize = 256;

/// What answers on the other end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Router,
    Echo,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    New,
    Active,
    Resuming,
}

#[derive(Clone, Copy)]
pub(super) struct Sess {
    uuid: Uuid,
    secret: Secret,
    pub(super) state: State,
}

/// A heartbeat (or hello) sent and not yet answered, by request id.
#[derive(Clone, Copy)]
struct Slot {
    sent: Instant,
    /// Session index, or `u32::MAX` when answered or not a heartbeat.
    idx: u32,
}

/// One client socket and the sessions it carries.
pub(super) struct Sock {
    sock: UdpSocket,
    to: SocketAddr,
    kind: Kind,
    pub(super) sessions: Vec<Sess>,
    rid: u64,
    /// In flight: request id `base + i` at index `i`.
    ring: std::collections::VecDeque<Slot>,
    base: u64,
    inflight: usize,
    hellos: HashMap<u64, (usize, Instant, Vec<u8>)>,
    hello_queue: std::collections::VecDeque<(usize, Instant)>,
    cursor: usize,
    buf: Vec<u8>,
    enc: Vec<u8>,
}

/// Counters of one phase on one socket.
#[derive(Default)]
pub(super) struct Phase {
    pub(super) sent: u64,
    pub(super) acked: u64,
    pub(super) lost: u64,
    pub(super) late: u64,
    pub(super) bad: u64,
    pub(super) skipped: u64,
    pub(super) send_errors: u64,
    pub(super) resumes: u64,
    pub(super) errors: HashMap<&'static str, u64>,
}

impl Sock {
    pub(super) fn new(sock: UdpSocket, to: SocketAddr, kind: Kind, n: usize) -> Self {
        let sessions = (0..n)
            .map(|_| match kind {
                Kind::Router => Sess {
                    uuid: Uuid::nil(),
                    secret: Secret([0; 32]),
                    state: State::New,
                },
                Kind::Echo => Sess {
                    uuid: Uuid::new_v4(),
                    secret: random_secret(),
                    state: State::Active,
                },
            })
            .collect();
        Self {
            sock,
            to,
            kind,
            sessions,
            rid: 0,
            ring: std::collections::VecDeque::new(),
            base: 1,
            inflight: 0,
            hellos: HashMap::new(),
            hello_queue: std::collections::VecDeque::new(),
            cursor: 0,
            buf: vec![0u8; 2048],
            enc: Vec::with_capacity(128),
        }
    }

    fn next_rid(&mut self) -> u64 {
        self.rid += 1;
        self.rid
    }

    /// Sends without waiting: a full socket buffer is a failed send, counted.
    fn send_now(&self, bytes: &[u8]) -> bool {
        match self.sock.try_send_to(bytes, self.to) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(_) => false,
        }
    }

    fn hello_bytes(&self, idx: usize, rid: u64) -> Vec<u8> {
        let s = &self.sessions[idx];
        let resume = (s.state != State::New).then_some((s.uuid, s.secret));
        crate::hello::hello(rid, resume)
    }

    /// Sends due hellos within the hello window, and retransmits unanswered ones.
    fn pump_hellos(&mut self, now: Instant) {
        while self.hellos.len() < HELLO_WINDOW {
            let Some(&(idx, at)) = self.hello_queue.front() else {
                break;
            };
            if at > now {
                break;
            }
            self.hello_queue.pop_front();
            let rid = self.next_rid();
            // Hellos take request ids too: keep the ring contiguous.
            self.push_slot(rid, now, u32::MAX);
            let bytes = self.hello_bytes(idx, rid);
            self.send_now(&bytes);
            self.hellos.insert(rid, (idx, now, bytes));
        }
        for (_, (_, sent, bytes)) in self.hellos.iter_mut() {
            if now.saturating_duration_since(*sent) >= HELLO_RTO {
                *sent = now;
                let _ = self.sock.try_send_to(bytes, self.to);
            }
        }
    }

    fn push_slot(&mut self, rid: u64, sent: Instant, idx: u32) {
        if self.ring.is_empty() {
            self.base = rid;
        }
        debug_assert_eq!(self.base + self.ring.len() as u64, rid);
        self.ring.push_back(Slot { sent, idx });
        if idx != u32::MAX {
            self.inflight += 1;
        }
    }

    /// Takes the heartbeat with request id `rid` out of flight: its session and send time.
    fn take(&mut self, rid: u64) -> Option<(usize, Instant)> {
        let i = usize::try_from(rid.checked_sub(self.base)?).ok()?;
        let slot = self.ring.get_mut(i)?;
        if slot.idx == u32::MAX {
            return None;
        }
        let r = (slot.idx as usize, slot.sent);
        slot.idx = u32::MAX;
        self.inflight -= 1;
        Some(r)
    }

    /// Forgets answered slots at the front and counts timed-out heartbeats as lost (those sent
    /// inside `window` only).
    fn expire(
        &mut self,
        now: Instant,
        timeout: Duration,
        window: (Instant, Instant),
        p: &mut Phase,
    ) {
        while let Some(s) = self.ring.front() {
            if s.idx != u32::MAX {
                if now.saturating_duration_since(s.sent) < timeout {
                    break;
                }
                self.inflight -= 1;
                if s.sent >= window.0 && s.sent < window.1 {
                    p.lost += 1;
                }
            }
            self.ring.pop_front();
            self.base += 1;
        }
    }

    /// Sends heartbeats to catch up with `due` (the number this socket should have sent by
    /// now), within the window.
    fn pump_heartbeats(
        &mut self,
        now: Instant,
        due: u64,
        sent: &mut u64,
        window: usize,
        p: &mut Phase,
        measured: bool,
    ) {
        let n = self.sessions.len();
        if n == 0 {
            return;
        }
        let mut inactive = 0;
        while *sent < due {
            if self.inflight >= window {
                // The server (or the generator) is behind: do not queue without bound.
                if measured {
                    p.skipped += due - *sent;
                }
                *sent = due;
                break;
            }
            let idx = self.cursor % n;
            self.cursor = self.cursor.wrapping_add(1);
            let s = self.sessions[idx];
            if s.state != State::Active {
                inactive += 1;
                if inactive >= n {
                    break;
                }
                continue;
            }
            let rid = self.next_rid();
            let m = Message::Heartbeat(proto::Heartbeat { rid, uuid: s.uuid });
            proto::encode_into(&m, Some(&s.secret), &mut self.enc).expect("a heartbeat encodes");
            let ok = self.send_now(&self.enc);
            *sent += 1;
            // Failed sends keep their slot: the request is lost, and counted so.
            self.push_slot(rid, now, idx as u32);
            if measured {
                p.sent += 1;
                if !ok {
                    p.send_errors += 1;
                }
            }
        }
    }

    /// Reads what is waiting (up to a batch) and accounts for it.
    fn drain(
        &mut self,
        window: (Instant, Instant),
        hist: &mut Histogram<u64>,
        p: &mut Phase,
    ) -> usize {
        let mut got = 0;
        while got < RECV_BATCH {
            let Ok((n, _)) = self.sock.try_recv_from(&mut self.buf) else {
                break;
            };
            got += 1;
            let now = Instant::now();
            let in_window = now >= window.0 && now < window.1;
            self.on_datagram(n, now, in_window, hist, p);
        }
        got
    }

    fn on_datagram(
        &mut self,
        n: usize,
        now: Instant,
        in_window: bool,
        hist: &mut Histogram<u64>,
        p: &mut Phase,
    ) {
        let Ok(m) = proto::decode(&self.buf[..n]) else {
            p.bad += 1;
            return;
        };
        let rid = match (&m, self.kind) {
            (Message::HeartbeatAck(a), Kind::Router) => a.rid,
            // The echo server returns our own Heartbeat.
            (Message::Heartbeat(h), Kind::Echo) => h.rid,
            (Message::Registered(r), Kind::Router) => {
                if let Some((idx, _, _)) = self.hellos.remove(&r.rid) {
                    let s = &mut self.sessions[idx];
                    s.uuid = r.uuid;
                    s.secret = r.secret;
                    s.state = State::Active;
                }
                return;
            }
            (Message::Error(e), Kind::Router) => {
                self.on_error(e.rid, e.code, now, p);
                return;
            }
            _ => {
                p.bad += 1;
                return;
            }
        };
        let Some((idx, sent)) = self.take(rid) else {
            p.late += 1;
            return;
        };
        if !proto::verify_mac(&self.buf[..n], &self.sessions[idx].secret) {
            p.bad += 1;
            return;
        }
        if in_window {
            p.acked += 1;
            let us = now.saturating_duration_since(sent).as_micros();
            stats::record(hist, u64::try_from(us).unwrap_or(u64::MAX));
        }
    }

    fn on_error(&mut self, rid: u64, code: ErrorCode, now: Instant, p: &mut Phase) {
        if let Some((idx, _, _)) = self.hellos.remove(&rid) {
            match code {
                ErrorCode::RateLimited | ErrorCode::RetryLater => {
                    self.hello_queue.push_back((idx, now + HELLO_BACKOFF));
                }
                ErrorCode::Unauthorized => {
                    self.sessions[idx].state = State::New;
                    self.hello_queue.push_back((idx, now));
                }
                other => *p.errors.entry(other.name()).or_default() += 1,
            }
            return;
        }
        let Some((idx, _)) = self.take(rid) else {
            p.late += 1;
            return;
        };
        *p.errors.entry(code.name()).or_default() += 1;
        if code == ErrorCode::UnknownSession && self.sessions[idx].state == State::Active {
            self.sessions[idx].state = State::Resuming;
            p.resumes += 1;
            self.hello_queue.push_back((idx, now));
        }
    }

    /// Waits for an answer or `TICK`, whichever comes first.
    async fn wait(&self) {
        let _ = tokio::time::timeout(TICK, self.sock.readable()).await;
    }

    /// Registers every session of this socket (router targets), or as many as the deadline
    /// allows.
    pub(super) async fn register_all(&mut self, deadline: Instant) {
        if self.kind == Kind::Echo {
            return;
        }
        let now = Instant::now();
        for idx in 0..self.sessions.len() {
            if self.sessions[idx].state == State::New {
                self.hello_queue.push_back((idx, now));
            }
        }
        let mut hist = stats::histogram();
        let mut p = Phase::default();
        let far = now + Duration::from_secs(3600);
        while !(self.hellos.is_empty() && self.hello_queue.is_empty()) && Instant::now() < deadline
        {
            self.pump_hellos(Instant::now());
            self.wait().await;
            while self.drain((far, far), &mut hist, &mut p) == RECV_BATCH {}
            let now = Instant::now();
            self.expire(now, HELLO_RTO, (far, far), &mut p);
        }
        self.hellos.clear();
        self.hello_queue.clear();
    }

    /// Heartbeats at `rate_per_s` from `start` to `end`; counts what falls in `window`.
    pub(super) async fn heartbeat(
        &mut self,
        rate_per_s: f64,
        window_cap: usize,
        timeout: Duration,
        start: Instant,
        window: (Instant, Instant),
    ) -> (Phase, Histogram<u64>) {
        let mut p = Phase::default();
        let mut hist = stats::histogram();
        let mut sent = 0u64;
        let end = window.1;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            let due = if rate_per_s > 0.0 {
                (now.saturating_duration_since(start).as_secs_f64() * rate_per_s) as u64
            } else {
                sent + (window_cap - self.inflight.min(window_cap)) as u64
            };
            let measured = now >= window.0;
            self.pump_heartbeats(now, due, &mut sent, window_cap, &mut p, measured);
            if !self.hello_queue.is_empty() || !self.hellos.is_empty() {
                self.pump_hellos(now);
            }
            if self.drain(window, &mut hist, &mut p) < RECV_BATCH {
                self.wait().await;
                self.drain(window, &mut hist, &mut p);
            }
            self.expire(Instant::now(), timeout, window, &mut p);
        }
        // Let the last requests come back; whatever does not is lost.
        let grace = Instant::now() + timeout;
        while self.inflight > 0 && Instant::now() < grace {
            self.wait().await;
            self.drain(window, &mut hist, &mut p);
            self.expire(Instant::now(), timeout, window, &mut p);
        }
        for s in self.ring.drain(..) {
            if s.idx != u32::MAX && s.sent >= window.0 && s.sent < window.1 {
                p.lost += 1;
            }
        }
        self.inflight = 0;
        self.base = self.rid + 1;
        self.hellos.clear();
        self.hello_queue.clear();
        (p, hist)
    }
}

/// A random 32-byte secret (echo targets: the generator signs, the echo server returns it).
fn random_secret() -> Secret {
    let mut s = [0u8; 32];
    s[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    s[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    Secret(s)
}
