//! The simulated fleet: many sessions per UDP socket, each session with its own source
//! address. A socket ("lane") is bound to the wildcard address on one port and sends each
//! session's datagrams from a loopback address of its own (127.x.y.z, chosen per datagram with
//! `IP_PKTINFO` through quinn-udp); the address a datagram arrives at says which session it is
//! for. So a push, which names no session, is matched to its session at once, and every session
//! follows its own `Migrate` exactly as a client would: verify the MAC, acknowledge, resume at
//! the node named (from the same address: a real client opens a new port, which costs the
//! router nothing more).
//!
//! Lanes do, by phase: register their sessions at their home node; while holding, follow
//! `Migrate` (and `Error Draining` redirects), accept `Incoming`, and, on background lanes,
//! heartbeat at a steady rate and time every answer; in the check phase, heartbeat every
//! session once at the node holding it.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use sigrouter_proto::{self as proto, ErrorCode, Message, Secret};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use uuid::Uuid;

use crate::stats;

/// Registers or resumes in flight per lane.
const HELLO_WINDOW: usize = 2048;
/// A Register or Resume unanswered for this long is sent again (same request id).
const HELLO_RTO: Duration = Duration::from_millis(1000);
/// Sends of one Register or Resume before it is started afresh (new request id).
const HELLO_TRIES: u8 = 5;
/// Pause before a hello refused with `RateLimited`, `RetryLater` or `Capacity` is sent again.
const HELLO_BACKOFF: Duration = Duration::from_millis(200);
/// A heartbeat unanswered for this long is lost (background load: never sent again).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// Check-phase heartbeats in flight per lane, and sends of each.
const CHECK_WINDOW: usize = 2048;
const CHECK_TRIES: u8 = 4;
/// Background heartbeats in flight per lane at most.
const BG_WINDOW: usize = 8192;
/// Longest wait for the socket before the lane looks at its timers.
const TICK: Duration = Duration::from_millis(2);
/// Seconds covered by the per-second timelines (since SIGTERM).
pub(crate) const TIMELINE_S: usize = 120;

/// Phases of the run, set by the conductor, read by every lane.
pub(crate) const REGISTER: u8 = 0;
pub(crate) const HOLD: u8 = 1;
pub(crate) const CHECK: u8 = 2;
pub(crate) const STOP: u8 = 3;

/// What the lanes share with the conductor.
#[derive(Default)]
pub(crate) struct Ctl {
    pub(crate) phase: AtomicU8,
    /// When the loaded node got SIGTERM.
    pub(crate) t0: OnceLock<Instant>,
    /// When the drain was over (every session resumed, or the node gone).
    pub(crate) t_done: OnceLock<Instant>,
    /// When the measured time after the drain ended (the reachability check follows, and its
    /// burst of heartbeats is not the steady load measured).
    pub(crate) t_after_end: OnceLock<Instant>,
    pub(crate) registered: AtomicU64,
    pub(crate) register_refused: AtomicU64,
    /// Sessions that got their first Migrate.
    pub(crate) migrated: AtomicU64,
    /// Copies of a Migrate already followed (retransmissions), acknowledged again.
    pub(crate) migrate_repeats: AtomicU64,
    pub(crate) resumed: AtomicU64,
    /// Resumes refused with `Draining` and sent on to the node named.
    pub(crate) redirected: AtomicU64,
    /// Resumes refused for now (RateLimited, RetryLater, Capacity) and sent again.
    pub(crate) resume_retried: AtomicU64,
    /// Resumes refused for good (`Unauthorized`: the session was lost).
    pub(crate) resume_lost: AtomicU64,
    /// Resumes sent again after no answer.
    pub(crate) resume_retransmits: AtomicU64,
    /// Check phase: sessions whose heartbeat their node answered, and those it did not.
    pub(crate) check_acked: AtomicU64,
    pub(crate) check_failed: AtomicU64,
    /// Incoming pushes accepted, and their Accepts acknowledged.
    pub(crate) incoming: AtomicU64,
    pub(crate) accepted: AtomicU64,
    /// Datagrams that did not decode, failed their MAC, or matched no session.
    pub(crate) bad: AtomicU64,
    /// Sends the kernel refused.
    pub(crate) send_errors: AtomicU64,
}

impl Ctl {
    pub(crate) fn phase(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }

    pub(crate) fn set_phase(&self, p: u8) {
        self.phase.store(p, Ordering::Release);
    }

    fn count(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The source address of session `j` of a lane: 127.(1+j/65536).(j/256%256).(j%256).
/// Unique within a lane; lanes differ by port.
pub(crate) fn session_ip(j: usize) -> Ipv4Addr {
    let j = j as u32;
    Ipv4Addr::new(
        127,
        1 + (j >> 16) as u8,
        ((j >> 8) & 0xff) as u8,
        (j & 0xff) as u8,
    )
}

/// The session index of a source address from [`session_ip`].
fn session_of(ip: IpAddr) -> Option<usize> {
    let IpAddr::V4(v4) = ip else { return None };
    let o = v4.octets();
    if o[0] != 127 || o[1] == 0 {
        return None;
    }
    Some((((o[1] - 1) as usize) << 16) | ((o[2] as usize) << 8) | o[3] as usize)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum St {
    New,
    Held,
    Resuming,
    Lost,
}

/// One simulated client.
#[derive(Clone, Copy)]
pub(crate) struct Sess {
    pub(crate) uuid: Uuid,
    secret: Secret,
    /// Index of the node holding it (or being asked to).
    pub(crate) node: u8,
    pub(crate) state: St,
    /// Milliseconds since SIGTERM when its first Migrate arrived, and when it resumed
    /// (`u32::MAX`: not yet).
    pub(crate) migrated_ms: u32,
    pub(crate) resumed_ms: u32,
    checked: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Register,
    Resume,
    Heartbeat,
    Check,
    Accept,
}

/// A request in flight.
#[derive(Clone, Copy)]
struct Req {
    j: u32,
    kind: Kind,
    /// Node index it went to.
    node: u8,
    sent: Instant,
    first: Instant,
    tries: u8,
    /// Accept: the connection.
    conn: Uuid,
}

/// Per-second counts since SIGTERM, and background heartbeat latency by phase.
pub(crate) struct LaneReport {
    pub(crate) migrates_per_s: Vec<u64>,
    pub(crate) resumes_per_s: Vec<u64>,
    /// Background heartbeats: latency (µs) before SIGTERM, during the drain, after it, and
    /// during the reachability check (not reported).
    pub(crate) hb: [Histogram<u64>; 4],
    /// Background heartbeat latency (µs) per second since SIGTERM.
    pub(crate) hb_per_s: Vec<Histogram<u64>>,
    pub(crate) hb_sent: [u64; 4],
    pub(crate) hb_lost: [u64; 4],
    pub(crate) hb_errors: HashMap<&'static str, u64>,
    /// Check-phase heartbeats that failed, by error code or `timeout`.
    pub(crate) check_failures: HashMap<&'static str, u64>,
}

impl LaneReport {
    fn new() -> Self {
        Self {
            migrates_per_s: vec![0; TIMELINE_S],
            resumes_per_s: vec![0; TIMELINE_S],
            hb: [
                stats::histogram(),
                stats::histogram(),
                stats::histogram(),
                stats::histogram(),
            ],
            hb_per_s: (0..TIMELINE_S).map(|_| stats::histogram()).collect(),
            hb_sent: [0; 4],
            hb_lost: [0; 4],
            hb_errors: HashMap::new(),
            check_failures: HashMap::new(),
        }
    }
}

/// One socket and the sessions it carries.
pub(crate) struct Lane {
    sock: UdpSocket,
    udp: UdpSocketState,
    pub(crate) sessions: Vec<Sess>,
    /// Client addresses of the nodes, by index.
    nodes: Arc<Vec<SocketAddr>>,
    /// Background heartbeats per second from this lane (0: none).
    bg_rate: f64,
    ctl: Arc<Ctl>,
    rid: u64,
    pending: HashMap<u64, Req>,
    /// Request ids by time of (last) sending, to find the unanswered ones.
    order: VecDeque<(u64, Instant)>,
    /// Sessions waiting for a Register or Resume, with the earliest time to send it.
    hellos: VecDeque<(u32, Instant)>,
    hellos_in_flight: usize,
    checks_in_flight: usize,
    check_cursor: usize,
    bg_in_flight: usize,
    bg_cursor: usize,
    bg_sent: u64,
    bg_start: Option<Instant>,
    out: VecDeque<(Vec<u8>, SocketAddr, u32)>,
    enc: Vec<u8>,
    bufs: Box<[[u8; 2048]; quinn_udp::BATCH_SIZE]>,
    meta: [RecvMeta; quinn_udp::BATCH_SIZE],
    pub(crate) report: LaneReport,
}

fn ms_since(t0: Option<&Instant>, now: Instant) -> u32 {
    t0.map_or(0, |t| {
        u32::try_from(now.saturating_duration_since(*t).as_millis()).unwrap_or(u32::MAX - 1)
    })
}

impl Lane {
    /// A lane of `n` sessions whose home is node `home`; `bg_rate` heartbeats per second
    /// once they are held (background lanes), none otherwise.
    pub(crate) async fn new(
        n: usize,
        nodes: Arc<Vec<SocketAddr>>,
        home: u8,
        bg_rate: f64,
        ctl: Arc<Ctl>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            n <= 250 * 65_536,
            "at most {} sessions per lane",
            250 * 65_536
        );
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
        let s2 = socket2::SockRef::from(&sock);
        let _ = s2.set_recv_buffer_size(8 << 20);
        let _ = s2.set_send_buffer_size(8 << 20);
        let udp = UdpSocketState::new((&sock).into())?;
        let sessions = vec![
            Sess {
                uuid: Uuid::nil(),
                secret: Secret([0; 32]),
                node: home,
                state: St::New,
                migrated_ms: u32::MAX,
                resumed_ms: u32::MAX,
                checked: false,
            };
            n
        ];
        let now = Instant::now();
        let bufs: Box<[[u8; 2048]; quinn_udp::BATCH_SIZE]> =
            vec![[0u8; 2048]; quinn_udp::BATCH_SIZE]
                .into_boxed_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("receive buffers"))?;
        Ok(Self {
            sock,
            udp,
            sessions,
            nodes,
            bg_rate,
            ctl,
            rid: 0,
            pending: HashMap::new(),
            order: VecDeque::new(),
            hellos: (0..n as u32).map(|j| (j, now)).collect(),
            hellos_in_flight: 0,
            checks_in_flight: 0,
            check_cursor: 0,
            bg_in_flight: 0,
            bg_cursor: 0,
            bg_sent: 0,
            bg_start: None,
            out: VecDeque::new(),
            enc: Vec::with_capacity(128),
            bufs,
            meta: [RecvMeta::default(); quinn_udp::BATCH_SIZE],
            report: LaneReport::new(),
        })
    }

    fn next_rid(&mut self) -> u64 {
        self.rid += 1;
        self.rid
    }

    fn node_index(&self, a: SocketAddr) -> Option<u8> {
        self.nodes.iter().position(|n| *n == a).map(|i| i as u8)
    }

    /// Runs until the STOP phase.
    pub(crate) async fn run(mut self) -> Self {
        loop {
            let phase = self.ctl.phase();
            if phase == STOP {
                return self;
            }
            let now = Instant::now();
            self.pump_hellos(now);
            if phase == CHECK {
                self.pump_checks(now);
            }
            if self.bg_rate > 0.0 && phase != REGISTER {
                self.pump_background(now);
            }
            self.retransmit(now);
            if let Err(e) = self.flush() {
                if e.kind() != io::ErrorKind::WouldBlock {
                    Ctl::count(&self.ctl.send_errors);
                }
            }
            let got = self.receive();
            if got == 0 {
                let writable = !self.out.is_empty();
                let interest = if writable {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                let _ = tokio::time::timeout(TICK, self.sock.ready(interest)).await;
            } else {
                // Let the other lanes (and the runtime) have the thread now and then.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Queues a datagram from session `j` to node address `to`.
    fn send(&mut self, j: u32, to: SocketAddr, bytes: Vec<u8>) {
        self.out.push_back((bytes, to, j));
    }

    /// Sends what is queued, until the socket's buffer is full.
    fn flush(&mut self) -> io::Result<()> {
        while let Some((bytes, to, j)) = self.out.front() {
            let t = Transmit {
                destination: *to,
                ecn: None,
                contents: bytes,
                segment_size: None,
                src_ip: Some(IpAddr::V4(session_ip(*j as usize))),
            };
            let r = self.sock.try_io(Interest::WRITABLE, || {
                self.udp.try_send((&self.sock).into(), &t)
            });
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(_) => Ctl::count(&self.ctl.send_errors),
            }
            self.out.pop_front();
        }
        Ok(())
    }

    /// Receives up to a few batches; returns how many datagrams arrived.
    fn receive(&mut self) -> usize {
        let mut total = 0;
        for _ in 0..8 {
            let n = {
                let Self {
                    sock,
                    udp,
                    bufs,
                    meta,
                    ..
                } = self;
                let sock = &*sock;
                let mut iovs = bufs.each_mut().map(|b| IoSliceMut::new(&mut b[..]));
                match sock.try_io(Interest::READABLE, || {
                    udp.recv(sock.into(), &mut iovs, meta)
                }) {
                    Ok(n) => n,
                    Err(_) => break,
                }
            };
            let now = Instant::now();
            for i in 0..n {
                let m = self.meta[i];
                let len = m.len.min(2048);
                let stride = if m.stride == 0 { len } else { m.stride };
                let mut off = 0;
                let mut one = [0u8; 2048];
                while off < len {
                    let end = (off + stride).min(len);
                    one[..end - off].copy_from_slice(&self.bufs[i][off..end]);
                    self.on_datagram(now, m.addr, m.dst_ip, &one[..end - off]);
                    off = end;
                    total += 1;
                }
            }
            if n < quinn_udp::BATCH_SIZE {
                break;
            }
        }
        total
    }

    /// Starts a request: records it and queues its datagram.
    fn request(&mut self, now: Instant, j: u32, kind: Kind, node: u8, conn: Uuid) {
        let rid = self.next_rid();
        let req = Req {
            j,
            kind,
            node,
            sent: now,
            first: now,
            tries: 1,
            conn,
        };
        if let Some(bytes) = self.encode(rid, &req) {
            self.pending.insert(rid, req);
            self.order.push_back((rid, now));
            let to = self.nodes[node as usize];
            self.send(j, to, bytes);
        }
    }

    fn encode(&mut self, rid: u64, req: &Req) -> Option<Vec<u8>> {
        let s = self.sessions[req.j as usize];
        match req.kind {
            Kind::Register => {
                let mut m = Message::Register(proto::Register {
                    rid,
                    local: vec![],
                    token: Vec::new(),
                    pad: vec![],
                });
                proto::encode_hello(&mut m).ok()
            }
            Kind::Resume => {
                let mut m = Message::Resume(proto::Resume {
                    rid,
                    uuid: s.uuid,
                    secret: s.secret,
                    local: vec![],
                    token: Vec::new(),
                    pad: vec![],
                });
                proto::encode_hello(&mut m).ok()
            }
            Kind::Heartbeat | Kind::Check => {
                let m = Message::Heartbeat(proto::Heartbeat { rid, uuid: s.uuid });
                proto::encode_into(&m, Some(&s.secret), &mut self.enc).ok()?;
                Some(self.enc.clone())
            }
            Kind::Accept => {
                let m = Message::Accept(proto::Answer {
                    rid,
                    uuid: s.uuid,
                    connection: req.conn,
                    payload: proto::Payload::from(b"ok".to_vec()),
                });
                proto::encode_into(&m, Some(&s.secret), &mut self.enc).ok()?;
                Some(self.enc.clone())
            }
        }
    }

    /// Sends due Registers and Resumes within the window.
    fn pump_hellos(&mut self, now: Instant) {
        while self.hellos_in_flight < HELLO_WINDOW {
            let Some(&(j, at)) = self.hellos.front() else {
                break;
            };
            if at > now {
                break;
            }
            self.hellos.pop_front();
            let s = self.sessions[j as usize];
            let kind = match s.state {
                St::New => Kind::Register,
                St::Resuming => Kind::Resume,
                St::Held | St::Lost => continue,
            };
            self.hellos_in_flight += 1;
            self.request(now, j, kind, s.node, Uuid::nil());
        }
    }

    /// Check phase: one heartbeat per held session, at the node holding it.
    fn pump_checks(&mut self, now: Instant) {
        while self.checks_in_flight < CHECK_WINDOW && self.check_cursor < self.sessions.len() {
            let j = self.check_cursor;
            self.check_cursor += 1;
            let s = self.sessions[j];
            if s.state != St::Held || s.checked {
                continue;
            }
            self.checks_in_flight += 1;
            self.request(now, j as u32, Kind::Check, s.node, Uuid::nil());
        }
    }

    /// Background heartbeats: round-robin over the held sessions at `bg_rate` per second.
    fn pump_background(&mut self, now: Instant) {
        let start = *self.bg_start.get_or_insert(now);
        let due = (now.saturating_duration_since(start).as_secs_f64() * self.bg_rate) as u64;
        let n = self.sessions.len();
        let mut skipped = 0;
        while self.bg_sent < due && self.bg_in_flight < BG_WINDOW && skipped < n {
            let j = self.bg_cursor % n;
            self.bg_cursor += 1;
            let s = self.sessions[j];
            if s.state != St::Held {
                skipped += 1;
                continue;
            }
            self.bg_sent += 1;
            self.bg_in_flight += 1;
            let w = self.window(now);
            self.report.hb_sent[w] += 1;
            self.request(now, j as u32, Kind::Heartbeat, s.node, Uuid::nil());
        }
        if self.bg_sent < due {
            // Behind (window full or nothing held): do not build up a burst.
            self.bg_sent = due;
        }
    }

    /// 0 before SIGTERM, 1 during the drain, 2 after it, 3 in the reachability check.
    fn window(&self, t: Instant) -> usize {
        if self.ctl.t_after_end.get().is_some_and(|e| t >= *e) {
            return 3;
        }
        match (self.ctl.t0.get(), self.ctl.t_done.get()) {
            (Some(t0), _) if t < *t0 => 0,
            (None, _) => 0,
            (Some(_), Some(done)) if t >= *done => 2,
            _ => 1,
        }
    }

    fn second(&self, t: Instant) -> Option<usize> {
        let t0 = self.ctl.t0.get()?;
        let s = t.checked_duration_since(*t0)?.as_secs() as usize;
        (s < TIMELINE_S).then_some(s)
    }

    /// Sends unanswered hellos and checks again; gives up on old heartbeats.
    fn retransmit(&mut self, now: Instant) {
        while let Some(&(rid, sent)) = self.order.front() {
            let Some(req) = self.pending.get(&rid).copied() else {
                self.order.pop_front();
                continue;
            };
            if req.sent != sent {
                // Sent again since: its newer entry is further back.
                self.order.pop_front();
                continue;
            }
            let rto = match req.kind {
                Kind::Heartbeat => HEARTBEAT_TIMEOUT,
                _ => HELLO_RTO,
            };
            if now.saturating_duration_since(sent) < rto {
                break;
            }
            self.order.pop_front();
            match req.kind {
                Kind::Heartbeat => {
                    self.pending.remove(&rid);
                    self.bg_in_flight -= 1;
                    let w = self.window(req.first);
                    self.report.hb_lost[w] += 1;
                }
                Kind::Register | Kind::Resume if req.tries >= HELLO_TRIES => {
                    // Start afresh with a new request id.
                    self.pending.remove(&rid);
                    self.hellos_in_flight -= 1;
                    self.hellos.push_back((req.j, now));
                }
                Kind::Check if req.tries >= CHECK_TRIES => {
                    self.pending.remove(&rid);
                    self.checks_in_flight -= 1;
                    self.sessions[req.j as usize].checked = true;
                    Ctl::count(&self.ctl.check_failed);
                    *self.report.check_failures.entry("timeout").or_default() += 1;
                }
                Kind::Accept if req.tries >= CHECK_TRIES => {
                    self.pending.remove(&rid);
                }
                _ => {
                    if req.kind == Kind::Resume {
                        Ctl::count(&self.ctl.resume_retransmits);
                    }
                    let mut r = req;
                    r.sent = now;
                    r.tries += 1;
                    if let Some(bytes) = self.encode(rid, &r) {
                        self.pending.insert(rid, r);
                        self.order.push_back((rid, now));
                        let to = self.nodes[r.node as usize];
                        self.send(r.j, to, bytes);
                    }
                }
            }
        }
    }

    fn on_datagram(&mut self, now: Instant, src: SocketAddr, dst: Option<IpAddr>, buf: &[u8]) {
        let Some(j) = dst
            .and_then(session_of)
            .filter(|j| *j < self.sessions.len())
        else {
            Ctl::count(&self.ctl.bad);
            return;
        };
        let Ok(msg) = proto::decode(buf) else {
            Ctl::count(&self.ctl.bad);
            return;
        };
        if msg.ty().is_authenticated() && !proto::verify_mac(buf, &self.sessions[j].secret) {
            Ctl::count(&self.ctl.bad);
            return;
        }
        let j32 = j as u32;
        match msg {
            Message::Registered(r) => {
                let Some(req) = self.take(r.rid, j32) else {
                    return;
                };
                self.hellos_in_flight -= 1;
                let s = &mut self.sessions[j];
                s.uuid = r.uuid;
                s.secret = r.secret;
                s.node = req.node;
                let was = s.state;
                s.state = St::Held;
                match req.kind {
                    Kind::Register => Ctl::count(&self.ctl.registered),
                    _ if was == St::Resuming => {
                        let ms = ms_since(self.ctl.t0.get(), now);
                        self.sessions[j].resumed_ms = ms;
                        Ctl::count(&self.ctl.resumed);
                        if let Some(sec) = self.second(now) {
                            self.report.resumes_per_s[sec] += 1;
                        }
                    }
                    _ => {}
                }
            }
            Message::Error(e) | Message::SessionError(e) => {
                let Some(req) = self.take(e.rid, j32) else {
                    return;
                };
                self.on_refusal(now, j32, req, e.code, e.to.map(|a| a.0));
            }
            Message::HeartbeatAck(a) => {
                let Some(req) = self.take(a.rid, j32) else {
                    return;
                };
                match req.kind {
                    Kind::Heartbeat => {
                        self.bg_in_flight -= 1;
                        let us = now.saturating_duration_since(req.first).as_micros() as u64;
                        let w = self.window(req.first);
                        stats::record(&mut self.report.hb[w], us);
                        if let Some(sec) = self.second(req.first).filter(|_| w < 3) {
                            stats::record(&mut self.report.hb_per_s[sec], us);
                        }
                    }
                    Kind::Check => {
                        self.checks_in_flight -= 1;
                        self.sessions[j].checked = true;
                        Ctl::count(&self.ctl.check_acked);
                    }
                    _ => {}
                }
            }
            Message::Ack(a) => {
                if self.take(a.rid, j32).is_some() {
                    Ctl::count(&self.ctl.accepted);
                }
            }
            Message::Migrate(m) => {
                self.push_ack(j32, m.push, src);
                let from = self.node_index(src);
                let s = self.sessions[j];
                if s.state == St::Held && from == Some(s.node) {
                    Ctl::count(&self.ctl.migrated);
                    let ms = ms_since(self.ctl.t0.get(), now);
                    if let Some(sec) = self.second(now) {
                        self.report.migrates_per_s[sec] += 1;
                    }
                    let to =
                        m.to.and_then(|a| self.node_index(a.0))
                            .unwrap_or_else(|| self.other_node(s.node));
                    let s = &mut self.sessions[j];
                    s.migrated_ms = ms;
                    s.state = St::Resuming;
                    s.node = to;
                    self.hellos.push_back((j32, now));
                } else {
                    Ctl::count(&self.ctl.migrate_repeats);
                }
            }
            Message::Incoming(i) => {
                self.push_ack(j32, i.push, src);
                if let Some(node) = self.node_index(src) {
                    Ctl::count(&self.ctl.incoming);
                    self.request(now, j32, Kind::Accept, node, i.connection);
                }
            }
            Message::SignalPush(p) => self.push_ack(j32, p.push, src),
            _ => Ctl::count(&self.ctl.bad),
        }
    }

    /// The request `rid` of session `j`, taken out of flight.
    fn take(&mut self, rid: u64, j: u32) -> Option<Req> {
        match self.pending.get(&rid) {
            Some(r) if r.j == j => self.pending.remove(&rid),
            _ => None,
        }
    }

    /// A node that is not `n` (a Migrate without an address, or a redirect to nowhere known).
    fn other_node(&self, n: u8) -> u8 {
        let k = self.nodes.len() as u8;
        let pick = (rand::random::<u8>() % (k - 1).max(1)) + 1;
        (n + pick) % k
    }

    fn on_refusal(
        &mut self,
        now: Instant,
        j: u32,
        req: Req,
        code: ErrorCode,
        to: Option<SocketAddr>,
    ) {
        match req.kind {
            Kind::Register | Kind::Resume => {
                self.hellos_in_flight -= 1;
                let s = &mut self.sessions[j as usize];
                match code {
                    ErrorCode::Draining => {
                        // A client never asks a draining node again: go where it says.
                        Ctl::count(&self.ctl.redirected);
                        let to = to
                            .and_then(|a| self.node_index(a))
                            .filter(|n| *n != req.node)
                            .unwrap_or_else(|| self.other_node(req.node));
                        self.sessions[j as usize].node = to;
                        self.hellos.push_back((j, now));
                    }
                    ErrorCode::RateLimited | ErrorCode::RetryLater | ErrorCode::Capacity => {
                        if req.kind == Kind::Resume {
                            Ctl::count(&self.ctl.resume_retried);
                        }
                        self.hellos.push_back((j, now + HELLO_BACKOFF));
                    }
                    ErrorCode::Unauthorized if req.kind == Kind::Resume => {
                        s.state = St::Lost;
                        Ctl::count(&self.ctl.resume_lost);
                    }
                    _ => {
                        if req.kind == Kind::Register {
                            Ctl::count(&self.ctl.register_refused);
                            s.state = St::Lost;
                        } else {
                            s.state = St::Lost;
                            Ctl::count(&self.ctl.resume_lost);
                        }
                    }
                }
            }
            Kind::Heartbeat => {
                self.bg_in_flight -= 1;
                *self.report.hb_errors.entry(code.name()).or_default() += 1;
            }
            Kind::Check => {
                self.checks_in_flight -= 1;
                self.sessions[j as usize].checked = true;
                Ctl::count(&self.ctl.check_failed);
                *self.report.check_failures.entry(code.name()).or_default() += 1;
            }
            Kind::Accept => {}
        }
    }

    fn push_ack(&mut self, j: u32, push: u64, to: SocketAddr) {
        let s = self.sessions[j as usize];
        let m = Message::PushAck(proto::PushAck { uuid: s.uuid, push });
        if proto::encode_into(&m, Some(&s.secret), &mut self.enc).is_ok() {
            let b = self.enc.clone();
            self.send(j, to, b);
        }
    }

    /// Sessions of this lane that are held, as (uuid, node index).
    pub(crate) fn held(&self) -> impl Iterator<Item = (Uuid, u8)> + '_ {
        self.sessions
            .iter()
            .filter(|s| s.state == St::Held)
            .map(|s| (s.uuid, s.node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_addresses_round_trip_and_stay_in_loopback() {
        for j in [
            0usize,
            1,
            255,
            256,
            65_535,
            65_536,
            1_000_000,
            250 * 65_536 - 1,
        ] {
            let ip = session_ip(j);
            assert!(ip.is_loopback(), "{ip}");
            assert_eq!(session_of(IpAddr::V4(ip)), Some(j), "{ip}");
        }
        assert_eq!(session_of(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))), None);
    }
}
