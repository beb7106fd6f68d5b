//! Requests that time out, the cap on requests in flight, and connects refused with
//! retry-later or rate-limited: retried until they connect or their deadline passes.

use std::net::SocketAddr;
use std::time::Duration;

use sigrouter_client::{ClientConfig, ClientError, ConnectOutcome, ErrorCode, FailReason, Secret};
use sigrouter_proto::{decode, Addr, Connected, Message, Payload};
use tokio::time::{timeout, Instant};
use uuid::Uuid;

use crate::router::{connect_failed, error, register, retry_pause_bounds, scripted, Router};

#[tokio::test]
async fn requests_time_out_and_closed_clients_refuse_work() {
    let r = Router::new(Uuid::new_v4(), Secret([9; 32])).await;
    let mut cfg = ClientConfig::new(r.addr());
    cfg.request_timeout = Duration::from_millis(600);
    cfg.initial_rto = Duration::from_millis(100);
    let (client, _events, _) = register(&r, cfg).await;
    let started = Instant::now();
    assert!(matches!(
        client.heartbeat().await,
        Err(ClientError::Timeout)
    ));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // 100 + 200 + 300 (capped by the deadline): three transmissions.
    let mut n = 0;
    let mut buf = [0u8; 2048];
    while let Ok(Ok(_)) = timeout(Duration::from_millis(50), r.sock.recv_from(&mut buf)).await {
        n += 1;
    }
    assert_eq!(n, 3, "transmissions of one request");

    let c2 = client.clone();
    client.close().await;
    assert!(matches!(c2.heartbeat().await, Err(ClientError::Closed)));
}

#[tokio::test]
async fn at_most_fifteen_application_requests_are_in_flight() {
    let r = Router::new(Uuid::new_v4(), Secret([10; 32])).await;
    let (client, _events, at) = register(&r, ClientConfig::new(r.addr())).await;
    let mut tasks = Vec::new();
    for n in 0..20u128 {
        let c = client.clone();
        tasks.push(tokio::spawn(
            async move { c.query(&[Uuid::from_u128(n)]).await },
        ));
    }
    let mut rids = std::collections::BTreeSet::new();
    while rids.len() < 15 {
        rids.insert(r.recv().await.0.rid().unwrap());
    }
    // Only retransmissions of those 15 while none is answered.
    let quiet = Instant::now() + Duration::from_millis(600);
    let mut buf = [0u8; 2048];
    while let Ok(Ok((n, _))) = tokio::time::timeout_at(quiet, r.sock.recv_from(&mut buf)).await {
        let rid = decode(&buf[..n]).unwrap().rid().unwrap();
        assert!(rids.contains(&rid), "a 16th request went out");
    }
    // Answer everything as it comes; all 20 complete.
    let answered = tokio::spawn(async move {
        loop {
            let (m, _, _) = r.recv().await;
            let rid = m.rid().unwrap();
            r.send(
                &Message::QueryResult(sigrouter_proto::QueryResult {
                    rid,
                    online: vec![false],
                }),
                at,
            )
            .await;
        }
    });
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), [false]);
    }
    answered.abort();
}

#[tokio::test]
async fn retry_later_and_rate_limited_connects_are_retried_until_they_connect() {
    let r = Router::new(Uuid::new_v4(), Secret([11; 32])).await;
    let mut cfg = ClientConfig::new(r.addr());
    cfg.initial_rto = Duration::from_millis(100);
    let (client, _events, at) = register(&r, cfg).await;
    let target = Uuid::new_v4();
    let peer_at: SocketAddr = "203.0.113.5:7000".parse().unwrap();
    let call = {
        let c = client.clone();
        async move { c.connect(target, b"offer").await }
    };
    // Refused three ways in turn, then connected: ConnectFailed{RetryLater}, Error RetryLater,
    // Error RateLimited. (`Draining` is never retried at the same router: see
    // `a_request_refused_with_draining_moves_the_session_first`.)
    let mut n = 0;
    let (outcome, _, seen) = scripted(&r, at, call, |m| {
        let rid = m.rid().unwrap();
        n += 1;
        Some(match n {
            1 => connect_failed(rid, FailReason::RetryLater),
            2 => error(rid, ErrorCode::RetryLater),
            3 => error(rid, ErrorCode::RateLimited),
            _ => Message::Connected(Connected {
                rid,
                connection: Uuid::from_u128(42),
                peer: target,
                observed: Addr(peer_at),
                local: vec![],
                payload: Payload::from(b"answer".to_vec()),
            }),
        })
    })
    .await;
    // The caller sees only the connection.
    match outcome.expect("connected") {
        ConnectOutcome::Connected {
            connection,
            peer,
            observed,
            payload,
            ..
        } => {
            assert_eq!(
                (connection, peer, observed),
                (Uuid::from_u128(42), target, peer_at)
            );
            assert_eq!(payload, b"answer");
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    // Every datagram was the same Connect (answered at once, so none is a retransmission).
    assert_eq!(seen.len(), 4, "{seen:?}");
    for (_, m) in &seen {
        let Message::Connect(c) = m else {
            panic!("expected Connect, got {m:?}")
        };
        assert_eq!((c.to, c.payload.as_ref()), (target, &b"offer"[..]));
    }
    let rids: Vec<u64> = seen.iter().map(|(_, m)| m.rid().unwrap()).collect();
    // After every refusal (retry-later in either form, RateLimited): a new, higher
    // rid (the router refuses only requests it did not carry out).
    assert!(rids.windows(2).all(|w| w[1] > w[0]), "{rids:?}");
    // Pauses between retries: jittered, doubling from 250 ms.
    for i in 1..seen.len() {
        let gap = seen[i].0 - seen[i - 1].0;
        let (lo, hi) = retry_pause_bounds(i as u32 - 1, Duration::from_millis(300));
        assert!(
            gap >= lo && gap <= hi,
            "pause {i}: {gap:?} not in [{lo:?}, {hi:?}]"
        );
    }
}

#[tokio::test]
async fn retry_later_reaches_the_caller_only_once_the_deadline_has_passed() {
    let r = Router::new(Uuid::new_v4(), Secret([12; 32])).await;
    let mut cfg = ClientConfig::new(r.addr());
    cfg.initial_rto = Duration::from_millis(100);
    cfg.connect_timeout = Duration::from_millis(1500);
    cfg.request_timeout = Duration::from_millis(1200);
    let (client, _events, at) = register(&r, cfg).await;
    let target = Uuid::new_v4();

    // Every Connect refused with ConnectFailed{RetryLater}: the caller gets that outcome, but
    // only after its 1.5 s deadline, the client having tried again with new rids meanwhile.
    let call = {
        let c = client.clone();
        async move { c.connect(target, b"").await }
    };
    let (outcome, took, seen) = scripted(&r, at, call, |m| {
        Some(connect_failed(m.rid().unwrap(), FailReason::RetryLater))
    })
    .await;
    assert!(
        matches!(
            outcome,
            Ok(ConnectOutcome::Failed {
                reason: FailReason::RetryLater,
                ..
            })
        ),
        "{outcome:?}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(2200),
        "{took:?}"
    );
    let rids: Vec<u64> = seen.iter().map(|(_, m)| m.rid().unwrap()).collect();
    assert!(rids.len() >= 3, "too few retries: {rids:?}");
    assert!(rids.windows(2).all(|w| w[1] > w[0]), "new rids: {rids:?}");
    // The last try is timed to leave the router time to answer: one initial RTO (100 ms)
    // before the deadline, not at it.
    let last = seen.last().unwrap().0;
    assert!(last < Duration::from_millis(1500), "last try at {last:?}");

    // Error RetryLater, then silence: the caller hears the router's last word, retry-later,
    // not a timeout, and only at the deadline.
    let call = {
        let c = client.clone();
        async move { c.heartbeat().await }
    };
    let mut first = true;
    let (res, took, seen) = scripted(&r, at, call, |m| {
        std::mem::take(&mut first).then(|| error(m.rid().unwrap(), ErrorCode::RetryLater))
    })
    .await;
    assert!(
        matches!(res, Err(ClientError::Server(ErrorCode::RetryLater))),
        "{res:?}"
    );
    assert!(took >= Duration::from_millis(1200), "{took:?}");
    assert!(seen.len() >= 2, "retried after the refusal: {seen:?}");

    // RateLimited every time: retried (each time a new rid) until the deadline, then reported.
    let call = {
        let c = client.clone();
        async move { c.query(&[Uuid::from_u128(1)]).await }
    };
    let (res, took, seen) = scripted(&r, at, call, |m| {
        Some(error(m.rid().unwrap(), ErrorCode::RateLimited))
    })
    .await;
    assert!(
        matches!(res, Err(ClientError::Server(ErrorCode::RateLimited))),
        "{res:?}"
    );
    assert!(took >= Duration::from_millis(1200), "{took:?}");
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1].1.rid() > w[0].1.rid()),
        "{seen:?}"
    );

    // A refusal the client must not retry (BadRequest) comes back at once.
    let call = {
        let c = client.clone();
        async move { c.connect(target, b"").await }
    };
    let (res, took, seen) = scripted(&r, at, call, |m| {
        Some(error(m.rid().unwrap(), ErrorCode::BadRequest))
    })
    .await;
    assert!(
        matches!(res, Err(ClientError::Server(ErrorCode::BadRequest))),
        "{res:?}"
    );
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(seen.len(), 1);
}
