//! The cluster's background tasks, one owner each: the node-table refresher (the only writer
//! of the snapshot), the registry publisher (this node's own record) and the presence writer
//! (batched, pipelined presence updates).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::Pipeline;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::lookup::format_presence;
use super::{now_ms, Cluster, LocalSessions, NodeInfo, NodeState, PresenceOp, PresenceRx};
use crate::store::{presence_key, NODES_KEY};

/// Registry records live this many renewal periods without a renewal.
const RECORD_PERIODS: u32 = 3;
/// The registry hash itself expires if no node renews it for this long.
const REGISTRY_KEY_TTL_MS: u64 = 120_000;
/// How long a nudge waits for more nudges before the refresher reads.
const NUDGE_DEBOUNCE: Duration = Duration::from_millis(20);
/// Least time between two registry reads.
const MIN_GAP: Duration = Duration::from_millis(50);
/// How often a node that knows no other member asks its `--peers` again.
const SEED_PERIOD: Duration = Duration::from_secs(2);
/// Most presence writes in one pipeline (claims go 64 to a call against one Redis).
const BATCH: usize = 2048;

/// A node claims a client (Register, Resume, or a claim retried after Redis failed): sets the
/// presence unless the record holds a later claim (its ` t<ms>` suffix; a record without one,
/// from an older node, counts as 0). A claim that could not be written during an outage is
/// retried with its original time, so it can never overwrite the claim of the node the client
/// moved to next.
const CLAIM_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  local t = tonumber(string.match(v, ' t(%d+)$') or '0')
  if t > tonumber(ARGV[2]) then
    return 0
  end
end
return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])";

/// [`CLAIM_SCRIPT`] for many clients in one call (one Redis, not a Redis Cluster, whose keys
/// of one call must share a slot): `KEYS` the presence keys, `ARGV` each key's record and
/// claim time in turn, then the TTL. Returns how many were written.
const CLAIM_MANY_SCRIPT: &str = r"
local ttl = ARGV[#ARGV]
local n = 0
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  local t = 0
  if v then
    t = tonumber(string.match(v, ' t(%d+)$') or '0')
  end
  if not v or t <= tonumber(ARGV[2 * i]) then
    redis.call('SET', k, ARGV[2 * i - 1], 'PX', ttl)
    n = n + 1
  end
end
return n";

/// Most claims in one [`CLAIM_MANY_SCRIPT`] call.
const CLAIMS_PER_CALL: usize = 64;

/// Periodic renewal of a client this node holds: extends the record if it is ours, writes it if
/// absent (Redis lost it; claim time 0, so any real claim wins), and never takes a client from
/// another node.
const REFRESH_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
if string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  return redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 0";

/// Deletes a client's presence only if it still names this node.
const DEL_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Most presence writes kept for a retry after a Redis failure; past it, the writer falls back
/// to a full re-publication.
const MAX_RETRY: usize = 1 << 20;

/// Rebuilds the node table every `period`, whenever nudged (after a Redis read) and whenever
/// the membership view changes (without reading Redis); the only writer of it. The table is
/// the last registry read merged with the membership view, so a Redis failure leaves the
/// registry part as it was while membership keeps the rest current.
pub async fn run_refresher(cluster: Arc<Cluster>, period: Duration, stop: CancellationToken) {
    // The first table should include this node: wait (briefly) for its first publication.
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = cluster.first_published() => {}
        _ = tokio::time::sleep(period) => {}
    }
    let mut last = tokio::time::Instant::now();
    let mut registry: Vec<NodeInfo> = Vec::new();
    loop {
        cluster.take_nudge();
        last = last.max(tokio::time::Instant::now());
        let read_started = std::time::Instant::now();
        let fresh = match read_nodes(&cluster).await {
            Ok((live, expired)) => {
                // Nodes in the registry that membership does not know yet are announced to.
                cluster.membership_seed(std::time::Instant::now(), &live);
                registry = live;
                if !expired.is_empty() {
                    let mut p = redis::pipe();
                    p.cmd("HDEL").arg(NODES_KEY).arg(&expired).ignore();
                    let _ = cluster.store.pipeline(&p, 1).await;
                }
                true
            }
            Err(()) => {
                tracing::debug!("registry read failed; keeping its last contents");
                false
            }
        };
        // Always a new generation after a read attempt: requests waiting for one stop waiting.
        cluster.store_merged(&registry, true, fresh);
        if fresh {
            cluster.count_unsure_resumes(read_started);
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(last + period) => break,
                _ = cluster.members_changed() => cluster.store_merged(&registry, false, false),
                _ = cluster.nudged() => {
                    // Gather the misses that arrive together, and keep reads apart, so a storm
                    // of misses costs one read.
                    tokio::time::sleep(NUDGE_DEBOUNCE).await;
                    tokio::time::sleep_until(last + MIN_GAP).await;
                    if cluster.take_nudge() {
                        break;
                    }
                }
            }
        }
    }
}

/// Seeds membership from `--peers` (host names resolved here) while this node knows no other
/// member: at start and every few seconds after, so a node that starts while Redis is down
/// still joins.
pub async fn run_seeds(cluster: Arc<Cluster>, peers: Vec<String>, stop: CancellationToken) {
    if peers.is_empty() {
        return;
    }
    loop {
        if cluster.membership_active() == 0 {
            let mut addrs = Vec::new();
            for p in &peers {
                match tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(p)).await
                {
                    Ok(Ok(found)) => addrs.extend(found),
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %p, error = %e, "cannot resolve --peers entry")
                    }
                    Err(_) => tracing::warn!(peer = %p, "resolving a --peers entry timed out"),
                }
            }
            cluster.membership_join_addrs(&addrs);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SEED_PERIOD) => {}
        }
    }
}

async fn read_nodes(cluster: &Cluster) -> Result<(Vec<NodeInfo>, Vec<String>), ()> {
    let all: Vec<(String, String)> = cluster
        .store
        .query(redis::cmd("HGETALL").arg(NODES_KEY))
        .await
        .map_err(|_| ())?;
    let now = now_ms();
    let (mut live, mut expired) = (Vec::new(), Vec::new());
    for (id, json) in all {
        match serde_json::from_str::<NodeInfo>(&json) {
            Ok(n) if n.expires_ms > now => live.push(n),
            Ok(_) => expired.push(id),
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "unreadable registry record");
                expired.push(id);
            }
        }
    }
    Ok((live, expired))
}

/// This node's registry record now.
pub fn own_record(cluster: &Cluster, router: &dyn LocalSessions, period: Duration) -> NodeInfo {
    NodeInfo {
        id: cluster.id.to_string(),
        public: cluster.cfg.public_addr,
        internal: cluster.cfg.advertise,
        state: if cluster.is_draining() {
            NodeState::Draining
        } else {
            NodeState::Active
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
        sessions: router.session_count() as u64,
        started_ms: cluster.started_ms,
        expires_ms: now_ms()
            + u64::try_from((period * RECORD_PERIODS).as_millis()).unwrap_or(u64::MAX),
    }
}

/// Refuses to start with a node id that a live node at another address holds (two nodes with
/// one id would each take the other's node-to-node traffic and presence records). A record of
/// this id that stops being renewed (a previous life of this node that did not remove it) is
/// waited out, up to its lifetime; one at this node's own addresses is its previous life.
/// With Redis away the check is skipped (and logged): starting matters more.
pub async fn claim_node_id(cluster: &Cluster, period: Duration) -> anyhow::Result<()> {
    let lifetime = period * RECORD_PERIODS + Duration::from_secs(1);
    let give_up = tokio::time::Instant::now() + lifetime;
    loop {
        let cmd = redis::cmd("HGET").arg(NODES_KEY).arg(&*cluster.id).clone();
        let json: Option<String> = match cluster.store.query(&cmd).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "could not check that this node id is free (Redis away)");
                return Ok(());
            }
        };
        let Some(rec) = json.and_then(|j| serde_json::from_str::<NodeInfo>(&j).ok()) else {
            return Ok(());
        };
        let now = now_ms();
        let ours = rec.internal == cluster.cfg.advertise && rec.public == cluster.cfg.public_addr;
        if ours || rec.expires_ms <= now {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < give_up,
            "node id {:?} is held by a live node (internal {}, public {}): give this node another --node-id",
            &*cluster.id,
            rec.internal,
            rec.public
        );
        let left = Duration::from_millis(rec.expires_ms - now);
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
    }
}

/// Writes this node's record once. `Some(true)` when the record was missing before (first
/// publication, or Redis lost its data), `None` when Redis did not take it.
pub async fn publish_self(
    cluster: &Cluster,
    router: &dyn LocalSessions,
    period: Duration,
) -> Option<bool> {
    let rec = own_record(cluster, router, period);
    let json = serde_json::to_string(&rec).ok()?;
    let mut p = redis::pipe();
    p.cmd("HSET").arg(NODES_KEY).arg(&rec.id).arg(json);
    p.cmd("PEXPIRE").arg(NODES_KEY).arg(REGISTRY_KEY_TTL_MS);
    let v = cluster.store.pipeline(&p, 2).await.ok()?;
    Some(matches!(v.first(), Some(redis::Value::Int(1))))
}

/// Removes this node's record (end of drain).
pub async fn unpublish_self(cluster: &Cluster) {
    let mut p = redis::pipe();
    p.cmd("HDEL").arg(NODES_KEY).arg(&*cluster.id).ignore();
    let _ = cluster.store.pipeline(&p, 1).await;
}

/// Renews this node's record every `period`. After Redis comes back it asks the presence
/// writer to re-publish every session (Redis may have lost them).
pub async fn run_registry(
    cluster: Arc<Cluster>,
    router: Arc<dyn LocalSessions>,
    period: Duration,
    stop: CancellationToken,
) {
    let mut first = true;
    let mut recoveries = cluster.store.recoveries();
    loop {
        let r = publish_self(&cluster, &*router, period).await;
        if first {
            // The refresher waits for this before its first read (success or not).
            first = false;
            cluster.mark_first_published();
        } else if r == Some(true) || cluster.store.recoveries() != recoveries {
            // Redis was unreachable, or lost our record: it may have lost presence too.
            tracing::info!("redis back: re-publishing registry record and all presence");
            cluster.republish.store(true, Ordering::Relaxed);
            cluster.nudge();
        }
        recoveries = cluster.store.recoveries();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// Applies presence writes in pipelined batches, refreshes every session's presence TTL every
/// `refresh`, and re-publishes everything after a failure. Never blocks a request: requests
/// only enqueue.
///
/// Writes that fail (Redis down) are kept, the newest per client, and retried first once Redis
/// answers: a claim only while the client is still held here, a deletion only while it is not.
pub async fn run_presence_writer(
    cluster: Arc<Cluster>,
    router: Arc<dyn LocalSessions>,
    mut rx: PresenceRx,
    ttl: Duration,
    refresh: Duration,
    stop: CancellationToken,
) {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let mut last_refresh = tokio::time::Instant::now();
    let mut ops: Vec<(PresenceOp, u64)> = Vec::with_capacity(BATCH);
    let mut retry: HashMap<Uuid, (PresenceOp, u64)> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv_many(&mut ops, BATCH) => if n == 0 { return },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let full =
            cluster.republish.swap(false, Ordering::Relaxed) || last_refresh.elapsed() >= refresh;
        if full {
            last_refresh = tokio::time::Instant::now();
        }
        let mut failed = false;
        if !retry.is_empty() {
            // Oldest first, then what came since: the newest write per client lands last.
            let mut again: Vec<(PresenceOp, u64)> = retry
                .drain()
                .map(|(_, v)| v)
                .filter(|(op, _)| match op {
                    PresenceOp::Put(u, _) => router.holds(u),
                    PresenceOp::Del(u) => !router.holds(u),
                })
                .collect();
            again.sort_by_key(|(_, t)| *t);
            again.append(&mut ops);
            ops = again;
        }
        let mut kept = Vec::new();
        let many = !cluster.store.is_cluster();
        for chunk in ops.chunks(BATCH) {
            let mut p = redis::pipe();
            let commands = add_ops(&mut p, &cluster, chunk, ttl_ms, many);
            cluster.presence_progress(now_ms(), retry.len());
            if cluster.store.pipeline(&p, commands).await.is_err() {
                failed = true;
                kept.extend_from_slice(chunk);
            }
        }
        ops.clear();
        for (op, t) in kept {
            if retry.len() >= MAX_RETRY {
                break;
            }
            let u = match &op {
                PresenceOp::Put(u, _) | PresenceOp::Del(u) => *u,
            };
            retry.insert(u, (op, t));
        }
        if full && !failed {
            let all = router.presence_snapshot();
            for chunk in all.chunks(BATCH) {
                let mut p = redis::pipe();
                for (u, v) in chunk {
                    add_op(&mut p, &cluster, &PresenceOp::Put(*u, *v), 0, ttl_ms, true);
                }
                cluster.presence_progress(now_ms(), retry.len());
                if cluster.store.pipeline(&p, chunk.len()).await.is_err() {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            cluster.republish.store(true, Ordering::Relaxed);
        }
        cluster.presence_progress(0, retry.len());
    }
}

/// Adds `ops` to `p` in order, runs of claims as one [`CLAIM_MANY_SCRIPT`] call each when
/// `many` (one Redis); returns how many commands it added.
fn add_ops(
    p: &mut Pipeline,
    cluster: &Cluster,
    ops: &[(PresenceOp, u64)],
    ttl_ms: u64,
    many: bool,
) -> usize {
    if !many {
        for (op, t) in ops {
            add_op(p, cluster, op, *t, ttl_ms, false);
        }
        return ops.len();
    }
    let mut commands = 0;
    let mut rest = ops;
    while let Some(((op, t), _)) = rest.split_first() {
        let run = rest
            .iter()
            .take(CLAIMS_PER_CALL)
            .take_while(|(op, _)| matches!(op, PresenceOp::Put(..)))
            .count();
        if run < 2 {
            add_op(p, cluster, op, *t, ttl_ms, false);
            rest = &rest[1..];
        } else {
            let cmd = p.cmd("EVAL").arg(CLAIM_MANY_SCRIPT).arg(run);
            for (op, _) in &rest[..run] {
                if let PresenceOp::Put(u, _) = op {
                    cmd.arg(presence_key(u));
                }
            }
            for (op, t) in &rest[..run] {
                if let PresenceOp::Put(_, v) = op {
                    cmd.arg(format_presence(&cluster.id, v, *t)).arg(*t);
                }
            }
            cmd.arg(ttl_ms).ignore();
            rest = &rest[run..];
        }
        commands += 1;
    }
    commands
}

fn add_op(
    p: &mut Pipeline,
    cluster: &Cluster,
    op: &PresenceOp,
    claimed_ms: u64,
    ttl_ms: u64,
    refresh: bool,
) {
    match op {
        PresenceOp::Put(u, v) if refresh => {
            p.cmd("EVAL")
                .arg(REFRESH_SCRIPT)
                .arg(1)
                .arg(presence_key(u))
                .arg(&*cluster.id)
                .arg(format_presence(&cluster.id, v, 0))
                .arg(ttl_ms)
                .ignore();
        }
        PresenceOp::Put(u, v) => {
            p.cmd("EVAL")
                .arg(CLAIM_SCRIPT)
                .arg(1)
                .arg(presence_key(u))
                .arg(format_presence(&cluster.id, v, claimed_ms))
                .arg(claimed_ms)
                .arg(ttl_ms)
                .ignore();
        }
        PresenceOp::Del(u) => {
            p.cmd("EVAL")
                .arg(DEL_SCRIPT)
                .arg(1)
                .arg(presence_key(u))
                .arg(&*cluster.id)
                .ignore();
        }
    }
}
