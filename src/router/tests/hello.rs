//! Register, Resume, heartbeats and expiry.

use std::time::Duration;

use sigrouter_proto::{self as proto, Addr, ErrorCode, HeartbeatAck, Message, Secret};

use super::*;
use crate::router::ResumeLookup;

#[test]
fn register_from_ipv4_gets_a_session_and_its_observed_address() {
    let mut sim = Sim::node("a", 1, &[]);
    let c = sim.register(v4(1, 40000), vec![Addr(v4(99, 5000))]);
    assert_eq!(sim.router.session_count(), 1);
    assert!(sim.router.is_local(&c.uuid));
    // The directory learns where the client is, with the verifier of its secret.
    let ops = sim.presence_ops();
    assert!(
        matches!(ops.as_slice(), [PresenceOp::Put(u, v)] if *u == c.uuid && *v == c.secret.verifier()),
        "{ops:?}"
    );
}

#[test]
fn register_from_ipv6_reports_the_ipv6_observed_address() {
    let sim = Sim::new();
    let src = v6(1, 50000);
    let c = sim.register(src, vec![Addr(v6(2, 1)), Addr(v4(3, 2))]);
    // `register` checked the exact Registered bytes, observed address included; a heartbeat
    // ack says the same.
    let out = sim.recv(src, &c.heartbeat(2));
    let ack = Message::HeartbeatAck(HeartbeatAck {
        rid: 2,
        observed: Addr(src),
    });
    assert_client(&out, &[(src, c.expect(&ack))]);
}

#[test]
fn registered_is_never_larger_than_the_register() {
    let sim = Sim::new();
    let req = register_datagram(1, vec![]);
    let out = sim.recv(v6(9, 1), &req);
    assert!(only_client(&out).bytes.len() <= req.len());
}

#[test]
fn a_retransmitted_register_gets_the_same_session() {
    let sim = Sim::new();
    let src = v4(1, 40000);
    let c = sim.register(src, vec![]);
    let again = sim.recv(src, &register_datagram(1, vec![]));
    assert_client(
        &again,
        &[(
            src,
            proto::encode(&sim.registered(&c, 1, src), None).unwrap(),
        )],
    );
    assert_eq!(sim.router.session_count(), 1);
    assert_eq!(sim.metric("sigrouter_duplicate_requests_total"), 1.0);
}

#[test]
fn the_same_request_id_from_another_source_is_another_client() {
    let sim = Sim::new();
    let a = sim.register(v4(1, 40000), vec![]);
    let b = sim.register(v4(2, 40000), vec![]);
    assert_ne!(a.uuid, b.uuid);
    assert_eq!(sim.router.session_count(), 2);
}

#[test]
fn an_unpadded_register_is_dropped_and_counted() {
    let sim = Sim::new();
    let m = Message::Register(proto::Register {
        rid: 1,
        local: vec![],
        token: Vec::new(),
        pad: vec![],
    });
    let out = sim.recv(v4(1, 1), &proto::encode(&m, None).unwrap());
    assert!(out.is_empty());
    assert_eq!(
        sim.metric("sigrouter_dropped_total{reason=\"unpadded\"}"),
        1.0
    );
    assert_eq!(sim.router.session_count(), 0);
}

#[test]
fn register_while_draining_is_refused_with_draining() {
    let sim = Sim::new();
    sim.router.set_draining(true);
    let src = v4(1, 1);
    let out = sim.recv(src, &register_datagram(5, vec![]));
    assert_client(&out, &[(src, error(5, ErrorCode::Draining))]);
    assert_eq!(sim.router.session_count(), 0);
}

#[test]
fn register_at_the_session_cap_is_refused_with_capacity() {
    let sim = Sim::with(Config {
        max_sessions: 1,
        ..config()
    });
    sim.register(v4(1, 1), vec![]);
    let src = v4(2, 1);
    let out = sim.recv(src, &register_datagram(1, vec![]));
    assert_client(&out, &[(src, error(1, ErrorCode::Capacity))]);
    assert_eq!(sim.metric("sigrouter_capacity_refused_total"), 1.0);
}

#[test]
fn registers_over_the_per_ip_burst_are_rate_limited() {
    let sim = Sim::with(Config {
        register_rate: 1,
        register_burst: 2,
        ..config()
    });
    sim.register(v4(1, 1), vec![]);
    sim.register(v4(1, 2), vec![]);
    // Another port of the same IP: the burst is spent.
    let src = v4(1, 3);
    let out = sim.recv(src, &register_datagram(1, vec![]));
    assert_client(&out, &[(src, error(1, ErrorCode::RateLimited))]);
    // Another IP is not affected.
    sim.register(v4(2, 1), vec![]);
    assert_eq!(sim.router.session_count(), 3);
}

#[test]
fn resume_on_the_same_node_keeps_the_uuid_and_moves_the_address() {
    let sim = Sim::new();
    let c = sim.register(v4(1, 40000), vec![]);
    let moved = v4(1, 40001);
    let out = sim.recv(moved, &resume_datagram(&c, 7, c.secret));
    assert_client(
        &out,
        &[(
            moved,
            proto::encode(&sim.registered(&c, 7, moved), None).unwrap(),
        )],
    );
    // The session lives at the new address: a push for it goes there, though the client has
    // sent nothing since.
    let mut other = sim.register(v4(2, 1), vec![]);
    let rid = other.next_rid();
    let out = sim.recv(other.addr, &other.connect(rid, c.uuid, b""));
    assert_eq!(only_client(&out).to, moved);
    assert_eq!(sim.router.session_count(), 2);
}

#[test]
fn resume_with_a_wrong_secret_is_unauthorized_and_changes_nothing() {
    let sim = Sim::new();
    let c = sim.register(v4(1, 40000), vec![]);
    let thief = v4(66, 1);
    let out = sim.recv(thief, &resume_datagram(&c, 7, Secret([1; 32])));
    assert_client(&out, &[(thief, error(7, ErrorCode::Unauthorized))]);
    // The session stays where it was: a push for it goes to its own address.
    let mut other = sim.register(v4(2, 1), vec![]);
    let rid = other.next_rid();
    let out = sim.recv(other.addr, &other.connect(rid, c.uuid, b""));
    assert_eq!(only_client(&out).to, c.addr);
}

#[test]
fn resume_of_an_unknown_session_on_a_single_node_is_unauthorized() {
    let sim = Sim::new();
    let other = Sim::new();
    let c = other.register(v4(1, 1), vec![]);
    let out = sim.recv(c.addr, &resume_datagram(&c, 2, c.secret));
    assert_client(&out, &[(c.addr, error(2, ErrorCode::Unauthorized))]);
}

#[test]
fn resume_of_a_session_held_elsewhere_becomes_a_lookup_job() {
    let a = Sim::node("a", 1, &[("b", 2)]);
    let b = Sim::node("b", 2, &[("a", 1)]);
    let c = b.register(v4(1, 1), vec![]);
    let req = resume_datagram(&c, 2, c.secret);
    let out = a.recv(c.addr, &req);
    let Job::Resume { src, req_len, msg } = only_job(&out) else {
        panic!("{out:?}");
    };
    assert_eq!(
        (*src, *req_len, msg.uuid, msg.rid),
        (c.addr, req.len(), c.uuid, 2)
    );
}

fn complete_resume(sim: &Sim, c: &Client, rid: u64, found: ResumeLookup) -> Outbox {
    let req = resume_datagram(c, rid, c.secret);
    let Ok(Message::Resume(m)) = proto::decode(&req) else {
        unreachable!()
    };
    let mut out = Outbox::default();
    sim.router
        .complete_resume(sim.now, c.addr, req.len(), m, found, &mut out);
    out
}

#[test]
fn a_verified_resume_takes_the_session_and_tells_the_old_node() {
    let mut a = Sim::node("a", 1, &[("b", 2)]);
    let b = Sim::node("b", 2, &[("a", 1)]);
    let c = b.register(v4(1, 1), vec![]);
    let out = complete_resume(&a, &c, 2, Ok(Some((c.secret.verifier(), "b".into()))));
    assert_eq!(out.client.len(), 1);
    assert_eq!(
        out.client[0].bytes,
        proto::encode(&a.registered(&c, 2, c.addr), None).unwrap()
    );
    assert_eq!(out.cluster.len(), 1);
    assert_eq!(out.cluster[0].to, node_addr(2));
    let env = open_envelope(&out.cluster[0]);
    assert_eq!((env.from.as_str(), env.to.as_str()), ("a", "b"));
    assert_eq!(env.body, wire::Body::Moved { uuid: c.uuid });
    assert!(a.router.is_local(&c.uuid));
    assert!(matches!(a.presence_ops().as_slice(), [PresenceOp::Put(u, _)] if *u == c.uuid));
    // The old node lets the session go and replies.
    let reply = b.recv_node(&out.cluster[0], node_addr(1));
    assert!(!b.router.is_local(&c.uuid));
    let env = open_envelope(only_node(&reply));
    assert_eq!(
        env.body,
        wire::Body::Reply {
            status: wire::Status::Ok
        }
    );
}

/// A Resume whose directory lookup was in flight when the node began to drain: the session
/// is not taken (a drain walks the sessions it held when it began and would never tell this
/// one to move); the client is sent on with `Draining`, and the old node keeps it.
#[test]
fn a_resume_completed_after_the_drain_began_is_sent_on() {
    let mut a = Sim::node("a", 1, &[("b", 2)]);
    let b = Sim::node("b", 2, &[("a", 1)]);
    let c = b.register(v4(1, 1), vec![]);
    a.router.set_draining(true);
    let out = complete_resume(&a, &c, 2, Ok(Some((c.secret.verifier(), "b".into()))));
    assert!(out.cluster.is_empty(), "no Moved: {out:?}");
    assert_eq!(out.client.len(), 1);
    assert_eq!(out.client[0].to, c.addr);
    let Message::Error(e) = msg(&out.client[0]) else {
        panic!("{out:?}")
    };
    assert_eq!((e.rid, e.code), (2, ErrorCode::Draining));
    assert!(!a.router.is_local(&c.uuid));
    assert!(a.presence_ops().is_empty());
    assert!(b.router.is_local(&c.uuid));
}

#[test]
fn a_resume_the_directory_cannot_vouch_for_is_refused() {
    let a = Sim::node("a", 1, &[("b", 2)]);
    let b = Sim::node("b", 2, &[]);
    let c = b.register(v4(1, 1), vec![]);
    let out = complete_resume(&a, &c, 2, Ok(Some(([0; 32], "b".into()))));
    assert_client(&out, &[(c.addr, error(2, ErrorCode::Unauthorized))]);
    let out = complete_resume(&a, &c, 3, Ok(None));
    assert_client(&out, &[(c.addr, error(3, ErrorCode::Unauthorized))]);
    // Redis unreachable: try again later, the session is not lost.
    let out = complete_resume(&a, &c, 4, Err(()));
    assert_client(&out, &[(c.addr, error(4, ErrorCode::RetryLater))]);
    assert_eq!(a.router.session_count(), 0);
}

#[test]
fn heartbeats_keep_a_session_and_silence_expires_it() {
    let mut sim = Sim::new();
    let mut c = sim.register(v4(1, 1), vec![]);
    let ttl = sim.cfg.session_ttl;
    for _ in 0..4 {
        sim.advance(ttl - Duration::from_secs(1));
        let rid = c.next_rid();
        sim.recv(c.addr, &c.heartbeat(rid));
        assert!(sim.sweep().0.is_empty());
    }
    // Expiry is checked on whole seconds: within a second after the TTL.
    sim.advance(ttl);
    assert!(sim.sweep().0.is_empty());
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.sweep().0, vec![c.uuid]);
    assert_eq!(sim.metric("sigrouter_sessions_expired_total"), 1.0);
    // The client is told to Resume (and, single node, to register anew).
    let rid = c.next_rid();
    let out = sim.recv(c.addr, &c.heartbeat(rid));
    assert_client(&out, &[(c.addr, error(rid, ErrorCode::UnknownSession))]);
}

#[test]
fn a_heartbeat_with_a_bad_mac_is_dropped_and_counted() {
    let sim = Sim::new();
    let c = sim.register(v4(1, 1), vec![]);
    let mut forged = c.heartbeat(2);
    let n = forged.len();
    forged[n - 1] ^= 1;
    assert!(sim.recv(c.addr, &forged).is_empty());
    assert_eq!(
        sim.metric("sigrouter_dropped_total{reason=\"bad_mac\"}"),
        1.0
    );
}

#[test]
fn a_nat_rebinding_moves_the_address_only_with_a_newer_request_id() {
    let sim = Sim::new();
    let c = sim.register(v4(1, 1), vec![]);
    sim.recv(c.addr, &c.heartbeat(5));
    // An older request id from elsewhere (a replay from a spoofed source): answered at the
    // session's address, which does not move.
    let spoofed = v4(66, 6);
    let out = sim.recv(spoofed, &c.heartbeat(4));
    let ack = |rid, at| {
        Message::HeartbeatAck(HeartbeatAck {
            rid,
            observed: Addr(at),
        })
    };
    assert_client(&out, &[(c.addr, c.expect(&ack(4, c.addr)))]);
    // A newer one from a new address is a rebinding.
    let rebound = v4(1, 2);
    let out = sim.recv(rebound, &c.heartbeat(6));
    assert_client(&out, &[(rebound, c.expect(&ack(6, rebound)))]);
    assert_eq!(sim.metric("sigrouter_rebinds_total"), 1.0);
}

#[test]
fn a_request_from_an_unknown_session_is_told_to_resume_without_amplifying() {
    let sim = Sim::new();
    let other = Sim::new();
    let c = other.register(v4(1, 1), vec![]);
    let req = c.heartbeat(2);
    let out = sim.recv(c.addr, &req);
    assert_client(&out, &[(c.addr, error(2, ErrorCode::UnknownSession))]);
    assert!(out.client[0].bytes.len() < req.len());
    // A PushAck from an unknown session gets nothing.
    assert!(sim.recv(c.addr, &c.push_ack(1)).is_empty());
}

#[test]
fn bye_ends_the_session() {
    let mut sim = Sim::node("a", 1, &[]);
    let c = sim.register(v4(1, 1), vec![]);
    sim.presence_ops();
    let out = sim.recv(c.addr, &c.bye(2));
    assert_client(
        &out,
        &[(c.addr, c.expect(&Message::Ack(proto::Ack { rid: 2 })))],
    );
    assert!(!sim.router.is_local(&c.uuid));
    assert!(matches!(sim.presence_ops().as_slice(), [PresenceOp::Del(u)] if *u == c.uuid));
}
