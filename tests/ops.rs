//! Operations, with whole `sigrouter serve` processes: what a node logs (the startup line, a
//! fatal error), and Redis with AUTH and TLS (a real redis-server with `requirepass` and a TLS
//! port). Cluster keys (refused node-to-node traffic, a rotation under load): `cluster_key.rs`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fleet::{acceptor, connect_with_retries};
use common::serve::{metric, Dir, Proc, KEY_A, KEY_B};
use common::{eventually, stable_port};

const PASSWORD: &str = "s3cret-Redis-pass-7781";

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
