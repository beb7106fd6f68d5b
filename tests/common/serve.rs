//! Whole `sigrouter serve` processes on fixed loopback ports with their logs collected, and
//! clients on the client library to drive them: for the operations tests (logging, Redis AUTH
//! and TLS, cluster keys).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::stable_port;

pub const KEY_A: &str = "key-A-0123456789abcdef0123456789abcdef-alpha";
pub const KEY_B: &str = "key-B-fedcba9876543210fedcba9876543210-bravo";

/// A scratch directory for one test, removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!(
            "sigrouter-ops-{name}-{}-{}",
            std::process::id(),
            stable_port()
        ));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `sigrouter serve` process on fixed loopback ports, its stderr collected line by line.
pub struct Proc {
    pub id: String,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// A cluster node of `redis_url` with fast timings; `extra` flags follow.
    pub fn new(id: &str, redis_url: &str, extra: &[&str]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", stable_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", stable_port()).parse().unwrap();
        let cluster = format!("127.0.0.1:{}", stable_port());
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
            "--redis-url",
            redis_url,
            "--node-id",
            id,
            "--cluster-listen",
            &cluster,
            "--heartbeat-secs",
            "0.5",
            "--drain-secs",
            "6",
            "--registry-period-secs",
            "0.3",
            "--table-refresh-secs",
            "0.5",
            "--redis-timeout-ms",
            "500",
            "--register-rate",
            "1000",
            "--register-burst",
            "1000",
            "--workers",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Self {
            id: id.to_string(),
            addr,
            metrics,
            args,
            env: Vec::new(),
            child: None,
            log: Arc::default(),
        }
    }

    /// Replaces the value of `flag` (or adds it), or removes it with `None`.
    pub fn set_flag(&mut self, flag: &str, value: Option<&str>) {
        if let Some(i) = self.args.iter().position(|a| a == flag) {
            self.args.drain(i..i + 2);
        }
        if let Some(v) = value {
            self.args.push(flag.to_string());
            self.args.push(v.to_string());
        }
    }

    pub fn start(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sigrouter"));
        cmd.args(&self.args)
            .env(
                "SIGROUTER_LOG",
                std::env::var("TEST_SIGROUTER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("SIGROUTER_REDIS_PASSWORD")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start sigrouter");
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        let echo = std::env::var("TEST_SIGROUTER_LOG").is_ok();
        let id = self.id.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[{id}] {line}");
                }
                log.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
    }

    /// SIGTERM, then a clean exit within 20 s.
    pub fn terminate(&mut self) {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.id);
                return;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if http_get(self.metrics, "/readyz").await.map(|r| r.0) == Some(200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} never became ready: {:#?}", self.id, self.log_lines());
    }

    pub async fn scrape(&self) -> String {
        http_get(self.metrics, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default()
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

/// Status and body of `GET path` (the endpoint closes the connection after one answer).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_string()))
}

/// Sum of the samples of `name` whose labels contain every one of `labels` (`k="v"`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n == name && labels.iter().all(|l| rest.contains(l)) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}
