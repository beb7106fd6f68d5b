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
//! Every message type except `Register`, `Resume`, `Registered` and `Error` ends with a 16-byte
//! MAC: HMAC-SHA256 keyed by the session secret over everything before it, truncated to 16
//! bytes. The receiver finds the key through the session named in the body and checks the tag in
//! constant time ([`verify_mac`]).
//!
//! # Layout
//! - [`Header`], [`MsgType`]: the fixed header and the type registry.
//! - [`Message`] and one struct per body: what travels.
//! - [`encode`], [`decode`], [`verify_mac`]: bytes in, bytes out, no I/O.
//! - [`Addr`], [`Secret`], [`Payload`]: wire forms of addresses, secrets and opaque payloads.
//! - [`is_stun`]: tells a STUN message apart from ours by its first byte and magic cookie.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_repr::Serialize_repr;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// First two bytes of every sigrouter datagram: ASCII "SR".
pub const MAGIC: [u8; 2] = [0x53, 0x52];
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header: magic, version, type.
pub const HEADER_LEN: usize = 4;
/// Length of the truncated HMAC-SHA256 tag on authenticated messages.
pub const MAC_LEN: usize = 16;
/// Largest datagram either side may send or accept.
pub const MAX_DATAGRAM: usize = 1200;
/// Smallest `Register` or `Resume` datagram the server answers. The client pads up to it, so the
/// answer (at most this long) is never larger than the request: no amplification.
pub const MIN_HELLO_LEN: usize = 256;
/// Largest opaque payload in `Connect`, `Accept`, `Reject` and `Signal`.
pub const MAX_PAYLOAD: usize = 1024;
/// Most local addresses a client may announce.
pub const MAX_LOCAL_ADDRS: usize = 4;
/// Most UUIDs in one `Query`.
pub const MAX_QUERY: usize = 32;
/// Length of a session secret.
pub const SECRET_LEN: usize = 32;

/// Message types. Requests from clients are below 0x80, server answers are 0x80..0x90, server
/// pushes (acknowledged and retransmitted) are 0x90 and up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgType {
    /// Client asks for a new session.
    Register = 0x01,
    /// Client takes back an existing session by UUID and secret.
    Resume = 0x02,
    /// Keeps a session alive; answered with the observed address.
    Heartbeat = 0x03,
    /// Asks which of some UUIDs are online.
    Query = 0x04,
    /// Asks to connect to another client.
    Connect = 0x05,
    /// Target accepts an incoming connection.
    Accept = 0x06,
    /// Target rejects an incoming connection.
    Reject = 0x07,
    /// Relays a signaling message to the peer of a connection.
    Signal = 0x08,
    /// Ends a session.
    Bye = 0x09,
    /// Acknowledges a server push.
    PushAck = 0x0A,
    /// Answer to `Register` and `Resume`.
    Registered = 0x81,
    /// Answer to `Heartbeat`.
    HeartbeatAck = 0x82,
    /// Answer to `Query`.
    QueryResult = 0x83,
    /// Answer to `Connect`: the peer accepted.
    Connected = 0x84,
    /// Answer to `Connect`: no connection.
    ConnectFailed = 0x85,
    /// Answer to `Accept`, `Reject`, `Signal` and `Bye`.
    Ack = 0x86,
    /// Request refused, with a code.
    Error = 0x87,
    /// Push: another client wants to connect.
    Incoming = 0x90,
    /// Push: a signaling message from the peer of a connection.
    SignalPush = 0x91,
    /// Push: resume on another node.
    Migrate = 0x92,
}

impl MsgType {
    /// Maps a type byte to a known type.
    pub fn from_u8(b: u8) -> Option<Self> {
        use MsgType::*;
        Some(match b {
            0x01 => Register,
            0x02 => Resume,
            0x03 => Heartbeat,
            0x04 => Query,
            0x05 => Connect,
            0x06 => Accept,
            0x07 => Reject,
            0x08 => Signal,
            0x09 => Bye,
            0x0A => PushAck,
            0x81 => Registered,
            0x82 => HeartbeatAck,
            0x83 => QueryResult,
            0x84 => Connected,
            0x85 => ConnectFailed,
            0x86 => Ack,
            0x87 => Error,
            0x90 => Incoming,
            0x91 => SignalPush,
            0x92 => Migrate,
            _ => return None,
        })
    }

    /// Whether datagrams of this type end with a MAC keyed by the session secret.
    pub fn is_authenticated(self) -> bool {
        !matches!(
            self,
            Self::Register | Self::Resume | Self::Registered | Self::Error
        )
    }

    /// Whether this type is a server push that the client must acknowledge with `PushAck`.
    pub fn is_push(self) -> bool {
        (self as u8) >= 0x90
    }

    /// A short lowercase name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        use MsgType::*;
        match self {
            Register => "register",
            Resume => "resume",
            Heartbeat => "heartbeat",
            Query => "query",
            Connect => "connect",
            Accept => "accept",
            Reject => "reject",
            Signal => "signal",
            Bye => "bye",
            PushAck => "push_ack",
            Registered => "registered",
            HeartbeatAck => "heartbeat_ack",
            QueryResult => "query_result",
            Connected => "connected",
            ConnectFailed => "connect_failed",
            Ack => "ack",
            Error => "error",
            Incoming => "incoming",
            SignalPush => "signal_push",
            Migrate => "migrate",
        }
    }
}

/// The fixed 4-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Message type.
    pub ty: MsgType,
}

/// Why a datagram was not decoded. Each variant is a counted drop on the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the header (plus MAC, for authenticated types).
    #[error("datagram truncated")]
    Truncated,
    /// Longer than [`MAX_DATAGRAM`].
    #[error("datagram larger than {MAX_DATAGRAM} bytes")]
    Oversized,
    /// Does not start with [`MAGIC`].
    #[error("bad magic")]
    BadMagic,
    /// A protocol version this codec does not speak.
    #[error("unsupported protocol version")]
    UnknownVersion,
    /// A type byte outside the registry.
    #[error("unknown message type")]
    UnknownType,
    /// The MessagePack body did not decode into the type's fields.
    #[error("malformed body")]
    Malformed,
    /// Decoded, but a field breaks a limit (payload size, list length, secret length).
    #[error("field out of range")]
    OutOfRange,
}

impl DecodeError {
    /// A short lowercase name, for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Oversized => "oversized",
            Self::BadMagic => "bad_magic",
            Self::UnknownVersion => "unknown_version",
            Self::UnknownType => "unknown_type",
            Self::Malformed => "malformed",
            Self::OutOfRange => "out_of_range",
        }
    }
}

/// Why a message could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded datagram would exceed [`MAX_DATAGRAM`].
    #[error("message larger than {MAX_DATAGRAM} bytes")]
    TooLarge,
    /// An authenticated type was encoded without a key.
    #[error("authenticated message needs a session secret")]
    MissingKey,
}

/// A socket address on the wire: MessagePack `bin` of 6 bytes (IPv4 address, port big-endian)
/// or 18 bytes (IPv6 address, port big-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Addr(pub SocketAddr);

impl fmt::Debug for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<SocketAddr> for Addr {
    fn from(a: SocketAddr) -> Self {
        Self(a)
    }
}

impl Addr {
    /// The 6- or 18-byte wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = match self.0.ip() {
            IpAddr::V4(ip) => ip.octets().to_vec(),
            IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        v.extend_from_slice(&self.0.port().to_be_bytes());
        v
    }

    /// Parses the 6- or 18-byte wire form.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let ip = match b.len() {
            6 => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            18 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&b[..16]);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return None,
        };
        let port = u16::from_be_bytes([b[b.len() - 2], b[b.len() - 1]]);
        Some(Self(SocketAddr::new(ip, port)))
    }
}

impl Serialize for Addr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.to_bytes())
    }
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        Self::from_bytes(&b)
            .ok_or_else(|| serde::de::Error::custom("address must be 6 or 18 bytes"))
    }
}

/// A 32-byte session secret, MessagePack `bin` 32. Compared in constant time; never printed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secret(pub [u8; SECRET_LEN]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Constant-time equality.
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// SHA-256 of the secret: what may be stored outside the owning node to validate a Resume.
    pub fn verifier(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"sigrouter-v1-resume");
        h.update(self.0);
        h.finalize().into()
    }

    /// Builds a secret from 32 bytes of randomness.
    pub fn from_bytes(b: [u8; SECRET_LEN]) -> Self {
        Self(b)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        let a: [u8; SECRET_LEN] = b
            .as_slice()
            .try_into()
            .map_err(|_| serde::de::Error::custom("secret must be 32 bytes"))?;
        Ok(Self(a))
    }
}

/// An opaque application payload, MessagePack `bin`, at most [`MAX_PAYLOAD`] bytes.
pub type Payload = serde_bytes::ByteBuf;

/// Why a connection attempt failed.
///
/// A value this version does not know decodes as [`FailReason::Other`] (a newer server may add
/// reasons): treat it as a generic failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize_repr)]
#[repr(u8)]
pub enum FailReason {
    /// The target is not online.
    Offline = 1,
    /// The target rejected the connection.
    Rejected = 2,
    /// The target did not answer in time.
    Timeout = 3,
    /// The router could not decide now (cluster state missing); try again shortly.
    RetryLater = 4,
    /// A reason this version does not know. Never sent by this version.
    Other = 255,
}

impl<'de> Deserialize<'de> for FailReason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match u64::deserialize(d)? {
            1 => Self::Offline,
            2 => Self::Rejected,
            3 => Self::Timeout,
            4 => Self::RetryLater,
            _ => Self::Other,
        })
    }
}

impl FailReason {
    /// A short lowercase name, for output and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Offline => "offline",
            Self::Rejected => "rejected",
            Self::Timeout => "timeout",
            Self::RetryLater => "retry-later",
            Self::Other => "other",
        }
    }
}

/// Stable error codes carried by `Error`.
///
/// A code this version does not know decodes as [`ErrorCode::Other`] (a newer server may add
/// codes): treat it as a generic failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize_repr)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request broke a protocol rule (for example a Connect to oneself).
    BadRequest = 1,
    /// Resume with an unknown UUID or a wrong secret.
    Unauthorized = 2,
    /// The session named in an authenticated request is not held here: Resume.
    UnknownSession = 3,
    /// Too many requests; slow down.
    RateLimited = 4,
    /// The node holds as many sessions as it may.
    Capacity = 5,
    /// The connection named in Accept, Reject or Signal is not known (or not yours).
    UnknownConnection = 6,
    /// The node is draining and takes no new sessions; go to another node.
    Draining = 7,
    /// Transient failure; retry shortly.
    RetryLater = 8,
    /// A code this version does not know. Never sent by this version.
    Other = 65535,
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match u64::deserialize(d)? {
            1 => Self::BadRequest,
            2 => Self::Unauthorized,
            3 => Self::UnknownSession,
            4 => Self::RateLimited,
            5 => Self::Capacity,
            6 => Self::UnknownConnection,
            7 => Self::Draining,
            8 => Self::RetryLater,
            _ => Self::Other,
        })
    }
}

impl ErrorCode {
    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::UnknownSession => "unknown_session",
            Self::RateLimited => "rate_limited",
            Self::Capacity => "capacity",
            Self::UnknownConnection => "unknown_connection",
            Self::Draining => "draining",
            Self::RetryLater => "retry_later",
            Self::Other => "other",
        }
    }
}

/// `Register`: ask for a new session. Unauthenticated; padded to [`MIN_HELLO_LEN`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// Client-chosen request id.
    pub rid: u64,
    /// The client's local (LAN) addresses, for hole punching on the same network.
    pub local: Vec<Addr>,
    /// Padding so the datagram is at least [`MIN_HELLO_LEN`] bytes; content ignored.
    #[serde(with = "serde_bytes")]
    pub pad: Vec<u8>,
}

/// `Resume`: take back a session after a reconnect, a new address or a node change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// Client-chosen request id.
    pub rid: u64,
    /// The session's UUID.
    pub uuid: Uuid,
    /// The session secret, proof of ownership.
    pub secret: Secret,
    /// The client's local addresses.
    pub local: Vec<Addr>,
    /// Padding so the datagram is at least [`MIN_HELLO_LEN`] bytes; content ignored.
    #[serde(with = "serde_bytes")]
    pub pad: Vec<u8>,
}

/// `Heartbeat`: keep the session alive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's session.
    pub uuid: Uuid,
}

/// `Query`: which of these clients are online?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's session.
    pub uuid: Uuid,
    /// The clients asked about (at most [`MAX_QUERY`]).
    pub uuids: Vec<Uuid>,
}

/// `Connect`: ask to connect to another client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connect {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's session.
    pub uuid: Uuid,
    /// The client to connect to.
    pub to: Uuid,
    /// Opaque payload handed to the target in `Incoming`.
    pub payload: Payload,
}

/// `Accept` or `Reject`: the target's answer to `Incoming`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's (target's) session.
    pub uuid: Uuid,
    /// The connection from `Incoming`.
    pub connection: Uuid,
    /// Opaque payload handed to the initiator.
    pub payload: Payload,
}

/// `Signal`: relay a payload to the peer of a live connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's session.
    pub uuid: Uuid,
    /// The connection.
    pub connection: Uuid,
    /// Opaque payload.
    pub payload: Payload,
}

/// `Bye`: end the session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bye {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's session.
    pub uuid: Uuid,
}

/// `PushAck`: acknowledge a server push.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushAck {
    /// The sender's session.
    pub uuid: Uuid,
    /// The `push` id of the acknowledged push.
    pub push: u64,
}

/// `Registered`: the answer to `Register` and `Resume`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The request id being answered.
    pub rid: u64,
    /// The session's UUID.
    pub uuid: Uuid,
    /// The session secret (keys every later MAC).
    pub secret: Secret,
    /// The client's address as the server sees it.
    pub observed: Addr,
    /// How often to send `Heartbeat`, in milliseconds.
    pub heartbeat_ms: u32,
    /// How long the session lives without a heartbeat, in milliseconds.
    pub ttl_ms: u32,
}

/// `HeartbeatAck`: the answer to `Heartbeat`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// The request id being answered.
    pub rid: u64,
    /// The client's address as the server sees it now.
    pub observed: Addr,
}

/// `QueryResult`: the answer to `Query`, one flag per asked UUID in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryResult {
    /// The request id being answered.
    pub rid: u64,
    /// Online flags, in the order of `Query::uuids`.
    pub online: Vec<bool>,
}

/// `Connected`: the target accepted; here is how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    /// The request id of the `Connect`.
    pub rid: u64,
    /// The connection's UUID, for `Signal`.
    pub connection: Uuid,
    /// The peer's session UUID.
    pub peer: Uuid,
    /// The peer's address as the server sees it.
    pub observed: Addr,
    /// The peer's local addresses.
    pub local: Vec<Addr>,
    /// The peer's `Accept` payload.
    pub payload: Payload,
}

/// `ConnectFailed`: no connection, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectFailed {
    /// The request id of the `Connect`.
    pub rid: u64,
    /// Why.
    pub reason: FailReason,
    /// The target's `Reject` payload (empty otherwise).
    pub payload: Payload,
}

/// `Ack`: the request was carried out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The request id being answered.
    pub rid: u64,
}

/// `Error`: the request was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// The request id being answered (0 when it could not be read).
    pub rid: u64,
    /// What went wrong.
    pub code: ErrorCode,
}

/// `Incoming` push: someone wants to connect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// Push id, echoed in `PushAck`; the client drops duplicates by it.
    pub push: u64,
    /// The connection's UUID, for `Accept`/`Reject`/`Signal`.
    pub connection: Uuid,
    /// The initiator's session UUID.
    pub from: Uuid,
    /// The initiator's address as the server sees it.
    pub observed: Addr,
    /// The initiator's local addresses.
    pub local: Vec<Addr>,
    /// The initiator's `Connect` payload.
    pub payload: Payload,
}

/// `SignalPush` push: a payload from the peer of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalPush {
    /// Push id, echoed in `PushAck`.
    pub push: u64,
    /// The connection.
    pub connection: Uuid,
    /// The peer that sent it.
    pub from: Uuid,
    /// Opaque payload.
    pub payload: Payload,
}

/// `Migrate` push: resume the session on another node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migrate {
    /// Push id, echoed in `PushAck`.
    pub push: u64,
    /// Where to resume; absent means "the public address again, from a new local port".
    pub to: Option<Addr>,
}

/// Every message of protocol v1.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Message {
    Register(Register),
    Resume(Resume),
    Heartbeat(Heartbeat),
    Query(Query),
    Connect(Connect),
    Accept(Answer),
    Reject(Answer),
    Signal(Signal),
    Bye(Bye),
    PushAck(PushAck),
    Registered(Registered),
    HeartbeatAck(HeartbeatAck),
    QueryResult(QueryResult),
    Connected(Connected),
    ConnectFailed(ConnectFailed),
    Ack(Ack),
    Error(ErrorMsg),
    Incoming(Incoming),
    SignalPush(SignalPush),
    Migrate(Migrate),
}

impl Message {
    /// The type byte of this message.
    pub fn ty(&self) -> MsgType {
        match self {
            Self::Register(_) => MsgType::Register,
            Self::Resume(_) => MsgType::Resume,
            Self::Heartbeat(_) => MsgType::Heartbeat,
            Self::Query(_) => MsgType::Query,
            Self::Connect(_) => MsgType::Connect,
            Self::Accept(_) => MsgType::Accept,
            Self::Reject(_) => MsgType::Reject,
            Self::Signal(_) => MsgType::Signal,
            Self::Bye(_) => MsgType::Bye,
            Self::PushAck(_) => MsgType::PushAck,
            Self::Registered(_) => MsgType::Registered,
            Self::HeartbeatAck(_) => MsgType::HeartbeatAck,
            Self::QueryResult(_) => MsgType::QueryResult,
            Self::Connected(_) => MsgType::Connected,
            Self::ConnectFailed(_) => MsgType::ConnectFailed,
            Self::Ack(_) => MsgType::Ack,
            Self::Error(_) => MsgType::Error,
            Self::Incoming(_) => MsgType::Incoming,
            Self::SignalPush(_) => MsgType::SignalPush,
            Self::Migrate(_) => MsgType::Migrate,
        }
    }

    /// The session UUID a client request names as its sender, if any.
    pub fn sender(&self) -> Option<Uuid> {
        Some(match self {
            Self::Resume(m) => m.uuid,
            Self::Heartbeat(m) => m.uuid,
            Self::Query(m) => m.uuid,
            Self::Connect(m) => m.uuid,
            Self::Accept(m) | Self::Reject(m) => m.uuid,
            Self::Signal(m) => m.uuid,
            Self::Bye(m) => m.uuid,
            Self::PushAck(m) => m.uuid,
            _ => return None,
        })
    }

    /// The request id a request carries or an answer echoes, if any.
    pub fn rid(&self) -> Option<u64> {
        Some(match self {
            Self::Register(m) => m.rid,
            Self::Resume(m) => m.rid,
            Self::Heartbeat(m) => m.rid,
            Self::Query(m) => m.rid,
            Self::Connect(m) => m.rid,
            Self::Accept(m) | Self::Reject(m) => m.rid,
            Self::Signal(m) => m.rid,
            Self::Bye(m) => m.rid,
            Self::Registered(m) => m.rid,
            Self::HeartbeatAck(m) => m.rid,
            Self::QueryResult(m) => m.rid,
            Self::Connected(m) => m.rid,
            Self::ConnectFailed(m) => m.rid,
            Self::Ack(m) => m.rid,
            Self::Error(m) => m.rid,
            _ => return None,
        })
    }

    /// The push id of a server push, if this is one.
    pub fn push_id(&self) -> Option<u64> {
        Some(match self {
            Self::Incoming(m) => m.push,
            Self::SignalPush(m) => m.push,
            Self::Migrate(m) => m.push,
            _ => return None,
        })
    }

    /// Checks the limits that MessagePack alone does not enforce.
    fn check_limits(&self) -> bool {
        let p = |p: &Payload| p.len() <= MAX_PAYLOAD;
        let l = |l: &[Addr]| l.len() <= MAX_LOCAL_ADDRS;
        match self {
            Self::Register(m) => l(&m.local),
            Self::Resume(m) => l(&m.local),
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

type HmacSha256 = Hmac<Sha256>;

fn mac_tag(key: &Secret, data: &[u8]) -> [u8; MAC_LEN] {
    // A 32-byte key is always a valid HMAC key.
    let mut m = <HmacSha256 as Mac>::new_from_slice(&key.0).expect("hmac takes any key length");
    m.update(data);
    let full = m.finalize().into_bytes();
    let mut tag = [0u8; MAC_LEN];
    tag.copy_from_slice(&full[..MAC_LEN]);
    tag
}

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
        Message::Error(m) => rmp_serde::encode::write_named(out, m),
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

/// Reads and checks the fixed header only: cheap, and enough to reject unknown versions and
/// types before the body is looked at.
pub fn peek_header(buf: &[u8]) -> Result<Header, DecodeError> {
    if buf.len() > MAX_DATAGRAM {
        return Err(DecodeError::Oversized);
    }
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    if buf[0..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if buf[2] != VERSION {
        return Err(DecodeError::UnknownVersion);
    }
    let ty = MsgType::from_u8(buf[3]).ok_or(DecodeError::UnknownType)?;
    if ty.is_authenticated() && buf.len() < HEADER_LEN + MAC_LEN + 1 {
        return Err(DecodeError::Truncated);
    }
    Ok(Header { ty })
}

/// Deepest MessagePack nesting a body may have, counting the body map itself: 7 levels. The
/// deepest v1 field is an array of `bin` in the body map (2 levels); the rest leaves room for
/// unknown fields of later minor versions. rmp-serde's default limit (1024) let one 1200-byte
/// datagram of nested arrays in an ignored field overflow the decoding thread's stack.
const MAX_BODY_DEPTH: usize = 8;

fn body<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, DecodeError> {
    // The body must be a map (fixmap, map 16, map 32): rmp-serde would also take a struct from
    // a positional array, a second encoding the protocol does not have.
    if !matches!(b.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return Err(DecodeError::Malformed);
    }
    let mut rest = b;
    let mut de = rmp_serde::Deserializer::new(&mut rest);
    de.set_max_depth(MAX_BODY_DEPTH);
    let v = T::deserialize(&mut de).map_err(|_| DecodeError::Malformed)?;
    // Trailing bytes after the map are a malformed datagram, not something to ignore.
    if !rest.is_empty() {
        return Err(DecodeError::Malformed);
    }
    Ok(v)
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
        MsgType::Incoming => Message::Incoming(body(b)?),
        MsgType::SignalPush => Message::SignalPush(body(b)?),
        MsgType::Migrate => Message::Migrate(body(b)?),
    };
    if !msg.check_limits() {
        return Err(DecodeError::OutOfRange);
    }
    Ok(msg)
}

/// Checks the MAC at the end of an authenticated datagram in constant time. Returns false for
/// unauthenticated types and short datagrams.
pub fn verify_mac(buf: &[u8], key: &Secret) -> bool {
    let Ok(h) = peek_header(buf) else {
        return false;
    };
    if !h.ty.is_authenticated() {
        return false;
    }
    let (data, tag) = buf.split_at(buf.len() - MAC_LEN);
    let expect = mac_tag(key, data);
    expect.ct_eq(tag).into()
}

/// STUN magic cookie (RFC 8489 section 5).
pub const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// True when a datagram looks like STUN: the two top bits of the first byte are zero and bytes
/// 4..8 hold the magic cookie. Our magic starts with 0x53 (top bits 01), so the two never clash.
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= 20 && buf[0] & 0xC0 == 0 && buf[4..8] == STUN_MAGIC_COOKIE
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
    use super::*;

    fn key() -> Secret {
        Secret([7; 32])
    }

    #[test]
    fn roundtrip_authenticated_and_mac_checks() {
        let m = Message::Heartbeat(Heartbeat {
            rid: 9,
            uuid: Uuid::from_u128(1),
        });
        let b = encode(&m, Some(&key())).unwrap();
        assert_eq!(decode(&b).unwrap(), m);
        assert!(verify_mac(&b, &key()));
        assert!(!verify_mac(&b, &Secret([8; 32])));
        let mut bad = b.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(!verify_mac(&bad, &key()));
    }

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

    #[test]
    fn unknown_codes_decode_as_other() {
        // Error{rid: 7, code: 999}: a code from a newer server.
        let mut b = vec![0x53, 0x52, 0x01, 0x87, 0x82];
        b.extend_from_slice(&[
            0xA3, b'r', b'i', b'd', 0x07, 0xA4, b'c', b'o', b'd', b'e', 0xCD, 0x03, 0xE7,
        ]);
        assert_eq!(
            decode(&b).unwrap(),
            Message::Error(ErrorMsg {
                rid: 7,
                code: ErrorCode::Other
            })
        );
    }

    #[test]
    fn stun_demux() {
        let mut s = [0u8; 20];
        s[1] = 1;
        s[4..8].copy_from_slice(&STUN_MAGIC_COOKIE);
        assert!(is_stun(&s));
        assert!(!is_stun(b"SR\x01\x01................"));
    }
}
