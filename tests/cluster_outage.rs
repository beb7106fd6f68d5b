//! Cluster mode while Redis is slow, away or restarted (a real redis-server blocked with
//! `DEBUG SLEEP` or stopped), nodes in this process on loopback, clients driven by hand-crafted
//! datagrams: the post-mortem's scenario, one refresh for many misses, routing through an
//! outage, a node that starts without Redis, and where presence records point afterwards.

mod common;

use std::time::{Duration, Instant};

use common::{
    answer, assert_offline, cluster_config, connect, eventually, metric, outcome, payload,
    recv_msg, wait_for_nodes, wait_presence, Node, Raw, Redis, T,
};
use sigrouter::proto::{self, FailReason, Message};
use uuid::Uuid;

/// Connects `a` to `b` until it is not retry-later (a real client's retries), `b` accepting
/// every Incoming it sees meanwhile; returns the final outcome.
async fn connect_retrying(a: &mut Raw, b: &mut Raw, deadline: Duration) -> Message {
    let end = Instant::now() + deadline;
    loop {
        let rid = a.send_connect(b.uuid, "retrying").await;
        let m = loop {
            assert!(
                Instant::now() < end + Duration::from_secs(12),
                "no outcome in time"
            );
            tokio::select! {
                m = a.recv(Duration::from_millis(200)) => match m {
                    Some(Message::Connected(c)) if c.rid == rid => break Message::Connected(c),
                    Some(Message::ConnectFailed(f)) if f.rid == rid => break Message::ConnectFailed(f),
                    Some(m) => if let Some(p) = m.push_id() { a.ack(p).await },
                    None => {}
                },
                m = b.recv(Duration::from_millis(200)) => if let Some(m) = m {
                    if let Some(p) = m.push_id() {
                        b.ack(p).await;
                    }
                    if let Message::Incoming(i) = m {
                        let r = b.next_rid();
                        b.send(&Message::Accept(proto::Answer {
                            rid: r,
                            uuid: b.uuid,
                            connection: i.connection,
                            payload: payload(""),
                        }))
                        .await;
                    }
                },
            }
        };
        match &m {
            Message::ConnectFailed(f)
                if f.reason == FailReason::RetryLater && Instant::now() < end =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => return m,
        }
    }
}

/// One Connect from `a` to `b`, `b` accepting at once; the outcome and how long it took from
/// the Connect to it.
async fn connect_once(a: &mut Raw, b: &mut Raw, text: &str) -> (Message, Duration) {
    let sent = Instant::now();
    let rid = a.send_connect(b.uuid, text).await;
    let from = a.uuid;
    let inc = tokio::select! {
        i = b.recv_until(T, |m| match m {
            Message::Incoming(i) if i.from == from => Some(i.clone()),
            _ => None,
        }) => i,
        m = outcome(a, rid) => return (m, sent.elapsed()),
    };
    let inc = inc.expect("an Incoming or an outcome");
    let r = b.next_rid();
    b.send(&Message::Accept(proto::Answer {
        rid: r,
        uuid: b.uuid,
        connection: inc.connection,
        payload: payload(""),
    }))
    .await;
    let m = outcome(a, rid).await;
    (m, sent.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_mortem_scenario_new_node_while_redis_sleeps_5s() {
    let redis = Redis::start();
    // Tables are rebuilt from Redis only when nudged (the period is far longer than the test).
    let slow = |id: &str| {
        let mut cfg = cluster_config(&redis.url(), id);
        if let Some(cc) = cfg.cluster.as_mut() {
            cc.table_period = Duration::from_secs(600);
        }
        cfg
    };
    let n1 = Node::start(slow("n1")).await;
    let n2 = Node::start(slow("n2")).await;
    wait_for_nodes(&[&n1, &n2], 2).await;
    let mut a = Raw::register(n1.addr).await;
    let mut a2 = Raw::register(n1.addr).await;
    let reads = metric(&n1, "sigrouter_redis_commands_total");
    // A node none of them has read from the registry: the rolling upgrade's new pod. It
    // announces itself; n1 and n2 know it within a membership round, without a registry read.
    let n3 = Node::start(slow("n3")).await;
    let mut t = Raw::register(n3.addr).await;
    wait_presence(&redis, &t.uuid, "n3").await;
    let known = eventually(Duration::from_secs(2), || {
        [&n1, &n2]
            .iter()
            .all(|n| n.router.cluster().unwrap().node("n3").is_some())
    })
    .await;
    assert!(known, "n3 never reached the other nodes' tables");
    println!(
        "n1 sent {} Redis commands meanwhile (renewals, no table read needed)",
        metric(&n1, "sigrouter_redis_commands_total") - reads
    );

    // Redis stops answering for 5 s (far longer than the nodes' 1 s Redis deadline) while a's
    // connect needs t's node.
    redis.cmd_detached(&["DEBUG", "SLEEP", "5"]);
    let blocked = eventually(Duration::from_secs(2), || redis.is_blocked()).await;
    assert!(blocked, "DEBUG SLEEP did not take effect");
    let slept_at = Instant::now();
    let retry_later = r#"sigrouter_connects_total{outcome="retry-later"}"#;
    let refused = metric(&n1, retry_later);
    // The first connect to t succeeds, fast, without retry-later: the other nodes say where t
    // is once Redis has not answered within the hedge delay.
    let (m, took) = connect_once(&mut a, &mut t, "through the upgrade").await;
    match m {
        Message::Connected(c) => assert_eq!(c.peer, t.uuid),
        m => panic!("expected Connected while Redis sleeps, got {m:?}"),
    }
    println!("first connect while Redis sleeps: {took:?}");
    assert!(took < Duration::from_millis(100), "took {took:?}");
    assert_eq!(
        metric(&n1, retry_later),
        refused,
        "a connect got retry-later"
    );
    assert!(metric(&n1, r#"sigrouter_peer_lookups_total{outcome="found"}"#) >= 1.0);
    // Other requests on the same node are answered promptly meanwhile.
    for _ in 0..5 {
        let sent = Instant::now();
        a2.heartbeat().await;
        assert!(
            sent.elapsed() < Duration::from_millis(300),
            "a heartbeat waited on Redis"
        );
    }
    let (m, took) = connect_once(&mut a2, &mut a, "local").await;
    assert!(matches!(m, Message::Connected(_)), "{m:?}");
    assert!(
        took < Duration::from_millis(500),
        "a local connect waited on Redis"
    );
    // Again, cached now: no lookup at all.
    let (m, took) = connect_once(&mut a, &mut t, "again").await;
    assert!(matches!(m, Message::Connected(_)), "{m:?}");
    println!("second connect while Redis sleeps: {took:?}");
    assert!(
        slept_at.elapsed() < Duration::from_secs(5),
        "the test outlived the sleep: it proves nothing"
    );
    assert_eq!(
        metric(&n1, "sigrouter_waiting_requests"),
        0.0,
        "a request is stuck waiting"
    );
    drop(n2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_misses_cause_one_refresh() {
    let redis = Redis::start();
    let mut cfg = cluster_config(&redis.url(), "n1");
    if let Some(cc) = cfg.cluster.as_mut() {
        cc.table_period = Duration::from_secs(600);
    }
    let n1 = Node::start(cfg).await;
    wait_for_nodes(&[&n1], 1).await;
    let cluster = n1.router.cluster().unwrap().clone();
    let before = metric(&n1, "sigrouter_node_table_refreshes_total");
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let c = cluster.clone();
        set.spawn(async move {
            c.wait_for_node("ghost", Duration::from_secs(1))
                .await
                .is_none()
        });
    }
    while let Some(r) = set.join_next().await {
        assert!(r.unwrap(), "a ghost node was found");
    }
    let refreshes = metric(&n1, "sigrouter_node_table_refreshes_total") - before;
    println!("1000 concurrent misses caused {refreshes} table refreshes");
    assert!(
        (1.0..=2.0).contains(&refreshes),
        "{refreshes} refreshes for 1000 misses"
    );
    assert_eq!(metric(&n1, "sigrouter_waiting_requests"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_cross_node_routing_and_recovers_by_itself() {
    let mut redis = Redis::start();
    let port = redis.port;
    let mut c1 = cluster_config(&redis.url(), "n1");
    c1.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let n1 = Node::start(c1).await;
    let n2 = Node::start(cluster_config(&redis.url(), "n2")).await;
    wait_for_nodes(&[&n1, &n2], 2).await;
    let mut a = Raw::register(n1.addr).await;
    let mut a2 = Raw::register(n1.addr).await;
    let mut b = Raw::register(n2.addr).await;
    wait_presence(&redis, &b.uuid, "n2").await;
    println!("outage test: a={} b={}", a.uuid, b.uuid);

    redis.stop();
    // Local connects keep working throughout.
    for _ in 0..3 {
        let (rid, inc) = connect(&mut a, &a2, "local during outage").await;
        answer(&mut a2, inc.connection, true, "").await;
        assert!(matches!(outcome(&a, rid).await, Message::Connected(_)));
    }
    // Cross-node connects too: the other node says it holds b.
    let (m, took) = connect_once(&mut a, &mut b, "across during outage").await;
    assert!(matches!(m, Message::Connected(_)), "{m:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // A client that registers during the outage is reachable from the other node at once.
    let mut c = Raw::register(n2.addr).await;
    let (m, _) = connect_once(&mut a, &mut c, "to a newcomer").await;
    assert!(matches!(m, Message::Connected(_)), "{m:?}");
    // A client nobody holds is offline.
    assert_offline(&mut a, Uuid::new_v4()).await;
    let ok = eventually(T, || metric(&n1, "sigrouter_redis_up") == 0.0).await;
    assert!(ok, "redis_up did not drop to 0");
    // Liveness never depends on Redis: asked once the node knows Redis is gone (right after
    // the stop it may not have noticed yet, and any node would answer 200).
    let health = reqwest_like_get(n1.metrics.unwrap(), "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(metric(&n1, r#"sigrouter_peer_lookups_total{outcome="found"}"#) >= 2.0);

    // Redis comes back empty (a restart without persistence): the nodes re-publish their
    // registry records and every session's presence, including what was claimed meanwhile.
    let redis = Redis::start_on(port);
    let back = eventually(Duration::from_secs(10), || redis.presence_on(&a.uuid, "n1")).await;
    assert!(back, "n1 did not re-publish");
    wait_presence(&redis, &b.uuid, "n2").await;
    wait_presence(&redis, &c.uuid, "n2").await;
    match connect_retrying(&mut a, &mut b, Duration::from_secs(15)).await {
        Message::Connected(c) => assert_eq!(c.peer, b.uuid),
        m => panic!("cross-node connect did not come back: {m:?}"),
    }
    assert_eq!(metric(&n1, "sigrouter_redis_up"), 1.0);
}

/// A tiny HTTP GET over a raw TCP stream (the endpoint speaks plain HTTP/1.1).
async fn reqwest_like_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_while_redis_sleeps_3s_succeeds_at_once() {
    // Redis blocked for 3 s (DEBUG SLEEP), far longer than the nodes' 1 s Redis deadline: the
    // node asks the other nodes where the target is instead, and both the library and the
    // `sigrouter client connect` process get the connection long before Redis wakes up, with
    // no retry-later on the way.
    use sigrouter_client::{Client, ClientConfig, ConnectOutcome, Event};
    let redis = Redis::start();
    let n1 = Node::start(cluster_config(&redis.url(), "n1")).await;
    let n2 = Node::start(cluster_config(&redis.url(), "n2")).await;
    wait_for_nodes(&[&n1, &n2], 2).await;
    // The target, on n2, accepts everything.
    let (target, mut events) = Client::register(ClientConfig::new(n2.addr)).await.unwrap();
    let t = target.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let Event::Incoming { connection, .. } = ev {
                let t = t.clone();
                tokio::spawn(async move { t.accept(connection, b"welcome").await });
            }
        }
    });
    wait_presence(&redis, &target.uuid(), "n2").await;
    let (initiator, _ev) = Client::register(ClientConfig::new(n1.addr)).await.unwrap();
    let retry_later = r#"sigrouter_connects_total{outcome="retry-later""#;
    let refused_before = metric(&n1, retry_later);

    // A connection opened beforehand tells within ~50 ms that Redis stopped answering (a new
    // one would itself wait on the sleeping server to be set up).
    let mut probe = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    redis.cmd_detached(&["DEBUG", "SLEEP", "3"]);
    let blocked = eventually(Duration::from_secs(2), || {
        redis::cmd("PING").query::<String>(&mut probe).is_err()
    })
    .await;
    assert!(blocked, "DEBUG SLEEP did not take effect");
    let slept_at = Instant::now();
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_sigrouter"))
        .args(["client", "connect", "--server", &n1.addr.to_string()])
        .args(["--to", &target.uuid().to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sigrouter client connect");
    let outcome = initiator.connect(target.uuid(), b"offer").await;
    let took = slept_at.elapsed();
    match outcome {
        Ok(ConnectOutcome::Connected { peer, payload, .. }) => {
            assert_eq!((peer, payload.as_slice()), (target.uuid(), &b"welcome"[..]));
        }
        other => panic!("expected Connected through the Redis stall, got {other:?}"),
    }
    let cli = tokio::task::spawn_blocking(move || cli.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&cli.stdout);
    assert_eq!(
        cli.status.code(),
        Some(0),
        "client connect printed {stdout}"
    );
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("an outcome line")).unwrap();
    assert_eq!(last["event"], "connected", "{stdout}");
    assert_eq!(last["peer"], target.uuid().to_string());
    assert_eq!(
        metric(&n1, retry_later),
        refused_before,
        "n1 answered retry-later"
    );
    assert!(
        took < Duration::from_secs(1),
        "connected after {took:?}: it waited for Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_starts_while_redis_is_down_joins_through_peers() {
    let mut redis = Redis::start();
    let n1 = Node::start(cluster_config(&redis.url(), "n1")).await;
    let n2 = Node::start(cluster_config(&redis.url(), "n2")).await;
    wait_for_nodes(&[&n1, &n2], 2).await;
    let mut a = Raw::register(n1.addr).await;
    wait_presence(&redis, &a.uuid, "n1").await;
    redis.stop();
    // n3 cannot read the registry; it knows n1's cluster address only.
    let mut c3 = cluster_config(&redis.url(), "n3");
    if let Some(cc) = c3.cluster.as_mut() {
        cc.peers = vec![n1.cluster.unwrap().to_string()];
    }
    let started = Instant::now();
    let n3 = Node::start(c3).await;
    // n1 learns n3 from its Join, n2 from n1's gossip, n3 learns n2 the same way.
    let all = eventually(Duration::from_secs(3), || {
        [&n1, &n2, &n3].iter().all(|n| {
            let c = n.router.cluster().unwrap();
            ["n1", "n2", "n3"].iter().all(|id| c.node(id).is_some())
        })
    })
    .await;
    assert!(all, "membership did not converge without Redis");
    println!(
        "three tables complete {:?} after n3 started",
        started.elapsed()
    );
    assert!(metric(&n2, "sigrouter_membership_members") >= 2.0);
    // Clients on the newcomer and on the old nodes reach each other both ways.
    let mut t = Raw::register(n3.addr).await;
    let (m, _) = connect_once(&mut a, &mut t, "to the newcomer").await;
    assert!(matches!(m, Message::Connected(_)), "{m:?}");
    let (m, _) = connect_once(&mut t, &mut a, "from the newcomer").await;
    assert!(matches!(m, Message::Connected(_)), "{m:?}");
    // n3 leaves (drain with no sessions left): the others drop it at once, not after a
    // suspicion timeout.
    drop(t);
    n3.stop().await;
    // (A silent node takes a probe period and the suspicion timeout: 1 s + 3 s.)
    let gone = eventually(Duration::from_secs(1), || {
        [&n1, &n2]
            .iter()
            .all(|n| n.router.cluster().unwrap().node("n3").is_none())
    })
    .await;
    assert!(gone, "n3 still listed after it left");
}

/// Resumes session (`uuid`, `secret`) at `node` from a new socket; returns the socket.
async fn resume_at(
    node: std::net::SocketAddr,
    uuid: Uuid,
    secret: proto::Secret,
) -> tokio::net::UdpSocket {
    let sock = Raw::socket().await;
    let mut m = Message::Resume(proto::Resume {
        rid: 77,
        uuid,
        secret,
        local: vec![],
        pad: vec![],
    });
    sock.send_to(&proto::encode_hello(&mut m).unwrap(), node)
        .await
        .unwrap();
    match recv_msg(&sock, T).await {
        Some(Message::Registered(r)) => assert_eq!(r.uuid, uuid),
        m => panic!("expected Registered, got {m:?}"),
    }
    sock
}

/// How Redis goes away while a client moves between nodes.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// Blocked (DEBUG SLEEP): the nodes' writes wait in its socket buffers and all run, in
    /// some order, when it wakes.
    Asleep,
    /// Stopped and restarted from a snapshot taken before: the writes made meanwhile are
    /// refused and must be made again.
    Restarted,
}

async fn moves_during_an_outage_leave_the_record_on_the_last_node(outage: Outage) {
    let mut redis = Redis::start();
    let port = redis.port;
    let n1 = Node::start(cluster_config(&redis.url(), "n1")).await;
    let n2 = Node::start(cluster_config(&redis.url(), "n2")).await;
    let n3 = Node::start(cluster_config(&redis.url(), "n3")).await;
    wait_for_nodes(&[&n1, &n2, &n3], 3).await;
    let x = Raw::register(n1.addr).await;
    wait_presence(&redis, &x.uuid, "n1").await;
    match outage {
        Outage::Asleep => {
            redis.cmd_detached(&["DEBUG", "SLEEP", "3"]);
            let blocked = eventually(Duration::from_secs(2), || redis.is_blocked()).await;
            assert!(blocked, "DEBUG SLEEP did not take effect");
        }
        Outage::Restarted => {
            redis.cmd(&["SET", "test:marker", "before"]).unwrap();
            redis.cmd(&["SAVE"]).unwrap();
            redis.stop();
        }
    }
    let began = Instant::now();
    // Meanwhile x moves to n2 (n1 vouches for its secret and lets it go), then to n3.
    let _s2 = resume_at(n2.addr, x.uuid, x.secret).await;
    let moved = eventually(T, || !n1.router.is_local(&x.uuid)).await;
    assert!(moved, "n1 kept the session");
    let s3 = resume_at(n3.addr, x.uuid, x.secret).await;
    let moved = eventually(T, || !n2.router.is_local(&x.uuid)).await;
    assert!(moved, "n2 kept the session");
    // Both Resumes were checked by the nodes, not Redis.
    assert!(metric(&n2, r#"sigrouter_peer_lookups_total{outcome="found"}"#) >= 1.0);
    assert!(metric(&n3, r#"sigrouter_peer_lookups_total{outcome="found"}"#) >= 1.0);
    if let Outage::Restarted = outage {
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis = Redis::start_on(port);
        // Restarted from the snapshot (where the record names n1; the nodes may already have
        // made their writes again by now).
        assert!(
            matches!(
                redis.cmd(&["GET", "test:marker"]),
                Ok(redis::Value::BulkString(_))
            ),
            "Redis did not restart from the snapshot"
        );
    }
    // Redis answers again: the record names n3, the node x is on, and only n3 from then on.
    let fixed = eventually(Duration::from_secs(8), || redis.presence_on(&x.uuid, "n3")).await;
    assert!(
        fixed,
        "{outage:?}: the record never named n3 after the outage"
    );
    println!(
        "{outage:?}: record right {:?} after the outage began",
        began.elapsed()
    );
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert!(
            redis.presence_on(&x.uuid, "n3"),
            "{outage:?}: the record went back to a node x left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And a connect from n1 finds x on n3.
    let mut a = Raw::register(n1.addr).await;
    let mut x3 = Raw::with(s3, n3.addr, x.uuid, x.secret, x.observed, 100);
    let (m, _) = connect_retrying_once(&mut a, &mut x3).await;
    assert!(matches!(m, Message::Connected(_)), "{m:?}");
}

/// [`connect_once`], once more if the first is retry-later (Redis just came back and the
/// nodes may still be re-publishing).
async fn connect_retrying_once(a: &mut Raw, b: &mut Raw) -> (Message, Duration) {
    let r = connect_once(a, b, "after").await;
    match &r.0 {
        Message::ConnectFailed(f) if f.reason == FailReason::RetryLater => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            connect_once(a, b, "after").await
        }
        _ => r,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_sleeps_no_record_points_back_to_a_node_the_client_left() {
    moves_during_an_outage_leave_the_record_on_the_last_node(Outage::Asleep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_no_record_points_back_to_a_node_the_client_left() {
    moves_during_an_outage_leave_the_record_on_the_last_node(Outage::Restarted).await;
}
