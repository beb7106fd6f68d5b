//! One validated, immutable configuration for a node, read from flags and `SIGROUTER_*`
//! environment variables.

mod args;
mod cluster;
mod redact;

pub use args::ServeArgs;
pub use cluster::ClusterConfig;
pub use redact::{key_fingerprint, redact_url, Sensitive};

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use redact::url_has_password;

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
    use std::path::PathBuf;

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
