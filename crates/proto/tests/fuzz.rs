//! Property tests: the codec never panics on hostile input, valid encodings of every type
//! round-trip, and size limits hold.
//!
//! Case counts are chosen so the whole file runs in a few seconds in a debug build.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::collection::vec;
use proptest::prelude::*;
use sigrouter_proto::*;
use uuid::Uuid;

fn arb_uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn arb_addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        (any::<u32>(), any::<u16>())
            .prop_map(|(ip, p)| Addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p))),
        (any::<u128>(), any::<u16>())
            .prop_map(|(ip, p)| Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p))),
    ]
}

fn arb_locals() -> impl Strategy<Value = Vec<Addr>> {
    vec(arb_addr(), 0..=MAX_LOCAL_ADDRS)
}

/// Payloads up to the limit; the larger ones make some messages too large to encode, which the
/// roundtrip test skips (and checks is reported as `TooLarge`).
fn arb_payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..64),
        1 => vec(any::<u8>(), 0..=MAX_PAYLOAD),
    ]
    .prop_map(Payload::from)
}

fn arb_secret() -> impl Strategy<Value = Secret> {
    any::<[u8; SECRET_LEN]>().prop_map(Secret)
}

fn arb_fail_reason() -> impl Strategy<Value = FailReason> {
    prop_oneof![
        Just(FailReason::Offline),
        Just(FailReason::Rejected),
        Just(FailReason::Timeout),
        Just(FailReason::RetryLater),
    ]
}

fn arb_error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::Unauthorized),
        Just(ErrorCode::UnknownSession),
        Just(ErrorCode::RateLimited),
        Just(ErrorCode::Capacity),
        Just(ErrorCode::UnknownConnection),
        Just(ErrorCode::Draining),
        Just(ErrorCode::RetryLater),
    ]
}

fn arb_answer() -> impl Strategy<Value = Answer> {
    (any::<u64>(), arb_uuid(), arb_uuid(), arb_payload()).prop_map(
        |(rid, uuid, connection, payload)| Answer {
            rid,
            uuid,
            connection,
            payload,
        },
    )
}

/// Any message of any of the 22 types, within the documented limits.
fn arb_message() -> impl Strategy<Value = Message> {
    let pad = vec(any::<u8>(), 0..300);
    let token = vec(any::<u8>(), 0..=MAX_TOKEN);
    prop_oneof![
        (any::<u64>(), arb_locals(), token.clone(), pad.clone()).prop_map(
            |(rid, local, token, pad)| Message::Register(Register {
                rid,
                local,
                token,
                pad
            })
        ),
        (
            any::<u64>(),
            arb_uuid(),
            arb_secret(),
            arb_locals(),
            token.clone(),
            pad
        )
            .prop_map(
                |(rid, uuid, secret, local, token, pad)| Message::Resume(Resume {
                    rid,
                    uuid,
                    secret,
                    local,
                    token,
                    pad
                })
            ),
        (any::<u64>(), token).prop_map(|(rid, token)| Message::Retry(Retry { rid, token })),
        (any::<u64>(), arb_uuid())
            .prop_map(|(rid, uuid)| Message::Heartbeat(Heartbeat { rid, uuid })),
        (any::<u64>(), arb_uuid(), vec(arb_uuid(), 0..=MAX_QUERY))
            .prop_map(|(rid, uuid, uuids)| Message::Query(Query { rid, uuid, uuids })),
        (any::<u64>(), arb_uuid(), arb_uuid(), arb_payload()).prop_map(
            |(rid, uuid, to, payload)| {
                Message::Connect(Connect {
                    rid,
                    uuid,
                    to,
                    payload,
                })
            }
        ),
        arb_answer().prop_map(Message::Accept),
        arb_answer().prop_map(Message::Reject),
        (any::<u64>(), arb_uuid(), arb_uuid(), arb_payload()).prop_map(
            |(rid, uuid, connection, payload)| Message::Signal(Signal {
                rid,
                uuid,
                connection,
                payload
            })
        ),
        (any::<u64>(), arb_uuid()).prop_map(|(rid, uuid)| Message::Bye(Bye { rid, uuid })),
        (arb_uuid(), any::<u64>())
            .prop_map(|(uuid, push)| Message::PushAck(PushAck { uuid, push })),
        (
            any::<u64>(),
            arb_uuid(),
            arb_secret(),
            arb_addr(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(rid, uuid, secret, observed, heartbeat_ms, ttl_ms)| {
                Message::Registered(Registered {
                    rid,
                    uuid,
                    secret,
                    observed,
                    heartbeat_ms,
                    ttl_ms,
                })
            }),
        (any::<u64>(), arb_addr())
            .prop_map(|(rid, observed)| Message::HeartbeatAck(HeartbeatAck { rid, observed })),
        (any::<u64>(), vec(any::<bool>(), 0..=MAX_QUERY))
            .prop_map(|(rid, online)| Message::QueryResult(QueryResult { rid, online })),
        (
            any::<u64>(),
            arb_uuid(),
            arb_uuid(),
            arb_addr(),
            arb_locals(),
            arb_payload()
        )
            .prop_map(|(rid, connection, peer, observed, local, payload)| {
                Message::Connected(Connected {
                    rid,
                    connection,
                    peer,
                    observed,
                    local,
                    payload,
                })
            }),
        (any::<u64>(), arb_fail_reason(), arb_payload()).prop_map(|(rid, reason, payload)| {
            Message::ConnectFailed(ConnectFailed {
                rid,
                reason,
                payload,
            })
        }),
        any::<u64>().prop_map(|rid| Message::Ack(Ack { rid })),
        (
            any::<u64>(),
            arb_error_code(),
            proptest::option::of(arb_addr())
        )
            .prop_map(|(rid, code, to)| Message::Error(ErrorMsg { rid, code, to })),
        (
            any::<u64>(),
            arb_error_code(),
            proptest::option::of(arb_addr())
        )
            .prop_map(|(rid, code, to)| Message::SessionError(ErrorMsg { rid, code, to })),
        (
            any::<u64>(),
            arb_uuid(),
            arb_uuid(),
            arb_addr(),
            arb_locals(),
            arb_payload()
        )
            .prop_map(|(push, connection, from, observed, local, payload)| {
                Message::Incoming(Incoming {
                    push,
                    connection,
                    from,
                    observed,
                    local,
                    payload,
                })
            }),
        (any::<u64>(), arb_uuid(), arb_uuid(), arb_payload()).prop_map(
            |(push, connection, from, payload)| Message::SignalPush(SignalPush {
                push,
                connection,
                from,
                payload
            })
        ),
        (any::<u64>(), proptest::option::of(arb_addr()))
            .prop_map(|(push, to)| Message::Migrate(Migrate { push, to })),
    ]
}

/// A message that fits in a datagram, with its encoding and key.
fn arb_encoded() -> impl Strategy<Value = (Message, Secret, Vec<u8>)> {
    (arb_message(), arb_secret()).prop_filter_map("too large for one datagram", |(m, k)| {
        encode(&m, Some(&k)).ok().map(|b| (m, k, b))
    })
}

/// Ways to damage a datagram.
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Overwrite(usize, u8),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0..8u8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        // Sometimes a lot, to cross the 1200-byte limit.
        vec(any::<u8>(), 1100..1300).prop_map(Mutation::Extend),
        (any::<usize>(), vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1..16usize).prop_map(|(i, n)| Mutation::Remove(i, n)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
    ]
}

fn mutate(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let len = b.len();
        match m {
            Mutation::FlipBit(i, bit) if len > 0 => b[i % len] ^= 1 << bit,
            Mutation::Truncate(n) => b.truncate(n % (len + 1)),
            Mutation::Extend(v) => b.extend_from_slice(v),
            Mutation::Insert(i, v) => {
                let at = i % (len + 1);
                b.splice(at..at, v.iter().copied());
            }
            Mutation::Remove(i, n) if len > 0 => {
                let at = i % len;
                b.drain(at..(at + n).min(len));
            }
            Mutation::Overwrite(i, v) if len > 0 => b[i % len] = *v,
            _ => {}
        }
    }
    b
}

/// Everything a server does with an untrusted datagram; must never panic, and must respect the
/// size limit.
fn poke(b: &[u8], key: &Secret) -> Result<Message, DecodeError> {
    let h = peek_header(b);
    let d = decode(b);
    let mac = verify_mac(b, key);
    let _ = is_stun(b);
    if b.len() > MAX_DATAGRAM {
        assert_eq!(h, Err(DecodeError::Oversized));
        assert_eq!(d, Err(DecodeError::Oversized));
        assert!(!mac);
    }
    if let Err(e) = h {
        assert_eq!(d, Err(e), "decode must fail the way the header check does");
        assert!(!mac);
    }
    if let Ok(m) = &d {
        assert_eq!(Ok(Header { ty: m.ty() }), h);
        // Whatever decodes re-encodes, and the re-encoding decodes to the same message.
        let again = encode(m, Some(key)).expect("a decoded message re-encodes");
        assert_eq!(decode(&again).as_ref(), Ok(m));
    }
    d
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(b in vec(any::<u8>(), 0..1400), k in arb_secret()) {
        let _ = poke(&b, &k);
    }

    /// Random bytes behind a valid header: exercises the body decoder of every type.
    #[test]
    fn random_bodies_never_panic(
        ty in prop::sample::select(
            (0..=255u8).filter(|b| MsgType::from_u8(*b).is_some()).collect::<Vec<_>>()
        ),
        body in vec(any::<u8>(), 0..1300),
        k in arb_secret(),
    ) {
        let mut b = vec![0x53, 0x52, 0x01, ty];
        b.extend_from_slice(&body);
        let _ = poke(&b, &k);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn valid_encodings_roundtrip((m, k, b) in arb_encoded()) {
        prop_assert!(b.len() <= MAX_DATAGRAM);
        let d = decode(&b).unwrap();
        prop_assert_eq!(&d, &m);
        prop_assert_eq!(peek_header(&b).unwrap().ty, m.ty());
        prop_assert_eq!(verify_mac(&b, &k), m.ty().is_authenticated());
        if m.ty().is_authenticated() {
            let mut other = k;
            other.0[0] ^= 1;
            prop_assert!(!verify_mac(&b, &other));
            prop_assert_eq!(encode(&m, None), Err(EncodeError::MissingKey));
        } else {
            // Unauthenticated types do not depend on the key.
            prop_assert_eq!(encode(&m, None).unwrap(), b.clone());
        }
        // Deterministic.
        prop_assert_eq!(encode(&m, Some(&k)).unwrap(), b);
    }

    #[test]
    fn oversized_messages_fail_to_encode(m in arb_message(), k in arb_secret()) {
        // A message either encodes within the limit or is refused; never a longer datagram.
        match encode(&m, Some(&k)) {
            Ok(b) => prop_assert!(b.len() <= MAX_DATAGRAM),
            Err(e) => prop_assert_eq!(e, EncodeError::TooLarge),
        }
    }

    #[test]
    fn mutated_encodings_never_panic(
        (m, k, b) in arb_encoded(),
        muts in vec(arb_mutation(), 1..4),
    ) {
        let bad = mutate(b.clone(), &muts);
        let _ = poke(&bad, &k);
        if bad != b && m.ty().is_authenticated() {
            // Any change to an authenticated datagram breaks its MAC.
            prop_assert!(!verify_mac(&bad, &k));
        }
    }

    #[test]
    fn hello_padding_reaches_minimum(m in arb_message()) {
        let mut m = m;
        if matches!(m, Message::Register(_) | Message::Resume(_)) {
            let b = encode_hello(&mut m).unwrap();
            prop_assert!(b.len() >= MIN_HELLO_LEN && b.len() <= MIN_HELLO_LEN + 2);
            prop_assert_eq!(decode(&b).unwrap(), m);
        }
    }
}

/// A Heartbeat `{"rid": 3, "uuid": bin16, "x": ...}` whose unknown field `x` nests `levels`
/// arrays (`open` = 0x91) or maps (`open` = 0x81, key ""), cut at `max_len` bytes with the MAC.
fn nested_heartbeat(open: u8, levels: usize, max_len: usize) -> Vec<u8> {
    let mut b = b"SR\x01\x03\x83\xa3rid\x03\xa4uuid\xc4\x10".to_vec();
    b.extend_from_slice(&[0xaa; 16]);
    b.extend_from_slice(b"\xa1x");
    for _ in 0..levels {
        if b.len() >= max_len - MAC_LEN - 1 {
            break;
        }
        b.push(open);
        if open == 0x81 {
            b.push(0xa0); // key ""
        }
    }
    b.truncate(max_len - MAC_LEN - 1);
    b.push(0xc0);
    b.extend_from_slice(&[0; MAC_LEN]);
    b
}

/// Bodies nested as deep as a datagram allows, in an ignored field: must be refused as
/// malformed (the decoder has a depth limit) without exhausting the stack.
#[test]
fn deep_nesting_is_bounded() {
    let heartbeat = Ok(Message::Heartbeat(Heartbeat {
        rid: 3,
        uuid: Uuid::from_bytes([0xaa; 16]),
    }));
    for open in [0x91u8, 0x81] {
        // Control: the same datagram nested within the limit decodes, so what the deep one
        // tests is the nesting, not a framing mistake of this test.
        assert_eq!(decode(&nested_heartbeat(open, 6, MAX_DATAGRAM)), heartbeat);
        let b = nested_heartbeat(open, usize::MAX, MAX_DATAGRAM);
        assert_eq!(b.len(), MAX_DATAGRAM);
        // Run on a thread with a small stack, like a server worker might have.
        let r = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || decode(&b))
            .unwrap()
            .join()
            .expect("decoder overflowed a 256 KiB stack");
        assert_eq!(
            r,
            Err(DecodeError::Malformed),
            "nesting opened with {open:#04x}"
        );
    }
}

#[test]
fn every_length_of_a_valid_datagram_is_handled() {
    // All truncations of one datagram of each of a few types, exhaustively.
    let k = Secret([9; 32]);
    let msgs = [
        Message::Heartbeat(Heartbeat {
            rid: u64::MAX,
            uuid: Uuid::from_u128(7),
        }),
        Message::Migrate(Migrate { push: 1, to: None }),
        Message::Error(ErrorMsg {
            rid: 0,
            code: ErrorCode::Draining,
            to: None,
        }),
        Message::SessionError(ErrorMsg {
            rid: 0,
            code: ErrorCode::RateLimited,
            to: Some(Addr("[2001:db8::1]:5000".parse().unwrap())),
        }),
    ];
    for m in msgs {
        let b = encode(&m, Some(&k)).unwrap();
        for n in 0..b.len() {
            assert!(poke(&b[..n], &k).is_err(), "{m:?} truncated to {n} decoded");
            assert!(!verify_mac(&b[..n], &k));
        }
        assert_eq!(poke(&b, &k), Ok(m));
    }
    // Exactly the limit is fine as far as size goes; one more byte is Oversized.
    let mut b = b"SR\x01\x01".to_vec();
    b.resize(MAX_DATAGRAM, 0);
    assert_ne!(decode(&b), Err(DecodeError::Oversized));
    b.push(0);
    assert_eq!(decode(&b), Err(DecodeError::Oversized));
    assert_eq!(peek_header(&b), Err(DecodeError::Oversized));
}
