//! The size limits are safe: every request at its largest decodes, and every answer and push
//! it can cause encodes within `MAX_DATAGRAM` (docs/PROTOCOL.md section 14).
//!
//! The property test builds requests of every type at their limits (full payloads, full
//! lists, the widest ids, IPv4 or IPv6 addresses), then every message the router can send
//! because of each one, from the fields the router copies into them, and encodes them all.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::collection::vec;
use proptest::prelude::*;
use sigrouter_proto::*;
use uuid::Uuid;

/// IPv4 or IPv6 for every address of one case.
#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
    Mixed,
}

fn arb_family() -> impl Strategy<Value = Family> {
    prop_oneof![Just(Family::V4), Just(Family::V6), Just(Family::Mixed)]
}

fn arb_addr(f: Family) -> BoxedStrategy<Addr> {
    let v4 = (any::<u32>(), any::<u16>())
        .prop_map(|(ip, p)| Addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)));
    let v6 = (any::<u128>(), any::<u16>())
        .prop_map(|(ip, p)| Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)));
    match f {
        Family::V4 => v4.boxed(),
        Family::V6 => v6.boxed(),
        Family::Mixed => prop_oneof![v4, v6].boxed(),
    }
}

/// Ids are as wide as MessagePack makes them most of the time.
fn arb_id() -> impl Strategy<Value = u64> {
    prop_oneof![3 => Just(u64::MAX), 1 => any::<u64>()]
}

fn arb_uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn arb_secret() -> impl Strategy<Value = Secret> {
    any::<[u8; SECRET_LEN]>().prop_map(Secret)
}

/// A payload at the limit.
fn arb_full_payload() -> impl Strategy<Value = Payload> {
    vec(any::<u8>(), MAX_PAYLOAD).prop_map(Payload::from)
}

/// What the router knows about one session: the fields it copies into answers and pushes.
#[derive(Clone, Debug)]
struct Session {
    uuid: Uuid,
    secret: Secret,
    /// Its address as the router sees it.
    observed: Addr,
    /// The local addresses of its Register or Resume: a full list.
    local: Vec<Addr>,
}

fn arb_session(f: Family) -> impl Strategy<Value = Session> {
    (
        arb_uuid(),
        arb_secret(),
        arb_addr(f),
        vec(arb_addr(f), MAX_LOCAL_ADDRS),
    )
        .prop_map(|(uuid, secret, observed, local)| Session {
            uuid,
            secret,
            observed,
            local,
        })
}

const ALL_CODES: [ErrorCode; 9] = [
    ErrorCode::BadRequest,
    ErrorCode::Unauthorized,
    ErrorCode::UnknownSession,
    ErrorCode::RateLimited,
    ErrorCode::Capacity,
    ErrorCode::UnknownConnection,
    ErrorCode::Draining,
    ErrorCode::RetryLater,
    ErrorCode::Other,
];

const ALL_REASONS: [FailReason; 5] = [
    FailReason::Offline,
    FailReason::Rejected,
    FailReason::Timeout,
    FailReason::RetryLater,
    FailReason::Other,
];

/// One case: a sender (A), its peer (B), ids, and a request of A's at its largest.
#[derive(Clone, Debug)]
struct Case {
    a: Session,
    b: Session,
    rid: u64,
    push: u64,
    connection: Uuid,
    request: Message,
}

fn arb_case() -> impl Strategy<Value = Case> {
    arb_family().prop_flat_map(|f| {
        (
            arb_session(f),
            arb_session(f),
            arb_id(),
            arb_id(),
            arb_uuid(),
            vec(arb_uuid(), MAX_QUERY),
            arb_full_payload(),
            0..10usize,
        )
            .prop_map(|(a, b, rid, push, connection, uuids, payload, which)| {
                let request = match which {
                    0 => Message::Register(Register {
                        rid,
                        local: a.local.clone(),
                        token: vec![0xff; MAX_TOKEN],
                        pad: vec![],
                    }),
                    1 => Message::Resume(Resume {
                        rid,
                        uuid: a.uuid,
                        secret: a.secret,
                        local: a.local.clone(),
                        token: vec![0xff; MAX_TOKEN],
                        pad: vec![],
                    }),
                    2 => Message::Heartbeat(Heartbeat { rid, uuid: a.uuid }),
                    3 => Message::Query(Query {
                        rid,
                        uuid: a.uuid,
                        uuids,
                    }),
                    4 => Message::Connect(Connect {
                        rid,
                        uuid: a.uuid,
                        to: b.uuid,
                        payload,
                    }),
                    5 => Message::Accept(Answer {
                        rid,
                        uuid: a.uuid,
                        connection,
                        payload,
                    }),
                    6 => Message::Reject(Answer {
                        rid,
                        uuid: a.uuid,
                        connection,
                        payload,
                    }),
                    7 => Message::Signal(Signal {
                        rid,
                        uuid: a.uuid,
                        connection,
                        payload,
                    }),
                    8 => Message::Bye(Bye { rid, uuid: a.uuid }),
                    _ => Message::PushAck(PushAck { uuid: a.uuid, push }),
                };
                Case {
                    a,
                    b,
                    rid,
                    push,
                    connection,
                    request,
                }
            })
    })
}

/// Every message the router can send because of `c.request`, with the secret that keys it:
/// answers to A (A's secret), pushes to B (B's secret), and the `Connected` or
/// `ConnectFailed` a target's `Accept` or `Reject` sends to the initiator (B, here).
fn caused(c: &Case) -> Vec<(Message, Secret)> {
    let (a, b) = (&c.a, &c.b);
    let rid = c.rid;
    // Errors, every code, each with a redirect (`to` is only sent with Draining, but the
    // body allows it): unauthenticated `Error`, and `SessionError` for authenticated requests.
    let errors = |out: &mut Vec<(Message, Secret)>| {
        let authenticated = c.request.ty().is_authenticated();
        for code in ALL_CODES {
            let e = ErrorMsg {
                rid,
                code,
                to: Some(b.observed),
            };
            out.push((Message::Error(e.clone()), a.secret));
            if authenticated {
                out.push((Message::SessionError(e), a.secret));
            }
        }
    };
    let mut out = Vec::new();
    match &c.request {
        Message::Register(_) | Message::Resume(_) => {
            out.push((
                Message::Registered(Registered {
                    rid,
                    uuid: a.uuid,
                    secret: a.secret,
                    observed: a.observed,
                    heartbeat_ms: u32::MAX,
                    ttl_ms: u32::MAX,
                }),
                a.secret,
            ));
            out.push((
                Message::Retry(Retry {
                    rid,
                    token: vec![0xff; MAX_TOKEN],
                }),
                a.secret,
            ));
            errors(&mut out);
        }
        Message::Heartbeat(_) => {
            out.push((
                Message::HeartbeatAck(HeartbeatAck {
                    rid,
                    observed: a.observed,
                }),
                a.secret,
            ));
            errors(&mut out);
        }
        Message::Query(q) => {
            out.push((
                Message::QueryResult(QueryResult {
                    rid,
                    online: vec![true; q.uuids.len()],
                }),
                a.secret,
            ));
            errors(&mut out);
        }
        Message::Connect(m) => {
            // To the target: the initiator's address, local addresses and payload.
            out.push((
                Message::Incoming(Incoming {
                    push: c.push,
                    connection: c.connection,
                    from: a.uuid,
                    observed: a.observed,
                    local: a.local.clone(),
                    payload: m.payload.clone(),
                }),
                b.secret,
            ));
            for reason in ALL_REASONS {
                out.push((
                    Message::ConnectFailed(ConnectFailed {
                        rid,
                        reason,
                        payload: Payload::new(),
                    }),
                    a.secret,
                ));
            }
            errors(&mut out);
        }
        Message::Accept(m) => {
            // To the initiator B: the target A's address, local addresses and payload.
            out.push((
                Message::Connected(Connected {
                    rid: c.push,
                    connection: m.connection,
                    peer: a.uuid,
                    observed: a.observed,
                    local: a.local.clone(),
                    payload: m.payload.clone(),
                }),
                b.secret,
            ));
            out.push((Message::Ack(Ack { rid }), a.secret));
            errors(&mut out);
        }
        Message::Reject(m) => {
            out.push((
                Message::ConnectFailed(ConnectFailed {
                    rid: c.push,
                    reason: FailReason::Rejected,
                    payload: m.payload.clone(),
                }),
                b.secret,
            ));
            out.push((Message::Ack(Ack { rid }), a.secret));
            errors(&mut out);
        }
        Message::Signal(m) => {
            out.push((
                Message::SignalPush(SignalPush {
                    push: c.push,
                    connection: m.connection,
                    from: a.uuid,
                    payload: m.payload.clone(),
                }),
                b.secret,
            ));
            out.push((Message::Ack(Ack { rid }), a.secret));
            errors(&mut out);
        }
        Message::Bye(_) => {
            out.push((Message::Ack(Ack { rid }), a.secret));
            errors(&mut out);
        }
        Message::PushAck(_) => {}
        other => panic!("not a request: {other:?}"),
    }
    // Any session may be asked to move at any time.
    out.push((
        Message::Migrate(Migrate {
            push: c.push,
            to: Some(b.observed),
        }),
        a.secret,
    ));
    out
}

/// Encodes a message as its sender would (hellos padded), checks the size bounds and that it
/// decodes to itself.
fn encode_checked(m: &Message, key: &Secret) -> Result<usize, TestCaseError> {
    let mut m2 = m.clone();
    let b = if matches!(m, Message::Register(_) | Message::Resume(_)) {
        encode_hello(&mut m2)
    } else {
        encode(m, Some(key))
    };
    let b = b.map_err(|e| TestCaseError::fail(format!("{:?} does not encode: {e}", m.ty())))?;
    prop_assert!(b.len() <= MAX_DATAGRAM, "{:?}: {} bytes", m.ty(), b.len());
    prop_assert!(
        b.len() <= max_len(m.ty()),
        "{:?}: {} bytes, above max_len {}",
        m.ty(),
        b.len(),
        max_len(m.ty())
    );
    prop_assert_eq!(decode(&b), Ok(m2));
    Ok(b.len())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn every_answer_and_push_of_a_valid_request_encodes(c in arb_case()) {
        // The request is valid: it encodes, decodes and keeps the limits.
        prop_assert!(c.request.within_limits());
        encode_checked(&c.request, &c.a.secret)?;
        let caused = caused(&c);
        for (m, key) in &caused {
            prop_assert!(m.within_limits(), "{:?}", m.ty());
            encode_checked(m, key)?;
        }
    }
}

/// The worst case is tight: the largest `Incoming` is exactly `MAX_DATAGRAM` bytes, so no
/// larger payload could be allowed, and `max_len` is exact for the payload carriers.
#[test]
fn worst_case_incoming_fills_the_datagram() {
    let v6 = |n: u16| Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(u128::MAX)), n));
    let local: Vec<Addr> = (0..MAX_LOCAL_ADDRS as u16).map(v6).collect();
    let payload = Payload::from(vec![0xff; MAX_PAYLOAD]);
    let key = Secret([1; 32]);
    let incoming = Message::Incoming(Incoming {
        push: u64::MAX,
        connection: Uuid::max(),
        from: Uuid::max(),
        observed: v6(1),
        local: local.clone(),
        payload: payload.clone(),
    });
    let b = encode(&incoming, Some(&key)).unwrap();
    assert_eq!(b.len(), MAX_DATAGRAM);
    assert_eq!(max_len(MsgType::Incoming), MAX_DATAGRAM);
    assert_eq!(MAX_PAYLOAD, 986);
    let connected = Message::Connected(Connected {
        rid: u64::MAX,
        connection: Uuid::max(),
        peer: Uuid::max(),
        observed: v6(1),
        local,
        payload,
    });
    assert_eq!(
        encode(&connected, Some(&key)).unwrap().len(),
        max_len(MsgType::Connected)
    );
}

/// The worst-case errors: a `Draining` redirect to an IPv6 node, unauthenticated and MAC'd.
#[test]
fn worst_case_errors_are_exact() {
    let e = ErrorMsg {
        rid: u64::MAX,
        code: ErrorCode::Other,
        to: Some(Addr("[ffff::ffff]:65535".parse().unwrap())),
    };
    let key = Secret([1; 32]);
    let plain = encode(&Message::Error(e.clone()), None).unwrap();
    assert_eq!(plain.len(), max_len(MsgType::Error));
    let mac = encode(&Message::SessionError(e), Some(&key)).unwrap();
    assert_eq!(mac.len(), max_len(MsgType::SessionError));
    assert!(plain.len() <= MIN_HELLO_LEN);
}

/// The largest `Retry` (a token of `MAX_TOKEN` bytes) is exactly `max_len`, and far below the
/// smallest `Register` or `Resume` the router answers: a Retry never amplifies.
#[test]
fn worst_case_retry_is_exact_and_smaller_than_any_hello() {
    let r = Message::Retry(Retry {
        rid: u64::MAX,
        token: vec![0xff; MAX_TOKEN],
    });
    let b = encode(&r, None).unwrap();
    assert_eq!(b.len(), max_len(MsgType::Retry));
    assert!(b.len() <= MIN_HELLO_LEN);
    let over = Message::Retry(Retry {
        rid: 1,
        token: vec![0; MAX_TOKEN + 1],
    });
    assert_eq!(
        decode(&encode(&over, None).unwrap()),
        Err(DecodeError::OutOfRange)
    );
}

/// The case from the issue: a 1,113-byte `Connect` (a 1,024-byte payload) used to decode,
/// and the `Incoming` it causes for an initiator with four IPv6 local addresses did not
/// encode; the initiator waited 10 s for nothing. Now the `Connect` itself is refused, and the
/// largest one that decodes still has its `Incoming`.
#[test]
fn a_connect_whose_incoming_cannot_be_encoded_does_not_decode() {
    let key = Secret([1; 32]);
    let connect = |n: usize| {
        Message::Connect(Connect {
            rid: u64::MAX,
            uuid: Uuid::from_u128(1),
            to: Uuid::from_u128(2),
            payload: Payload::from(vec![7; n]),
        })
    };
    let b = encode(&connect(1024), Some(&key)).unwrap();
    assert_eq!(b.len(), 1113);
    assert_eq!(decode(&b), Err(DecodeError::OutOfRange));
    let b = encode(&connect(MAX_PAYLOAD + 1), Some(&key)).unwrap();
    assert_eq!(decode(&b), Err(DecodeError::OutOfRange));
    let b = encode(&connect(MAX_PAYLOAD), Some(&key)).unwrap();
    assert_eq!(decode(&b), Ok(connect(MAX_PAYLOAD)));
}

/// The "largest datagram" table and the payload limit in docs/PROTOCOL.md section 3 are the
/// codec's figures.
#[test]
fn documented_limits_match_the_codec() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let types: Vec<MsgType> = (0..=255u8).filter_map(MsgType::from_u8).collect();
    let mut seen = Vec::new();
    let rows = doc
        .lines()
        .skip_while(|l| !l.starts_with("| type | largest datagram (bytes) |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'));
    for row in rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let bytes: usize = cells[2].split_whitespace().next().unwrap().parse().unwrap();
        for name in cells[1].split(", ") {
            let ty = *types
                .iter()
                .find(|t| format!("{t:?}") == name)
                .unwrap_or_else(|| panic!("unknown type {name}"));
            assert_eq!(bytes, max_len(ty), "{name}");
            seen.push(ty);
        }
    }
    seen.sort_by_key(|t| *t as u8);
    assert_eq!(seen, types, "every type once in the table");
    let payload_row = format!("| `payload` | {MAX_PAYLOAD} bytes |");
    assert!(doc.contains(&payload_row), "{payload_row}");
    let payload_type = format!("`bin` of 0 to {MAX_PAYLOAD} bytes");
    assert!(doc.contains(&payload_type), "{payload_type}");
}
