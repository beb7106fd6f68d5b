//! Hostile traffic: floods of Registers from one IPv6 /64 or from many spoofed sources, clients
//! behind a UDP proxy, Resume of unknown UUIDs, sessions hoarding lookups, STUN floods.

use std::net::Ipv4Addr;
use std::time::Duration;

use sigrouter_proto::{ErrorCode, Message, Secret};
use uuid::Uuid;

use super::*;
use crate::router::state::MAX_JOBS_PER_SESSION;

fn registered(out: &Outbox) -> bool {
    out.client.len() == 1 && matches!(msg(&out.client[0]), Message::Registered(_))
}

#[test]
fn registers_from_one_ipv6_slash_64_share_one_limit() {
    let sim = Sim::with(Config {
        register_rate: 5,
        register_burst: 20,
        ..config()
    });
    let created = (0..1000u16)
        .filter(|&i| registered(&sim.recv(v6(i + 1, 40000 + i), &register_datagram(1, vec![]))))
        .count();
    assert_eq!(created, 20, "the burst of one /64, not one per address");
    assert_eq!(sim.router.session_count(), 20);
    // Another /64 is not affected.
    let other = SocketAddr::new("2001:db8:0:1::1".parse().unwrap(), 1);
    assert!(registered(&sim.recv(other, &register_datagram(1, vec![]))));
}

#[test]
fn the_prefix_length_is_configurable() {
    let sim = Sim::with(Config {
        register_rate: 1,
        register_burst: 1,
        limit_prefix_v4: 24,
        ..config()
    });
    assert!(registered(
        &sim.recv(v4(1, 1), &register_datagram(1, vec![]))
    ));
    let out = sim.recv(v4(2, 1), &register_datagram(1, vec![]));
    assert_client(&out, &[(v4(2, 1), error(1, ErrorCode::RateLimited))]);
}

#[test]
fn spoofed_sources_meet_the_node_wide_budget_of_new_sessions() {
    // Without address validation (with it, see `validation`: forged sources create fewer
    // sessions, or none).
    let sim = Sim::with(Config {
        new_session_rate: 100,
        new_session_burst: 100,
        address_validation: crate::config::AddressValidation::Never,
        ..config()
    });
    let created = (0..1000u32)
        .filter(|&i| {
            let src = SocketAddr::new(Ipv4Addr::from(0x0a00_0000 + i).into(), 5000);
            registered(&sim.recv(src, &register_datagram(1, vec![])))
        })
        .count();
    assert_eq!(created, 100);
    assert_eq!(sim.router.session_count(), 100);
}

#[test]
fn behind_a_trusted_proxy_every_client_has_its_own_limit() {
    let proxy = v4(50, 0).ip();
    let cfg = |trusted: bool| Config {
        register_rate: 1,
        register_burst: 2,
        trusted_proxies: if trusted {
            vec![ipnet::IpNet::new(proxy, 32).unwrap()]
        } else {
            vec![]
        },
        ..config()
    };
    let count = |sim: &Sim| {
        (0..50u16)
            .filter(|&p| registered(&sim.recv(v4(50, 10000 + p), &register_datagram(1, vec![]))))
            .count()
    };
    assert_eq!(
        count(&Sim::with(cfg(false))),
        2,
        "untrusted: the proxy is one source"
    );
    let trusted = Sim::with(cfg(true));
    assert_eq!(count(&trusted), 50, "trusted: one limit per client");
    // Each client (IP, port) still has its own limit.
    let src = v4(50, 10000);
    let again = |rid| trusted.recv(src, &register_datagram(rid, vec![]));
    assert!(registered(&again(2)));
    assert_client(&again(3), &[(src, error(3, ErrorCode::RateLimited))]);
}

#[test]
fn a_resume_of_an_unknown_uuid_costs_one_lookup() {
    let sim = Sim::node("a", 1, &[]);
    let ghost = Client {
        uuid: Uuid::from_u128(0xdead),
        secret: Secret([9; 32]),
        addr: v4(66, 1),
        local: vec![],
        rid: 0,
    };
    let req = resume_datagram(&ghost, 1, ghost.secret);
    let out = sim.recv(ghost.addr, &req);
    let Job::Resume { msg: m, .. } = only_job(&out).clone() else {
        panic!()
    };
    let mut out = Outbox::default();
    sim.router
        .complete_resume(sim.now, ghost.addr, req.len(), m, Ok(None), &mut out);
    assert_client(&out, &[(ghost.addr, error(1, ErrorCode::Unauthorized))]);
    // Asked again at once: refused from memory, no second lookup.
    let out = sim.recv(ghost.addr, &resume_datagram(&ghost, 2, ghost.secret));
    assert_client(&out, &[(ghost.addr, error(2, ErrorCode::Unauthorized))]);
}

#[test]
fn one_session_cannot_hold_more_than_its_share_of_lookups() {
    let sim = Sim::node("a", 1, &[]);
    let mut a = sim.register(v4(1, 1), vec![]);
    let max = u128::from(MAX_JOBS_PER_SESSION);
    for i in 0..max {
        let rid = a.next_rid();
        let out = sim.recv(a.addr, &a.query(rid, vec![Uuid::from_u128(100 + i)]));
        assert!(matches!(only_job(&out), Job::Query { .. }));
    }
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.query(rid, vec![Uuid::from_u128(1)]));
    assert_client(&out, &[(a.addr, a.error(rid, ErrorCode::RetryLater))]);
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.connect(rid, Uuid::from_u128(2), b""));
    assert_eq!(out.client.len(), 1, "{:?}", decoded(&out));
    assert!(out.jobs.is_empty());
    // A finished lookup gives its slot back.
    let mut done = Outbox::default();
    sim.router
        .complete_query(a.uuid, 2, Some(vec![false]), &mut done);
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.query(rid, vec![Uuid::from_u128(3)]));
    assert!(matches!(only_job(&out), Job::Query { .. }));
}

#[test]
fn stun_answers_are_rate_limited_per_source_prefix() {
    let sim = Sim::with(Config {
        stun_rate: 1,
        stun_burst: 3,
        ..config()
    });
    // A bare Binding request: type 0x0001, length 0, magic cookie, transaction id.
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    req.extend_from_slice(&[7; 12]);
    let answered = (0..10u16)
        .filter(|&p| sim.recv(v6(1, 1000 + p), &req).client.len() == 1)
        .count();
    assert_eq!(answered, 3);
    assert_eq!(
        sim.metric("sigrouter_dropped_total{reason=\"rate_limited\"}"),
        7.0
    );
    for t in sim.recv(v4(9, 1), &req).client {
        assert!(t.bytes.len() <= req.len() + crate::stun::MAX_GROWTH);
    }
}

#[test]
fn only_new_requests_are_rate_limited_and_a_refused_one_was_not_carried_out() {
    let sim = Sim::with(Config {
        session_rate: 1,
        session_burst: 2,
        ..config()
    });
    let mut a = sim.register(v4(1, 1), vec![]);
    let b = sim.register(v4(2, 2), vec![]);
    // One cell: a Connect, pending while b decides.
    let rid = a.next_rid();
    assert_eq!(
        sim.recv(a.addr, &a.connect(rid, b.uuid, b"")).client.len(),
        1
    );
    // Its retransmissions cost nothing and are never refused.
    for _ in 0..10 {
        assert!(sim.recv(a.addr, &a.connect(rid, b.uuid, b"")).is_empty());
    }
    // The second cell, then a refusal: a new request beyond the burst.
    let r2 = a.next_rid();
    assert_eq!(sim.recv(a.addr, &a.heartbeat(r2)).client.len(), 1);
    let r3 = a.next_rid();
    let out = sim.recv(a.addr, &a.connect(r3, b.uuid, b""));
    assert_client(&out, &[(a.addr, error(r3, ErrorCode::RateLimited))]);
    assert_eq!(
        sim.metric("sigrouter_rate_limited_total{limit=\"session\"}"),
        1.0
    );
    // Not carried out: no second Incoming, and the id is still free once a cell is back.
    assert_eq!(sim.metric("sigrouter_pushes_total"), 1.0);
    let mut sim = sim;
    sim.advance(Duration::from_secs(1));
    let out = sim.recv(a.addr, &a.connect(r3, b.uuid, b""));
    assert_eq!(out.client.len(), 1, "carried out now: {:?}", decoded(&out));
    assert_eq!(out.client[0].to, b.addr);
}
