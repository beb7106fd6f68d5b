//! The presence writer against a real redis-server: a batch of claims goes to Redis as one
//! call, and still never overwrites a later claim made by another node.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{eventually, Redis, CLUSTER_KEY};
use sigrouter::cluster::lookup::format_presence;
use sigrouter::cluster::tasks::run_presence_writer;
use sigrouter::cluster::{now_ms, Cluster, LocalSessions, PresenceOp};
use sigrouter::config::ClusterConfig;
use sigrouter::metrics::Metrics;
use sigrouter::store::{presence_key, Store};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A node that holds every client it is asked about.
struct HoldsAll;

impl LocalSessions for HoldsAll {
    fn session_count(&self) -> usize {
        0
    }
    fn presence_snapshot(&self) -> Vec<(Uuid, [u8; 32])> {
        Vec::new()
    }
    fn holds(&self, _: &Uuid) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_claims_is_one_call_and_never_beats_a_later_claim() {
    let redis = Redis::start();
    let cc = ClusterConfig::new(
        &redis.url(),
        "n1",
        "127.0.0.1:0".parse().unwrap(),
        CLUSTER_KEY.to_vec(),
    );
    let metrics = Metrics::new();
    let store = Store::open(&cc.redis_url, Duration::from_secs(2), metrics.clone()).unwrap();
    let (cluster, rx) = Cluster::new(cc, Arc::new(store), metrics);

    // Another node claimed `later` after this node will have; `earlier` before.
    let (later, earlier) = (Uuid::new_v4(), Uuid::new_v4());
    let far = now_ms() + 3_600_000;
    let theirs_later = format_presence("n2", &[2; 32], far);
    let theirs_earlier = format_presence("n2", &[2; 32], 1);
    redis
        .cmd(&["SET", &presence_key(&later), &theirs_later])
        .unwrap();
    redis
        .cmd(&["SET", &presence_key(&earlier), &theirs_earlier])
        .unwrap();
    let fresh: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    for u in fresh.iter().chain([&later, &earlier]) {
        cluster.publish(PresenceOp::Put(*u, [1; 32]));
    }
    let evals_before = redis.command_calls().get("eval").copied().unwrap_or(0);

    let stop = CancellationToken::new();
    let writer = tokio::spawn(run_presence_writer(
        cluster.clone(),
        Arc::new(HoldsAll),
        rx,
        Duration::from_secs(60),
        Duration::from_secs(3600),
        stop.clone(),
    ));
    let written = eventually(Duration::from_secs(5), || {
        fresh
            .iter()
            .chain([&earlier])
            .all(|u| redis.presence_on(u, "n1"))
    })
    .await;
    assert!(written, "every claim without a later one is written");
    assert!(redis.presence_on(&later, "n2"), "the later claim stays");
    let evals = redis.command_calls().get("eval").copied().unwrap_or(0) - evals_before;
    assert_eq!(evals, 1, "eight claims, one call");
    stop.cancel();
    writer.await.unwrap();
}
