//! A node refuses to start where it would silently share what another node holds: a UDP port
//! (SO_REUSEPORT would let it take a share of the other's clients) or a node id (two nodes with
//! one id would take each other's node-to-node traffic and presence records).

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Redis;

const BIN: &str = env!("CARGO_BIN_EXE_sigrouter");

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node process, killed when dropped (a failed assertion leaves no process behind).
struct Node(Option<Child>);

impl Node {
    fn running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn serve(args: &[&str]) -> Node {
    Node(Some(spawn(args)))
}

fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .arg("serve")
        .args(["--metrics-listen", "off"])
        .args(args)
        .env("SIGROUTER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for `node` to exit; returns its code and stderr (`None`: still running).
fn exit_of(mut node: Node, within: Duration) -> Option<(i32, String)> {
    let mut child = node.0.take()?;
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return Some((status.code().unwrap_or(-1), err));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Waits until `port` is held (the first node bound it).
fn wait_held(port: u16) {
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < end, "the first node never bound {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_port_held_by_another_node_is_refused_at_start() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let first = serve(&["--listen", &addr]);
    wait_held(port);
    let second = serve(&["--listen", &addr]);
    let (code, err) = exit_of(second, Duration::from_secs(10)).expect("the second node exits");
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("UDP port {port} is already held")),
        "the error names the port: {err}"
    );
    // The first one is still the only one serving there.
    let mut first = first;
    assert!(first.running());
    drop(first);
    // Once it is gone, the port is free again for a node.
    let third = serve(&["--listen", &addr]);
    wait_held(port);
    assert!(
        exit_of(third, Duration::from_millis(300)).is_none(),
        "it runs"
    );
}

#[test]
fn a_cluster_port_or_a_node_id_held_by_a_live_node_is_refused_at_start() {
    let redis = Redis::start();
    let key = std::env::temp_dir().join(format!("sigrouter-startup-{}.key", std::process::id()));
    std::fs::write(&key, "k".repeat(48)).unwrap();
    let key = key.to_str().unwrap().to_string();
    let node = |id: &str, client: u16, cluster: u16| {
        serve(&[
            "--listen",
            &format!("127.0.0.1:{client}"),
            "--redis-url",
            &redis.url(),
            "--node-id",
            id,
            "--cluster-listen",
            &format!("127.0.0.1:{cluster}"),
            "--cluster-key-file",
            &key,
            "--registry-period-secs",
            "0.3",
        ])
    };
    let (c1, k1) = (free_port(), free_port());
    let first = node("n1", c1, k1);
    wait_held(k1);
    // Wait until its record is in the registry.
    let end = Instant::now() + Duration::from_secs(10);
    while !matches!(
        redis.cmd(&["HEXISTS", "sigrouter:{nodes}", "n1"]),
        Ok(redis::Value::Int(1))
    ) {
        assert!(Instant::now() < end, "n1 never published itself");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its cluster port, from a node with another id and client port.
    let (code, err) = exit_of(node("n2", free_port(), k1), Duration::from_secs(10))
        .expect("a node on a held cluster port exits");
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("UDP port {k1} is already held")),
        "{err}"
    );
    // Its node id, from a node at other ports: refused once the live record outlasts the
    // wait (the live node keeps renewing it).
    let started = Instant::now();
    let (code, err) = exit_of(
        node("n1", free_port(), free_port()),
        Duration::from_secs(15),
    )
    .expect("a node with a live node's id exits");
    assert_ne!(code, 0);
    assert!(
        err.contains("is held by a live node") && err.contains("n1") && err.contains("--node-id"),
        "the error names the node id and what to do: {err}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "it waited for the record"
    );
    // The real n1 is undisturbed.
    let mut first = first;
    assert!(first.running());
    // A restart of n1 at its own addresses is its next life, not a duplicate.
    drop(first);
    let again = node("n1", c1, k1);
    wait_held(k1);
    assert!(
        exit_of(again, Duration::from_millis(500)).is_none(),
        "n1 starts again"
    );
    let _ = std::fs::remove_file(&key);
}
