//! Shared helpers for integration tests: a real node on a free loopback port and a raw UDP
//! client that crafts datagrams with the protocol codec (no mocks anywhere).
//!
//! Here: [`Node`] and cluster settings. `raw` (the hand-driven client), `exchange` (Connect,
//! answers, Signal relay between two of them), `redis_server` (a real redis-server), `serve`
//! (whole `sigrouter serve` processes for the operations tests), `fleet` (a fleet of them
//! sharing one Redis), `rcluster` (a real Redis Cluster).
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod fleet;
pub mod rcluster;
pub mod serve;

mod exchange;
mod raw;
mod redis_server;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use exchange::{answer, assert_offline, connect, outcome, signal};
#[allow(unused_imports)]
pub use raw::{payload, recv_msg, Raw};
#[allow(unused_imports)]
pub use redis_server::{wait_presence, Redis};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sigrouter::server::Server;
use sigrouter::Config;
use tokio::task::JoinHandle;

/// A node running in this process until dropped.
pub struct Node {
    pub addr: SocketAddr,
    pub cluster: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub router: std::sync::Arc<sigrouter::router::Router>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        ..Config::default()
    }
}

/// Logs to stderr when TEST_LOG is set (e.g. `TEST_LOG=sigrouter=debug`).
pub fn init_log() {
    if let Ok(f) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .with_test_writer()
            .try_init();
    }
}

impl Node {
    pub async fn start(cfg: Config) -> Self {
        init_log();
        let server = Server::bind(cfg).await.expect("bind");
        let addr = server.local_addr();
        let metrics = server.metrics_addr();
        let cluster = server.cluster_addr();
        let router = server.router();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            cluster,
            metrics,
            router,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The sum of a node's metric lines starting with `line_prefix` (e.g.
/// `sigrouter_dropped_total{reason="bad_mac"}`), read from its own recorder.
pub fn metric(node: &Node, line_prefix: &str) -> f64 {
    node.router
        .metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Polls `f` until it is true or `t` passes; returns whether it became true.
pub async fn eventually(t: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + t;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port outside the kernel's ephemeral range (32768+), free for TCP and UDP, so nothing
/// else takes it while a test has a server stopped and is about to start it again there.
pub fn stable_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 400) as u16 * 25;
    loop {
        let p = base + NEXT.fetch_add(1, Ordering::Relaxed) % 10_000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
        {
            return p;
        }
    }
}

pub const CLUSTER_KEY: &[u8] = b"test-cluster-key-0123456789abcdef0123456789";

/// A cluster node config on free loopback ports.
pub fn cluster_config(redis: &str, id: &str) -> Config {
    let mut cfg = test_config();
    let mut cc = sigrouter::config::ClusterConfig::new(
        redis,
        id,
        "127.0.0.1:0".parse().unwrap(),
        CLUSTER_KEY.to_vec(),
    );
    cc.registry_period = Duration::from_millis(300);
    cc.table_period = Duration::from_millis(300);
    // Generous for a loaded 2-core CI machine; outages still fail fast (connection refused).
    cc.redis_timeout = Duration::from_millis(1000);
    cc.drain = Duration::from_secs(5);
    cfg.cluster = Some(cc);
    cfg
}

/// Waits until every node's table lists `n` nodes.
pub async fn wait_for_nodes(nodes: &[&Node], n: usize) {
    let ok = eventually(Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|x| x.router.cluster().is_some_and(|c| c.table().len() >= n))
    })
    .await;
    assert!(ok, "nodes never saw {n} nodes in their tables");
}

/// Default deadline for one expected message.
pub const T: Duration = Duration::from_secs(5);
