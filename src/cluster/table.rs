//! The node table: every live node's registry record, in an immutable snapshot that the
//! refresher builds and stores (see [`super::Cluster`]), and everything else only loads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// A node's lifecycle state in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes new sessions.
    Active,
    /// Moving its clients away; never chosen for new sessions.
    Draining,
}

/// One node's registry record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// Client-facing address.
    pub public: SocketAddr,
    /// Internal (node-to-node) address.
    pub internal: SocketAddr,
    /// Lifecycle state.
    pub state: NodeState,
    /// Software version.
    pub version: String,
    /// Sessions held at the last renewal.
    pub sessions: u64,
    /// Start time, ms since the Unix epoch.
    pub started_ms: u64,
    /// The record is void after this time, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// An immutable snapshot of the live nodes.
#[derive(Debug, Default)]
pub struct NodeTable {
    /// Increases with every snapshot the refresher stores.
    pub generation: u64,
    nodes: HashMap<String, Arc<NodeInfo>>,
    /// Some other node holds clients whose presence Redis does not have yet (its writes failed
    /// or are stuck): a "nowhere" from Redis is not to be trusted.
    pub(super) unsettled: bool,
}

impl NodeTable {
    /// Builds a snapshot.
    pub fn new(generation: u64, nodes: impl IntoIterator<Item = NodeInfo>) -> Self {
        Self {
            generation,
            nodes: nodes
                .into_iter()
                .map(|n| (n.id.clone(), Arc::new(n)))
                .collect(),
            unsettled: false,
        }
    }

    /// Whether some other node says Redis lacks some of its clients' presence.
    pub fn unsettled(&self) -> bool {
        self.unsettled
    }

    /// A node by id.
    pub fn get(&self, id: &str) -> Option<Arc<NodeInfo>> {
        self.nodes.get(id).cloned()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every active node other than `except`.
    pub fn active_except(&self, except: &str) -> Vec<Arc<NodeInfo>> {
        self.nodes
            .values()
            .filter(|n| n.state == NodeState::Active && n.id != except)
            .cloned()
            .collect()
    }

    /// Every node, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<NodeInfo>> {
        self.nodes.values()
    }

    /// Best of two random active nodes other than `except` (fewer sessions wins): spreads
    /// clients without herding them all onto the newest, emptiest node.
    pub fn pick_active(&self, except: &str) -> Option<Arc<NodeInfo>> {
        let active: Vec<&Arc<NodeInfo>> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Active && n.id != except)
            .collect();
        let mut rng = rand::thread_rng();
        let two: Vec<&&Arc<NodeInfo>> = active.choose_multiple(&mut rng, 2).collect();
        two.into_iter()
            .min_by_key(|n| n.sessions)
            .map(|n| Arc::clone(n))
    }
}
