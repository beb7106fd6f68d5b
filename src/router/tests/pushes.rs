//! Server pushes: the retransmission schedule, the give-up, acknowledgements, and Migrate
//! during a drain.

use std::net::SocketAddr;
use std::time::Duration;

use sigrouter_proto::{self as proto, Addr, ErrorCode, Message, Migrate};

use super::connect::{pair, start_local};
use super::*;

/// Ticks at each of `offsets_ms` after the start and returns where anything was sent.
fn retransmissions(sim: &mut Sim, offsets_ms: &[u64]) -> Vec<(u64, Vec<SocketAddr>)> {
    let start = sim.now;
    offsets_ms
        .iter()
        .map(|&ms| {
            sim.now = start + Duration::from_millis(ms);
            let out = sim.tick();
            (ms, out.client.iter().map(|t| t.to).collect())
        })
        .collect()
}

#[test]
fn a_push_is_retransmitted_with_a_doubling_timeout_until_its_deadline() {
    let mut sim = Sim::with(Config {
        connect_timeout: Duration::from_secs(60),
        ..config()
    });
    let (mut a, b) = pair(&sim);
    let (_, push, _) = start_local(&sim, &mut a, &b, b"x");
    let first = sim.recv(a.addr, &a.connect(a.rid, b.uuid, b"x"));
    assert!(first.is_empty());
    // 250 ms initial timeout, doubling; the deadline (8 s) ends the last wait.
    let sent = retransmissions(
        &mut sim,
        &[249, 250, 749, 750, 1750, 3750, 7750, 7999, 8000, 20000],
    );
    let at = |ms: u64| sent.iter().find(|(t, _)| *t == ms).unwrap().1.clone();
    for ms in [249, 749, 7999, 8000, 20000] {
        assert!(at(ms).is_empty(), "nothing due at {ms} ms: {sent:?}");
    }
    for ms in [250, 750, 1750, 3750, 7750] {
        assert_eq!(
            at(ms),
            vec![b.addr],
            "a retransmission at {ms} ms: {sent:?}"
        );
    }
    assert_eq!(sim.metric("sigrouter_push_retransmits_total"), 5.0);
    assert_eq!(sim.metric("sigrouter_pushes_expired_total"), 1.0);
    // Given up: a late PushAck is harmless.
    assert!(sim.recv(b.addr, &b.push_ack(push)).is_empty());
}

#[test]
fn a_retransmitted_push_is_the_same_datagram_and_follows_a_rebinding() {
    let mut sim = Sim::new();
    let (mut a, b) = pair(&sim);
    let rid = a.next_rid();
    let first = sim.recv(a.addr, &a.connect(rid, b.uuid, b"x"));
    let original = only_client(&first).bytes.to_vec();
    // b's NAT rebinds: a newer request from a new port moves its address.
    let moved = v6(2, 2999);
    sim.recv(moved, &b.heartbeat(50));
    sim.advance(Duration::from_millis(250));
    let out = sim.tick();
    assert_client(&out, &[(moved, original)]);
}

#[test]
fn an_acknowledged_push_is_not_retransmitted() {
    let mut sim = Sim::new();
    let (mut a, b) = pair(&sim);
    let (_, push, _) = start_local(&sim, &mut a, &b, b"");
    sim.recv(b.addr, &b.push_ack(push));
    sim.advance(Duration::from_secs(1));
    assert!(sim.tick().is_empty());
}

#[test]
fn a_push_ack_needs_a_valid_mac() {
    let mut sim = Sim::new();
    let (mut a, b) = pair(&sim);
    let (_, push, _) = start_local(&sim, &mut a, &b, b"");
    let mut forged = b.push_ack(push);
    let n = forged.len();
    forged[n - 1] ^= 1;
    assert!(sim.recv(b.addr, &forged).is_empty());
    sim.advance(Duration::from_millis(250));
    assert_eq!(sim.tick().client.len(), 1, "still retransmitted");
}

#[test]
fn a_drain_migrates_every_session_and_lets_go_of_those_that_acknowledge() {
    let mut sim = Sim::node("a", 1, &[("b", 2)]);
    let (a, b) = pair(&sim);
    sim.router.set_draining(true);
    let to: SocketAddr = "198.51.100.2:7400".parse().unwrap();
    let mut out = Outbox::default();
    assert_eq!(sim.router.migrate_all(sim.now, || Some(to), &mut out), 2);
    assert_eq!(out.client.len(), 2);
    for c in [&a, &b] {
        let t = out
            .client
            .iter()
            .find(|t| t.to == c.addr)
            .expect("a Migrate each");
        let Message::Migrate(m) = msg(t) else {
            panic!()
        };
        let want = Message::Migrate(Migrate {
            push: m.push,
            to: Some(Addr(to)),
        });
        assert_eq!(t.bytes, c.expect(&want));
        if c.uuid == a.uuid {
            sim.recv(c.addr, &c.push_ack(m.push));
        }
    }
    assert_eq!(sim.metric("sigrouter_migrates_total"), 2.0);
    // a acknowledged: gone from here (its new node publishes its presence).
    assert!(!sim.router.is_local(&a.uuid));
    assert!(sim.router.is_local(&b.uuid));
    assert!(sim
        .presence_ops()
        .iter()
        .all(|op| !matches!(op, PresenceOp::Del(_))));
    // b did not: its Migrate is retransmitted; a Resume here is refused with Draining.
    sim.advance(Duration::from_millis(250));
    assert_eq!(
        sim.tick().client.iter().map(|t| t.to).collect::<Vec<_>>(),
        vec![b.addr]
    );
    let out = sim.recv(b.addr, &resume_datagram(&b, 9, b.secret));
    let refused = Message::Error(sigrouter_proto::ErrorMsg {
        rid: 9,
        code: ErrorCode::Draining,
        to: Some(Addr(to)),
    });
    assert_client(&out, &[(b.addr, proto::encode(&refused, None).unwrap())]);
}

#[test]
fn a_session_told_again_gets_the_same_migrate() {
    let mut sim = Sim::node("a", 1, &[("b", 2)]);
    let c = sim.register(v4(1, 1), vec![]);
    sim.router.set_draining(true);
    let to: SocketAddr = "198.51.100.2:7400".parse().unwrap();
    let mut out = Outbox::default();
    sim.router.migrate_all(sim.now, || Some(to), &mut out);
    // The Migrate, and b is told the client is coming.
    assert_eq!(out.client.len(), 1);
    assert_eq!(out.client[0].to, c.addr);
    assert_eq!(out.cluster.len(), 1);
    assert_eq!(out.cluster[0].to, node_addr(2));
    let first = out.client[0].bytes.clone();
    let Message::Migrate(m) = proto::decode(&first).unwrap() else {
        panic!()
    };
    // Told again while it is still retransmitted: nothing more is sent.
    let mut again = Outbox::default();
    let other: SocketAddr = "198.51.100.3:7400".parse().unwrap();
    assert_eq!(
        sim.router.migrate_all(sim.now, || Some(other), &mut again),
        0
    );
    assert!(again.is_empty());
    // Given up unacknowledged, then told again: the same push id and target, byte for byte.
    sim.advance(sim.cfg.push_deadline);
    sim.tick();
    let mut again = Outbox::default();
    assert_eq!(
        sim.router.migrate_all(sim.now, || Some(other), &mut again),
        1
    );
    assert_eq!(again.client.len(), 1);
    assert_eq!(again.client[0].bytes, first);
    assert_eq!(again.cluster.len(), 1, "b is told again");
    assert_eq!(again.cluster[0].to, node_addr(2));
    assert_eq!(m.to, Some(Addr(to)));
}

#[test]
fn a_register_refused_while_draining_names_an_active_node() {
    let sim = Sim::node("a", 1, &[("b", 2)]);
    sim.set_table(&[("b", 2)], &[("a", 1)]);
    sim.router.set_draining(true);
    let src = v4(1, 1);
    let out = sim.recv(src, &register_datagram(3, vec![]));
    let want = Message::Error(sigrouter_proto::ErrorMsg {
        rid: 3,
        code: ErrorCode::Draining,
        to: Some(Addr("198.51.100.2:7400".parse().unwrap())),
    });
    assert_client(
        &out,
        &[(src, sigrouter_proto::encode(&want, None).unwrap())],
    );
    // With no active node known, it still refuses, without an address.
    let lone = Sim::node("z", 9, &[]);
    lone.router.set_draining(true);
    let out = lone.recv(src, &register_datagram(4, vec![]));
    assert_client(&out, &[(src, error(4, ErrorCode::Draining))]);
}

#[test]
fn push_ids_do_not_repeat_across_nodes() {
    // Behind a load balancer every node's Migrate names the same address, so a client moved
    // from node to node gets Migrates that differ only by push id; a client drops a push whose
    // id and body it saw in the last 30 s. Each node (each life of a node) numbers a session's
    // pushes from its own starting point, so the second node's Migrate is not a repeat.
    let lb: SocketAddr = "198.51.100.9:7400".parse().unwrap();
    let mut ids = Vec::new();
    for (id, n) in [("a", 1), ("b", 2), ("b", 2)] {
        let sim = Sim::node(id, n, &[("c", 3)]);
        sim.register(v4(1, 1), vec![]);
        sim.router.set_draining(true);
        let mut out = Outbox::default();
        sim.router.migrate_all(sim.now, || Some(lb), &mut out);
        let Message::Migrate(m) = msg(only_client(&out)) else {
            panic!()
        };
        assert_eq!(m.to, Some(Addr(lb)));
        ids.push(m.push);
    }
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "{ids:?}"
    );
}
