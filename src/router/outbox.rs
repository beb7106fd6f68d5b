//! What one call into the router decided: datagrams for clients, datagrams for other nodes,
//! and deferred [`Job`]s that need cluster state not at hand.
//!
//! Datagrams are encoded into the outbox's own buffers, which a socket loop reuses for every
//! call: a scratch buffer for the encoder and an arena ([`BytesMut`]) that each datagram is
//! carved from as a reference-counted [`Bytes`] slice. Once the datagrams cut from an arena
//! chunk have been sent (and dropped), the next datagram reuses that chunk from its start, so
//! answering a heartbeat allocates nothing in the steady state; a new chunk is allocated only
//! while earlier datagrams still wait in a queue.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sigrouter_proto::{self as proto, EncodeError, Message, Secret};
use uuid::Uuid;

use crate::cluster::wire::Body;

/// What the directory said about a resuming client: `Ok(Some((verifier, node)))`, `Ok(None)`
/// when it knows nothing, `Err(())` when it could not be read.
pub type ResumeLookup = Result<Option<([u8; 32], Arc<str>)>, ()>;

/// One datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    /// The encoded datagram (a slice of the arena of the [`Outbox`] that made it, or owned).
    pub bytes: Bytes,
}

impl Transmit {
    /// A datagram to `to` (copies nothing: `bytes` may be a `Vec<u8>`, a `&'static [u8]` or
    /// [`Bytes`]).
    pub fn new(to: SocketAddr, bytes: impl Into<Bytes>) -> Self {
        Self {
            to,
            bytes: bytes.into(),
        }
    }
}

/// Work that needs cluster state not at hand: run off the socket loop, with deadlines, and
/// handed back to the router through its `complete_*` methods.
#[derive(Clone, Debug, PartialEq)]
pub enum Job {
    /// Find the node holding a Connect's target and forward its Incoming there.
    Connect(ConnectLookup),
    /// Validate a Resume for a session this node does not hold.
    Resume {
        /// Source of the Resume.
        src: SocketAddr,
        /// Its size (bounds the answer).
        req_len: usize,
        /// The request.
        msg: proto::Resume,
    },
    /// Answer a Query naming clients not held here.
    Query {
        /// The asking session.
        uuid: Uuid,
        /// Its request id.
        rid: u64,
        /// The clients asked about.
        uuids: Vec<Uuid>,
    },
}

/// A Connect whose target is on another node, to be looked up.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectLookup {
    /// The connection (pending on this node).
    pub conn: Uuid,
    /// The target client.
    pub target: Uuid,
    /// Skip the presence cache (a forward just found the client gone).
    pub fresh: bool,
    /// The Incoming to forward.
    pub body: Body,
}

impl ConnectLookup {
    /// The session that asked (the Incoming's sender).
    pub fn initiator(&self) -> Option<Uuid> {
        match &self.body {
            Body::Incoming { from, .. } => Some(*from),
            _ => None,
        }
    }
}

/// Size of each arena chunk datagrams are carved from (many answers per chunk), once grown.
const ARENA_CHUNK: usize = 64 * 1024;
/// Size of an outbox's first arena chunk; each further chunk is twice the last, up to
/// [`ARENA_CHUNK`]. An outbox made for one call (a deferred job, a drain slice) sends a few
/// datagrams and is dropped: a 64 KiB chunk each time cost a large allocation and, when freed,
/// glibc's consolidation of its free lists (a third of a receiving node's CPU in a drain).
const ARENA_FIRST_CHUNK: usize = 2048;

/// What one call into the router decided. Keep one per socket loop (or task) and reuse it:
/// its buffers are what makes the answers allocation-free.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Datagrams for clients (sent from the client port).
    pub client: Vec<Transmit>,
    /// Datagrams for other nodes (sent from the cluster port).
    pub cluster: Vec<Transmit>,
    /// Jobs to run off the socket loop.
    pub jobs: Vec<Job>,
    /// Where the encoder writes (reused).
    scratch: Vec<u8>,
    /// Where datagrams are carved from (reused once what was carved from it is dropped).
    arena: BytesMut,
    /// Size of the arena's current chunk (0: none yet).
    chunk: usize,
}

impl Outbox {
    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.client.is_empty() && self.cluster.is_empty() && self.jobs.is_empty()
    }

    /// Takes the arena back to the start of its chunk if every datagram carved from it has been
    /// dropped (sent); allocates nothing either way. A socket loop calls it after each send
    /// batch, so its answers keep reusing one chunk.
    pub fn reclaim(&mut self) {
        let _ = self.arena.try_reclaim(self.chunk.max(1));
    }

    /// Queues a datagram for a client (copied into the arena).
    pub(crate) fn send_client(&mut self, to: SocketAddr, bytes: impl AsRef<[u8]>) {
        let bytes = carve(&mut self.arena, &mut self.chunk, bytes.as_ref());
        self.client.push(Transmit { to, bytes });
    }

    /// Queues a datagram for another node (copied into the arena).
    pub(crate) fn send_node(&mut self, to: SocketAddr, bytes: impl AsRef<[u8]>) {
        let bytes = carve(&mut self.arena, &mut self.chunk, bytes.as_ref());
        self.cluster.push(Transmit { to, bytes });
    }

    /// Encodes `msg` (MAC'd with `key` if given) into the scratch buffer and returns it; it
    /// stays there until the next encode. Nothing is queued: see [`Outbox::send_encoded`].
    pub(crate) fn encode(
        &mut self,
        msg: &Message,
        key: Option<&Secret>,
    ) -> Result<&[u8], EncodeError> {
        proto::encode_into(msg, key, &mut self.scratch)?;
        Ok(&self.scratch)
    }

    /// Queues what [`Outbox::encode`] just wrote for a client.
    pub(crate) fn send_encoded(&mut self, to: SocketAddr) {
        let bytes = carve(&mut self.arena, &mut self.chunk, &self.scratch);
        self.client.push(Transmit { to, bytes });
    }
}

/// A copy of `data` carved from `arena`, whose current chunk is `chunk` bytes.
fn carve(arena: &mut BytesMut, chunk: &mut usize, data: &[u8]) -> Bytes {
    if arena.capacity() < data.len() {
        // Takes the chunk back when every datagram cut from it is gone (the copy starts at
        // its beginning again), else starts a new chunk, twice the last (a busy outbox soon
        // works in 64 KiB chunks, a short-lived one never allocates one); an old chunk is
        // freed with the last datagram cut from it.
        *chunk = if *chunk == 0 {
            ARENA_FIRST_CHUNK
        } else {
            (*chunk * 2).min(ARENA_CHUNK)
        };
        arena.reserve((*chunk).max(data.len()));
    }
    arena.extend_from_slice(data);
    arena.split().freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_lived_outbox_allocates_a_small_chunk_and_a_busy_one_grows_to_the_full_size() {
        let to = SocketAddr::from(([127, 0, 0, 1], 9));
        let mut out = Outbox::default();
        out.send_client(to, [7u8; 200]);
        out.send_node(to, [8u8; 300]);
        assert_eq!(out.chunk, ARENA_FIRST_CHUNK);
        assert_eq!(&out.client[0].bytes[..], &[7u8; 200][..]);
        assert_eq!(&out.cluster[0].bytes[..], &[8u8; 300][..]);
        // Datagrams held (queued, not sent): every new chunk is twice the last, up to 64 KiB.
        for _ in 0..2000 {
            out.send_client(to, [1u8; 100]);
        }
        assert_eq!(out.chunk, ARENA_CHUNK);
        // Once everything cut from it is sent (dropped), the chunk is taken back.
        out.client.clear();
        out.cluster.clear();
        out.reclaim();
        assert!(out.arena.capacity() >= ARENA_CHUNK);
    }
}
