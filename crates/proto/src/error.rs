//! Why a datagram could not be decoded or a message could not be encoded.

use crate::limits::MAX_DATAGRAM;

/// Why a datagram was not decoded. Each variant is a counted drop on the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the header (plus MAC, for authenticated types).
    #[error("datagram truncated")]
    Truncated,
    /// Longer than [`MAX_DATAGRAM`].
    #[error("datagram larger than {MAX_DATAGRAM} bytes")]
    Oversized,
    /// Does not start with [`MAGIC`](crate::MAGIC).
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
