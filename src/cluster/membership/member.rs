//! Who a member is and what it says about itself, as the other members see it.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::table::NodeState;

/// A member's identity in the SWIM protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberId {
    /// Node id (the member's address in `foca`'s terms: unique in the cluster).
    pub id: String,
    /// Internal (cluster port) address.
    pub internal: SocketAddr,
    /// Client-facing address.
    pub public: SocketAddr,
    /// Process start, ms since the Unix epoch: a restarted node wins over its previous life.
    pub started_ms: u64,
    /// Bumped when the node rejoins after being declared down by mistake.
    #[serde(default)]
    pub bump: u16,
}

impl foca::Identity for MemberId {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> String {
        self.id.clone()
    }

    fn win_addr_conflict(&self, other: &Self) -> bool {
        (self.started_ms, self.bump) > (other.started_ms, other.bump)
    }
}

/// What a node says about itself besides its identity (a `foca` custom broadcast).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Node id.
    pub id: String,
    /// The life of the node this describes (see [`MemberId::started_ms`]).
    pub started_ms: u64,
    /// Lifecycle state.
    pub state: NodeState,
    /// Sessions held when sent.
    pub sessions: u64,
    /// Software version.
    pub version: String,
    /// Increases with every broadcast of this node: newer replaces older.
    pub seq: u64,
    /// Redis lacks some of this node's clients' presence (writes failed or stuck): a
    /// "nowhere" from Redis is to be checked with the nodes.
    #[serde(default)]
    pub unpublished: bool,
}

/// Why a SWIM message was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The message names another sender than the envelope that carried it.
    #[error("SWIM sender does not match the envelope")]
    Spoofed,
    /// `foca` refused it (malformed, from ourselves, stale…).
    #[error("SWIM message refused: {0}")]
    Foca(String),
}

/// A change seen in the membership, for metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A member became active.
    Up(String),
    /// A member was declared down (or left).
    Down(String),
}

/// One member as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// Its identity.
    pub id: MemberId,
    /// Alive or suspect (true), or declared down (false).
    pub active: bool,
    /// Its newest metadata for this life, if any arrived yet.
    pub meta: Option<Meta>,
}
