//! Duplicate and replayed requests of every type: a retransmission gets the answer already
//! given and does nothing twice; a stale replay is dropped.

use std::time::Duration;

use sigrouter_proto::{
    self as proto, Ack, Addr, ConnectFailed, Connected, FailReason, HeartbeatAck, Message, Payload,
    QueryResult,
};
use uuid::Uuid;

use super::connect::{pair, start_local};
use super::*;
use crate::session::WINDOW;

#[test]
fn a_connect_retransmitted_while_pending_waits_and_then_gets_the_outcome() {
    let sim = Sim::new();
    let (mut a, mut b) = pair(&sim);
    let (conn, _, rid) = start_local(&sim, &mut a, &b, b"o");
    // Retransmitted before the target answers: no second Incoming, no answer yet.
    assert!(sim.recv(a.addr, &a.connect(rid, b.uuid, b"o")).is_empty());
    let arid = b.next_rid();
    sim.recv(b.addr, &b.accept(arid, conn, b""));
    // Retransmitted after: the same Connected, byte for byte; still one connection.
    let out = sim.recv(a.addr, &a.connect(rid, b.uuid, b"o"));
    let connected = Message::Connected(Connected {
        rid,
        connection: conn,
        peer: b.uuid,
        observed: Addr(b.addr),
        local: b.local.clone(),
        payload: Payload::new(),
    });
    assert_client(&out, &[(a.addr, a.expect(&connected))]);
    assert_eq!(sim.metric("sigrouter_pushes_total"), 1.0);
}

#[test]
fn an_accept_retransmitted_gets_the_same_ack_and_no_second_connected() {
    let sim = Sim::new();
    let (mut a, mut b) = pair(&sim);
    let (conn, _, _) = start_local(&sim, &mut a, &b, b"");
    let arid = b.next_rid();
    sim.recv(b.addr, &b.accept(arid, conn, b""));
    let out = sim.recv(b.addr, &b.accept(arid, conn, b""));
    assert_client(
        &out,
        &[(b.addr, b.expect(&Message::Ack(Ack { rid: arid })))],
    );
    // Accepted again under a new request id: acknowledged, nothing more.
    let again = b.next_rid();
    let out = sim.recv(b.addr, &b.accept(again, conn, b""));
    assert_client(
        &out,
        &[(b.addr, b.expect(&Message::Ack(Ack { rid: again })))],
    );
    assert_eq!(
        sim.metric("sigrouter_connects_total{outcome=\"connected\"}"),
        1.0
    );
}

#[test]
fn a_reject_retransmitted_gets_the_same_ack() {
    let sim = Sim::new();
    let (mut a, mut b) = pair(&sim);
    let (conn, _, _) = start_local(&sim, &mut a, &b, b"");
    let r = b.next_rid();
    sim.recv(b.addr, &b.reject(r, conn, b""));
    let out = sim.recv(b.addr, &b.reject(r, conn, b""));
    assert_client(&out, &[(b.addr, b.expect(&Message::Ack(Ack { rid: r })))]);
    assert_eq!(
        sim.metric("sigrouter_connects_total{outcome=\"rejected\"}"),
        1.0
    );
}

/// An established connection between `a` and `b`.
pub(super) fn established(sim: &Sim) -> (Client, Client, Uuid) {
    let (mut a, mut b) = pair(sim);
    let (conn, _, _) = start_local(sim, &mut a, &b, b"");
    let arid = b.next_rid();
    sim.recv(b.addr, &b.accept(arid, conn, b""));
    (a, b, conn)
}

#[test]
fn a_signal_retransmitted_is_relayed_once() {
    let sim = Sim::new();
    let (mut a, b, conn) = established(&sim);
    let rid = a.next_rid();
    let first = sim.recv(a.addr, &a.signal(rid, conn, b"cand"));
    assert_eq!(first.client.len(), 2, "SignalPush to b, Ack to a");
    let out = sim.recv(a.addr, &a.signal(rid, conn, b"cand"));
    assert_client(&out, &[(a.addr, a.expect(&Message::Ack(Ack { rid })))]);
    assert_eq!(sim.metric("sigrouter_signals_relayed_total"), 1.0);
    let _ = b;
}

#[test]
fn a_heartbeat_or_query_retransmitted_is_answered_again_with_the_same_answer() {
    let sim = Sim::new();
    let (mut a, b) = pair(&sim);
    let rid = a.next_rid();
    let hb = Message::HeartbeatAck(HeartbeatAck {
        rid,
        observed: Addr(a.addr),
    });
    for _ in 0..2 {
        let out = sim.recv(a.addr, &a.heartbeat(rid));
        assert_client(&out, &[(a.addr, a.expect(&hb))]);
    }
    let rid = a.next_rid();
    let asked = vec![b.uuid, Uuid::from_u128(1)];
    let result = Message::QueryResult(QueryResult {
        rid,
        online: vec![true, false],
    });
    for _ in 0..2 {
        let out = sim.recv(a.addr, &a.query(rid, asked.clone()));
        assert_client(&out, &[(a.addr, a.expect(&result))]);
    }
}

#[test]
fn a_resume_retransmitted_gets_the_same_session() {
    let sim = Sim::new();
    let c = sim.register(v4(1, 1), vec![]);
    let req = resume_datagram(&c, 5, c.secret);
    let want = proto::encode(&sim.registered(&c, 5, c.addr), None).unwrap();
    for _ in 0..2 {
        assert_client(&sim.recv(c.addr, &req), &[(c.addr, want.clone())]);
    }
    assert_eq!(sim.router.session_count(), 1);
}

#[test]
fn a_push_ack_repeated_changes_nothing() {
    let sim = Sim::new();
    let (mut a, b) = pair(&sim);
    let (_, push, _) = start_local(&sim, &mut a, &b, b"");
    assert!(sim.recv(b.addr, &b.push_ack(push)).is_empty());
    assert!(sim.recv(b.addr, &b.push_ack(push)).is_empty());
    assert!(sim.router.is_local(&b.uuid));
    // The first ack stopped the Incoming's retransmission; the second broke nothing: b still
    // answers, and the connection still waits for it.
    let mut sim = sim;
    sim.advance(Duration::from_secs(1));
    assert!(sim.tick().is_empty());
    assert_eq!(sim.router.in_flight(), 1);
}

#[test]
fn a_request_far_below_the_newest_id_is_a_stale_replay_and_dropped() {
    let sim = Sim::new();
    let (a, b) = pair(&sim);
    let top = 5000;
    sim.recv(a.addr, &a.heartbeat(top));
    // Within the window: answered.
    assert_eq!(
        sim.recv(a.addr, &a.heartbeat(top - (WINDOW - 1)))
            .client
            .len(),
        1
    );
    // Below it: dropped and counted, whatever the type.
    assert!(sim.recv(a.addr, &a.heartbeat(top - WINDOW)).is_empty());
    assert!(sim
        .recv(a.addr, &a.connect(top - WINDOW - 1, b.uuid, b""))
        .is_empty());
    assert_eq!(sim.router.in_flight(), 0, "no connection was opened");
    assert_eq!(
        sim.metric("sigrouter_dropped_total{reason=\"replay\"}"),
        2.0
    );
}

#[test]
fn a_failed_connect_retransmitted_gets_the_same_failure() {
    let sim = Sim::new();
    let mut a = sim.register(v4(1, 1), vec![]);
    let rid = a.next_rid();
    let to = Uuid::from_u128(3);
    let failed = Message::ConnectFailed(ConnectFailed {
        rid,
        reason: FailReason::Offline,
        payload: Payload::new(),
    });
    for _ in 0..2 {
        let out = sim.recv(a.addr, &a.connect(rid, to, b""));
        assert_client(&out, &[(a.addr, a.expect(&failed))]);
    }
}

#[test]
fn a_pending_connect_is_remembered_however_many_requests_follow() {
    let sim = Sim::with(Config {
        connect_timeout: Duration::from_secs(60),
        ..config()
    });
    // a talks to c over an established connection, while its Connect to b is pending.
    let (mut a, mut c) = pair(&sim);
    let (conn_ac, _, _) = start_local(&sim, &mut a, &c, b"");
    let r = c.next_rid();
    sim.recv(c.addr, &c.accept(r, conn_ac, b""));
    let b = sim.register(v4(3, 3), vec![]);
    let (_, _, pending_rid) = start_local(&sim, &mut a, &b, b"");
    for _ in 0..100 {
        let rid = a.next_rid();
        assert_eq!(
            sim.recv(a.addr, &a.signal(rid, conn_ac, b"s")).client.len(),
            2
        );
    }
    // Retransmitted after 100 other requests: still pending, no second connection.
    let out = sim.recv(a.addr, &a.connect(pending_rid, b.uuid, b""));
    assert!(out.is_empty(), "{:?}", decoded(&out));
    assert_eq!(
        sim.metric("sigrouter_pushes_total"),
        2.0 + 100.0,
        "two Incoming, 100 signals"
    );
}

#[test]
fn a_signal_replayed_after_its_answer_was_forgotten_is_not_delivered_again() {
    let mut sim = Sim::new();
    let (mut a, _b, conn) = established(&sim);
    let rid = a.next_rid();
    assert_eq!(
        sim.recv(a.addr, &a.signal(rid, conn, b"once")).client.len(),
        2
    );
    let newer = a.next_rid();
    sim.recv(a.addr, &a.heartbeat(newer));
    // Past the time answers are remembered, two ids below the newest.
    sim.advance(sim.cfg.dedup_window + Duration::from_secs(1));
    let out = sim.recv(a.addr, &a.signal(rid, conn, b"once"));
    assert!(out.is_empty(), "{:?}", decoded(&out));
    assert_eq!(sim.metric("sigrouter_signals_relayed_total"), 1.0);
    assert_eq!(
        sim.metric("sigrouter_dropped_total{reason=\"replay\"}"),
        1.0
    );
}

/// A batch received in one system call is handled as its datagrams would be one by one, in
/// order: a heartbeat seen twice in it is answered twice, garbage in the middle is dropped
/// and counted, a request from an unknown session still gets its error.
#[test]
fn a_batch_is_handled_like_its_datagrams_one_by_one() {
    let sim = Sim::new();
    let (mut a, mut b) = pair(&sim);
    let (ra, rb) = (a.next_rid(), b.next_rid());
    let ack = |c: &Client, rid| {
        c.expect(&Message::HeartbeatAck(HeartbeatAck {
            rid,
            observed: Addr(c.addr),
        }))
    };
    let stranger = v4(99, 4000);
    let unknown = Client {
        uuid: Uuid::from_u128(5),
        secret: Secret([3; 32]),
        addr: stranger,
        local: vec![],
        rid: 1,
    };
    let (ha, hb, hu) = (a.heartbeat(ra), b.heartbeat(rb), unknown.heartbeat(9));
    let batch: Vec<(SocketAddr, &[u8])> = vec![
        (a.addr, &ha),
        (a.addr, b"not a datagram of ours"),
        (b.addr, &hb),
        (a.addr, &ha),
        (stranger, &hu),
    ];
    let before = sim.metric("sigrouter_rx_datagrams_total");
    let out = sim.recv_batch(&batch);
    assert_client(
        &out,
        &[
            (a.addr, ack(&a, ra)),
            (b.addr, ack(&b, rb)),
            (a.addr, ack(&a, ra)),
            (stranger, error(9, proto::ErrorCode::UnknownSession)),
        ],
    );
    assert_eq!(sim.metric("sigrouter_rx_datagrams_total") - before, 5.0);
    assert_eq!(
        sim.metric("sigrouter_dropped_total{reason=\"bad_magic\"}"),
        1.0
    );
}
