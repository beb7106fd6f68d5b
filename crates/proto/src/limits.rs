//! The limits the protocol picks: datagram size, hello size, list lengths, body nesting.
//!
//! These are chosen, not computed, and nothing here depends on the rest of the crate, so every
//! other module may use them. The payload limit, [`MAX_PAYLOAD`](crate::MAX_PAYLOAD), is not
//! picked: it is derived from these in `sizes`, so that every answer and push a valid request
//! causes can be encoded.

/// Largest datagram either side may send or accept. 1200 bytes fits the IPv6 minimum MTU (1280)
/// with room for the IP and UDP headers, so no datagram is ever fragmented.
pub const MAX_DATAGRAM: usize = 1200;
/// Smallest `Register` or `Resume` datagram the server answers. The client pads up to it, so the
/// answer (at most this long) is never larger than the request: no amplification.
pub const MIN_HELLO_LEN: usize = 256;
/// Most local addresses a client may announce.
pub const MAX_LOCAL_ADDRS: usize = 4;
/// Most UUIDs in one `Query`.
pub const MAX_QUERY: usize = 32;
/// Longest address-validation token (`Retry.token`, and `token` in `Register` and `Resume`).
/// The token is opaque to clients; the reference router's is 21 bytes.
pub const MAX_TOKEN: usize = 64;

/// Deepest MessagePack nesting a body may have, counting the body map itself: 7 levels. The
/// deepest v1 field is an array of `bin` in the body map (2 levels); the rest leaves room for
/// unknown fields of later minor versions. rmp-serde's default limit (1024) let one 1200-byte
/// datagram of nested arrays in an ignored field overflow the decoding thread's stack.
pub(crate) const MAX_BODY_DEPTH: usize = 8;
