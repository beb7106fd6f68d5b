//! Connections survive a move of either end: on one node and across nodes, after a Resume
//! elsewhere or a Migrate during a drain.

use sigrouter_proto::{self as proto, Ack, Message, SignalPush};
use uuid::Uuid;

use super::connect::{pair, start_local};
use super::*;

/// `c` resumes (from a new port) on `sim`, moving from node `old`; returns the new node's
/// Moved datagram for the old node.
fn resume_at(sim: &Sim, c: &mut Client, old: &str) -> Transmit {
    c.addr = SocketAddr::new(c.addr.ip(), c.addr.port() + 1);
    let rid = c.next_rid();
    let req = resume_datagram(c, rid, c.secret);
    let Ok(Message::Resume(m)) = proto::decode(&req) else {
        unreachable!()
    };
    let mut out = Outbox::default();
    let found = Ok(Some((c.secret.verifier(), old.into())));
    sim.router
        .complete_resume(sim.now, c.addr, req.len(), m, found, &mut out);
    assert_eq!(out.client.len(), 1, "Registered");
    assert_eq!(out.cluster.len(), 1, "Moved");
    assert!(matches!(
        open_envelope(&out.cluster[0]).body,
        wire::Body::Moved { .. }
    ));
    out.cluster[0].clone()
}

/// Delivers node datagrams between simulated nodes until none are left; returns what the
/// nodes sent their clients.
fn settle(nodes: &[(&Sim, u8)], mut queue: Vec<(u8, Transmit)>) -> Vec<Transmit> {
    let mut to_clients = Vec::new();
    let mut hops = 0;
    while let Some((from, t)) = queue.pop() {
        hops += 1;
        assert!(hops < 100, "node datagrams ping-pong");
        let (sim, n) = nodes
            .iter()
            .find(|(_, n)| node_addr(*n) == t.to)
            .expect("a known node");
        let out = sim.recv_node(&t, node_addr(from));
        to_clients.extend(out.client);
        queue.extend(out.cluster.into_iter().map(|t| (*n, t)));
    }
    to_clients
}

/// `from` (on `sim`, node `n`) signals on `conn`; checks the exact SignalPush `to` receives and
/// the Ack `from` gets.
fn signal_reaches(nodes: &[(&Sim, u8)], n: u8, from: &mut Client, to: &Client, conn: Uuid) {
    let sim = nodes.iter().find(|(_, m)| *m == n).unwrap().0;
    let rid = from.next_rid();
    let out = sim.recv(from.addr, &from.signal(rid, conn, b"hi"));
    let mut got: Vec<Transmit> = out.client.clone();
    got.extend(settle(
        nodes,
        out.cluster.into_iter().map(|t| (n, t)).collect(),
    ));
    let push = got
        .iter()
        .find(|t| t.to == to.addr)
        .unwrap_or_else(|| panic!("no SignalPush for {}: {got:?}", to.addr));
    let Message::SignalPush(p) = msg(push) else {
        panic!("{:?}", msg(push))
    };
    let want = Message::SignalPush(SignalPush {
        push: p.push,
        connection: conn,
        from: from.uuid,
        payload: b"hi".to_vec().into(),
    });
    assert_eq!(push.bytes, to.expect(&want));
    let ack = got.iter().find(|t| t.to == from.addr).expect("an Ack");
    assert_eq!(ack.bytes, from.expect(&Message::Ack(Ack { rid })));
}

/// An established connection between ca and cb, both on `sim`.
fn local_conn(sim: &Sim) -> (Client, Client, Uuid) {
    let (mut a, mut b) = pair(sim);
    let (conn, _, _) = start_local(sim, &mut a, &b, b"");
    let r = b.next_rid();
    sim.recv(b.addr, &b.accept(r, conn, b""));
    (a, b, conn)
}

#[test]
fn a_connection_on_one_node_follows_an_end_that_moves_to_another() {
    let a = Sim::node("a", 1, &[("b", 2)]);
    let b = Sim::node("b", 2, &[("a", 1)]);
    let (mut ca, mut cb, conn) = local_conn(&a);
    let moved = resume_at(&b, &mut cb, "a");
    let nodes = [(&a, 1), (&b, 2)];
    assert!(settle(&nodes, vec![(2, moved)]).is_empty());
    assert!(!a.router.is_local(&cb.uuid));
    signal_reaches(&nodes, 1, &mut ca, &cb, conn);
    signal_reaches(&nodes, 2, &mut cb, &ca, conn);
}

#[test]
fn a_connection_across_nodes_follows_an_end_to_a_third_node() {
    let a = Sim::node("a", 1, &[("b", 2), ("c", 3)]);
    let b = Sim::node("b", 2, &[("a", 1), ("c", 3)]);
    let c = Sim::node("c", 3, &[("a", 1), ("b", 2)]);
    let nodes = [(&a, 1), (&b, 2), (&c, 3)];
    let (mut ca, mut cb, conn) = cross_conn(&a, &b);
    let moved = resume_at(&c, &mut cb, "b");
    assert!(settle(&nodes, vec![(3, moved)]).is_empty());
    signal_reaches(&nodes, 1, &mut ca, &cb, conn);
    signal_reaches(&nodes, 3, &mut cb, &ca, conn);
}

#[test]
fn a_connection_across_nodes_becomes_local_when_an_end_joins_the_other() {
    let a = Sim::node("a", 1, &[("b", 2)]);
    let b = Sim::node("b", 2, &[("a", 1)]);
    let nodes = [(&a, 1), (&b, 2)];
    let (mut ca, mut cb, conn) = cross_conn(&a, &b);
    let moved = resume_at(&a, &mut cb, "b");
    assert!(settle(&nodes, vec![(1, moved)]).is_empty());
    // Both ends on node a now: no node datagram at all.
    let rid = ca.next_rid();
    let out = a.recv(ca.addr, &ca.signal(rid, conn, b"hi"));
    assert!(out.cluster.is_empty(), "{out:?}");
    assert_eq!(out.client.len(), 2);
    signal_reaches(&nodes, 1, &mut cb, &ca, conn);
}

#[test]
fn a_connection_follows_a_client_that_acknowledged_a_migrate() {
    let a = Sim::node("a", 1, &[("b", 2)]);
    let b = Sim::node("b", 2, &[("a", 1)]);
    let nodes = [(&a, 1), (&b, 2)];
    let (mut ca, mut cb, conn) = local_conn(&a);
    a.router.set_draining(true);
    let mut out = Outbox::default();
    a.router.migrate_all(a.now, || Some(node_addr(2)), &mut out);
    let t = out.client.iter().find(|t| t.to == cb.addr).unwrap();
    let Message::Migrate(m) = msg(t) else {
        panic!()
    };
    a.recv(cb.addr, &cb.push_ack(m.push));
    assert!(!a.router.is_local(&cb.uuid), "let go at once");
    let moved = resume_at(&b, &mut cb, "a");
    assert!(settle(&nodes, vec![(2, moved)]).is_empty());
    signal_reaches(&nodes, 1, &mut ca, &cb, conn);
    signal_reaches(&nodes, 2, &mut cb, &ca, conn);
}

#[test]
fn a_signal_sent_to_the_old_node_of_a_moved_end_is_passed_on() {
    let a = Sim::node("a", 1, &[("b", 2), ("c", 3)]);
    let b = Sim::node("b", 2, &[("a", 1), ("c", 3)]);
    let c = Sim::node("c", 3, &[("a", 1), ("b", 2)]);
    let nodes = [(&a, 1), (&b, 2), (&c, 3)];
    let (mut ca, mut cb, conn) = cross_conn(&a, &b);
    let moved = resume_at(&c, &mut cb, "b");
    // Node b hands over to c and tells a; a's Signal crosses the Rehome on its way to b.
    let out = b.recv_node(&moved, node_addr(3));
    let rid = ca.next_rid();
    let early = a.recv(ca.addr, &ca.signal(rid, conn, b"hi"));
    let to_b = early.cluster[0].clone();
    assert_eq!(to_b.to, node_addr(2));
    let mut queue: Vec<(u8, Transmit)> = out.cluster.into_iter().map(|t| (2, t)).collect();
    queue.insert(0, (1, to_b));
    let got = settle(&nodes, queue);
    let push = got
        .iter()
        .find(|t| t.to == cb.addr)
        .expect("passed on to c");
    assert!(matches!(msg(push), Message::SignalPush(_)));
    assert!(got.iter().any(|t| t.to == ca.addr), "the Ack");
    let _ = &mut cb;
}

/// An established connection between ca on `a` and cb on `b`.
fn cross_conn(a: &Sim, b: &Sim) -> (Client, Client, Uuid) {
    let mut ca = a.register(v4(1, 1000), vec![]);
    let mut cb = b.register(v6(2, 2000), vec![]);
    let rid = ca.next_rid();
    let out = a.recv(ca.addr, &ca.connect(rid, cb.uuid, b""));
    let Job::Connect(l) = only_job(&out).clone() else {
        panic!()
    };
    let conn = l.conn;
    let mut out = Outbox::default();
    a.router
        .complete_connect(a.now, l, Ok(a.cluster().node("b").unwrap()), &mut out);
    let nodes = [(a, 1), (b, 2)];
    settle(&nodes, out.cluster.into_iter().map(|t| (1, t)).collect());
    let r = cb.next_rid();
    let out = b.recv(cb.addr, &cb.accept(r, conn, b""));
    settle(&nodes, out.cluster.into_iter().map(|t| (2, t)).collect());
    let _ = &mut ca;
    (ca, cb, conn)
}

#[test]
fn resumes_are_counted_by_cause_where_the_clients_arrive() {
    let a = Sim::node("a", 1, &[("b", 2), ("c", 3)]);
    a.set_table(&[("a", 1), ("b", 2)], &[("c", 3)]);
    let b = Sim::node("b", 2, &[]);
    let c = Sim::node("c", 3, &[]);
    let mut from_b = b.register(v4(1, 1), vec![]);
    let mut from_c = c.register(v4(2, 2), vec![]);
    resume_at(&a, &mut from_b, "b");
    resume_at(&a, &mut from_c, "c");
    let mut local = a.register(v4(3, 3), vec![]);
    let rid = local.next_rid();
    a.recv(local.addr, &resume_datagram(&local, rid, local.secret));
    for (cause, n) in [("migrate", 1.0), ("failover", 1.0), ("local", 1.0)] {
        let m = format!("sigrouter_sessions_resumed_total{{cause=\"{cause}\"}}");
        assert_eq!(a.metric(&m), n, "{cause}");
    }
}
