//! A single node over real UDP on loopback, driven by hand-crafted datagrams: sessions,
//! connect/accept/reject/timeout, signal relay, retransmitted pushes and idempotency.
//! Authentication, amplification, rate limits and garbage: `abuse.rs`.

mod common;

use std::time::Duration;

use common::{
    answer, assert_offline, connect, outcome, payload, recv_msg, signal, test_config, Node, Raw, T,
};
use sigrouter::proto::{self, ErrorCode, FailReason, Message};
use uuid::Uuid;

#[tokio::test]
async fn register_heartbeat_and_query() {
    let node = Node::start(test_config()).await;
    let mut a = Raw::register(node.addr).await;
    let b = Raw::register(node.addr).await;
    assert_ne!(a.uuid, b.uuid);
    assert_eq!(a.observed, a.sock.local_addr().unwrap());
    let ack = a.heartbeat().await;
    assert_eq!(ack.observed.0, a.sock.local_addr().unwrap());
    let online = a.query(vec![b.uuid, Uuid::new_v4(), a.uuid]).await;
    assert_eq!(online, vec![true, false, true]);
}

#[tokio::test]
async fn resume_keeps_uuid_from_a_new_address() {
    let node = Node::start(test_config()).await;
    let a = Raw::register(node.addr).await;
    let mut q = Raw::register(node.addr).await;
    // The client's NAT (or a restart of the app) gives it a new socket.
    let sock = Raw::socket().await;
    let mut m = Message::Resume(proto::Resume {
        rid: 100,
        uuid: a.uuid,
        secret: a.secret,
        local: vec![],
        pad: vec![],
    });
    sock.send_to(&proto::encode_hello(&mut m).unwrap(), node.addr)
        .await
        .unwrap();
    let Some(Message::Registered(r)) = recv_msg(&sock, T).await else {
        panic!("Resume not answered with Registered")
    };
    assert_eq!(r.uuid, a.uuid);
    assert_eq!(r.observed.0, sock.local_addr().unwrap());
    let mut moved = Raw::with(sock, node.addr, a.uuid, a.secret, r.observed.0, 100);
    // The session now lives at the new socket: a push reaches it there before it has sent
    // anything else (a heartbeat from it would move the session there by itself).
    let (_, inc) = connect(&mut q, &moved, "found you").await;
    assert_eq!(inc.from, q.uuid);
    assert_eq!(
        moved.heartbeat().await.observed.0,
        moved.sock.local_addr().unwrap()
    );
    assert_eq!(q.query(vec![a.uuid]).await, vec![true]);
}

#[tokio::test]
async fn sessions_expire_when_heartbeats_stop() {
    let mut cfg = test_config();
    cfg.heartbeat = Duration::from_millis(100);
    cfg.session_ttl = Duration::from_millis(400);
    cfg.sweep_interval = Duration::from_millis(50);
    let node = Node::start(cfg).await;
    let silent = Raw::register(node.addr).await;
    let mut watcher = Raw::register(node.addr).await;
    assert_eq!(watcher.query(vec![silent.uuid]).await, vec![true]);
    // The watcher keeps heartbeating (via its queries); the silent one goes offline.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut offline = false;
    while std::time::Instant::now() < deadline {
        if watcher.query(vec![silent.uuid]).await == vec![false] {
            offline = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(offline, "a session without heartbeats stayed online");
    assert_eq!(watcher.query(vec![watcher.uuid]).await, vec![true]);
    // Its authenticated requests now get UnknownSession, telling it to Resume.
    let mut s = silent;
    let rid = s.next_rid();
    s.send(&Message::Heartbeat(proto::Heartbeat { rid, uuid: s.uuid }))
        .await;
    match recv_msg(&s.sock, T).await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::UnknownSession),
        other => panic!("expected UnknownSession, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_accepted_exchanges_addresses_and_signals_both_ways() {
    let node = Node::start(test_config()).await;
    let mut a = Raw::register(node.addr).await;
    let mut b = Raw::register(node.addr).await;
    let (rid, inc) = connect(&mut a, &b, "offer").await;
    assert_eq!(inc.from, a.uuid);
    assert_eq!(inc.observed.0, a.sock.local_addr().unwrap());
    assert_eq!(inc.local, vec![proto::Addr(a.sock.local_addr().unwrap())]);
    assert_eq!(inc.payload, payload("offer"));
    answer(&mut b, inc.connection, true, "answer").await;
    let Message::Connected(c) = outcome(&a, rid).await else {
        panic!("expected Connected")
    };
    assert_eq!(c.connection, inc.connection);
    assert_eq!(c.peer, b.uuid);
    assert_eq!(c.observed.0, b.sock.local_addr().unwrap());
    assert_eq!(c.payload, payload("answer"));

    signal(&mut a, &b, c.connection, "a->b candidate").await;
    signal(&mut b, &a, c.connection, "b->a candidate").await;
}

#[tokio::test]
async fn connect_rejected_offline_and_timeout() {
    let mut cfg = test_config();
    cfg.connect_timeout = Duration::from_millis(600);
    let node = Node::start(cfg).await;
    let mut a = Raw::register(node.addr).await;
    let mut b = Raw::register(node.addr).await;

    let (rid, inc) = connect(&mut a, &b, "hi").await;
    answer(&mut b, inc.connection, false, "busy").await;
    match outcome(&a, rid).await {
        Message::ConnectFailed(f) => assert_eq!(
            (f.reason, f.payload),
            (FailReason::Rejected, payload("busy"))
        ),
        m => panic!("expected rejected, got {m:?}"),
    }

    assert_offline(&mut a, Uuid::new_v4()).await;

    // The target acknowledges the Incoming but never answers.
    let (rid, _inc) = connect(&mut a, &b, "anyone?").await;
    match outcome(&a, rid).await {
        Message::ConnectFailed(f) => assert_eq!(f.reason, FailReason::Timeout),
        m => panic!("expected timeout, got {m:?}"),
    }
}

#[tokio::test]
async fn pushes_are_retransmitted_until_acked() {
    let mut cfg = test_config();
    cfg.push_initial_rto = Duration::from_millis(50);
    // Neither a give-up nor a connect timeout may end the retransmissions during the test:
    // only the acknowledgement may.
    cfg.push_deadline = Duration::from_secs(60);
    cfg.connect_timeout = Duration::from_secs(60);
    let node = Node::start(cfg).await;
    let mut a = Raw::register(node.addr).await;
    let mut c = Raw::register(node.addr).await;
    let mut b = Raw::register(node.addr).await;
    // Two pushes to B at about the same time: A's, which B will acknowledge, and C's, which B
    // never acknowledges (the control: it shows what the retransmission schedule does meanwhile).
    a.send_connect(b.uuid, "x").await;
    c.send_connect(b.uuid, "control").await;
    // B "loses" the first copies (reads without acking); the server sends them again.
    let (mut acked, mut control) = (Vec::new(), Vec::new());
    while acked.len() < 3 || control.is_empty() {
        match b.recv(T).await {
            Some(Message::Incoming(i)) if i.from == a.uuid => acked.push((i.push, i.connection)),
            Some(Message::Incoming(i)) if i.from == c.uuid => control.push((i.push, i.connection)),
            other => panic!("expected Incoming, got {other:?}"),
        }
    }
    for seen in [&acked, &control] {
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "retransmissions must be the same push: {seen:?}"
        );
    }
    assert_ne!(acked[0], control[0]);
    b.ack(acked[0].0).await;
    // Barrier: B's datagrams are handled in order, so once its Heartbeat is answered the
    // PushAck has been handled. Nothing is acknowledged on the way.
    let rid = b.next_rid();
    b.send(&Message::Heartbeat(proto::Heartbeat { rid, uuid: b.uuid }))
        .await;
    loop {
        match b.recv(T).await {
            Some(Message::HeartbeatAck(h)) if h.rid == rid => break,
            // Copies sent before the ack was handled.
            Some(Message::Incoming(i))
                if [acked[0], control[0]].contains(&(i.push, i.connection)) => {}
            other => panic!("expected HeartbeatAck, got {other:?}"),
        }
    }
    // From now on the acknowledged push must stay quiet while the control keeps coming. One
    // copy of it may already have been on its way when the ack was handled; every further copy
    // would be a retransmission after the ack. Four control copies span three more rounds of
    // the (shared) schedule, so an ignored ack would show as two copies or more, with a round
    // to spare.
    let (mut acked_after, mut control_after) = (0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while control_after < 4 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match b.recv(left).await {
            Some(Message::Incoming(i)) if (i.push, i.connection) == acked[0] => acked_after += 1,
            Some(Message::Incoming(i)) if (i.push, i.connection) == control[0] => {
                control_after += 1
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!(
                "the unacknowledged control push was not retransmitted ({control_after} copies)"
            ),
        }
    }
    assert!(
        acked_after <= 1,
        "{acked_after} copies of an acknowledged push arrived after the ack was handled \
         (the control push: {control_after})"
    );
}

#[tokio::test]
async fn duplicate_request_ids_do_nothing_twice() {
    let node = Node::start(test_config()).await;
    let mut a = Raw::register(node.addr).await;
    let mut b = Raw::register(node.addr).await;
    // The same Connect three times: one Incoming, one connection.
    let rid = a.next_rid();
    let connect = Message::Connect(proto::Connect {
        rid,
        uuid: a.uuid,
        to: b.uuid,
        payload: payload("once"),
    });
    for _ in 0..3 {
        a.send(&connect).await;
    }
    let inc = b
        .recv_until(T, |m| match m {
            Message::Incoming(i) => Some(i.clone()),
            _ => None,
        })
        .await
        .unwrap();
    answer(&mut b, inc.connection, true, "").await;
    let Message::Connected(first) = outcome(&a, rid).await else {
        panic!("expected Connected")
    };
    // A retransmission after the outcome gets the same answer.
    a.send(&connect).await;
    let Message::Connected(again) = outcome(&a, rid).await else {
        panic!("expected Connected again")
    };
    assert_eq!(first, again);

    // The same Signal twice, then a different one: the peer sees "dup" once, then "next".
    // Pushes are told apart by their id: a copy with the same id is a retransmission (B's ack
    // may not have been handled yet), a second id is a second delivery.
    let a_uuid = a.uuid;
    let sig = |rid, text: &str| {
        Message::Signal(proto::Signal {
            rid,
            uuid: a_uuid,
            connection: first.connection,
            payload: payload(text),
        })
    };
    let (r1, r2) = (a.next_rid(), a.next_rid());
    a.send(&sig(r1, "dup")).await;
    a.send(&sig(r1, "dup")).await;
    a.send(&sig(r2, "next")).await;
    let mut pushes = std::collections::BTreeSet::new();
    b.recv_until(T, |m| {
        if let Message::SignalPush(s) = m {
            pushes.insert((s.push, String::from_utf8_lossy(&s.payload).to_string()));
            return (s.payload == payload("next")).then_some(());
        }
        None
    })
    .await
    .expect("second signal");
    // Whatever was pushed for A's requests has been sent by now (A's datagrams are handled in
    // order, each before the next): a short window collects any copy still in flight, and
    // whatever `recv_until` left in the backlog (the Incoming and its copies among them).
    let rest = b.collect(Duration::from_millis(500)).await;
    let mut incomings = std::collections::BTreeSet::new();
    incomings.insert((inc.push, inc.connection));
    for m in &rest {
        match m {
            Message::SignalPush(s) => {
                pushes.insert((s.push, String::from_utf8_lossy(&s.payload).to_string()));
            }
            Message::Incoming(i) => {
                incomings.insert((i.push, i.connection));
            }
            _ => {}
        }
    }
    let texts: Vec<&str> = pushes.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(texts, ["dup", "next"], "one push per Signal: {pushes:?}");
    // Incoming must not have been pushed again either: three copies of the Connect and a
    // retransmission after its outcome made one push, one connection.
    assert_eq!(incomings.len(), 1, "Incoming pushed again: {incomings:?}");
    // Control: the same window does see a second Incoming when there is one. A's Heartbeat
    // is answered only after its Connect has been handled (and the push sent).
    let control = a.send_connect(b.uuid, "control").await;
    a.heartbeat().await;
    let seen = b.collect(Duration::from_millis(500)).await;
    assert!(
        seen.iter().any(|m| matches!(m, Message::Incoming(i)
            if i.payload == payload("control") && i.connection != inc.connection)),
        "the window missed the control Incoming (Connect rid {control}): {seen:?}"
    );

    // A retransmitted Register gets the same session, not a second one.
    let sock = Raw::socket().await;
    let mut m = Message::Register(proto::Register {
        rid: 77,
        local: vec![],
        pad: vec![],
    });
    let reg = proto::encode_hello(&mut m).unwrap();
    let before = node.router.session_count();
    sock.send_to(&reg, node.addr).await.unwrap();
    let Some(Message::Registered(r1)) = recv_msg(&sock, T).await else {
        panic!()
    };
    sock.send_to(&reg, node.addr).await.unwrap();
    let Some(Message::Registered(r2)) = recv_msg(&sock, T).await else {
        panic!()
    };
    assert_eq!((r1.uuid, r1.secret), (r2.uuid, r2.secret));
    assert_eq!(node.router.session_count(), before + 1);
}
