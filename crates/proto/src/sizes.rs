//! The largest encoding of each message type, and the payload limit derived from it.
//!
//! The rule: **every request that decodes can have each answer and push it causes encoded
//! within [`MAX_DATAGRAM`]**. A router that decodes a request it cannot answer leaves the client
//! waiting for nothing (a `Connect` whose `Incoming` is too large would time out after the
//! connect timeout). So the limits a decoder enforces are derived from the largest answers and
//! pushes, not picked separately.
//!
//! The largest message any request causes is the `Incoming` push a `Connect` causes: it carries
//! the initiator's payload together with its observed address and its local addresses (up to
//! [`MAX_LOCAL_ADDRS`]), all IPv6 in the worst case, and a push id that may be as large as
//! `u64::MAX`. [`MAX_PAYLOAD`] is what is left of a datagram once everything else in it is at
//! its largest ([`max_len`] without the payload bytes), over `Incoming`, `Connected` (the same
//! fields for the target's `Accept` payload), `SignalPush` and `ConnectFailed` (the `Reject`
//! payload). Every other answer has fixed-size fields whose largest encoding is far below the
//! limit; [`max_len`] gives each type's bound and the assertions at the end of this file check
//! them when the crate compiles.
//!
//! The lengths count MessagePack encodings at their largest: integers at their widest form
//! (`u64::MAX` is `0xcf` and 8 bytes), addresses as IPv6, lists full.

use crate::header::{MsgType, HEADER_LEN, MAC_LEN};
use crate::limits::{MAX_DATAGRAM, MAX_LOCAL_ADDRS, MAX_QUERY, MAX_TOKEN, MIN_HELLO_LEN};
use crate::messages::Message;
use crate::types::{Addr, Payload, SECRET_LEN};

/// Largest opaque payload in `Connect`, `Accept`, `Reject` and `Signal` (and so in the
/// `Incoming`, `Connected`, `ConnectFailed` and `SignalPush` that carry it on): 986 bytes, what
/// the worst-case `Incoming` leaves of [`MAX_DATAGRAM`]. See the module documentation.
pub const MAX_PAYLOAD: usize = MAX_DATAGRAM - PAYLOAD_CARRIER_OVERHEAD;

/// The largest of the payload carriers' lengths without payload bytes.
const PAYLOAD_CARRIER_OVERHEAD: usize = max(
    max(overhead(MsgType::Incoming), overhead(MsgType::Connected)),
    max(
        overhead(MsgType::SignalPush),
        overhead(MsgType::ConnectFailed),
    ),
);

/// The body map: a fixmap (one byte) as long as a body has at most 15 fields, which all do.
const MAP: usize = 1;
/// A `u64` at its largest: `0xcf` and 8 bytes. Request ids and push ids.
const U64: usize = 1 + 8;
/// A `u32` at its largest: `0xce` and 4 bytes. `heartbeat_ms`, `ttl_ms`.
const U32: usize = 1 + 4;
/// A `bool`: one byte.
const BOOL: usize = 1;
/// A `FailReason` (a `u8`) at its largest: `0xcc` and 1 byte.
const REASON: usize = 1 + 1;
/// An `ErrorCode` (a `u16`) at its largest: `0xcd` and 2 bytes.
const CODE: usize = 1 + 2;
/// A UUID: `bin 8` (`0xc4`, length) of 16 bytes.
const UUID: usize = 2 + 16;
/// A secret: `bin 8` of [`SECRET_LEN`] bytes.
const SECRET: usize = 2 + SECRET_LEN;
/// An address at its largest, IPv6: `bin 8` of 16 address and 2 port bytes (IPv4 is 8).
const ADDR: usize = 2 + 18;
/// A full local address list: array header and [`MAX_LOCAL_ADDRS`] IPv6 addresses.
const LOCALS: usize = array(MAX_LOCAL_ADDRS) + MAX_LOCAL_ADDRS * ADDR;
/// A full `Query` list: array header and [`MAX_QUERY`] UUIDs.
const UUIDS: usize = array(MAX_QUERY) + MAX_QUERY * UUID;
/// A full `QueryResult` list: array header and [`MAX_QUERY`] flags.
const ONLINE: usize = array(MAX_QUERY) + MAX_QUERY * BOOL;
/// A full token: `bin 8` of [`MAX_TOKEN`] bytes (checked below to fit a `bin 8`).
const TOKEN: usize = 2 + MAX_TOKEN;
/// A payload's `bin` header at its largest: `bin 16` (`0xc5` and a 2-byte length), since
/// [`MAX_PAYLOAD`] is between 256 and 65535 (checked below). The payload bytes come on top.
const PAYLOAD_HEADER: usize = 1 + 2;

/// An array header: fixarray up to 15 elements, `array 16` (3 bytes) up to 65535.
const fn array(n: usize) -> usize {
    if n <= 15 {
        1
    } else {
        3
    }
}

/// A field: its key (a fixstr: one byte and the name) and its value's length.
const fn field(name: &str, value: usize) -> usize {
    1 + name.len() + value
}

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// The largest encoding of a message of type `ty` with every field at its largest, except that
/// payload bytes are not counted (their header is). Register and Resume are padded by the
/// client to any length: their bound is the datagram.
const fn overhead(ty: MsgType) -> usize {
    use MsgType::*;
    let body = match ty {
        Register | Resume => return MAX_DATAGRAM,
        Heartbeat | Bye => field("rid", U64) + field("uuid", UUID),
        Query => field("rid", U64) + field("uuid", UUID) + field("uuids", UUIDS),
        Connect => {
            field("rid", U64)
                + field("uuid", UUID)
                + field("to", UUID)
                + field("payload", PAYLOAD_HEADER)
        }
        Accept | Reject | Signal => {
            field("rid", U64)
                + field("uuid", UUID)
                + field("connection", UUID)
                + field("payload", PAYLOAD_HEADER)
        }
        PushAck => field("uuid", UUID) + field("push", U64),
        Registered => {
            field("rid", U64)
                + field("uuid", UUID)
                + field("secret", SECRET)
                + field("observed", ADDR)
                + field("heartbeat_ms", U32)
                + field("ttl_ms", U32)
        }
        HeartbeatAck => field("rid", U64) + field("observed", ADDR),
        QueryResult => field("rid", U64) + field("online", ONLINE),
        Connected => {
            field("rid", U64)
                + field("connection", UUID)
                + field("peer", UUID)
                + field("observed", ADDR)
                + field("local", LOCALS)
                + field("payload", PAYLOAD_HEADER)
        }
        ConnectFailed => {
            field("rid", U64) + field("reason", REASON) + field("payload", PAYLOAD_HEADER)
        }
        Ack => field("rid", U64),
        Error | SessionError => field("rid", U64) + field("code", CODE) + field("to", ADDR),
        Retry => field("rid", U64) + field("token", TOKEN),
        Incoming => {
            field("push", U64)
                + field("connection", UUID)
                + field("from", UUID)
                + field("observed", ADDR)
                + field("local", LOCALS)
                + field("payload", PAYLOAD_HEADER)
        }
        SignalPush => {
            field("push", U64)
                + field("connection", UUID)
                + field("from", UUID)
                + field("payload", PAYLOAD_HEADER)
        }
        Migrate => field("push", U64) + field("to", ADDR),
    };
    let mac = if ty.is_authenticated() { MAC_LEN } else { 0 };
    HEADER_LEN + MAP + body + mac
}

/// The largest datagram a message of type `ty` encodes to when it is within the limits:
/// every integer at its widest, every address IPv6, every list full, a payload of
/// [`MAX_PAYLOAD`] bytes. `Register` and `Resume` are padded to any length, so theirs is
/// [`MAX_DATAGRAM`]. For every type it is at most [`MAX_DATAGRAM`], so any message that
/// [`Message::within_limits`] accepts encodes.
pub const fn max_len(ty: MsgType) -> usize {
    let payload = match ty {
        MsgType::Connect
        | MsgType::Accept
        | MsgType::Reject
        | MsgType::Signal
        | MsgType::Connected
        | MsgType::ConnectFailed
        | MsgType::Incoming
        | MsgType::SignalPush => MAX_PAYLOAD,
        _ => 0,
    };
    overhead(ty) + payload
}

impl Message {
    /// Whether the message keeps the limits that MessagePack alone does not enforce (payload
    /// size, list lengths). [`decode`](crate::decode) refuses a message that does not
    /// (`OutOfRange`); within them, the message and every answer and push it can cause
    /// encode ([`max_len`]). Use it on messages that did not come through `decode`, such as
    /// a request forwarded by another node, before building answers from them.
    pub fn within_limits(&self) -> bool {
        let p = |p: &Payload| p.len() <= MAX_PAYLOAD;
        let l = |l: &[Addr]| l.len() <= MAX_LOCAL_ADDRS;
        match self {
            Self::Register(m) => l(&m.local) && m.token.len() <= MAX_TOKEN,
            Self::Resume(m) => l(&m.local) && m.token.len() <= MAX_TOKEN,
            Self::Retry(m) => m.token.len() <= MAX_TOKEN,
            Self::Query(m) => m.uuids.len() <= MAX_QUERY,
            Self::QueryResult(m) => m.online.len() <= MAX_QUERY,
            Self::Connect(m) => p(&m.payload),
            Self::Accept(m) | Self::Reject(m) => p(&m.payload),
            Self::Signal(m) => p(&m.payload),
            Self::Connected(m) => p(&m.payload) && l(&m.local),
            Self::ConnectFailed(m) => p(&m.payload),
            Self::Incoming(m) => p(&m.payload) && l(&m.local),
            Self::SignalPush(m) => p(&m.payload),
            _ => true,
        }
    }
}

// The arithmetic's own assumptions, and the rule, checked when the crate compiles.
const _: () = {
    // PAYLOAD_HEADER assumes a bin 16; LOCALS a fixarray.
    assert!(MAX_PAYLOAD >= 256 && MAX_PAYLOAD <= 65535);
    assert!(MAX_LOCAL_ADDRS <= 15);
    // TOKEN assumes a bin 8.
    assert!(MAX_TOKEN <= 255);
    // Every type, at its largest, fits in a datagram.
    let mut b = 0u8;
    loop {
        if let Some(ty) = MsgType::from_u8(b) {
            assert!(max_len(ty) <= MAX_DATAGRAM);
        }
        if b == u8::MAX {
            break;
        }
        b += 1;
    }
    // Answers to the unauthenticated Register and Resume are never larger than the smallest
    // request the server answers (section 14 of PROTOCOL.md: no amplification).
    assert!(max_len(MsgType::Registered) <= MIN_HELLO_LEN);
    assert!(max_len(MsgType::Error) <= MIN_HELLO_LEN);
    assert!(max_len(MsgType::Retry) <= MIN_HELLO_LEN);
};

#[cfg(test)]
mod tests {
    use crate::*;
    use uuid::Uuid;

    fn key() -> Secret {
        Secret([7; 32])
    }

    #[test]
    fn oversized_payload_is_out_of_range() {
        let m = Message::Signal(Signal {
            rid: 1,
            uuid: Uuid::nil(),
            connection: Uuid::nil(),
            payload: Payload::from(vec![1; MAX_PAYLOAD + 1]),
        });
        let b = encode(&m, Some(&key())).unwrap();
        assert_eq!(decode(&b), Err(DecodeError::OutOfRange));
    }
}
