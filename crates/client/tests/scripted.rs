//! The client against a scripted router: plain UDP sockets on 127.0.0.1 that speak the real
//! codec and answer exactly as each test says. This covers what a single real node cannot be
//! made to do on demand (Migrate, a duplicate push, a forged push, a spoofed Error) and checks
//! datagram-level details (retransmissions reuse the request id, every push copy is
//! acknowledged). The behaviour against the real router is in the root crate's
//! `tests/client_lib.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use sigrouter_client::{
    Client, ClientConfig, ClientError, ConnectOutcome, ErrorCode, Event, Events, FailReason, Secret,
};
use sigrouter_proto::{
    decode, encode, verify_mac, Addr, ConnectFailed, Connected, ErrorMsg, HeartbeatAck, Incoming,
    Message, Migrate, Payload, Registered, SignalPush, MIN_HELLO_LEN,
};
use tokio::net::UdpSocket;
use tokio::time::{timeout, Instant};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(5);

struct Router {
    sock: UdpSocket,
    uuid: Uuid,
    secret: Secret,
}

impl Router {
    async fn new(uuid: Uuid, secret: Secret) -> Self {
        Self {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            uuid,
            secret,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    /// The next datagram: decoded message, raw bytes, sender.
    async fn recv(&self) -> (Message, Vec<u8>, SocketAddr) {
        self.recv_until(Instant::now() + WAIT)
            .await
            .expect("a datagram from the client")
    }

    /// The next datagram if one comes before `deadline`.
    async fn recv_until(&self, deadline: Instant) -> Option<(Message, Vec<u8>, SocketAddr)> {
        let mut buf = [0u8; 2048];
        let (n, from) = tokio::time::timeout_at(deadline, self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        let b = buf[..n].to_vec();
        let m = decode(&b).expect("client sent a valid datagram");
        if m.ty().is_authenticated() {
            assert!(verify_mac(&b, &self.secret), "client MAC must verify");
        }
        Some((m, b, from))
    }

    async fn send(&self, m: &Message, to: SocketAddr) {
        let key = m.ty().is_authenticated().then_some(&self.secret);
        let b = encode(m, key).unwrap();
        self.sock.send_to(&b, to).await.unwrap();
    }

    async fn send_with_key(&self, m: &Message, key: &Secret, to: SocketAddr) {
        self.sock
            .send_to(&encode(m, Some(key)).unwrap(), to)
            .await
            .unwrap();
    }

    fn registered(&self, rid: u64, observed: SocketAddr) -> Message {
        Message::Registered(Registered {
            rid,
            uuid: self.uuid,
            secret: self.secret,
            observed: Addr(observed),
            heartbeat_ms: 60_000,
            ttl_ms: 180_000,
        })
    }

    /// Expects a PushAck for `push` from `from`.
    async fn expect_ack(&self, push: u64) -> SocketAddr {
        match self.recv().await {
            (Message::PushAck(a), _, from) => {
                assert_eq!((a.uuid, a.push), (self.uuid, push));
                from
            }
            (other, _, _) => panic!("expected PushAck {push}, got {other:?}"),
        }
    }
}

/// Registers a client at `r`, answering its Register by script.
async fn register(r: &Router, cfg: ClientConfig) -> (Client, Events, SocketAddr) {
    let reg = tokio::spawn(Client::register(cfg));
    let (m, bytes, from) = r.recv().await;
    let Message::Register(reg_msg) = m else {
        panic!("expected Register, got {m:?}")
    };
    assert!(bytes.len() >= MIN_HELLO_LEN, "Register must be padded");
    assert_eq!(
        reg_msg.local,
        vec![Addr(from)],
        "announces its local address"
    );
    r.send(&r.registered(reg_msg.rid, from), from).await;
    let (client, events) = reg.await.unwrap().expect("registered");
    assert_eq!(client.uuid(), r.uuid);
    assert_eq!(client.observed(), from);
    (client, events, from)
}

fn incoming(push: u64, connection: Uuid, payload: &[u8]) -> Message {
    Message::Incoming(Incoming {
        push,
        connection,
        from: Uuid::from_u128(7),
        observed: Addr("192.0.2.1:4000".parse().unwrap()),
        local: vec![Addr("10.0.0.7:4000".parse().unwrap())],
        payload: Payload::from(payload.to_vec()),
    })
}

async fn next_event(events: &mut Events) -> Event {
    timeout(WAIT, events.recv())
        .await
        .expect("an event")
        .expect("events open")
}

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

fn connect_failed(rid: u64, reason: FailReason) -> Message {
    Message::ConnectFailed(ConnectFailed {
        rid,
        reason,
        payload: Payload::default(),
    })
}

fn error(rid: u64, code: ErrorCode) -> Message {
    Message::Error(ErrorMsg::new(rid, code))
}

/// Runs `call` while the scripted router answers each request it receives with
/// `answer(request)` (`None`: silence). Returns the call's result, how long it took, and every
/// request received with the time since the call started.
async fn scripted<T: Send + 'static>(
    r: &Router,
    at: SocketAddr,
    call: impl std::future::Future<Output = T> + Send + 'static,
    mut answer: impl FnMut(&Message) -> Option<Message>,
) -> (T, Duration, Vec<(Duration, Message)>) {
    let started = Instant::now();
    let mut task = tokio::spawn(call);
    let mut seen = Vec::new();
    let result = loop {
        tokio::select! {
            done = &mut task => break done.unwrap(),
            (m, _, _) = r.recv() => {
                seen.push((started.elapsed(), m.clone()));
                if let Some(a) = answer(&m) {
                    r.send(&a, at).await;
                }
            }
        }
    };
    (result, started.elapsed(), seen)
}

/// The pause before retry `n` (0-based) after a refusal: 250 ms doubling to 2 s, times a
/// jitter factor in [0.5, 1.5). Returns (lowest, highest) with `slack` added on top for a busy
/// machine.
fn retry_pause_bounds(n: u32, slack: Duration) -> (Duration, Duration) {
    let base = Duration::from_millis(250 * 2u64.pow(n)).min(Duration::from_secs(2));
    (base / 2, base * 3 / 2 + slack)
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
    // Refused four ways in turn, then connected: ConnectFailed{RetryLater}, Error RetryLater,
    // Error RateLimited, Error Draining.
    let mut n = 0;
    let (outcome, _, seen) = scripted(&r, at, call, |m| {
        let rid = m.rid().unwrap();
        n += 1;
        Some(match n {
            1 => connect_failed(rid, FailReason::RetryLater),
            2 => error(rid, ErrorCode::RetryLater),
            3 => error(rid, ErrorCode::RateLimited),
            4 => error(rid, ErrorCode::Draining),
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
    assert_eq!(seen.len(), 5, "{seen:?}");
    for (_, m) in &seen {
        let Message::Connect(c) = m else {
            panic!("expected Connect, got {m:?}")
        };
        assert_eq!((c.to, c.payload.as_ref()), (target, &b"offer"[..]));
    }
    let rids: Vec<u64> = seen.iter().map(|(_, m)| m.rid().unwrap()).collect();
    // After every refusal (retry-later in either form, Draining, RateLimited): a new, higher
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
