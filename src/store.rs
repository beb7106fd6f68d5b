//! Redis I/O: the only place in the node that awaits Redis.
//!
//! Every call has a deadline ([`Store::timeout`]); an error or a timeout is counted, marks Redis
//! down and is returned, never waited out. The redis crate's `ConnectionManager` reconnects with
//! backoff by itself; a `redis+cluster://` URL (or a comma-separated list of `redis://` URLs)
//! selects Redis Cluster. `rediss://` (and `rediss+cluster://`) connect over TLS (rustls),
//! checking the server certificate against the system's roots or a CA file; a password
//! (AUTH, optionally with an ACL user name) comes from [`ClusterConfig`], never from a log.
//!
//! # Key layout (Redis Cluster safe: every command names one key)
//! - `sigrouter:{nodes}` — a hash: field = node id, value = JSON [`crate::cluster::NodeInfo`]
//!   with its own `expires_ms`. Every node renews its field and the key's TTL; readers ignore
//!   and delete expired fields, so a node that stops renewing disappears.
//! - `sigrouter:presence:{<uuid>}` — a string `"<node id> <hex SHA-256 verifier>"` with a TTL
//!   the owning node renews: which node holds a client, and what any node needs to validate its
//!   Resume (a hash of the secret, never the secret).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError, Value};
use tokio::sync::OnceCell;

use crate::config::ClusterConfig;
use crate::metrics::Metrics;

/// The node registry key.
pub const NODES_KEY: &str = "sigrouter:{nodes}";

/// The presence key of a client.
pub fn presence_key(uuid: &uuid::Uuid) -> String {
    format!("sigrouter:presence:{{{}}}", uuid.simple())
}

/// Why a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No answer within the deadline.
    #[error("redis timed out")]
    Timeout,
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
}

enum Backend {
    Single(ConnectionManager),
    Cluster(Box<ClusterBackend>),
}

struct ClusterBackend {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
}

/// A handle on Redis with deadlines and metrics. Cheap to share (`Arc<Store>`).
pub struct Store {
    backend: Backend,
    timeout: Duration,
    up: AtomicBool,
    recoveries: AtomicU64,
    /// When Redis last came back, ms since `opened` (0: never).
    recovered_at: AtomicU64,
    opened: std::time::Instant,
    metrics: Metrics,
}

impl Store {
    /// Prepares a connection without waiting for Redis: a node starts (and serves local
    /// traffic) while Redis is away.
    pub fn open(url: &str, timeout: Duration, metrics: Metrics) -> anyhow::Result<Self> {
        Self::open_with(url, &Auth::default(), timeout, metrics)
    }

    /// Like [`Store::open`], with the Redis settings of a cluster config: URL, deadline,
    /// credentials and TLS roots.
    pub fn open_cluster(cfg: &ClusterConfig, metrics: Metrics) -> anyhow::Result<Self> {
        let auth = Auth {
            username: cfg.redis_username.clone(),
            password: cfg.redis_password.as_ref().map(|p| p.expose().to_string()),
            ca: cfg.redis_ca.clone(),
        };
        Self::open_with(&cfg.redis_url, &auth, cfg.redis_timeout, metrics)
    }

    fn open_with(
        url: &str,
        auth: &Auth,
        timeout: Duration,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let tls = url.starts_with("rediss://") || url.starts_with("rediss+cluster://");
        if tls {
            // rustls needs one process-wide crypto provider; ours is ring. Installing it again
            // (a second node in one process) is a harmless no-op.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: auth.ca.clone(),
        };
        let cluster_urls: Option<Vec<String>> =
            if let Some(rest) = url.strip_prefix("redis+cluster://") {
                Some(rest.split(',').map(|h| format!("redis://{h}")).collect())
            } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
                Some(rest.split(',').map(|h| format!("rediss://{h}")).collect())
            } else if url.contains(',') {
                Some(url.split(',').map(str::to_string).collect())
            } else {
                None
            };
        let backend = match cluster_urls {
            Some(urls) => {
                let mut b = ClusterClient::builder(urls)
                    .connection_timeout(timeout)
                    .response_timeout(timeout);
                if let Some(u) = &auth.username {
                    b = b.username(u);
                }
                if let Some(p) = &auth.password {
                    b = b.password(p);
                }
                if tls && auth.ca.is_some() {
                    b = b.certs(certs());
                }
                Backend::Cluster(Box::new(ClusterBackend {
                    client: b.build()?,
                    conn: OnceCell::new(),
                }))
            }
            None => {
                let mut info = url.into_connection_info()?;
                let mut settings = info.redis_settings().clone();
                if let Some(u) = &auth.username {
                    settings = settings.set_username(u);
                }
                if let Some(p) = &auth.password {
                    settings = settings.set_password(p);
                }
                info = info.set_redis_settings(settings);
                let client = if tls && auth.ca.is_some() {
                    redis::Client::build_with_tls(info, certs())?
                } else {
                    redis::Client::open(info)?
                };
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(2))
                    .set_number_of_retries(2);
                Backend::Single(ConnectionManager::new_lazy_with_config(client, cfg)?)
            }
        };
        Ok(Self {
            backend,
            timeout,
            up: AtomicBool::new(true),
            recoveries: AtomicU64::new(0),
            recovered_at: AtomicU64::new(0),
            opened: std::time::Instant::now(),
            metrics,
        })
    }

    /// The per-call deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How many times Redis came back after failing.
    pub fn recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::Relaxed)
    }

    /// Whether Redis came back from a failure less than `window` ago: it may have restarted
    /// empty, and nodes may not have re-published their presence yet.
    pub fn recovered_within(&self, window: Duration) -> bool {
        let at = self.recovered_at.load(Ordering::Relaxed);
        at != 0
            && self
                .opened
                .elapsed()
                .saturating_sub(Duration::from_millis(at))
                < window
    }

    /// Whether the last call succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn mark(&self, err: Option<&StoreError>) {
        let ok = err.is_none();
        let was = self.up.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                self.recoveries.fetch_add(1, Ordering::Relaxed);
                let at = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.recovered_at.store(at.max(1), Ordering::Relaxed);
                tracing::info!("redis reachable again");
            } else {
                let error = err.map(ToString::to_string).unwrap_or_default();
                tracing::warn!(%error, "redis unreachable; local routing continues, presence lookups ask the other nodes");
            }
        }
        self.metrics.redis_up.set(if ok { 1.0 } else { 0.0 });
        if !ok {
            self.metrics.redis_errors.increment(1);
        }
    }

    async fn exec(&self, what: Packed<'_>) -> Result<Vec<Value>, StoreError> {
        self.metrics.redis_commands.increment(what.count() as u64);
        let work = async {
            match &self.backend {
                Backend::Single(m) => what.send(&mut m.clone()).await,
                Backend::Cluster(b) => {
                    let c = b
                        .conn
                        .get_or_try_init(|| b.client.get_async_connection())
                        .await?;
                    match what {
                        Packed::Many(p, _) => send_each(c, p).await,
                        Packed::One(_) => what.send(&mut c.clone()).await,
                    }
                }
            }
        };
        let r = match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout),
        };
        self.mark(r.as_ref().err());
        r
    }

    /// Whether this is a Redis Cluster (keys of one command must then share a slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let v = self
            .exec(Packed::One(cmd))
            .await?
            .pop()
            .unwrap_or(Value::Nil);
        T::from_redis_value(v).map_err(|e| StoreError::Redis(e.into()))
    }

    /// Runs a pipeline (not a transaction: commands may touch keys in different slots).
    pub async fn pipeline(&self, p: &Pipeline, commands: usize) -> Result<Vec<Value>, StoreError> {
        if commands == 0 {
            return Ok(Vec::new());
        }
        self.exec(Packed::Many(p, commands)).await
    }

    /// A cheap liveness probe.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }
}

/// Redis Cluster refuses a pipeline whose keys live in different slots (CROSSSLOT): each
/// command goes on its own, all at once over the multiplexed cluster connection, to the master
/// of its key's slot.
async fn send_each(c: &ClusterConnection, p: &Pipeline) -> Result<Vec<Value>, RedisError> {
    let each = p.cmd_iter().map(|cmd| {
        let mut c = c.clone();
        async move { c.req_packed_command(cmd).await }
    });
    futures_util::future::join_all(each)
        .await
        .into_iter()
        .collect()
}

/// Credentials and TLS roots for Redis.
#[derive(Default)]
struct Auth {
    username: Option<String>,
    password: Option<String>,
    ca: Option<Vec<u8>>,
}

enum Packed<'a> {
    One(&'a Cmd),
    Many(&'a Pipeline, usize),
}

impl Packed<'_> {
    fn count(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Many(_, n) => *n,
        }
    }

    async fn send<C: ConnectionLike>(&self, c: &mut C) -> Result<Vec<Value>, RedisError> {
        match self {
            Self::One(cmd) => Ok(vec![c.req_packed_command(cmd).await?]),
            Self::Many(p, n) => c.req_packed_commands(p, 0, *n).await,
        }
    }
}
