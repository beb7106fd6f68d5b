//! Sans-IO codec for the sigrouter signaling protocol, version 1.
//!
//! One message travels in one UDP datagram of at most [`MAX_DATAGRAM`] bytes:
//!
//! ```text
//! +------+------+---------+------+---------------------------+-----------------+
//! | 0x53 | 0x52 | version | type | MessagePack body (a map)  | MAC (16 bytes)  |
//! +------+------+---------+------+---------------------------+-----------------+
//!   magic "SR"    1 byte    1 byte                              authenticated types only
//! ```
//!
//! The header is checked before anything is decoded, so datagrams with an unknown version or
//! type are rejected without touching the body. The body is a MessagePack map with named fields
//! (see `docs/PROTOCOL.md`), so any language's MessagePack library can speak it.
//!
//! Every message type except `Register`, `Resume`, `Registered`, `Error` and `Retry` ends with a 16-byte
//! MAC: HMAC-SHA256 keyed by the session secret over everything before it, truncated to 16
//! bytes. The receiver finds the key through the session named in the body and checks the tag in
//! constant time ([`verify_mac`]).
//!
//! # Layout
//!
//! Each concern lives in its own module; everything public is re-exported here, so every item
//! is reached as `sigrouter_proto::Item`. This file only declares and re-exports.
//!
//! Imports point one way, from the top of this list to the bottom: a module uses only modules
//! listed below it (`scripts/check-imports.py` fails on a cycle).
//!
//! - `codec`: [`encode`], [`decode`], [`encode_hello`]: bytes in, bytes out, no I/O.
//! - `sizes`: [`max_len`] of every type and [`MAX_PAYLOAD`], derived from it so that every
//!   answer and push a valid request causes can be encoded; [`Message::within_limits`].
//! - `mac`: [`verify_mac`], and the tag the encoder appends.
//! - `messages`: [`Message`] and one struct per body: what travels; which body fields are
//!   binary.
//! - `header`: [`MAGIC`], [`VERSION`], [`Header`], [`MsgType`] (the type registry),
//!   [`HEADER_LEN`], [`MAC_LEN`] and [`peek_header`], the check that runs before any body is
//!   looked at.
//! - `types`: [`Addr`], [`Secret`], [`Payload`]: wire forms of addresses, secrets and opaque
//!   payloads.
//! - `strict`: binary fields decode from MessagePack `bin` only (deserializers and a marker
//!   check).
//! - `error`: [`DecodeError`] and [`EncodeError`].
//! - `limits`: the limits the protocol picks: [`MAX_DATAGRAM`], [`MIN_HELLO_LEN`],
//!   [`MAX_LOCAL_ADDRS`], [`MAX_QUERY`], [`MAX_TOKEN`] and the body nesting depth.
//! - `codes`: [`FailReason`] and [`ErrorCode`], the enumerations carried in bodies.
//! - `stun`: [`is_stun`] tells a STUN message apart from ours by its first byte and magic cookie.

mod codec;
mod codes;
mod error;
mod header;
mod limits;
mod mac;
mod messages;
mod sizes;
mod strict;
mod stun;
mod types;

pub use codec::{decode, encode, encode_hello, encode_into};
pub use codes::{ErrorCode, FailReason};
pub use error::{DecodeError, EncodeError};
pub use header::{peek_header, Header, MsgType, HEADER_LEN, MAC_LEN, MAGIC, VERSION};
pub use limits::{MAX_DATAGRAM, MAX_LOCAL_ADDRS, MAX_QUERY, MAX_TOKEN, MIN_HELLO_LEN};
pub use mac::verify_mac;
pub use messages::{
    Ack, Answer, Bye, Connect, ConnectFailed, Connected, ErrorMsg, Heartbeat, HeartbeatAck,
    Incoming, Message, Migrate, PushAck, Query, QueryResult, Register, Registered, Resume, Retry,
    Signal, SignalPush,
};
pub use sizes::{max_len, MAX_PAYLOAD};
pub use stun::{is_stun, STUN_MAGIC_COOKIE};
pub use types::{Addr, Payload, Secret, SECRET_LEN};
