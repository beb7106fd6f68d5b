//! The processes of a rolling-upgrade run: redis-server, `sigrouter serve` nodes and an
//! optional nginx UDP proxy, all on loopback. Ports come from outside the kernel's ephemeral
//! range, so no client socket takes a node's port while the node restarts.

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, Instant};

/// Ports are handed out upwards from a random start in [20000, 30000).
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A loopback port free for both TCP and UDP, below the ephemeral range (32768 and up).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let _ = NEXT_PORT.compare_exchange(
        0,
        20_000 + rand::random::<u16>() % 10_000,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..2_000 {
        let p = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        if !(20_000..32_000).contains(&p) {
            NEXT_PORT.store(20_000, Ordering::Relaxed);
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
        {
            return Ok(p);
        }
    }
    anyhow::bail!("no free port in 20000..32000")
}

/// `127.0.0.1:port`.
pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A log file the child writes its stdout and stderr to (appended across restarts).
fn log_stdio(path: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
}

/// Sends `sig` (for example `-TERM`) to a process with the system's `kill`.
fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .context("running kill")?
        .success();
    anyhow::ensure!(ok, "kill {sig} {pid} failed");
    Ok(())
}

/// Waits for a child to exit, polling; `None` if it is still running after `within`.
async fn wait_exit(child: &mut Child, within: Duration) -> anyhow::Result<Option<ExitStatus>> {
    let end = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= end {
            return Ok(None);
        }
        sleep(Duration::from_millis(10)).await;
    }
}

fn stop_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A redis-server of our own, killed on drop.
pub(crate) struct Redis {
    pub(crate) port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Starts redis-server (no persistence) and waits until it answers PING.
    pub(crate) async fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = free_port()?;
        let data = dir.join("redis");
        std::fs::create_dir_all(&data)?;
        let (out, err) = log_stdio(&dir.join("redis.log"))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&data)
            .stdout(out)
            .stderr(err)
            .spawn()
            .context(
                "starting redis-server (is it installed? loadtest/rolling-upgrade installs it)",
            )?;
        let r = Self {
            port,
            child: Some(child),
        };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if r.ping().await {
                return Ok(r);
            }
            sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!("redis-server did not answer on port {port}")
    }

    async fn ping(&self) -> bool {
        let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(1),
            TcpStream::connect(loopback(self.port)),
        )
        .await
        else {
            return false;
        };
        if s.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
            Ok(Ok(_)) if &buf == b"+PONG\r\n"
        )
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The number of keys (`DBSIZE`), if Redis answers within a second.
    pub(crate) async fn dbsize(&self) -> Option<u64> {
        let mut s = tokio::time::timeout(
            Duration::from_secs(1),
            TcpStream::connect(loopback(self.port)),
        )
        .await
        .ok()?
        .ok()?;
        s.write_all(b"DBSIZE\r\n").await.ok()?;
        let mut buf = [0u8; 32];
        let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        std::str::from_utf8(&buf[..n])
            .ok()?
            .strip_prefix(':')?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// How a node's drain ended.
#[derive(Debug)]
pub(crate) enum Exit {
    /// It exited by itself with this status.
    Exited(ExitStatus),
    /// It was still running after the allowed time and was killed.
    Killed,
}

/// One `sigrouter serve` process in cluster mode; a restart reuses its id and ports.
pub(crate) struct Node {
    pub(crate) id: String,
    /// Client (UDP) address.
    pub(crate) addr: SocketAddr,
    metrics: SocketAddr,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

/// Settings every node of a run shares.
pub(crate) struct NodeSettings<'a> {
    pub(crate) bin: &'a Path,
    pub(crate) redis_url: &'a str,
    pub(crate) key_file: &'a Path,
    pub(crate) public_addr: Option<SocketAddr>,
    pub(crate) drain_secs: Option<f64>,
    pub(crate) dir: &'a Path,
}

/// Starts every node, waits until each is ready and lists all of them in its node table
/// (30 s at most for each step).
pub(crate) async fn start_all(nodes: &mut [Node]) -> anyhow::Result<()> {
    for n in nodes.iter_mut() {
        n.start()?;
    }
    for n in nodes.iter_mut() {
        n.wait_ready(Duration::from_secs(30)).await?;
    }
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = true;
        for n in nodes.iter() {
            all &= n
                .table_size()
                .await
                .is_some_and(|s| s >= nodes.len() as u64);
        }
        if all {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < end, "the nodes never listed each other");
        sleep(Duration::from_millis(100)).await;
    }
}

impl Node {
    /// A node (not started yet) with fresh ports.
    pub(crate) fn new(id: &str, s: &NodeSettings<'_>) -> anyhow::Result<Self> {
        let addr = loopback(free_port()?);
        let metrics = loopback(free_port()?);
        let cluster = loopback(free_port()?);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
            "--cluster-listen".into(),
            cluster.to_string(),
            "--redis-url".into(),
            s.redis_url.into(),
            "--node-id".into(),
            id.into(),
            "--cluster-key-file".into(),
            s.key_file.display().to_string(),
        ];
        // Every client of the run shares one IP (and, behind the proxy, one address): the
        // per-IP and per-session limits are for the internet, not for a load test.
        for flag in [
            "--register-rate",
            "--register-burst",
            "--session-rate",
            "--session-burst",
        ] {
            args.extend([flag.into(), "1000000".into()]);
        }
        if let Some(p) = s.public_addr {
            args.extend(["--public-addr".into(), p.to_string()]);
        }
        if let Some(d) = s.drain_secs {
            args.extend(["--drain-secs".into(), d.to_string()]);
        }
        Ok(Self {
            id: id.into(),
            addr,
            metrics,
            bin: s.bin.to_path_buf(),
            args,
            log: s.dir.join(format!("{id}.log")),
            child: None,
        })
    }

    /// Adds flags for the next start.
    pub(crate) fn add_args(&mut self, args: &[String]) {
        self.args.extend(args.iter().cloned());
    }

    /// The node's `/metrics` page, if it answers.
    pub(crate) async fn metrics_page(&self) -> Option<String> {
        let page = http_get(self.metrics, "/metrics").await?;
        page.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    }

    /// The process id, while running.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process (logs appended to DIR/<id>.log).
    pub(crate) fn start(&mut self) -> anyhow::Result<()> {
        let (out, err) = log_stdio(&self.log)?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env(
                "SIGROUTER_LOG",
                std::env::var("SIGROUTER_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Plain text in the log files.
            .env("NO_COLOR", "1")
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until `/readyz` answers 200.
    pub(crate) async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if http_status(self.metrics, "/readyz").await == Some(200) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(s) = c.try_wait()? {
                    anyhow::bail!(
                        "{} exited with {s} before it was ready; see {}",
                        self.id,
                        self.log.display()
                    );
                }
            }
            sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!(
            "{} not ready within {within:?}; see {}",
            self.id,
            self.log.display()
        )
    }

    /// How many nodes this node's table lists (`sigrouter_cluster_nodes`), if it answers.
    pub(crate) async fn table_size(&self) -> Option<u64> {
        let page = http_get(self.metrics, "/metrics").await?;
        page.lines()
            .find_map(|l| l.strip_prefix("sigrouter_cluster_nodes "))?
            .trim()
            .parse::<f64>()
            .ok()
            .map(|v| v as u64)
    }

    /// SIGTERM (the node drains), then waits for it to exit; killed after `within`.
    pub(crate) async fn drain(&mut self, within: Duration) -> anyhow::Result<Exit> {
        let Some(mut child) = self.child.take() else {
            anyhow::bail!("{} is not running", self.id);
        };
        signal(child.id(), "-TERM")?;
        match wait_exit(&mut child, within).await? {
            Some(s) => Ok(Exit::Exited(s)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Ok(Exit::Killed)
            }
        }
    }

    /// The node's log file.
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// The HTTP status of `GET path`, or `None` if the server did not answer within a second.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path)
        .await?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The whole answer (status line, headers, body) to `GET path`, within a second.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Worker processes of the nginx proxy. nginx holds one socket per client port for its
/// 60 s session timeout, and a process may not open more files than the system allows it
/// (20,000 on the project's machines, a hard limit a container cannot raise): a fleet of
/// 10,000 clients that each take a new port at every drain needs more, so the sessions are
/// spread over several workers (`reuseport`, as `k8s/overlays/nginx/nginx.conf` does).
const NGINX_WORKERS: usize = 4;

/// An nginx stream (UDP) proxy in front of the nodes: a master and [`NGINX_WORKERS`]
/// workers, configured like `k8s/overlays/nginx/nginx.conf`; stopped with SIGTERM, which
/// takes the workers down with the master.
pub(crate) struct Nginx {
    /// The address clients use.
    pub(crate) addr: SocketAddr,
    conf: PathBuf,
    child: Option<Child>,
}

/// Where the stream module lives when nginx was built with it as a dynamic module (Debian's
/// libnginx-mod-stream); `None` when it is built in.
fn stream_module() -> anyhow::Result<Option<PathBuf>> {
    let out = Command::new("nginx").arg("-V").output().context(
        "running nginx -V (is nginx installed? loadtest/rolling-upgrade --proxy nginx installs it)",
    )?;
    let v =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    if v.contains("--with-stream ") || v.ends_with("--with-stream") {
        return Ok(None);
    }
    let mut dirs: Vec<PathBuf> = v
        .split_whitespace()
        .filter_map(|a| a.strip_prefix("--modules-path="))
        .map(PathBuf::from)
        .collect();
    dirs.extend(
        [
            "/usr/lib/nginx/modules",
            "/usr/lib64/nginx/modules",
            "/etc/nginx/modules",
        ]
        .map(PathBuf::from),
    );
    dirs.into_iter()
        .map(|d| d.join("ngx_stream_module.so"))
        .find(|p| p.exists())
        .map(Some)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "nginx has no stream module (install libnginx-mod-stream; loadtest/rolling-upgrade --proxy nginx does)"
            )
        })
}

impl Nginx {
    /// Writes DIR/nginx/nginx.conf proxying UDP `addr` to `upstreams` and starts nginx.
    pub(crate) async fn start(
        dir: &Path,
        addr: SocketAddr,
        upstreams: &[SocketAddr],
    ) -> anyhow::Result<Self> {
        let module = stream_module()?;
        let home = dir.join("nginx");
        std::fs::create_dir_all(home.join("logs"))?;
        let load = module
            .map(|m| format!("load_module {};\n", m.display()))
            .unwrap_or_default();
        // Where nginx's upstream sockets are bound: 127.2.0.1 to 127.2.0.10 by the last digit
        // of the client's port. One loopback address has 28,000 ephemeral ports, and nginx
        // holds one per client session for its 60 s timeout: a fleet of 10,000 clients that
        // each take a new port at every drain runs out of them on one address (connect()
        // fails with EAGAIN, nginx marks every node down and answers nothing for 10 s).
        let src_map: String =
            std::iter::once("    map $remote_port $sigrouter_src {\n".to_string())
                .chain((0..10).map(|d| format!("        ~{d}$ 127.2.0.{};\n", d + 1)))
                .chain(std::iter::once("    }\n".to_string()))
                .collect();
        let servers: String = upstreams
            .iter()
            .map(|u| format!("        server {u};\n"))
            .collect();
        let conf = format!(
            "{load}daemon off;\nmaster_process on;\nworker_processes {NGINX_WORKERS};\n\
             worker_rlimit_nofile 262144;\n\
             error_log {home}/logs/error.log warn;\npid {home}/nginx.pid;\n\n\
             events {{\n    worker_connections 131072;\n}}\n\n\
             stream {{\n    access_log off;\n{src_map}    upstream sigrouter {{\n{servers}    }}\n\
             \x20   server {{\n        listen {addr} udp reuseport;\n        proxy_pass sigrouter;\n\
             \x20       # one upstream socket per client session, held 60 s: spread over ten\n\
             \x20       # source addresses (by the client port's last digit), each with its\n\
             \x20       # own ephemeral ports, apart from the clients' addresses.\n\
             \x20       proxy_bind $sigrouter_src;\n\
             \x20       # above the heartbeat interval (15 s); no proxy_responses: pushes\n\
             \x20       # arrive without a request.\n        proxy_timeout 60s;\n    }}\n}}\n",
            home = home.display(),
        );
        let conf_path = home.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let check = Command::new("nginx")
            .arg("-p")
            .arg(&home)
            .arg("-c")
            .arg(&conf_path)
            .arg("-t")
            .output()
            .context("running nginx -t")?;
        anyhow::ensure!(
            check.status.success(),
            "nginx rejected {}: {}",
            conf_path.display(),
            String::from_utf8_lossy(&check.stderr)
        );
        let f = File::create(home.join("logs/stderr.log"))?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&home)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(f))
            .spawn()
            .context("starting nginx")?;
        let mut n = Self {
            addr,
            conf: conf_path,
            child: Some(child),
        };
        // Started once its port is taken.
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if std::net::UdpSocket::bind(addr).is_err() {
                return Ok(n);
            }
            if let Some(c) = n.child.as_mut() {
                if let Some(s) = c.try_wait()? {
                    anyhow::bail!("nginx exited with {s}; see {}", home.join("logs").display());
                }
            }
            sleep(Duration::from_millis(20)).await;
        }
        stop_child(&mut n.child);
        anyhow::bail!("nginx did not bind {addr}")
    }

    /// The configuration file written for this run.
    pub(crate) fn conf(&self) -> &Path {
        &self.conf
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then exits.
        if let Some(mut c) = self.child.take() {
            let stopped = signal(c.id(), "-TERM").is_ok()
                && (0..500).any(|_| {
                    std::thread::sleep(Duration::from_millis(10));
                    matches!(c.try_wait(), Ok(Some(_)))
                });
            if !stopped {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
