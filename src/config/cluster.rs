//! Cluster-mode settings.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use super::redact::{redact_url, KeyName, Sensitive};

/// Cluster-mode settings. `Debug` redacts the keys and any Redis password.
#[derive(Clone)]
pub struct ClusterConfig {
    /// Redis URL (a `redis+cluster://` or comma-separated list selects Redis Cluster;
    /// `rediss://` and `rediss+cluster://` use TLS).
    pub redis_url: String,
    /// Redis ACL user name.
    pub redis_username: Option<String>,
    /// Redis password (AUTH), when not in the URL.
    pub redis_password: Option<Sensitive>,
    /// PEM CA certificates for a TLS (`rediss://`) Redis; `None`: the system's roots.
    pub redis_ca: Option<Vec<u8>>,
    /// This node's id.
    pub node_id: String,
    /// UDP address for node-to-node traffic.
    pub cluster_listen: SocketAddr,
    /// Internal address published for the other nodes.
    pub advertise: SocketAddr,
    /// Client-facing address published in the registry.
    pub public_addr: SocketAddr,
    /// Shared key authenticating node-to-node datagrams; this node signs with it.
    pub cluster_key: Vec<u8>,
    /// A second key accepted on receive, never used to sign (key rotation).
    pub cluster_next_key: Option<Vec<u8>>,
    /// Drain deadline.
    pub drain: Duration,
    /// Registry renewal period.
    pub registry_period: Duration,
    /// Node-table rebuild period (also rebuilt when nudged).
    pub table_period: Duration,
    /// Presence record TTL (renewed every third of it).
    pub presence_ttl: Duration,
    /// Deadline of every Redis call.
    pub redis_timeout: Duration,
    /// Seed addresses for membership (host:port), besides the Redis registry.
    pub peers: Vec<String>,
    /// Membership probe period.
    pub probe_period: Duration,
    /// How long a presence lookup waits for Redis before asking the other nodes.
    pub redis_hedge: Duration,
}

impl ClusterConfig {
    /// Settings for a node with these essentials and default timings.
    pub fn new(
        redis_url: &str,
        node_id: &str,
        cluster_listen: SocketAddr,
        cluster_key: Vec<u8>,
    ) -> Self {
        Self {
            redis_url: redis_url.to_string(),
            redis_username: None,
            redis_password: None,
            redis_ca: None,
            node_id: node_id.to_string(),
            cluster_listen,
            advertise: cluster_listen,
            public_addr: cluster_listen,
            cluster_key,
            cluster_next_key: None,
            drain: Duration::from_secs(20),
            registry_period: Duration::from_secs(2),
            table_period: Duration::from_secs(5),
            presence_ttl: Duration::from_secs(300),
            redis_timeout: Duration::from_millis(500),
            peers: Vec::new(),
            probe_period: Duration::from_secs(1),
            redis_hedge: Duration::from_millis(50),
        }
    }
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be added without deciding how it prints.
        let Self {
            redis_url,
            redis_username,
            redis_password,
            redis_ca,
            node_id,
            cluster_listen,
            advertise,
            public_addr,
            cluster_key,
            cluster_next_key,
            drain,
            registry_period,
            table_period,
            presence_ttl,
            redis_timeout,
            peers,
            probe_period,
            redis_hedge,
        } = self;
        f.debug_struct("ClusterConfig")
            .field("redis_url", &redact_url(redis_url))
            .field("redis_username", redis_username)
            .field("redis_password", redis_password)
            .field(
                "redis_ca",
                &redis_ca.as_ref().map(|c| format!("{} bytes", c.len())),
            )
            .field("node_id", node_id)
            .field("cluster_listen", cluster_listen)
            .field("advertise", advertise)
            .field("public_addr", public_addr)
            .field("cluster_key", &KeyName(cluster_key))
            .field(
                "cluster_next_key",
                &cluster_next_key.as_deref().map(KeyName),
            )
            .field("drain", drain)
            .field("registry_period", registry_period)
            .field("table_period", table_period)
            .field("presence_ttl", presence_ttl)
            .field("redis_timeout", redis_timeout)
            .field("peers", peers)
            .field("probe_period", probe_period)
            .field("redis_hedge", redis_hedge)
            .finish()
    }
}
