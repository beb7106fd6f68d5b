//! Shared helpers for integration tests: a real node on a free loopback port and a raw UDP
//! client that crafts datagrams with the protocol codec (no mocks anywhere).
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod fleet;
pub mod rcluster;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sigrouter::proto::{self, FailReason, Message, Payload, Secret};
use sigrouter::server::Server;
use sigrouter::Config;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use uuid::Uuid;

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

/// A hand-driven client: one socket, explicit request ids, every datagram visible.
pub struct Raw {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub uuid: Uuid,
    pub secret: Secret,
    pub observed: SocketAddr,
    pub rid: u64,
    /// Messages read while waiting for something else, handed out first by later reads.
    pub backlog: std::sync::Mutex<std::collections::VecDeque<Message>>,
}

impl Raw {
    /// A Raw client for an existing session on a given socket.
    pub fn with(
        sock: UdpSocket,
        server: SocketAddr,
        uuid: Uuid,
        secret: Secret,
        observed: SocketAddr,
        rid: u64,
    ) -> Self {
        Self {
            sock,
            server,
            uuid,
            secret,
            observed,
            rid,
            backlog: Default::default(),
        }
    }

    pub async fn socket() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    /// Registers over a fresh socket.
    pub async fn register(server: SocketAddr) -> Self {
        let sock = Self::socket().await;
        let mut m = Message::Register(proto::Register {
            rid: 1,
            local: vec![proto::Addr(sock.local_addr().unwrap())],
            pad: vec![],
        });
        let b = proto::encode_hello(&mut m).unwrap();
        sock.send_to(&b, server).await.unwrap();
        let reg = match recv_msg(&sock, Duration::from_secs(5))
            .await
            .expect("Registered")
        {
            Message::Registered(r) => r,
            other => panic!("expected Registered, got {other:?}"),
        };
        Self::with(sock, server, reg.uuid, reg.secret, reg.observed.0, 1)
    }

    pub fn next_rid(&mut self) -> u64 {
        self.rid += 1;
        self.rid
    }

    /// Encodes with this session's secret and sends.
    pub async fn send(&self, m: &Message) -> Vec<u8> {
        let b = proto::encode(m, Some(&self.secret)).unwrap();
        self.sock.send_to(&b, self.server).await.unwrap();
        b
    }

    /// Next message (the backlog first) that carries a valid MAC (or is unauthenticated),
    /// within `t`.
    pub async fn recv(&self, t: Duration) -> Option<Message> {
        if let Some(m) = self.backlog.lock().unwrap().pop_front() {
            return Some(m);
        }
        self.recv_socket(t).await
    }

    async fn recv_socket(&self, t: Duration) -> Option<Message> {
        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(t, self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        let b = &buf[..n];
        let m = proto::decode(b).expect("server sent a valid datagram");
        if m.ty().is_authenticated() {
            assert!(
                proto::verify_mac(b, &self.secret),
                "server datagram with a bad MAC"
            );
        }
        Some(m)
    }

    /// Receives until `f` accepts a message (acknowledging pushes on the way) or `t` passes.
    /// Messages `f` does not want stay in the backlog for later reads (cancel-safe: nothing
    /// is held outside the backlog across an await).
    pub async fn recv_until<T>(
        &self,
        t: Duration,
        mut f: impl FnMut(&Message) -> Option<T>,
    ) -> Option<T> {
        {
            let mut b = self.backlog.lock().unwrap();
            for i in 0..b.len() {
                if let Some(v) = f(&b[i]) {
                    b.remove(i);
                    return Some(v);
                }
            }
        }
        let deadline = Instant::now() + t;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let m = self.recv_socket(left).await?;
            if let Some(p) = m.push_id() {
                self.ack(p).await;
            }
            if let Some(v) = f(&m) {
                return Some(v);
            }
            let mut b = self.backlog.lock().unwrap();
            // Retransmitted pushes are kept once.
            if !b.contains(&m) {
                b.push_back(m);
            }
        }
        None
    }

    /// Everything that arrives within `window` (the backlog first), acknowledging pushes on
    /// the way: for checks that something did *not* arrive. The window always runs to its end.
    pub async fn collect(&self, window: Duration) -> Vec<Message> {
        let mut got: Vec<Message> = self.backlog.lock().unwrap().drain(..).collect();
        let deadline = Instant::now() + window;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(m) = self.recv_socket(left).await else {
                break;
            };
            if let Some(p) = m.push_id() {
                self.ack(p).await;
            }
            got.push(m);
        }
        got
    }

    pub async fn ack(&self, push: u64) {
        self.send(&Message::PushAck(proto::PushAck {
            uuid: self.uuid,
            push,
        }))
        .await;
    }

    /// Sends a Connect to `to` with a text payload; returns its request id.
    pub async fn send_connect(&mut self, to: Uuid, text: &str) -> u64 {
        let rid = self.next_rid();
        self.send(&Message::Connect(proto::Connect {
            rid,
            uuid: self.uuid,
            to,
            payload: payload(text),
        }))
        .await;
        rid
    }

    pub async fn heartbeat(&mut self) -> proto::HeartbeatAck {
        let rid = self.next_rid();
        self.send(&Message::Heartbeat(proto::Heartbeat {
            rid,
            uuid: self.uuid,
        }))
        .await;
        self.recv_until(Duration::from_secs(5), |m| match m {
            Message::HeartbeatAck(a) if a.rid == rid => Some(a.clone()),
            _ => None,
        })
        .await
        .expect("HeartbeatAck")
    }

    pub async fn query(&mut self, uuids: Vec<Uuid>) -> Vec<bool> {
        let rid = self.next_rid();
        self.send(&Message::Query(proto::Query {
            rid,
            uuid: self.uuid,
            uuids,
        }))
        .await;
        self.recv_until(Duration::from_secs(5), |m| match m {
            Message::QueryResult(a) if a.rid == rid => Some(a.online.clone()),
            _ => None,
        })
        .await
        .expect("QueryResult")
    }
}

/// Receives and decodes one datagram (no MAC check).
pub async fn recv_msg(sock: &UdpSocket, t: Duration) -> Option<Message> {
    let mut buf = [0u8; 2048];
    let (n, _) = tokio::time::timeout(t, sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    proto::decode(&buf[..n]).ok()
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

/// A real redis-server on a free loopback port, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
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

impl Redis {
    pub fn start() -> Self {
        Self::start_on(stable_port())
    }

    pub fn start_on(port: u16) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sigrouter-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "local",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        let r = Self {
            port,
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if r.cmd(&["PING"]).is_ok() {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs one command synchronously (a plain client of our own, not the code under test).
    pub fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut c = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    /// Sends a command without waiting for its answer (DEBUG SLEEP).
    pub fn cmd_detached(&self, args: &[&str]) {
        let url = self.url();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        std::thread::spawn(move || {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_connection().unwrap();
            let mut cmd = redis::cmd(&args[0]);
            for a in &args[1..] {
                cmd.arg(a);
            }
            let _: redis::RedisResult<redis::Value> = cmd.query(&mut c);
        });
    }

    /// Whether Redis is not answering a new connection and a PING within `within` (blocked
    /// by DEBUG SLEEP). Setting up a connection needs Redis's answer too (redis-rs sends
    /// CLIENT SETINFO), so the whole exchange is bounded by `within`: a sleep shorter than the
    /// deadline is seen while it lasts, not waited out.
    pub fn is_blocked_for(&self, within: Duration) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let start = Instant::now();
        let Ok(mut c) = client.get_connection_with_timeout(within) else {
            return true;
        };
        let left = within.saturating_sub(start.elapsed());
        if left.is_zero() {
            return true;
        }
        let _ = c.set_read_timeout(Some(left));
        redis::cmd("PING").query::<String>(&mut c).is_err()
    }

    /// [`Self::is_blocked_for`] one second: only a long DEBUG SLEEP counts.
    pub fn is_blocked(&self) -> bool {
        self.is_blocked_for(Duration::from_secs(1))
    }

    /// Whether a client's presence record names `node`.
    pub fn presence_on(&self, uuid: &Uuid, node: &str) -> bool {
        let key = format!("sigrouter:presence:{{{}}}", uuid.simple());
        match self.cmd(&["GET", &key]) {
            Ok(redis::Value::BulkString(b)) => {
                String::from_utf8_lossy(&b).starts_with(&format!("{node} "))
            }
            _ => false,
        }
    }

    /// How many times Redis has run each command (lower-case name) since it started, from
    /// `INFO commandstats`: what the nodes asked of it, counted by Redis itself.
    pub fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        let info = match self
            .cmd(&["INFO", "commandstats"])
            .expect("INFO commandstats")
        {
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::VerbatimString { text, .. } => text,
            other => panic!("unexpected INFO reply {other:?}"),
        };
        info.lines()
            .filter_map(|l| {
                let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_string(), calls.parse().ok()?))
            })
            .collect()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
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

pub fn payload(s: &str) -> Payload {
    Payload::from(s.as_bytes().to_vec())
}

/// Sends Connect from `a` to `b`; returns the Incoming `b` sees (already acked).
pub async fn connect(a: &mut Raw, b: &Raw, text: &str) -> (u64, proto::Incoming) {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let rid = a.send_connect(b.uuid, text).await;
        let from = a.uuid;
        // A retry-later (cluster state not at hand yet) is retried, as a real client does.
        let got = tokio::select! {
            inc = b.recv_until(T, |m| match m {
                Message::Incoming(i) if i.from == from && i.payload == payload(text) => Some(i.clone()),
                _ => None,
            }) => inc.map(|i| (rid, i)),
            _ = a.recv_until(T, |m| matches!(m, Message::ConnectFailed(f) if f.rid == rid && f.reason == FailReason::RetryLater).then_some(())) => None,
        };
        if let Some(r) = got {
            return r;
        }
        assert!(Instant::now() < end, "no Incoming for the Connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn answer(b: &mut Raw, conn: Uuid, accept: bool, text: &str) {
    let rid = b.next_rid();
    let ans = proto::Answer {
        rid,
        uuid: b.uuid,
        connection: conn,
        payload: payload(text),
    };
    b.send(&if accept {
        Message::Accept(ans)
    } else {
        Message::Reject(ans)
    })
    .await;
    b.recv_until(T, |m| {
        matches!(m, Message::Ack(a) if a.rid == rid).then_some(())
    })
    .await
    .expect("Ack for the answer");
}

pub async fn outcome(a: &Raw, rid: u64) -> Message {
    a.recv_until(Duration::from_secs(15), |m| match m {
        Message::Connected(c) if c.rid == rid => Some(m.clone()),
        Message::ConnectFailed(c) if c.rid == rid => Some(m.clone()),
        _ => None,
    })
    .await
    .expect("an outcome for the Connect")
}

pub async fn signal(from: &mut Raw, to: &Raw, connection: Uuid, text: &str) {
    let rid = from.next_rid();
    let uuid = from.uuid;
    from.send(&Message::Signal(proto::Signal {
        rid,
        uuid,
        connection,
        payload: payload(text),
    }))
    .await;
    from.recv_until(T, |m| {
        matches!(m, Message::Ack(a) if a.rid == rid).then_some(())
    })
    .await
    .expect("Signal acked");
    let got = to
        .recv_until(T, |m| match m {
            Message::SignalPush(s) => Some(s.clone()),
            _ => None,
        })
        .await
        .expect("SignalPush");
    assert_eq!(
        (got.from, got.connection, got.payload),
        (uuid, connection, payload(text))
    );
}

/// A Connect to `to` (nobody online) fails with `offline`.
pub async fn assert_offline(a: &mut Raw, to: Uuid) {
    let rid = a.send_connect(to, "").await;
    match outcome(a, rid).await {
        Message::ConnectFailed(f) => assert_eq!(f.reason, FailReason::Offline),
        m => panic!("expected offline, got {m:?}"),
    }
}
