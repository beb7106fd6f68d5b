//! What one call into the router decided: datagrams for clients, datagrams for other nodes,
//! and deferred [`Job`]s that need cluster state not at hand.

use std::net::SocketAddr;
use std::sync::Arc;

use sigrouter_proto as proto;
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
    /// The encoded datagram.
    pub bytes: Vec<u8>,
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

/// What one call into the router decided.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Datagrams for clients (sent from the client port).
    pub client: Vec<Transmit>,
    /// Datagrams for other nodes (sent from the cluster port).
    pub cluster: Vec<Transmit>,
    /// Jobs to run off the socket loop.
    pub jobs: Vec<Job>,
}

impl Outbox {
    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.client.is_empty() && self.cluster.is_empty() && self.jobs.is_empty()
    }

    /// Queues a datagram for a client.
    pub(crate) fn send_client(&mut self, to: SocketAddr, bytes: Vec<u8>) {
        self.client.push(Transmit { to, bytes });
    }

    /// Queues a datagram for another node.
    pub(crate) fn send_node(&mut self, to: SocketAddr, bytes: Vec<u8>) {
        self.cluster.push(Transmit { to, bytes });
    }
}
