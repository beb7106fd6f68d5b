//! One validated, immutable configuration for a node, read from flags and `SIGROUTER_*`
//! environment variables.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A secret string (a password): `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive(String);

impl Sensitive {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Sensitive {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// A short, non-reversible name for a cluster key (8 hex digits of an HMAC keyed with it), so
/// logs and metrics can say which key a node uses without showing it.
pub fn key_fingerprint(key: &[u8]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("hmac takes any key length");
    m.update(b"sigrouter cluster key fingerprint");
    m.finalize().into_bytes()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A Redis URL (or comma-separated list of them) with any password replaced by `<redacted>`.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let (scheme, rest) = match u.find("://") {
                Some(i) => u.split_at(i + 3),
                None => ("", u),
            };
            let auth_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(auth_end);
            match authority.rfind('@') {
                Some(at) => {
                    let (userinfo, host) = authority.split_at(at);
                    let user = userinfo.split(':').next().unwrap_or("");
                    if userinfo.contains(':') {
                        format!("{scheme}{user}:<redacted>{host}{path}")
                    } else {
                        // A bare userinfo is a password to the redis crate (redis://pw@host).
                        format!("{scheme}<redacted>{host}{path}")
                    }
                }
                None => u.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a Redis URL carries a password of its own.
fn url_has_password(url: &str) -> bool {
    redact_url(url) != url
}

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

/// Prints a key as its fingerprint.
struct KeyName<'a>(&'a [u8]);

impl fmt::Debug for KeyName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted, fingerprint {}>", key_fingerprint(self.0))
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
            new_session_rate: 10_000,
            new_session_burst: 20_000,
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
                let cluster_key = read_key("cluster-key-file", key_file)?;
                let cluster_next_key = a
                    .cluster_next_key_file
                    .as_deref()
                    .map(|f| read_key("cluster-next-key-file", f))
                    .transpose()?;
                let redis_password = match (&a.redis_password, &a.redis_password_file) {
                    (Some(_), Some(_)) => anyhow::bail!(
                        "set either SIGROUTER_REDIS_PASSWORD or --redis-password-file, not both"
                    ),
                    (Some(p), None) => Some(p.clone()),
                    (None, Some(f)) => Some(read_password(f)?),
                    (None, None) => None,
                };
                if let Some(p) = &redis_password {
                    anyhow::ensure!(!p.expose().is_empty(), "the Redis password is empty");
                    anyhow::ensure!(
                        !url_has_password(url),
                        "--redis-url carries a password and a separate Redis password is set too; keep only one"
                    );
                }
                let redis_ca = match &a.redis_ca_file {
                    Some(f) => {
                        anyhow::ensure!(
                            url.starts_with("rediss://") || url.starts_with("rediss+cluster://"),
                            "--redis-ca-file needs a TLS URL (rediss:// or rediss+cluster://)"
                        );
                        Some(std::fs::read(f).map_err(|e| {
                            anyhow::anyhow!("reading --redis-ca-file {}: {e}", f.display())
                        })?)
                    }
                    None => None,
                };
                let advertise = a.advertise.unwrap_or(cluster_listen);
                anyhow::ensure!(
                    !advertise.ip().is_unspecified(),
                    "--advertise is required when --cluster-listen is a wildcard address"
                );
                let public_addr = a.public_addr.unwrap_or(a.listen);
                Some(ClusterConfig {
                    redis_url: url.clone(),
                    redis_username: a.redis_username.clone().filter(|u| !u.is_empty()),
                    redis_password,
                    redis_ca,
                    node_id,
                    cluster_listen,
                    advertise,
                    public_addr,
                    cluster_key,
                    cluster_next_key,
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

/// Reads a cluster key file: at least 32 bytes once trailing whitespace is removed.
fn read_key(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let key = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("reading --{flag} {}: {e}", path.display()))?;
    let key = trim_key(key);
    anyhow::ensure!(
        key.len() >= 32,
        "the key in --{flag} {} must be at least 32 bytes",
        path.display()
    );
    Ok(key)
}

/// Reads a password file; one trailing newline (CR LF too) is not part of the password.
fn read_password(path: &Path) -> anyhow::Result<Sensitive> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading --redis-password-file {}: {e}", path.display()))?;
    let p = raw
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&raw);
    Ok(Sensitive::new(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(extra: &[&str]) -> ServeArgs {
        let mut v = vec!["sigrouter"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).unwrap().serve
    }

    fn tmp(name: &str, content: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sigrouter-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    const KEY: &str = "cluster-key-ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789";
    const NEXT: &str = "next-key-abcdefghijklmnopqrstuvwxyz-9876543210";

    #[test]
    fn debug_output_never_shows_secrets() {
        let key = tmp("k1", format!("{KEY}\n").as_bytes());
        let next = tmp("k2", NEXT.as_bytes());
        let pw = tmp("pw", b"hunter2-password\n");
        let a = args(&[
            "--redis-url",
            "redis://127.0.0.1:6379/",
            "--cluster-listen",
            "127.0.0.1:7401",
            "--cluster-key-file",
            key.to_str().unwrap(),
            "--cluster-next-key-file",
            next.to_str().unwrap(),
            "--redis-password-file",
            pw.to_str().unwrap(),
        ]);
        let cfg = Config::from_args(&a).unwrap();
        let cc = cfg.cluster.as_ref().unwrap();
        assert_eq!(cc.cluster_key, KEY.as_bytes());
        assert_eq!(cc.cluster_next_key.as_deref(), Some(NEXT.as_bytes()));
        assert_eq!(
            cc.redis_password.as_ref().map(Sensitive::expose),
            Some("hunter2-password")
        );
        for shown in [format!("{cfg:?}"), format!("{cfg:#?}"), format!("{a:?}")] {
            for secret in [KEY, NEXT, "hunter2"] {
                assert!(!shown.contains(secret), "{secret} printed in {shown}");
            }
        }
        let shown = format!("{cfg:?}");
        assert!(shown.contains(&key_fingerprint(KEY.as_bytes())), "{shown}");
        assert!(shown.contains(&key_fingerprint(NEXT.as_bytes())), "{shown}");

        // The password from the environment-variable form (a Secret in Kubernetes).
        let a = args(&[
            "--redis-url",
            "rediss://user:inline-secret@redis.example:6380/0",
            "--cluster-listen",
            "127.0.0.1:7401",
            "--cluster-key-file",
            key.to_str().unwrap(),
        ]);
        let cfg = Config::from_args(&a).unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("inline-secret"), "{shown}");
        assert!(
            shown.contains("rediss://user:<redacted>@redis.example:6380/0"),
            "{shown}"
        );
    }

    #[test]
    fn redacts_every_url_form() {
        assert_eq!(redact_url("redis://h:1/"), "redis://h:1/");
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:<redacted>@h:1/0");
        assert_eq!(redact_url("redis://u:pw@h"), "redis://u:<redacted>@h");
        assert_eq!(redact_url("redis://pw@h"), "redis://<redacted>@h");
        assert_eq!(
            redact_url("redis://:a@h1:1,redis://:b@h2:2"),
            "redis://:<redacted>@h1:1,redis://:<redacted>@h2:2"
        );
        assert_eq!(
            redact_url("redis+cluster://:p@h1:1,h2:2"),
            "redis+cluster://:<redacted>@h1:1,h2:2"
        );
        assert_eq!(format!("{:?}", Sensitive::new("x")), "<redacted>");
        assert_eq!(Sensitive::new("x").to_string(), "<redacted>");
    }

    #[test]
    fn refuses_ambiguous_or_bad_secrets() {
        let key = tmp("k3", KEY.as_bytes());
        let short = tmp("k4", b"too-short\n");
        let pw = tmp("pw2", b"pw\n");
        let base = |extra: &[&str]| {
            let mut v = vec![
                "--redis-url",
                "redis://:inline@127.0.0.1:6379/",
                "--cluster-listen",
                "127.0.0.1:7401",
                "--cluster-key-file",
                key.to_str().unwrap(),
            ];
            v.extend_from_slice(extra);
            Config::from_args(&args(&v))
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let e = base(&["--redis-password-file", pw.to_str().unwrap()]);
        assert!(e.contains("keep only one"), "{e}");
        let e = base(&["--cluster-next-key-file", short.to_str().unwrap()]);
        assert!(
            e.contains("--cluster-next-key-file") && e.contains("32 bytes"),
            "{e}"
        );
        let e = base(&["--redis-ca-file", pw.to_str().unwrap()]);
        assert!(e.contains("rediss://"), "{e}");
    }
}
