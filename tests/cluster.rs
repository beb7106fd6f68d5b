//! Cluster mode against a real redis-server: nodes in this process on loopback, clients driven
//! by hand-crafted datagrams: routing across nodes, a Resume on another node, a slow lookup,
//! forged and replayed node-to-node datagrams. Redis slow or away: `cluster_outage.rs`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{
    answer, assert_offline, cluster_config, connect, eventually, metric, outcome, payload,
    recv_msg, signal, wait_for_nodes, wait_presence, Node, Raw, Redis, CLUSTER_KEY, T,
};
use sigrouter::cluster::wire::{self, Body, Envelope};
use sigrouter::proto::{self, ErrorCode, FailReason, Message};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_connect_and_signal_across_nodes() {
    let redis = Redis::start();
    let n1 = Node::start(cluster_config(&redis.url(), "n1")).await;
    let n2 = Node::start(cluster_config(&redis.url(), "n2")).await;
    let n3 = Node::start(cluster_config(&redis.url(), "n3")).await;
    wait_for_nodes(&[&n1, &n2, &n3], 3).await;
    let mut a = Raw::register(n1.addr).await;
    let mut b = Raw::register(n2.addr).await;
    let mut c = Raw::register(n3.addr).await;
    wait_presence(&redis, &a.uuid, "n1").await;
    wait_presence(&redis, &b.uuid, "n2").await;
    wait_presence(&redis, &c.uuid, "n3").await;

    // a (n1) -> b (n2): accepted, addresses exchanged, signals both ways across the hop.
    let gets_before = redis.command_calls().get("get").copied().unwrap_or(0);
    let (rid, inc) = connect(&mut a, &b, "offer").await;
    // The first connect to b looks b up in Redis (a GET of its presence record): the control
    // for the steady-state check below.
    let gets = redis.command_calls().get("get").copied().unwrap_or(0) - gets_before;
    assert!(gets >= 1, "the first connect to b read no presence record");
    assert_eq!(
        (inc.from, inc.observed.0),
        (a.uuid, a.sock.local_addr().unwrap())
    );
    assert_eq!(inc.payload, payload("offer"));
    answer(&mut b, inc.connection, true, "answer").await;
    let Message::Connected(conn) = outcome(&a, rid).await else {
        panic!("expected Connected across nodes")
    };
    assert_eq!(
        (conn.peer, conn.observed.0),
        (b.uuid, b.sock.local_addr().unwrap())
    );
    assert_eq!(conn.payload, payload("answer"));
    signal(&mut a, &b, conn.connection, "a->b over the hop").await;
    signal(&mut b, &a, conn.connection, "b->a over the hop").await;

    // c (n3) -> a (n1): rejected, with the payload.
    let (rid, inc) = connect(&mut c, &a, "hi").await;
    answer(&mut a, inc.connection, false, "no thanks").await;
    match outcome(&c, rid).await {
        Message::ConnectFailed(f) => assert_eq!(
            (f.reason, f.payload),
            (FailReason::Rejected, payload("no thanks"))
        ),
        m => panic!("expected rejected, got {m:?}"),
    }

    // Online status across nodes.
    assert_eq!(
        c.query(vec![a.uuid, b.uuid, Uuid::new_v4()]).await,
        vec![true, true, false]
    );

    // An offline target anywhere: offline.
    assert_offline(&mut a, Uuid::new_v4()).await;

    // Steady state: repeated connects to the same peer cost no Redis command (cached). Redis
    // counts what it is asked, by command: during the connects only the nodes' periodic work
    // may show (registry renewals: HSET, PEXPIRE; node-table reads: HGETALL; HDEL of expired
    // records) and this test's own INFO.
    let periodic = ["hset", "pexpire", "hgetall", "hdel", "info"];
    let calls_before = redis.command_calls();
    let routed_before = metric(&n1, "sigrouter_routed_requests_total")
        + metric(&n2, "sigrouter_routed_requests_total");
    for i in 0..20 {
        let (rid, inc) = connect(&mut a, &b, &format!("again {i}")).await;
        answer(&mut b, inc.connection, true, "").await;
        assert!(matches!(outcome(&a, rid).await, Message::Connected(_)));
    }
    let calls_after = redis.command_calls();
    let routed = metric(&n1, "sigrouter_routed_requests_total")
        + metric(&n2, "sigrouter_routed_requests_total")
        - routed_before;
    let delta: BTreeMap<&str, u64> = calls_after
        .iter()
        .map(|(c, n)| (c.as_str(), n - calls_before.get(c).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    println!("redis commands during {routed} routed requests: {delta:?}");
    let per_request: BTreeMap<&str, u64> = delta
        .into_iter()
        .filter(|(c, _)| !periodic.contains(c))
        .collect();
    assert!(
        per_request.is_empty(),
        "repeated connects asked Redis for {per_request:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_internal_datagrams_are_dropped() {
    let redis = Redis::start();
    let n1 = Node::start(cluster_config(&redis.url(), "n1")).await;
    let n2 = Node::start(cluster_config(&redis.url(), "n2")).await;
    wait_for_nodes(&[&n1, &n2], 2).await;
    let target = n2.cluster.unwrap();
    let sock = Raw::socket().await;
    let now_ms = sigrouter::cluster::now_ms();
    let env = |from: &str, to: &str, ts: u64, seq: u64| Envelope {
        from: from.into(),
        to: to.into(),
        ts,
        seq,
        body: Body::Moved {
            uuid: Uuid::new_v4(),
        },
    };
    // Positive control: a well-formed datagram from "n1" is answered.
    let good = wire::encode(&env("n1", "n2", now_ms, 1), CLUSTER_KEY).unwrap();
    sock.send_to(&good, target).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
        .await
        .expect("reply")
        .unwrap();
    let reply = wire::decode(&buf[..n], CLUSTER_KEY).unwrap();
    assert_eq!(
        (reply.seq, reply.body),
        (
            1,
            Body::Reply {
                status: wire::Status::Ok
            }
        )
    );

    let before = metric(&n2, "sigrouter_dropped_total{reason=\"cluster_auth\"}");
    let mut forged: Vec<Vec<u8>> = Vec::new();
    // No MAC at all.
    forged.push(good[..good.len() - proto::MAC_LEN].to_vec());
    // A MAC under the wrong key.
    forged.push(
        wire::encode(
            &env("n1", "n2", now_ms, 2),
            b"not-the-cluster-key-not-the-cluster-key",
        )
        .unwrap(),
    );
    // A datagram n1 addressed to n3, replayed to n2.
    forged.push(wire::encode(&env("n1", "n3", now_ms, 3), CLUSTER_KEY).unwrap());
    // The good datagram re-labelled with another node id (the MAC no longer matches).
    let mut relabelled = good.clone();
    let i = relabelled.windows(2).position(|w| w == b"n1").unwrap();
    relabelled[i + 1] = b'3';
    forged.push(relabelled);
    // Claims to come from n2 itself.
    forged.push(wire::encode(&env("n2", "n2", now_ms, 4), CLUSTER_KEY).unwrap());
    // A capture from long ago.
    forged.push(wire::encode(&env("n1", "n2", now_ms - 600_000, 5), CLUSTER_KEY).unwrap());
    for f in &forged {
        sock.send_to(f, target).await.unwrap();
    }
    let all = eventually(T, || {
        metric(&n2, "sigrouter_dropped_total{reason=\"cluster_auth\"}") - before
            >= forged.len() as f64
    })
    .await;
    assert!(
        all,
        "not every forged datagram was counted as a cluster_auth drop"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
            .await
            .is_err(),
        "a forged datagram was answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_another_node_keeps_the_uuid() {
    let redis = Redis::start();
    let n1 = Node::start(cluster_config(&redis.url(), "n1")).await;
    let n2 = Node::start(cluster_config(&redis.url(), "n2")).await;
    wait_for_nodes(&[&n1, &n2], 2).await;
    let a = Raw::register(n1.addr).await;
    wait_presence(&redis, &a.uuid, "n1").await;
    let sock = Raw::socket().await;
    // A wrong secret is refused by the other node too.
    let mut bad = Message::Resume(proto::Resume {
        rid: 50,
        uuid: a.uuid,
        secret: proto::Secret([9; 32]),
        local: vec![],
        pad: vec![],
    });
    sock.send_to(&proto::encode_hello(&mut bad).unwrap(), n2.addr)
        .await
        .unwrap();
    match recv_msg(&sock, T).await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        m => panic!("expected Unauthorized, got {m:?}"),
    }
    let mut m = Message::Resume(proto::Resume {
        rid: 51,
        uuid: a.uuid,
        secret: a.secret,
        local: vec![],
        pad: vec![],
    });
    sock.send_to(&proto::encode_hello(&mut m).unwrap(), n2.addr)
        .await
        .unwrap();
    match recv_msg(&sock, T).await {
        Some(Message::Registered(r)) => assert_eq!(r.uuid, a.uuid),
        m => panic!("expected Registered, got {m:?}"),
    }
    wait_presence(&redis, &a.uuid, "n2").await;
    // The old node let go of it (Moved).
    let gone = eventually(T, || !n1.router.is_local(&a.uuid)).await;
    assert!(gone, "n1 still holds the session after it moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lookup_still_connects() {
    // The connect needs a Redis lookup slowed by DEBUG SLEEP but within the node's Redis
    // deadline: the pending connect waits for it, it is not failed on a timer tick while its
    // target's node is still being looked up.
    let redis = Redis::start();
    let mut c1 = cluster_config(&redis.url(), "n1");
    if let Some(cc) = c1.cluster.as_mut() {
        cc.table_period = Duration::from_secs(600);
        // Redis slow but within its deadline: the lookup waits for it (no hedge to the peers).
        cc.redis_hedge = Duration::from_secs(5);
    }
    let n1 = Node::start(c1).await;
    wait_for_nodes(&[&n1], 1).await;
    let n2 = Node::start(cluster_config(&redis.url(), "n2")).await;
    let mut a = Raw::register(n1.addr).await;
    let mut b = Raw::register(n2.addr).await;
    wait_presence(&redis, &b.uuid, "n2").await;
    // Redis sleeps 0.8 s, within the nodes' 1 s Redis deadline. The connect is sent only once
    // Redis is seen blocked (no answer for 200 ms), so its lookup does wait, for the rest of
    // the sleep.
    redis.cmd_detached(&["DEBUG", "SLEEP", "0.8"]);
    let blocked = eventually(Duration::from_secs(2), || {
        redis.is_blocked_for(Duration::from_millis(200))
    })
    .await;
    assert!(blocked, "DEBUG SLEEP did not take effect");
    // Sent by hand, not with the retrying `connect` helper: a retry would hide the bug.
    let rid = a.send_connect(b.uuid, "patience").await;
    let inc = b
        .recv_until(T, |m| match m {
            Message::Incoming(i) => Some(i.clone()),
            _ => None,
        })
        .await
        .expect("the Incoming arrives once Redis answers");
    answer(&mut b, inc.connection, true, "").await;
    match outcome(&a, rid).await {
        Message::Connected(c) => assert_eq!(c.peer, b.uuid),
        m => panic!("expected Connected after a slow lookup, got {m:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_membership_and_lookup_datagrams_are_dropped_and_counted() {
    use sigrouter::cluster::membership::{MemberId, Membership, Settings};
    let redis = Redis::start();
    let n2 = Node::start(cluster_config(&redis.url(), "n2")).await;
    wait_for_nodes(&[&n2], 1).await;
    let b = Raw::register(n2.addr).await;
    let target = n2.cluster.unwrap();
    // This socket plays node "n1", holding the cluster key.
    let sock = Raw::socket().await;
    let env = |seq: u64, body: Body| Envelope {
        from: "n1".into(),
        to: "n2".into(),
        ts: sigrouter::cluster::now_ms(),
        seq,
        body,
    };
    let drops = || metric(&n2, "sigrouter_dropped_total{reason=\"cluster_auth\"}");
    let mut buf = [0u8; 2048];

    // A lookup, answered from n2's sessions.
    let ask = wire::encode(
        &env(
            1,
            Body::WhoHas {
                uuids: vec![b.uuid, Uuid::new_v4()],
                verifier: None,
            },
        ),
        CLUSTER_KEY,
    )
    .unwrap();
    sock.send_to(&ask, target).await.unwrap();
    let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let reply = wire::decode(&buf[..n], CLUSTER_KEY).unwrap();
    assert_eq!(
        (reply.seq, reply.body),
        (
            1,
            Body::Holds {
                held: vec![true, false],
                verified: None
            }
        )
    );
    // The same lookup again (a replay), and one under another key: dropped, not answered.
    let before = drops();
    sock.send_to(&ask, target).await.unwrap();
    let forged = wire::encode(
        &env(
            2,
            Body::WhoHas {
                uuids: vec![b.uuid],
                verifier: None,
            },
        ),
        b"not-the-cluster-key-not-the-cluster-key",
    )
    .unwrap();
    sock.send_to(&forged, target).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
            .await
            .is_err(),
        "a replayed or forged lookup was answered"
    );
    assert!(eventually(T, || drops() - before >= 2.0).await);

    // Membership: "n1" announces itself; n2 answers with its view (to n1's address).
    let me = |id: &str| MemberId {
        id: id.into(),
        internal: sock.local_addr().unwrap(),
        public: sock.local_addr().unwrap(),
        started_ms: sigrouter::cluster::now_ms(),
        bump: 0,
    };
    let n2_id = MemberId {
        id: "n2".into(),
        internal: target,
        public: n2.addr,
        started_ms: 0,
        bump: 0,
    };
    let settings = Settings::lan(Duration::from_secs(1), Duration::from_secs(2));
    let mut m1 = Membership::new(me("n1"), settings, 1);
    m1.announce(Instant::now(), n2_id.clone());
    let (_, swim) = m1.take_outbox().pop().unwrap();
    let announce = wire::encode(&env(3, Body::Swim(swim)), CLUSTER_KEY).unwrap();
    sock.send_to(&announce, target).await.unwrap();
    let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
        .await
        .expect("n2 answers the announce")
        .unwrap();
    let feed = wire::decode(&buf[..n], CLUSTER_KEY).unwrap();
    let Body::Swim(data) = feed.body else {
        panic!("expected a SWIM answer, got {:?}", feed.body)
    };
    m1.handle(Instant::now(), "n2", &data).expect("n2's answer");
    assert_eq!(m1.active_count(), 1, "n1 learned n2");
    let before = drops();
    // The announce again: a replay.
    sock.send_to(&announce, target).await.unwrap();
    // A SWIM message from "n3" carried in an envelope from "n1": spoofed.
    let mut m3 = Membership::new(me("n3"), settings, 3);
    m3.announce(Instant::now(), n2_id);
    let (_, swim3) = m3.take_outbox().pop().unwrap();
    let spoofed = wire::encode(&env(4, Body::Swim(swim3)), CLUSTER_KEY).unwrap();
    sock.send_to(&spoofed, target).await.unwrap();
    // A Join naming another node than its sender.
    let join = Envelope {
        to: String::new(),
        ..env(5, Body::Join { member: me("n3") })
    };
    sock.send_to(&wire::encode(&join, CLUSTER_KEY).unwrap(), target)
        .await
        .unwrap();
    // A SWIM message under the wrong key.
    let wrong = wire::encode(
        &env(6, Body::Swim(b"whatever".to_vec())),
        b"not-the-cluster-key-not-the-cluster-key",
    )
    .unwrap();
    sock.send_to(&wrong, target).await.unwrap();
    let all = eventually(T, || drops() - before >= 4.0).await;
    assert!(all, "not every forged or replayed datagram was counted");
    let members = n2.router.cluster().unwrap().table();
    assert!(
        members.get("n3").is_none(),
        "a spoofed member made it into the table"
    );
}
