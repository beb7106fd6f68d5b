//! The `sigrouter` command: `serve` runs a node, `client …` talks to one.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sigrouter::{Config, ServeArgs};

#[derive(Parser, Debug)]
#[command(
    name = "sigrouter",
    version,
    about = "UDP signaling router for peer-to-peer client fleets"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a router node (single-node by default; cluster mode with --redis-url).
    Serve(Box<ServeArgs>),
    /// Talk to a router as a client (prints JSON lines).
    #[command(subcommand)]
    Client(cli::ClientCommand),
}

/// Logs to stderr: text (with colours only when stderr is a terminal) or JSON lines.
fn init_tracing(json: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("SIGROUTER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!json && std::io::stderr().is_terminal());
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = Config::from_args(&args)?;
    // One line that says what runs: the build and the effective configuration (secrets are
    // redacted by Config's Debug: keys show as fingerprints, passwords not at all).
    tracing::info!(
        version = sigrouter::metrics::VERSION,
        commit = sigrouter::metrics::COMMIT,
        config = ?cfg,
        "sigrouter starting"
    );
    let server = sigrouter::server::Server::bind(cfg).await?;
    server.run(shutdown_signal()).await
}

/// jemalloc: a busy node allocates and frees many small buffers (datagrams, envelopes, map
/// entries) on several threads, where the system allocator spends a tenth of its CPU.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Command::Serve(args) => {
            init_tracing(args.log_json);
            match serve(*args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Once: in the log format the operator chose. Only when logging is off
                    // (SIGROUTER_LOG=off) does it go to stderr as plain text instead.
                    if tracing::enabled!(tracing::Level::ERROR) {
                        tracing::error!(error = format!("{e:#}"), "sigrouter failed");
                    } else {
                        eprintln!("error: {e:#}");
                    }
                    ExitCode::FAILURE
                }
            }
        }
        Command::Client(cmd) => match cli::run(cmd).await {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(2)),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}
