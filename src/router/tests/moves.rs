//! Connections survive a move of either end: on one node and across nodes, after a Resume
//! elsewhere or a Migrate during a drain.

use sigrouter_proto::{self as proto, Ack, ErrorCode, Message, SignalPush};
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
    // Its connection waits here for b to ask: the drain must not end yet.
    assert_eq!(a.router.awaiting_handover(a.now), 1);
    // Not for ever: a client that has not resumed anywhere after HANDOVER_WAIT is not waited
    // for.
    let later = a.now + crate::router::HANDOVER_WAIT + Duration::from_millis(1);
    assert_eq!(a.router.awaiting_handover(later), 0);
    let moved = resume_at(&b, &mut cb, "a");
    assert!(settle(&nodes, vec![(2, moved)]).is_empty());
    assert_eq!(a.router.awaiting_handover(a.now), 0);
    signal_reaches(&nodes, 1, &mut ca, &cb, conn);
    signal_reaches(&nodes, 2, &mut cb, &ca, conn);
}

/// Migrates every client of draining node `sim` to node `to`; returns each client's Migrate
/// push id, in the order of `clients`.
fn migrate(sim: &Sim, to: u8, clients: &[&Client]) -> Vec<u64> {
    sim.router.set_draining(true);
    let mut out = Outbox::default();
    sim.router
        .migrate_all(sim.now, || Some(node_addr(to)), &mut out);
    clients
        .iter()
        .map(|c| {
            let t = out.client.iter().find(|t| t.to == c.addr).unwrap();
            let Message::Migrate(m) = msg(t) else {
                panic!()
            };
            m.push
        })
        .collect()
}

/// `c` acknowledges its Migrate: the draining node lets it go.
fn ack_migrate(sim: &Sim, c: &Client, push: u64) {
    sim.recv(c.addr, &c.push_ack(push));
    assert!(!sim.router.is_local(&c.uuid));
}

#[test]
fn a_connection_on_a_draining_node_survives_both_ends_moving_away() {
    // Both ends acknowledge the Migrate, then resume on two other nodes, in either order, or
    // on the same node.
    for (to_a, to_b, a_first) in [(2, 3, true), (2, 3, false), (2, 2, true)] {
        let a = Sim::node("a", 1, &[("b", 2), ("c", 3)]);
        let b = Sim::node("b", 2, &[("a", 1), ("c", 3)]);
        let c = Sim::node("c", 3, &[("a", 1), ("b", 2)]);
        let nodes = [(&a, 1), (&b, 2), (&c, 3)];
        let sim = |n: u8| nodes.iter().find(|(_, m)| *m == n).unwrap().0;
        let (mut ca, mut cb, conn) = local_conn(&a);
        let pushes = migrate(&a, 2, &[&ca, &cb]);
        ack_migrate(&a, &cb, pushes[1]);
        if a_first && to_a != to_b {
            // b is between nodes: a's Signal is refused for now (retry-later), not for good.
            let rid = ca.next_rid();
            let out = a.recv(ca.addr, &ca.signal(rid, conn, b"early"));
            assert_client(&out, &[(ca.addr, ca.error(rid, ErrorCode::RetryLater))]);
        }
        ack_migrate(&a, &ca, pushes[0]);
        let mut moves = vec![(to_a, true), (to_b, false)];
        if !a_first {
            moves.reverse();
        }
        for (i, (to, is_a)) in moves.into_iter().enumerate() {
            let client = if is_a { &mut ca } else { &mut cb };
            let moved = resume_at(sim(to), client, "a");
            assert!(settle(&nodes, vec![(to, moved)]).is_empty());
            if i == 0 && to_a != to_b {
                // One end arrived, the other is still between nodes: a Signal from the one
                // that arrived is refused for now (retry-later), not for good.
                let (from, n) = if is_a {
                    (&mut ca, to_a)
                } else {
                    (&mut cb, to_b)
                };
                let rid = from.next_rid();
                let out = sim(n).recv(from.addr, &from.signal(rid, conn, b"early"));
                let from_addr = from.addr;
                let got = settle(&nodes, out.cluster.into_iter().map(|t| (n, t)).collect());
                assert_eq!(got.len(), 1, "{got:?}");
                assert_eq!(got[0].to, from_addr);
                assert_eq!(got[0].bytes, from.error(rid, ErrorCode::RetryLater));
            }
        }
        let case = format!("a to {to_a}, b to {to_b}, a first: {a_first}");
        assert!(a.router.session_ids().is_empty(), "{case}");
        signal_reaches(&nodes, to_a, &mut ca, &cb, conn);
        signal_reaches(&nodes, to_b, &mut cb, &ca, conn);
    }
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
    let a = Sim::node("a", 1, &[("b", 2), ("c", 3), ("d", 4)]);
    // a's table: b and d active, c draining.
    a.set_table(&[("a", 1), ("b", 2), ("d", 4)], &[("c", 3)]);
    let b = Sim::node("b", 2, &[]);
    let c = Sim::node("c", 3, &[]);
    let d = Sim::node("d", 4, &[]);
    let mut from_b = b.register(v4(1, 1), vec![]);
    let mut from_c = c.register(v4(2, 2), vec![]);
    let mut from_d = d.register(v4(4, 4), vec![]);
    resume_at(&a, &mut from_b, "b");
    resume_at(&a, &mut from_c, "c");
    resume_at(&a, &mut from_d, "d");
    let mut local = a.register(v4(3, 3), vec![]);
    let rid = local.next_rid();
    a.recv(local.addr, &resume_datagram(&local, rid, local.secret));
    let counts = || {
        ["migrate", "failover", "local"].map(|cause| {
            a.metric(&format!(
                "sigrouter_sessions_resumed_total{{cause=\"{cause}\"}}"
            ))
        })
    };
    // From c (draining in a's table): a migrate at once. From b and d (active in a's table):
    // not known yet, counted once a table read after them is stored.
    assert_eq!(counts(), [1.0, 0.0, 1.0]);
    // A read that started before the resumes says nothing about them.
    let before = Instant::now() - Duration::from_secs(1);
    a.cluster().count_unsure_resumes(before);
    assert_eq!(counts(), [1.0, 0.0, 1.0]);
    // The next read shows d draining (its drain began just before it told its clients to
    // move) and b still active (b failed; the client re-homed by itself).
    a.set_table(&[("a", 1), ("b", 2)], &[("c", 3), ("d", 4)]);
    a.cluster().count_unsure_resumes(Instant::now());
    assert_eq!(counts(), [2.0, 1.0, 1.0]);
}

/// With its Migrates a draining node sends the node it sends the clients to their verifiers
/// (Expect): that node takes their Resumes at once, without a directory lookup, counts them
/// as migrations and tells the old node. A Resume with a wrong secret is not taken that way
/// (it goes to the directory), and does not use up the client's entry.
#[test]
fn a_node_told_a_client_is_coming_takes_its_resume_without_a_lookup() {
    let a = Sim::node("a", 1, &[("b", 2)]);
    let b = Sim::node("b", 2, &[("a", 1)]);
    let mut c1 = b.register(v4(1, 1000), vec![]);
    let mut c2 = b.register(v4(2, 2000), vec![]);
    for n in [&a, &b] {
        n.set_table(&[("a", 1)], &[("b", 2)]);
    }
    b.router.set_draining(true);
    let public_a = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 7400);
    let mut out = Outbox::default();
    b.router.migrate_all(b.now, || Some(public_a), &mut out);
    assert_eq!(out.client.len(), 2, "two Migrates");
    assert_eq!(out.cluster.len(), 1, "one Expect for both: {out:?}");
    assert_eq!(out.cluster[0].to, node_addr(1));
    let wire::Body::Expect { sessions } = open_envelope(&out.cluster[0]).body else {
        panic!("{out:?}")
    };
    let mut named: Vec<Uuid> = sessions.iter().map(|e| e.uuid).collect();
    named.sort();
    let mut both = vec![c1.uuid, c2.uuid];
    both.sort();
    assert_eq!(named, both);
    assert!(a.recv_node(&out.cluster[0], node_addr(2)).is_empty());

    // c1 resumes at a from a new port: answered at once, the old node told.
    c1.addr = v4(1, 1001);
    let rid = c1.next_rid();
    let out = a.recv(c1.addr, &resume_datagram(&c1, rid, c1.secret));
    assert!(out.jobs.is_empty(), "no lookup: {out:?}");
    assert!(matches!(msg(&out.client[0]), Message::Registered(r) if r.uuid == c1.uuid));
    assert_eq!(out.cluster.len(), 1);
    assert_eq!(out.cluster[0].to, node_addr(2));
    assert!(
        matches!(open_envelope(&out.cluster[0]).body, wire::Body::Moved { uuid } if uuid == c1.uuid)
    );
    assert!(a.router.is_local(&c1.uuid));
    assert_eq!(
        a.metric("sigrouter_sessions_resumed_total{cause=\"migrate\"}"),
        1.0
    );

    // c2 with a wrong secret: not taken on b's word (the directory is asked).
    c2.addr = v4(2, 2001);
    let rid = c2.next_rid();
    let out = a.recv(c2.addr, &resume_datagram(&c2, rid, Secret([7; 32])));
    assert!(matches!(only_job(&out), Job::Resume { .. }));
    // With its own secret: taken at once.
    let rid = c2.next_rid();
    let out = a.recv(c2.addr, &resume_datagram(&c2, rid, c2.secret));
    assert!(out.jobs.is_empty(), "no lookup: {out:?}");
    assert!(matches!(msg(&out.client[0]), Message::Registered(r) if r.uuid == c2.uuid));
}
