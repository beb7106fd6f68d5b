//! The post-mortem's design beside ours, with 1 and 2 reader threads and a concurrent writer.
//!
//! The post-mortem: a signaling cluster kept its node table in a `tokio::sync::RwLock<HashMap>`
//! and, on a lookup that missed (a new node during a rolling upgrade), asked for the write lock
//! to refresh the table while still holding the read guard: a deadlock. Here its refresh is
//! written the way that does not deadlock (the read guard dropped before the write), so what is
//! measured is the cost of the design, not the bug.
//!
//! Groups (every benchmark id ends in the number of reader threads; a writer thread runs
//! beside them the whole time):
//! - `node_table_hit`: look up a node by id. The writer rebuilds and installs the table 10,000
//!   times a second at most (a 100 µs pause between refreshes; far more often than the 5 s
//!   refresh, to show contention).
//!   - `postmortem_tokio_rwlock`: `read().await`, `get`.
//!   - `ours_arc_swap`: `ArcSwap::load`, `get`.
//! - `node_table_miss`: look up a node the registry does not have yet, the rolling-upgrade case:
//!   every request misses.
//!   - `postmortem_read_then_write_refresh`: `read().await`, miss, drop the guard,
//!     `write().await`, install a table rebuilt from the registry.
//!   - `ours_load_then_nudge`: `load`, miss, nudge the single refresher (`Notify`): what a
//!     request costs on our path (the refresher coalesces nudges into one Redis read).
//!   - `ours_load_then_rcu`: `load`, miss, rebuild and install with `ArcSwap::rcu`: the same
//!     work as the post-mortem's refresh, without a lock.
//! - `session_map`: a heartbeat (find the session by UUID, store its last-seen time) over
//!   100,000 sessions while the writer registers and removes sessions (a 50 µs pause between
//!   changes: some 10,000 a second).
//!   - `postmortem_tokio_rwlock_hashmap`: `read().await`, `get`, atomic store.
//!   - `std_rwlock_hashmap`: the same under `std::sync::RwLock`.
//!   - `ours_dashmap`: `DashMap::get`, atomic store.
//!
//! Times are per operation on each thread (a 2-thread figure is the wall time of one operation
//! on each of two threads); throughput is operations per second over all reader threads.
//!
//! Run: `cargo bench --bench designs` (about three minutes on 2 cores), or a filter such as
//! `cargo bench --bench designs -- node_table`.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, Throughput};
use dashmap::DashMap;
use tokio::sync::{Notify, RwLock};
use uuid::Uuid;

/// A node's record, as a table would hold it.
#[derive(Clone, Debug)]
struct Node {
    public: SocketAddr,
    internal: SocketAddr,
}

type Table = HashMap<String, Arc<Node>>;

fn addr(i: u32) -> SocketAddr {
    let [_, a, b, c] = i.to_be_bytes();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, a, b, c.max(1))), 7400)
}

/// What the registry holds: 32 nodes.
fn registry() -> Table {
    (0..32u32)
        .map(|i| {
            (
                format!("node-{i}"),
                Arc::new(Node {
                    public: addr(i + 1),
                    internal: addr(i + 1000),
                }),
            )
        })
        .collect()
}

/// A table rebuilt from the registry, as a refresh produces it.
fn rebuild(reg: &Table) -> Table {
    reg.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A reader's runtime: the post-mortem's readers were tasks on tokio.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

/// A pseudo-random sequence (xorshift), a different one per reader thread.
struct Rng(u64);

impl Rng {
    fn new(t: usize) -> Self {
        Self((t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs `reader` (which does `iters` operations) on each of `threads` threads, started
/// together, while `writer` runs in a loop on another thread; returns the readers' wall time.
fn with_writer<S: Clone + Send + Sync + 'static>(
    shared: S,
    threads: usize,
    iters: u64,
    writer: impl Fn(&S, u64) + Send + 'static,
    reader: impl Fn(&S, u64, Rng, &tokio::runtime::Runtime) + Send + Sync + Clone + 'static,
) -> Duration {
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (stop, shared) = (stop.clone(), shared.clone());
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                writer(&shared, n);
                n += 1;
            }
        })
    };
    let start = Arc::new(Barrier::new(threads + 1));
    let readers: Vec<_> = (0..threads)
        .map(|t| {
            let (shared, start, reader) = (shared.clone(), start.clone(), reader.clone());
            thread::spawn(move || {
                let rt = runtime();
                start.wait();
                reader(&shared, iters, Rng::new(t), &rt);
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    for r in readers {
        r.join().expect("reader");
    }
    let d = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    w.join().expect("writer");
    d
}

/// The writer's pause between refreshes (at most 10,000 a second).
const REFRESH_PAUSE: Duration = Duration::from_micros(100);
/// The writer's pause between session changes (some 10,000 a second, sleep overshoot included).
const CHURN_PAUSE: Duration = Duration::from_micros(50);

fn ids() -> Arc<Vec<String>> {
    Arc::new((0..32).map(|i| format!("node-{i}")).collect())
}

fn bench_node_table(c: &mut Criterion) {
    let reg = Arc::new(registry());
    let names = ids();
    let mut g = c.benchmark_group("node_table_hit");
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements(threads as u64));
        let (reg1, names1) = (reg.clone(), names.clone());
        g.bench_with_input(
            BenchmarkId::new("postmortem_tokio_rwlock", threads),
            &threads,
            |b, &threads| {
                let table = Arc::new(RwLock::new(rebuild(&reg1)));
                b.iter_custom(|iters| {
                    let (reg, names) = (reg1.clone(), names1.clone());
                    with_writer(
                        table.clone(),
                        threads,
                        iters,
                        move |t, _| {
                            let fresh = rebuild(&reg);
                            *t.blocking_write() = fresh;
                            thread::sleep(REFRESH_PAUSE);
                        },
                        move |t, iters, mut rng, rt| {
                            rt.block_on(async {
                                for _ in 0..iters {
                                    let id = &names[(rng.next() % 32) as usize];
                                    let g = t.read().await;
                                    black_box(g.get(id).map(|n| n.public));
                                }
                            });
                        },
                    )
                })
            },
        );
        let (reg2, names2) = (reg.clone(), names.clone());
        g.bench_with_input(
            BenchmarkId::new("ours_arc_swap", threads),
            &threads,
            |b, &threads| {
                let table = Arc::new(ArcSwap::from_pointee(rebuild(&reg2)));
                b.iter_custom(|iters| {
                    let (reg, names) = (reg2.clone(), names2.clone());
                    with_writer(
                        table.clone(),
                        threads,
                        iters,
                        move |t, _| {
                            t.store(Arc::new(rebuild(&reg)));
                            thread::sleep(REFRESH_PAUSE);
                        },
                        move |t, iters, mut rng, _| {
                            for _ in 0..iters {
                                let id = &names[(rng.next() % 32) as usize];
                                black_box(t.load().get(id).map(|n| n.public));
                            }
                        },
                    )
                })
            },
        );
    }
    g.finish();

    let mut g = c.benchmark_group("node_table_miss");
    let missing = "node-new".to_string();
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements(threads as u64));
        let (reg1, miss1) = (reg.clone(), missing.clone());
        g.bench_with_input(
            BenchmarkId::new("postmortem_read_then_write_refresh", threads),
            &threads,
            |b, &threads| {
                let table = Arc::new(RwLock::new(rebuild(&reg1)));
                b.iter_custom(|iters| {
                    let (regw, reg, miss) = (reg1.clone(), reg1.clone(), miss1.clone());
                    with_writer(
                        table.clone(),
                        threads,
                        iters,
                        move |t, _| {
                            let fresh = rebuild(&regw);
                            *t.blocking_write() = fresh;
                            thread::sleep(REFRESH_PAUSE);
                        },
                        move |t, iters, _, rt| {
                            rt.block_on(async {
                                for _ in 0..iters {
                                    let found = {
                                        let g = t.read().await;
                                        g.get(&miss).map(|n| n.internal)
                                        // The read guard is dropped here; the post-mortem's
                                        // code still held it when it asked for the write lock.
                                    };
                                    if found.is_none() {
                                        let fresh = rebuild(&reg);
                                        let mut w = t.write().await;
                                        *w = fresh;
                                        black_box(w.get(&miss).map(|n| n.internal));
                                    }
                                }
                            });
                        },
                    )
                })
            },
        );
        let (reg2, miss2) = (reg.clone(), missing.clone());
        g.bench_with_input(
            BenchmarkId::new("ours_load_then_nudge", threads),
            &threads,
            |b, &threads| {
                let table = Arc::new((ArcSwap::from_pointee(rebuild(&reg2)), Notify::new()));
                b.iter_custom(|iters| {
                    let (regw, miss) = (reg2.clone(), miss2.clone());
                    with_writer(
                        table.clone(),
                        threads,
                        iters,
                        move |t, _| {
                            t.0.store(Arc::new(rebuild(&regw)));
                            thread::sleep(REFRESH_PAUSE);
                        },
                        move |t, iters, _, _| {
                            for _ in 0..iters {
                                if t.0.load().get(&miss).is_none() {
                                    // The refresher coalesces nudges; the request defers.
                                    t.1.notify_one();
                                }
                            }
                        },
                    )
                })
            },
        );
        let (reg3, miss3) = (reg.clone(), missing.clone());
        g.bench_with_input(
            BenchmarkId::new("ours_load_then_rcu", threads),
            &threads,
            |b, &threads| {
                let table = Arc::new(ArcSwap::from_pointee(rebuild(&reg3)));
                b.iter_custom(|iters| {
                    let (regw, reg, miss) = (reg3.clone(), reg3.clone(), miss3.clone());
                    with_writer(
                        table.clone(),
                        threads,
                        iters,
                        move |t, _| {
                            t.store(Arc::new(rebuild(&regw)));
                            thread::sleep(REFRESH_PAUSE);
                        },
                        move |t, iters, _, _| {
                            for _ in 0..iters {
                                if t.load().get(&miss).is_none() {
                                    t.rcu(|_| rebuild(&reg));
                                }
                            }
                        },
                    )
                })
            },
        );
    }
    g.finish();
}

/// A session as a map would hold it; the heartbeat stores `last_seen`.
struct Session {
    last_seen: AtomicU64,
    addr: SocketAddr,
    secret: [u8; 32],
}

fn session(i: u64) -> Arc<Session> {
    Arc::new(Session {
        last_seen: AtomicU64::new(i),
        addr: addr(i as u32),
        secret: [i as u8; 32],
    })
}

const SESSIONS: usize = 100_000;

fn bench_session_map(c: &mut Criterion) {
    let keys: Arc<Vec<Uuid>> = Arc::new((0..SESSIONS).map(|_| Uuid::new_v4()).collect());
    let mut g = c.benchmark_group("session_map");
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements(threads as u64));

        let k1 = keys.clone();
        g.bench_with_input(
            BenchmarkId::new("postmortem_tokio_rwlock_hashmap", threads),
            &threads,
            |b, &threads| {
                let map: HashMap<Uuid, Arc<Session>> = k1
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (*k, session(i as u64)))
                    .collect();
                let map = Arc::new(RwLock::new(map));
                b.iter_custom(|iters| {
                    let keys = k1.clone();
                    with_writer(
                        map.clone(),
                        threads,
                        iters,
                        |m, n| {
                            // Churn: one session registers, an earlier one leaves.
                            let k = Uuid::from_u64_pair(u64::MAX, n);
                            m.blocking_write().insert(k, session(n));
                            if n >= 64 {
                                m.blocking_write()
                                    .remove(&Uuid::from_u64_pair(u64::MAX, n - 64));
                            }
                            thread::sleep(CHURN_PAUSE);
                        },
                        move |m, iters, mut rng, rt| {
                            rt.block_on(async {
                                for _ in 0..iters {
                                    let x = rng.next();
                                    let k = &keys[(x % SESSIONS as u64) as usize];
                                    let g = m.read().await;
                                    if let Some(s) = g.get(k) {
                                        s.last_seen.store(x, Ordering::Relaxed);
                                        black_box((s.addr, s.secret[0]));
                                    }
                                }
                            });
                        },
                    )
                })
            },
        );

        let k2 = keys.clone();
        g.bench_with_input(
            BenchmarkId::new("std_rwlock_hashmap", threads),
            &threads,
            |b, &threads| {
                let map: HashMap<Uuid, Arc<Session>> = k2
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (*k, session(i as u64)))
                    .collect();
                let map = Arc::new(std::sync::RwLock::new(map));
                b.iter_custom(|iters| {
                    let keys = k2.clone();
                    with_writer(
                        map.clone(),
                        threads,
                        iters,
                        |m, n| {
                            let k = Uuid::from_u64_pair(u64::MAX, n);
                            if let Ok(mut w) = m.write() {
                                w.insert(k, session(n));
                                if n >= 64 {
                                    w.remove(&Uuid::from_u64_pair(u64::MAX, n - 64));
                                }
                            }
                            thread::sleep(CHURN_PAUSE);
                        },
                        move |m, iters, mut rng, _| {
                            for _ in 0..iters {
                                let x = rng.next();
                                let k = &keys[(x % SESSIONS as u64) as usize];
                                if let Ok(g) = m.read() {
                                    if let Some(s) = g.get(k) {
                                        s.last_seen.store(x, Ordering::Relaxed);
                                        black_box((s.addr, s.secret[0]));
                                    }
                                }
                            }
                        },
                    )
                })
            },
        );

        let k3 = keys.clone();
        g.bench_with_input(
            BenchmarkId::new("ours_dashmap", threads),
            &threads,
            |b, &threads| {
                let map: DashMap<Uuid, Arc<Session>> = k3
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (*k, session(i as u64)))
                    .collect();
                let map = Arc::new(map);
                b.iter_custom(|iters| {
                    let keys = k3.clone();
                    with_writer(
                        map.clone(),
                        threads,
                        iters,
                        |m, n| {
                            m.insert(Uuid::from_u64_pair(u64::MAX, n), session(n));
                            if n >= 64 {
                                m.remove(&Uuid::from_u64_pair(u64::MAX, n - 64));
                            }
                            thread::sleep(CHURN_PAUSE);
                        },
                        move |m, iters, mut rng, _| {
                            for _ in 0..iters {
                                let x = rng.next();
                                let k = &keys[(x % SESSIONS as u64) as usize];
                                if let Some(s) = m.get(k) {
                                    s.last_seen.store(x, Ordering::Relaxed);
                                    black_box((s.addr, s.secret[0]));
                                }
                            }
                        },
                    )
                })
            },
        );
    }
    g.finish();
}

/// What `criterion_group!`/`criterion_main!` expand to, written out so every item is
/// documented: modest sampling, since the benchmark machine has two cores.
fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_node_table(&mut c);
    bench_session_map(&mut c);
    c.final_summary();
}
