//! `sigrouter-loadtest`: a load generator speaking the real protocol over real UDP.
//!
//! Subcommands:
//! - `heartbeat`: registers many sessions over a few sockets with hand-made datagrams
//!   ([`sigrouter_proto`] directly, for speed), then keeps a window of heartbeats in flight per
//!   socket and reports acks per second and latency percentiles. `--echo` runs the same loop
//!   against `echo-server`, the baseline a router's figure is compared with.
//! - `connect`: pairs of [`sigrouter_client::Client`]s; targets accept every Incoming, initiators
//!   connect at an overall rate; outcomes by kind and connect latency. The client library
//!   resumes after `UnknownSession` and follows `Migrate`, so the same run spans a rolling
//!   upgrade.
//! - `echo-server`: a minimal tokio UDP echo server (the baseline).
//! - `rolling-upgrade`: starts a whole cluster on loopback (redis-server, `sigrouter serve`
//!   processes, optionally nginx), restarts every node in turn under open-loop connect load,
//!   and writes `result.json` and `report.svg`. Run through `loadtest/rolling-upgrade`.
//! - `drain`: starts a cluster, registers many simulated sessions on one node (many per
//!   socket, each from its own loopback address), SIGTERMs that node while the others carry
//!   heartbeats, and reports how long until every session resumed elsewhere, resumes by cause,
//!   heartbeat latency on the other nodes, and whether every session is reachable afterwards.
//! - `scale`: registers many sessions (many per socket), heartbeats them at a steady total
//!   rate, and reports the server's memory per session, registration time, acks/s, latency,
//!   losses and CPU time per answer, for routers and the echo server side by side.
//!
//! - `flood`: a Register flood from many loopback source addresses against a node with live
//!   clients; what it costs the node and the clients.
//!
//! Every run is bounded in time and stops by itself, and traffic goes only to the addresses
//! given, which must be loopback unless `--allow-remote` says otherwise. Results are one JSON
//! object on stdout; progress goes to stderr. Exit 0 on success, 1 when a run's criteria
//! failed (`rolling-upgrade`), 2 on an error.
//!
//! # Layout
//! - `heartbeat`: the raw-datagram generator (and its echo mode).
//! - `connect`: the client-library generator.
//! - `echo`: the echo server.
//! - `upgrade`: the rolling-upgrade run (processes, client fleet, report).
//! - `scale`: the many-sessions run and its process readings (`/proc`).
//! - `drain`: the million-session drain (conductor, simulated fleet).
//! - `flood`: the Register flood.
//! - `stats`: latency summaries and the target-address guard.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod connect;
mod drain;
mod echo;
mod flood;
mod heartbeat;
mod hello;
mod scale;
mod stats;
mod upgrade;

#[derive(Parser, Debug)]
#[command(
    name = "sigrouter-loadtest",
    version,
    about = "Load generator for sigrouter (bounded runs, loopback targets by default)"
)]
struct Cli {
    /// Runtime worker threads (0: one per core).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Heartbeat throughput from many sessions over a few sockets (raw datagrams).
    Heartbeat(heartbeat::Args),
    /// Connect/accept exchanges between pairs of clients, at a fixed overall rate.
    Connect(connect::Args),
    /// A minimal UDP echo server: the baseline for `heartbeat --echo`.
    EchoServer(echo::Args),
    /// A whole cluster on this machine, every node restarted in turn under connect load;
    /// writes result.json and report.svg (normally run through `loadtest/rolling-upgrade`).
    RollingUpgrade(upgrade::Args),
    /// One node holding many sessions drains while the others heartbeat: time until every
    /// session resumed elsewhere, resumes by cause, heartbeat latency on the other nodes,
    /// reachability afterwards.
    Drain(drain::Args),
    /// Many sessions at a steady heartbeat rate: memory per session, registration time,
    /// acks/s, latency, losses and server CPU per answer, routers and the echo server
    /// interleaved.
    Scale(scale::Args),
    /// A Register flood from many sources against a node with live clients: what it costs
    /// the node (sessions, memory, bytes) and its clients (latency, failures).
    Flood(flood::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The client library's own decisions (where it moves, what failed), on stderr:
    // SIGROUTER_LOADTEST_LOG=sigrouter_client=debug.
    if let Ok(filter) = std::env::var("SIGROUTER_LOADTEST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cli.threads > 0 {
        rt.worker_threads(cli.threads);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: building the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async move {
        match cli.cmd {
            Command::Heartbeat(a) => heartbeat::run(a).await,
            Command::Connect(a) => connect::run(a).await,
            Command::EchoServer(a) => echo::run(a).await,
            Command::RollingUpgrade(a) => upgrade::run(a).await,
            Command::Scale(a) => scale::run(a).await,
            Command::Drain(a) => drain::run(a).await,
            Command::Flood(a) => flood::run(a).await,
        }
    });
    // Client tasks that outlive the run must not hold the process open.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match r {
        Ok(summary) => {
            let mut code = ExitCode::SUCCESS;
            if let Some(s) = summary {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).unwrap_or_else(|_| s.to_string())
                );
                // A run that measured what it should but missed its criteria.
                if s.get("passed") == Some(&serde_json::Value::Bool(false)) {
                    code = ExitCode::from(1);
                }
            }
            code
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
