//! A fleet of real `sigrouter serve` processes on loopback sharing one redis-server, with
//! clients built on the client library: for the Redis outage and node death tests.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sigrouter_client::{Client, ClientConfig, ConnectOutcome, Event, FailReason};
use uuid::Uuid;

use super::{eventually, stable_port, Redis, CLUSTER_KEY};

/// `sigrouter serve` flags of a cluster node with test-speed timings: heartbeats every 0.5 s,
/// a 6 s drain, registry and table refreshes well under a second, generous Register limits,
/// one worker.
pub fn fast_node_args(
    addr: SocketAddr,
    metrics: SocketAddr,
    redis: &str,
    id: &str,
    cluster: SocketAddr,
    key_file: &std::path::Path,
) -> Vec<String> {
    let (addr, metrics, cluster) = (addr.to_string(), metrics.to_string(), cluster.to_string());
    [
        "serve",
        "--listen",
        &addr,
        "--metrics-listen",
        &metrics,
        "--redis-url",
        redis,
        "--node-id",
        id,
        "--cluster-listen",
        &cluster,
        "--cluster-key-file",
        key_file.to_str().unwrap(),
        "--heartbeat-secs",
        "0.5",
        "--drain-secs",
        "6",
        "--registry-period-secs",
        "0.3",
        "--table-refresh-secs",
        "0.5",
        "--redis-timeout-ms",
        "300",
        "--register-rate",
        "1000",
        "--register-burst",
        "1000",
        "--workers",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One `sigrouter serve` process; its ports are fixed, so a restart comes back at the same
/// addresses.
pub struct Proc {
    pub id: String,
    pub addr: SocketAddr,
    pub cluster: SocketAddr,
    pub metrics: SocketAddr,
    args: Vec<String>,
    child: Option<Child>,
}

impl Proc {
    fn new(redis: &str, id: &str, key_file: &std::path::Path, extra: &[String]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", stable_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", stable_port()).parse().unwrap();
        let cluster: SocketAddr = format!("127.0.0.1:{}", stable_port()).parse().unwrap();
        let mut args = fast_node_args(addr, metrics, redis, id, cluster, key_file);
        args.extend_from_slice(extra);
        Self {
            id: id.to_string(),
            addr,
            cluster,
            metrics,
            args,
            child: None,
        }
    }

    pub fn start(&mut self) {
        self.child = Some(spawn_sigrouter(&self.args));
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// A counter or gauge of this node, summed over its label sets.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = http_get(self.metrics, "/metrics").await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A directory for the fleet sharing `redis`, and the cluster key file written in it.
pub fn key_dir(redis: &Redis) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "sigrouter-fleet-{}-{}",
        std::process::id(),
        redis.port
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("cluster.key");
    std::fs::write(&key, CLUSTER_KEY).unwrap();
    (dir, key)
}

/// Starts the `sigrouter` binary of this build with `args`; its log (level from
/// `TEST_SIGROUTER_LOG`, default `warn`) goes to the test's stderr.
pub fn spawn_sigrouter(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sigrouter"))
        .args(args)
        .env(
            "SIGROUTER_LOG",
            std::env::var("TEST_SIGROUTER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sigrouter")
}

/// The body of `GET path`, if the endpoint answered 200.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    match super::serve::http_get(addr, path).await? {
        (200, body) => Some(body),
        _ => None,
    }
}

/// Nodes and their Redis.
pub struct Fleet {
    pub redis: Redis,
    _dir: std::path::PathBuf,
    pub nodes: Vec<Proc>,
}

impl Fleet {
    /// `n` nodes, each told every other node's cluster address (`--peers`), all ready and
    /// listed in the registry.
    pub async fn start(n: usize, extra: &[&str]) -> Self {
        let redis = Redis::start();
        let (dir, key) = key_dir(&redis);
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut nodes: Vec<Proc> = (0..n)
            .map(|i| Proc::new(&redis.url(), &format!("n{}", i + 1), &key, &extra))
            .collect();
        let clusters: Vec<String> = nodes.iter().map(|p| p.cluster.to_string()).collect();
        for (i, p) in nodes.iter_mut().enumerate() {
            let others: Vec<&str> = clusters
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, c)| c.as_str())
                .collect();
            p.args.push("--peers".into());
            p.args.push(others.join(","));
            p.start();
        }
        let f = Self {
            redis,
            _dir: dir,
            nodes,
        };
        for p in &f.nodes {
            f.wait_ready(p).await;
        }
        let ok = eventually(Duration::from_secs(10), || {
            let v = f.redis.cmd(&["HKEYS", "sigrouter:{nodes}"]);
            matches!(v, Ok(redis::Value::Array(ref a)) if a.len() == n)
        })
        .await;
        assert!(ok, "registry never listed every node");
        for p in &f.nodes {
            let deadline = Instant::now() + Duration::from_secs(10);
            while p.metric("sigrouter_cluster_nodes").await < n as f64 {
                assert!(Instant::now() < deadline, "{} never saw the fleet", p.id);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        f
    }

    pub async fn wait_ready(&self, p: &Proc) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if http_get(p.metrics, "/readyz").await.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} never became ready", p.id);
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|p| p.addr).collect()
    }

    /// Waits until every client's presence record names a node.
    pub async fn wait_presence(&self, clients: &[Client]) {
        let ok = eventually(Duration::from_secs(10), || {
            clients.iter().all(|c| {
                let key = format!("sigrouter:presence:{{{}}}", c.uuid().simple());
                matches!(self.redis.cmd(&["EXISTS", &key]), Ok(redis::Value::Int(1)))
            })
        })
        .await;
        assert!(ok, "presence never published");
    }
}

/// A client of `server` (the others as fallbacks) that accepts every incoming connection.
pub async fn acceptor(server: SocketAddr, all: &[SocketAddr]) -> Client {
    let mut cfg = ClientConfig::new(server);
    cfg.fallback_servers = all.to_vec();
    let (client, mut events) = Client::register(cfg).await.expect("register");
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
    client
}

/// One connect through the library (which itself retries retry-later until its deadline):
/// the outcome's name.
pub async fn connect_name(from: &Client, to: Uuid) -> String {
    match from.connect(to, b"hello").await {
        Ok(ConnectOutcome::Connected { .. }) => "connected".into(),
        Ok(ConnectOutcome::Failed { reason, .. }) => reason.name().to_string(),
        Err(e) => format!("error: {e}"),
    }
}

/// Connects, retrying retry-later for up to `within`; the final outcome's name.
pub async fn connect_with_retries(from: &Client, to: Uuid, within: Duration) -> String {
    let end = Instant::now() + within;
    loop {
        let r = from.connect(to, b"hello").await;
        let retry = matches!(
            r,
            Ok(ConnectOutcome::Failed {
                reason: FailReason::RetryLater,
                ..
            })
        );
        if !retry || Instant::now() >= end {
            return match r {
                Ok(ConnectOutcome::Connected { .. }) => "connected".into(),
                Ok(ConnectOutcome::Failed { reason, .. }) => reason.name().to_string(),
                Err(e) => format!("error: {e}"),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
