//! Cluster keys, with whole `sigrouter serve` processes: a node with another cluster key is
//! refused, counted and logged at a bounded rate, and a key rotation under load fails no
//! connect.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fleet::{acceptor, connect_with_retries};
use common::serve::{metric, Dir, Proc, KEY_A, KEY_B};
use common::{eventually, Redis};
use sigrouter_client::ConnectOutcome;

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
