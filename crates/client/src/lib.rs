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
//! - Retransmits every request with the same request id (the router deduplicates) on a
//!   timeout doubling from [`ClientConfig::initial_rto`] to [`ClientConfig::max_rto`], until
//!   the request's deadline; pauses and retries when the router says `RateLimited`,
//!   `RetryLater` or `Draining`.
//! - Heartbeats at the period the router gives in `Registered`.
//! - Resumes (same UUID) when a request gets `UnknownSession`; follows `Migrate` (new local
//!   port, resume at the new address: [`Event::Migrated`]); after
//!   [`ClientConfig::missed_acks_before_rehome`] unanswered heartbeats, moves to a new local
//!   port and resumes at the configured server until that works ([`Event::Rehomed`]).
//! - Drops answers and pushes whose MAC does not verify, and unauthenticated answers from
//!   anyone but the router it is talking to.
//! - Acknowledges every copy of every push, and surfaces each push once.
//!
//! # Layout
//! - `client`: [`Client`], the public handle; each method builds one request.
//! - `shared`: state shared by handles and tasks, request ids, waiters, retransmission, retry.
//! - `driver`: the socket task, sole owner of the UDP socket: send, receive, authenticate,
//!   route answers by request id, acknowledge and de-duplicate pushes.
//! - `supervisor`: the task keeping the session alive: heartbeats, resume, migrate, re-home.
//! - `backoff`, `window`, `loss`: pure helpers (retransmission schedule, push-duplicate
//!   window, simulated loss).
//! - [`raw`]: hand-made datagrams for router tests that break the rules on purpose.

mod backoff;
mod client;
mod config;
mod driver;
mod error;
mod event;
mod loss;
pub mod raw;
mod shared;
mod supervisor;
mod window;

pub use client::Client;
pub use config::ClientConfig;
pub use error::ClientError;
pub use event::{ConnectOutcome, Event, Events};
pub use sigrouter_proto::{ErrorCode, FailReason, Secret};
pub use uuid::Uuid;
