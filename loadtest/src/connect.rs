//! Connect/accept exchanges between pairs of [`Client`]s at a fixed overall rate.
//!
//! Pair `i` has its initiator on server `i % n` and its target on server `(i + 1) % n`, so with
//! two addresses every connect crosses nodes (initiator on node 1, target on node 2) and with
//! one address everything is local. Targets accept every `Incoming` (the client library acks
//! the pushes). Initiators are picked round-robin by a dispatcher that starts connects at
//! `--rate` per second overall, at most `--inflight` at a time per initiator; a connect that
//! would exceed that is counted as `skipped` (the generator, not the router, is the limit).
//!
//! The client library resumes after `UnknownSession`, follows `Migrate` to a new socket and
//! node, and re-homes after missed heartbeats; those events are counted, so one run can span a
//! rolling upgrade. A target that had to register anew publishes its new UUID to its initiator.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use sigrouter_client::{Client, ClientConfig, ClientError, ConnectOutcome, Event, Events, Uuid};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::stats;

/// Dispatcher period: connects due in each slice start together. One millisecond (the
/// runtime's timer resolution): at 5,000/s that starts 5 at a time, where a longer slice would
/// start bursts whose last connect waits behind the others in this process.
const SLICE: Duration = Duration::from_millis(1);

/// Flags of `connect`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Router address(es), comma-separated; clients are spread over them.
    #[arg(long, value_delimiter = ',', required = true)]
    server: Vec<SocketAddr>,
    /// Initiator/target pairs.
    #[arg(long, default_value_t = 50)]
    pairs: usize,
    /// Seconds of connecting (registration comes first and is not counted).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Connects started per second, over all pairs.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Connects in flight per initiator at most (the protocol allows 16 requests in flight).
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    /// Clients registering at the same time during setup.
    #[arg(long, default_value_t = 32)]
    register_parallel: usize,
    /// Allow server addresses that are not loopback.
    #[arg(long)]
    allow_remote: bool,
    /// Add outcomes per second (by the second the connect started) to the summary: shows
    /// when failures happened during a rolling upgrade.
    #[arg(long)]
    timeline: bool,
}

/// Per-kind counts and the latency of successful connects.
struct Tally {
    outcomes: BTreeMap<String, u64>,
    /// Latency of `connected` outcomes, µs.
    connected: Histogram<u64>,
    /// Latency of every outcome, µs.
    all: Histogram<u64>,
    /// Outcomes by the second (since the start) the connect started, and the slowest one.
    timeline: Vec<(BTreeMap<String, u64>, u64)>,
}

/// What the event loops of the clients saw.
#[derive(Default)]
struct EventCounts {
    incoming: AtomicU64,
    accepted: AtomicU64,
    accept_failed: AtomicU64,
    migrated: AtomicU64,
    resumed: AtomicU64,
    rehomed: AtomicU64,
    reregistered: AtomicU64,
    signals: AtomicU64,
}

/// The outcome of a connect as one word, for counts by kind.
pub(crate) fn kind(r: &Result<ConnectOutcome, ClientError>) -> String {
    match r {
        Ok(ConnectOutcome::Connected { .. }) => "connected".into(),
        Ok(ConnectOutcome::Failed { reason, .. }) => reason.name().into(),
        Err(ClientError::Timeout) => "no-answer".into(),
        Err(ClientError::Server(code)) => format!("error:{}", code.name()),
        Err(ClientError::Closed) => "closed".into(),
        Err(_) => "client-error".into(),
    }
}

/// Reads one client's events until it closes: accepts Incoming (target side), counts moves,
/// and publishes a new UUID after a re-registration.
fn spawn_events(
    tasks: &mut JoinSet<()>,
    client: Client,
    mut events: Events,
    accept: bool,
    uuid_slot: Option<Arc<Mutex<Uuid>>>,
    ev: Arc<EventCounts>,
) {
    tasks.spawn(async move {
        while let Some(e) = events.recv().await {
            match e {
                Event::Incoming { connection, .. } if accept => {
                    ev.incoming.fetch_add(1, Ordering::Relaxed);
                    let (c, ev) = (client.clone(), ev.clone());
                    // Answer off the event loop, so a slow answer never delays the next push.
                    tokio::spawn(async move {
                        match c.accept(connection, b"answer").await {
                            Ok(()) => ev.accepted.fetch_add(1, Ordering::Relaxed),
                            Err(_) => ev.accept_failed.fetch_add(1, Ordering::Relaxed),
                        };
                    });
                }
                Event::Incoming { .. } => {
                    ev.incoming.fetch_add(1, Ordering::Relaxed);
                }
                Event::Signal { .. } => {
                    ev.signals.fetch_add(1, Ordering::Relaxed);
                }
                Event::Migrated { .. } => {
                    ev.migrated.fetch_add(1, Ordering::Relaxed);
                }
                Event::Rehomed { .. } => {
                    ev.rehomed.fetch_add(1, Ordering::Relaxed);
                }
                Event::Resumed { .. } => {
                    ev.resumed.fetch_add(1, Ordering::Relaxed);
                }
                Event::Reregistered { uuid } => {
                    ev.reregistered.fetch_add(1, Ordering::Relaxed);
                    if let Some(slot) = &uuid_slot {
                        *slot.lock().unwrap_or_else(PoisonError::into_inner) = uuid;
                    }
                }
                _ => {}
            }
        }
    });
}

struct Pair {
    initiator: Client,
    /// The target's current UUID (changes only if it had to register anew).
    target: Arc<Mutex<Uuid>>,
    target_client: Client,
    inflight: Arc<AtomicUsize>,
}

async fn register(server: SocketAddr) -> Result<(Client, Events), ClientError> {
    Client::register(ClientConfig::new(server)).await
}

/// Runs the connect load and returns the JSON summary.
pub(crate) async fn run(a: Args) -> anyhow::Result<Option<Value>> {
    stats::check_targets(&a.server, a.allow_remote)?;
    let duration = stats::check_duration(a.duration)?;
    anyhow::ensure!(
        a.pairs >= 1 && a.pairs <= 50_000,
        "--pairs must be 1..=50000"
    );
    anyhow::ensure!(
        a.rate > 0.0 && a.rate <= 1_000_000.0,
        "--rate must be in (0, 1e6]"
    );
    anyhow::ensure!(
        a.inflight >= 1 && a.inflight <= 16,
        "--inflight must be 1..=16"
    );
    let n = a.server.len();
    let ev = Arc::new(EventCounts::default());
    let mut event_tasks = JoinSet::new();

    eprintln!(
        "registering {} pairs over {} server(s): {:?}",
        a.pairs, n, a.server
    );
    let reg_started = Instant::now();
    let sem = Arc::new(Semaphore::new(a.register_parallel.max(1)));
    let mut regs = JoinSet::new();
    for i in 0..a.pairs {
        let (si, st) = (a.server[i % n], a.server[(i + 1) % n]);
        let sem = sem.clone();
        regs.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let t = register(st).await;
            let init = register(si).await;
            (i, init, t)
        });
    }
    let mut pairs: Vec<Option<Pair>> = (0..a.pairs).map(|_| None).collect();
    let mut register_failed = BTreeMap::<String, u64>::new();
    while let Some(r) = regs.join_next().await {
        let (i, init, t) = r?;
        match (init, t) {
            (Ok((ic, ie)), Ok((tc, te))) => {
                let slot = Arc::new(Mutex::new(tc.uuid()));
                spawn_events(
                    &mut event_tasks,
                    tc.clone(),
                    te,
                    true,
                    Some(slot.clone()),
                    ev.clone(),
                );
                spawn_events(&mut event_tasks, ic.clone(), ie, false, None, ev.clone());
                pairs[i] = Some(Pair {
                    initiator: ic,
                    target: slot,
                    target_client: tc,
                    inflight: Arc::new(AtomicUsize::new(0)),
                });
            }
            (x, y) => {
                for e in [x.err(), y.err()].into_iter().flatten() {
                    *register_failed.entry(e.to_string()).or_default() += 1;
                }
            }
        }
    }
    let pairs: Vec<Pair> = pairs.into_iter().flatten().collect();
    let register_s = reg_started.elapsed().as_secs_f64();
    anyhow::ensure!(
        !pairs.is_empty(),
        "no pair registered: {register_failed:?} (for many clients from one IP, run the \
         router with a higher --register-rate/--register-burst)"
    );
    eprintln!(
        "{} pairs ready in {register_s:.1}s; connecting at {}/s for {:.1}s",
        pairs.len(),
        a.rate,
        duration.as_secs_f64()
    );

    let tally = Arc::new(Mutex::new(Tally {
        outcomes: BTreeMap::new(),
        connected: stats::histogram(),
        all: stats::histogram(),
        timeline: Vec::new(),
    }));
    let mut conns = JoinSet::new();
    let started = Instant::now();
    let end = started + duration;
    let (mut dispatched, mut skipped, mut cursor) = (0u64, 0u64, 0usize);
    let mut ticker = tokio::time::interval(SLICE);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = (now.saturating_duration_since(started).as_secs_f64() * a.rate) as u64;
        while dispatched < due {
            dispatched += 1;
            let p = &pairs[cursor % pairs.len()];
            cursor = cursor.wrapping_add(1);
            if p.inflight.fetch_add(1, Ordering::Relaxed) >= a.inflight {
                p.inflight.fetch_sub(1, Ordering::Relaxed);
                skipped += 1;
                continue;
            }
            let to = *p.target.lock().unwrap_or_else(PoisonError::into_inner);
            let (c, inflight, tally) = (p.initiator.clone(), p.inflight.clone(), tally.clone());
            conns.spawn(async move {
                let t0 = Instant::now();
                let second = t0.saturating_duration_since(started).as_secs() as usize;
                let r = c.connect(to, b"offer").await;
                let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                inflight.fetch_sub(1, Ordering::Relaxed);
                let k = kind(&r);
                let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
                if k == "connected" {
                    stats::record(&mut t.connected, us);
                }
                stats::record(&mut t.all, us);
                if t.timeline.len() <= second {
                    t.timeline.resize_with(second + 1, Default::default);
                }
                let slot = &mut t.timeline[second];
                *slot.0.entry(k.clone()).or_default() += 1;
                slot.1 = slot.1.max(us);
                *t.outcomes.entry(k).or_default() += 1;
            });
        }
        // Reap finished connects as we go, so the set stays small.
        while conns.try_join_next().is_some() {}
    }
    let sending_s = started.elapsed().as_secs_f64();
    let in_flight_at_end = conns.len();
    eprintln!("waiting for {in_flight_at_end} connects in flight (at most 15 s)");
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    let abandoned = conns.len();
    conns.abort_all();

    // Say goodbye so the router's session count drops at once (bounded: a dead router must not
    // hold the run open).
    let mut byes = JoinSet::new();
    for p in &pairs {
        for c in [p.initiator.clone(), p.target_client.clone()] {
            byes.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), c.bye()).await;
            });
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while byes.join_next().await.is_some() {}
    })
    .await;
    event_tasks.abort_all();

    let t = tally.lock().unwrap_or_else(PoisonError::into_inner);
    let completed: u64 = t.outcomes.values().sum();
    let connected = t.outcomes.get("connected").copied().unwrap_or(0);
    let l = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let timeline: Vec<Value> = t
        .timeline
        .iter()
        .enumerate()
        .map(|(i, (o, max_us))| json!({ "t": i, "outcomes": o, "max_ms": *max_us as f64 / 1000.0 }))
        .collect();
    let mut summary = json!({
        "mode": "connect",
        "servers": a.server.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "pairs": pairs.len(),
        "register_failed": register_failed,
        "register_s": (register_s * 1000.0).round() / 1000.0,
        "rate_requested": a.rate,
        "duration_s": (sending_s * 1000.0).round() / 1000.0,
        "dispatched": dispatched,
        "skipped_inflight_limit": skipped,
        "started": dispatched - skipped,
        "completed": completed,
        "abandoned": abandoned,
        "outcomes": t.outcomes,
        "connected_per_s": (connected as f64 / sending_s).round(),
        "connect_latency_connected": stats::summary(&t.connected, "ms"),
        "connect_latency_all": stats::summary(&t.all, "ms"),
        "events": {
            "incoming": l(&ev.incoming),
            "accepted": l(&ev.accepted),
            "accept_failed": l(&ev.accept_failed),
            "migrated": l(&ev.migrated),
            "resumed": l(&ev.resumed),
            "rehomed": l(&ev.rehomed),
            "reregistered": l(&ev.reregistered),
        },
    });
    if a.timeline {
        summary["timeline"] = Value::Array(timeline);
    }
    Ok(Some(summary))
}
