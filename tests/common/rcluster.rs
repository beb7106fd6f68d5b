//! A real Redis Cluster on loopback: six redis-server processes in cluster mode, three
//! masters and a replica each, created with `redis-cli --cluster create`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::stable_port;

/// One redis-server of the cluster.
pub struct Member {
    pub port: u16,
    child: Option<Child>,
}

impl Member {
    /// Kills the process (SIGKILL): its replica takes over once the cluster notices.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?;
        let mut c = client.get_connection_with_timeout(Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    fn info(&self, what: &str) -> String {
        match self.cmd(&["CLUSTER", what]) {
            Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            Ok(redis::Value::VerbatimString { text, .. }) => text,
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {e}"),
        }
    }

    /// Whether this server is a master now.
    pub fn is_master(&self) -> bool {
        self.info("NODES")
            .lines()
            .any(|l| l.contains("myself") && l.contains("master"))
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Six servers, three masters with a replica each.
pub struct RedisCluster {
    pub members: Vec<Member>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    /// Starts the servers, creates the cluster, waits until every server says it is healthy.
    pub fn start() -> Self {
        // A cluster server also listens on its port + 10000 (the cluster bus).
        let ports: Vec<u16> = (0..6)
            .map(|_| loop {
                let p = stable_port();
                if std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
                    break p;
                }
            })
            .collect();
        let dir = std::env::temp_dir().join(format!(
            "sigrouter-rcluster-{}-{}",
            ports[0],
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let members: Vec<Member> = ports
            .iter()
            .map(|p| {
                let child = Command::new("redis-server")
                    .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", &format!("nodes-{p}.conf")])
                    // Fail over a second after a master stops answering (default: 15 s).
                    .args(["--cluster-node-timeout", "1000"])
                    // A replica may take over however long ago it last heard its master.
                    .args(["--cluster-replica-validity-factor", "0"])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(&dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server must be installed (scripts/test installs it)");
                Member {
                    port: *p,
                    child: Some(child),
                }
            })
            .collect();
        let rc = Self { members, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !rc.members.iter().all(|m| m.cmd(&["PING"]).is_ok()) {
            assert!(Instant::now() < deadline, "redis-servers did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed (scripts/test installs it)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        rc.wait_healthy(Duration::from_secs(20));
        // Every replica in sync with its master, so any of them can take over.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let synced = rc.members.iter().filter(|m| !m.is_master()).all(|m| {
                matches!(m.cmd(&["INFO", "replication"]),
                    Ok(redis::Value::BulkString(b)) if String::from_utf8_lossy(&b).contains("master_link_status:up"))
            });
            let replicas = rc.members.iter().filter(|m| !m.is_master()).count();
            if synced && replicas == 3 {
                return rc;
            }
            assert!(Instant::now() < deadline, "replicas never synced");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every live server reports `cluster_state:ok`.
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self
                .members
                .iter()
                .filter(|m| m.child.is_some())
                .all(|m| m.info("INFO").contains("cluster_state:ok"));
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster never became healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a replica has replaced a killed master: three masters among the live
    /// servers, all healthy.
    pub fn wait_failover(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let live: Vec<&Member> = self.members.iter().filter(|m| m.child.is_some()).collect();
            let masters = live.iter().filter(|m| m.is_master()).count();
            if masters == 3
                && live
                    .iter()
                    .all(|m| m.info("INFO").contains("cluster_state:ok"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no replica took over ({masters} masters): {}",
                live[0].info("NODES")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The URL nodes use: every server, so a node finds the cluster with any of them down.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Runs one command on the master that holds its key (following redirections).
    pub fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let urls: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("redis://127.0.0.1:{}/", m.port))
            .collect();
        let client = redis::cluster::ClusterClient::builder(urls)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(2))
            .build()?;
        let mut c = client.get_connection()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    /// The value of `key`, asked of the master that holds it (following redirections).
    pub fn get(&self, key: &str) -> Option<String> {
        let urls: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("redis://127.0.0.1:{}/", m.port))
            .collect();
        let client = redis::cluster::ClusterClient::builder(urls)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(2))
            .build()
            .ok()?;
        let mut c = client.get_connection().ok()?;
        redis::cmd("GET").arg(key).query(&mut c).ok()?
    }

    /// Whether a client's presence record names `node`.
    pub fn presence_on(&self, uuid: &uuid::Uuid, node: &str) -> bool {
        let key = format!("sigrouter:presence:{{{}}}", uuid.simple());
        self.get(&key)
            .is_some_and(|v| v.starts_with(&format!("{node} ")))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
