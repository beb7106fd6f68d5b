//! The flags of `sigrouter serve` (clap), each also read from a `SIGROUTER_*` environment
//! variable; [`super::Config::from_args`] validates them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::redact::Sensitive;

/// Flags of `sigrouter serve`. Every flag can also be set as an environment variable.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// UDP address for client traffic (signaling protocol and STUN).
    #[arg(long, env = "SIGROUTER_LISTEN", default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,
    /// HTTP address for /metrics, /healthz and /readyz. "off" disables it.
    #[arg(long, env = "SIGROUTER_METRICS_LISTEN", default_value = "0.0.0.0:9400")]
    pub metrics_listen: String,
    /// How often clients send heartbeats, in seconds.
    #[arg(long, env = "SIGROUTER_HEARTBEAT_SECS", default_value_t = 15.0)]
    pub heartbeat_secs: f64,
    /// Heartbeats a session may miss before it is offline.
    #[arg(long, env = "SIGROUTER_MISSED_HEARTBEATS", default_value_t = 3)]
    pub missed_heartbeats: u32,
    /// How long the target of a Connect has to answer, in seconds.
    #[arg(long, env = "SIGROUTER_CONNECT_TIMEOUT_SECS", default_value_t = 10.0)]
    pub connect_timeout_secs: f64,
    /// Most sessions this node holds.
    #[arg(long, env = "SIGROUTER_MAX_SESSIONS", default_value_t = 1_000_000)]
    pub max_sessions: usize,
    /// Register/Resume requests allowed per source IP per second (sustained).
    #[arg(long, env = "SIGROUTER_REGISTER_RATE", default_value_t = 5)]
    pub register_rate: u32,
    /// Register/Resume burst allowed per source IP.
    #[arg(long, env = "SIGROUTER_REGISTER_BURST", default_value_t = 20)]
    pub register_burst: u32,
    /// Prefix length of IPv4 sources that share one Register/Resume (and STUN) limit.
    #[arg(long, env = "SIGROUTER_LIMIT_PREFIX_V4", default_value_t = 32)]
    pub limit_prefix_v4: u8,
    /// Prefix length of IPv6 sources that share one limit (one host usually owns a /64).
    #[arg(long, env = "SIGROUTER_LIMIT_PREFIX_V6", default_value_t = 64)]
    pub limit_prefix_v6: u8,
    /// Sessions this node creates by Register per second at most, from all sources together;
    /// past it, Register answers rate-limited. (A Resume proves its secret and is not
    /// counted: the clients of a drained or dead node arrive in a burst.)
    #[arg(long, env = "SIGROUTER_NEW_SESSION_RATE", default_value_t = 10_000)]
    pub new_session_rate: u32,
    /// Burst of new sessions allowed at once, node-wide.
    #[arg(long, env = "SIGROUTER_NEW_SESSION_BURST", default_value_t = 20_000)]
    pub new_session_burst: u32,
    /// STUN Binding requests answered per source prefix per second (sustained).
    #[arg(long, env = "SIGROUTER_STUN_RATE", default_value_t = 10)]
    pub stun_rate: u32,
    /// STUN Binding burst per source prefix.
    #[arg(long, env = "SIGROUTER_STUN_BURST", default_value_t = 20)]
    pub stun_burst: u32,
    /// UDP proxies in front of the node (CIDRs, comma-separated): for sources in these ranges
    /// every client shares the proxy's IP, so limits key on (IP, port) instead of the prefix.
    #[arg(long, env = "SIGROUTER_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Requests allowed per session per second (sustained), after Register.
    #[arg(long, env = "SIGROUTER_SESSION_RATE", default_value_t = 50)]
    pub session_rate: u32,
    /// Request burst allowed per session.
    #[arg(long, env = "SIGROUTER_SESSION_BURST", default_value_t = 200)]
    pub session_burst: u32,
    /// How long to finish in-flight work after SIGTERM/SIGINT, in seconds.
    #[arg(long, env = "SIGROUTER_SHUTDOWN_GRACE_SECS", default_value_t = 5.0)]
    pub shutdown_grace_secs: f64,
    /// Client-port sockets and receive tasks (0: one per core, up to 8).
    #[arg(long, env = "SIGROUTER_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "SIGROUTER_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
    /// Redis URL; turns cluster mode on. Without it the node runs alone, state in memory.
    #[arg(long, env = "SIGROUTER_REDIS_URL")]
    pub redis_url: Option<String>,
    /// This node's id in the cluster (defaults to the hostname, then a random id).
    #[arg(long, env = "SIGROUTER_NODE_ID")]
    pub node_id: Option<String>,
    /// UDP address for node-to-node forwarding (cluster mode).
    #[arg(long, env = "SIGROUTER_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    /// Internal address other nodes use to reach this one, when it differs from
    /// --cluster-listen (for example the pod IP when listening on 0.0.0.0).
    #[arg(long, env = "SIGROUTER_ADVERTISE")]
    pub advertise: Option<SocketAddr>,
    /// Client-facing address published in the registry and sent in Migrate (defaults to --listen).
    #[arg(long, env = "SIGROUTER_PUBLIC_ADDR")]
    pub public_addr: Option<SocketAddr>,
    /// File holding the shared cluster key (at least 32 bytes) that authenticates node traffic.
    /// The node signs with this key.
    #[arg(long, env = "SIGROUTER_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// File holding a second cluster key that is accepted but never used to sign: the next key
    /// during a key rotation, then the previous one (docs/OPERATIONS.md, key rotation).
    #[arg(long, env = "SIGROUTER_CLUSTER_NEXT_KEY_FILE")]
    pub cluster_next_key_file: Option<PathBuf>,
    /// Redis ACL user name (with a password; default: the `default` user).
    #[arg(long, env = "SIGROUTER_REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// Redis password (AUTH). Set it from a Secret as the environment variable, or use
    /// --redis-password-file: a command line is visible to every local user.
    #[arg(long, env = "SIGROUTER_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<Sensitive>,
    /// File holding the Redis password (AUTH); a trailing newline is ignored.
    #[arg(long, env = "SIGROUTER_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// PEM file of the CA(s) that sign the Redis server's certificate, for a `rediss://` URL
    /// (default: the system's trusted roots).
    #[arg(long, env = "SIGROUTER_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// How long a draining node waits for its clients to move before it exits, in seconds.
    #[arg(long, env = "SIGROUTER_DRAIN_SECS", default_value_t = 20.0)]
    pub drain_secs: f64,
    /// How often a node renews its registry record (it lives 3 periods), in seconds.
    #[arg(long, env = "SIGROUTER_REGISTRY_PERIOD_SECS", default_value_t = 2.0)]
    pub registry_period_secs: f64,
    /// How often the node table is rebuilt without a nudge, in seconds.
    #[arg(long, env = "SIGROUTER_TABLE_REFRESH_SECS", default_value_t = 5.0)]
    pub table_refresh_secs: f64,
    /// TTL of a client's presence record, renewed by its node, in seconds.
    #[arg(long, env = "SIGROUTER_PRESENCE_TTL_SECS", default_value_t = 300.0)]
    pub presence_ttl_secs: f64,
    /// Deadline of every Redis call, in milliseconds.
    #[arg(long, env = "SIGROUTER_REDIS_TIMEOUT_MS", default_value_t = 500)]
    pub redis_timeout_ms: u64,
    /// Other nodes' cluster addresses (host:port, comma-separated) to join membership through
    /// when the Redis registry cannot be read (a node starting while Redis is down).
    #[arg(long, env = "SIGROUTER_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// How often membership probes another node, in milliseconds (a silent node is declared
    /// down after about 4 to 5 of these).
    #[arg(long, env = "SIGROUTER_PROBE_INTERVAL_MS", default_value_t = 1000)]
    pub probe_interval_ms: u64,
    /// A presence lookup that Redis has not answered within this many milliseconds asks the
    /// other nodes instead.
    #[arg(long, env = "SIGROUTER_REDIS_HEDGE_MS", default_value_t = 50)]
    pub redis_hedge_ms: u64,
}
