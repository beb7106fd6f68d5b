//! Bounded label values: why datagrams were dropped, why the cluster port refused one, the
//! request types and Connect outcomes counted.

use sigrouter_proto::{DecodeError, MsgType};

/// Why a datagram was dropped without an answer. Bounded: used as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The codec rejected it.
    Decode(DecodeError),
    /// A message type only the server sends.
    WrongDirection,
    /// MAC missing or wrong for the named session.
    BadMac,
    /// A Register or Resume shorter than the padding rule.
    Unpadded,
    /// An answer to an unauthenticated request would have been larger than the request.
    Amplification,
    /// A STUN datagram that is not a well-formed Binding request.
    Stun,
    /// Rate limited without an answer (answers would feed a flood).
    RateLimited,
    /// A node-to-node datagram without a valid cluster MAC, or replayed.
    ClusterAuth,
    /// An authenticated request seen before and no longer remembered, or older than the
    /// replay window.
    Replay,
}

impl DropReason {
    pub(super) const ALL: [Self; 15] = [
        Self::Decode(DecodeError::Truncated),
        Self::Decode(DecodeError::Oversized),
        Self::Decode(DecodeError::BadMagic),
        Self::Decode(DecodeError::UnknownVersion),
        Self::Decode(DecodeError::UnknownType),
        Self::Decode(DecodeError::Malformed),
        Self::Decode(DecodeError::OutOfRange),
        Self::WrongDirection,
        Self::BadMac,
        Self::Unpadded,
        Self::Amplification,
        Self::Stun,
        Self::RateLimited,
        Self::ClusterAuth,
        Self::Replay,
    ];

    pub(super) fn index(self) -> usize {
        match self {
            Self::Decode(e) => e as usize,
            Self::WrongDirection => 7,
            Self::BadMac => 8,
            Self::Unpadded => 9,
            Self::Amplification => 10,
            Self::Stun => 11,
            Self::RateLimited => 12,
            Self::ClusterAuth => 13,
            Self::Replay => 14,
        }
    }

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Decode(e) => e.name(),
            Self::WrongDirection => "wrong_direction",
            Self::BadMac => "bad_mac",
            Self::Unpadded => "unpadded",
            Self::Amplification => "amplification",
            Self::Stun => "stun",
            Self::RateLimited => "rate_limited",
            Self::ClusterAuth => "cluster_auth",
            Self::Replay => "replay",
        }
    }
}

pub(super) const REQ_TYPES: [MsgType; 10] = [
    MsgType::Register,
    MsgType::Resume,
    MsgType::Heartbeat,
    MsgType::Query,
    MsgType::Connect,
    MsgType::Accept,
    MsgType::Reject,
    MsgType::Signal,
    MsgType::Bye,
    MsgType::PushAck,
];

/// Why a node-to-node datagram was refused. Bounded: used as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterRefusal {
    /// Missing or wrong MAC (another cluster key, or a forgery).
    BadMac,
    /// Timestamp outside the freshness window (a replay, or clock skew).
    Stale,
    /// Addressed to another node, or claiming to come from this one.
    Misaddressed,
    /// Not our format.
    Malformed,
}

impl ClusterRefusal {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadMac => "bad_mac",
            Self::Misaddressed => "misaddressed",
            Self::Stale => "stale",
        }
    }
}

pub(super) const WIRE_ERRORS: [ClusterRefusal; 4] = [
    ClusterRefusal::BadMac,
    ClusterRefusal::Stale,
    ClusterRefusal::Misaddressed,
    ClusterRefusal::Malformed,
];

/// Outcomes of Connect, as seen by the initiator.
pub(super) const OUTCOMES: [&str; 5] =
    ["connected", "offline", "rejected", "timeout", "retry-later"];
