//! Address validation (`--address-validation`): a Register, or a Resume from a new address,
//! without a valid token gets `Retry` and creates nothing; with the token it goes on as
//! before. Tokens are bound to the source address and port and to the time, signed with a
//! rotating node secret.

use std::net::Ipv4Addr;
use std::time::Duration;

use sigrouter_proto::{self as proto, ErrorCode, Message, Secret};
use uuid::Uuid;

use super::*;
use crate::config::AddressValidation;
use crate::router::state::PRESSURE_HOLD;
use crate::router::token::{LIFETIME, TOKEN_LEN};

fn with_mode(mode: AddressValidation) -> Config {
    Config {
        address_validation: mode,
        ..config()
    }
}

fn always() -> Config {
    with_mode(AddressValidation::Always)
}

/// A padded Register carrying `token`.
fn register_with(rid: u64, token: &[u8]) -> Vec<u8> {
    let mut m = Message::Register(proto::Register {
        rid,
        local: vec![],
        token: token.to_vec(),
        pad: vec![],
    });
    proto::encode_hello(&mut m).unwrap()
}

/// A padded Resume of `c`'s session carrying `token`.
fn resume_with(c: &Client, rid: u64, token: &[u8]) -> Vec<u8> {
    let mut m = Message::Resume(proto::Resume {
        rid,
        uuid: c.uuid,
        secret: c.secret,
        local: vec![],
        token: token.to_vec(),
        pad: vec![],
    });
    proto::encode_hello(&mut m).unwrap()
}

/// The one datagram of `out` is a `Retry` answering `rid`, sent to `src`, no larger than the
/// request (`req_len`) and exactly the encoding of its own contents; nothing else happened.
/// Returns its token.
fn retry_token(out: &Outbox, src: SocketAddr, rid: u64, req_len: usize) -> Vec<u8> {
    let t = only_client(out);
    assert_eq!(t.to, src);
    assert!(
        t.bytes.len() <= req_len,
        "Retry of {} bytes for a {req_len}-byte request",
        t.bytes.len()
    );
    let Message::Retry(r) = msg(t) else {
        panic!("expected Retry, got {:?}", decoded(out));
    };
    assert_eq!(r.rid, rid);
    assert_eq!(r.token.len(), TOKEN_LEN);
    assert_eq!(
        t.bytes,
        proto::encode(&Message::Retry(r.clone()), None).unwrap()
    );
    r.token
}

/// The one datagram of `out` is the exact `Registered` for request `rid` from `src`; returns
/// the client it made.
fn registered_client(sim: &Sim, out: &Outbox, src: SocketAddr, rid: u64) -> Client {
    let t = only_client(out);
    assert_eq!(t.to, src);
    let Message::Registered(r) = msg(t) else {
        panic!("expected Registered, got {:?}", decoded(out));
    };
    let c = Client {
        uuid: r.uuid,
        secret: r.secret,
        addr: src,
        local: vec![],
        rid,
    };
    assert_eq!(
        t.bytes,
        proto::encode(&sim.registered(&c, rid, src), None).unwrap()
    );
    c
}

/// Registers through a Retry: Register 1, Retry, Register 2 with the token, Registered.
fn register_validated(sim: &Sim, src: SocketAddr) -> Client {
    let req = register_datagram(1, vec![]);
    let token = retry_token(&sim.recv(src, &req), src, 1, req.len());
    registered_client(sim, &sim.recv(src, &register_with(2, &token)), src, 2)
}

fn outcome(sim: &Sim, o: &str) -> f64 {
    sim.metric(&format!(
        "sigrouter_address_validation_total{{outcome=\"{o}\"}}"
    ))
}

#[test]
fn always_a_register_without_a_token_gets_retry_and_creates_nothing() {
    let mut sim = Sim::node_with(always(), "a", 1, &[]);
    for src in [v4(1, 4000), v6(1, 4000)] {
        let req = register_datagram(1, vec![]);
        retry_token(&sim.recv(src, &req), src, 1, req.len());
        // Its retransmission: another Retry, still nothing kept.
        retry_token(&sim.recv(src, &req), src, 1, req.len());
    }
    assert_eq!(sim.router.session_count(), 0);
    assert!(sim.presence_ops().is_empty(), "no presence write");
    assert_eq!(outcome(&sim, "retry_sent"), 4.0);
    assert_eq!(sim.metric("sigrouter_sessions_registered_total"), 0.0);
    // The smallest Register answered (256 bytes) gets a Retry of 39: no amplification.
    let req = register_datagram(u64::MAX, vec![]);
    assert_eq!(req.len(), proto::MIN_HELLO_LEN);
    let src = v6(0xffff, 65535);
    let t = only_client(&sim.recv(src, &req)).bytes.len();
    assert!(t <= req.len() / 4, "{t} bytes");
}

#[test]
fn the_token_brings_the_session() {
    let mut sim = Sim::node_with(always(), "a", 1, &[]);
    let src = v4(1, 4000);
    let req = register_datagram(1, vec![]);
    let token = retry_token(&sim.recv(src, &req), src, 1, req.len());
    let with_token = register_with(2, &token);
    let c = registered_client(&sim, &sim.recv(src, &with_token), src, 2);
    assert_eq!(sim.router.session_count(), 1);
    assert_eq!(outcome(&sim, "valid"), 1.0);
    let ops = sim.presence_ops();
    assert!(
        matches!(ops.as_slice(), [PresenceOp::Put(u, _)] if *u == c.uuid),
        "{ops:?}"
    );
    // A retransmission of the Register with the token finds the session it created.
    let again = registered_client(&sim, &sim.recv(src, &with_token), src, 2);
    assert_eq!(again.uuid, c.uuid);
    assert_eq!(sim.router.session_count(), 1);
    assert_eq!(sim.metric("sigrouter_duplicate_requests_total"), 1.0);
    // The session works: a heartbeat is answered.
    let out = sim.recv(src, &c.heartbeat(3));
    assert_eq!(only_client(&out).to, src);
}

#[test]
fn a_token_from_another_address_or_port_is_invalid() {
    let sim = Sim::with(always());
    let src = v4(1, 4000);
    let req = register_datagram(1, vec![]);
    let token = retry_token(&sim.recv(src, &req), src, 1, req.len());
    // A NAT rebinding between the two datagrams (another port), or another host: a new Retry.
    for other in [v4(1, 4001), v4(2, 4000), v6(1, 4000)] {
        let req = register_with(2, &token);
        let fresh = retry_token(&sim.recv(other, &req), other, 2, req.len());
        assert_ne!(fresh, token);
    }
    assert_eq!(outcome(&sim, "invalid"), 3.0);
    assert_eq!(sim.router.session_count(), 0);
    // A token made up by the client, or damaged on the way, is invalid too.
    let mut bad = token.clone();
    bad[TOKEN_LEN - 1] ^= 1;
    for t in [bad, vec![1; 5], vec![0; proto::MAX_TOKEN]] {
        let req = register_with(3, &t);
        retry_token(&sim.recv(src, &req), src, 3, req.len());
    }
    assert_eq!(outcome(&sim, "invalid"), 6.0);
    assert_eq!(sim.router.session_count(), 0);
    // The genuine one still works from where it was issued.
    registered_client(&sim, &sim.recv(src, &register_with(4, &token)), src, 4);
}

#[test]
fn an_expired_token_gets_a_new_retry() {
    let mut sim = Sim::with(always());
    let src = v6(7, 7000);
    let req = register_datagram(1, vec![]);
    let token = retry_token(&sim.recv(src, &req), src, 1, req.len());
    sim.advance(LIFETIME);
    let req = register_with(2, &token);
    let fresh = retry_token(&sim.recv(src, &req), src, 2, req.len());
    assert_eq!(outcome(&sim, "expired"), 1.0);
    assert_eq!(sim.router.session_count(), 0);
    registered_client(&sim, &sim.recv(src, &register_with(3, &fresh)), src, 3);
}

#[test]
fn a_token_of_the_previous_secret_is_accepted_until_it_expires() {
    let mut sim = Sim::with(always());
    let src = v4(3, 3000);
    // Issued 50 s into the node's first secret period, used 15 s later, in the next one.
    sim.advance(Duration::from_secs(50));
    let req = register_datagram(1, vec![]);
    let token = retry_token(&sim.recv(src, &req), src, 1, req.len());
    assert_eq!(&token[1..5], &50u32.to_be_bytes(), "issued at second 50");
    sim.advance(Duration::from_secs(15));
    // Another client's token, issued now, is signed with the new secret; both are accepted.
    let other = v4(4, 3000);
    let req = register_datagram(1, vec![]);
    let new = retry_token(&sim.recv(other, &req), other, 1, req.len());
    registered_client(&sim, &sim.recv(src, &register_with(2, &token)), src, 2);
    registered_client(&sim, &sim.recv(other, &register_with(2, &new)), other, 2);
    assert_eq!(outcome(&sim, "valid"), 2.0);
    // Once the secret is two periods old, its tokens are expired (they are by age anyway).
    let late = v4(5, 3000);
    let req = register_datagram(1, vec![]);
    let old = retry_token(&sim.recv(late, &req), late, 1, req.len());
    sim.advance(Duration::from_secs(120));
    let req = register_with(2, &old);
    retry_token(&sim.recv(late, &req), late, 2, req.len());
    assert_eq!(outcome(&sim, "expired"), 1.0);
}

#[test]
fn resume_from_a_new_address_is_challenged_from_the_same_address_not() {
    let sim = Sim::with(always());
    let src = v4(1, 4000);
    let c = register_validated(&sim, src);
    // Same address: no Retry.
    let out = sim.recv(src, &resume_datagram(&c, 3, c.secret));
    registered_client(&sim, &out, src, 3);
    // A new address (the client opened a new socket): Retry, and the session stays put.
    let moved = v4(1, 5000);
    let req = resume_datagram(&c, 4, c.secret);
    let token = retry_token(&sim.recv(moved, &req), moved, 4, req.len());
    assert_eq!(sim.router.st.sessions.peer(&c.uuid).unwrap().addr, src);
    // Even with a wrong secret, the answer is the Retry: nothing is looked at before.
    let req = resume_datagram(&c, 5, Secret([0; 32]));
    retry_token(&sim.recv(moved, &req), moved, 5, req.len());
    // With the token it moves.
    let out = sim.recv(moved, &resume_with(&c, 6, &token));
    let again = registered_client(&sim, &out, moved, 6);
    assert_eq!(again.uuid, c.uuid);
    assert_eq!(sim.router.st.sessions.peer(&c.uuid).unwrap().addr, moved);
    assert_eq!(outcome(&sim, "valid"), 2.0);
}

#[test]
fn a_resume_of_an_unknown_uuid_costs_no_lookup_until_validated() {
    let sim = Sim::node_with(always(), "a", 1, &[]);
    let ghost = Client {
        uuid: Uuid::from_u128(0xdead),
        secret: Secret([9; 32]),
        addr: v4(66, 1),
        local: vec![],
        rid: 0,
    };
    let req = resume_datagram(&ghost, 1, ghost.secret);
    let token = retry_token(&sim.recv(ghost.addr, &req), ghost.addr, 1, req.len());
    let out = sim.recv(ghost.addr, &resume_with(&ghost, 2, &token));
    assert!(matches!(only_job(&out), Job::Resume { .. }));
}

#[test]
fn a_draining_node_answers_draining_without_validating() {
    let sim = Sim::with(always());
    sim.router.set_draining(true);
    let src = v4(1, 1);
    let out = sim.recv(src, &register_datagram(5, vec![]));
    assert_client(&out, &[(src, error(5, ErrorCode::Draining))]);
    assert_eq!(outcome(&sim, "retry_sent"), 0.0);
}

#[test]
fn never_mode_takes_registers_at_once_and_ignores_tokens() {
    let sim = Sim::with(with_mode(AddressValidation::Never));
    let src = v4(1, 1);
    registered_client(&sim, &sim.recv(src, &register_with(1, &[1, 2, 3])), src, 1);
    assert_eq!(outcome(&sim, "invalid"), 0.0);
}

#[test]
fn pressure_mode_validates_only_while_the_budget_is_more_than_half_used() {
    let mut sim = Sim::with(Config {
        new_session_rate: 100,
        new_session_burst: 100,
        ..config()
    });
    assert_eq!(sim.cfg.address_validation, AddressValidation::Pressure);
    // Idle: a Register from each of 1,000 forged sources is taken at once until more than
    // half the budget (50 of 100) is used; from then on they get Retry and create nothing.
    let spoofed = |i: u32| SocketAddr::new(Ipv4Addr::from(0x0a00_0000 + i).into(), 5000);
    let mut created = 0;
    let mut retries = 0;
    for i in 0..1000 {
        let out = sim.recv(spoofed(i), &register_datagram(1, vec![]));
        match msg(only_client(&out)) {
            Message::Registered(_) => created += 1,
            Message::Retry(_) => retries += 1,
            m => panic!("{m:?}"),
        }
    }
    assert_eq!(created, 51, "until more than half the burst of 100 is used");
    assert_eq!(retries, 949);
    assert_eq!(sim.router.session_count(), 51);
    assert_eq!(outcome(&sim, "retry_sent"), 949.0);
    // A real client meanwhile: one round trip more, and the budget still has room for it.
    let real = v4(1, 4000);
    register_validated(&sim, real);
    // The budget refills (100/s) within a second, but validation holds while the flood may
    // go on: half a minute after the last sign of pressure.
    sim.advance(Duration::from_secs(2));
    let src = v4(2, 4000);
    let req = register_datagram(1, vec![]);
    retry_token(&sim.recv(src, &req), src, 1, req.len());
    sim.advance(PRESSURE_HOLD);
    registered_client(&sim, &sim.recv(src, &req), src, 1);
    // Over those 30 s the flood created nothing more.
    assert_eq!(sim.router.session_count(), 53);
}

#[test]
fn pressure_mode_validates_above_ninety_percent_of_the_session_cap() {
    let sim = Sim::with(Config {
        max_sessions: 20,
        ..config()
    });
    for n in 1..=19 {
        sim.register(v4(n, 1), vec![]);
    }
    // 19 of 20 sessions: more than 90%.
    let src = v4(20, 1);
    let c = register_validated(&sim, src);
    assert_eq!(sim.router.session_count(), 20);
    // At the cap the answer is Capacity, without a round trip for nothing.
    let src = v4(21, 1);
    let out = sim.recv(src, &register_datagram(1, vec![]));
    assert_client(&out, &[(src, error(1, ErrorCode::Capacity))]);
    // A Resume from the session's address is never challenged, even under pressure.
    let out = sim.recv(c.addr, &resume_datagram(&c, 3, c.secret));
    registered_client(&sim, &out, c.addr, 3);
}
