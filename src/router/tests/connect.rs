//! Connect, on one node and towards another: accepted, rejected, timed out, offline.

use std::time::Duration;

use sigrouter_proto::{
    self as proto, Ack, Addr, ConnectFailed, Connected, ErrorCode, FailReason, Incoming, Message,
    Payload,
};
use uuid::Uuid;

use super::*;
use crate::router::ConnectLookup;

/// The Incoming `b` must get for `a`'s Connect.
pub(super) fn incoming(push: u64, conn: Uuid, a: &Client, payload: &[u8]) -> Message {
    Message::Incoming(Incoming {
        push,
        connection: conn,
        from: a.uuid,
        observed: Addr(a.addr),
        local: a.local.clone(),
        payload: payload.to_vec().into(),
    })
}

/// `a` connects to `b` on `sim`; checks the exact Incoming `b` gets and returns the connection
/// id and push id.
pub(super) fn start_local(
    sim: &Sim,
    a: &mut Client,
    b: &Client,
    payload: &[u8],
) -> (Uuid, u64, u64) {
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.connect(rid, b.uuid, payload));
    let t = only_client(&out);
    assert_eq!(t.to, b.addr);
    let Message::Incoming(i) = msg(t) else {
        panic!("expected Incoming, got {:?}", msg(t));
    };
    assert_eq!(
        t.bytes,
        b.expect(&incoming(i.push, i.connection, a, payload))
    );
    (i.connection, i.push, rid)
}

/// Two clients on one node, `a` with local addresses.
pub(super) fn pair(sim: &Sim) -> (Client, Client) {
    let a = sim.register(v4(1, 1000), vec![Addr(v4(201, 1))]);
    let b = sim.register(v6(2, 2000), vec![Addr(v6(202, 2))]);
    (a, b)
}

#[test]
fn a_local_connect_accepted_tells_both_sides_each_others_addresses() {
    let sim = Sim::new();
    let (mut a, mut b) = pair(&sim);
    let (conn, _, rid) = start_local(&sim, &mut a, &b, b"offer");
    let arid = b.next_rid();
    let out = sim.recv(b.addr, &b.accept(arid, conn, b"answer"));
    let connected = Message::Connected(Connected {
        rid,
        connection: conn,
        peer: b.uuid,
        observed: Addr(b.addr),
        local: b.local.clone(),
        payload: b"answer".to_vec().into(),
    });
    assert_client(
        &out,
        &[
            (b.addr, b.expect(&Message::Ack(Ack { rid: arid }))),
            (a.addr, a.expect(&connected)),
        ],
    );
    assert_eq!(
        sim.metric("sigrouter_connects_total{outcome=\"connected\"}"),
        1.0
    );
    // The Incoming was answered: no retransmission follows.
    let mut sim = sim;
    sim.advance(Duration::from_secs(5));
    assert!(sim.tick().is_empty());
}

#[test]
fn a_local_connect_rejected_carries_the_reject_payload() {
    let sim = Sim::new();
    let (mut a, mut b) = pair(&sim);
    let (conn, _, rid) = start_local(&sim, &mut a, &b, b"offer");
    let r = b.next_rid();
    let out = sim.recv(b.addr, &b.reject(r, conn, b"busy"));
    let failed = Message::ConnectFailed(ConnectFailed {
        rid,
        reason: FailReason::Rejected,
        payload: b"busy".to_vec().into(),
    });
    assert_client(
        &out,
        &[
            (b.addr, b.expect(&Message::Ack(Ack { rid: r }))),
            (a.addr, a.expect(&failed)),
        ],
    );
    // The connection is gone: a Signal on it is refused.
    let s = a.next_rid();
    let out = sim.recv(a.addr, &a.signal(s, conn, b"x"));
    assert_client(&out, &[(a.addr, a.error(s, ErrorCode::UnknownConnection))]);
}

#[test]
fn an_unanswered_connect_times_out() {
    // The Incoming is retransmitted all along (its deadline is past the connect timeout).
    let mut sim = Sim::with(Config {
        push_deadline: Duration::from_secs(60),
        ..config()
    });
    let (mut a, b) = pair(&sim);
    let (_, _, rid) = start_local(&sim, &mut a, &b, b"");
    let mut to_b = 0;
    let until = sim.now + sim.cfg.connect_timeout - Duration::from_millis(1);
    while sim.now < until {
        sim.advance(Duration::from_millis(25).min(until - sim.now));
        let out = sim.tick();
        assert!(
            out.client.iter().all(|t| t.to == b.addr),
            "nothing for a yet"
        );
        to_b += out.client.len();
    }
    assert!(to_b >= 4, "Incoming retransmitted while a waits: {to_b}");
    sim.advance(Duration::from_millis(1));
    let out = sim.tick();
    let failed = Message::ConnectFailed(ConnectFailed {
        rid,
        reason: FailReason::Timeout,
        payload: Payload::new(),
    });
    assert_client(&out, &[(a.addr, a.expect(&failed))]);
    assert_eq!(
        sim.metric("sigrouter_connects_total{outcome=\"timeout\"}"),
        1.0
    );
}

#[test]
fn a_connect_to_nobody_on_a_single_node_is_offline() {
    let sim = Sim::new();
    let mut a = sim.register(v4(1, 1), vec![]);
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.connect(rid, Uuid::from_u128(42), b""));
    let failed = Message::ConnectFailed(ConnectFailed {
        rid,
        reason: FailReason::Offline,
        payload: Payload::new(),
    });
    assert_client(&out, &[(a.addr, a.expect(&failed))]);
}

#[test]
fn a_connect_to_oneself_is_a_bad_request() {
    let sim = Sim::new();
    let mut a = sim.register(v4(1, 1), vec![]);
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.connect(rid, a.uuid, b""));
    assert_client(&out, &[(a.addr, a.error(rid, ErrorCode::BadRequest))]);
}

#[test]
fn an_accept_for_an_unknown_connection_is_refused() {
    let sim = Sim::new();
    let mut b = sim.register(v4(1, 1), vec![]);
    let rid = b.next_rid();
    let out = sim.recv(b.addr, &b.accept(rid, Uuid::from_u128(9), b""));
    assert_client(
        &out,
        &[(b.addr, b.error(rid, ErrorCode::UnknownConnection))],
    );
}

#[test]
fn only_the_target_may_answer() {
    let sim = Sim::new();
    let (mut a, b) = pair(&sim);
    let mut eve = sim.register(v4(66, 1), vec![]);
    let (conn, _, _) = start_local(&sim, &mut a, &b, b"");
    let rid = eve.next_rid();
    let out = sim.recv(eve.addr, &eve.accept(rid, conn, b""));
    assert_client(
        &out,
        &[(eve.addr, eve.error(rid, ErrorCode::UnknownConnection))],
    );
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.accept(rid, conn, b""));
    assert_client(
        &out,
        &[(a.addr, a.error(rid, ErrorCode::UnknownConnection))],
    );
}

#[test]
fn a_target_that_leaves_before_answering_fails_the_connect_at_once() {
    let sim = Sim::new();
    let (mut a, b) = pair(&sim);
    let (_, _, rid) = start_local(&sim, &mut a, &b, b"");
    let out = sim.recv(b.addr, &b.bye(2));
    let failed = Message::ConnectFailed(ConnectFailed {
        rid,
        reason: FailReason::RetryLater,
        payload: Payload::new(),
    });
    assert_client(
        &out,
        &[
            (b.addr, b.expect(&Message::Ack(Ack { rid: 2 }))),
            (a.addr, a.expect(&failed)),
        ],
    );
}

#[test]
fn a_target_that_expires_before_answering_fails_the_connect_at_once() {
    let mut sim = Sim::with(Config {
        connect_timeout: Duration::from_secs(600),
        ..config()
    });
    let (mut a, b) = pair(&sim);
    let (_, _, rid) = start_local(&sim, &mut a, &b, b"");
    // a keeps its session; b goes silent (its Incoming given up) and expires.
    let step = Duration::from_secs(10);
    for _ in 0..5 {
        sim.advance(step);
        let r = a.next_rid();
        sim.recv(a.addr, &a.heartbeat(r));
        sim.tick();
    }
    let (gone, out) = sim.sweep();
    assert_eq!(gone, vec![b.uuid]);
    let failed = Message::ConnectFailed(ConnectFailed {
        rid,
        reason: FailReason::RetryLater,
        payload: Payload::new(),
    });
    assert_client(&out, &[(a.addr, a.expect(&failed))]);
}

#[test]
fn a_connect_to_a_client_not_here_becomes_a_lookup_job() {
    let a_node = Sim::node("a", 1, &[("b", 2)]);
    let mut a = a_node.register(v4(1, 1), vec![Addr(v4(201, 1))]);
    let target = Uuid::from_u128(77);
    let rid = a.next_rid();
    let out = a_node.recv(a.addr, &a.connect(rid, target, b"hi"));
    let Job::Connect(l) = only_job(&out) else {
        panic!("{out:?}")
    };
    assert_eq!(l.target, target);
    assert!(!l.fresh);
    assert_eq!(
        l.body,
        wire::Body::Incoming {
            conn: l.conn,
            from: a.uuid,
            to: target,
            observed: Addr(a.addr),
            local: a.local.clone(),
            payload: b"hi".to_vec().into(),
        }
    );
    // While the lookup runs, a retransmitted Connect waits for it (no second job).
    assert!(a_node
        .recv(a.addr, &a.connect(rid, target, b"hi"))
        .is_empty());
}

#[test]
fn a_client_cached_as_nowhere_is_offline_without_a_lookup() {
    let sim = Sim::node("a", 1, &[]);
    let mut a = sim.register(v4(1, 1), vec![]);
    let target = Uuid::from_u128(77);
    sim.cluster().cache_presence(target, None, sim.now);
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.connect(rid, target, b""));
    let failed = Message::ConnectFailed(ConnectFailed {
        rid,
        reason: FailReason::Offline,
        payload: Payload::new(),
    });
    assert_client(&out, &[(a.addr, a.expect(&failed))]);
}

#[test]
fn a_client_cached_on_an_active_node_is_forwarded_without_a_lookup() {
    let sim = Sim::node("a", 1, &[("b", 2)]);
    let mut a = sim.register(v4(1, 1), vec![]);
    let target = Uuid::from_u128(77);
    sim.cluster()
        .cache_presence(target, Some("b".into()), sim.now);
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.connect(rid, target, b"x"));
    let t = only_node(&out);
    assert_eq!(t.to, node_addr(2));
    assert!(matches!(open_envelope(t).body, wire::Body::Incoming { to, .. } if to == target));
}

fn lookup_of(out: &Outbox) -> ConnectLookup {
    match only_job(out) {
        Job::Connect(l) => l.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failed_lookup_answers_the_initiator() {
    for (reason, name) in [
        (FailReason::Offline, "offline"),
        (FailReason::RetryLater, "retry-later"),
    ] {
        let sim = Sim::node("a", 1, &[]);
        let mut a = sim.register(v4(1, 1), vec![]);
        let rid = a.next_rid();
        let l = lookup_of(&sim.recv(a.addr, &a.connect(rid, Uuid::from_u128(5), b"")));
        let mut out = Outbox::default();
        sim.router
            .complete_connect(sim.now, l, Err(reason), &mut out);
        let failed = Message::ConnectFailed(ConnectFailed {
            rid,
            reason,
            payload: Payload::new(),
        });
        assert_client(&out, &[(a.addr, a.expect(&failed))]);
        let m = format!("sigrouter_connects_total{{outcome=\"{name}\"}}");
        assert_eq!(sim.metric(&m), 1.0);
    }
}

#[test]
fn a_target_that_arrived_during_the_lookup_is_served_locally() {
    let sim = Sim::node("a", 1, &[("b", 2)]);
    let mut a = sim.register(v4(1, 1), vec![]);
    let other = Sim::node("b", 2, &[]);
    let b = other.register(v4(2, 2), vec![]);
    let rid = a.next_rid();
    let l = lookup_of(&sim.recv(a.addr, &a.connect(rid, b.uuid, b"p")));
    // b resumes here while the lookup runs.
    let mut out = Outbox::default();
    let found = Ok(Some((b.secret.verifier(), "b".into())));
    let req = resume_datagram(&b, 2, b.secret);
    let Ok(Message::Resume(m)) = proto::decode(&req) else {
        unreachable!()
    };
    sim.router
        .complete_resume(sim.now, b.addr, req.len(), m, found, &mut out);
    let node_b = sim.cluster().node("b").unwrap();
    let mut out = Outbox::default();
    sim.router
        .complete_connect(sim.now, l.clone(), Ok(node_b), &mut out);
    let t = only_client(&out);
    assert_eq!(t.to, b.addr);
    let Message::Incoming(i) = msg(t) else {
        panic!()
    };
    assert_eq!(t.bytes, b.expect(&incoming(i.push, l.conn, &a, b"p")));
}

/// An established connection lives while Signals flow and is forgotten after ten minutes
/// without one, although both sessions stay (a later Signal is refused as unknown).
#[test]
fn an_idle_connection_is_forgotten_after_ten_minutes() {
    let mut sim = Sim::new();
    let (mut a, mut b) = pair(&sim);
    let (conn, _, _) = start_local(&sim, &mut a, &b, b"offer");
    let rid = b.next_rid();
    sim.recv(b.addr, &b.accept(rid, conn, b"answer"));
    // Heartbeats every 20 s keep both sessions; the sweep runs every second as on a node.
    let live = |sim: &mut Sim, a: &mut Client, b: &mut Client, secs: u64| {
        for s in 1..=secs {
            sim.advance(Duration::from_secs(1));
            if s % 20 == 0 {
                for c in [&mut *a, &mut *b] {
                    let rid = c.next_rid();
                    sim.recv(c.addr, &c.heartbeat(rid));
                }
            }
            sim.sweep();
        }
    };
    // Whether a Signal from `from` reaches `to`.
    let relayed = |sim: &Sim, from: &mut Client, to: &Client| {
        let rid = from.next_rid();
        let out = sim.recv(from.addr, &from.signal(rid, conn, b"hello"));
        decoded(&out).iter().any(|(t, _)| *t == to.addr)
    };
    live(&mut sim, &mut a, &mut b, 540);
    assert!(
        relayed(&sim, &mut a, &b),
        "a Signal at 9 minutes is relayed"
    );
    // 590 s after that Signal (1,130 s after the Accept): still there, the Signal renewed it.
    live(&mut sim, &mut a, &mut b, 590);
    assert!(
        relayed(&sim, &mut b, &a),
        "relayed 590 s after the last Signal"
    );
    live(&mut sim, &mut a, &mut b, 611);
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.signal(rid, conn, b"too late"));
    assert_client(
        &out,
        &[(a.addr, a.error(rid, ErrorCode::UnknownConnection))],
    );
}
