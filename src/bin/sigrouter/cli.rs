//! `sigrouter client …`: small command-line clients built on [`sigrouter_client`], for
//! operators and scripts. Each prints JSON lines on stdout (one object per line, flushed
//! line by line) and tells the outcome by its exit code:
//!
//! - `listen`: registers, accepts every incoming connection and prints each event until
//!   SIGINT/SIGTERM, then says `Bye`. Exit 0.
//! - `connect`: registers, connects to a UUID, prints the outcome (and optionally exchanges
//!   one signal). Exit 0 when connected, 1 when the connection failed.
//! - `query`: prints which UUIDs are online. Exit 0.
//!
//! Any error (router unreachable, refused, bad input) prints `{"event":"error","error":...}`
//! and exits 2. Every flag can also be set as a `SIGROUTER_*` environment variable.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use sigrouter_client::{Client, ClientConfig, ConnectOutcome, Event, Events};
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};
use uuid::Uuid;

/// The `sigrouter client` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub(crate) enum ClientCommand {
    /// Register, stay online, accept every incoming connection and print events.
    Listen(ListenArgs),
    /// Register, connect to another client and print the outcome.
    Connect(ConnectArgs),
    /// Print which clients are online.
    Query(QueryArgs),
}

/// Flags every client command shares.
#[derive(Args, Debug, Clone)]
pub(crate) struct RouterArgs {
    /// The router, as host:port.
    #[arg(long, env = "SIGROUTER_SERVER")]
    pub(crate) server: String,
    /// Local (LAN) addresses to announce to peers, comma-separated. Default: the address this
    /// host uses to reach the router.
    #[arg(long, env = "SIGROUTER_LOCAL", value_delimiter = ',')]
    pub(crate) local: Vec<SocketAddr>,
    /// Deadline of one request, retransmissions included, in seconds.
    #[arg(long, env = "SIGROUTER_REQUEST_TIMEOUT_SECS", default_value_t = 5.0)]
    pub(crate) request_timeout_secs: f64,
    /// Unanswered heartbeats after which the client moves to a new port and resumes.
    #[arg(long, env = "SIGROUTER_MISSED_ACKS", default_value_t = 3)]
    pub(crate) missed_acks: u32,
}

/// Flags of `sigrouter client listen`.
#[derive(Args, Debug, Clone)]
pub(crate) struct ListenArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub(crate) router: RouterArgs,
    /// Payload (text) handed to every initiator in the Accept.
    #[arg(long, env = "SIGROUTER_PAYLOAD", default_value = "")]
    pub(crate) payload: String,
    /// Send every received signal payload back to its sender, over the same connection.
    #[arg(long, env = "SIGROUTER_ECHO_SIGNALS")]
    pub(crate) echo_signals: bool,
}

/// Flags of `sigrouter client connect`.
#[derive(Args, Debug, Clone)]
pub(crate) struct ConnectArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub(crate) router: RouterArgs,
    /// The client to connect to.
    #[arg(long, env = "SIGROUTER_TO")]
    pub(crate) to: Uuid,
    /// Payload (text) handed to the target in the Connect.
    #[arg(long, env = "SIGROUTER_PAYLOAD", default_value = "")]
    pub(crate) payload: String,
    /// Once connected, send this signal and wait for one signal back.
    #[arg(long, env = "SIGROUTER_SIGNAL")]
    pub(crate) signal: Option<String>,
    /// How long to wait for the signal back, in seconds.
    #[arg(long, env = "SIGROUTER_SIGNAL_WAIT_SECS", default_value_t = 5.0)]
    pub(crate) signal_wait_secs: f64,
    /// Deadline of the Connect (the target's decision included), in seconds.
    #[arg(
        long,
        env = "SIGROUTER_CLIENT_CONNECT_TIMEOUT_SECS",
        default_value_t = 12.0
    )]
    pub(crate) connect_timeout_secs: f64,
}

/// Flags of `sigrouter client query`.
#[derive(Args, Debug, Clone)]
pub(crate) struct QueryArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub(crate) router: RouterArgs,
    /// The clients to ask about.
    #[arg(required = true)]
    pub(crate) uuids: Vec<Uuid>,
}

/// Runs a client command, printing to stdout; `listen` stops on SIGINT or SIGTERM. Returns the
/// process exit code.
pub(crate) async fn run(cmd: ClientCommand) -> anyhow::Result<i32> {
    run_with(cmd, std::io::stdout(), stop_signal()).await
}

/// Like [`run`], printing to `out` and stopping `listen` when `shutdown` completes (tests use
/// this to run the commands in-process).
pub(crate) async fn run_with<W: Write + Send>(
    cmd: ClientCommand,
    out: W,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<i32> {
    let mut out = Lines(out);
    let r = match cmd {
        ClientCommand::Listen(a) => listen(a, &mut out, shutdown).await,
        ClientCommand::Connect(a) => connect(a, &mut out).await,
        ClientCommand::Query(a) => query(a, &mut out).await,
    };
    match r {
        Ok(code) => Ok(code),
        Err(e) => {
            out.put(json!({"event": "error", "error": format!("{e:#}")}))?;
            Ok(2)
        }
    }
}

/// Completes on SIGTERM or SIGINT (ctrl-c).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// JSON lines, flushed one by one so a reader sees each event as it happens.
struct Lines<W>(W);

impl<W: Write> Lines<W> {
    fn put(&mut self, v: Value) -> anyhow::Result<()> {
        writeln!(self.0, "{v}")?;
        self.0.flush()?;
        Ok(())
    }
}

fn text(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

fn secs(flag: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{flag} must be a positive number of seconds, got {v}"))
}

/// Resolves host:port, preferring IPv4 (a router listening on 0.0.0.0 is not reachable at
/// the ::1 that "localhost" often resolves to first).
async fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("resolving --server {server:?}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .with_context(|| format!("--server {server:?} resolves to no address"))
}

async fn client_config(a: &RouterArgs) -> anyhow::Result<ClientConfig> {
    let mut cfg = ClientConfig::new(resolve(&a.server).await?);
    cfg.local_addrs = a.local.clone();
    cfg.request_timeout = secs("request-timeout-secs", a.request_timeout_secs)?;
    cfg.missed_acks_before_rehome = a.missed_acks.max(1);
    Ok(cfg)
}

async fn register(cfg: ClientConfig) -> anyhow::Result<(Client, Events)> {
    let server = cfg.server;
    Client::register(cfg)
        .await
        .with_context(|| format!("registering at {server}"))
}

/// Says Bye (briefly: the router expires the session anyway) and stops the client.
async fn leave(client: Client) {
    let _ = tokio::time::timeout(Duration::from_secs(2), client.bye()).await;
    client.close().await;
}

fn event_json(ev: &Event) -> Value {
    match ev {
        Event::Incoming {
            connection,
            from,
            observed,
            local,
            payload,
        } => json!({
            "event": "incoming",
            "connection": connection.to_string(),
            "from": from.to_string(),
            "observed": observed.to_string(),
            "local": local.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "payload": text(payload),
        }),
        Event::Signal {
            connection,
            from,
            payload,
        } => json!({
            "event": "signal",
            "connection": connection.to_string(),
            "from": from.to_string(),
            "payload": text(payload),
        }),
        Event::Migrated { to } => json!({"event": "migrated", "to": to.to_string()}),
        Event::Rehomed { server } => json!({"event": "rehomed", "server": server.to_string()}),
        Event::Resumed { server } => json!({"event": "resumed", "server": server.to_string()}),
        Event::Reregistered { uuid } => {
            json!({"event": "reregistered", "uuid": uuid.to_string()})
        }
        Event::ObservedChanged { observed } => {
            json!({"event": "observed_changed", "observed": observed.to_string()})
        }
        Event::Stranded { tried, retry_in } => json!({
            "event": "stranded",
            "tried": tried.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "retry_in_ms": retry_in.as_millis() as u64,
        }),
        other => json!({"event": "other", "debug": format!("{other:?}")}),
    }
}

async fn listen<W: Write>(
    a: ListenArgs,
    out: &mut Lines<W>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<i32> {
    let cfg = client_config(&a.router).await?;
    let (client, mut events) = register(cfg).await?;
    out.put(json!({
        "event": "registered",
        "uuid": client.uuid().to_string(),
        "observed": client.observed().to_string(),
        "local": client.local_addr().to_string(),
    }))?;
    let payload = a.payload.into_bytes();
    // Answers run in their own tasks so a slow one never holds up the next event; their
    // failures come back here to be printed.
    let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<String>();
    tokio::pin!(shutdown);
    let code = loop {
        tokio::select! {
            _ = &mut shutdown => break 0,
            Some(err) = fail_rx.recv() => out.put(json!({"event": "error", "error": err}))?,
            ev = events.recv() => {
                let Some(ev) = ev else {
                    out.put(json!({"event": "error", "error": "client stopped"}))?;
                    break 2;
                };
                out.put(event_json(&ev))?;
                match ev {
                    Event::Incoming { connection, .. } => {
                        let (c, p, f) = (client.clone(), payload.clone(), fail_tx.clone());
                        tokio::spawn(async move {
                            if let Err(e) = c.accept(connection, &p).await {
                                let _ = f.send(format!("accept {connection}: {e}"));
                            }
                        });
                    }
                    Event::Signal { connection, payload: p, .. } if a.echo_signals => {
                        let (c, f) = (client.clone(), fail_tx.clone());
                        tokio::spawn(async move {
                            if let Err(e) = c.signal(connection, &p).await {
                                let _ = f.send(format!("echo on {connection}: {e}"));
                            }
                        });
                    }
                    _ => {}
                }
            }
        }
    };
    leave(client).await;
    Ok(code)
}

async fn connect<W: Write>(a: ConnectArgs, out: &mut Lines<W>) -> anyhow::Result<i32> {
    let mut cfg = client_config(&a.router).await?;
    cfg.connect_timeout = secs("connect-timeout-secs", a.connect_timeout_secs)?;
    let signal_wait = secs("signal-wait-secs", a.signal_wait_secs)?;
    let (client, mut events) = register(cfg).await?;
    let r = connect_and_signal(&client, &mut events, &a, signal_wait, out).await;
    leave(client).await;
    r
}

async fn connect_and_signal<W: Write>(
    client: &Client,
    events: &mut Events,
    a: &ConnectArgs,
    signal_wait: Duration,
    out: &mut Lines<W>,
) -> anyhow::Result<i32> {
    let outcome = client
        .connect(a.to, a.payload.as_bytes())
        .await
        .with_context(|| format!("connecting to {}", a.to))?;
    let connection = match outcome {
        ConnectOutcome::Connected {
            connection,
            peer,
            observed,
            local,
            payload,
        } => {
            out.put(json!({
                "event": "connected",
                "connection": connection.to_string(),
                "peer": peer.to_string(),
                "observed": observed.to_string(),
                "local": local.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "payload": text(&payload),
            }))?;
            connection
        }
        ConnectOutcome::Failed { reason, payload } => {
            out.put(json!({
                "event": "connect_failed",
                "reason": reason.name(),
                "payload": text(&payload),
            }))?;
            return Ok(1);
        }
    };
    let Some(sig) = &a.signal else {
        return Ok(0);
    };
    client
        .signal(connection, sig.as_bytes())
        .await
        .context("sending the signal")?;
    let until = Instant::now() + signal_wait;
    loop {
        match timeout_at(until, events.recv()).await {
            Ok(Some(ev @ Event::Signal { connection: c, .. })) if c == connection => {
                out.put(event_json(&ev))?;
                return Ok(0);
            }
            Ok(Some(_)) => {}
            Ok(None) => anyhow::bail!("client stopped while waiting for a signal back"),
            Err(_) => anyhow::bail!("no signal back within {signal_wait:?}"),
        }
    }
}

async fn query<W: Write>(a: QueryArgs, out: &mut Lines<W>) -> anyhow::Result<i32> {
    let cfg = client_config(&a.router).await?;
    let (client, _events) = register(cfg).await?;
    let r = client.query(&a.uuids).await.context("query");
    leave(client).await;
    for (uuid, online) in a.uuids.iter().zip(r?) {
        out.put(json!({"uuid": uuid.to_string(), "online": online}))?;
    }
    Ok(0)
}
