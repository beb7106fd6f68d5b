//! Heartbeat throughput with hand-made datagrams.
//!
//! `--sockets` sockets, each owned by one task that registers its share of the `--clients`
//! sessions, then keeps `--window` heartbeats in flight, round-robin over its sessions, until
//! the duration passes. Request ids come from one counter per socket, so each session's ids
//! increase as the protocol asks. An answer not back within `--timeout-ms` counts as lost (no
//! retransmission: this measures, it does not hide loss).
//!
//! The sessions keep working through a node's restart or drain: `Error UnknownSession` makes
//! the session `Resume`; a `Migrate` moves the socket's sessions on that node to where it says
//! (from the same socket: the point here is load, not NAT behaviour).
//!
//! `--echo` sends datagrams of a Heartbeat's size to `echo-server` and counts the echoes: the
//! same loop without the protocol, for the router/echo ratio.

mod worker;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sigrouter_proto::{self as proto, Message, Secret};
use tokio::net::UdpSocket;
use uuid::Uuid;

use crate::stats;
use worker::{Counts, Sess, State, Worker};

/// Flags of `heartbeat`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Router (or echo server) address.
    #[arg(long)]
    server: SocketAddr,
    /// Sessions to register and heartbeat, spread over the sockets.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Seconds of heartbeating (registration comes first and is not counted).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Heartbeats in flight per socket.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// UDP sockets (each with its own task and source port).
    #[arg(long, default_value_t = 4)]
    sockets: usize,
    /// An answer later than this is counted as lost.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Longest time registration may take before the run starts with the sessions it has.
    #[arg(long, default_value_t = 60.0)]
    register_timeout: f64,
    /// Talk to `echo-server` instead of a router: no sessions, count echoes.
    #[arg(long)]
    echo: bool,
    /// Allow a server address that is not loopback.
    #[arg(long)]
    allow_remote: bool,
}

/// Runs the heartbeat load and returns the JSON summary.
pub(crate) async fn run(a: Args) -> anyhow::Result<Option<Value>> {
    stats::check_targets(&[a.server], a.allow_remote)?;
    let duration = stats::check_duration(a.duration)?;
    anyhow::ensure!(a.sockets >= 1, "--sockets must be at least 1");
    anyhow::ensure!(
        a.window >= 1 && a.window <= 4096,
        "--window must be 1..=4096"
    );
    anyhow::ensure!(
        a.echo || a.clients >= a.sockets,
        "--clients must be at least --sockets"
    );
    anyhow::ensure!(a.clients <= 1_000_000, "--clients is at most 1000000");
    let timeout = Duration::from_millis(a.timeout_ms.max(1));
    let bind: SocketAddr = if a.server.is_ipv4() {
        ([127, 0, 0, 1], 0).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    };
    let bind = if a.server.ip().is_loopback() {
        bind
    } else {
        SocketAddr::new(
            if a.server.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            },
            0,
        )
    };
    // A dummy Heartbeat fixes the echo datagram size.
    let echo_len = proto::encode(
        &Message::Heartbeat(proto::Heartbeat {
            rid: u64::MAX / 3,
            uuid: Uuid::new_v4(),
        }),
        Some(&Secret([0; 32])),
    )?
    .len();

    let mut workers = Vec::with_capacity(a.sockets);
    for w in 0..a.sockets {
        let n = if a.echo {
            1
        } else {
            a.clients / a.sockets + usize::from(w < a.clients % a.sockets)
        };
        let sock = UdpSocket::bind(bind).await?;
        let sessions = (0..n)
            .map(|_| Sess {
                uuid: Uuid::nil(),
                secret: Secret([0; 32]),
                server: a.server,
                state: if a.echo { State::Active } else { State::New },
            })
            .collect();
        workers.push(Worker {
            sock,
            sessions,
            rid: 0,
            inflight: HashMap::with_capacity(a.window * 2),
            order: VecDeque::with_capacity(a.window * 2),
            hellos: HashMap::new(),
            drained: HashMap::new(),
            hello_queue: VecDeque::new(),
            cursor: w,
            window: a.window,
            timeout,
            echo: a.echo,
            echo_len,
            hist: stats::histogram(),
            c: Counts::default(),
            send_errors: AtomicU64::new(0),
            buf: vec![0u8; 2048],
        });
    }

    let reg_started = Instant::now();
    let mut registered = 0usize;
    let mut rate_limited_hellos = 0u64;
    if !a.echo {
        eprintln!(
            "registering {} sessions over {} sockets at {}",
            a.clients, a.sockets, a.server
        );
        let deadline = reg_started + Duration::from_secs_f64(a.register_timeout.clamp(1.0, 600.0));
        let mut set = tokio::task::JoinSet::new();
        for mut w in workers.drain(..) {
            set.spawn(async move {
                w.register_all(deadline).await;
                w
            });
        }
        while let Some(w) = set.join_next().await {
            let w = w?;
            registered += w
                .sessions
                .iter()
                .filter(|s| s.state == State::Active)
                .count();
            rate_limited_hellos += w.c.register_rate_limited;
            workers.push(w);
        }
        anyhow::ensure!(registered > 0, "no session registered (is the router up?)");
        if registered < a.clients {
            eprintln!(
                "only {registered}/{} sessions registered in time; raise the server's \
                 --register-rate/--register-burst for load tests",
                a.clients
            );
        }
    }
    let register_s = reg_started.elapsed().as_secs_f64();

    eprintln!(
        "{} for {:.1}s: {} sockets, window {}",
        if a.echo { "echo" } else { "heartbeating" },
        duration.as_secs_f64(),
        a.sockets,
        a.window
    );
    let started = Instant::now();
    let end = started + duration;
    let mut set = tokio::task::JoinSet::new();
    for mut w in workers.drain(..) {
        set.spawn(async move {
            w.heartbeat_until(end).await;
            w
        });
    }
    let mut hist = stats::histogram();
    let mut c = Counts::default();
    let mut send_errors = 0;
    while let Some(w) = set.join_next().await {
        let w = w?;
        hist.add(&w.hist).ok();
        c.sent += w.c.sent;
        c.acked += w.c.acked;
        c.lost += w.c.lost;
        c.late += w.c.late;
        c.bad_mac += w.c.bad_mac;
        c.undecodable += w.c.undecodable;
        c.resumes += w.c.resumes;
        c.migrates += w.c.migrates;
        c.other_pushes += w.c.other_pushes;
        send_errors += w.send_errors.load(Ordering::Relaxed);
        for (k, v) in w.c.errors {
            *c.errors.entry(k).or_default() += v;
        }
    }
    let secs = duration.as_secs_f64();
    Ok(Some(json!({
        "mode": if a.echo { "echo" } else { "heartbeat" },
        "server": a.server.to_string(),
        "sockets": a.sockets,
        "window": a.window,
        "clients": if a.echo { 0 } else { a.clients },
        "registered": registered,
        "register_s": (register_s * 1000.0).round() / 1000.0,
        "register_rate_limited": rate_limited_hellos,
        "duration_s": secs,
        "sent": c.sent,
        "acked": c.acked,
        "lost": c.lost,
        "late": c.late,
        "bad_mac": c.bad_mac,
        "undecodable": c.undecodable,
        "send_errors": send_errors,
        "errors": c.errors,
        "resumes": c.resumes,
        "migrates": c.migrates,
        "other_pushes": c.other_pushes,
        "acks_per_s": (c.acked as f64 / secs).round(),
        "latency": stats::summary(&hist, "us"),
    })))
}
