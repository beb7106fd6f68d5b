//! A minimal tokio UDP echo server: the ceiling a router on the same machine is compared with.
//!
//! Deliberately plain, a bare tokio UDP echo: `--workers` sockets share
//! the port with `SO_REUSEPORT` (as the router's do), each owned by one task doing
//! `recv_from().await` then `send_to().await`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

/// Flags of `echo-server`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:7500")]
    listen: SocketAddr,
    /// Sockets (and tasks) sharing the port (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    duration: f64,
    /// Allow a listen address that is not loopback.
    #[arg(long)]
    allow_remote: bool,
}

fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<UdpSocket>> {
    let mut at = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(at), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.set_nonblocking(true)?;
        s.bind(&at.into())?;
        let std: std::net::UdpSocket = s.into();
        at = std.local_addr()?;
        out.push(UdpSocket::from_std(std)?);
    }
    Ok(out)
}

/// Echoes every datagram back to its source until the duration passes.
pub(crate) async fn run(a: Args) -> anyhow::Result<Option<Value>> {
    crate::stats::check_targets(&[a.listen], a.allow_remote)?;
    let duration = crate::stats::check_duration(a.duration)?;
    let workers = if a.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.workers
    };
    let socks = bind(a.listen, workers)?;
    let local = socks[0].local_addr()?;
    eprintln!("echo-server listening on {local} with {workers} sockets for {duration:?}");
    let echoed = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for sock in socks {
        let echoed = echoed.clone();
        tasks.spawn(async move {
            let mut buf = [0u8; 2048];
            let mut n_echoed = 0u64;
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                if sock.send_to(&buf[..n], from).await.is_ok() {
                    n_echoed += 1;
                    echoed.fetch_add(1, Ordering::Relaxed);
                }
                // Cheap cooperative point so the abort at the deadline is prompt under load.
                if n_echoed % 1024 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
    }
    tokio::time::sleep(duration).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(Some(json!({
        "echo_server": local.to_string(),
        "ran_s": duration.as_secs_f64(),
        "echoed": echoed.load(Ordering::Relaxed),
    })))
}
