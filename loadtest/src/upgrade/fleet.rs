//! The client fleet: N [`Client`]s of the client library in this process, every one
//! accepting every `Incoming`, and an open-loop generator that starts connects between random
//! pairs at a fixed rate whatever the answers take, recording each one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use sigrouter_client::{Client, ClientConfig, Event, Events, Uuid};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::connect::kind;

/// Dispatcher period: connects due in each slice start together.
const SLICE: Duration = Duration::from_millis(5);
/// Longest wait for one connect's outcome; the library's own deadline (12 s) comes first.
const OUTCOME_WAIT: Duration = Duration::from_secs(15);

/// One connect: when it started (since the load started), how long it took, how it ended.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) start: Duration,
    pub(crate) latency: Duration,
    pub(crate) outcome: String,
}

/// What the clients' event loops saw.
#[derive(Default)]
pub(crate) struct EventCounts {
    pub(crate) incoming: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) accept_failed: AtomicU64,
    pub(crate) migrated: AtomicU64,
    pub(crate) rehomed: AtomicU64,
    pub(crate) resumed: AtomicU64,
    pub(crate) reregistered: AtomicU64,
    pub(crate) stranded: AtomicU64,
}

impl EventCounts {
    pub(crate) fn json(&self) -> serde_json::Value {
        let l = |x: &AtomicU64| x.load(Ordering::Relaxed);
        serde_json::json!({
            "incoming": l(&self.incoming),
            "accepted": l(&self.accepted),
            "accept_failed": l(&self.accept_failed),
            "migrated": l(&self.migrated),
            "rehomed": l(&self.rehomed),
            "resumed": l(&self.resumed),
            "reregistered": l(&self.reregistered),
            "stranded": l(&self.stranded),
        })
    }
}

/// Clients per loopback address.
const CLIENTS_PER_IP: usize = 128;

/// Where client `i` binds: one of many loopback addresses (127.1.0.0 and up, 128 clients
/// each), port chosen by the system. Every client takes a new port at each move (and, behind
/// nginx, so does the proxy for each new client port, holding it for its 60 s session
/// timeout); on one address, 10,000 clients and the proxy exhaust the 28,000 ephemeral ports
/// within two drains, and a client that cannot take a new port stays on the old one, which
/// the proxy keeps sending to the draining node. Spread over addresses, each has its own.
fn client_bind(i: usize) -> SocketAddr {
    let k = i / CLIENTS_PER_IP;
    SocketAddr::from(([127, 1 + (k >> 16) as u8, (k >> 8) as u8, k as u8], 0))
}

/// The registered clients.
pub(crate) struct Fleet {
    clients: Vec<Client>,
    /// Each client's current UUID (it changes only if the client had to register anew).
    uuids: Arc<Vec<Mutex<Uuid>>>,
    pub(crate) events: Arc<EventCounts>,
    tasks: JoinSet<()>,
}

/// Reads one client's events until it closes: accepts every Incoming, counts moves, and keeps
/// its UUID current.
fn spawn_events(
    tasks: &mut JoinSet<()>,
    client: Client,
    mut events: Events,
    index: usize,
    uuids: Arc<Vec<Mutex<Uuid>>>,
    ev: Arc<EventCounts>,
) {
    tasks.spawn(async move {
        while let Some(e) = events.recv().await {
            let count = match e {
                Event::Incoming { connection, .. } => {
                    let (c, counts) = (client.clone(), ev.clone());
                    // Off the event loop, so a slow answer never delays the next push.
                    tokio::spawn(async move {
                        match c.accept(connection, b"answer").await {
                            Ok(()) => counts.accepted.fetch_add(1, Ordering::Relaxed),
                            Err(_) => counts.accept_failed.fetch_add(1, Ordering::Relaxed),
                        };
                    });
                    &ev.incoming
                }
                Event::Migrated { .. } => &ev.migrated,
                Event::Rehomed { .. } => &ev.rehomed,
                Event::Resumed { .. } => &ev.resumed,
                Event::Stranded { .. } => &ev.stranded,
                Event::Reregistered { uuid } => {
                    *uuids[index].lock().unwrap_or_else(PoisonError::into_inner) = uuid;
                    &ev.reregistered
                }
                _ => continue,
            };
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
}

impl Fleet {
    /// Registers `n` clients, client `i` at `servers[i % len]` with `fallbacks` as its other
    /// addresses, `parallel` registrations at a time. Fails if any client cannot register.
    pub(crate) async fn register(
        n: usize,
        servers: &[SocketAddr],
        fallbacks: &[SocketAddr],
        parallel: usize,
    ) -> anyhow::Result<Self> {
        let sem = Arc::new(Semaphore::new(parallel.max(1)));
        let mut regs = JoinSet::new();
        for i in 0..n {
            let mut cfg = ClientConfig::new(servers[i % servers.len()]);
            cfg.fallback_servers = fallbacks.to_vec();
            cfg.bind = Some(client_bind(i));
            let sem = sem.clone();
            regs.spawn(async move {
                let _permit = sem.acquire_owned().await;
                (i, Client::register(cfg).await)
            });
        }
        let mut got: Vec<Option<(Client, Events)>> = (0..n).map(|_| None).collect();
        let mut failed = Vec::new();
        while let Some(r) = regs.join_next().await {
            match r? {
                (i, Ok(c)) => got[i] = Some(c),
                (_, Err(e)) => failed.push(e.to_string()),
            }
        }
        anyhow::ensure!(
            failed.is_empty(),
            "{} of {n} clients could not register, first: {}",
            failed.len(),
            failed[0]
        );
        let got: Vec<(Client, Events)> = got.into_iter().flatten().collect();
        let uuids = Arc::new(
            got.iter()
                .map(|(c, _)| Mutex::new(c.uuid()))
                .collect::<Vec<_>>(),
        );
        let events = Arc::new(EventCounts::default());
        let mut tasks = JoinSet::new();
        let mut clients = Vec::with_capacity(n);
        for (i, (c, e)) in got.into_iter().enumerate() {
            spawn_events(&mut tasks, c.clone(), e, i, uuids.clone(), events.clone());
            clients.push(c);
        }
        Ok(Self {
            clients,
            uuids,
            events,
            tasks,
        })
    }

    /// Starts connects between random pairs (never a client to itself) at `rate` per second
    /// from `started` until the instant `end` is set to (open loop: a connect starts when it
    /// is due, however many are still waiting for an answer), then waits for those in flight.
    /// Returns every connect, in no particular order.
    pub(crate) async fn load(
        &self,
        rate: f64,
        started: Instant,
        mut end: watch::Receiver<Option<Instant>>,
    ) -> Vec<Record> {
        let records = Arc::new(Mutex::new(Vec::<Record>::new()));
        let mut conns = JoinSet::new();
        let mut dispatched = 0u64;
        let mut ticker = tokio::time::interval(SLICE);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let n = self.clients.len();
        loop {
            ticker.tick().await;
            let now = Instant::now();
            // Copied out at once: no watch guard is held past this line.
            let stop_at = *end.borrow_and_update();
            if stop_at.is_some_and(|e| now >= e) {
                break;
            }
            let due = (now.saturating_duration_since(started).as_secs_f64() * rate) as u64;
            while dispatched < due {
                dispatched += 1;
                let (i, j) = {
                    let mut rng = rand::thread_rng();
                    let i = rng.gen_range(0..n);
                    (i, (i + rng.gen_range(1..n)) % n)
                };
                let to = *self.uuids[j].lock().unwrap_or_else(PoisonError::into_inner);
                let (c, records) = (self.clients[i].clone(), records.clone());
                // Timed from here, not from when the task first runs: a busy generator shows
                // as latency, it does not hide it.
                let t0 = now;
                conns.spawn(async move {
                    // The library gives up at its own deadline (12 s); this bound only keeps a
                    // broken client from holding the run open.
                    let outcome =
                        match tokio::time::timeout(OUTCOME_WAIT, c.connect(to, b"offer")).await {
                            Ok(r) => kind(&r),
                            Err(_) => "no-outcome".into(),
                        };
                    let rec = Record {
                        start: t0.saturating_duration_since(started),
                        latency: t0.elapsed(),
                        outcome,
                    };
                    records
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(rec);
                });
            }
            while conns.try_join_next().is_some() {}
        }
        eprintln!(
            "load stopped; waiting for {} connects in flight",
            conns.len()
        );
        while conns.join_next().await.is_some() {}
        let out = std::mem::take(&mut *records.lock().unwrap_or_else(PoisonError::into_inner));
        out
    }

    /// Says `Bye` for every client (bounded) and stops their tasks.
    pub(crate) async fn close(mut self) {
        let mut byes = JoinSet::new();
        for c in self.clients.drain(..) {
            byes.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), c.bye()).await;
            });
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while byes.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}
