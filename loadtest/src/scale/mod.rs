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

pub(crate) mod procs;
mod report;
mod sock;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::UdpSocket;

use crate::stats;
use procs::{
    bind_for, clk_tck, cpu_ticks, rss, signal, spawn_echo, spawn_router, wait_ready, Spawned,
};
use report::median_of;
use sock::{Kind, Phase, Sock, State};

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

/// Stops (`on`) or continues a target the tool started, when pausing idle targets is allowed.
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
        let (addr, child) = spawn_router(&bin, a.sessions, a.server_workers, &a.router_args)?;
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
                let (addr, c) = spawn_echo(a.server_workers, total_s)?;
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
