//! `scale`: many sessions, a steady heartbeat rate, and what the server pays for them.
//!
//! For each target (one or more routers, and the plain echo server as the baseline) the run
//! registers `--sessions` sessions over `--sockets` client sockets (many sessions per socket),
//! reads the server's resident memory before and after (`/proc/<pid>/status`), then heartbeats
//! every session at a steady total `--rate`, round-robin over all of them, in `--rounds`
//! measured phases. The targets' phases are interleaved (the order rotates every round), so a
//! noisy machine hurts each of them alike. Each phase reports acks per second, p50/p99/p999
//! latency, losses, and the server's CPU time per answer (`utime + stime` from
//! `/proc/<pid>/stat` over the phase, divided by the answers received in it); the summary gives
//! medians and ranges over the rounds and the ratios to the echo server.
//!
//! The servers are started by the tool (`--router-bin`, the echo server from this very binary)
//! or attached to by address and pid (`--router-addr`/`--router-pid`, `--echo-addr`/
//! `--echo-pid`). Started servers get the flags a load test needs (per-IP Register limits and
//! per-session limits raised, sessions kept alive over the whole run) and, unless
//! `--no-pause-idle`, are stopped with SIGSTOP while another target is measured so that their
//! housekeeping does not steal the measured target's CPU.
//!
//! The echo server answers with the datagram it received: the generator sends the same
//! authenticated Heartbeat datagrams to it and checks the MAC of each echo, so the generator
//! does the same work for either target.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
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
/// How long a started server gets to answer its first datagram.
const STARTUP: Duration = Duration::from_secs(20);

/// Flags of `scale`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Sessions to register on each router (and to simulate against the echo server).
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    /// Heartbeats per second in all, spread evenly over the sessions (0: as fast as the window
    /// allows, to find the ceiling).
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Client sockets per target; the sessions are spread over them.
    #[arg(long, default_value_t = 32)]
    sockets: usize,
    /// Most heartbeats in flight per socket (a send that would exceed it is skipped and counted).
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Seconds of each measured phase.
    #[arg(long, default_value_t = 8.0)]
    duration: f64,
    /// Seconds of heartbeating before each measured phase (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Measured phases per target, interleaved between targets.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// An answer later than this is counted as lost.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Longest time registration may take before the run goes on with the sessions it has.
    #[arg(long, default_value_t = 120.0)]
    register_timeout: f64,
    /// A router binary to start (`PATH` or `LABEL=PATH`; repeat to compare builds side by
    /// side).
    #[arg(long = "router-bin", value_name = "[LABEL=]PATH")]
    router_bins: Vec<String>,
    /// Extra argument for every started router (repeat for several).
    #[arg(long = "router-arg", value_name = "ARG", allow_hyphen_values = true)]
    router_args: Vec<String>,
    /// Address of a router already running (with `--router-pid`); its limits must allow the
    /// load (see the README).
    #[arg(long, requires = "router_pid")]
    router_addr: Option<SocketAddr>,
    /// Pid of the router at `--router-addr`, for its memory and CPU time.
    #[arg(long, requires = "router_addr")]
    router_pid: Option<u32>,
    /// Address of an echo server already running (with `--echo-pid`); by default the tool
    /// starts its own `echo-server`.
    #[arg(long, requires = "echo_pid")]
    echo_addr: Option<SocketAddr>,
    /// Pid of the echo server at `--echo-addr`.
    #[arg(long, requires = "echo_addr")]
    echo_pid: Option<u32>,
    /// Leave the echo baseline out.
    #[arg(long)]
    no_echo: bool,
    /// Sockets (workers) of each started server (0: the server's default).
    #[arg(long, default_value_t = 0)]
    server_workers: usize,
    /// Do not SIGSTOP started servers while another target is measured.
    #[arg(long)]
    no_pause_idle: bool,
    /// Allow target addresses that are not loopback.
    #[arg(long)]
    allow_remote: bool,
}

/// What answers on the other end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Router,
    Echo,
}

/// A server process this tool started; killed when dropped.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = signal(self.0.id(), "CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One server under test.
struct Target {
    label: String,
    kind: Kind,
    addr: SocketAddr,
    pid: u32,
    child: Option<Spawned>,
    socks: Vec<Sock>,
    report: Report,
}

/// What is measured of a target.
#[derive(Default)]
struct Report {
    registered: usize,
    register_s: f64,
    /// Server CPU time spent while registering.
    register_cpu_s: f64,
    rss_before: u64,
    rss_registered: u64,
    rss_end: u64,
    rounds: Vec<Value>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    New,
    Active,
    Resuming,
}

#[derive(Clone, Copy)]
struct Sess {
    uuid: Uuid,
    secret: Secret,
    state: State,
}

/// A heartbeat (or hello) sent and not yet answered, by request id.
#[derive(Clone, Copy)]
struct Slot {
    sent: Instant,
    /// Session index, or `u32::MAX` when answered or not a heartbeat.
    idx: u32,
}

/// One client socket and the sessions it carries.
struct Sock {
    sock: UdpSocket,
    to: SocketAddr,
    kind: Kind,
    sessions: Vec<Sess>,
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
struct Phase {
    sent: u64,
    acked: u64,
    lost: u64,
    late: u64,
    bad: u64,
    skipped: u64,
    send_errors: u64,
    resumes: u64,
    errors: HashMap<&'static str, u64>,
}

impl Sock {
    fn new(sock: UdpSocket, to: SocketAddr, kind: Kind, n: usize) -> Self {
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
        let mut m = if s.state == State::New {
            Message::Register(proto::Register {
                rid,
                local: vec![],
                pad: vec![],
            })
        } else {
            Message::Resume(proto::Resume {
                rid,
                uuid: s.uuid,
                secret: s.secret,
                local: vec![],
                pad: vec![],
            })
        };
        proto::encode_hello(&mut m).expect("a hello always encodes")
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
    async fn register_all(&mut self, deadline: Instant) {
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
    async fn heartbeat(
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

/// Sends a signal (by name, as `kill -NAME`) to a process this tool started.
fn signal(pid: u32, name: &str) -> io::Result<()> {
    let st = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("kill -{name} {pid} failed")))
    }
}

/// Resident memory of `pid` in bytes (`VmRSS`).
pub(crate) fn rss(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// CPU time (user + system, every thread) of `pid`, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); the first field after ')' is field 3.
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux when that cannot be run).
pub(crate) fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// A free UDP port on loopback (bound and released: the server binds it right after).
fn free_port() -> io::Result<u16> {
    let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(s.local_addr()?.port())
}

/// Waits until the server at `to` answers: a Register for a router (one extra session), any
/// datagram for the echo server.
async fn wait_ready(to: SocketAddr, kind: Kind, child: Option<&mut Spawned>) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(bind_for(to)).await?;
    let mut m = Message::Register(proto::Register {
        rid: 1,
        local: vec![],
        pad: vec![],
    });
    let bytes = proto::encode_hello(&mut m)?;
    let deadline = Instant::now() + STARTUP;
    let mut buf = [0u8; 2048];
    let mut child = child;
    while Instant::now() < deadline {
        if let Some(c) = child.as_deref_mut() {
            if let Some(st) = c.0.try_wait()? {
                anyhow::bail!("the server at {to} exited at start ({st})");
            }
        }
        let _ = sock.send_to(&bytes, to).await;
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(100), sock.recv_from(&mut buf)).await
        {
            let ok = match kind {
                Kind::Echo => true,
                Kind::Router => matches!(proto::decode(&buf[..n]), Ok(Message::Registered(_))),
            };
            if ok {
                return Ok(());
            }
        }
    }
    anyhow::bail!("the server at {to} did not answer within {STARTUP:?}")
}

fn bind_for(to: SocketAddr) -> SocketAddr {
    match (to.is_ipv4(), to.ip().is_loopback()) {
        (true, true) => (Ipv4Addr::LOCALHOST, 0).into(),
        (true, false) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        (false, true) => (std::net::Ipv6Addr::LOCALHOST, 0).into(),
        (false, false) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Starts a router binary on a free loopback port with load-test limits.
fn spawn_router(bin: &str, a: &Args) -> anyhow::Result<(SocketAddr, Spawned)> {
    let port = free_port()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let big = "1000000000".to_string();
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .args(["--listen", &addr.to_string(), "--metrics-listen", "off"])
        .args(["--register-rate", &big, "--register-burst", &big])
        .args(["--session-rate", &big, "--session-burst", &big])
        .args(["--max-sessions", &(a.sessions + 1024).to_string()])
        // Sessions must outlive the phases in which they get no heartbeat (another target is
        // measured): 200 missed heartbeats of 15 s.
        .args(["--missed-heartbeats", "200"])
        .args(["--workers", &a.server_workers.to_string()])
        .args(&a.router_args)
        .env("SIGROUTER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {bin}: {e}"))?;
    Ok((addr, Spawned(child)))
}

/// Starts this binary's `echo-server` on a free loopback port.
fn spawn_echo(a: &Args, total_s: f64) -> anyhow::Result<(SocketAddr, Spawned)> {
    let port = free_port()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let me = std::env::current_exe()?;
    let child = Command::new(me)
        .args([
            "--threads",
            "0",
            "echo-server",
            "--listen",
            &addr.to_string(),
        ])
        .args(["--workers", &a.server_workers.to_string()])
        .args(["--duration", &format!("{:.0}", total_s.clamp(60.0, 3600.0))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((addr, Spawned(child)))
}

fn median_range(mut v: Vec<f64>) -> Value {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let m = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({ "median": r(m), "min": r(v[0]), "max": r(v[v.len() - 1]) })
}

fn median_of(rounds: &[Value], key: &str) -> Value {
    median_range(
        rounds
            .iter()
            .filter_map(|r| r.pointer(key).and_then(Value::as_f64))
            .collect(),
    )
}

fn pause(t: &Target, on: bool, allowed: bool) {
    if allowed && t.child.is_some() {
        let _ = signal(t.pid, if on { "STOP" } else { "CONT" });
    }
}

/// Runs the scale test and returns the JSON summary.
pub(crate) async fn run(a: Args) -> anyhow::Result<Option<Value>> {
    let duration = stats::check_duration(a.duration)?;
    anyhow::ensure!(
        a.warmup >= 0.0 && a.warmup <= 600.0,
        "--warmup must be 0..=600 seconds"
    );
    anyhow::ensure!(
        a.sockets >= 1 && a.sockets <= 4096,
        "--sockets must be 1..=4096"
    );
    anyhow::ensure!(
        a.sessions >= a.sockets,
        "--sessions must be at least --sockets"
    );
    anyhow::ensure!(a.sessions <= 10_000_000, "--sessions is at most 10000000");
    anyhow::ensure!(a.rounds >= 1 && a.rounds <= 100, "--rounds must be 1..=100");
    anyhow::ensure!(
        a.window >= 1 && a.window <= 65_536,
        "--window must be 1..=65536"
    );
    anyhow::ensure!(
        !a.router_bins.is_empty() || a.router_addr.is_some() || !a.no_echo,
        "nothing to measure: give --router-bin, --router-addr or leave the echo baseline in"
    );
    let timeout = Duration::from_millis(a.timeout_ms.max(1));
    let pause_idle = !a.no_pause_idle;
    let warmup = Duration::from_secs_f64(a.warmup);
    let phase_s = (warmup + duration + timeout).as_secs_f64() + 0.5;
    // How long a started echo server must live: every registration and every phase, with room.
    let n_targets = a.router_bins.len() + usize::from(a.router_addr.is_some()) + 1;
    let total_s = (a.register_timeout + phase_s * a.rounds as f64 + 0.2) * n_targets as f64 + 60.0;
    let tck = clk_tck();

    // Targets: started routers, an attached router, the echo server.
    let mut targets: Vec<Target> = Vec::new();
    for (i, spec) in a.router_bins.iter().enumerate() {
        let (label, bin) = match spec.split_once('=') {
            Some((l, b)) => (l.to_string(), b.to_string()),
            None if a.router_bins.len() == 1 => ("router".to_string(), spec.clone()),
            None => (format!("router{}", i + 1), spec.clone()),
        };
        let (addr, child) = spawn_router(&bin, &a)?;
        targets.push(Target {
            label,
            kind: Kind::Router,
            addr,
            pid: child.0.id(),
            child: Some(child),
            socks: Vec::new(),
            report: Report::default(),
        });
    }
    if let (Some(addr), Some(pid)) = (a.router_addr, a.router_pid) {
        targets.push(Target {
            label: "router".into(),
            kind: Kind::Router,
            addr,
            pid,
            child: None,
            socks: Vec::new(),
            report: Report::default(),
        });
    }
    if !a.no_echo {
        let (addr, pid, child) = match (a.echo_addr, a.echo_pid) {
            (Some(addr), Some(pid)) => (addr, pid, None),
            _ => {
                let (addr, c) = spawn_echo(&a, total_s)?;
                (addr, c.0.id(), Some(c))
            }
        };
        targets.push(Target {
            label: "echo".into(),
            kind: Kind::Echo,
            addr,
            pid,
            child,
            socks: Vec::new(),
            report: Report::default(),
        });
    }
    stats::check_targets(
        &targets.iter().map(|t| t.addr).collect::<Vec<_>>(),
        a.allow_remote,
    )?;

    // Start-up and registration, one target at a time (the others paused).
    for t in targets.iter_mut() {
        wait_ready(t.addr, t.kind, t.child.as_mut()).await?;
        pause(t, true, pause_idle);
    }
    for t in targets.iter_mut() {
        pause(t, false, pause_idle);
        t.report.rss_before = rss(t.pid)?;
        for w in 0..a.sockets {
            let n = a.sessions / a.sockets + usize::from(w < a.sessions % a.sockets);
            let sock = UdpSocket::bind(bind_for(t.addr)).await?;
            let s2 = socket2::SockRef::from(&sock);
            let _ = s2.set_recv_buffer_size(1 << 20);
            let _ = s2.set_send_buffer_size(1 << 20);
            t.socks.push(Sock::new(sock, t.addr, t.kind, n));
        }
        if t.kind == Kind::Router {
            eprintln!(
                "{}: registering {} sessions over {} sockets",
                t.label, a.sessions, a.sockets
            );
        }
        let cpu0 = cpu_ticks(t.pid)?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(a.register_timeout.clamp(1.0, 3600.0));
        let mut set = tokio::task::JoinSet::new();
        for mut s in t.socks.drain(..) {
            set.spawn(async move {
                s.register_all(deadline).await;
                s
            });
        }
        while let Some(s) = set.join_next().await {
            t.socks.push(s?);
        }
        t.report.register_s = started.elapsed().as_secs_f64();
        t.report.register_cpu_s = cpu_ticks(t.pid)?.saturating_sub(cpu0) as f64 / tck;
        t.report.registered = t
            .socks
            .iter()
            .flat_map(|s| s.sessions.iter())
            .filter(|s| s.state == State::Active)
            .count();
        t.report.rss_registered = rss(t.pid)?;
        if t.kind == Kind::Router {
            eprintln!(
                "{}: {} registered in {:.2}s; RSS {:.1} -> {:.1} MB",
                t.label,
                t.report.registered,
                t.report.register_s,
                t.report.rss_before as f64 / 1e6,
                t.report.rss_registered as f64 / 1e6
            );
            anyhow::ensure!(
                t.report.registered > 0,
                "{}: no session registered",
                t.label
            );
        }
        pause(t, true, pause_idle);
    }

    // Interleaved rounds.
    let per_sock = a.rate as f64 / a.sockets as f64;
    for round in 0..a.rounds {
        let n = targets.len();
        for k in 0..n {
            let t = &mut targets[(round + k) % n];
            pause(t, false, pause_idle);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let start = Instant::now();
            let window = (start + warmup, start + warmup + duration);
            let mut set = tokio::task::JoinSet::new();
            for mut s in t.socks.drain(..) {
                let cap = a.window;
                set.spawn(async move {
                    let r = s.heartbeat(per_sock, cap, timeout, start, window).await;
                    (s, r)
                });
            }
            // CPU over the measured window.
            tokio::time::sleep_until(window.0.into()).await;
            let cpu0 = cpu_ticks(t.pid)?;
            tokio::time::sleep_until(window.1.into()).await;
            let cpu1 = cpu_ticks(t.pid)?;
            let mut p = Phase::default();
            let mut hist = stats::histogram();
            while let Some(r) = set.join_next().await {
                let (s, (sp, h)) = r?;
                t.socks.push(s);
                hist.add(&h).ok();
                p.sent += sp.sent;
                p.acked += sp.acked;
                p.lost += sp.lost;
                p.late += sp.late;
                p.bad += sp.bad;
                p.skipped += sp.skipped;
                p.send_errors += sp.send_errors;
                p.resumes += sp.resumes;
                for (k, v) in sp.errors {
                    *p.errors.entry(k).or_default() += v;
                }
            }
            pause(t, true, pause_idle);
            let secs = duration.as_secs_f64();
            let cpu_s = cpu1.saturating_sub(cpu0) as f64 / tck;
            let per_answer = if p.acked > 0 {
                cpu_s * 1e6 / p.acked as f64
            } else {
                f64::NAN
            };
            let v = json!({
                "round": round + 1,
                "acks_per_s": (p.acked as f64 / secs).round(),
                "sent": p.sent,
                "acked": p.acked,
                "lost": p.lost,
                "late": p.late,
                "bad": p.bad,
                "skipped_window_full": p.skipped,
                "send_errors": p.send_errors,
                "resumes": p.resumes,
                "errors": p.errors,
                "server_cpu_s": (cpu_s * 1000.0).round() / 1000.0,
                "server_cores": ((cpu_s / secs) * 1000.0).round() / 1000.0,
                "cpu_us_per_answer": if per_answer.is_finite() { json!((per_answer * 1000.0).round() / 1000.0) } else { Value::Null },
                "latency": stats::summary(&hist, "us"),
            });
            eprintln!(
                "round {} {}: {:.0} acks/s, {:.2} µs CPU/answer, p50/p99/p999 {}/{}/{} µs, lost {}",
                round + 1,
                t.label,
                p.acked as f64 / secs,
                per_answer,
                v["latency"]["p50"],
                v["latency"]["p99"],
                v["latency"]["p999"],
                p.lost
            );
            t.report.rounds.push(v);
        }
    }

    let mut out = Vec::new();
    let echo = targets.iter().find(|t| t.kind == Kind::Echo).map(|t| {
        (
            median_of(&t.report.rounds, "/acks_per_s"),
            median_of(&t.report.rounds, "/cpu_us_per_answer"),
        )
    });
    for t in targets.iter_mut() {
        pause(t, false, pause_idle);
        t.report.rss_end = rss(t.pid).unwrap_or(0);
        let r = &t.report;
        let acks = median_of(&r.rounds, "/acks_per_s");
        let cpu = median_of(&r.rounds, "/cpu_us_per_answer");
        let mut v = json!({
            "label": t.label,
            "kind": if t.kind == Kind::Router { "router" } else { "echo" },
            "addr": t.addr.to_string(),
            "pid": t.pid,
            "started_by_tool": t.child.is_some(),
            "acks_per_s": acks,
            "cpu_us_per_answer": cpu,
            "latency_us": {
                "p50": median_of(&r.rounds, "/latency/p50"),
                "p99": median_of(&r.rounds, "/latency/p99"),
                "p999": median_of(&r.rounds, "/latency/p999"),
            },
            "lost": r.rounds.iter().filter_map(|x| x["lost"].as_u64()).sum::<u64>(),
            "rounds": r.rounds,
        });
        if t.kind == Kind::Router {
            let grew = r.rss_registered.saturating_sub(r.rss_before);
            v["registered"] = json!(r.registered);
            v["register_s"] = json!((r.register_s * 1000.0).round() / 1000.0);
            v["registers_per_s"] = json!((r.registered as f64 / r.register_s.max(1e-9)).round());
            v["register_cpu_us_per_session"] = json!(
                (r.register_cpu_s * 1e6 / r.registered.max(1) as f64 * 1000.0).round() / 1000.0
            );
            v["rss_before_bytes"] = json!(r.rss_before);
            v["rss_registered_bytes"] = json!(r.rss_registered);
            v["rss_end_bytes"] = json!(r.rss_end);
            v["rss_bytes_per_session"] = json!((grew as f64 / r.registered.max(1) as f64).round());
            if let Some((e_acks, e_cpu)) = &echo {
                let ratio =
                    |x: &Value, y: &Value| match (x["median"].as_f64(), y["median"].as_f64()) {
                        (Some(x), Some(y)) if y > 0.0 => json!((x / y * 1000.0).round() / 1000.0),
                        _ => Value::Null,
                    };
                v["vs_echo"] = json!({
                    "acks_per_s_ratio": ratio(&acks, e_acks),
                    "cpu_per_answer_ratio": ratio(&cpu, e_cpu),
                });
            }
        }
        out.push(v);
    }
    let summary = json!({
        "mode": "scale",
        "sessions": a.sessions,
        "rate": a.rate,
        "sockets": a.sockets,
        "window": a.window,
        "duration_s": duration.as_secs_f64(),
        "warmup_s": a.warmup,
        "rounds": a.rounds,
        "paused_idle": pause_idle,
        "targets": out,
    });
    drop(targets);
    Ok(Some(summary))
}
