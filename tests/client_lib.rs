//! The client library against a real node over real UDP on 127.0.0.1: registration, resume,
//! connects (accepted, rejected, offline, timed out), signals both ways, refusals the client
//! retries through (rate limit, draining), recovery (UnknownSession, re-home) and simulated
//! packet loss.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{eventually, metric, test_config, Node};
use sigrouter::{AddressValidation, Config};
use sigrouter_client::{
    Client, ClientConfig, ClientError, ConnectOutcome, ErrorCode, Event, Events, FailReason,
};
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

fn cfg(node: &Node) -> ClientConfig {
    ClientConfig::new(node.addr)
}

async fn register(node: &Node) -> (Client, Events) {
    Client::register(cfg(node)).await.expect("register")
}

/// The next event `pick` accepts (others are skipped), within `within`.
/// The next Signal event: (connection, from, payload).
async fn next_signal(rx: &mut mpsc::UnboundedReceiver<Event>) -> (Uuid, Uuid, Vec<u8>) {
    next_event(rx, WAIT, |e| match e {
        Event::Signal {
            connection,
            from,
            payload,
        } => Some((*connection, *from, payload.clone())),
        _ => None,
    })
    .await
}

async fn next_event<T>(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    within: Duration,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    let until = Instant::now() + within;
    loop {
        match timeout_at(until, rx.recv()).await {
            Ok(Some(e)) => {
                if let Some(v) = pick(&e) {
                    return v;
                }
            }
            Ok(None) => panic!("event stream ended"),
            Err(_) => panic!("no matching event within {within:?}"),
        }
    }
}

/// Answers every Incoming (accept or reject with `payload`) and forwards every event.
fn answer_all(
    client: &Client,
    mut events: Events,
    accept: bool,
    payload: &'static [u8],
) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = client.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let Event::Incoming { connection, .. } = &ev {
                let (c, id) = (client.clone(), *connection);
                tokio::spawn(async move {
                    let r = if accept {
                        c.accept(id, payload).await
                    } else {
                        c.reject(id, payload).await
                    };
                    r.expect("answer Incoming");
                });
            }
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    rx
}

/// Forwards every event without acting on it.
fn forward(mut events: Events) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    rx
}

fn connected(o: ConnectOutcome) -> (Uuid, Uuid, SocketAddr, Vec<u8>) {
    match o {
        ConnectOutcome::Connected {
            connection,
            peer,
            observed,
            payload,
            ..
        } => (connection, peer, observed, payload),
        other => panic!("expected Connected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_heartbeat_query_and_bye() {
    let node = Node::start(test_config()).await;
    let (a, _ea) = register(&node).await;
    assert!(!a.uuid().is_nil());
    assert_eq!(a.observed().ip().to_string(), "127.0.0.1");
    assert_eq!(a.observed().port(), a.local_addr().port());
    assert_eq!(a.server(), node.addr);
    assert_eq!(a.heartbeat().await.unwrap(), a.observed());

    let (b, _eb) = register(&node).await;
    assert_ne!(a.uuid(), b.uuid());
    assert_eq!(
        a.query(&[b.uuid(), Uuid::new_v4()]).await.unwrap(),
        [true, false]
    );
    // More than one Query's worth: split and reassembled in order.
    let mut many: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    many[35] = b.uuid();
    let online = a.query(&many).await.unwrap();
    assert_eq!(online.len(), 40);
    assert_eq!(online.iter().positions_true(), vec![35], "only b is online");

    b.bye().await.unwrap();
    assert_eq!(a.query(&[b.uuid()]).await.unwrap(), [false]);
    assert!(matches!(b.heartbeat().await, Err(ClientError::Closed)));
    a.close().await;
}

trait PositionsTrue {
    fn positions_true(self) -> Vec<usize>;
}
impl<'a, I: Iterator<Item = &'a bool>> PositionsTrue for I {
    fn positions_true(self) -> Vec<usize> {
        self.enumerate()
            .filter(|(_, b)| **b)
            .map(|(i, _)| i)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_keeps_uuid_from_a_new_socket() {
    let node = Node::start(test_config()).await;
    let (a, _ea) = register(&node).await;
    let (uuid, secret, port) = (a.uuid(), a.secret(), a.local_addr().port());
    a.close().await; // no Bye: the session stays

    let (a2, ea2) = Client::resume(cfg(&node), uuid, secret).await.unwrap();
    let _a2_events = answer_all(&a2, ea2, true, b"a2 here");
    assert_eq!(a2.uuid(), uuid);
    assert_ne!(a2.local_addr().port(), port);
    assert_eq!(a2.observed().port(), a2.local_addr().port());
    let (b, _eb) = register(&node).await;
    assert_eq!(b.query(&[uuid]).await.unwrap(), [true]);

    let wrong = sigrouter_client::Secret([9; 32]);
    match Client::resume(cfg(&node), uuid, wrong).await {
        Err(ClientError::Server(ErrorCode::Unauthorized)) => {}
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    // The real owner is unaffected: the session lives at the new socket, the one the real
    // Resume came from (the query above holds whether or not it moved: the old session never
    // left). A push there is answered by `a2`, before `a2` sends anything that could move it.
    let (_, peer, _, payload) = connected(b.connect(uuid, b"still yours?").await.unwrap());
    assert_eq!((peer, payload), (uuid, b"a2 here".to_vec()));
    a2.heartbeat().await.unwrap();
}

/// Against a node that validates every source address (`--address-validation always`), the
/// client follows each `Retry` by itself: Register, Resume from a new socket, connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_and_resumes_through_address_validation() {
    let node = Node::start(Config {
        address_validation: AddressValidation::Always,
        ..test_config()
    })
    .await;
    let validation = |o: &str| {
        metric(
            &node,
            &format!("sigrouter_address_validation_total{{outcome=\"{o}\"}}"),
        )
    };
    let (t, te) = register(&node).await;
    let _t_events = answer_all(&t, te, true, b"validated");
    let (i, _ie) = register(&node).await;
    assert_eq!(
        validation("retry_sent"),
        2.0,
        "each Register was asked for a token"
    );
    assert_eq!(validation("valid"), 2.0, "and came back with it");
    assert_eq!(metric(&node, "sigrouter_sessions_registered_total"), 2.0);
    let (_, peer, _, payload) = connected(i.connect(t.uuid(), b"hi").await.unwrap());
    assert_eq!((peer, payload), (t.uuid(), b"validated".to_vec()));

    // Resume from a new socket is a new address: validated too; from the same one it is not.
    let (uuid, secret) = (i.uuid(), i.secret());
    i.close().await;
    let (i2, _ie2) = Client::resume(cfg(&node), uuid, secret).await.unwrap();
    assert_eq!(i2.uuid(), uuid);
    assert_eq!(validation("retry_sent"), 3.0);
    assert_eq!(validation("valid"), 3.0);
    assert_eq!(i2.observed().port(), i2.local_addr().port());
    assert_eq!(i2.query(&[t.uuid()]).await.unwrap(), [true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_accepted_then_signals_both_ways() {
    let node = Node::start(test_config()).await;
    let (t, te) = register(&node).await;
    let mut t_events = answer_all(&t, te, true, b"answer");
    let (i, ie) = register(&node).await;
    let mut i_events = forward(ie);

    let (conn, peer, observed, payload) = connected(i.connect(t.uuid(), b"offer").await.unwrap());
    assert_eq!(peer, t.uuid());
    assert_eq!(observed, t.observed());
    assert_eq!(payload, b"answer");

    let (from, seen_conn, seen_observed, local, offer) =
        next_event(&mut t_events, WAIT, |e| match e {
            Event::Incoming {
                connection,
                from,
                observed,
                local,
                payload,
            } => Some((
                *from,
                *connection,
                *observed,
                local.clone(),
                payload.clone(),
            )),
            _ => None,
        })
        .await;
    assert_eq!(
        (from, seen_conn, seen_observed),
        (i.uuid(), conn, i.observed())
    );
    assert_eq!(offer, b"offer");
    assert_eq!(local, vec![i.local_addr()], "announced local address");

    i.signal(conn, b"ping").await.unwrap();
    let got = next_signal(&mut t_events).await;
    assert_eq!(got, (conn, i.uuid(), b"ping".to_vec()));

    t.signal(conn, b"pong").await.unwrap();
    let got = next_signal(&mut i_events).await;
    assert_eq!(got, (conn, t.uuid(), b"pong".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rejected_offline_and_refused() {
    let node = Node::start(test_config()).await;
    let (t, te) = register(&node).await;
    let _t_events = answer_all(&t, te, false, b"busy");
    let (i, _ie) = register(&node).await;

    assert_eq!(
        i.connect(t.uuid(), b"offer").await.unwrap(),
        ConnectOutcome::Failed {
            reason: FailReason::Rejected,
            payload: b"busy".to_vec()
        }
    );
    match i.connect(Uuid::new_v4(), b"").await.unwrap() {
        ConnectOutcome::Failed {
            reason: FailReason::Offline,
            ..
        } => {}
        other => panic!("expected Offline, got {other:?}"),
    }
    assert!(matches!(
        i.connect(i.uuid(), b"").await,
        Err(ClientError::Server(ErrorCode::BadRequest))
    ));
    assert!(matches!(
        i.signal(Uuid::new_v4(), b"x").await,
        Err(ClientError::Server(ErrorCode::UnknownConnection))
    ));
    assert!(matches!(
        i.signal(Uuid::new_v4(), &[0; 1025]).await,
        Err(ClientError::PayloadTooLarge)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_times_out_when_the_target_never_answers() {
    let node = Node::start(Config {
        connect_timeout: Duration::from_millis(600),
        ..test_config()
    })
    .await;
    let (t, te) = register(&node).await;
    let mut t_events = forward(te); // sees the Incoming, never answers
    let (i, _ie) = register(&node).await;
    let outcome = i.connect(t.uuid(), b"hello?").await.unwrap();
    assert!(
        matches!(
            outcome,
            ConnectOutcome::Failed {
                reason: FailReason::Timeout,
                ..
            }
        ),
        "{outcome:?}"
    );
    next_event(&mut t_events, WAIT, |e| {
        matches!(e, Event::Incoming { .. }).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_registers_are_retried() {
    let node = Node::start(Config {
        register_rate: 2,
        register_burst: 1,
        ..test_config()
    })
    .await;
    // Over the per-IP limit: the router answers RateLimited; the client pauses and retries.
    // Three at once from one IP with a burst of one: at least one is refused first.
    let regs: Vec<_> = (0..3)
        .map(|_| tokio::spawn(Client::register(cfg(&node))))
        .collect();
    let mut uuids = std::collections::BTreeSet::new();
    for r in regs {
        let (c, _events) = r.await.unwrap().expect("register through the rate limit");
        uuids.insert(c.uuid());
    }
    assert_eq!(uuids.len(), 3);
    assert!(
        metric(&node, "sigrouter_rate_limited_total") >= 1.0,
        "no Register was refused: the retry was not exercised"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_registers_are_retried_from_new_ports() {
    let node = Node::start(test_config()).await;
    node.router.set_draining(true);
    // A client on a port we know, while the node drains: refused (Draining), it pauses and
    // moves to a new port; the port it had becomes free. Only then does draining end.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = cfg(&node);
    c.bind = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    c.request_timeout = WAIT;
    let reg = tokio::spawn(Client::register(c));
    let register_requests = || metric(&node, "sigrouter_requests_total{type=\"register\"}");
    assert!(
        eventually(WAIT, || register_requests() >= 1.0).await,
        "no Register arrived"
    );
    let moved = eventually(WAIT, || {
        std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
    })
    .await;
    assert!(moved, "the refused client never left its port");
    node.router.set_draining(false);
    let (client, _events) = reg.await.unwrap().expect("register after draining");
    assert_ne!(
        client.local_addr().port(),
        port,
        "registered from the refused port"
    );

    // Draining that outlasts the request: the client gives up with Draining.
    node.router.set_draining(true);
    let mut c = cfg(&node);
    c.request_timeout = Duration::from_millis(1500);
    match Client::register(c).await {
        Err(ClientError::Server(ErrorCode::Draining)) => {}
        other => panic!("expected Draining, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_session_is_resumed_or_registered_anew() {
    let node = Node::start(test_config()).await;
    let addr = node.addr;
    let (a, ea) = register(&node).await;
    let mut a_events = forward(ea);
    let old = a.uuid();
    // The node restarts on the same address and forgets every session.
    node.stop().await;
    let node = Node::start(Config {
        listen: addr,
        ..test_config()
    })
    .await;
    // The heartbeat hits UnknownSession; the client resumes, the single node cannot vouch
    // for a session it never held (Unauthorized), so the client registers anew and retries.
    let observed = a.heartbeat().await.expect("heartbeat after restart");
    assert_eq!(observed, a.observed());
    assert_ne!(a.uuid(), old);
    let new = next_event(&mut a_events, WAIT, |e| match e {
        Event::Reregistered { uuid } => Some(*uuid),
        _ => None,
    })
    .await;
    assert_eq!(new, a.uuid());
    let (b, _eb) = register(&node).await;
    assert_eq!(b.query(&[a.uuid(), old]).await.unwrap(), [true, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_heartbeats_rehome_to_a_new_port_and_keep_the_uuid() {
    let node = Node::start(Config {
        heartbeat: Duration::from_millis(200),
        session_ttl: Duration::from_secs(30),
        ..test_config()
    })
    .await;
    let mut c = cfg(&node);
    c.request_timeout = Duration::from_secs(2);
    let (a, ea) = Client::register(c).await.unwrap();
    let mut a_events = answer_all(&a, ea, true, b"here");
    let (uuid, port) = (a.uuid(), a.local_addr().port());

    // Nothing reaches the client any more: heartbeats go unanswered and it moves.
    a.set_simulated_loss(1.0, 0.0);
    let until = Instant::now() + WAIT;
    while a.local_addr().port() == port {
        assert!(Instant::now() < until, "client never rebound");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The path heals; the Resume from the new port gets through.
    a.set_simulated_loss(0.0, 0.0);
    let server = next_event(&mut a_events, WAIT, |e| match e {
        Event::Rehomed { server } => Some(*server),
        _ => None,
    })
    .await;
    assert_eq!(server, node.addr);
    assert_eq!(a.uuid(), uuid);
    let observed = a.heartbeat().await.unwrap();
    assert_eq!(observed.port(), a.local_addr().port());
    assert_ne!(observed.port(), port);

    // The router routes to the new address.
    let (b, _eb) = register(&node).await;
    let (_, peer, peer_observed, payload) =
        connected(b.connect(uuid, b"still there?").await.unwrap());
    assert_eq!(
        (peer, peer_observed, payload),
        (uuid, observed, b"here".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_links_in_both_directions_still_work() {
    let node = Node::start(Config {
        push_initial_rto: Duration::from_millis(100),
        ..test_config()
    })
    .await;
    let lossy = |seed: u64| {
        let mut c = cfg(&node);
        c.drop_inbound = 0.3;
        c.drop_outbound = 0.3;
        c.loss_seed = seed;
        c.initial_rto = Duration::from_millis(50);
        c.max_rto = Duration::from_millis(400);
        c.request_timeout = Duration::from_secs(15);
        c.connect_timeout = Duration::from_secs(20);
        c
    };
    let (t, te) = Client::register(lossy(1)).await.expect("lossy register");
    let mut t_events = answer_all(&t, te, true, b"answer");
    let (i, ie) = Client::register(lossy(2)).await.expect("lossy register");
    let mut i_events = forward(ie);

    assert_eq!(i.query(&[t.uuid()]).await.unwrap(), [true]);
    for _ in 0..3 {
        i.heartbeat().await.unwrap();
    }
    let (conn, peer, _, payload) = connected(i.connect(t.uuid(), b"offer").await.unwrap());
    assert_eq!((peer, payload), (t.uuid(), b"answer".to_vec()));

    let msgs: Vec<Vec<u8>> = (0..5).map(|n| format!("sig-{n}").into_bytes()).collect();
    for m in &msgs {
        i.signal(conn, m).await.unwrap();
        t.signal(conn, m).await.unwrap();
    }
    // Every signal arrives, in spite of the loss, and exactly once, in spite of the
    // retransmissions loss causes.
    for rx in [&mut t_events, &mut i_events] {
        let mut got = Vec::new();
        while got.len() < msgs.len() {
            let p = next_event(rx, Duration::from_secs(15), |e| match e {
                Event::Signal { payload, .. } => Some(payload.clone()),
                _ => None,
            })
            .await;
            assert!(!got.contains(&p), "signal {p:?} surfaced twice");
            got.push(p);
        }
        got.sort();
        assert_eq!(got, msgs);
    }
    // Retransmitted pushes still in flight must not surface again.
    let quiet = Instant::now() + Duration::from_millis(1500);
    for rx in [&mut t_events, &mut i_events] {
        while let Ok(Some(e)) = timeout_at(quiet, rx.recv()).await {
            assert!(!matches!(e, Event::Signal { .. }), "duplicate: {e:?}");
        }
    }
    // The control: the loss did cause retransmitted pushes (copies the clients had to drop).
    let retransmits = metric(&node, "sigrouter_push_retransmits_total");
    println!("push retransmissions: {retransmits}");
    assert!(
        retransmits >= 1.0,
        "no push was retransmitted: nothing was deduplicated"
    );
}
