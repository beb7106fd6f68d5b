//! The enumerations carried in bodies: connect failure reasons and error codes.

use serde::{Deserialize, Deserializer};
use serde_repr::Serialize_repr;

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

#[cfg(test)]
mod tests {
    use crate::*;

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
                code: ErrorCode::Other,
                to: None,
            })
        );
    }
}
