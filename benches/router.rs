//! Sans-IO benchmarks of the router: no sockets, only the work done per datagram.
//!
//! Groups:
//! - `codec`: decode and MAC check of a Heartbeat (what every authenticated request costs
//!   before the router looks at state).
//! - `router`: [`Router::handle`] on a Heartbeat and a Query from registered sessions, a full
//!   Connect → Incoming → PushAck → Accept → Connected exchange, and [`Router::tick`] with
//!   nothing due (the fixed cost the timer task pays every 25 ms).
//! - `validation`: address validation (`--address-validation`). `register/never`: a Register
//!   that creates a session at once; `register/always`: the validated registration, a
//!   Register answered with Retry then the Register with its token that creates the session
//!   (two datagrams); `retry`: a tokenless Register answered with Retry, what each datagram of
//!   a forged-source flood costs a validating node; `token_issue_and_check`: the token alone.
//! - `snapshot_read`: the baseline for the cluster node table: `arc_swap::ArcSwap::load`
//!   against `tokio::sync::RwLock::read` (and std's), alone and with a second thread reading
//!   the same value. arc-swap is often said to be orders of magnitude faster; this measures it.
//!
//! Run: `cargo bench --bench router` (about two minutes on 2 cores), or a filter such as
//! `cargo bench --bench router -- snapshot_read`. Sessions register from distinct source
//! addresses (10.x.y.z, never sent to: there are no sockets) with the rate limits raised.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Cache};
use criterion::{BenchmarkId, Criterion, Throughput};
use sigrouter::metrics::Metrics;
use sigrouter::proto::{self, Message, Payload, Secret};
use sigrouter::router::token::Tokens;
use sigrouter::router::{Outbox, Router};
use sigrouter::{AddressValidation, Config};
use uuid::Uuid;

/// A session registered through the router, as a client would hold it.
#[derive(Clone, Copy)]
struct Sess {
    uuid: Uuid,
    secret: Secret,
    addr: SocketAddr,
}

/// Distinct source addresses: 10.a.b.c:40000 (sans-IO, never contacted).
fn src(i: u32) -> SocketAddr {
    let [_, a, b, c] = i.to_be_bytes();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, a, b, c.max(1))), 40000)
}

fn router() -> Router {
    router_with(AddressValidation::Pressure)
}

fn router_with(address_validation: AddressValidation) -> Router {
    let cfg = Config {
        address_validation,
        register_rate: 1_000_000,
        register_burst: 1_000_000,
        session_rate: 1_000_000_000,
        session_burst: 1_000_000_000,
        new_session_rate: 1_000_000_000,
        new_session_burst: 1_000_000_000,
        ..Config::default()
    };
    Router::new(&cfg, Metrics::new(), None)
}

fn register_datagram(rid: u64, token: Vec<u8>) -> Vec<u8> {
    let mut m = Message::Register(proto::Register {
        rid,
        local: vec![],
        token,
        pad: vec![],
    });
    proto::encode_hello(&mut m).expect("encode Register")
}

fn register(r: &Router, addr: SocketAddr) -> Sess {
    let b = register_datagram(1, Vec::new());
    let mut out = Outbox::default();
    r.handle(Instant::now(), addr, &b, &mut out);
    match out.client.first().map(|t| proto::decode(&t.bytes)) {
        Some(Ok(Message::Registered(reg))) => Sess {
            uuid: reg.uuid,
            secret: reg.secret,
            addr,
        },
        other => panic!("expected Registered, got {other:?}"),
    }
}

fn register_many(r: &Router, n: u32) -> Vec<Sess> {
    (0..n).map(|i| register(r, src(i + 1))).collect()
}

fn enc(m: &Message, s: &Sess) -> Vec<u8> {
    proto::encode(m, Some(&s.secret)).expect("encode")
}

fn heartbeat(s: &Sess, rid: u64) -> Vec<u8> {
    enc(
        &Message::Heartbeat(proto::Heartbeat { rid, uuid: s.uuid }),
        s,
    )
}

/// Pre-encoded datagrams, cycled through: `(source, bytes)`.
struct Ring {
    items: Vec<(SocketAddr, Vec<u8>)>,
    at: usize,
}

impl Ring {
    fn next(&mut self) -> &(SocketAddr, Vec<u8>) {
        self.at = (self.at + 1) % self.items.len();
        &self.items[self.at]
    }
}

/// Round-robin over every session, with increasing request ids (about 16k datagrams, at least 2
/// ids per session; a wrap goes back a few ids: well inside the replay window, so every datagram
/// is answered).
fn ring(sessions: &[Sess], mut make: impl FnMut(&Sess, u64) -> Vec<u8>) -> Ring {
    let per = (16_384 / sessions.len().max(1)).clamp(2, 16) as u64;
    let mut items = Vec::with_capacity(sessions.len() * per as usize);
    for rid in 2..2 + per {
        for s in sessions {
            items.push((s.addr, make(s, rid)));
        }
    }
    Ring { items, at: 0 }
}

fn bench_codec(c: &mut Criterion) {
    let s = Sess {
        uuid: Uuid::new_v4(),
        secret: Secret([7; 32]),
        addr: src(1),
    };
    let b = heartbeat(&s, 12345);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("heartbeat_decode", |bch| {
        bch.iter(|| proto::decode(black_box(&b)).expect("decodes"))
    });
    g.bench_function("heartbeat_verify_mac", |bch| {
        bch.iter(|| assert!(proto::verify_mac(black_box(&b), &s.secret)))
    });
    g.bench_function("heartbeat_decode_and_verify_mac", |bch| {
        bch.iter(|| {
            let m = proto::decode(black_box(&b)).expect("decodes");
            assert!(proto::verify_mac(&b, &s.secret));
            m
        })
    });
    g.bench_function("heartbeat_encode_with_mac", |bch| {
        let m = Message::Heartbeat(proto::Heartbeat {
            rid: 12345,
            uuid: s.uuid,
        });
        bch.iter(|| proto::encode(black_box(&m), Some(&s.secret)).expect("encodes"))
    });
    g.finish();
}

fn bench_handle(c: &mut Criterion) {
    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Elements(1));
    for n in [1_000u32, 100_000] {
        let r = router();
        let sessions = register_many(&r, n);
        let mut hb = ring(&sessions, heartbeat);
        let mut out = Outbox::default();
        g.bench_with_input(BenchmarkId::new("handle_heartbeat", n), &n, |bch, _| {
            bch.iter(|| {
                out.client.clear();
                let (from, bytes) = hb.next();
                r.handle(Instant::now(), *from, bytes, &mut out);
                debug_assert_eq!(out.client.len(), 1);
            })
        });
    }

    let r = router();
    let sessions = register_many(&r, 1_000);
    // 8 UUIDs: 4 online, 4 unknown.
    let asked: Vec<Uuid> = sessions[..4]
        .iter()
        .map(|s| s.uuid)
        .chain((0..4).map(|_| Uuid::new_v4()))
        .collect();
    let mut q = ring(&sessions, |s, rid| {
        enc(
            &Message::Query(proto::Query {
                rid,
                uuid: s.uuid,
                uuids: asked.clone(),
            }),
            s,
        )
    });
    let mut out = Outbox::default();
    g.bench_function("handle_query_8", |bch| {
        bch.iter(|| {
            out.client.clear();
            let (from, bytes) = q.next();
            r.handle(Instant::now(), *from, bytes, &mut out);
            debug_assert_eq!(out.client.len(), 1);
        })
    });

    // Connect → Incoming → PushAck → Accept → Ack + Connected. A fresh router per sample
    // (built outside the timed loop), since established connections stay in the table.
    g.bench_function("connect_accept_exchange", |bch| {
        bch.iter_custom(|iters| {
            let r = router();
            let (a, t) = (register(&r, src(1)), register(&r, src(2)));
            let mut out = Outbox::default();
            let start = Instant::now();
            for i in 0..iters {
                exchange(&r, &a, &t, i + 2, &mut out);
            }
            start.elapsed()
        })
    });
    // The client-side share of the exchange above (3 encodes with MAC, 1 decode), to subtract.
    g.bench_function("connect_accept_client_codec_only", |bch| {
        let (a, t) = (
            Sess {
                uuid: Uuid::new_v4(),
                secret: Secret([1; 32]),
                addr: src(1),
            },
            Sess {
                uuid: Uuid::new_v4(),
                secret: Secret([2; 32]),
                addr: src(2),
            },
        );
        let incoming = enc(
            &Message::Incoming(proto::Incoming {
                push: 1,
                connection: Uuid::new_v4(),
                from: a.uuid,
                observed: proto::Addr(a.addr),
                local: vec![],
                payload: Payload::from(b"offer".to_vec()),
            }),
            &t,
        );
        let mut rid = 1;
        bch.iter(|| {
            rid += 1;
            let c = connect_msg(&a, &t, rid);
            let Ok(Message::Incoming(inc)) = proto::decode(&incoming) else {
                unreachable!()
            };
            let ack = push_ack(&t, inc.push);
            let acc = accept_msg(&t, inc.connection, rid);
            (c, ack, acc)
        })
    });

    for n in [0u64, 10_000, 100_000] {
        let r = router();
        let (a, t) = (register(&r, src(1)), register(&r, src(2)));
        let mut out = Outbox::default();
        for i in 0..n {
            exchange(&r, &a, &t, i + 2, &mut out);
        }
        let mut tick_out = Outbox::default();
        g.bench_with_input(
            BenchmarkId::new("tick_idle_established_conns", n),
            &n,
            |bch, _| {
                bch.iter(|| {
                    tick_out.client.clear();
                    r.tick(Instant::now(), &mut tick_out);
                })
            },
        );
    }
    g.finish();
}

fn connect_msg(a: &Sess, t: &Sess, rid: u64) -> Vec<u8> {
    enc(
        &Message::Connect(proto::Connect {
            rid,
            uuid: a.uuid,
            to: t.uuid,
            payload: Payload::from(b"offer".to_vec()),
        }),
        a,
    )
}

fn push_ack(t: &Sess, push: u64) -> Vec<u8> {
    enc(&Message::PushAck(proto::PushAck { uuid: t.uuid, push }), t)
}

fn accept_msg(t: &Sess, connection: Uuid, rid: u64) -> Vec<u8> {
    enc(
        &Message::Accept(proto::Answer {
            rid,
            uuid: t.uuid,
            connection,
            payload: Payload::from(b"answer".to_vec()),
        }),
        t,
    )
}

/// One full connect exchange between `a` (initiator) and `t` (target), both with request id
/// `rid` for their requests.
fn exchange(r: &Router, a: &Sess, t: &Sess, rid: u64, out: &mut Outbox) {
    out.client.clear();
    r.handle(Instant::now(), a.addr, &connect_msg(a, t, rid), out);
    let inc = match out.client.first().map(|x| proto::decode(&x.bytes)) {
        Some(Ok(Message::Incoming(inc))) => inc,
        other => panic!("expected Incoming, got {other:?}"),
    };
    out.client.clear();
    r.handle(Instant::now(), t.addr, &push_ack(t, inc.push), out);
    r.handle(
        Instant::now(),
        t.addr,
        &accept_msg(t, inc.connection, rid),
        out,
    );
    assert_eq!(
        out.client.len(),
        2,
        "Ack to the target and Connected to the initiator"
    );
}

/// What a cluster node table might hold: a few dozen nodes by id.
fn node_table() -> HashMap<String, SocketAddr> {
    (0..32).map(|i| (format!("node-{i}"), src(i + 1))).collect()
}

/// Runs `body` while another thread reads the same value as fast as it can (`other`), so the
/// two cores share the cache line as two socket loops would.
fn contended<T: Clone + Send + 'static>(
    shared: T,
    other: impl Fn(&T) + Send + 'static,
    body: impl FnOnce(&T) -> Duration,
) -> Duration {
    let stop = Arc::new(AtomicBool::new(false));
    let h = {
        let stop = stop.clone();
        let shared = shared.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    other(&shared);
                }
            }
        })
    };
    let d = body(&shared);
    stop.store(true, Ordering::Relaxed);
    h.join().expect("reader thread");
    d
}

fn bench_snapshot_read(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot_read");
    g.throughput(Throughput::Elements(1));
    let swap = Arc::new(ArcSwap::from_pointee(node_table()));
    let tlock = Arc::new(tokio::sync::RwLock::new(node_table()));
    let slock = Arc::new(std::sync::RwLock::new(node_table()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");

    g.bench_function("arc_swap_load", |b| b.iter(|| black_box(swap.load().len())));
    g.bench_function("arc_swap_cache_load", |b| {
        let mut cache = Cache::new(swap.clone());
        b.iter(|| black_box(cache.load().len()))
    });
    g.bench_function("arc_swap_load_full", |b| {
        b.iter(|| black_box(swap.load_full().len()))
    });
    g.bench_function("tokio_rwlock_read_await", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(tlock.read().await.len());
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("tokio_rwlock_try_read", |b| {
        b.iter(|| black_box(tlock.try_read().map(|g| g.len()).unwrap_or(0)))
    });
    g.bench_function("std_rwlock_read", |b| {
        b.iter(|| black_box(slock.read().map(|g| g.len()).unwrap_or(0)))
    });

    g.bench_function("contended/arc_swap_load", |b| {
        b.iter_custom(|iters| {
            contended(
                swap.clone(),
                |s| {
                    black_box(s.load().len());
                },
                |s| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(s.load().len());
                    }
                    start.elapsed()
                },
            )
        })
    });
    g.bench_function("contended/tokio_rwlock_read_await", |b| {
        b.iter_custom(|iters| {
            let other_rt = |l: &Arc<tokio::sync::RwLock<HashMap<String, SocketAddr>>>| {
                // The other reader takes the lock the same way, without a runtime of its own:
                // try_read is the same semaphore acquire as read().await's fast path.
                black_box(l.try_read().map(|g| g.len()).unwrap_or(0));
            };
            contended(tlock.clone(), other_rt, |l| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(l.read().await.len());
                    }
                    start.elapsed()
                })
            })
        })
    });
    g.bench_function("contended/std_rwlock_read", |b| {
        b.iter_custom(|iters| {
            contended(
                slock.clone(),
                |l| {
                    black_box(l.read().map(|g| g.len()).unwrap_or(0));
                },
                |l| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(l.read().map(|g| g.len()).unwrap_or(0));
                    }
                    start.elapsed()
                },
            )
        })
    });
    g.finish();
}

/// `iters` registrations from distinct sources into fresh routers (a new one every 20,000,
/// built outside the timed part, so the session map stays small as in the other benchmarks).
/// Only the router's work is timed: `Router::handle` on each Register, and with `always`
/// (the validated registration) on the Register with its token; decoding the Retry and
/// encoding that second Register, client work, are not. With `retry_only`, only the first
/// Register (answered with Retry) is sent.
fn registrations(iters: u64, mode: AddressValidation, retry_only: bool) -> Duration {
    const PER_ROUTER: u64 = 20_000;
    let plain = register_datagram(1, Vec::new());
    let keep = mode == AddressValidation::Always && !retry_only;
    let mut out = Outbox::default();
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let r = router_with(mode);
        let n = (iters - done).min(PER_ROUTER);
        // Distinct sources (10.0.0.1 upwards), so no Register is a retransmission of another.
        let srcs: Vec<SocketAddr> = (0..n)
            .map(|i| SocketAddr::new(Ipv4Addr::from(0x0a00_0001 + i as u32).into(), 40000))
            .collect();
        // The Retry answers, kept (moved out of the outbox, not copied) for the second step.
        let mut answers = Vec::with_capacity(if keep { n as usize } else { 0 });
        let start = Instant::now();
        for a in &srcs {
            r.handle(Instant::now(), *a, &plain, &mut out);
            if keep {
                answers.append(&mut out.client);
            } else {
                out.client.clear();
                out.reclaim();
            }
        }
        total += start.elapsed();
        done += n;
        if !keep {
            continue;
        }
        let again: Vec<Vec<u8>> = answers
            .iter()
            .map(|t| match proto::decode(&t.bytes) {
                Ok(Message::Retry(t)) => register_datagram(2, t.token),
                other => panic!("expected Retry, got {other:?}"),
            })
            .collect();
        drop(answers);
        let start = Instant::now();
        for (a, b) in srcs.iter().zip(&again) {
            r.handle(Instant::now(), *a, b, &mut out);
            out.client.clear();
            out.reclaim();
        }
        total += start.elapsed();
        assert_eq!(
            r.session_count(),
            n as usize,
            "every validated Register took"
        );
    }
    total
}

fn bench_validation(c: &mut Criterion) {
    let mut g = c.benchmark_group("validation");
    g.bench_function("register/never", |b| {
        b.iter_custom(|iters| registrations(iters, AddressValidation::Never, false))
    });
    g.bench_function("register/always", |b| {
        b.iter_custom(|iters| registrations(iters, AddressValidation::Always, false))
    });
    g.bench_function("retry", |b| {
        b.iter_custom(|iters| registrations(iters, AddressValidation::Always, true))
    });
    let tokens = Tokens::new();
    let a = src(7);
    g.bench_function("token_issue_and_check", |b| {
        let mut ns = 1_000_000_000u64;
        b.iter(|| {
            ns += 1;
            let t = tokens.issue(a, ns);
            black_box(tokens.check(black_box(&t), a, ns))
        })
    });
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
    bench_codec(&mut c);
    bench_handle(&mut c);
    bench_validation(&mut c);
    bench_snapshot_read(&mut c);
    c.final_summary();
}
