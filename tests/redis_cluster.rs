//! Cluster mode against a real Redis Cluster (six redis-server processes, three masters with a
//! replica each, on loopback): routing through it, and a master killed while connects run.

mod common;

use std::time::{Duration, Instant};

use common::rcluster::RedisCluster;
use common::{answer, cluster_config, connect, eventually, outcome, Node, Raw, T};
use sigrouter::proto::Message;

fn metric(node: &Node, line_prefix: &str) -> f64 {
    node.router
        .metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_route_through_a_real_redis_cluster() {
    let rc = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let url = rc.url();
    // A generous hedge: every lookup here must be answered by the Redis Cluster, however busy
    // the machine running the test is.
    let patient = |id: &str| {
        let mut cfg = cluster_config(&url, id);
        if let Some(cc) = cfg.cluster.as_mut() {
            cc.redis_hedge = Duration::from_secs(1);
        }
        cfg
    };
    let n1 = Node::start(patient("n1")).await;
    let n2 = Node::start(patient("n2")).await;
    let mut c3 = patient("n3");
    c3.register_rate = 10_000;
    c3.register_burst = 10_000;
    let n3 = Node::start(c3).await;
    // The registry hash is in the Redis Cluster with every node's record.
    let listed = eventually(Duration::from_secs(10), || {
        matches!(
            rc.cmd(&["HLEN", "sigrouter:{nodes}"]),
            Ok(redis::Value::Int(3))
        )
    })
    .await;
    assert!(listed, "the registry never listed the three nodes");
    let mut a = Raw::register(n1.addr).await;
    let mut b = Raw::register(n2.addr).await;
    let c = Raw::register(n3.addr).await;
    // Presence records land on the masters of their slots (keys hash to different slots).
    for (u, n) in [(&a.uuid, "n1"), (&b.uuid, "n2"), (&c.uuid, "n3")] {
        let ok = eventually(T, || rc.presence_on(u, n)).await;
        assert!(ok, "presence of {u} never named {n}");
    }
    // Cross-node connects use Redis (no peer fan-out while it is healthy).
    for i in 0..5 {
        let (rid, inc) = connect(&mut a, &b, &format!("via the cluster {i}")).await;
        answer(&mut b, inc.connection, true, "").await;
        assert!(matches!(outcome(&a, rid).await, Message::Connected(_)));
    }
    assert_eq!(
        metric(&n1, "sigrouter_peer_lookups_total"),
        0.0,
        "Redis Cluster was healthy: no lookup should have gone to the peers"
    );
    // Many presence writes at once: one pipeline spanning many slots and all three masters.
    let mut many = Vec::new();
    for _ in 0..100 {
        many.push(Raw::register(n3.addr).await);
    }
    let all = eventually(Duration::from_secs(10), || {
        many.iter().all(|r| rc.presence_on(&r.uuid, "n3"))
    })
    .await;
    let missing = many
        .iter()
        .filter(|r| !rc.presence_on(&r.uuid, "n3"))
        .count();
    assert!(all, "{missing} of 100 presence records missing");
    for n in [&n1, &n2, &n3] {
        assert_eq!(metric(n, "sigrouter_redis_up"), 1.0);
        assert_eq!(metric(n, "sigrouter_redis_errors_total"), 0.0);
    }
    drop((n2, n3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_while_connects_run() {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use common::fleet::{acceptor, connect_name};

    let mut rc = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let url = rc.url();
    let nodes = [
        Node::start(cluster_config(&url, "n1")).await,
        Node::start(cluster_config(&url, "n2")).await,
        Node::start(cluster_config(&url, "n3")).await,
    ];
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    let mut clients = Vec::new();
    for a in &addrs {
        for _ in 0..4 {
            clients.push(acceptor(*a, &addrs).await);
        }
    }
    for (i, c) in clients.iter().enumerate() {
        let node = format!("n{}", i / 4 + 1);
        let ok = eventually(T, || rc.presence_on(&c.uuid(), &node)).await;
        assert!(ok, "presence of {} never named {node}", c.uuid());
    }
    // Connects run from three tasks; half go to the newest clients, whose location is not
    // cached anywhere yet: each of those needs a presence lookup.
    let clients = Arc::new(Mutex::new(clients));
    let done = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let mut load = Vec::new();
    for w in 0..3usize {
        let (clients, done, outcomes) = (clients.clone(), done.clone(), outcomes.clone());
        load.push(tokio::spawn(async move {
            let mut i = w;
            while !done.load(Ordering::Relaxed) {
                i += 1;
                let (a, b) = {
                    let all = clients.lock().unwrap();
                    let n = all.len();
                    let b = if i % 2 == 0 {
                        n - 1 - (i / 2) % 3
                    } else {
                        (i * 7) % n
                    };
                    let a = (b + 1 + i % (n - 1)) % n;
                    (all[a].clone(), all[b].clone())
                };
                if a.server() == b.server() {
                    continue;
                }
                let name = connect_name(&a, b.uuid()).await;
                if name != "connected" {
                    eprintln!("{} -> {}: {name}", a.uuid(), b.uuid());
                }
                *outcomes.lock().unwrap().entry(name).or_default() += 1;
            }
        }));
    }
    // New clients keep registering, one every 200 ms, on every node in turn.
    let newcomers = {
        let (clients, done, addrs) = (clients.clone(), done.clone(), addrs.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                let c = acceptor(addrs[i % addrs.len()], &addrs).await;
                clients.lock().unwrap().push(c);
                i += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            i
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = rc
        .members
        .iter()
        .position(|m| m.is_master())
        .expect("a master");
    let killed_at = Instant::now();
    rc.members[victim].kill();
    // The replica takes over once the others notice (cluster-node-timeout 1 s).
    tokio::task::block_in_place(|| rc.wait_failover(Duration::from_secs(20)));
    let failover = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    done.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let registered = newcomers.await.unwrap();
    let outcomes = outcomes.lock().unwrap().clone();
    let all: u32 = outcomes.values().sum();
    let ok = outcomes.get("connected").copied().unwrap_or(0);
    let peer = |o: &str| {
        nodes
            .iter()
            .map(|n| {
                metric(
                    n,
                    &format!("sigrouter_peer_lookups_total{{outcome=\"{o}\"}}"),
                )
            })
            .sum::<f64>()
    };
    println!(
        "master killed; replica took over after {failover:?}; {registered} clients registered meanwhile; connects meanwhile: {outcomes:?}; lookups answered by the peers: {}; redis errors: {}",
        peer("found"),
        nodes.iter().map(|n| metric(n, "sigrouter_redis_errors_total")).sum::<f64>()
    );
    assert!(all >= 20, "too little load ran: {outcomes:?}");
    assert_eq!(
        ok, all,
        "connects failed while a master failed over: {outcomes:?}"
    );
    // After the failover the Redis path works again: a new client's presence lands on the
    // promoted replica, every node's Redis calls succeed, and so do connects.
    let late = acceptor(addrs[1], &addrs).await;
    let ok = eventually(Duration::from_secs(10), || {
        rc.presence_on(&late.uuid(), "n2")
    })
    .await;
    assert!(ok, "presence written after the failover never landed");
    let up = eventually(T, || {
        nodes.iter().all(|n| metric(n, "sigrouter_redis_up") == 1.0)
    })
    .await;
    assert!(up, "a node's Redis calls still fail after the failover");
    let first = clients.lock().unwrap()[0].clone();
    let name = connect_name(&first, late.uuid()).await;
    assert_eq!(name, "connected");
}
