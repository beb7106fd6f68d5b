//! Redis unavailable: presence lookups asked of the other nodes ("who holds X?"), Resume
//! verified by the holder (or by the derived secret when nobody holds the session), one-shot
//! datagrams refused when replayed, and membership carried between simulated nodes.

use std::time::Duration;

use sigrouter_proto::{ConnectFailed, ErrorCode, FailReason, Message, Payload, Secret};
use uuid::Uuid;

use super::*;
use crate::router::Waiter;

const DROPS: &str = "sigrouter_dropped_total{reason=\"cluster_auth\"}";

/// Nodes a, b, c; a client on each.
struct Three {
    a: Sim,
    b: Sim,
    c: Sim,
    ca: Client,
    cb: Client,
    cc: Client,
}

fn three() -> Three {
    let a = Sim::node("a", 1, &[("b", 2), ("c", 3)]);
    let b = Sim::node("b", 2, &[("a", 1), ("c", 3)]);
    let c = Sim::node("c", 3, &[("a", 1), ("b", 2)]);
    let ca = a.register(v4(1, 1000), vec![]);
    let cb = b.register(v4(2, 2000), vec![]);
    let cc = c.register(v4(3, 3000), vec![]);
    Three {
        a,
        b,
        c,
        ca,
        cb,
        cc,
    }
}

impl Three {
    fn sim(&self, addr: SocketAddr) -> &Sim {
        [&self.a, &self.b, &self.c]
            .into_iter()
            .find(|s| s.cluster().cfg.advertise == addr)
            .expect("a simulated node")
    }
}

/// `ca` connects to `to`; the lookup job finds Redis unavailable and asks the other nodes.
/// Returns the Connect's request id and the WhoHas datagrams.
fn connect_asking(t: &mut Three, to: Uuid) -> (u64, Vec<Transmit>) {
    let rid = t.ca.next_rid();
    let out = t.a.recv(t.ca.addr, &t.ca.connect(rid, to, b"hi"));
    let Job::Connect(l) = only_job(&out).clone() else {
        panic!("{out:?}")
    };
    let mut out = Outbox::default();
    t.a.router
        .ask_peers(t.a.now, vec![to], None, Waiter::Connect(l), &mut out);
    assert!(out.client.is_empty() && out.jobs.is_empty());
    (rid, out.cluster)
}

fn holds(t: &Transmit) -> (Vec<bool>, Option<bool>) {
    match open_envelope(t).body {
        wire::Body::Holds { held, verified } => (held, verified),
        other => panic!("{other:?}"),
    }
}

fn failed(c: &Client, rid: u64, reason: FailReason) -> Vec<u8> {
    c.expect(&Message::ConnectFailed(ConnectFailed {
        rid,
        reason,
        payload: Payload::new(),
    }))
}

#[test]
fn a_miss_asks_every_other_node_and_forwards_to_the_holder() {
    let mut t = three();
    let target = t.cb.uuid;
    let (_, asks) = connect_asking(&mut t, target);
    let mut to: Vec<SocketAddr> = asks.iter().map(|x| x.to).collect();
    to.sort();
    assert_eq!(to, vec![node_addr(2), node_addr(3)]);
    for w in &asks {
        let env = open_envelope(w);
        assert_eq!(
            env.body,
            wire::Body::WhoHas {
                uuids: vec![target],
                verifier: None
            }
        );
    }
    // c does not hold it; b does. Each answers from its own sessions, to the asker.
    let from_c = t.c.recv_node(
        asks.iter().find(|x| x.to == node_addr(3)).unwrap(),
        node_addr(1),
    );
    let reply_c = only_node(&from_c).clone();
    assert_eq!(
        (reply_c.to, holds(&reply_c)),
        (node_addr(1), (vec![false], None))
    );
    let from_b = t.b.recv_node(
        asks.iter().find(|x| x.to == node_addr(2)).unwrap(),
        node_addr(1),
    );
    let reply_b = only_node(&from_b).clone();
    assert_eq!(holds(&reply_b), (vec![true], None));
    assert_eq!(t.b.metric("sigrouter_peer_lookups_answered_total"), 1.0);
    assert!(t.a.recv_node(&reply_c, node_addr(3)).is_empty());
    // b's answer: the Incoming goes to b, and the answer is cached like a Redis answer.
    let out = t.a.recv_node(&reply_b, node_addr(2));
    let fwd = only_node(&out);
    assert_eq!(fwd.to, node_addr(2));
    assert!(matches!(open_envelope(fwd).body, wire::Body::Incoming { to, .. } if to == target));
    assert_eq!(
        t.a.cluster().cached_presence(&target, t.a.now),
        Some(Some("b".into()))
    );
    assert_eq!(
        t.a.metric("sigrouter_peer_lookups_total{outcome=\"found\"}"),
        1.0
    );
    // The Incoming reaches cb as usual.
    let out = t.b.recv_node(fwd, node_addr(1));
    assert!(matches!(msg(&out.client[0]), Message::Incoming(_)));
    assert_eq!(
        t.a.router.in_flight(),
        2,
        "the pending connection and its forward"
    );
}

#[test]
fn concurrent_connects_to_one_client_share_one_lookup() {
    let mut t = three();
    let target = t.cc.uuid;
    let (_, first) = connect_asking(&mut t, target);
    let (_, second) = connect_asking(&mut t, target);
    assert_eq!(first.len(), 2);
    assert!(
        second.is_empty(),
        "the second Connect waits on the first lookup"
    );
    let w = first.iter().find(|x| x.to == node_addr(3)).unwrap();
    let reply = t.c.recv_node(w, node_addr(1));
    let out = t.a.recv_node(&reply.cluster[0], node_addr(3));
    assert_eq!(out.cluster.len(), 2, "both Incomings forwarded to c");
    assert!(out.cluster.iter().all(|x| x.to == node_addr(3)));
}

#[test]
fn held_nowhere_is_offline_and_not_cached() {
    let mut t = three();
    let nobody = Uuid::new_v4();
    let (rid, asks) = connect_asking(&mut t, nobody);
    let mut out = Outbox::default();
    for w in &asks {
        let reply = t.sim(w.to).recv_node(w, node_addr(1));
        out = t.a.recv_node(&reply.cluster[0], w.to);
    }
    assert_client(
        &out,
        &[(t.ca.addr, failed(&t.ca, rid, FailReason::Offline))],
    );
    assert_eq!(t.a.cluster().cached_presence(&nobody, t.a.now), None);
    assert_eq!(
        t.a.metric("sigrouter_peer_lookups_total{outcome=\"nowhere\"}"),
        1.0
    );
}

#[test]
fn a_silent_node_ends_the_lookup_at_its_deadline_with_retry_later() {
    let mut t = three();
    let nobody = Uuid::new_v4();
    let (rid, asks) = connect_asking(&mut t, nobody);
    // c answers "not here"; b is silent (it died).
    let w = asks.iter().find(|x| x.to == node_addr(3)).unwrap();
    let reply = t.c.recv_node(w, node_addr(1));
    assert!(t.a.recv_node(&reply.cluster[0], node_addr(3)).is_empty());
    t.a.advance(Duration::from_millis(499));
    assert!(t.a.tick().is_empty());
    t.a.advance(Duration::from_millis(1));
    let out = t.a.tick();
    assert_client(
        &out,
        &[(t.ca.addr, failed(&t.ca, rid, FailReason::RetryLater))],
    );
    assert_eq!(
        t.a.metric("sigrouter_peer_lookups_total{outcome=\"unanswered\"}"),
        1.0
    );
    assert_eq!(t.a.router.in_flight(), 0);
    // A late answer changes nothing and is not a replay.
    let late = t.b.recv_node(
        asks.iter().find(|x| x.to == node_addr(2)).unwrap(),
        node_addr(1),
    );
    assert!(t.a.recv_node(&late.cluster[0], node_addr(2)).is_empty());
    assert_eq!(t.a.metric(DROPS), 0.0);
}

/// A Resume of `c`'s session at node a, whose lookup job found Redis unavailable.
fn resume_asking(t: &Three, c: &Client, secret: Secret, src: SocketAddr) -> Vec<Transmit> {
    let out = t.a.recv(src, &resume_datagram(c, 7, secret));
    let Job::Resume { src, req_len, msg } = only_job(&out).clone() else {
        panic!("{out:?}")
    };
    let verifier = Some(msg.secret.verifier());
    let mut out = Outbox::default();
    let w = Waiter::Resume { src, req_len, msg };
    t.a.router
        .ask_peers(t.a.now, vec![c.uuid], verifier, w, &mut out);
    out.cluster
}

#[test]
fn a_resume_is_verified_by_the_node_that_holds_the_session() {
    let t = three();
    let src = v4(9, 9000);
    // A wrong secret: the holder says so, the Resume is refused.
    let asks = resume_asking(&t, &t.cb, Secret([1; 32]), src);
    let w = asks.iter().find(|x| x.to == node_addr(2)).unwrap();
    let reply = t.b.recv_node(w, node_addr(1));
    assert_eq!(holds(&reply.cluster[0]), (vec![true], Some(false)));
    let out = t.a.recv_node(&reply.cluster[0], node_addr(2));
    assert_client(&out, &[(src, error(7, ErrorCode::Unauthorized))]);
    assert!(!t.a.router.is_local(&t.cb.uuid));
    // The right one: the session moves to a, which tells b to let it go.
    let asks = resume_asking(&t, &t.cb, t.cb.secret, src);
    let w = asks.iter().find(|x| x.to == node_addr(2)).unwrap();
    let reply = t.b.recv_node(w, node_addr(1));
    assert_eq!(holds(&reply.cluster[0]), (vec![true], Some(true)));
    let out = t.a.recv_node(&reply.cluster[0], node_addr(2));
    assert_eq!(out.client.len(), 1);
    assert!(matches!(msg(&out.client[0]), Message::Registered(r) if r.uuid == t.cb.uuid));
    assert_eq!(out.cluster.len(), 1, "{out:?}");
    let moved = out.cluster[0].clone();
    assert_eq!(moved.to, node_addr(2));
    assert!(matches!(open_envelope(&moved).body, wire::Body::Moved { uuid } if uuid == t.cb.uuid));
    assert!(t.a.router.is_local(&t.cb.uuid));
    t.b.recv_node(&moved, node_addr(1));
    assert!(!t.b.router.is_local(&t.cb.uuid));
}

/// Three nodes; b drains, and its client cb acknowledged the Migrate: b lets it go and keeps
/// it waiting to be taken.
fn cb_waiting_on_draining_b() -> Three {
    let t = three();
    t.b.router.set_draining(true);
    let mut out = Outbox::default();
    t.b.router
        .migrate_all(t.b.now, || Some(node_addr(1)), &mut out);
    let Message::Migrate(m) = msg(only_client(&out)) else {
        panic!("{out:?}")
    };
    t.b.recv(t.cb.addr, &t.cb.push_ack(m.push));
    t
}

/// While Redis is slow, a client that acknowledged its Migrate on draining node b resumes on a:
/// b still vouches for the session (it waits there to be handed over), so a takes it with b
/// named as the old node and tells b it moved; b lets go of it. (Answering "not here" made a
/// take it as a session nobody held, and b never heard that it moved.)
#[test]
fn a_session_waiting_for_its_move_is_vouched_for_by_the_node_it_left() {
    let t = cb_waiting_on_draining_b();
    assert!(!t.b.router.is_local(&t.cb.uuid));
    assert_eq!(t.b.router.migrating_count(), 1);

    let src = v4(9, 9000);
    let asks = resume_asking(&t, &t.cb, t.cb.secret, src);
    let w = asks.iter().find(|x| x.to == node_addr(2)).unwrap();
    let reply = t.b.recv_node(w, node_addr(1));
    assert_eq!(holds(&reply.cluster[0]), (vec![true], Some(true)));
    let out = t.a.recv_node(&reply.cluster[0], node_addr(2));
    assert_eq!((out.client.len(), out.cluster.len()), (1, 1), "{out:?}");
    assert!(matches!(msg(&out.client[0]), Message::Registered(r) if r.uuid == t.cb.uuid));
    let moved = out.cluster[0].clone();
    assert_eq!(moved.to, node_addr(2));
    assert!(matches!(open_envelope(&moved).body, wire::Body::Moved { uuid } if uuid == t.cb.uuid));
    t.b.recv_node(&moved, node_addr(1));
    assert_eq!(t.b.router.migrating_count(), 0, "b let go of it");

    // A wrong secret for a waiting session is refused, as for a held one.
    let t = cb_waiting_on_draining_b();
    let asks = resume_asking(&t, &t.cb, Secret([1; 32]), src);
    let w = asks.iter().find(|x| x.to == node_addr(2)).unwrap();
    let reply = t.b.recv_node(w, node_addr(1));
    assert_eq!(holds(&reply.cluster[0]), (vec![true], Some(false)));
}

#[test]
fn a_resume_nobody_can_vouch_for_is_checked_against_the_derived_secret() {
    let t = three();
    let src = v4(9, 9000);
    // b died holding cb; c does not hold it. The lookup ends at its deadline.
    let asks = resume_asking(&t, &t.cb, t.cb.secret, src);
    let w = asks.iter().find(|x| x.to == node_addr(3)).unwrap();
    let reply = t.c.recv_node(w, node_addr(1));
    assert!(t.a.recv_node(&reply.cluster[0], node_addr(3)).is_empty());
    let mut a = t.a;
    a.advance(super::super::whohas::ASK_DEADLINE);
    let out = a.tick();
    // cb's secret is the one the cluster derived for its UUID: it keeps its UUID on a.
    assert_eq!(out.client.len(), 1, "{:?}", decoded(&out));
    assert!(matches!(msg(&out.client[0]), Message::Registered(r) if r.uuid == t.cb.uuid));
    assert!(a.router.is_local(&t.cb.uuid));
    // Any other secret for an unknown UUID is refused once every node said "not here".
    let stranger = Client {
        uuid: Uuid::new_v4(),
        ..t.cc.clone()
    };
    let t2 = Three { a, ..three() };
    let asks = resume_asking(&t2, &stranger, Secret([3; 32]), src);
    let mut out = Outbox::default();
    for w in &asks {
        let reply = t2.sim(w.to).recv_node(w, node_addr(1));
        out = t2.a.recv_node(&reply.cluster[0], w.to);
    }
    assert_client(&out, &[(src, error(7, ErrorCode::Unauthorized))]);
}

#[test]
fn replayed_and_misdirected_lookup_datagrams_are_dropped_and_counted() {
    let mut t = three();
    let target = t.cb.uuid;
    let (_, asks) = connect_asking(&mut t, target);
    let w = asks.iter().find(|x| x.to == node_addr(2)).unwrap();
    let first = t.b.recv_node(w, node_addr(1));
    assert_eq!(first.cluster.len(), 1);
    // The same WhoHas again: a replay (lookups are never retransmitted).
    assert!(t.b.recv_node(w, node_addr(1)).is_empty());
    assert_eq!(t.b.metric(DROPS), 1.0);
    assert_eq!(t.b.metric("sigrouter_peer_lookups_answered_total"), 1.0);
    // c's honest answer to a WhoHas that went to b (c re-labels nothing: the sequence number
    // was b's): refused.
    let seq = open_envelope(w).seq;
    let (_, forged) =
        t.c.cluster()
            .envelope(
                "a",
                Some(seq),
                wire::Body::Holds {
                    held: vec![true],
                    verified: None,
                },
            )
            .unwrap();
    let forged = Transmit {
        to: node_addr(1),
        bytes: forged.into(),
    };
    assert!(t.a.recv_node(&forged, node_addr(3)).is_empty());
    assert_eq!(t.a.metric(DROPS), 1.0);
    // b's answer, then the same answer again.
    let out = t.a.recv_node(&first.cluster[0], node_addr(2));
    assert_eq!(out.cluster.len(), 1, "forwarded to b");
    assert!(t.a.recv_node(&first.cluster[0], node_addr(2)).is_empty());
    assert_eq!(t.a.metric(DROPS), 2.0);
}

#[test]
fn lookups_past_the_budget_get_retry_later_at_once() {
    let t = three();
    let mut limited = 0;
    for i in 0..600u16 {
        let c = Client {
            uuid: Uuid::new_v4(),
            ..t.cc.clone()
        };
        let src = v6(i, 1);
        let out = t.a.recv(src, &resume_datagram(&c, 7, Secret([4; 32])));
        let Job::Resume { src, req_len, msg } = only_job(&out).clone() else {
            panic!()
        };
        let mut out = Outbox::default();
        let w = Waiter::Resume { src, req_len, msg };
        t.a.router
            .ask_peers(t.a.now, vec![c.uuid], None, w, &mut out);
        if out.cluster.is_empty() {
            assert_client(&out, &[(src, error(7, ErrorCode::RetryLater))]);
            limited += 1;
        } else {
            assert_eq!(out.cluster.len(), 2, "two nodes asked");
        }
    }
    assert_eq!(limited, 100, "a burst of 500 lookups, then the budget");
    assert_eq!(
        t.a.metric("sigrouter_peer_lookups_total{outcome=\"limited\"}"),
        100.0
    );
}

/// Carries every node datagram between `sims` until none is left; returns how many went.
fn carry(sims: &[&Sim], mut pending: Vec<(SocketAddr, Transmit)>) -> usize {
    let mut n = 0;
    while let Some((from, t)) = pending.pop() {
        n += 1;
        assert!(n < 10_000, "datagrams never stop");
        let Some(to) = sims.iter().find(|s| s.cluster().cfg.advertise == t.to) else {
            continue;
        };
        let out = to.recv_node(&t, from);
        let me = to.cluster().cfg.advertise;
        pending.extend(out.cluster.into_iter().map(|x| (me, x)));
    }
    n
}

fn ticks(sims: &mut [&mut Sim], d: Duration) {
    let steps = d.as_millis() / 25;
    for _ in 0..steps {
        let mut pending = Vec::new();
        for s in sims.iter_mut() {
            s.advance(Duration::from_millis(25));
            let out = s.tick();
            let me = s.cluster().cfg.advertise;
            pending.extend(out.cluster.into_iter().map(|x| (me, x)));
        }
        let view: Vec<&Sim> = sims.iter().map(|s| &**s).collect();
        carry(&view, pending);
    }
}

#[test]
fn membership_joins_through_an_address_and_refuses_replays_and_spoofs() {
    // a knows only b's address (Redis down, `--peers`); b knows nobody.
    let mut a = Sim::node("a", 1, &[]);
    let mut b = Sim::node("b", 2, &[]);
    a.cluster().membership_join_addrs(&[node_addr(2)]);
    let out = a.tick();
    let join = only_node(&out).clone();
    assert_eq!(join.to, node_addr(2));
    let env = open_envelope(&join);
    assert_eq!(env.to, "", "addressed to whoever listens there");
    assert!(matches!(env.body, wire::Body::Join { ref member } if member.id == "a"));
    // b announces itself to a; a answers with its view: both know each other.
    let answer = b.recv_node(&join, node_addr(1));
    let announce = only_node(&answer).clone();
    assert!(matches!(open_envelope(&announce).body, wire::Body::Swim(_)));
    carry(&[&a, &b], vec![(node_addr(2), announce.clone())]);
    assert_eq!(a.cluster().membership_active(), 1);
    assert_eq!(b.cluster().membership_active(), 1);
    // The refresher's merge lists the member (and the node itself).
    a.cluster().store_merged(&[], false, false);
    let mut ids: Vec<String> = a.cluster().table().iter().map(|n| n.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(a.cluster().node("b").unwrap().internal, node_addr(2));
    // They keep probing each other: membership datagrams flow on every probe period.
    ticks(&mut [&mut a, &mut b], Duration::from_secs(3));
    assert_eq!(a.cluster().membership_active(), 1);
    // The announce again: a replay, dropped and counted; so is the Join.
    let before = a.metric(DROPS);
    assert!(a.recv_node(&announce, node_addr(2)).is_empty());
    assert_eq!(a.metric(DROPS), before + 1.0);
    assert!(b.recv_node(&join, node_addr(1)).is_empty());
    // A Join whose member is not its sender.
    let (_, spoof) = b
        .cluster()
        .envelope(
            "",
            None,
            wire::Body::Join {
                member: crate::cluster::membership::MemberId {
                    id: "c".into(),
                    internal: node_addr(3),
                    public: node_addr(3),
                    started_ms: 1,
                    bump: 0,
                },
            },
        )
        .unwrap();
    let spoof = Transmit {
        to: node_addr(1),
        bytes: spoof.into(),
    };
    let before = a.metric(DROPS);
    assert!(a.recv_node(&spoof, node_addr(2)).is_empty());
    assert_eq!(a.metric(DROPS), before + 1.0);
    // b goes silent: a suspects it, then declares it down, and the merge drops it.
    for _ in 0..(6_000 / 25) {
        a.advance(Duration::from_millis(25));
        let _ = a.tick();
    }
    assert_eq!(a.cluster().membership_active(), 0);
    a.cluster().store_merged(&[], false, false);
    assert!(a.cluster().node("b").is_none());
    assert_eq!(
        a.metric("sigrouter_membership_events_total{event=\"down\"}"),
        1.0
    );
}
