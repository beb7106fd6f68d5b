//! Node-to-node: a connection across two nodes, retransmission of node requests, the reply
//! cache, forged datagrams, and a target that moved.

use std::time::Duration;

use sigrouter_proto::{
    Ack, Addr, ConnectFailed, Connected, ErrorCode, FailReason, Message, Payload, SignalPush,
};

use super::connect::incoming;
use super::*;
use crate::router::ConnectLookup;

struct Two {
    a: Sim,
    b: Sim,
    /// Client on node a.
    ca: Client,
    /// Client on node b.
    cb: Client,
}

fn two() -> Two {
    let a = Sim::node("a", 1, &[("b", 2)]);
    let b = Sim::node("b", 2, &[("a", 1)]);
    let ca = a.register(v4(1, 1000), vec![Addr(v4(201, 1))]);
    let cb = b.register(v6(2, 2000), vec![]);
    Two { a, b, ca, cb }
}

/// ca connects to cb: returns the lookup job node a hands out.
fn connect(t: &mut Two, payload: &[u8]) -> (u64, ConnectLookup) {
    let rid = t.ca.next_rid();
    let out = t.a.recv(t.ca.addr, &t.ca.connect(rid, t.cb.uuid, payload));
    let Job::Connect(l) = only_job(&out).clone() else {
        panic!("{out:?}")
    };
    (rid, l)
}

/// Completes the lookup with node b: returns the forwarded Incoming.
fn forward(t: &Two, l: ConnectLookup) -> Transmit {
    let mut out = Outbox::default();
    let node = t.a.cluster().node("b").unwrap();
    t.a.router.complete_connect(t.a.now, l, Ok(node), &mut out);
    only_node(&out).clone()
}

fn status_of(out: &Outbox) -> wire::Status {
    let reply = out
        .cluster
        .iter()
        .find(|t| t.to == node_addr(1) || t.to == node_addr(2));
    match open_envelope(reply.expect("a reply")).body {
        wire::Body::Reply { status } => status,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_connection_across_two_nodes_connects_and_signals_both_ways() {
    let mut t = two();
    let (rid, l) = connect(&mut t, b"offer");
    let conn = l.conn;
    let fwd = forward(&t, l);
    assert_eq!(fwd.to, node_addr(2));
    // Node b pushes Incoming to its client and replies Ok.
    let out = t.b.recv_node(&fwd, node_addr(1));
    assert_eq!(out.client.len(), 1);
    let Message::Incoming(i) = msg(&out.client[0]) else {
        panic!()
    };
    assert_eq!(
        out.client[0].bytes,
        t.cb.expect(&incoming(i.push, conn, &t.ca, b"offer"))
    );
    assert_eq!(status_of(&out), wire::Status::Ok);
    assert!(t.a.recv_node(&out.cluster[0], node_addr(2)).is_empty());
    // cb accepts: its Ack waits for node a.
    let arid = t.cb.next_rid();
    let out = t.b.recv(t.cb.addr, &t.cb.accept(arid, conn, b"answer"));
    let answered = only_node(&out).clone();
    assert!(matches!(
        open_envelope(&answered).body,
        wire::Body::Answered { accept: true, .. }
    ));
    let out = t.a.recv_node(&answered, node_addr(2));
    let connected = Message::Connected(Connected {
        rid,
        connection: conn,
        peer: t.cb.uuid,
        observed: Addr(t.cb.addr),
        local: vec![],
        payload: b"answer".to_vec().into(),
    });
    assert_eq!(out.client.len(), 1);
    assert_eq!(
        (out.client[0].to, &out.client[0].bytes[..]),
        (t.ca.addr, &t.ca.expect(&connected)[..])
    );
    let out = t.b.recv_node(&out.cluster[0], node_addr(1));
    assert_client(
        &out,
        &[(t.cb.addr, t.cb.expect(&Message::Ack(Ack { rid: arid })))],
    );
    // Signals, both ways.
    for (from_a, payload) in [(true, &b"ping"[..]), (false, &b"pong"[..])] {
        let (src, dst, sc, dc) = if from_a {
            (&t.a, &t.b, t.ca.clone(), t.cb.clone())
        } else {
            (&t.b, &t.a, t.cb.clone(), t.ca.clone())
        };
        let mut sc = sc;
        let srid = sc.next_rid();
        let out = src.recv(sc.addr, &sc.signal(srid, conn, payload));
        let fwd = only_node(&out).clone();
        let out = dst.recv_node(&fwd, if from_a { node_addr(1) } else { node_addr(2) });
        let Message::SignalPush(p) = msg(&out.client[0]) else {
            panic!()
        };
        let want = Message::SignalPush(SignalPush {
            push: p.push,
            connection: conn,
            from: sc.uuid,
            payload: payload.to_vec().into(),
        });
        assert_eq!(
            (out.client[0].to, &out.client[0].bytes[..]),
            (dc.addr, &dc.expect(&want)[..])
        );
        let back = src.recv_node(
            &out.cluster[0],
            if from_a { node_addr(2) } else { node_addr(1) },
        );
        assert_client(
            &back,
            &[(sc.addr, sc.expect(&Message::Ack(Ack { rid: srid })))],
        );
    }
}

#[test]
fn a_node_request_is_retransmitted_then_fails_the_connect_with_retry_later() {
    let mut t = two();
    let (rid, l) = connect(&mut t, b"");
    let fwd = forward(&t, l);
    let start = t.a.now;
    let mut sent = Vec::new();
    for ms in [99, 100, 299, 300, 700, 1500, 1999] {
        t.a.now = start + Duration::from_millis(ms);
        let out = t.a.tick();
        assert!(out.client.is_empty(), "{out:?}");
        for c in &out.cluster {
            assert_eq!(c.bytes, fwd.bytes, "the same datagram");
            sent.push(ms);
        }
    }
    assert_eq!(sent, vec![100, 300, 700, 1500]);
    t.a.now = start + Duration::from_secs(2);
    let out = t.a.tick();
    let failed = Message::ConnectFailed(ConnectFailed {
        rid,
        reason: FailReason::RetryLater,
        payload: Payload::new(),
    });
    assert_client(&out, &[(t.ca.addr, t.ca.expect(&failed))]);
}

#[test]
fn a_repeated_node_request_is_answered_from_memory_and_applied_once() {
    let mut t = two();
    let (_, l) = connect(&mut t, b"");
    let fwd = forward(&t, l);
    let first = t.b.recv_node(&fwd, node_addr(1));
    let again = t.b.recv_node(&fwd, node_addr(1));
    assert_eq!(first.client.len(), 1, "one Incoming");
    assert!(again.client.is_empty(), "no second Incoming");
    assert_eq!(status_of(&again), status_of(&first));
}

#[test]
fn forged_and_misaddressed_node_datagrams_are_dropped_and_counted() {
    let mut t = two();
    let (_, l) = connect(&mut t, b"");
    let fwd = forward(&t, l);
    let mut forged = fwd.clone();
    let mut bytes = forged.bytes.to_vec();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    forged.bytes = bytes.into();
    assert!(t.b.recv_node(&forged, node_addr(1)).is_empty());
    // Addressed to b, replayed at a third node c.
    let c = Sim::node("c", 3, &[("a", 1)]);
    assert!(c.recv_node(&fwd, node_addr(1)).is_empty());
    // Signed with another key.
    let env = open_envelope(&fwd);
    let other = Transmit {
        to: fwd.to,
        bytes: wire::encode(&env, &[8; 32]).unwrap().into(),
    };
    assert!(t.b.recv_node(&other, node_addr(1)).is_empty());
    assert_eq!(
        t.b.metric("sigrouter_dropped_total{reason=\"cluster_auth\"}"),
        2.0
    );
    assert_eq!(
        c.metric("sigrouter_dropped_total{reason=\"cluster_auth\"}"),
        1.0
    );
    assert_eq!(t.b.router.in_flight(), 0);
}

#[test]
fn not_here_looks_again_once_then_answers_retry_later() {
    let mut t = two();
    let (rid, l) = connect(&mut t, b"");
    let conn = l.conn;
    // cb left node b meanwhile.
    t.b.recv(t.cb.addr, &t.cb.bye(9));
    let fwd = forward(&t, l);
    let out = t.b.recv_node(&fwd, node_addr(1));
    assert_eq!(status_of(&out), wire::Status::NotHere);
    let out = t.a.recv_node(&out.cluster[0], node_addr(2));
    let Job::Connect(again) = only_job(&out).clone() else {
        panic!()
    };
    assert!(again.fresh);
    assert_eq!(again.conn, conn);
    let fwd = forward(&t, again);
    let out = t.b.recv_node(&fwd, node_addr(1));
    let out = t.a.recv_node(&out.cluster[0], node_addr(2));
    let failed = Message::ConnectFailed(ConnectFailed {
        rid,
        reason: FailReason::RetryLater,
        payload: Payload::new(),
    });
    assert_client(&out, &[(t.ca.addr, t.ca.expect(&failed))]);
}

#[test]
fn a_target_that_leaves_its_node_before_answering_aborts_the_connect() {
    let mut t = two();
    let (rid, l) = connect(&mut t, b"");
    let fwd = forward(&t, l);
    let out = t.b.recv_node(&fwd, node_addr(1));
    t.a.recv_node(&out.cluster[0], node_addr(2));
    let out = t.b.recv(t.cb.addr, &t.cb.bye(9));
    assert_eq!(out.client.len(), 1, "the Ack of the Bye");
    assert_eq!(out.cluster.len(), 1);
    let abort = out.cluster[0].clone();
    assert!(matches!(
        open_envelope(&abort).body,
        wire::Body::Abort { .. }
    ));
    let out = t.a.recv_node(&abort, node_addr(2));
    assert_eq!(out.client.len(), 1);
    let failed = Message::ConnectFailed(ConnectFailed {
        rid,
        reason: FailReason::RetryLater,
        payload: Payload::new(),
    });
    assert_eq!(out.client[0].bytes, t.ca.expect(&failed));
    assert_eq!(status_of(&out), wire::Status::Ok);
}

#[test]
fn a_signal_to_a_peer_whose_node_does_not_answer_gets_retry_later() {
    let mut t = two();
    let (_, l) = connect(&mut t, b"");
    let conn = l.conn;
    let fwd = forward(&t, l);
    let out = t.b.recv_node(&fwd, node_addr(1));
    t.a.recv_node(&out.cluster[0], node_addr(2));
    let arid = t.cb.next_rid();
    let out = t.b.recv(t.cb.addr, &t.cb.accept(arid, conn, b""));
    let out = t.a.recv_node(&out.cluster[0], node_addr(2));
    t.b.recv_node(&out.cluster[0], node_addr(1));
    // Node b goes silent.
    let srid = t.ca.next_rid();
    let out = t.a.recv(t.ca.addr, &t.ca.signal(srid, conn, b"x"));
    assert_eq!(out.cluster.len(), 1);
    t.a.advance(Duration::from_secs(2));
    let out = t.a.tick();
    assert_client(
        &out,
        &[(t.ca.addr, t.ca.error(srid, ErrorCode::RetryLater))],
    );
    // The failure is remembered: a retransmission gets the same answer.
    let out = t.a.recv(t.ca.addr, &t.ca.signal(srid, conn, b"x"));
    assert_client(
        &out,
        &[(t.ca.addr, t.ca.error(srid, ErrorCode::RetryLater))],
    );
}
