//! Leaving a draining router: a request refused with `Draining` moves the session to the
//! address named (then the configured servers, then addresses routers named before) and never
//! asks the draining router again; a `Migrate` without an address avoids it; when every
//! address refuses, the client reports it and keeps trying in order.

use std::net::SocketAddr;
use std::time::Duration;

use sigrouter_client::{Client, ClientConfig, ErrorCode, Event, Secret};
use sigrouter_proto::{Addr, ErrorMsg, Message, Migrate, Registered};
use tokio::time::{timeout, Instant};
use uuid::Uuid;

use crate::router::{next_event, register, Router, WAIT};

fn draining(rid: u64, to: Option<SocketAddr>) -> Message {
    Message::Error(ErrorMsg {
        rid,
        code: ErrorCode::Draining,
        to: to.map(Addr),
    })
}

/// One datagram a scripted router received: which router (index), what, from where.
#[derive(Debug, Clone)]
struct Seen {
    router: usize,
    msg: Message,
    from: SocketAddr,
}

/// Routers answering on their own tasks: `answer(router, message)` says what router `router`
/// sends back (`None`: silence); PushAcks are only logged. Every datagram is logged.
struct Cluster {
    routers: Vec<std::sync::Arc<Router>>,
    log: tokio::sync::mpsc::UnboundedReceiver<Seen>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    async fn new(n: usize, uuid: Uuid, secret: Secret) -> Self {
        let mut routers = Vec::new();
        for _ in 0..n {
            routers.push(std::sync::Arc::new(Router::new(uuid, secret).await));
        }
        let (_, log) = tokio::sync::mpsc::unbounded_channel();
        Self {
            routers,
            log,
            tasks: Vec::new(),
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.routers[i].addr()
    }

    /// Starts answering with `answer` (shared by every router).
    fn serve(
        &mut self,
        answer: impl FnMut(usize, &Message, SocketAddr) -> Option<Message> + Send + 'static,
    ) {
        let answer = std::sync::Arc::new(std::sync::Mutex::new(answer));
        let (tx, log) = tokio::sync::mpsc::unbounded_channel();
        self.log = log;
        for (i, r) in self.routers.iter().enumerate() {
            let (r, tx, answer) = (r.clone(), tx.clone(), answer.clone());
            self.tasks.push(tokio::spawn(async move {
                let far = Instant::now() + Duration::from_secs(3600);
                while let Some((msg, _, from)) = r.recv_until(far).await {
                    let reply = (answer.lock().unwrap())(i, &msg, from);
                    let _ = tx.send(Seen {
                        router: i,
                        msg,
                        from,
                    });
                    if let Some(m) = reply {
                        r.send(&m, from).await;
                    }
                }
            }));
        }
    }

    /// Everything logged until `pred` holds for one datagram (returned last), within `WAIT`.
    async fn until(&mut self, mut pred: impl FnMut(&Seen) -> bool) -> Vec<Seen> {
        let mut got = Vec::new();
        loop {
            let s = timeout(WAIT, self.log.recv())
                .await
                .unwrap_or_else(|_| panic!("no datagram matched; saw {got:#?}"))
                .expect("routers running");
            let done = pred(&s);
            got.push(s);
            if done {
                return got;
            }
        }
    }

    /// Everything logged within `d`.
    async fn during(&mut self, d: Duration) -> Vec<Seen> {
        let end = Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(Some(s)) = tokio::time::timeout_at(end, self.log.recv()).await {
            got.push(s);
        }
        got
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The Registers and Resumes in `log`, in order, retransmissions (same router, same rid)
/// left out.
fn hellos(log: &[Seen]) -> Vec<(usize, &'static str)> {
    let mut seen = std::collections::HashSet::new();
    log.iter()
        .filter_map(|s| match s.msg {
            Message::Register(_) => Some((s.router, "register", s.msg.rid())),
            Message::Resume(_) => Some((s.router, "resume", s.msg.rid())),
            _ => None,
        })
        .filter(|h| seen.insert(*h))
        .map(|(r, k, _)| (r, k))
        .collect()
}

#[tokio::test]
async fn a_draining_router_is_left_for_the_node_it_names_and_not_asked_again() {
    let (uuid, secret) = (Uuid::new_v4(), Secret([20; 32]));
    let mut c = Cluster::new(3, uuid, secret).await;
    let (a0, a2) = (c.addr(0), c.addr(2));
    // Router 0 drains and names router 2; router 2 registers.
    let named = a2;
    let regs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let regs2 = regs.clone();
    c.serve(move |i, m, from| {
        let rid = m.rid()?;
        regs2.lock().unwrap().push((i, from));
        Some(match i {
            0 => draining(rid, Some(named)),
            _ => Message::Registered(Registered {
                rid,
                uuid,
                secret,
                observed: Addr(from),
                heartbeat_ms: 60_000,
                ttl_ms: 180_000,
            }),
        })
    });
    let mut cfg = ClientConfig::new(a0);
    cfg.fallback_servers = vec![c.addr(1), a2];
    let (client, _events) = Client::register(cfg).await.expect("registered");
    assert_eq!(client.server(), a2, "went where the draining router said");
    // Nothing more reaches router 0 (nor anyone: the session is registered).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let regs = regs.lock().unwrap().clone();
    assert_eq!(
        regs.iter().map(|r| r.0).collect::<Vec<_>>(),
        [0, 2],
        "one Register at the draining router, then the named one (not the next configured)"
    );
    assert_ne!(
        regs[0].1, regs[1].1,
        "the second try comes from a new local port"
    );
    assert_eq!(client.local_addr(), regs[1].1);
}

#[tokio::test]
async fn migrate_without_an_address_does_not_resume_at_the_draining_node() {
    let (uuid, secret) = (Uuid::new_v4(), Secret([21; 32]));
    let r0 = Router::new(uuid, secret).await;
    let r1 = Router::new(uuid, secret).await;
    let mut cfg = ClientConfig::new(r0.addr());
    cfg.fallback_servers = vec![r0.addr(), r1.addr()];
    let (client, mut events, at) = register(&r0, cfg).await;
    // Router 0 drains without knowing another node: Migrate{to: nil}. The client knows
    // router 1, so it resumes there; router 0 gets the PushAck and nothing else.
    r0.send(&Message::Migrate(Migrate { push: 1, to: None }), at)
        .await;
    r0.expect_ack(1).await;
    let (m, _, from) = r1.recv().await;
    let Message::Resume(res) = m else {
        panic!("expected Resume at router 1, got {m:?}")
    };
    assert_eq!(res.uuid, uuid);
    r1.send(&r1.registered(res.rid, from), from).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Migrated { to: r1.addr() }
    );
    assert_eq!(client.server(), r1.addr());
    assert!(
        r0.recv_until(Instant::now() + Duration::from_millis(300))
            .await
            .is_none(),
        "the draining node was asked again"
    );

    // With nothing but the draining node configured, Migrate{to: nil} still resumes there
    // (it may be a load balancer, which picks another node for the new port).
    let r = Router::new(uuid, secret).await;
    let (_client, mut events, at) = register(&r, ClientConfig::new(r.addr())).await;
    r.send(&Message::Migrate(Migrate { push: 1, to: None }), at)
        .await;
    r.expect_ack(1).await;
    let (m, _, from) = r.recv().await;
    assert!(matches!(m, Message::Resume(_)), "{m:?}");
    assert_ne!(from, at, "from a new local port");
    r.send(&r.registered(m.rid().unwrap(), from), from).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Migrated { to: r.addr() }
    );
}

#[tokio::test]
async fn when_every_address_refuses_the_client_reports_it_and_keeps_trying_in_order() {
    let (uuid, secret) = (Uuid::new_v4(), Secret([22; 32]));
    // 0: configured; 1: a fallback; 2: where the client is now (told by a Migrate); 3: the
    // node the next Migrate names.
    let mut c = Cluster::new(4, uuid, secret).await;
    let mut cfg = ClientConfig::new(c.addr(0));
    cfg.fallback_servers = vec![c.addr(1)];
    cfg.request_timeout = Duration::from_millis(600);
    cfg.initial_rto = Duration::from_millis(100);
    let r2 = c.routers[2].clone();
    let r3 = c.addr(3);
    // Register at 0, then get moved to 2 (which the client now knows as a told address).
    let (client, mut events, at) = {
        let r0 = c.routers[0].clone();
        register(&r0, cfg).await
    };
    c.routers[0]
        .send(
            &Message::Migrate(Migrate {
                push: 1,
                to: Some(Addr(r2.addr())),
            }),
            at,
        )
        .await;
    c.routers[0].expect_ack(1).await;
    let (m, _, at2) = r2.recv().await;
    r2.send(&r2.registered(m.rid().unwrap(), at2), at2).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Migrated { to: r2.addr() }
    );

    // Now everything refuses: 3 and 0 say Draining (0 names nobody), 1 is silent, 2 (the node
    // being left) says Draining naming 3, which already refused. Then, in the next round, 3
    // takes the session.
    let round = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1));
    let round2 = round.clone();
    c.serve(move |i, m, from| {
        let Message::Resume(res) = m else {
            return None;
        };
        let rid = res.rid;
        match (i, round2.load(std::sync::atomic::Ordering::SeqCst)) {
            (3, 2) => Some(Message::Registered(Registered {
                rid,
                uuid,
                secret,
                observed: Addr(from),
                heartbeat_ms: 60_000,
                ttl_ms: 180_000,
            })),
            (1, _) => None,
            (2, _) => Some(draining(rid, Some(r3))),
            _ => Some(draining(rid, None)),
        }
    });
    r2.send(
        &Message::Migrate(Migrate {
            push: 1,
            to: Some(Addr(r3)),
        }),
        at2,
    )
    .await;
    let first = c
        .until(|s| s.router == 2 && matches!(s.msg, Message::Resume(_)))
        .await;
    assert_eq!(
        hellos(&first),
        [(3, "resume"), (0, "resume"), (1, "resume"), (2, "resume")],
        "named node, configured servers, then the node being left"
    );
    // Every try from a new local port.
    let ports: std::collections::BTreeSet<u16> = first
        .iter()
        .filter(|s| matches!(s.msg, Message::Resume(_)))
        .map(|s| s.from.port())
        .collect();
    assert_eq!(ports.len(), 4, "{first:#?}");
    let stranded = match next_event(&mut events).await {
        Event::Stranded { tried, retry_in } => (tried, retry_in),
        other => panic!("expected Stranded, got {other:?}"),
    };
    assert_eq!(stranded.0, vec![r3, c.addr(0), c.addr(1), r2.addr()]);
    assert!(
        stranded.1 >= Duration::from_millis(125) && stranded.1 < Duration::from_millis(375),
        "first pause: 250 ms jittered, {:?}",
        stranded.1
    );
    // Nobody is asked during the pause.
    let quiet = c.during(stranded.1 / 2).await;
    assert!(
        hellos(&quiet).is_empty(),
        "asked again during the pause: {quiet:?}"
    );
    round.store(2, std::sync::atomic::Ordering::SeqCst);
    let second = c
        .until(|s| s.router == 3 && matches!(s.msg, Message::Resume(_)))
        .await;
    assert_eq!(hellos(&second), [(3, "resume")], "{second:#?}");
    assert_eq!(next_event(&mut events).await, Event::Migrated { to: r3 });
    assert_eq!(client.server(), r3);
    assert_eq!(client.uuid(), uuid);
}

#[tokio::test]
async fn a_request_refused_with_draining_moves_the_session_first() {
    let (uuid, secret) = (Uuid::new_v4(), Secret([23; 32]));
    let r0 = Router::new(uuid, secret).await;
    let r1 = Router::new(uuid, secret).await;
    let mut cfg = ClientConfig::new(r0.addr());
    cfg.initial_rto = Duration::from_millis(100);
    let (client, mut events, at) = register(&r0, cfg).await;
    let q = tokio::spawn({
        let c = client.clone();
        async move { c.query(&[Uuid::from_u128(1)]).await }
    });
    let (m, _, _) = r0.recv().await;
    let rid = m.rid().unwrap();
    r0.send(&draining(rid, Some(r1.addr())), at).await;
    // Resume at the node named, from a new port; then the Query again there, a new rid.
    let (m, _, from) = r1.recv().await;
    let Message::Resume(res) = m else {
        panic!("expected Resume at router 1, got {m:?}")
    };
    assert_ne!(from, at);
    r1.send(&r1.registered(res.rid, from), from).await;
    let (m, _, _) = r1.recv().await;
    assert!(matches!(m, Message::Query(_)), "{m:?}");
    assert!(m.rid().unwrap() > res.rid && res.rid > rid);
    r1.send(
        &Message::QueryResult(sigrouter_proto::QueryResult {
            rid: m.rid().unwrap(),
            online: vec![true],
        }),
        from,
    )
    .await;
    assert_eq!(q.await.unwrap().unwrap(), [true]);
    assert_eq!(
        next_event(&mut events).await,
        Event::Migrated { to: r1.addr() }
    );
    assert!(
        r0.recv_until(Instant::now() + Duration::from_millis(300))
            .await
            .is_none(),
        "the draining router was asked again"
    );
}
