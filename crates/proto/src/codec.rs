//! Bytes in, bytes out: [`encode`], [`decode`] and the hello padding. No I/O.

use crate::error::{DecodeError, EncodeError};
use crate::header::{peek_header, MsgType, HEADER_LEN, MAC_LEN, MAGIC, VERSION};
use crate::limits::{MAX_BODY_DEPTH, MAX_DATAGRAM, MIN_HELLO_LEN};
use crate::mac::mac_tag;
#[cfg(doc)]
use crate::mac::verify_mac;
use crate::messages::{bin_fields, Message};
use crate::strict;
use crate::types::Secret;

/// Encodes a message into a datagram. Authenticated types need `key` (the session secret of
/// the sender, or of the recipient for server-to-client messages).
pub fn encode(msg: &Message, key: Option<&Secret>) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(128);
    encode_into(msg, key, &mut out)?;
    Ok(out)
}

/// Like [`encode`], appending to `out` (which is cleared first).
pub fn encode_into(
    msg: &Message,
    key: Option<&Secret>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    out.clear();
    let ty = msg.ty();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(ty as u8);
    let r = match msg {
        Message::Register(m) => rmp_serde::encode::write_named(out, m),
        Message::Resume(m) => rmp_serde::encode::write_named(out, m),
        Message::Heartbeat(m) => rmp_serde::encode::write_named(out, m),
        Message::Query(m) => rmp_serde::encode::write_named(out, m),
        Message::Connect(m) => rmp_serde::encode::write_named(out, m),
        Message::Accept(m) | Message::Reject(m) => rmp_serde::encode::write_named(out, m),
        Message::Signal(m) => rmp_serde::encode::write_named(out, m),
        Message::Bye(m) => rmp_serde::encode::write_named(out, m),
        Message::PushAck(m) => rmp_serde::encode::write_named(out, m),
        Message::Registered(m) => rmp_serde::encode::write_named(out, m),
        Message::HeartbeatAck(m) => rmp_serde::encode::write_named(out, m),
        Message::QueryResult(m) => rmp_serde::encode::write_named(out, m),
        Message::Connected(m) => rmp_serde::encode::write_named(out, m),
        Message::ConnectFailed(m) => rmp_serde::encode::write_named(out, m),
        Message::Ack(m) => rmp_serde::encode::write_named(out, m),
        Message::Error(m) | Message::SessionError(m) => rmp_serde::encode::write_named(out, m),
        Message::Incoming(m) => rmp_serde::encode::write_named(out, m),
        Message::SignalPush(m) => rmp_serde::encode::write_named(out, m),
        Message::Migrate(m) => rmp_serde::encode::write_named(out, m),
    };
    // Writing into a Vec cannot fail for I/O; serde errors here would be a bug in our types.
    if r.is_err() {
        return Err(EncodeError::TooLarge);
    }
    if ty.is_authenticated() {
        let key = key.ok_or(EncodeError::MissingKey)?;
        let tag = mac_tag(key, out);
        out.extend_from_slice(&tag);
    }
    if out.len() > MAX_DATAGRAM {
        return Err(EncodeError::TooLarge);
    }
    Ok(())
}

fn body<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, DecodeError> {
    // The body must be a map (fixmap, map 16, map 32): rmp-serde would also take a struct from
    // a positional array, a second encoding the protocol does not have.
    if !matches!(b.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return Err(DecodeError::Malformed);
    }
    // Straight from the slice: no reader buffer to allocate. Trailing bytes after the map are
    // refused by `strict::check_bin_fields`, which walks the whole body afterwards.
    let mut de = rmp_serde::Deserializer::from_read_ref(b);
    de.set_max_depth(MAX_BODY_DEPTH);
    T::deserialize(&mut de).map_err(|_| DecodeError::Malformed)
}

/// Decodes a datagram. For authenticated types the MAC is *not* checked here (the key depends on
/// the session named in the body): call [`verify_mac`] before acting on the message.
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let h = peek_header(buf)?;
    let end = if h.ty.is_authenticated() {
        buf.len() - MAC_LEN
    } else {
        buf.len()
    };
    let b = &buf[HEADER_LEN..end];
    let msg = match h.ty {
        MsgType::Register => Message::Register(body(b)?),
        MsgType::Resume => Message::Resume(body(b)?),
        MsgType::Heartbeat => Message::Heartbeat(body(b)?),
        MsgType::Query => Message::Query(body(b)?),
        MsgType::Connect => Message::Connect(body(b)?),
        MsgType::Accept => Message::Accept(body(b)?),
        MsgType::Reject => Message::Reject(body(b)?),
        MsgType::Signal => Message::Signal(body(b)?),
        MsgType::Bye => Message::Bye(body(b)?),
        MsgType::PushAck => Message::PushAck(body(b)?),
        MsgType::Registered => Message::Registered(body(b)?),
        MsgType::HeartbeatAck => Message::HeartbeatAck(body(b)?),
        MsgType::QueryResult => Message::QueryResult(body(b)?),
        MsgType::Connected => Message::Connected(body(b)?),
        MsgType::ConnectFailed => Message::ConnectFailed(body(b)?),
        MsgType::Ack => Message::Ack(body(b)?),
        MsgType::Error => Message::Error(body(b)?),
        MsgType::SessionError => Message::SessionError(body(b)?),
        MsgType::Incoming => Message::Incoming(body(b)?),
        MsgType::SignalPush => Message::SignalPush(body(b)?),
        MsgType::Migrate => Message::Migrate(body(b)?),
    };
    // Binary fields must carry the `bin` marker (see `strict` for why serde alone cannot tell).
    strict::check_bin_fields(b, bin_fields(h.ty))?;
    if !msg.within_limits() {
        return Err(DecodeError::OutOfRange);
    }
    Ok(msg)
}

/// Pads a `Register` or `Resume` so its encoding reaches [`MIN_HELLO_LEN`] bytes.
pub fn encode_hello(msg: &mut Message) -> Result<Vec<u8>, EncodeError> {
    let set = |m: &mut Message, n: usize| match m {
        Message::Register(r) => r.pad = vec![0; n],
        Message::Resume(r) => r.pad = vec![0; n],
        _ => {}
    };
    set(msg, 0);
    let base = encode(msg, None)?.len();
    if base >= MIN_HELLO_LEN {
        return encode(msg, None);
    }
    // A bin's length prefix grows from 1 to 2 bytes past 255; try the exact fill, then adjust.
    let mut n = MIN_HELLO_LEN - base;
    loop {
        set(msg, n);
        let v = encode(msg, None)?;
        if v.len() >= MIN_HELLO_LEN {
            return Ok(v);
        }
        n += MIN_HELLO_LEN - v.len();
    }
}

#[cfg(test)]
mod tests {
    use crate::messages::bin_fields;
    use crate::strict::{written_bin_fields, BinShape};
    use crate::*;
    use uuid::Uuid;

    #[test]
    fn header_rejections() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(b"XX\x01\x01"), Err(DecodeError::BadMagic));
        assert_eq!(decode(b"SR\x02\x01"), Err(DecodeError::UnknownVersion));
        assert_eq!(decode(b"SR\x01\x7f"), Err(DecodeError::UnknownType));
        assert_eq!(decode(&[0x53; 1201]), Err(DecodeError::Oversized));
        assert_eq!(decode(b"SR\x01\x01\xc1"), Err(DecodeError::Malformed));
    }

    #[test]
    fn hello_is_padded_to_minimum() {
        let mut m = Message::Register(Register {
            rid: 1,
            local: vec![Addr("10.0.0.2:5000".parse().unwrap())],
            pad: vec![],
        });
        let b = encode_hello(&mut m).unwrap();
        assert!(
            b.len() >= MIN_HELLO_LEN && b.len() < MIN_HELLO_LEN + 4,
            "{}",
            b.len()
        );
        assert!(matches!(decode(&b).unwrap(), Message::Register(_)));
    }

    /// One message of every type, with every list non-empty and every option set.
    fn samples() -> Vec<Message> {
        let u = Uuid::from_u128(1);
        let a = Addr("192.0.2.1:4000".parse().unwrap());
        let p = || Payload::from(vec![1, 2]);
        let ans = || Answer {
            rid: 1,
            uuid: u,
            connection: u,
            payload: p(),
        };
        vec![
            Message::Register(Register {
                rid: 1,
                local: vec![a],
                pad: vec![0],
            }),
            Message::Resume(Resume {
                rid: 1,
                uuid: u,
                secret: Secret([1; 32]),
                local: vec![a],
                pad: vec![0],
            }),
            Message::Heartbeat(Heartbeat { rid: 1, uuid: u }),
            Message::Query(Query {
                rid: 1,
                uuid: u,
                uuids: vec![u],
            }),
            Message::Connect(Connect {
                rid: 1,
                uuid: u,
                to: u,
                payload: p(),
            }),
            Message::Accept(ans()),
            Message::Reject(ans()),
            Message::Signal(Signal {
                rid: 1,
                uuid: u,
                connection: u,
                payload: p(),
            }),
            Message::Bye(Bye { rid: 1, uuid: u }),
            Message::PushAck(PushAck { uuid: u, push: 1 }),
            Message::Registered(Registered {
                rid: 1,
                uuid: u,
                secret: Secret([1; 32]),
                observed: a,
                heartbeat_ms: 1,
                ttl_ms: 1,
            }),
            Message::HeartbeatAck(HeartbeatAck {
                rid: 1,
                observed: a,
            }),
            Message::QueryResult(QueryResult {
                rid: 1,
                online: vec![true],
            }),
            Message::Connected(Connected {
                rid: 1,
                connection: u,
                peer: u,
                observed: a,
                local: vec![a],
                payload: p(),
            }),
            Message::ConnectFailed(ConnectFailed {
                rid: 1,
                reason: FailReason::Rejected,
                payload: p(),
            }),
            Message::Ack(Ack { rid: 1 }),
            Message::Error(ErrorMsg {
                rid: 1,
                code: ErrorCode::Draining,
                to: Some(a),
            }),
            Message::SessionError(ErrorMsg {
                rid: 1,
                code: ErrorCode::RateLimited,
                to: Some(a),
            }),
            Message::Incoming(Incoming {
                push: 1,
                connection: u,
                from: u,
                observed: a,
                local: vec![a],
                payload: p(),
            }),
            Message::SignalPush(SignalPush {
                push: 1,
                connection: u,
                from: u,
                payload: p(),
            }),
            Message::Migrate(Migrate {
                push: 1,
                to: Some(a),
            }),
        ]
    }

    #[test]
    fn bin_field_table_matches_the_encoder() {
        let all = samples();
        let types: std::collections::BTreeSet<u8> = all.iter().map(|m| m.ty() as u8).collect();
        let registry = (0..=255u8)
            .filter(|b| MsgType::from_u8(*b).is_some())
            .count();
        assert_eq!(types.len(), registry, "a sample of every type");
        for m in all {
            let b = encode(&m, Some(&Secret([9; 32]))).unwrap();
            let end = b.len()
                - if m.ty().is_authenticated() {
                    MAC_LEN
                } else {
                    0
                };
            let written = written_bin_fields(&b[HEADER_LEN..end]);
            let table: Vec<(String, BinShape)> = bin_fields(m.ty())
                .iter()
                .map(|&(k, s)| {
                    let s = if s == BinShape::OptBin {
                        BinShape::Bin
                    } else {
                        s
                    };
                    (k.to_string(), s)
                })
                .collect();
            assert_eq!(written, table, "{:?}", m.ty());
        }
    }
}
