//! Binary fields decode from MessagePack `bin` only (docs/PROTOCOL.md section 2).
//!
//! Each case is one exact datagram with one binary field written in several forms: `bin` is
//! accepted, the same bytes as a `str` (valid UTF-8 or not, and for UUIDs the text form) and as
//! an array of integers are `Malformed`. Authenticated types end with a zero MAC: decoding does
//! not check it.

use std::net::SocketAddr;

use sigrouter_proto::*;
use uuid::Uuid;

const UUID_A: [u8; 16] = [0xaa; 16];
const UUID_B: [u8; 16] = [0xbb; 16];

/// A datagram: header, then the body in pieces, then a zero MAC for authenticated types.
fn datagram(ty: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut d = vec![0x53, 0x52, 0x01, ty];
    for p in parts {
        d.extend_from_slice(p);
    }
    if MsgType::from_u8(ty).unwrap().is_authenticated() {
        d.extend_from_slice(&[0; MAC_LEN]);
    }
    d
}

/// `bin 8` holding `b`.
fn bin(b: &[u8]) -> Vec<u8> {
    [&[0xc4, b.len() as u8][..], b].concat()
}

/// `str 8` holding `b` (whatever its bytes).
fn str8(b: &[u8]) -> Vec<u8> {
    [&[0xd9, b.len() as u8][..], b].concat()
}

/// An array of positive integers, one per byte.
fn int_array(b: &[u8]) -> Vec<u8> {
    let mut v = vec![0xdc, 0, b.len() as u8];
    for &x in b {
        if x < 0x80 {
            v.push(x);
        } else {
            v.extend_from_slice(&[0xcc, x]);
        }
    }
    v
}

/// The forms of one field's bytes that must be refused.
fn refused_forms(b: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut v = vec![("str 8", str8(b)), ("array", int_array(b))];
    if b.len() < 32 {
        v.push(("fixstr", [&[0xa0 | b.len() as u8][..], b].concat()));
    }
    v
}

fn key(k: &str) -> Vec<u8> {
    [&[0xa0 | k.len() as u8][..], k.as_bytes()].concat()
}

fn v4() -> Addr {
    Addr("192.0.2.1:4000".parse::<SocketAddr>().unwrap())
}

const V4_BYTES: [u8; 6] = [0xc0, 0x00, 0x02, 0x01, 0x0f, 0xa0];

/// Checks one field: `build(value)` is the datagram with the field's value bytes in place.
fn check(name: &str, field: &[u8], build: impl Fn(&[u8]) -> Vec<u8>, want: Message) {
    assert_eq!(decode(&build(&bin(field))), Ok(want), "{name}: bin form");
    for (form, v) in refused_forms(field) {
        assert_eq!(
            decode(&build(&v)),
            Err(DecodeError::Malformed),
            "{name}: {form} form must be refused"
        );
    }
}

#[test]
fn uuid_is_bin_only() {
    // Heartbeat{rid: 3, uuid: A}.
    let hb = |v: &[u8]| datagram(0x03, &[&[0x82], &key("rid"), &[0x03], &key("uuid"), v]);
    let want = Message::Heartbeat(Heartbeat {
        rid: 3,
        uuid: Uuid::from_bytes(UUID_A),
    });
    check("uuid", &UUID_A, hb, want.clone());
    // The datagram in full, bin form.
    assert_eq!(
        hex::encode(hb(&bin(&UUID_A))),
        "5352010382a372696403a475756964c410aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\
         00000000000000000000000000000000"
    );
    // The text form, valid UTF-8: what `uuid`'s own deserializer would parse.
    let text = b"aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa";
    assert_eq!(decode(&hb(&str8(text))), Err(DecodeError::Malformed));
    // Sixteen bytes of valid UTF-8 as a str.
    assert_eq!(
        decode(&hb(&str8(b"0123456789abcdef"))),
        Err(DecodeError::Malformed)
    );
    // A list of UUIDs: Query{rid: 4, uuid: A, uuids: [B]}.
    let q = |v: &[u8]| {
        let a = bin(&UUID_A);
        datagram(
            0x04,
            &[
                &[0x83],
                &key("rid"),
                &[0x04],
                &key("uuid"),
                &a,
                &key("uuids"),
                &[0x91],
                v,
            ],
        )
    };
    let want = Message::Query(Query {
        rid: 4,
        uuid: Uuid::from_bytes(UUID_A),
        uuids: vec![Uuid::from_bytes(UUID_B)],
    });
    check("uuids[0]", &UUID_B, q, want);
}

#[test]
fn secret_is_bin_only() {
    // Resume{rid: 2, uuid: A, secret: 01..20, local: [], pad: bin 0}.
    let secret: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
    let resume = |v: &[u8]| {
        let a = bin(&UUID_A);
        datagram(
            0x02,
            &[
                &[0x85],
                &key("rid"),
                &[0x02],
                &key("uuid"),
                &a,
                &key("secret"),
                v,
                &key("local"),
                &[0x90],
                &key("pad"),
                &[0xc4, 0x00],
            ],
        )
    };
    let want = Message::Resume(Resume {
        rid: 2,
        uuid: Uuid::from_bytes(UUID_A),
        secret: Secret(secret),
        local: vec![],
        token: Vec::new(),
        pad: vec![],
    });
    check("secret", &secret, resume, want);
    // Not UTF-8 either.
    assert_eq!(
        decode(&resume(&str8(&[0xff; 32]))),
        Err(DecodeError::Malformed)
    );
}

#[test]
fn addresses_are_bin_only() {
    // HeartbeatAck{rid: 3, observed: 192.0.2.1:4000}.
    let ack = |v: &[u8]| datagram(0x82, &[&[0x82], &key("rid"), &[0x03], &key("observed"), v]);
    let want = Message::HeartbeatAck(HeartbeatAck {
        rid: 3,
        observed: v4(),
    });
    check("observed", &V4_BYTES, ack, want);

    // Register{rid: 1, local: [192.0.2.1:4000], pad: bin 0}: an element of a list.
    let reg = |v: &[u8]| {
        datagram(
            0x01,
            &[
                &[0x83],
                &key("rid"),
                &[0x01],
                &key("local"),
                &[0x91],
                v,
                &key("pad"),
                &[0xc4, 0x00],
            ],
        )
    };
    let want = Message::Register(Register {
        rid: 1,
        local: vec![v4()],
        token: Vec::new(),
        pad: vec![],
    });
    check("local[0]", &V4_BYTES, reg, want);

    // Migrate{push: 3, to: 192.0.2.1:4000}: an optional address; nil stays fine.
    let migrate = |v: &[u8]| datagram(0x92, &[&[0x82], &key("push"), &[0x03], &key("to"), v]);
    let want = Message::Migrate(Migrate {
        push: 3,
        to: Some(v4()),
    });
    check("to", &V4_BYTES, migrate, want);
    assert_eq!(
        decode(&migrate(&[0xc0])),
        Ok(Message::Migrate(Migrate { push: 3, to: None }))
    );

    // Error{rid: 2, code: Draining, to: 192.0.2.1:4000}: the optional redirect.
    let error = |v: &[u8]| {
        datagram(
            0x87,
            &[
                &[0x83],
                &key("rid"),
                &[0x02],
                &key("code"),
                &[0x07],
                &key("to"),
                v,
            ],
        )
    };
    let want = Message::Error(ErrorMsg {
        rid: 2,
        code: ErrorCode::Draining,
        to: Some(v4()),
    });
    check("Error.to", &V4_BYTES, error, want);
}

#[test]
fn payload_and_pad_are_bin_only() {
    // Signal{rid: 6, uuid: A, connection: B, payload}.
    let signal = |v: &[u8]| {
        let (a, b) = (bin(&UUID_A), bin(&UUID_B));
        datagram(
            0x08,
            &[
                &[0x84],
                &key("rid"),
                &[0x06],
                &key("uuid"),
                &a,
                &key("connection"),
                &b,
                &key("payload"),
                v,
            ],
        )
    };
    let want = |p: &[u8]| {
        Message::Signal(Signal {
            rid: 6,
            uuid: Uuid::from_bytes(UUID_A),
            connection: Uuid::from_bytes(UUID_B),
            payload: Payload::from(p.to_vec()),
        })
    };
    check("payload", b"candidate", signal, want(b"candidate"));
    check(
        "payload (not UTF-8)",
        &[0xff, 0xfe],
        signal,
        want(&[0xff, 0xfe]),
    );
    check("payload (empty)", &[], signal, want(&[]));

    // Register{rid: 1, local: [], pad}.
    let reg = |v: &[u8]| {
        datagram(
            0x01,
            &[
                &[0x83],
                &key("rid"),
                &[0x01],
                &key("local"),
                &[0x90],
                &key("pad"),
                v,
            ],
        )
    };
    let want = Message::Register(Register {
        rid: 1,
        local: vec![],
        token: Vec::new(),
        pad: vec![0; 4],
    });
    check("pad", &[0; 4], reg, want);
}

#[test]
fn keys_are_strings() {
    // Heartbeat{rid: 3, uuid: A} with the key "rid" as an integer index and as a bin: serde
    // alone would take both as `rid`.
    let mut uuid_kv = key("uuid");
    uuid_kv.extend_from_slice(&bin(&UUID_A));
    let int_key = datagram(0x03, &[&[0x82, 0x00, 0x03], &uuid_kv]);
    let bin_key = datagram(0x03, &[&[0x82], &bin(b"rid"), &[0x03], &uuid_kv]);
    let str_key = datagram(0x03, &[&[0x82], &key("rid"), &[0x03], &uuid_kv]);
    assert_eq!(decode(&int_key), Err(DecodeError::Malformed));
    assert_eq!(decode(&bin_key), Err(DecodeError::Malformed));
    assert!(decode(&str_key).is_ok());
}

#[test]
fn tokens_are_bin_only_and_optional() {
    let tok = [0x01, 0x02, 0x03];
    // Retry{rid: 1, token}: bin only, never absent.
    let retry = |v: &[u8]| datagram(0x89, &[&[0x82], &key("rid"), &[0x01], &key("token"), v]);
    let want = Message::Retry(Retry {
        rid: 1,
        token: tok.to_vec(),
    });
    check("Retry token", &tok, retry, want);
    assert_eq!(
        decode(&datagram(0x89, &[&[0x81], &key("rid"), &[0x01]])),
        Err(DecodeError::Malformed),
        "a Retry without its token"
    );
    // Register{rid: 1, local: [], token, pad: ""}: bin, nil or absent (both: no token).
    let reg = |v: &[u8]| {
        datagram(
            0x01,
            &[
                &[0x84],
                &key("rid"),
                &[0x01],
                &key("local"),
                &[0x90],
                &key("token"),
                v,
                &key("pad"),
                &[0xc4, 0x00],
            ],
        )
    };
    let with = |token: Vec<u8>| {
        Message::Register(Register {
            rid: 1,
            local: vec![],
            token,
            pad: vec![],
        })
    };
    check("Register token", &tok, reg, with(tok.to_vec()));
    assert_eq!(decode(&reg(&[0xc0])), Ok(with(vec![])));
    let absent = datagram(
        0x01,
        &[
            &[0x83],
            &key("rid"),
            &[0x01],
            &key("local"),
            &[0x90],
            &key("pad"),
            &[0xc4, 0x00],
        ],
    );
    assert_eq!(decode(&absent), Ok(with(vec![])));
    // An empty token is written as no token: the datagram of a client from before the field.
    assert_eq!(encode(&with(vec![]), None).unwrap(), absent);
    // Over the limit: out of range.
    let long = vec![0x55; MAX_TOKEN + 1];
    assert_eq!(decode(&reg(&bin(&long))), Err(DecodeError::OutOfRange));
}
