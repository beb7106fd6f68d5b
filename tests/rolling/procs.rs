//! The processes of the rolling tests: `sigrouter serve` children on fixed ports (a restart
//! comes back at the same address), a fleet of them sharing one redis-server, and the waits
//! and scrapes the tests use.

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use sigrouter_client::{Client, ConnectOutcome, FailReason};
use uuid::Uuid;

pub(crate) use crate::common::fleet::acceptor;
use crate::common::fleet::{fast_node_args, key_dir, spawn_sigrouter};
use crate::common::{eventually, stable_port, Redis};

/// One `sigrouter serve` process; ports are fixed so a restart comes back at the same address.
pub(crate) struct Proc {
    pub(crate) id: String,
    pub(crate) addr: SocketAddr,
    pub(crate) metrics: SocketAddr,
    pub(crate) args: Vec<String>,
    pub(crate) child: Option<Child>,
}

pub(crate) fn udp_port() -> u16 {
    stable_port()
}

impl Proc {
    pub(crate) fn new(redis: &str, id: &str, key_file: &std::path::Path) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", udp_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", stable_port()).parse().unwrap();
        let cluster: SocketAddr = format!("127.0.0.1:{}", udp_port()).parse().unwrap();
        let args = fast_node_args(addr, metrics, redis, id, cluster, key_file);
        Self {
            id: id.to_string(),
            addr,
            metrics,
            args,
            child: None,
        }
    }

    /// Replaces the value of `flag` for the next start.
    pub(crate) fn set_arg(&mut self, flag: &str, value: &str) {
        let i = self
            .args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("no {flag} among the node's flags"));
        self.args[i + 1] = value.to_string();
    }

    pub(crate) fn start(&mut self) {
        self.child = Some(spawn_sigrouter(&self.args));
    }

    pub(crate) async fn ready(&self) -> bool {
        http_status(self.metrics, "/readyz").await == Some(200)
    }

    pub(crate) fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGTERM, then wait for a clean exit; returns how long the drain took.
    pub(crate) fn terminate(&mut self) -> Duration {
        let t = Instant::now();
        self.signal("-TERM");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{} exited with {status} after SIGTERM",
                    self.id
                );
                return t.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit after SIGTERM",
                self.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).await.map(|(status, _)| status)
}

pub(crate) use crate::common::serve::http_get;

/// The `sigrouter_cluster_nodes` gauge of a running node: how many nodes its table holds.
pub(crate) async fn table_size(p: &Proc) -> Option<f64> {
    let (_, body) = http_get(p.metrics, "/metrics").await?;
    body.lines()
        .find_map(|l| l.strip_prefix("sigrouter_cluster_nodes "))?
        .trim()
        .parse()
        .ok()
}

pub(crate) async fn wait_ready(p: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if p.ready().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never became ready", p.id);
}

pub(crate) struct Fleet {
    pub(crate) redis: Redis,
    pub(crate) _dir: std::path::PathBuf,
    pub(crate) nodes: Vec<Proc>,
}

pub(crate) async fn fleet(n: usize) -> Fleet {
    let ids: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (redis, dir, mut nodes) = procs(&ids);
    for p in &mut nodes {
        p.start();
    }
    for p in &nodes {
        wait_ready(p).await;
    }
    // Every node must see every other before the test starts.
    let all: Vec<String> = nodes.iter().map(|p| p.id.clone()).collect();
    let ok = eventually(Duration::from_secs(10), || {
        let v = redis.cmd(&["HKEYS", "sigrouter:{nodes}"]);
        matches!(v, Ok(redis::Value::Array(ref a)) if a.len() == all.len())
    })
    .await;
    assert!(ok, "registry never listed every node");
    // ...in its own node table, not just in the registry.
    wait_tables(&nodes.iter().collect::<Vec<_>>(), n).await;
    Fleet {
        redis,
        _dir: dir,
        nodes,
    }
}

/// Waits until every client's presence record in Redis names the node it registered with:
/// until then another node looking it up finds nothing and answers offline (and remembers
/// that for a moment), which is not what these tests are about.
pub(crate) async fn wait_published(f: &Fleet, clients: &[Client]) {
    for c in clients {
        let node = &f
            .nodes
            .iter()
            .find(|p| p.addr == c.server())
            .expect("registered with a fleet node")
            .id;
        let uuid = c.uuid();
        let ok = eventually(Duration::from_secs(10), || f.redis.presence_on(&uuid, node)).await;
        assert!(ok, "the presence of {uuid} never named {node}");
    }
}

/// Connects, retrying retry-later answers (a real client's retries) for up to `within`.
/// Returns the final outcome name and the retry-later answers absorbed.
pub(crate) async fn connect_with_retries(
    from: &Client,
    to: Uuid,
    within: Duration,
) -> (String, u32) {
    let end = Instant::now() + within;
    let mut absorbed = 0;
    loop {
        let r = from.connect(to, b"hello").await;
        let name = match &r {
            Ok(ConnectOutcome::Connected { .. }) => return ("connected".into(), absorbed),
            Ok(ConnectOutcome::Failed { reason, .. }) => reason.name().to_string(),
            Err(e) => format!("error: {e}"),
        };
        let retryable = matches!(
            r,
            Ok(ConnectOutcome::Failed {
                reason: FailReason::RetryLater,
                ..
            })
        );
        if !retryable || Instant::now() >= end {
            return (name, absorbed);
        }
        absorbed += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn scrape(p: &Proc, prefix: &str) -> f64 {
    let (_, body) = http_get(p.metrics, "/metrics")
        .await
        .unwrap_or_else(|| panic!("{}'s /metrics did not answer", p.id));
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Waits until every running node's table lists `n` nodes.
pub(crate) async fn wait_tables(nodes: &[&Proc], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for p in nodes {
        while table_size(p).await != Some(n as f64) {
            assert!(
                Instant::now() < deadline,
                "{}'s table never held {n} nodes",
                p.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A registry, a cluster key and `ids.len()` nodes (not started).
pub(crate) fn procs(ids: &[&str]) -> (Redis, std::path::PathBuf, Vec<Proc>) {
    let redis = Redis::start();
    let (dir, key) = key_dir(&redis);
    let nodes = ids
        .iter()
        .map(|id| Proc::new(&redis.url(), id, &key))
        .collect();
    (redis, dir, nodes)
}
