//! Wires a node together and owns its tasks: the socket loops, the timer task and the HTTP
//! endpoint. Shutdown is detect -> signal -> wait: the caller's `shutdown` future fires, readiness
//! goes off, a [`CancellationToken`] stops every task, and a [`TaskTracker`] waits for them
//! within the configured grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::{self, Health, Metrics};
use crate::net;
use crate::router::Router;

/// How often the timer task runs push retransmissions and connect timeouts.
const TICK: Duration = Duration::from_millis(25);

/// A bound, not yet running node.
pub struct Server {
    cfg: Config,
    router: Arc<Router>,
    sockets: Vec<std::net::UdpSocket>,
    local_addr: SocketAddr,
    http: Option<TcpListener>,
    health: Arc<Health>,
}

impl Server {
    /// Binds the client port (and the metrics port, if configured).
    pub async fn bind(cfg: Config) -> anyhow::Result<Self> {
        let workers = if cfg.workers == 0 {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(8)
        } else {
            cfg.workers
        };
        let sockets = net::bind_udp(cfg.listen, workers)
            .with_context(|| format!("binding UDP {}", cfg.listen))?;
        let local_addr = sockets[0].local_addr()?;
        let http = match cfg.metrics_listen {
            Some(a) => Some(
                metrics::bind_http(a)
                    .await
                    .with_context(|| format!("binding metrics HTTP {a}"))?,
            ),
            None => None,
        };
        let router = Arc::new(Router::new(&cfg, Metrics::new()));
        Ok(Self {
            cfg,
            router,
            sockets,
            local_addr,
            http,
            health: Arc::new(Health::default()),
        })
    }

    /// The UDP address clients talk to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The HTTP address of `/metrics`, `/healthz` and `/readyz`, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The node's router (state and metrics), for embedding and tests.
    pub fn router(&self) -> Arc<Router> {
        self.router.clone()
    }

    /// Runs until `shutdown` completes, then stops within the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (tx, rx) = mpsc::channel(8192);
        let mut rx = Some(rx);
        for s in self.sockets {
            let sock = UdpSocket::from_std(s)?;
            tracker.spawn(net::run_socket(
                sock,
                self.router.clone(),
                rx.take(),
                stop.clone(),
            ));
        }
        tracker.spawn(net::run_timers(
            self.router.clone(),
            tx,
            TICK,
            self.cfg.sweep_interval,
            stop.clone(),
        ));
        if let Some(l) = self.http {
            tracker.spawn(metrics::serve_http(
                l,
                self.router.metrics().clone(),
                self.health.clone(),
                stop.clone(),
            ));
        }
        self.health.set_ready(true);
        tracing::info!(listen = %self.local_addr, "sigrouter serving");
        shutdown.await;
        tracing::info!("shutting down");
        self.health.set_ready(false);
        self.router.set_draining(true);
        stop.cancel();
        tracker.close();
        if tokio::time::timeout(self.cfg.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("tasks did not stop within the grace period");
        }
        Ok(())
    }
}
