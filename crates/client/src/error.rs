//! What can go wrong with a request.

use sigrouter_proto::{EncodeError, ErrorCode, MAX_PAYLOAD};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No answer before the request's deadline, retransmissions included.
    #[error("no answer from the router in time")]
    Timeout,
    /// The router refused the request (after any retries the code allows).
    #[error("router refused the request: {}", .0.name())]
    Server(ErrorCode),
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The client was closed (or said `Bye`); its background tasks are gone.
    #[error("client is closed")]
    Closed,
    /// A payload longer than [`MAX_PAYLOAD`] bytes.
    #[error("payload larger than {MAX_PAYLOAD} bytes")]
    PayloadTooLarge,
    /// The request could not be encoded (too large for one datagram).
    #[error("cannot encode request: {0}")]
    Encode(#[from] EncodeError),
    /// The router answered with a message of the wrong type for the request.
    #[error("unexpected answer from the router: {0}")]
    Unexpected(&'static str),
}
