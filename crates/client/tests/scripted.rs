//! The client against a scripted router: plain UDP sockets on 127.0.0.1 that speak the real
//! codec and answer exactly as each test says. This covers what a single real node cannot be
//! made to do on demand (Migrate, a duplicate push, a forged push, a spoofed Error) and checks
//! datagram-level details (retransmissions reuse the request id, every push copy is
//! acknowledged). The behaviour against the real router is in the root crate's
//! `tests/client_lib.rs`.

#[path = "scripted/draining.rs"]
mod draining;
#[path = "scripted/retries.rs"]
mod retries;
#[path = "scripted/router.rs"]
mod router;

use std::net::SocketAddr;
use std::time::Duration;

use sigrouter_client::{ClientConfig, ClientError, ErrorCode, Event, Secret};
use sigrouter_proto::{
    encode, Addr, ErrorMsg, HeartbeatAck, Message, Migrate, Payload, SignalPush, MIN_HELLO_LEN,
};
use tokio::net::UdpSocket;
use tokio::time::{timeout, Instant};
use uuid::Uuid;

use router::{incoming, next_event, register, Router, WAIT};

#[tokio::test]
async fn pushes_are_acked_every_time_and_surfaced_once() {
    let r = Router::new(Uuid::new_v4(), Secret([3; 32])).await;
    let (_client, mut events, at) = register(&r, ClientConfig::new(r.addr())).await;
    let c1 = Uuid::new_v4();

    // A push and its retransmission: both acknowledged, one event.
    r.send(&incoming(1, c1, b"offer"), at).await;
    r.send(&incoming(1, c1, b"offer"), at).await;
    assert_eq!(r.expect_ack(1).await, at);
    r.expect_ack(1).await;
    match events.try_recv() {
        Some(Event::Incoming {
            connection,
            from,
            observed,
            local,
            payload,
        }) => {
            assert_eq!((connection, from), (c1, Uuid::from_u128(7)));
            assert_eq!(observed, "192.0.2.1:4000".parse().unwrap());
            assert_eq!(local, vec!["10.0.0.7:4000".parse().unwrap()]);
            assert_eq!(payload, b"offer");
        }
        other => panic!("expected one Incoming, got {other:?}"),
    }
    assert_eq!(events.try_recv(), None, "the duplicate is not surfaced");

    // A forged push (wrong key) is neither acknowledged nor surfaced: the first ack the router
    // sees is for the genuine push sent after it.
    r.send_with_key(
        &incoming(2, Uuid::new_v4(), b"forged"),
        &Secret([4; 32]),
        at,
    )
    .await;
    let signal = Message::SignalPush(SignalPush {
        push: 3,
        connection: c1,
        from: Uuid::from_u128(7),
        payload: Payload::from(b"candidate".to_vec()),
    });
    r.send(&signal, at).await;
    r.expect_ack(3).await;
    assert_eq!(
        events.try_recv(),
        Some(Event::Signal {
            connection: c1,
            from: Uuid::from_u128(7),
            payload: b"candidate".to_vec()
        })
    );
    assert_eq!(events.try_recv(), None);

    // An id seen before but a different push (another node numbering from 1 after a move) is
    // new, not a duplicate.
    let c2 = Uuid::new_v4();
    r.send(&incoming(1, c2, b"again"), at).await;
    r.expect_ack(1).await;
    assert!(matches!(
        events.try_recv(),
        Some(Event::Incoming { connection, .. }) if connection == c2
    ));
}

#[tokio::test]
async fn retransmissions_reuse_the_rid_refusals_are_retried_and_spoofed_errors_ignored() {
    let r = Router::new(Uuid::new_v4(), Secret([5; 32])).await;
    let mut cfg = ClientConfig::new(r.addr());
    cfg.initial_rto = Duration::from_millis(100);
    let (client, _events, at) = register(&r, cfg).await;

    let hb = tokio::spawn({
        let c = client.clone();
        async move { c.heartbeat().await }
    });
    // The first Heartbeat is "lost"; the retransmission repeats it byte for byte.
    let (first, first_bytes, _) = r.recv().await;
    let sent = Instant::now();
    let (again, again_bytes, _) = r.recv().await;
    assert!(
        sent.elapsed() >= Duration::from_millis(80),
        "waited one RTO"
    );
    assert_eq!(first, again);
    assert_eq!(first_bytes, again_bytes);
    let rid = first.rid().unwrap();

    // Someone else answers with an unauthenticated Error for that rid: ignored.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let err = encode(
        &Message::Error(ErrorMsg {
            rid,
            code: ErrorCode::Unauthorized,
            to: None,
        }),
        None,
    )
    .unwrap();
    stranger.send_to(&err, at).await.unwrap();
    // The router says slow down: it did not carry the request out (it rate-limits only new
    // requests), so the client pauses and retries with a new rid. A plain retransmission of the
    // refused copy may still be on its way first: within a second, only the old rid or a newer
    // one may come, and a newer one must.
    r.send(
        &Message::Error(ErrorMsg {
            rid,
            code: ErrorCode::RateLimited,
            to: None,
        }),
        at,
    )
    .await;
    let window = Instant::now() + Duration::from_secs(1);
    let mut renewed = None;
    while let Some((retry, _, _)) = r.recv_until(window).await {
        assert!(matches!(retry, Message::Heartbeat(_)), "{retry:?}");
        let got = retry.rid().unwrap();
        if got > rid {
            renewed = Some(got);
            break;
        }
        assert_eq!(got, rid, "only the old rid or a newer one");
    }
    let rid = renewed.expect("no retry with a new rid after RateLimited");
    // RetryLater: the router did not do it and may remember the refusal under that rid, so
    // the retry is a new request with a new rid. A copy of the old one may already be on its
    // way when the refusal arrives (at most one retransmission is due at a time).
    r.send(
        &Message::Error(ErrorMsg {
            rid,
            code: ErrorCode::RetryLater,
            to: None,
        }),
        at,
    )
    .await;
    let old = rid;
    let mut stale = 0;
    let retry = loop {
        let (retry, _, _) = r.recv().await;
        if retry.rid() != Some(old) {
            break retry;
        }
        stale += 1;
        assert!(stale <= 1, "the old rid is still sent after RetryLater");
    };
    assert!(matches!(retry, Message::Heartbeat(_)));
    let rid = retry.rid().unwrap();
    assert!(rid > old);
    let observed: SocketAddr = "198.51.100.9:6000".parse().unwrap();
    r.send(
        &Message::HeartbeatAck(HeartbeatAck {
            rid,
            observed: Addr(observed),
        }),
        at,
    )
    .await;
    assert_eq!(hb.await.unwrap().unwrap(), observed);
    assert_eq!(client.observed(), observed);
}

#[tokio::test]
async fn session_errors_count_only_with_a_valid_mac() {
    let r = Router::new(Uuid::new_v4(), Secret([8; 32])).await;
    let (client, _events, at) = register(&r, ClientConfig::new(r.addr())).await;
    let hb = tokio::spawn({
        let c = client.clone();
        async move { c.heartbeat().await }
    });
    let (m, _, _) = r.recv().await;
    let rid = m.rid().unwrap();
    let refusal = |code| {
        Message::SessionError(ErrorMsg {
            rid,
            code,
            to: None,
        })
    };
    // MAC'd with another secret: dropped. Had it counted, the heartbeat would fail with
    // Unauthorized.
    r.send_with_key(&refusal(ErrorCode::Unauthorized), &Secret([9; 32]), at)
        .await;
    // MAC'd with the session's secret: the same as an Error with that code.
    r.send(&refusal(ErrorCode::BadRequest), at).await;
    let res = timeout(WAIT, hb)
        .await
        .expect("heartbeat answered")
        .unwrap();
    assert!(
        matches!(res, Err(ClientError::Server(ErrorCode::BadRequest))),
        "{res:?}"
    );
}

#[tokio::test]
async fn unknown_session_resumes_at_the_same_address_and_retries_with_a_new_rid() {
    let r = Router::new(Uuid::new_v4(), Secret([6; 32])).await;
    let (client, mut events, at) = register(&r, ClientConfig::new(r.addr())).await;
    let q = tokio::spawn({
        let c = client.clone();
        async move { c.query(&[Uuid::from_u128(1)]).await }
    });
    let (m, _, _) = r.recv().await;
    let rid = m.rid().unwrap();
    r.send(
        &Message::Error(ErrorMsg {
            rid,
            code: ErrorCode::UnknownSession,
            to: None,
        }),
        at,
    )
    .await;
    // Resume from the same port, same UUID and secret.
    let (m, bytes, from) = r.recv().await;
    let Message::Resume(res) = m else {
        panic!("expected Resume, got {m:?}")
    };
    assert_eq!(from, at, "UnknownSession does not change the port");
    assert!(bytes.len() >= MIN_HELLO_LEN);
    assert_eq!(res.uuid, r.uuid);
    assert!(res.secret.ct_eq(&r.secret));
    r.send(&r.registered(res.rid, from), from).await;
    // Then the Query again, as a new request for the node now holding the session: a new,
    // higher rid (rids only grow, Resume included).
    let (m, _, _) = r.recv().await;
    assert!(matches!(m, Message::Query(_)), "{m:?}");
    let retry = m.rid().unwrap();
    assert!(
        retry > res.rid && res.rid > rid,
        "{rid} < {} < {retry}",
        res.rid
    );
    r.send(
        &Message::QueryResult(sigrouter_proto::QueryResult {
            rid: retry,
            online: vec![true],
        }),
        at,
    )
    .await;
    assert_eq!(q.await.unwrap().unwrap(), [true]);
    assert_eq!(
        next_event(&mut events).await,
        Event::Resumed { server: r.addr() }
    );
}

#[tokio::test]
async fn migrate_moves_to_a_new_port_and_resumes_where_told() {
    let uuid = Uuid::new_v4();
    let secret = Secret([8; 32]);
    let r1 = Router::new(uuid, secret).await;
    let r2 = Router::new(uuid, secret).await;
    let (client, mut events, at) = register(&r1, ClientConfig::new(r1.addr())).await;

    // Migrate to r2: acknowledged from the old port, then Resume at r2 from a new port.
    let migrate = |push, to: Option<SocketAddr>| {
        Message::Migrate(Migrate {
            push,
            to: to.map(Addr),
        })
    };
    r1.send(&migrate(1, Some(r2.addr())), at).await;
    assert_eq!(r1.expect_ack(1).await, at);
    let (m, _, from) = r2.recv().await;
    let Message::Resume(res) = m else {
        panic!("expected Resume at r2, got {m:?}")
    };
    assert_ne!(from.port(), at.port(), "a new local port");
    assert_eq!(res.uuid, uuid);
    assert_eq!(res.local, vec![Addr(from)], "announces the new port");
    r2.send(&r2.registered(res.rid, from), from).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Migrated { to: r2.addr() }
    );
    assert_eq!(client.server(), r2.addr());
    assert_eq!(client.local_addr(), from);
    assert_eq!(client.uuid(), uuid);

    // Requests now go to r2.
    let hb = tokio::spawn({
        let c = client.clone();
        async move { c.heartbeat().await }
    });
    let (m, _, hb_from) = r2.recv().await;
    assert!(matches!(m, Message::Heartbeat(_)));
    assert_eq!(hb_from, from);
    r2.send(
        &Message::HeartbeatAck(HeartbeatAck {
            rid: m.rid().unwrap(),
            observed: Addr(from),
        }),
        from,
    )
    .await;
    assert_eq!(hb.await.unwrap().unwrap(), from);

    // Migrate without an address: back to the configured server, from yet another port.
    r2.send(&migrate(2, None), from).await;
    r2.expect_ack(2).await;
    let (m, _, from3) = r1.recv().await;
    let Message::Resume(res) = m else {
        panic!("expected Resume at r1, got {m:?}")
    };
    assert!(from3.port() != from.port() && from3.port() != at.port());
    r1.send(&r1.registered(res.rid, from3), from3).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Migrated { to: r1.addr() }
    );
    assert_eq!(client.server(), r1.addr());

    client.close().await;
    assert!(
        matches!(timeout(WAIT, events.recv()).await, Ok(None)),
        "events end when the client closes"
    );
}
