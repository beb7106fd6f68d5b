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

mod answers;
mod requests;

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
