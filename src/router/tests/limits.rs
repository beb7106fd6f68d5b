//! The largest messages the protocol allows: every answer and push they cause is sent (before
//! the limits were derived from the worst case, a maximal Connect caused an Incoming too large
//! to encode, and the initiator timed out).

use sigrouter_proto::{
    self as proto, Addr, ConnectFailed, Connected, Message, QueryResult, MAX_LOCAL_ADDRS,
    MAX_PAYLOAD, MAX_QUERY,
};
use uuid::Uuid;

use super::connect::start_local;
use super::*;

fn ipv6_locals(n: u16) -> Vec<Addr> {
    (0..MAX_LOCAL_ADDRS as u16)
        .map(|i| Addr(v6(0xff00 + n * 16 + i, 65535 - i)))
        .collect()
}

#[test]
fn a_maximal_connect_between_ipv6_clients_with_every_local_address_goes_through() {
    let sim = Sim::new();
    let mut a = sim.register(v6(0xfff1, 65535), ipv6_locals(1));
    let mut b = sim.register(v6(0xfff2, 65534), ipv6_locals(2));
    let big = vec![0xAB; MAX_PAYLOAD];
    let req = a.connect(a.rid + 1, b.uuid, &big);
    assert!(req.len() <= proto::MAX_DATAGRAM);
    // `start_local` checks the exact (maximal) Incoming b receives.
    let (conn, _, rid) = start_local(&sim, &mut a, &b, &big);
    // Accepted with a maximal payload: the Connected carries b's IPv6 addresses and payload.
    let r = b.next_rid();
    let out = sim.recv(b.addr, &b.accept(r, conn, &big));
    let connected = Message::Connected(Connected {
        rid,
        connection: conn,
        peer: b.uuid,
        observed: Addr(b.addr),
        local: b.local.clone(),
        payload: big.clone().into(),
    });
    let to_a = out
        .client
        .iter()
        .find(|t| t.to == a.addr)
        .expect("Connected sent");
    assert_eq!(to_a.bytes, a.expect(&connected));
    assert!(to_a.bytes.len() <= proto::MAX_DATAGRAM);
    // Maximal Signals both ways.
    for (mut from, to) in [(a.clone(), b.clone()), (b, a)] {
        let rid = from.next_rid() + 10;
        let out = sim.recv(from.addr, &from.signal(rid, conn, &big));
        let push = out
            .client
            .iter()
            .find(|t| t.to == to.addr)
            .expect("SignalPush sent");
        assert!(matches!(msg(push), Message::SignalPush(p) if p.payload.len() == MAX_PAYLOAD));
    }
}

#[test]
fn a_maximal_reject_and_a_maximal_query_are_answered() {
    let sim = Sim::new();
    let mut a = sim.register(v6(0xfff1, 65535), ipv6_locals(1));
    let mut b = sim.register(v6(0xfff2, 65534), ipv6_locals(2));
    let big = vec![0xCD; MAX_PAYLOAD];
    let (conn, _, rid) = start_local(&sim, &mut a, &b, &big);
    let r = b.next_rid();
    let out = sim.recv(b.addr, &b.reject(r, conn, &big));
    let failed = Message::ConnectFailed(ConnectFailed {
        rid,
        reason: proto::FailReason::Rejected,
        payload: big.clone().into(),
    });
    assert!(out
        .client
        .iter()
        .any(|t| t.to == a.addr && t.bytes == a.expect(&failed)));
    let asked: Vec<Uuid> = (0..MAX_QUERY as u128).map(Uuid::from_u128).collect();
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.query(rid, asked));
    let result = Message::QueryResult(QueryResult {
        rid,
        online: vec![false; MAX_QUERY],
    });
    assert_client(&out, &[(a.addr, a.expect(&result))]);
}

#[test]
fn a_payload_over_the_limit_is_refused_at_decoding_and_counted() {
    let sim = Sim::new();
    let mut a = sim.register(v4(1, 1), vec![]);
    let b = sim.register(v4(2, 2), vec![]);
    let rid = a.next_rid();
    let out = sim.recv(a.addr, &a.connect(rid, b.uuid, &vec![0; MAX_PAYLOAD + 1]));
    assert!(out.is_empty());
    assert_eq!(
        sim.metric("sigrouter_dropped_total{reason=\"out_of_range\"}"),
        1.0
    );
}
