//! A real node in this process on a free loopback port, for the client and CLI tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

use sigrouter::router::Router;
use sigrouter::server::Server;
use sigrouter::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The node configuration tests start from: loopback, ephemeral port.
pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    }
}

/// A running node; stops when dropped.
pub struct Node {
    pub addr: SocketAddr,
    pub router: Arc<Router>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Node {
    pub async fn start(cfg: Config) -> Self {
        let server = Server::bind(cfg).await.expect("bind");
        let addr = server.local_addr();
        let router = server.router();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            router,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the node and waits until its sockets are closed.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("node task").expect("node run");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
