//! The message bodies of protocol v1, one struct per body, and [`Message`], which holds any of
//! them.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codes::{ErrorCode, FailReason};
use crate::header::MsgType;
#[cfg(doc)]
use crate::limits::{MAX_QUERY, MAX_TOKEN, MIN_HELLO_LEN};
use crate::strict::{self, BinField, BinShape};
use crate::types::{self, Addr, Payload, Secret};

/// `Register`: ask for a new session. Unauthenticated; padded to [`MIN_HELLO_LEN`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// Client-chosen request id.
    pub rid: u64,
    /// The client's local (LAN) addresses, for hole punching on the same network.
    pub local: Vec<Addr>,
    /// Address-validation token from a `Retry` (empty: none, and then absent from the wire,
    /// so the datagram is byte for byte what a client from before the field sends).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serde_bytes::serialize",
        deserialize_with = "strict::token"
    )]
    pub token: Vec<u8>,
    /// Padding so the datagram is at least [`MIN_HELLO_LEN`] bytes; content ignored.
    #[serde(
        serialize_with = "serde_bytes::serialize",
        deserialize_with = "strict::pad"
    )]
    pub pad: Vec<u8>,
}

/// `Resume`: take back a session after a reconnect, a new address or a node change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// Client-chosen request id.
    pub rid: u64,
    /// The session's UUID.
    #[serde(deserialize_with = "strict::uuid")]
    pub uuid: Uuid,
    /// The session secret, proof of ownership.
    pub secret: Secret,
    /// The client's local addresses.
    pub local: Vec<Addr>,
    /// Address-validation token from a `Retry` (empty: none, and then absent from the wire,
    /// so the datagram is byte for byte what a client from before the field sends).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serde_bytes::serialize",
        deserialize_with = "strict::token"
    )]
    pub token: Vec<u8>,
    /// Padding so the datagram is at least [`MIN_HELLO_LEN`] bytes; content ignored.
    #[serde(
        serialize_with = "serde_bytes::serialize",
        deserialize_with = "strict::pad"
    )]
    pub pad: Vec<u8>,
}

/// `Heartbeat`: keep the session alive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's session.
    #[serde(deserialize_with = "strict::uuid")]
    pub uuid: Uuid,
}

/// `Query`: which of these clients are online?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's session.
    #[serde(deserialize_with = "strict::uuid")]
    pub uuid: Uuid,
    /// The clients asked about (at most [`MAX_QUERY`]).
    #[serde(deserialize_with = "strict::uuids")]
    pub uuids: Vec<Uuid>,
}

/// `Connect`: ask to connect to another client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connect {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's session.
    #[serde(deserialize_with = "strict::uuid")]
    pub uuid: Uuid,
    /// The client to connect to.
    #[serde(deserialize_with = "strict::uuid")]
    pub to: Uuid,
    /// Opaque payload handed to the target in `Incoming`.
    #[serde(deserialize_with = "types::payload")]
    pub payload: Payload,
}

/// `Accept` or `Reject`: the target's answer to `Incoming`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's (target's) session.
    #[serde(deserialize_with = "strict::uuid")]
    pub uuid: Uuid,
    /// The connection from `Incoming`.
    #[serde(deserialize_with = "strict::uuid")]
    pub connection: Uuid,
    /// Opaque payload handed to the initiator.
    #[serde(deserialize_with = "types::payload")]
    pub payload: Payload,
}

/// `Signal`: relay a payload to the peer of a live connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's session.
    #[serde(deserialize_with = "strict::uuid")]
    pub uuid: Uuid,
    /// The connection.
    #[serde(deserialize_with = "strict::uuid")]
    pub connection: Uuid,
    /// Opaque payload.
    #[serde(deserialize_with = "types::payload")]
    pub payload: Payload,
}

/// `Bye`: end the session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bye {
    /// Client-chosen request id.
    pub rid: u64,
    /// The sender's session.
    #[serde(deserialize_with = "strict::uuid")]
    pub uuid: Uuid,
}

/// `PushAck`: acknowledge a server push.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushAck {
    /// The sender's session.
    #[serde(deserialize_with = "strict::uuid")]
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
    #[serde(deserialize_with = "strict::uuid")]
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
    #[serde(deserialize_with = "strict::uuid")]
    pub connection: Uuid,
    /// The peer's session UUID.
    #[serde(deserialize_with = "strict::uuid")]
    pub peer: Uuid,
    /// The peer's address as the server sees it.
    pub observed: Addr,
    /// The peer's local addresses.
    pub local: Vec<Addr>,
    /// The peer's `Accept` payload.
    #[serde(deserialize_with = "types::payload")]
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
    #[serde(deserialize_with = "types::payload")]
    pub payload: Payload,
}

/// `Ack`: the request was carried out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The request id being answered.
    pub rid: u64,
}

/// `Error` or `SessionError`: the request was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// The request id being answered (0 when it could not be read).
    pub rid: u64,
    /// What went wrong.
    pub code: ErrorCode,
    /// With [`ErrorCode::Draining`] in answer to `Register` or `Resume`: a node to go to
    /// instead. `None` otherwise, and then absent from the wire (the datagram is the same as
    /// before the field existed); receivers ignore it with any other code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Addr>,
}

impl ErrorMsg {
    /// A refusal without a redirect.
    pub fn new(rid: u64, code: ErrorCode) -> Self {
        Self {
            rid,
            code,
            to: None,
        }
    }
}

/// `Retry`: the answer to a `Register` or `Resume` that the node will carry out only once the
/// source has shown it receives at its address: send the same request again (a new request
/// id) with this token. Unauthenticated; never larger than the request it answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// The request id being answered.
    pub rid: u64,
    /// The token to send back, opaque to the client (at most [`MAX_TOKEN`] bytes).
    #[serde(
        serialize_with = "serde_bytes::serialize",
        deserialize_with = "strict::pad"
    )]
    pub token: Vec<u8>,
}

/// `Incoming` push: someone wants to connect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// Push id, echoed in `PushAck`; the client drops duplicates by it.
    pub push: u64,
    /// The connection's UUID, for `Accept`/`Reject`/`Signal`.
    #[serde(deserialize_with = "strict::uuid")]
    pub connection: Uuid,
    /// The initiator's session UUID.
    #[serde(deserialize_with = "strict::uuid")]
    pub from: Uuid,
    /// The initiator's address as the server sees it.
    pub observed: Addr,
    /// The initiator's local addresses.
    pub local: Vec<Addr>,
    /// The initiator's `Connect` payload.
    #[serde(deserialize_with = "types::payload")]
    pub payload: Payload,
}

/// `SignalPush` push: a payload from the peer of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalPush {
    /// Push id, echoed in `PushAck`.
    pub push: u64,
    /// The connection.
    #[serde(deserialize_with = "strict::uuid")]
    pub connection: Uuid,
    /// The peer that sent it.
    #[serde(deserialize_with = "strict::uuid")]
    pub from: Uuid,
    /// Opaque payload.
    #[serde(deserialize_with = "types::payload")]
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
    SessionError(ErrorMsg),
    Retry(Retry),
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
            Self::SessionError(_) => MsgType::SessionError,
            Self::Retry(_) => MsgType::Retry,
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
            Self::Error(m) | Self::SessionError(m) => m.rid,
            Self::Retry(m) => m.rid,
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
}

/// The binary fields of each type's body, for [`strict::check_bin_fields`]. A test checks this
/// table against what the encoder writes, so a new binary field cannot be forgotten here.
pub(crate) fn bin_fields(ty: MsgType) -> &'static [BinField] {
    use BinShape::{Bin, List, OptBin};
    match ty {
        MsgType::Register => &[("local", List), ("token", OptBin), ("pad", Bin)],
        MsgType::Resume => &[
            ("uuid", Bin),
            ("secret", Bin),
            ("local", List),
            ("token", OptBin),
            ("pad", Bin),
        ],
        MsgType::Heartbeat | MsgType::Bye | MsgType::PushAck => &[("uuid", Bin)],
        MsgType::Query => &[("uuid", Bin), ("uuids", List)],
        MsgType::Connect => &[("uuid", Bin), ("to", Bin), ("payload", Bin)],
        MsgType::Accept | MsgType::Reject | MsgType::Signal => {
            &[("uuid", Bin), ("connection", Bin), ("payload", Bin)]
        }
        MsgType::Registered => &[("uuid", Bin), ("secret", Bin), ("observed", Bin)],
        MsgType::HeartbeatAck => &[("observed", Bin)],
        MsgType::QueryResult | MsgType::Ack => &[],
        MsgType::Error | MsgType::SessionError => &[("to", OptBin)],
        MsgType::Retry => &[("token", Bin)],
        MsgType::Connected => &[
            ("connection", Bin),
            ("peer", Bin),
            ("observed", Bin),
            ("local", List),
            ("payload", Bin),
        ],
        MsgType::ConnectFailed => &[("payload", Bin)],
        MsgType::Incoming => &[
            ("connection", Bin),
            ("from", Bin),
            ("observed", Bin),
            ("local", List),
            ("payload", Bin),
        ],
        MsgType::SignalPush => &[("connection", Bin), ("from", Bin), ("payload", Bin)],
        MsgType::Migrate => &[("to", OptBin)],
    }
}
