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

// ---------------------------------------------------------------- moving away from a drain

fn draining(rid: u64, to: Option<SocketAddr>) -> Message {
    Message::Error(ErrorMsg {
        rid,
        code: ErrorCode::Draining,
        to: to.map(Addr),
    })
}

/// One datagram a scripted router received: which router (index), what, from where.
#[derive(Debug, Clone)]
struct Seen {
    router: usize,
    msg: Message,
    from: SocketAddr,
}

/// Routers answering on their own tasks: `answer(router, message)` says what router `router`
/// sends back (`None`: silence); PushAcks are only logged. Every datagram is logged.
struct Cluster {
    routers: Vec<std::sync::Arc<Router>>,
    log: tokio::sync::mpsc::UnboundedReceiver<Seen>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    async fn new(n: usize, uuid: Uuid, secret: Secret) -> Self {
        let mut routers = Vec::new();
        for _ in 0..n {
            routers.push(std::sync::Arc::new(Router::new(uuid, secret).await));
        }
        let (_, log) = tokio::sync::mpsc::unbounded_channel();
        Self {
            routers,
            log,
            tasks: Vec::new(),
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.routers[i].addr()
    }

    /// Starts answering with `answer` (shared by every router).
    fn serve(
        &mut self,
        answer: impl FnMut(usize, &Message, SocketAddr) -> Option<Message> + Send + 'static,
    ) {
        let answer = std::sync::Arc::new(std::sync::Mutex::new(answer));
        let (tx, log) = tokio::sync::mpsc::unbounded_channel();
        self.log = log;
        for (i, r) in self.routers.iter().enumerate() {
            let (r, tx, answer) = (r.clone(), tx.clone(), answer.clone());
            self.tasks.push(tokio::spawn(async move {
                let far = Instant::now() + Duration::from_secs(3600);
                while let Some((msg, _, from)) = r.recv_until(far).await {
                    let reply = (answer.lock().unwrap())(i, &msg, from);
                    let _ = tx.send(Seen {
                        router: i,
                        msg,
                        from,
                    });
                    if let Some(m) = reply {
                        r.send(&m, from).await;
                    }
                }
            }));
        }
    }

    /// Everything logged until `pred` holds for one datagram (returned last), within `WAIT`.
    async fn until(&mut self, mut pred: impl FnMut(&Seen) -> bool) -> Vec<Seen> {
        let mut got = Vec::new();
        loop {
            let s = timeout(WAIT, self.log.recv())
                .await
                .unwrap_or_else(|_| panic!("no datagram matched; saw {got:#?}"))
                .expect("routers running");
            let done = pred(&s);
            got.push(s);
            if done {
                return got;
            }
        }
    }

    /// Everything logged within `d`.
    async fn during(&mut self, d: Duration) -> Vec<Seen> {
        let end = Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(Some(s)) = tokio::time::timeout_at(end, self.log.recv()).await {
            got.push(s);
        }
        got
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The Registers and Resumes in `log`, in order, retransmissions (same router, same rid)
/// left out.
fn hellos(log: &[Seen]) -> Vec<(usize, &'static str)> {
    let mut seen = std::collections::HashSet::new();
    log.iter()
        .filter_map(|s| match s.msg {
            Message::Register(_) => Some((s.router, "register", s.msg.rid())),
            Message::Resume(_) => Some((s.router, "resume", s.msg.rid())),
            _ => None,
        })
        .filter(|h| seen.insert(*h))
        .map(|(r, k, _)| (r, k))
        .collect()
}

#[tokio::test]
async fn a_draining_router_is_left_for_the_node_it_names_and_not_asked_again() {
    let (uuid, secret) = (Uuid::new_v4(), Secret([20; 32]));
    let mut c = Cluster::new(3, uuid, secret).await;
    let (a0, a2) = (c.addr(0), c.addr(2));
    // Router 0 drains and names router 2; router 2 registers.
    let named = a2;
    let regs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let regs2 = regs.clone();
    c.serve(move |i, m, from| {
        let rid = m.rid()?;
        regs2.lock().unwrap().push((i, from));
        Some(match i {
            0 => draining(rid, Some(named)),
            _ => Message::Registered(Registered {
                rid,
                uuid,
                secret,
                observed: Addr(from),
                heartbeat_ms: 60_000,
                ttl_ms: 180_000,
            }),
        })
    });
    let mut cfg = ClientConfig::new(a0);
    cfg.fallback_servers = vec![c.addr(1), a2];
    let (client, _events) = Client::register(cfg).await.expect("registered");
    assert_eq!(client.server(), a2, "went where the draining router said");
    // Nothing more reaches router 0 (nor anyone: the session is registered).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let regs = regs.lock().unwrap().clone();
    assert_eq!(
        regs.iter().map(|r| r.0).collect::<Vec<_>>(),
        [0, 2],
        "one Register at the draining router, then the named one (not the next configured)"
    );
    assert_ne!(
        regs[0].1, regs[1].1,
        "the second try comes from a new local port"
    );
    assert_eq!(client.local_addr(), regs[1].1);
}

#[tokio::test]
async fn migrate_without_an_address_does_not_resume_at_the_draining_node() {
    let (uuid, secret) = (Uuid::new_v4(), Secret([21; 32]));
    let r0 = Router::new(uuid, secret).await;
    let r1 = Router::new(uuid, secret).await;
    let mut cfg = ClientConfig::new(r0.addr());
    cfg.fallback_servers = vec![r0.addr(), r1.addr()];
    let (client, mut events, at) = register(&r0, cfg).await;
    // Router 0 drains without knowing another node: Migrate{to: nil}. The client knows
    // router 1, so it resumes there; router 0 gets the PushAck and nothing else.
    r0.send(&Message::Migrate(Migrate { push: 1, to: None }), at)
        .await;
    r0.expect_ack(1).await;
    let (m, _, from) = r1.recv().await;
    let Message::Resume(res) = m else {
        panic!("expected Resume at router 1, got {m:?}")
    };
    assert_eq!(res.uuid, uuid);
    r1.send(&r1.registered(res.rid, from), from).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Migrated { to: r1.addr() }
    );
    assert_eq!(client.server(), r1.addr());
    assert!(
        r0.recv_until(Instant::now() + Duration::from_millis(300))
            .await
            .is_none(),
        "the draining node was asked again"
    );

    // With nothing but the draining node configured, Migrate{to: nil} still resumes there
    // (it may be a load balancer, which picks another node for the new port).
    let r = Router::new(uuid, secret).await;
    let (_client, mut events, at) = register(&r, ClientConfig::new(r.addr())).await;
    r.send(&Message::Migrate(Migrate { push: 1, to: None }), at)
        .await;
    r.expect_ack(1).await;
    let (m, _, from) = r.recv().await;
    assert!(matches!(m, Message::Resume(_)), "{m:?}");
    assert_ne!(from, at, "from a new local port");
    r.send(&r.registered(m.rid().unwrap(), from), from).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Migrated { to: r.addr() }
    );
}

#[tokio::test]
async fn when_every_address_refuses_the_client_reports_it_and_keeps_trying_in_order() {
    let (uuid, secret) = (Uuid::new_v4(), Secret([22; 32]));
    // 0: configured; 1: a fallback; 2: where the client is now (told by a Migrate); 3: the
    // node the next Migrate names.
    let mut c = Cluster::new(4, uuid, secret).await;
    let mut cfg = ClientConfig::new(c.addr(0));
    cfg.fallback_servers = vec![c.addr(1)];
    cfg.request_timeout = Duration::from_millis(600);
    cfg.initial_rto = Duration::from_millis(100);
    let r2 = c.routers[2].clone();
    let r3 = c.addr(3);
    // Register at 0, then get moved to 2 (which the client now knows as a told address).
    let (client, mut events, at) = {
        let r0 = c.routers[0].clone();
        register(&r0, cfg).await
    };
    c.routers[0]
        .send(
            &Message::Migrate(Migrate {
                push: 1,
                to: Some(Addr(r2.addr())),
            }),
            at,
        )
        .await;
    c.routers[0].expect_ack(1).await;
    let (m, _, at2) = r2.recv().await;
    r2.send(&r2.registered(m.rid().unwrap(), at2), at2).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Migrated { to: r2.addr() }
    );

    // Now everything refuses: 3 and 0 say Draining (0 names nobody), 1 is silent, 2 (the node
    // being left) says Draining naming 3, which already refused. Then, in the next round, 3
    // takes the session.
    let round = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1));
    let round2 = round.clone();
    c.serve(move |i, m, from| {
        let Message::Resume(res) = m else {
            return None;
        };
        let rid = res.rid;
        match (i, round2.load(std::sync::atomic::Ordering::SeqCst)) {
            (3, 2) => Some(Message::Registered(Registered {
                rid,
                uuid,
                secret,
                observed: Addr(from),
                heartbeat_ms: 60_000,
                ttl_ms: 180_000,
            })),
            (1, _) => None,
            (2, _) => Some(draining(rid, Some(r3))),
            _ => Some(draining(rid, None)),
        }
    });
    r2.send(
        &Message::Migrate(Migrate {
            push: 1,
            to: Some(Addr(r3)),
        }),
        at2,
    )
    .await;
    let first = c
        .until(|s| s.router == 2 && matches!(s.msg, Message::Resume(_)))
        .await;
    assert_eq!(
        hellos(&first),
        [(3, "resume"), (0, "resume"), (1, "resume"), (2, "resume")],
        "named node, configured servers, then the node being left"
    );
    // Every try from a new local port.
    let ports: std::collections::BTreeSet<u16> = first
        .iter()
        .filter(|s| matches!(s.msg, Message::Resume(_)))
        .map(|s| s.from.port())
        .collect();
    assert_eq!(ports.len(), 4, "{first:#?}");
    let stranded = match next_event(&mut events).await {
        Event::Stranded { tried, retry_in } => (tried, retry_in),
        other => panic!("expected Stranded, got {other:?}"),
    };
    assert_eq!(stranded.0, vec![r3, c.addr(0), c.addr(1), r2.addr()]);
    assert!(
        stranded.1 >= Duration::from_millis(125) && stranded.1 < Duration::from_millis(375),
        "first pause: 250 ms jittered, {:?}",
        stranded.1
    );
    // Nobody is asked during the pause.
    let quiet = c.during(stranded.1 / 2).await;
    assert!(
        hellos(&quiet).is_empty(),
        "asked again during the pause: {quiet:?}"
    );
    round.store(2, std::sync::atomic::Ordering::SeqCst);
    let second = c
        .until(|s| s.router == 3 && matches!(s.msg, Message::Resume(_)))
        .await;
    assert_eq!(hellos(&second), [(3, "resume")], "{second:#?}");
    assert_eq!(next_event(&mut events).await, Event::Migrated { to: r3 });
    assert_eq!(client.server(), r3);
    assert_eq!(client.uuid(), uuid);
}

#[tokio::test]
async fn a_request_refused_with_draining_moves_the_session_first() {
    let (uuid, secret) = (Uuid::new_v4(), Secret([23; 32]));
    let r0 = Router::new(uuid, secret).await;
    let r1 = Router::new(uuid, secret).await;
    let mut cfg = ClientConfig::new(r0.addr());
    cfg.initial_rto = Duration::from_millis(100);
    let (client, mut events, at) = register(&r0, cfg).await;
    let q = tokio::spawn({
        let c = client.clone();
        async move { c.query(&[Uuid::from_u128(1)]).await }
    });
    let (m, _, _) = r0.recv().await;
    let rid = m.rid().unwrap();
    r0.send(&draining(rid, Some(r1.addr())), at).await;
    // Resume at the node named, from a new port; then the Query again there, a new rid.
    let (m, _, from) = r1.recv().await;
    let Message::Resume(res) = m else {
        panic!("expected Resume at router 1, got {m:?}")
    };
    assert_ne!(from, at);
    r1.send(&r1.registered(res.rid, from), from).await;
    let (m, _, _) = r1.recv().await;
    assert!(matches!(m, Message::Query(_)), "{m:?}");
    assert!(m.rid().unwrap() > res.rid && res.rid > rid);
    r1.send(
        &Message::QueryResult(sigrouter_proto::QueryResult {
            rid: m.rid().unwrap(),
            online: vec![true],
        }),
        from,
    )
    .await;
    assert_eq!(q.await.unwrap().unwrap(), [true]);
    assert_eq!(
        next_event(&mut events).await,
        Event::Migrated { to: r1.addr() }
    );
    assert!(
        r0.recv_until(Instant::now() + Duration::from_millis(300))
            .await
            .is_none(),
        "the draining router was asked again"
    );
}
