//! The heartbeat path allocates nothing: a socket loop that keeps one `Outbox`, hands a batch
//! of heartbeats to the router, sends the answers (drops them) and reclaims the outbox's arena
//! makes no heap allocation per datagram in the steady state.
//!
//! Counted with a global allocator that counts calls made on the test's own thread (other
//! threads of the test harness are not counted).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use sigrouter::metrics::Metrics;
use sigrouter::proto::{self, Message};
use sigrouter::router::{Outbox, Router, Transmit};
use sigrouter::Config;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator may run while the thread's locals are being torn down.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note();
        // SAFETY: forwarded as is.
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    ALLOCS.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    ALLOCS.with(Cell::get)
}

fn router() -> Router {
    let cfg = Config {
        register_rate: 1_000_000,
        register_burst: 1_000_000,
        session_rate: 1_000_000_000,
        session_burst: 1_000_000_000,
        ..Config::default()
    };
    Router::new(&cfg, Metrics::new(), None)
}

#[test]
fn heartbeats_allocate_nothing_per_datagram() {
    let r = router();
    let mut out = Outbox::default();
    // Sessions from a few sources, as a socket loop sees them.
    let mut sessions = Vec::new();
    for i in 0..64u16 {
        let src = SocketAddr::from((Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8), 40_000 + i));
        let mut m = Message::Register(proto::Register {
            rid: 1,
            local: vec![],
            pad: vec![],
        });
        let b = proto::encode_hello(&mut m).expect("encode Register");
        r.handle(Instant::now(), src, &b, &mut out);
        let Ok(Message::Registered(reg)) = proto::decode(&out.client[0].bytes) else {
            panic!("expected Registered");
        };
        out.client.clear();
        sessions.push((src, reg.uuid, reg.secret));
    }
    // Every heartbeat of the run, encoded up front (the client's work, not the router's).
    let rounds = 200u64;
    let mut datagrams = Vec::new();
    for rid in 2..2 + rounds {
        for (src, uuid, secret) in &sessions {
            let hb = Message::Heartbeat(proto::Heartbeat { rid, uuid: *uuid });
            datagrams.push((*src, proto::encode(&hb, Some(secret)).expect("encode")));
        }
    }
    // What a socket loop keeps between turns: the outbox and the queue of what to send.
    let mut pending: Vec<Transmit> = Vec::with_capacity(256);
    let mut turn = |batch: &[(SocketAddr, Vec<u8>)], out: &mut Outbox| {
        let now = Instant::now();
        for (src, b) in batch {
            r.handle(now, *src, b, out);
        }
        pending.append(&mut out.client);
        assert_eq!(pending.len(), batch.len(), "one answer per heartbeat");
        pending.clear(); // sent
        out.reclaim();
    };
    let (warm, measured) = datagrams.split_at(32 * 8);
    for batch in warm.chunks(32) {
        turn(batch, &mut out);
    }
    let n = allocations(|| {
        for batch in measured.chunks(32) {
            turn(batch, &mut out);
        }
    });
    assert_eq!(
        n,
        0,
        "{n} allocations for {} heartbeats answered",
        measured.len()
    );
    // And the answers are what a client expects.
    let (src, uuid, secret) = sessions[0];
    let hb = Message::Heartbeat(proto::Heartbeat { rid: 10_000, uuid });
    r.handle(
        Instant::now(),
        src,
        &proto::encode(&hb, Some(&secret)).unwrap(),
        &mut out,
    );
    assert!(proto::verify_mac(&out.client[0].bytes, &secret));
    assert!(matches!(
        proto::decode(&out.client[0].bytes),
        Ok(Message::HeartbeatAck(a)) if a.rid == 10_000
    ));
}
