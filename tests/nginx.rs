//! The nginx overlay's proxy configuration (`k8s/overlays/nginx/nginx.conf`), run by a real
//! nginx in front of a real node: the post-mortem's topology. Only the addresses are changed
//! (the upstream Service name becomes the node's loopback address, the listen ports free
//! ones); everything else is the file Kubernetes gets. Pushes must cross the proxy: a connect
//! needs the Incoming push to reach the target and a Signal push to reach the peer.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, test_config, Node};
use sigrouter_client::{Client, ClientConfig, ConnectOutcome, Event};

struct Nginx {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The repository's nginx.conf with loopback addresses instead of the Service name and ports.
fn conf_for(upstream: SocketAddr, udp: u16, http: u16, dir: &Path) -> String {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/overlays/nginx/nginx.conf"),
    )
    .unwrap();
    // Temporary files and the pid file go to the test's directory.
    assert!(src.contains("pid /tmp/nginx.pid;"));
    let mut conf = src.replace(" /tmp/", &format!(" {}/", dir.display()));
    for (from, to) in [
        ("server sigrouter:7400;", format!("server {upstream};")),
        (
            "listen 7400 udp reuseport;",
            format!("listen 127.0.0.1:{udp} udp reuseport;"),
        ),
        ("listen 8080;", format!("listen 127.0.0.1:{http};")),
    ] {
        assert!(conf.contains(from), "nginx.conf no longer has {from:?}");
        conf = conf.replace(from, &to);
    }
    // Debian builds the stream module as a dynamic module; the nginx image has it built in.
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    if module.exists() {
        conf = format!("load_module {};\n{conf}", module.display());
    }
    conf
}

/// nginx from PATH, or where Debian puts it (/usr/sbin is not on every PATH).
fn nginx_bin() -> std::path::PathBuf {
    let sbin = Path::new("/usr/sbin/nginx");
    if sbin.exists() {
        sbin.to_path_buf()
    } else {
        "nginx".into()
    }
}

fn start_nginx(upstream: SocketAddr) -> (Nginx, SocketAddr, SocketAddr) {
    let (udp, http) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("sigrouter-nginx-{udp}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, conf_for(upstream, udp, http, &dir)).unwrap();
    // `nginx -t` first: a clear failure if the configuration itself is wrong.
    let t = Command::new(nginx_bin())
        .arg("-t")
        .arg("-e")
        .arg("stderr")
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .output()
        .expect("nginx must be installed (scripts/test installs it)");
    assert!(
        t.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&t.stderr)
    );
    let child = Command::new(nginx_bin())
        .arg("-e")
        .arg("stderr")
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let udp_addr: SocketAddr = format!("127.0.0.1:{udp}").parse().unwrap();
    let http_addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    (Nginx { child, dir }, udp_addr, http_addr)
}

fn healthz(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_the_nginx_udp_proxy_get_their_pushes() {
    let node = Node::start(test_config()).await;
    let (_nginx, proxy, health) = start_nginx(node.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !healthz(health) {
        assert!(Instant::now() < deadline, "nginx never answered /healthz");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (a, _a_events) = Client::register(ClientConfig::new(proxy))
        .await
        .expect("register through nginx");
    let (b, mut b_events) = Client::register(ClientConfig::new(proxy))
        .await
        .expect("register through nginx");
    // Both sessions come from nginx, not from the clients' own sockets.
    assert_ne!(a.observed(), a.local_addr());
    assert_ne!(b.observed(), b.local_addr());

    // B answers Incoming (a push: no request of B's is waiting for it) and echoes Signals.
    let bb = b.clone();
    let acceptor = tokio::spawn(async move {
        let mut got_signal = false;
        while let Some(ev) = b_events.recv().await {
            match ev {
                Event::Incoming { connection, .. } => {
                    bb.accept(connection, b"ok").await.unwrap();
                }
                Event::Signal { payload, .. } => {
                    got_signal = payload == b"ping";
                    break;
                }
                _ => {}
            }
        }
        got_signal
    });
    let connection = match tokio::time::timeout(Duration::from_secs(10), a.connect(b.uuid(), b"hi"))
        .await
        .expect("connect through nginx timed out")
        .unwrap()
    {
        ConnectOutcome::Connected { connection, .. } => connection,
        other => panic!("connect through nginx: {other:?}"),
    };
    a.signal(connection, b"ping").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), acceptor)
        .await
        .expect("the Signal push never crossed nginx")
        .unwrap();
    assert!(got, "B did not get the Signal");
    // Heartbeats keep the mapping (and the session) alive through the proxy.
    assert_eq!(a.heartbeat().await.unwrap(), a.observed());
}
