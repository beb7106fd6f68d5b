//! `flood`: a Register flood from many spoofed-looking sources against a node that serves live
//! clients, to show what the flood costs the node and its clients.
//!
//! The tool starts `sigrouter serve` itself (on loopback, with the limits given), registers a
//! set of live client-library clients (each from its own loopback address, as real clients come
//! from their own addresses), and measures their heartbeat and connect latency for a quiet
//! phase. Then, while the live clients keep going, it sends `--registers` padded Registers
//! from `--sources` distinct source addresses (the whole 127.0.0.0/8 is loopback on Linux:
//! each source is its own 127.x.y.z) as fast as it can, and reads the node's own figures
//! (`/metrics`, `/proc/<pid>/status`). The summary gives, per phase, the live clients'
//! heartbeat and connect percentiles and failures; for the flood, datagrams and bytes in and
//! out, answers by kind, sessions created, and resident memory before, after and per flood
//! datagram. `passed` is false when a live client failed a connect or a heartbeat, or when the
//! flood created more sessions than the node-wide budget allows.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args as ClapArgs;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use sigrouter_client::{Client, ClientConfig, ConnectOutcome, Event};
use sigrouter_proto::{self as proto, Message};
use tokio::net::UdpSocket;

use crate::stats;

/// Flags of `flood`.
#[derive(ClapArgs, Debug, Clone)]
pub(crate) struct Args {
    /// The `sigrouter` binary to start.
    #[arg(long, default_value = "target/release/sigrouter")]
    router_bin: String,
    /// Registers in the flood.
    #[arg(long, default_value_t = 100_000)]
    registers: u32,
    /// Distinct source addresses they come from (127.100.0.0 upwards).
    #[arg(long, default_value_t = 10_000)]
    sources: u32,
    /// Live clients (each from its own address) heartbeating and connecting all along.
    #[arg(long, default_value_t = 50)]
    live: u32,
    /// Seconds of quiet measurement before the flood.
    #[arg(long, default_value_t = 5.0)]
    quiet_secs: f64,
    /// Sessions the node may create by Register per second (its --new-session-rate).
    #[arg(long, default_value_t = 10_000)]
    new_session_rate: u32,
    /// Its --new-session-burst.
    #[arg(long, default_value_t = 20_000)]
    new_session_burst: u32,
    /// Extra flags for `sigrouter serve` (repeat: `--serve-flag=--stun-rate=5`).
    #[arg(long = "serve-flag")]
    serve_flags: Vec<String>,
}

/// What the live clients saw in one phase.
#[derive(Default)]
struct Phase {
    heartbeats: Option<Histogram<u64>>,
    connects: Option<Histogram<u64>>,
    failures: BTreeMap<String, u64>,
}

impl Phase {
    fn new() -> Self {
        Self {
            heartbeats: Some(stats::histogram()),
            connects: Some(stats::histogram()),
            failures: BTreeMap::new(),
        }
    }

    fn summary(&self) -> Value {
        json!({
            "heartbeat_ms": self.heartbeats.as_ref().map(|h| stats::summary(h, "ms")),
            "connect_ms": self.connects.as_ref().map(|h| stats::summary(h, "ms")),
            "failures": self.failures,
        })
    }
}

struct Node {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start(a: &Args) -> anyhow::Result<Node> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?).parse()?;
    let mut cmd = Command::new(&a.router_bin);
    cmd.args(["serve", "--listen", &addr.to_string()])
        .args(["--metrics-listen", &metrics.to_string()])
        .args(["--new-session-rate", &a.new_session_rate.to_string()])
        .args(["--new-session-burst", &a.new_session_burst.to_string()])
        .args(&a.serve_flags)
        .env("SIGROUTER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", a.router_bin))?;
    Ok(Node {
        child,
        addr,
        metrics,
    })
}

/// One metric from the node's `/metrics` (the sum of every series of `name` whose labels
/// contain `label`).
async fn metric(at: SocketAddr, name: &str, label: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(at).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

fn rss(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// The live client `i`'s own source address (127.1.x.y).
fn live_source(i: u32) -> SocketAddr {
    let [_, _, hi, lo] = i.to_be_bytes();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 1, hi, lo.max(1))), 0)
}

/// Flood source `i` (127.100.0.0 upwards).
fn flood_source(i: u32) -> SocketAddr {
    let [_, a, b, c] = (0x0064_0000u32 + i).to_be_bytes();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, a, b, c.max(1))), 0)
}

async fn live_client(server: SocketAddr, i: u32) -> anyhow::Result<Client> {
    let mut cfg = ClientConfig::new(server);
    cfg.bind = Some(live_source(i));
    let (client, mut events) = Client::register(cfg).await?;
    let c = client.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let Event::Incoming { connection, .. } = ev {
                let c = c.clone();
                tokio::spawn(async move {
                    let _ = c.accept(connection, b"ok").await;
                });
            }
        }
    });
    Ok(client)
}

/// Runs the live clients' load (one heartbeat and one connect per client per 200 ms) into
/// whichever phase `current` points at, until `stop`.
fn live_load(
    clients: Arc<Vec<Client>>,
    current: Arc<Mutex<Phase>>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients.len())
        .map(|i| {
            let (clients, current, stop) = (clients.clone(), current.clone(), stop.clone());
            tokio::spawn(async move {
                let me = &clients[i];
                let peer = clients[(i + 1) % clients.len()].uuid();
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let t = Instant::now();
                    let hb = me.heartbeat().await;
                    let hb_us = t.elapsed().as_micros() as u64;
                    let t = Instant::now();
                    let c = me.connect(peer, b"live").await;
                    let c_us = t.elapsed().as_micros() as u64;
                    let mut p = current.lock().unwrap_or_else(|e| e.into_inner());
                    match hb {
                        Ok(_) => stats::record(p.heartbeats.as_mut().expect("set"), hb_us),
                        Err(e) => *p.failures.entry(format!("heartbeat: {e}")).or_default() += 1,
                    }
                    match c {
                        Ok(ConnectOutcome::Connected { .. }) => {
                            stats::record(p.connects.as_mut().expect("set"), c_us)
                        }
                        Ok(ConnectOutcome::Failed { reason, .. }) => {
                            *p.failures
                                .entry(format!("connect: {}", reason.name()))
                                .or_default() += 1
                        }
                        Err(e) => *p.failures.entry(format!("connect: {e}")).or_default() += 1,
                    }
                }
            })
        })
        .collect()
}

/// Answers to the flood, by kind, and bytes.
#[derive(Default)]
struct FloodCount {
    sent: AtomicU64,
    bytes_in: AtomicU64,
    answers: AtomicU64,
    bytes_out: AtomicU64,
    registered: AtomicU64,
    refused: AtomicU64,
}

/// Sends `per` Registers from each of `sources` sources (one socket each, a few hundred at a
/// time), and counts what comes back.
async fn flood(server: SocketAddr, a: &Args, count: Arc<FloodCount>) -> anyhow::Result<Duration> {
    let per = a.registers.div_ceil(a.sources.max(1));
    let started = Instant::now();
    let mut next = 0u32;
    const AT_ONCE: u32 = 256;
    while next < a.sources {
        let batch: Vec<u32> = (next..(next + AT_ONCE).min(a.sources)).collect();
        next += batch.len() as u32;
        let mut tasks = Vec::new();
        for i in batch {
            let count = count.clone();
            let sock = UdpSocket::bind(flood_source(i)).await.with_context(|| {
                format!(
                    "binding {} (is 127.0.0.0/8 loopback here?)",
                    flood_source(i)
                )
            })?;
            tasks.push(tokio::spawn(async move {
                for rid in 1..=u64::from(per) {
                    let mut m = Message::Register(proto::Register {
                        rid,
                        local: vec![],
                        pad: vec![],
                    });
                    let Ok(d) = proto::encode_hello(&mut m) else {
                        return;
                    };
                    if sock.send_to(&d, server).await.is_ok() {
                        count.sent.fetch_add(1, Ordering::Relaxed);
                        count.bytes_in.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                }
                // Collect the answers that come within a moment.
                let mut buf = [0u8; 2048];
                let end = tokio::time::Instant::now() + Duration::from_millis(300);
                while let Ok(Ok((n, _))) =
                    tokio::time::timeout_at(end, sock.recv_from(&mut buf)).await
                {
                    count.answers.fetch_add(1, Ordering::Relaxed);
                    count.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    match proto::decode(&buf[..n]) {
                        Ok(Message::Registered(_)) => {
                            count.registered.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            count.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
    Ok(started.elapsed())
}

/// Runs the flood and returns the summary.
pub(crate) async fn run(a: Args) -> anyhow::Result<Option<Value>> {
    anyhow::ensure!(a.live >= 2, "--live must be at least 2");
    let node = start(&a)?;
    let pid = node.child.id();
    // Wait until it answers.
    let end = Instant::now() + Duration::from_secs(10);
    while metric(node.metrics, "sigrouter_sessions", "")
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < end, "the node never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut clients = Vec::new();
    for i in 0..a.live {
        clients.push(live_client(node.addr, i + 1).await?);
    }
    let clients = Arc::new(clients);
    let rss_before = rss(pid)?;
    let created_before = metric(node.metrics, "sigrouter_sessions_registered_total", "").await?;

    let quiet = Arc::new(Mutex::new(Phase::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = live_load(clients.clone(), quiet.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs_f64(a.quiet_secs)).await;
    // Switch the live clients' figures to the flood phase.
    let during = Arc::new(Mutex::new(Phase::new()));
    {
        let mut q = quiet.lock().unwrap_or_else(|e| e.into_inner());
        let mut d = during.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *q, &mut *d);
    }
    // `quiet` now holds the flood phase's (empty) figures; `during` the quiet phase's.
    let (quiet_phase, flood_phase) = (during, quiet);
    let count = Arc::new(FloodCount::default());
    let took = flood(node.addr, &a, count.clone()).await?;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        let _ = t.await;
    }
    let rss_after = rss(pid)?;
    let created =
        metric(node.metrics, "sigrouter_sessions_registered_total", "").await? - created_before;
    let limited = metric(node.metrics, "sigrouter_rate_limited_total", "").await?;
    let budget = f64::from(a.new_session_burst)
        + f64::from(a.new_session_rate) * took.as_secs_f64()
        + f64::from(a.new_session_rate); // the last second's tokens, for timing slack
    let q = quiet_phase.lock().unwrap_or_else(|e| e.into_inner());
    let f = flood_phase.lock().unwrap_or_else(|e| e.into_inner());
    let live_ok = q.failures.is_empty() && f.failures.is_empty();
    let ld = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let sent = ld(&count.sent).max(1);
    Ok(Some(json!({
        "registers": a.registers,
        "sources": a.sources,
        "live_clients": a.live,
        "flood_secs": took.as_secs_f64(),
        "live_quiet": q.summary(),
        "live_during_flood": f.summary(),
        "flood": {
            "datagrams_in": ld(&count.sent),
            "bytes_in": ld(&count.bytes_in),
            "answers": ld(&count.answers),
            "bytes_out": ld(&count.bytes_out),
            "bytes_out_per_byte_in": ld(&count.bytes_out) as f64 / ld(&count.bytes_in).max(1) as f64,
            "registered_answers": ld(&count.registered),
            "refused_answers": ld(&count.refused),
            "sessions_created": created,
            "session_budget": budget,
            "rate_limited_total": limited,
        },
        "rss": {
            "before_bytes": rss_before,
            "after_bytes": rss_after,
            "growth_per_flood_datagram_bytes": (rss_after.saturating_sub(rss_before)) as f64 / sent as f64,
        },
        "passed": live_ok && created <= budget,
    })))
}
