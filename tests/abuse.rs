//! A single node over real UDP on loopback against what it must refuse or survive: a wrong
//! secret, amplification, rate limits, the session cap and garbage, while real clients keep
//! working. The ordinary protocol flows: `server.rs`.

mod common;

use std::time::Duration;

use common::{
    answer, connect, eventually, metric, outcome, payload, recv_msg, test_config, Node, Raw, T,
};
use sigrouter::proto::{self, ErrorCode, Message, Secret};
use uuid::Uuid;

#[tokio::test]
async fn wrong_secret_from_another_address_changes_nothing() {
    let node = Node::start(test_config()).await;
    let mut a = Raw::register(node.addr).await;
    let mut watcher = Raw::register(node.addr).await;
    let attacker = Raw::socket().await;
    let forged = Secret([0xAA; 32]);
    let mut sent = 0;
    for rid in [1_000_000u64, 2, u64::MAX] {
        for m in [
            Message::Heartbeat(proto::Heartbeat { rid, uuid: a.uuid }),
            Message::Bye(proto::Bye { rid, uuid: a.uuid }),
            Message::Connect(proto::Connect {
                rid,
                uuid: a.uuid,
                to: watcher.uuid,
                payload: payload("spoof"),
            }),
        ] {
            let mut b = proto::encode(&m, Some(&forged)).unwrap();
            attacker.send_to(&b, node.addr).await.unwrap();
            // And with the MAC cut off entirely.
            b.truncate(b.len() - proto::MAC_LEN);
            attacker.send_to(&b, node.addr).await.unwrap();
            sent += 2;
        }
    }
    // A Resume with a wrong secret is refused and moves nothing.
    let mut m = Message::Resume(proto::Resume {
        rid: 5,
        uuid: a.uuid,
        secret: forged,
        local: vec![],
        pad: vec![],
    });
    attacker
        .send_to(&proto::encode_hello(&mut m).unwrap(), node.addr)
        .await
        .unwrap();
    match recv_msg(&attacker, T).await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    // Forged MACs count as bad_mac; datagrams with the MAC cut off no longer parse (malformed).
    let count = |reason: &str| {
        metric(
            &node,
            &format!("sigrouter_dropped_total{{reason=\"{reason}\"}}"),
        )
    };
    let ok = eventually(T, || {
        count("bad_mac") >= f64::from(sent / 2)
            && count("bad_mac") + count("malformed") >= f64::from(sent)
    })
    .await;
    assert!(ok, "forged datagrams were not all counted as drops");
    // Every forged datagram has been handled. The session is still at its own address: a push
    // to it (the watcher's Connect) reaches A's socket before A has sent anything that could
    // move it back (a forged request that had moved it would send the push to the attacker).
    let (rid, inc) = connect(&mut watcher, &a, "where are you?").await;
    assert_eq!(inc.from, watcher.uuid);
    answer(&mut a, inc.connection, true, "here").await;
    assert!(matches!(outcome(&watcher, rid).await, Message::Connected(c) if c.peer == a.uuid));
    // And it is still there (no forged Bye took it); no Incoming reached the watcher.
    assert_eq!(a.heartbeat().await.observed.0, a.sock.local_addr().unwrap());
    assert_eq!(watcher.query(vec![a.uuid]).await, vec![true]);
    let mut got_incoming = false;
    while let Some(m) = watcher.recv(Duration::from_millis(200)).await {
        got_incoming |= matches!(m, Message::Incoming(_));
    }
    assert!(!got_incoming, "a forged Connect reached its target");
}

#[tokio::test]
async fn unauthenticated_answers_are_never_larger_than_requests() {
    let node = Node::start(test_config()).await;
    let sock = Raw::socket().await;
    // Unpadded Register: no answer at all.
    let small = proto::encode(
        &Message::Register(proto::Register {
            rid: 1,
            local: vec![],
            pad: vec![],
        }),
        None,
    )
    .unwrap();
    sock.send_to(&small, node.addr).await.unwrap();
    // Whether it was answered shows below: datagrams from one socket are handled in order, so
    // an answer to it would arrive before the answer to the next probe.
    let mut probes: Vec<Vec<u8>> = Vec::new();
    let mut m = Message::Register(proto::Register {
        rid: 2,
        local: vec![proto::Addr("[2001:db8::1]:5000".parse().unwrap()); 4],
        pad: vec![],
    });
    probes.push(proto::encode_hello(&mut m).unwrap());
    let mut m = Message::Resume(proto::Resume {
        rid: 3,
        uuid: Uuid::new_v4(),
        secret: Secret([1; 32]),
        local: vec![],
        pad: vec![],
    });
    probes.push(proto::encode_hello(&mut m).unwrap());
    probes.push(
        proto::encode(
            &Message::Heartbeat(proto::Heartbeat {
                rid: 4,
                uuid: Uuid::new_v4(),
            }),
            Some(&Secret([2; 32])),
        )
        .unwrap(),
    );
    for (p, rid) in probes.into_iter().zip(2u64..) {
        sock.send_to(&p, node.addr).await.unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let answer = proto::decode(&buf[..n]).expect("a valid answer");
        assert_eq!(
            answer.rid(),
            Some(rid),
            "the first datagram after probe {rid} answers something else \
             (rid 1 is the unpadded Register): {answer:?}"
        );
        assert!(
            n <= p.len(),
            "answered {n} bytes to a {}-byte request",
            p.len()
        );
    }
    // Nothing else comes: no late answer to the unpadded Register either.
    assert_eq!(recv_msg(&sock, Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn rate_limits_per_ip_and_per_session() {
    let mut cfg = test_config();
    cfg.register_rate = 1;
    cfg.register_burst = 3;
    cfg.session_rate = 1;
    cfg.session_burst = 5;
    let node = Node::start(cfg).await;
    let sock = Raw::socket().await;
    for rid in 0..10u64 {
        let mut m = Message::Register(proto::Register {
            rid: 1000 + rid,
            local: vec![],
            pad: vec![],
        });
        sock.send_to(&proto::encode_hello(&mut m).unwrap(), node.addr)
            .await
            .unwrap();
    }
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..10 {
        match recv_msg(&sock, T).await {
            Some(Message::Registered(_)) => ok += 1,
            Some(Message::Error(e)) if e.code == ErrorCode::RateLimited => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Burst of 3, plus at most a token or two refilled while sending.
    assert!((3..=5).contains(&ok), "registered {ok}");
    assert_eq!(ok + limited, 10);

    // A registered session (from another IP would be ideal; loopback has one) is limited on
    // its own bucket: 20 heartbeats at once, burst 5.
    let mut cfg = test_config();
    cfg.session_rate = 1;
    cfg.session_burst = 5;
    let node = Node::start(cfg).await;
    let mut a = Raw::register(node.addr).await;
    for _ in 0..20 {
        let rid = a.next_rid();
        a.send(&Message::Heartbeat(proto::Heartbeat { rid, uuid: a.uuid }))
            .await;
    }
    let (mut acks, mut limited) = (0, 0);
    for _ in 0..20 {
        match recv_msg(&a.sock, T).await {
            Some(Message::HeartbeatAck(_)) => acks += 1,
            Some(Message::Error(e)) if e.code == ErrorCode::RateLimited => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((5..=7).contains(&acks), "acked {acks}");
    assert_eq!(acks + limited, 20);
}

#[tokio::test]
async fn session_cap_refuses_registers() {
    let mut cfg = test_config();
    cfg.max_sessions = 2;
    let node = Node::start(cfg).await;
    let _a = Raw::register(node.addr).await;
    let _b = Raw::register(node.addr).await;
    let sock = Raw::socket().await;
    let mut m = Message::Register(proto::Register {
        rid: 1,
        local: vec![],
        pad: vec![],
    });
    sock.send_to(&proto::encode_hello(&mut m).unwrap(), node.addr)
        .await
        .unwrap();
    match recv_msg(&sock, T).await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::Capacity),
        other => panic!("expected Capacity, got {other:?}"),
    }
    assert_eq!(node.router.session_count(), 2);
}

/// xorshift64*: deterministic garbage, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_counted_and_dropped_while_real_clients_keep_working() {
    let mut cfg = test_config();
    cfg.session_burst = 100_000;
    cfg.session_rate = 100_000;
    let node = Node::start(cfg).await;
    let mut a = Raw::register(node.addr).await;
    let mut b = Raw::register(node.addr).await;
    let junk = Raw::socket().await;
    let mut rng = Rng(0x005E_ED0F_5161_2026);
    // Valid encodings of every request type to mutate, some with a valid MAC of a real session.
    let seeds: Vec<Vec<u8>> = vec![
        proto::encode(
            &Message::Heartbeat(proto::Heartbeat {
                rid: 9,
                uuid: a.uuid,
            }),
            Some(&a.secret),
        )
        .unwrap(),
        proto::encode(
            &Message::Connect(proto::Connect {
                rid: 9,
                uuid: a.uuid,
                to: b.uuid,
                payload: payload("x"),
            }),
            Some(&a.secret),
        )
        .unwrap(),
        proto::encode(
            &Message::Query(proto::Query {
                rid: 9,
                uuid: a.uuid,
                uuids: vec![b.uuid],
            }),
            Some(&a.secret),
        )
        .unwrap(),
        proto::encode_hello(&mut Message::Register(proto::Register {
            rid: 9,
            local: vec![],
            pad: vec![],
        }))
        .unwrap(),
        {
            let mut s = vec![0u8; 20];
            s[1] = 1;
            s[4..8].copy_from_slice(&proto::STUN_MAGIC_COOKIE);
            s
        },
    ];
    let total = 20_000usize;
    let mut sent = 0usize;
    for round in 0..20 {
        for _ in 0..total / 20 {
            let d: Vec<u8> = match rng.below(5) {
                0 => (0..rng.below(1500)).map(|_| rng.next() as u8).collect(),
                1 | 2 => {
                    let mut d = seeds[rng.below(seeds.len())].clone();
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(d.len());
                        d[i] ^= 1 << rng.below(8);
                    }
                    d
                }
                3 => {
                    let d = &seeds[rng.below(seeds.len())];
                    d[..rng.below(d.len())].to_vec()
                }
                _ => {
                    let mut d = seeds[rng.below(seeds.len())].clone();
                    d.extend((0..rng.below(1400)).map(|_| rng.next() as u8));
                    d
                }
            };
            if junk.send_to(&d, node.addr).await.is_ok() {
                sent += 1;
            }
            // Pace the flood a little so the kernel queue, not the server, is not what drops it.
            if sent % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        // Real clients are served throughout (retransmitting as real clients do).
        assert_eq!(
            heartbeat_retrying(&mut a).await.observed.0,
            a.sock.local_addr().unwrap(),
            "round {round}"
        );
    }
    let (rid, inc) = connect(&mut a, &b, "after the storm").await;
    answer(&mut b, inc.connection, true, "").await;
    assert!(matches!(outcome(&a, rid).await, Message::Connected(_)));
    let dropped: f64 = node
        .router
        .metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with("sigrouter_dropped_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    println!("garbage datagrams sent: {sent}; counted drops: {dropped}");
    assert_eq!(b.query(vec![a.uuid]).await, vec![true]);
    assert!(
        dropped > (sent / 2) as f64,
        "only {dropped} of {sent} garbage datagrams counted as drops"
    );
}

async fn heartbeat_retrying(a: &mut Raw) -> proto::HeartbeatAck {
    for _ in 0..10 {
        let rid = a.next_rid();
        a.send(&Message::Heartbeat(proto::Heartbeat { rid, uuid: a.uuid }))
            .await;
        let got = a
            .recv_until(Duration::from_millis(500), |m| match m {
                Message::HeartbeatAck(h) if h.rid == rid => Some(h.clone()),
                _ => None,
            })
            .await;
        if let Some(h) = got {
            return h;
        }
    }
    panic!("no HeartbeatAck in 10 tries")
}
