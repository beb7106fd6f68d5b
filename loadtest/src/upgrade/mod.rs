//! `rolling-upgrade`: a whole cluster on this machine (redis-server, N `sigrouter serve`
//! processes, optionally an nginx UDP proxy in front of them), a fleet of client-library
//! clients connecting between random pairs at a fixed rate, and every node restarted in turn
//! with drain (SIGTERM, wait for the exit, start again with the same id and ports) while the
//! load runs. Writes DIR/result.json and DIR/report.svg; the summary says whether the run
//! passed: no failed connect after the upgrade, at least 99.9 % successful during it.
//!
//! The run, in seconds since the load started (`--duration` D):
//! - before: the first 20 % of D (at least 3 s);
//! - the upgrade: node k gets SIGTERM at 20 % + k × 50 % / N of D, or once node k−1 is ready
//!   again if that is later; it ends `--settle-secs` after the last node is ready;
//! - after: until D, and at least 25 % of D (at least 3 s) past the upgrade's end, so the run
//!   lasts longer than D when the restarts took longer than planned.
//!
//! Connects are put in a phase by the time they started.
//!
//! # Layout
//! - `procs`: redis-server, the nodes, nginx.
//! - `fleet`: the clients and the open-loop generator.
//! - `report`: phases, percentiles, timeline, the plot.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::distributions::{Alphanumeric, DistString};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

mod fleet;
pub(crate) mod procs;
mod report;

use fleet::Fleet;
use procs::{start_all, Exit, Nginx, Node, NodeSettings, Redis};
use report::{Phase, Restart, Window};

/// The least share of connects that must succeed during the upgrade.
const MIN_DURING_SUCCESS: f64 = 0.999;

/// What stands in front of the nodes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proxy {
    /// Nothing: each client is configured with one node and knows the others as fallbacks.
    None,
    /// An nginx stream (UDP) proxy; clients know only its address, nodes publish it as
    /// `--public-addr` (the post-mortem's topology).
    Nginx,
}

/// Flags of `rolling-upgrade`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Clients (sessions) in the fleet, all in this process.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Seconds of load (see the run's phases above); the run may last longer.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Directory for result.json, report.svg, and the processes' logs.
    #[arg(long)]
    out: PathBuf,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// What stands in front of the nodes.
    #[arg(long, value_enum, default_value_t = Proxy::None)]
    proxy: Proxy,
    /// Connects started per second over the whole fleet (open loop).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// The `sigrouter` binary (default: the one next to this executable).
    #[arg(long)]
    sigrouter: Option<PathBuf>,
    /// Seconds after the last node is ready again that still count as the upgrade (other
    /// nodes' tables take up to one refresh period to list it again).
    #[arg(long, default_value_t = 2.0)]
    settle_secs: f64,
    /// `--drain-secs` for the nodes (default: the node's own default, 20 s).
    #[arg(long)]
    drain_secs: Option<f64>,
    /// Clients registering at the same time during setup.
    #[arg(long, default_value_t = 64)]
    register_parallel: usize,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The processes of the run, stopped when dropped.
struct Cluster {
    _redis: Redis,
    nodes: Vec<Node>,
    nginx: Option<Nginx>,
}

async fn start_cluster(a: &Args, bin: &std::path::Path) -> anyhow::Result<Cluster> {
    let redis = Redis::start(&a.out).await?;
    let key_file = a.out.join("cluster.key");
    std::fs::write(
        &key_file,
        Alphanumeric.sample_string(&mut rand::thread_rng(), 48),
    )?;
    let proxy_addr = match a.proxy {
        Proxy::Nginx => Some(procs::loopback(procs::free_port()?)),
        Proxy::None => None,
    };
    let settings = NodeSettings {
        bin,
        redis_url: &redis.url(),
        key_file: &key_file,
        public_addr: proxy_addr,
        drain_secs: a.drain_secs,
        dir: &a.out,
    };
    let mut nodes = (1..=a.nodes)
        .map(|i| Node::new(&format!("n{i}"), &settings))
        .collect::<anyhow::Result<Vec<_>>>()?;
    start_all(&mut nodes).await?;
    let nginx = match proxy_addr {
        Some(addr) => {
            let up: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
            Some(Nginx::start(&a.out, addr, &up).await?)
        }
        None => None,
    };
    Ok(Cluster {
        _redis: redis,
        nodes,
        nginx,
    })
}

/// Restarts one node with drain; the times are seconds since `t0`.
async fn restart(
    node: &mut Node,
    drain_allowance: Duration,
    t0: Instant,
) -> anyhow::Result<Restart> {
    let sigterm = secs(t0.elapsed());
    eprintln!("[{sigterm:6.1}s] SIGTERM {}", node.id);
    let exit = match node.drain(drain_allowance).await? {
        Exit::Exited(s) => s.to_string(),
        Exit::Killed => "killed".to_string(),
    };
    let exited = secs(t0.elapsed());
    node.start()?;
    node.wait_ready(Duration::from_secs(30)).await?;
    let ready = secs(t0.elapsed());
    eprintln!(
        "[{ready:6.1}s] {} ready again (drain {:.2}s, {exit})",
        node.id,
        exited - sigterm
    );
    Ok(Restart {
        id: node.id.clone(),
        sigterm,
        exited,
        exit,
        ready,
    })
}

fn validate(a: &Args) -> anyhow::Result<Duration> {
    let duration = crate::stats::check_duration(a.duration)?;
    anyhow::ensure!(
        (2..=1_000_000).contains(&a.clients),
        "--clients must be 2..=1000000"
    );
    anyhow::ensure!((2..=16).contains(&a.nodes), "--nodes must be 2..=16");
    anyhow::ensure!(
        a.rate > 0.0 && a.rate <= 100_000.0,
        "--rate must be in (0, 100000]"
    );
    anyhow::ensure!(
        (0.0..=60.0).contains(&a.settle_secs),
        "--settle-secs must be 0..=60"
    );
    Ok(duration)
}

/// Runs the rolling upgrade under load and returns the summary (`passed` says whether the
/// criteria held).
pub(crate) async fn run(a: Args) -> anyhow::Result<Option<Value>> {
    let duration = validate(&a)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let bin = match &a.sigrouter {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("sigrouter"),
    };
    anyhow::ensure!(bin.exists(), "no sigrouter binary at {}", bin.display());
    eprintln!(
        "starting redis-server and {} nodes ({:?} proxy)",
        a.nodes, a.proxy
    );
    let mut cluster = start_cluster(&a, &bin).await?;
    let (servers, fallbacks): (Vec<SocketAddr>, Vec<SocketAddr>) = match &cluster.nginx {
        Some(n) => (vec![n.addr], vec![]),
        None => {
            let all: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.addr).collect();
            (all.clone(), all)
        }
    };
    eprintln!("registering {} clients", a.clients);
    let reg_started = Instant::now();
    let fleet =
        Arc::new(Fleet::register(a.clients, &servers, &fallbacks, a.register_parallel).await?);
    let register_s = secs(reg_started.elapsed());
    eprintln!("registered in {register_s:.1}s; connecting at {}/s", a.rate);

    let t0 = Instant::now();
    let (end_tx, end_rx) = watch::channel(None);
    let load = tokio::spawn({
        let fleet = fleet.clone();
        let rate = a.rate;
        async move { fleet.load(rate, t0, end_rx).await }
    });
    let d = secs(duration);
    let before = (0.2 * d).max(3.0);
    let spacing = 0.5 * d / a.nodes as f64;
    let drain_allowance = Duration::from_secs_f64(a.drain_secs.unwrap_or(20.0) + 10.0);
    let mut restarts = Vec::new();
    let mut errors = Vec::new();
    for (k, node) in cluster.nodes.iter_mut().enumerate() {
        sleep_until(t0 + Duration::from_secs_f64(before + k as f64 * spacing)).await;
        match restart(node, drain_allowance, t0).await {
            Ok(r) => restarts.push(r),
            Err(e) => {
                eprintln!("restart of {} failed: {e:#}", node.id);
                errors.push(format!("restart of {}: {e:#}", node.id));
            }
        }
    }
    let first = restarts.first().map_or(before, |r: &Restart| r.sigterm);
    let last_ready = secs(t0.elapsed());
    let window = Window {
        from: first,
        to: last_ready + a.settle_secs,
    };
    let stop = d.max(window.to + (0.25 * d).max(3.0));
    let _ = end_tx.send(Some(t0 + Duration::from_secs_f64(stop)));
    eprintln!(
        "upgrade over at {:.1}s; load continues until {stop:.1}s",
        window.to
    );
    let records = load.await?;
    let events = fleet.events.json();
    if let Ok(f) = Arc::try_unwrap(fleet) {
        f.close().await;
    }
    let logs: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.log().display().to_string())
        .collect();
    let nginx_conf = cluster
        .nginx
        .as_ref()
        .map(|n| n.conf().display().to_string());
    cluster.nodes.clear();
    drop(cluster);

    let phase = |p: Phase| {
        report::summarize(
            records
                .iter()
                .filter(move |r| window.phase(secs(r.start)) == p),
        )
    };
    let (pb, pd, pa) = (
        phase(Phase::Before),
        phase(Phase::During),
        phase(Phase::After),
    );
    let after_failed = pa["failed"].as_u64().unwrap_or(0);
    let during_rate = pd["success_rate"].as_f64();
    let mut reasons = errors.clone();
    if after_failed > 0 {
        reasons.push(format!("{after_failed} connects failed after the upgrade"));
    }
    match during_rate {
        Some(r) if r < MIN_DURING_SUCCESS => reasons.push(format!(
            "{:.3} % of connects succeeded during the upgrade (at least {:.1} % required)",
            r * 100.0,
            MIN_DURING_SUCCESS * 100.0
        )),
        None => reasons.push("no connect started during the upgrade".into()),
        _ => {}
    }
    let passed = reasons.is_empty();
    let secs_tl = report::timeline(&records);
    let result = json!({
        "tool": "sigrouter-loadtest rolling-upgrade",
        "params": {
            "clients": a.clients,
            "duration_s": d,
            "nodes": a.nodes,
            "proxy": format!("{:?}", a.proxy).to_lowercase(),
            "rate_per_s": a.rate,
            "settle_s": a.settle_secs,
            "drain_secs": a.drain_secs,
        },
        "register_s": report::round3(register_s),
        "run_s": report::round3(stop),
        "upgrade": { "from_s": report::round3(window.from), "to_s": report::round3(window.to) },
        "restarts": restarts.iter().map(Restart::json).collect::<Vec<_>>(),
        "phases": { "before": pb, "during": pd, "after": pa },
        "total": report::summarize(records.iter()),
        "client_events": events,
        "timeline": report::timeline_json(&secs_tl),
        "criteria": {
            "after_failed_max": 0,
            "during_success_min": MIN_DURING_SUCCESS,
            "passed": passed,
            "reasons": reasons,
        },
        "logs": { "nodes": logs, "nginx_conf": nginx_conf },
    });
    let result_path = a.out.join("result.json");
    std::fs::write(&result_path, serde_json::to_string_pretty(&result)?)?;
    let svg = a.out.join("report.svg");
    let title = format!(
        "rolling upgrade of {} nodes{}: {} clients, {}/s connects",
        a.nodes,
        if a.proxy == Proxy::Nginx {
            " behind nginx"
        } else {
            ""
        },
        a.clients,
        a.rate
    );
    report::plot(&svg, &title, &secs_tl, &restarts, window)?;
    let brief = |p: &Value| json!({"attempts": p["attempts"], "connected": p["connected"], "outcomes": p["outcomes"], "p99_ms": p["latency_all"]["p99"]});
    Ok(Some(json!({
        "mode": "rolling-upgrade",
        "passed": passed,
        "reasons": result["criteria"]["reasons"],
        "before": brief(&result["phases"]["before"]),
        "during": brief(&result["phases"]["during"]),
        "after": brief(&result["phases"]["after"]),
        "restarts": result["restarts"],
        "result": result_path.display().to_string(),
        "report": svg.display().to_string(),
    })))
}
