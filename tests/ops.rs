//! Operations, with whole `sigrouter serve` processes: what a node logs (the startup line, a
//! fatal error, refused node-to-node traffic), Redis with AUTH and TLS (a real redis-server
//! with `requirepass` and a TLS port), and a cluster-key rotation under load.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, stable_port, Redis};
use sigrouter_client::{Client, ClientConfig, ConnectOutcome, Event, FailReason};
use uuid::Uuid;

const KEY_A: &str = "key-A-0123456789abcdef0123456789abcdef-alpha";
const KEY_B: &str = "key-B-fedcba9876543210fedcba9876543210-bravo";
const PASSWORD: &str = "s3cret-Redis-pass-7781";

/// A scratch directory for one test, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!(
            "sigrouter-ops-{name}-{}-{}",
            std::process::id(),
            stable_port()
        ));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `sigrouter serve` process on fixed loopback ports, its stderr collected line by line.
struct Proc {
    id: String,
    addr: SocketAddr,
    metrics: SocketAddr,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// A cluster node of `redis_url` with fast timings; `extra` flags follow.
    fn new(id: &str, redis_url: &str, extra: &[&str]) -> Self {
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
    fn set_flag(&mut self, flag: &str, value: Option<&str>) {
        if let Some(i) = self.args.iter().position(|a| a == flag) {
            self.args.drain(i..i + 2);
        }
        if let Some(v) = value {
            self.args.push(flag.to_string());
            self.args.push(v.to_string());
        }
    }

    fn start(&mut self) {
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
    fn terminate(&mut self) {
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

    fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if http_get(self.metrics, "/readyz").await.map(|r| r.0) == Some(200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} never became ready: {:#?}", self.id, self.log_lines());
    }

    async fn scrape(&self) -> String {
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

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
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
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
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

/// A redis-server with `requirepass` (and a TLS port, when `tls` holds the PEM files), killed
/// on drop. Commands of the test itself go through the plain port with the password.
struct SecureRedis {
    port: u16,
    tls_port: Option<u16>,
    child: Child,
    _dir: Dir,
}

struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl SecureRedis {
    fn start(tls: Option<&TlsFiles>) -> Self {
        let dir = Dir::new("redis");
        let port = stable_port();
        let tls_port = tls.map(|_| stable_port());
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            PASSWORD,
        ])
        .arg("--dir")
        .arg(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let (Some(t), Some(tp)) = (tls, tls_port) {
            cmd.arg("--tls-port")
                .arg(tp.to_string())
                .arg("--tls-cert-file")
                .arg(&t.cert)
                .arg("--tls-key-file")
                .arg(&t.key)
                .arg("--tls-ca-cert-file")
                .arg(&t.ca)
                .args(["--tls-auth-clients", "no"]);
        }
        let child = cmd
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        let r = Self {
            port,
            tls_port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if r.cmd(&["PING"]).is_ok() {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server with requirepass did not start on {port}");
    }

    fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(format!("redis://:{PASSWORD}@127.0.0.1:{}/", self.port))?;
        let mut c = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    fn registry(&self) -> Vec<String> {
        match self.cmd(&["HKEYS", "sigrouter:{nodes}"]) {
            Ok(redis::Value::Array(a)) => a
                .into_iter()
                .filter_map(|v| match v {
                    redis::Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl Drop for SecureRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private CA and a server certificate for 127.0.0.1 and localhost, made with openssl.
fn make_certs(dir: &Dir) -> TlsFiles {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir.0)
            .output()
            .expect("openssl must be installed (scripts/test installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=sigrouter test CA",
    ]);
    run(&ca);
    let mut csr = vec!["req", "-nodes"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&csr);
    dir.file(
        "ext.cnf",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    );
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.crt",
    ]);
    // redis-server runs as this user and reads the key itself.
    TlsFiles {
        ca: dir.path("ca.crt"),
        cert: dir.path("server.crt"),
        key: dir.path("server.key"),
    }
}

/// A client that accepts every incoming connection.
async fn acceptor(server: SocketAddr, all: &[SocketAddr]) -> Client {
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

/// Connects, retrying retry-later answers (as a real client does) for up to `within`; returns
/// the final outcome's name.
async fn connect_with_retries(from: &Client, to: Uuid, within: Duration) -> String {
    let end = Instant::now() + within;
    loop {
        let r = from.connect(to, b"hello").await;
        let name = match &r {
            Ok(ConnectOutcome::Connected { .. }) => return "connected".into(),
            Ok(ConnectOutcome::Failed { reason, .. }) => reason.name().to_string(),
            Err(e) => format!("error: {e}"),
        };
        let retry = matches!(
            r,
            Ok(ConnectOutcome::Failed {
                reason: FailReason::RetryLater,
                ..
            })
        );
        if !retry || Instant::now() >= end {
            return name;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn has_ansi(lines: &[String]) -> bool {
    lines.iter().any(|l| l.contains('\u{1b}'))
}

// ---------------------------------------------------------------- logs and Redis AUTH

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_line_and_redis_auth_from_a_file_or_the_environment() {
    let redis = SecureRedis::start(None);
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let dir = Dir::new("auth");
    let key = dir.file("cluster.key", &format!("{KEY_A}\n"));
    let next = dir.file("next.key", KEY_B);
    let pw = dir.file("redis.password", &format!("{PASSWORD}\n"));
    let wrong = dir.file("wrong.password", "not-the-password-991\n");

    // n1: password from a file, text logs, a next key; n2: password from the environment,
    // JSON logs; n3: a wrong password.
    let mut n1 = Proc::new(
        "auth-n1",
        &url,
        &[
            "--cluster-key-file",
            key.to_str().unwrap(),
            "--cluster-next-key-file",
            next.to_str().unwrap(),
            "--redis-password-file",
            pw.to_str().unwrap(),
        ],
    );
    let mut n2 = Proc::new(
        "auth-n2",
        &url,
        &["--cluster-key-file", key.to_str().unwrap(), "--log-json"],
    );
    n2.env
        .push(("SIGROUTER_REDIS_PASSWORD".into(), PASSWORD.into()));
    let mut n3 = Proc::new(
        "auth-n3",
        &url,
        &[
            "--cluster-key-file",
            key.to_str().unwrap(),
            "--redis-password-file",
            wrong.to_str().unwrap(),
        ],
    );
    for n in [&mut n1, &mut n2, &mut n3] {
        n.start();
    }
    for n in [&n1, &n2, &n3] {
        n.wait_ready().await;
    }
    // The two with the right password publish themselves; the third never gets in.
    let ok = eventually(Duration::from_secs(10), || {
        let r = redis.registry();
        r.contains(&"auth-n1".to_string()) && r.contains(&"auth-n2".to_string())
    })
    .await;
    assert!(ok, "registry: {:?}", redis.registry());
    assert!(!redis.registry().contains(&"auth-n3".to_string()));

    // A cross-node connect: presence written and read through authenticated connections.
    let addrs = [n1.addr, n2.addr];
    let a = acceptor(n1.addr, &addrs).await;
    let b = acceptor(n2.addr, &addrs).await;
    assert_eq!(
        connect_with_retries(&a, b.uuid(), Duration::from_secs(10)).await,
        "connected"
    );
    assert_eq!(
        connect_with_retries(&b, a.uuid(), Duration::from_secs(10)).await,
        "connected"
    );

    // /metrics: the build, the key fingerprints, Redis up (n3: down).
    let m1 = n1.scrape().await;
    let fp_a = sigrouter::config::key_fingerprint(KEY_A.as_bytes());
    let fp_b = sigrouter::config::key_fingerprint(KEY_B.as_bytes());
    let commit = format!("commit=\"{}\"", sigrouter::metrics::COMMIT);
    let version = format!("version=\"{}\"", sigrouter::metrics::VERSION);
    assert_eq!(
        metric(&m1, "sigrouter_build_info", &[&version, &commit]),
        Some(1.0),
        "{m1}"
    );
    let sign = format!("fingerprint=\"{fp_a}\"");
    let accept = format!("fingerprint=\"{fp_b}\"");
    assert_eq!(
        metric(&m1, "sigrouter_cluster_key_info", &["role=\"sign\"", &sign]),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m1,
            "sigrouter_cluster_key_info",
            &["role=\"accept\"", &accept]
        ),
        Some(1.0)
    );
    assert_eq!(metric(&m1, "sigrouter_redis_up", &[]), Some(1.0));
    assert!(metric(&m1, "process_resident_memory_bytes", &[]).unwrap_or(0.0) > 1e6);
    assert!(metric(&m1, "process_open_fds", &[]).unwrap_or(0.0) > 3.0);
    // n3 (wrong password) counts Redis errors and says Redis is down.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = n3.scrape().await;
        if metric(&m, "sigrouter_redis_errors_total", &[]).unwrap_or(0.0) > 0.0
            && metric(&m, "sigrouter_redis_up", &[]) == Some(0.0)
            && n3
                .log_lines()
                .iter()
                .any(|l| l.contains("redis unreachable"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n3 (wrong password) never reported Redis down: {m}\n{:#?}",
            n3.log_lines()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Logs: one startup line with the version, the commit and the effective config; keys as
    // fingerprints, no secret anywhere, no colour codes (stderr is a pipe here).
    let l1 = n1.log_lines();
    let starting: Vec<&String> = l1
        .iter()
        .filter(|l| l.contains("sigrouter starting"))
        .collect();
    assert_eq!(starting.len(), 1, "{l1:#?}");
    let s = starting[0];
    for want in [
        sigrouter::metrics::VERSION,
        sigrouter::metrics::COMMIT,
        "auth-n1",
        &fp_a,
        &fp_b,
        "redis_password: Some(<redacted>)",
        "heartbeat: 500ms",
    ] {
        assert!(s.contains(want), "startup line lacks {want:?}: {s}");
    }
    let l2 = n2.log_lines();
    let l3 = n3.log_lines();
    for (n, lines) in [("n1", &l1), ("n2", &l2), ("n3", &l3)] {
        assert!(
            !has_ansi(lines),
            "{n}: ANSI codes in a log that is not a terminal"
        );
        for secret in [KEY_A, KEY_B, PASSWORD, "not-the-password-991"] {
            assert!(
                !lines.iter().any(|l| l.contains(secret)),
                "{n} logged a secret"
            );
        }
    }
    // JSON logs: every line is one JSON object; the startup line has the fields.
    let json: Vec<serde_json::Value> = l2
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let start = json
        .iter()
        .find(|v| v["fields"]["message"] == "sigrouter starting")
        .expect("a JSON startup line");
    assert_eq!(start["fields"]["version"], sigrouter::metrics::VERSION);
    assert_eq!(start["fields"]["commit"], sigrouter::metrics::COMMIT);
    assert!(start["fields"]["config"]
        .as_str()
        .unwrap()
        .contains("redis_password: Some(<redacted>)"));
    // The wrong password is reported, once, with Redis's reason.
    let down: Vec<&String> = l3
        .iter()
        .filter(|l| l.contains("redis unreachable"))
        .collect();
    assert_eq!(down.len(), 1, "{l3:#?}");
    assert!(
        down[0].to_lowercase().contains("wrongpass") || down[0].to_lowercase().contains("auth"),
        "{}",
        down[0]
    );
    for n in [&mut n1, &mut n2, &mut n3] {
        n.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_private_ca() {
    let certs_dir = Dir::new("tls");
    let tls = make_certs(&certs_dir);
    let redis = SecureRedis::start(Some(&tls));
    let tls_port = redis.tls_port.unwrap();
    let url = format!("rediss://127.0.0.1:{tls_port}/");
    let key = certs_dir.file("cluster.key", KEY_A);
    let pw = certs_dir.file("redis.password", PASSWORD);
    let ca = tls.ca.to_str().unwrap().to_string();
    let mut good = Proc::new(
        "tls-good",
        &url,
        &[
            "--cluster-key-file",
            key.to_str().unwrap(),
            "--redis-password-file",
            pw.to_str().unwrap(),
            "--redis-ca-file",
            &ca,
        ],
    );
    // The same without the CA: the server's certificate is not trusted. (A long Redis deadline:
    // on a loaded machine the handshake must fail on the certificate, not time out first.)
    let mut untrusted = Proc::new(
        "tls-untrusted",
        &url,
        &[
            "--cluster-key-file",
            key.to_str().unwrap(),
            "--redis-password-file",
            pw.to_str().unwrap(),
        ],
    );
    untrusted.set_flag("--redis-timeout-ms", Some("5000"));
    good.start();
    untrusted.start();
    good.wait_ready().await;
    untrusted.wait_ready().await;
    let ok = eventually(Duration::from_secs(10), || {
        redis.registry().contains(&"tls-good".to_string())
    })
    .await;
    assert!(
        ok,
        "the TLS node never published itself: {:#?}",
        good.log_lines()
    );
    assert_eq!(
        metric(&good.scrape().await, "sigrouter_redis_up", &[]),
        Some(1.0)
    );
    // Its presence goes through TLS too: a client's record appears.
    let c = acceptor(good.addr, &[good.addr]).await;
    let pkey = format!("sigrouter:presence:{{{}}}", c.uuid().simple());
    let ok = eventually(Duration::from_secs(5), || {
        matches!(redis.cmd(&["EXISTS", &pkey]), Ok(redis::Value::Int(1)))
    })
    .await;
    assert!(ok, "no presence record written over TLS");

    let names_the_certificate = |l: &String| {
        let l = l.to_lowercase();
        l.contains("redis unreachable") && (l.contains("certificate") || l.contains("tls"))
    };
    let ok = eventually(Duration::from_secs(20), || {
        untrusted.log_lines().iter().any(names_the_certificate)
    })
    .await;
    assert!(
        ok,
        "the reason should name the certificate: {:#?}",
        untrusted.log_lines()
    );
    assert!(!redis.registry().contains(&"tls-untrusted".to_string()));
    good.terminate();
    untrusted.terminate();
}

#[test]
fn a_fatal_error_is_printed_once() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sigrouter"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                &busy,
            ])
            .args(extra)
            .env_remove("SIGROUTER_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).to_string())
    };
    for json in [false, true] {
        let extra: &[&str] = if json { &["--log-json"] } else { &[] };
        let (status, err) = run(extra);
        assert_eq!(status.code(), Some(1), "{err}");
        assert_eq!(
            err.matches("binding metrics HTTP").count(),
            1,
            "json={json}: {err}"
        );
        assert!(!err.contains('\u{1b}'), "colour codes on a pipe: {err}");
        if json {
            for line in err.lines() {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if line.contains("binding metrics HTTP") {
                    assert_eq!(v["level"], "ERROR");
                }
            }
        }
    }
    // A configuration error, once too.
    let (status, err) = run(&[
        "--redis-url",
        "redis://127.0.0.1:1/",
        "--cluster-listen",
        "127.0.0.1:0",
        "--cluster-key-file",
        "/nonexistent/cluster.key",
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches("reading --cluster-key-file").count(),
        1,
        "{err}"
    );
}

// ---------------------------------------------------------------- cluster keys

/// Node-to-node datagrams a node refused for their MAC (another key) or age (clock skew).
/// (A datagram meant for the previous node at a reused address is refused as misaddressed:
/// not a key matter.)
fn key_refusals(metrics: &str) -> f64 {
    ["bad_mac", "stale"]
        .iter()
        .map(|r| {
            metric(
                metrics,
                "sigrouter_cluster_refused_total",
                &[&format!("reason=\"{r}\"")],
            )
            .unwrap_or(0.0)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_cluster_key_is_counted_and_logged_at_most_every_10_s() {
    let redis = Redis::start();
    let dir = Dir::new("wrongkey");
    let a = dir.file("a.key", KEY_A);
    let b = dir.file("b.key", KEY_B);
    let mut n1 = Proc::new(
        "wk-n1",
        &redis.url(),
        &["--cluster-key-file", a.to_str().unwrap()],
    );
    let mut n2 = Proc::new(
        "wk-n2",
        &redis.url(),
        &["--cluster-key-file", b.to_str().unwrap()],
    );
    n1.start();
    n2.start();
    n1.wait_ready().await;
    n2.wait_ready().await;
    let addrs = [n1.addr, n2.addr];
    let caller = acceptor(n1.addr, &addrs).await;
    let target = acceptor(n2.addr, &addrs).await;
    // n1 knows n2 and finds the target there (Redis is shared; only the keys differ).
    let tid = target.uuid();
    let ok = eventually(Duration::from_secs(10), || redis.presence_on(&tid, "wk-n2")).await;
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&n1.scrape().await, "sigrouter_cluster_nodes", &[]) != Some(2.0) {
        assert!(Instant::now() < deadline, "n1 never saw n2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    // n1 forwards the connects (retransmitting each); n2 cannot authenticate any of it.
    for _ in 0..3 {
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            caller.connect(target.uuid(), b"hello"),
        )
        .await;
        assert!(
            !matches!(r, Ok(Ok(ConnectOutcome::Connected { .. }))),
            "connected across different cluster keys"
        );
    }
    let m2 = n2.scrape().await;
    let refused = metric(&m2, "sigrouter_dropped_total", &["reason=\"cluster_auth\""]).unwrap();
    assert_eq!(
        metric(
            &m2,
            "sigrouter_cluster_refused_total",
            &["reason=\"bad_mac\""]
        ),
        Some(refused),
        "{m2}"
    );
    let lines: Vec<String> = n2
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("refused node-to-node datagrams"))
        .collect();
    let elapsed = started.elapsed().as_secs();
    println!(
        "{refused} datagrams refused in {elapsed} s, {} log lines: {lines:#?}",
        lines.len()
    );
    assert!(refused >= 3.0, "{m2}");
    assert!(!lines.is_empty() && lines.len() as u64 <= 1 + elapsed / 10);
    assert!(
        (lines.len() as f64) < refused,
        "the log is not rate-limited"
    );
    assert!(lines[0].contains("bad_mac") && lines[0].contains("wk-n1"));
    assert!(lines[0].contains("SIGROUTER_CLUSTER_KEY_FILE"));
    n1.terminate();
    n2.terminate();
}

/// The rotation of docs/OPERATIONS.md under load, one rolling restart per step:
/// 1. every node signs with A and also accepts B; 2. every node signs with B and also accepts
///    A; 3. every node signs with B only.
///
/// Connects between clients on different nodes run all along and must all succeed; no node
/// may refuse a single node-to-node datagram; after each restart the nodes in mixed states
/// (old and new flags) connect both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_key_rotation_without_a_failed_connect() {
    let redis = Redis::start();
    let dir = Dir::new("rotation");
    let a = dir.file("a.key", KEY_A);
    let b = dir.file("b.key", KEY_B);
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let mut nodes: Vec<Proc> = ["rot-n1", "rot-n2"]
        .iter()
        .map(|id| Proc::new(id, &redis.url(), &["--cluster-key-file", a]))
        .collect();
    for n in &mut nodes {
        n.start();
    }
    for n in &nodes {
        n.wait_ready().await;
    }
    let ok = eventually(Duration::from_secs(10), || {
        matches!(
            redis.cmd(&["HLEN", "sigrouter:{nodes}"]),
            Ok(redis::Value::Int(2))
        )
    })
    .await;
    assert!(ok);
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let mut clients = Vec::new();
    for a in &addrs {
        for _ in 0..2 {
            clients.push(acceptor(*a, &addrs).await);
        }
    }
    let clients = Arc::new(clients);
    let outcomes: Arc<Mutex<std::collections::BTreeMap<String, u32>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    // Four workers connect pairs of clients one after another (pairs on different nodes at
    // first; drains move clients, so later the explicit checks below keep nodes in mixed
    // states talking to each other).
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (clients, outcomes, done) = (clients.clone(), outcomes.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !done.load(Ordering::Relaxed) {
                    let from = &clients[i % clients.len()];
                    let to = &clients[(i + 1) % clients.len()];
                    let name = connect_with_retries(from, to.uuid(), Duration::from_secs(20)).await;
                    if name != "connected" {
                        eprintln!("connect {} -> {}: {name}", from.uuid(), to.uuid());
                    }
                    *outcomes.lock().unwrap().entry(name).or_default() += 1;
                    i += 4;
                }
            })
        })
        .collect();
    let mut refused = 0.0;
    let steps: [(&str, &str, Option<&str>); 3] = [
        ("accept B", a, Some(b)),
        ("sign with B", b, Some(a)),
        ("retire A", b, None),
    ];
    for (step, sign, accept) in steps {
        for i in 0..nodes.len() {
            refused += key_refusals(&nodes[i].scrape().await);
            nodes[i].terminate();
            // A new pod gets a new name (node id), as a Deployment's pods do.
            let id = format!("{}-{}", &nodes[i].id[..6], step.replace(' ', "-"));
            nodes[i].id = id.clone();
            nodes[i].set_flag("--node-id", Some(&id));
            nodes[i].set_flag("--cluster-key-file", Some(sign));
            nodes[i].set_flag("--cluster-next-key-file", accept);
            nodes[i].start();
            nodes[i].wait_ready().await;
            // The restarted node says which keys it uses.
            let m = nodes[i].scrape().await;
            let fp =
                |p: &str| sigrouter::config::key_fingerprint(std::fs::read(p).unwrap().as_slice());
            let want = format!("fingerprint=\"{}\"", fp(sign));
            assert_eq!(
                metric(&m, "sigrouter_cluster_key_info", &["role=\"sign\"", &want]),
                Some(1.0),
                "{step}: {m}"
            );
            assert_eq!(
                metric(&m, "sigrouter_cluster_key_info", &["role=\"accept\""]),
                accept.map(|_| 1.0),
                "{step}"
            );
            // Mixed state: fresh clients on the restarted node and on the other connect both
            // ways.
            let other = &nodes[(i + 1) % nodes.len()];
            let x = acceptor(nodes[i].addr, &addrs).await;
            let y = acceptor(other.addr, &addrs).await;
            // Presence is published in batches: wait until both are findable.
            let (xid, yid) = (x.uuid(), y.uuid());
            let (ni, no) = (nodes[i].id.clone(), other.id.clone());
            let ok = eventually(Duration::from_secs(5), || {
                redis.presence_on(&xid, &ni) && redis.presence_on(&yid, &no)
            })
            .await;
            assert!(ok, "{step}: presence of fresh clients never appeared");
            for (from, to) in [(&x, &y), (&y, &x)] {
                assert_eq!(
                    connect_with_retries(from, to.uuid(), Duration::from_secs(10)).await,
                    "connected",
                    "{step}, {} restarted",
                    nodes[i].id
                );
            }
            x.close().await;
            y.close().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!(
            "rotation step '{step}' done: {:?}",
            outcomes.lock().unwrap()
        );
    }
    done.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    for n in &nodes {
        refused += key_refusals(&n.scrape().await);
    }
    let during = outcomes.lock().unwrap().clone();
    println!(
        "connects during the rotation: {during:?}; node datagrams refused for a key or clock: {refused}"
    );
    for n in &nodes {
        for l in n.log_lines() {
            if l.contains("refused node-to-node") {
                println!("{}: {l}", n.id);
            }
        }
    }
    assert!(
        during.get("connected").copied().unwrap_or(0) >= 10,
        "too little load ran: {during:?}"
    );
    assert_eq!(
        during.len(),
        1,
        "connects failed during the rotation: {during:?}"
    );
    assert_eq!(
        refused, 0.0,
        "node-to-node datagrams were refused for their MAC or age"
    );
    for n in &mut nodes {
        n.terminate();
    }
}
