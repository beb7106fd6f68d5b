//! The frame around a body: the fixed header (magic, version, the message type registry), the
//! length of the MAC that ends authenticated types, and the check that runs before any body is
//! looked at.

use crate::error::DecodeError;
use crate::limits::MAX_DATAGRAM;

/// First two bytes of every sigrouter datagram: ASCII "SR".
pub const MAGIC: [u8; 2] = [0x53, 0x52];
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header: magic, version, type.
pub const HEADER_LEN: usize = 4;
/// Length of the truncated HMAC-SHA256 tag on authenticated messages.
pub const MAC_LEN: usize = 16;

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
    /// Request refused, with a code. Unauthenticated: the answer to `Register` and `Resume`,
    /// and to requests whose session is not known here.
    Error = 0x87,
    /// Request refused, with a code, MAC'd with the session's secret: the answer to an
    /// authenticated request of a known session. Same body as `Error`.
    SessionError = 0x88,
    /// Answer to `Register` or `Resume` when the node wants proof that the source can receive
    /// at its address: send the request again with the token it carries. Unauthenticated.
    Retry = 0x89,
    /// Push: another client wants to connect.
    Incoming = 0x90,
    /// Push: a signaling message from the peer of a connection.
    SignalPush = 0x91,
    /// Push: resume on another node.
    Migrate = 0x92,
}

impl MsgType {
    /// Maps a type byte to a known type.
    pub const fn from_u8(b: u8) -> Option<Self> {
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
            0x88 => SessionError,
            0x89 => Retry,
            0x90 => Incoming,
            0x91 => SignalPush,
            0x92 => Migrate,
            _ => return None,
        })
    }

    /// Whether datagrams of this type end with a MAC keyed by the session secret.
    pub const fn is_authenticated(self) -> bool {
        !matches!(
            self,
            Self::Register | Self::Resume | Self::Registered | Self::Error | Self::Retry
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
            SessionError => "session_error",
            Retry => "retry",
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
