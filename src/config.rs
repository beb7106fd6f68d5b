//! One validated, immutable configuration for a node, read from flags and `SIGROUTER_*`
//! environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

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
    /// New sessions this node creates per second at most, from all sources together
    /// (Register and cross-node Resume); past it, Register answers rate-limited.
    #[arg(long, env = "SIGROUTER_NEW_SESSION_RATE", default_value_t = 50_000)]
    pub new_session_rate: u32,
    /// Burst of new sessions allowed at once, node-wide.
    #[arg(long, env = "SIGROUTER_NEW_SESSION_BURST", default_value_t = 50_000)]
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
    #[arg(long, env = "SIGROUTER_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
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

/// Validated node configuration. Build it from [`ServeArgs`] or start from [`Config::default`]
/// (what tests do) and change fields.
#[derive(Clone, Debug)]
pub struct Config {
    /// UDP address for client traffic.
    pub listen: SocketAddr,
    /// HTTP address for metrics and probes; `None` disables the endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Heartbeat interval told to clients.
    pub heartbeat: Duration,
    /// A session without a heartbeat for this long is offline.
    pub session_ttl: Duration,
    /// How long the target of a Connect has to answer.
    pub connect_timeout: Duration,
    /// First retransmission delay of a server push; doubles each time.
    pub push_initial_rto: Duration,
    /// A push not acknowledged within this long is given up.
    pub push_deadline: Duration,
    /// How long answers are remembered for retransmitted requests.
    pub dedup_window: Duration,
    /// Most sessions this node holds.
    pub max_sessions: usize,
    /// Register/Resume per source IP per second.
    pub register_rate: u32,
    /// Register/Resume burst per source IP.
    pub register_burst: u32,
    /// Prefix length of IPv4 sources sharing one limit.
    pub limit_prefix_v4: u8,
    /// Prefix length of IPv6 sources sharing one limit.
    pub limit_prefix_v6: u8,
    /// New sessions per second, node-wide.
    pub new_session_rate: u32,
    /// New sessions at once, node-wide.
    pub new_session_burst: u32,
    /// STUN answers per source prefix per second.
    pub stun_rate: u32,
    /// STUN burst per source prefix.
    pub stun_burst: u32,
    /// Sources that are UDP proxies: limits key on (IP, port) for them.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Requests per session per second.
    pub session_rate: u32,
    /// Request burst per session.
    pub session_burst: u32,
    /// How long to finish in-flight work on shutdown.
    pub shutdown_grace: Duration,
    /// How often the sweeper expires sessions and times out connects.
    pub sweep_interval: Duration,
    /// Client-port sockets (and receive tasks); 0 picks one per core, up to 8.
    pub workers: usize,
    /// Cluster settings; `None` runs the embedded single-node mode.
    pub cluster: Option<ClusterConfig>,
}

/// Cluster-mode settings.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Redis URL (a `redis+cluster://` or comma-separated list selects Redis Cluster).
    pub redis_url: String,
    /// This node's id.
    pub node_id: String,
    /// UDP address for node-to-node traffic.
    pub cluster_listen: SocketAddr,
    /// Internal address published for the other nodes.
    pub advertise: SocketAddr,
    /// Client-facing address published in the registry.
    pub public_addr: SocketAddr,
    /// Shared key authenticating node-to-node datagrams.
    pub cluster_key: Vec<u8>,
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
            node_id: node_id.to_string(),
            cluster_listen,
            advertise: cluster_listen,
            public_addr: cluster_listen,
            cluster_key,
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

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7400".parse().expect("valid literal"),
            metrics_listen: None,
            heartbeat: Duration::from_secs(15),
            session_ttl: Duration::from_secs(45),
            connect_timeout: Duration::from_secs(10),
            push_initial_rto: Duration::from_millis(250),
            push_deadline: Duration::from_secs(8),
            dedup_window: Duration::from_secs(30),
            max_sessions: 1_000_000,
            register_rate: 5,
            register_burst: 20,
            limit_prefix_v4: 32,
            limit_prefix_v6: 64,
            new_session_rate: 50_000,
            new_session_burst: 50_000,
            stun_rate: 10,
            stun_burst: 20,
            trusted_proxies: Vec::new(),
            session_rate: 50,
            session_burst: 200,
            shutdown_grace: Duration::from_secs(5),
            sweep_interval: Duration::from_secs(1),
            workers: 0,
            cluster: None,
        }
    }
}

fn secs(name: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--{name} must be a positive number of seconds, got {v}"))
}

impl Config {
    /// Validates flags into a config. Errors name the offending flag.
    pub fn from_args(a: &ServeArgs) -> anyhow::Result<Self> {
        let heartbeat = secs("heartbeat-secs", a.heartbeat_secs)?;
        anyhow::ensure!(
            a.missed_heartbeats >= 1,
            "--missed-heartbeats must be at least 1"
        );
        let metrics_listen = match a.metrics_listen.as_str() {
            "off" | "" => None,
            s => Some(
                s.parse()
                    .map_err(|e| anyhow::anyhow!("--metrics-listen {s:?}: {e}"))?,
            ),
        };
        anyhow::ensure!(
            a.register_rate >= 1 && a.register_burst >= 1,
            "register rate and burst must be at least 1"
        );
        anyhow::ensure!(
            a.session_rate >= 1 && a.session_burst >= 1,
            "session rate and burst must be at least 1"
        );
        anyhow::ensure!(a.max_sessions >= 1, "--max-sessions must be at least 1");
        anyhow::ensure!(
            a.limit_prefix_v4 <= 32 && a.limit_prefix_v6 <= 128,
            "--limit-prefix-v4 must be at most 32 and --limit-prefix-v6 at most 128"
        );
        anyhow::ensure!(
            a.new_session_rate >= 1
                && a.new_session_burst >= 1
                && a.stun_rate >= 1
                && a.stun_burst >= 1,
            "new-session and STUN rates and bursts must be at least 1"
        );
        let cluster = match &a.redis_url {
            None => None,
            Some(url) => {
                let node_id = a
                    .node_id
                    .clone()
                    .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
                    .unwrap_or_else(|| format!("node-{}", uuid::Uuid::new_v4().simple()));
                let cluster_listen = a.cluster_listen.ok_or_else(|| {
                    anyhow::anyhow!("--cluster-listen is required with --redis-url")
                })?;
                let key_file = a.cluster_key_file.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("--cluster-key-file is required with --redis-url")
                })?;
                let cluster_key = std::fs::read(key_file).map_err(|e| {
                    anyhow::anyhow!("reading --cluster-key-file {}: {e}", key_file.display())
                })?;
                let cluster_key = trim_key(cluster_key);
                anyhow::ensure!(
                    cluster_key.len() >= 32,
                    "the cluster key must be at least 32 bytes"
                );
                let advertise = a.advertise.unwrap_or(cluster_listen);
                anyhow::ensure!(
                    !advertise.ip().is_unspecified(),
                    "--advertise is required when --cluster-listen is a wildcard address"
                );
                let public_addr = a.public_addr.unwrap_or(a.listen);
                Some(ClusterConfig {
                    redis_url: url.clone(),
                    node_id,
                    cluster_listen,
                    advertise,
                    public_addr,
                    cluster_key,
                    drain: secs("drain-secs", a.drain_secs)?,
                    registry_period: secs("registry-period-secs", a.registry_period_secs)?,
                    table_period: secs("table-refresh-secs", a.table_refresh_secs)?,
                    presence_ttl: secs("presence-ttl-secs", a.presence_ttl_secs)?,
                    redis_timeout: Duration::from_millis(a.redis_timeout_ms.max(1)),
                    peers: a.peers.clone(),
                    probe_period: Duration::from_millis(a.probe_interval_ms.max(10)),
                    redis_hedge: Duration::from_millis(a.redis_hedge_ms.max(1)),
                })
            }
        };
        Ok(Self {
            listen: a.listen,
            metrics_listen,
            heartbeat,
            session_ttl: heartbeat.saturating_mul(a.missed_heartbeats),
            connect_timeout: secs("connect-timeout-secs", a.connect_timeout_secs)?,
            max_sessions: a.max_sessions,
            register_rate: a.register_rate,
            register_burst: a.register_burst,
            limit_prefix_v4: a.limit_prefix_v4,
            limit_prefix_v6: a.limit_prefix_v6,
            new_session_rate: a.new_session_rate,
            new_session_burst: a.new_session_burst,
            stun_rate: a.stun_rate,
            stun_burst: a.stun_burst,
            trusted_proxies: a.trusted_proxies.clone(),
            session_rate: a.session_rate,
            session_burst: a.session_burst,
            shutdown_grace: secs("shutdown-grace-secs", a.shutdown_grace_secs)?,
            workers: a.workers,
            cluster,
            ..Self::default()
        })
    }
}

fn trim_key(mut k: Vec<u8>) -> Vec<u8> {
    while k.last().is_some_and(|b| b.is_ascii_whitespace()) {
        k.pop();
    }
    k
}
