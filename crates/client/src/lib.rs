//! Async client for the sigrouter UDP signaling router (protocol v1).
//!
//! ```no_run
//! # async fn demo() -> Result<(), sigrouter_client::ClientError> {
//! use sigrouter_client::{Client, ClientConfig, ConnectOutcome, Event};
//!
//! let (client, mut events) = Client::register(ClientConfig::new("198.51.100.7:7400".parse().unwrap())).await?;
//! println!("I am {}", client.uuid());
//! tokio::spawn({
//!     let client = client.clone();
//!     async move {
//!         while let Some(ev) = events.recv().await {
//!             if let Event::Incoming { connection, .. } = ev {
//!                 let _ = client.accept(connection, b"hi").await;
//!             }
//!         }
//!     }
//! });
//! if let ConnectOutcome::Connected { connection, observed, .. } =
//!     client.connect(uuid::Uuid::nil(), b"offer").await?
//! {
//!     client.signal(connection, b"candidate").await?;
//!     println!("peer is at {observed}");
//! }
//! client.bye().await
//! # }
//! ```
//!
//! # What the client does by itself
//! - Retransmits every request unchanged, with the same request id (the router deduplicates),
//!   on a timeout doubling from [`ClientConfig::initial_rto`] to [`ClientConfig::max_rto`],
//!   until the request's deadline.
//! - Retries refusals by itself until the request's deadline, after a jittered pause doubling
//!   from 250 ms to 2 s (each pause scaled by a random factor in [0.5, 1.5), so clients refused
//!   together do not come back together): after `RateLimited`, `RetryLater` or
//!   `ConnectFailed{RetryLater}` it sends it again as a new request (new id, as the protocol
//!   requires: the router remembers the refusal under the old one). A caller sees such a
//!   refusal only once the deadline has passed.
//! - Never retries at a router that said `Draining` (or `Capacity`). It goes, from a new local
//!   port, to the address the refusal names (`Error.to`), then to its configured servers, then
//!   to addresses routers named before (`Migrate` targets, earlier redirects); the node being
//!   left comes last, so it is asked only when nothing else is known (it may be a load
//!   balancer). When every address fails it emits [`Event::Stranded`] and starts over after a
//!   capped, jittered pause (250 ms doubling to 10 s). `Register` does the same within
//!   [`ClientConfig::request_timeout`]; a request refused with `Draining` moves the session
//!   first, then is sent again as a new request.
//!   Request ids only grow, start below 2^32 and are never 0.
//! - Answers a `Retry` (a router validating source addresses) by sending the same `Register`
//!   or `Resume` again at once with the token it carries, as a new request (new id);
//!   transparently, up to 3 times in a row for one request.
//! - Keeps at most 15 application requests in flight (more wait their turn), plus its own
//!   heartbeat: the router remembers the last 16 answers per session.
//! - Heartbeats at the period the router gives in `Registered`.
//! - Resumes (same UUID) when a request gets `UnknownSession`, then retries it as a new
//!   request ([`Event::Resumed`]); follows `Migrate` (new local port, resume at the given
//!   address, or else at the configured servers, the draining node last: [`Event::Migrated`]);
//!   after
//!   [`ClientConfig::missed_acks_before_rehome`] unanswered heartbeats, moves to a new local
//!   port and resumes at the configured server until that works ([`Event::Rehomed`]). When a
//!   session cannot be resumed (`Unauthorized`: it expired, or the node restarted), registers a
//!   new one ([`Event::Reregistered`], new UUID).
//! - Drops answers and pushes whose MAC does not verify, and unauthenticated answers
//!   (`Registered`, `Error`, `Retry`) from anyone but the router it is talking to.
//! - Acknowledges every copy of every push and surfaces each push once (remembered for 30 s;
//!   a push is identified by its id *and* a hash of its body, so a node that numbers pushes
//!   afresh after a move is never mistaken for a duplicate).

//! # Layout
//! Imports point one way, from the top of this list to the bottom; no module imports one
//! above it.
//! - `client`: [`Client`], the public handle; each method builds one request. Starts the
//!   two tasks below.
//! - `supervisor`: the task keeping the session alive: heartbeats, resume, migrate, re-home.
//! - `driver`: the socket task, sole owner of the UDP socket: send, receive, authenticate,
//!   route answers by request id, acknowledge and de-duplicate pushes.
//! - `shared`: state shared by handles and tasks, the commands the two tasks take (sent
//!   through channels held there), request ids, waiters, retransmission, retry.
//! - `config`, `event`, `error`: the public types.
//! - `backoff`, `walk`, `window`, `loss`: pure helpers (retransmission schedule, the order
//!   in which router addresses are tried, push-duplicate window, simulated loss).

mod backoff;
mod client;
mod config;
mod driver;
mod error;
mod event;
mod loss;
mod shared;
mod supervisor;
mod walk;
mod window;

pub use client::Client;
pub use config::ClientConfig;
pub use error::ClientError;
pub use event::{ConnectOutcome, Event, Events};
pub use sigrouter_proto::{ErrorCode, FailReason, Secret};
pub use uuid::Uuid;
