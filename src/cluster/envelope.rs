//! The node-to-node envelope as a [`Cluster`] uses it: sealing datagrams for other nodes,
//! opening (authenticating) what arrives, with counted and rate-limited refusals, and the
//! replay memory (replies already given, one-shot datagrams already seen).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{now_ms, wire, Cluster, FRESHNESS_MS};

/// At most one log line per this many milliseconds about refused node-to-node datagrams.
const REFUSED_LOG_EVERY_MS: u64 = 10_000;

impl Cluster {
    /// Builds an authenticated datagram for node `to`; returns its sequence number too.
    pub fn envelope(&self, to: &str, seq: Option<u64>, body: wire::Body) -> Option<(u64, Vec<u8>)> {
        let seq = seq.unwrap_or_else(|| self.seq.fetch_add(1, Ordering::Relaxed));
        let env = wire::Envelope {
            from: self.id.to_string(),
            to: to.to_string(),
            ts: now_ms(),
            seq,
            body,
        };
        // Always the first key: the second one is only ever accepted (key rotation).
        wire::encode(&env, &self.cfg.cluster_key).map(|b| (seq, b))
    }

    /// Authenticates an internal datagram: MAC (by this node's key, or its second, accepted
    /// key), addressed to us, fresh. `Err` is a counted drop, and logged at most once per
    /// 10 s with the number refused since the last line.
    pub fn open(&self, buf: &[u8]) -> Result<wire::Envelope, wire::WireError> {
        let r = self.authenticate(buf);
        if let Err(e) = r {
            self.refused(e, buf);
        }
        r
    }

    fn authenticate(&self, buf: &[u8]) -> Result<wire::Envelope, wire::WireError> {
        let mut keys: Vec<&[u8]> = vec![&self.cfg.cluster_key];
        keys.extend(self.cfg.cluster_next_key.as_deref());
        let (env, _) = wire::decode_any(buf, &keys)?;
        let to_us = env.to == *self.id
            || (env.to.is_empty() && matches!(env.body, wire::Body::Join { .. }));
        if !to_us || env.from == *self.id {
            return Err(wire::WireError::Misaddressed);
        }
        if now_ms().abs_diff(env.ts) > FRESHNESS_MS {
            return Err(wire::WireError::Stale);
        }
        Ok(env)
    }

    /// Counts a refused datagram; writes the rate-limited log line.
    fn refused(&self, e: wire::WireError, buf: &[u8]) {
        self.metrics.cluster_refused(e.into());
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = self.clock_ms();
        let last = self.refused_logged_ms.load(Ordering::Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= REFUSED_LOG_EVERY_MS;
        if !due
            || self
                .refused_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let refused = self.refused.swap(0, Ordering::Relaxed);
        // Unauthenticated text: bounded, and logged escaped (Debug) so it cannot forge lines.
        let claimed_from: String = wire::claimed_sender(buf)
            .unwrap_or_default()
            .chars()
            .take(64)
            .collect();
        let hint = match e {
            wire::WireError::BadMac => {
                "the sender uses another cluster key: check SIGROUTER_CLUSTER_KEY_FILE (and SIGROUTER_CLUSTER_NEXT_KEY_FILE during a rotation) on every node"
            }
            wire::WireError::Stale => "clocks apart by more than 30 s, or a replay",
            wire::WireError::Misaddressed => {
                "meant for another node id: briefly after a restart at a reused address, or two nodes share a node id"
            }
            wire::WireError::Malformed => "not sigrouter node traffic",
        };
        tracing::warn!(
            reason = e.name(),
            claimed_from = ?claimed_from,
            refused_since_last_line = refused,
            hint,
            "refused node-to-node datagrams (counted in sigrouter_cluster_refused_total by reason; at most one line per 10 s)"
        );
    }

    /// The reply already given to request (`from`, `seq`), if it is a repeat.
    pub fn seen(&self, from: &str, seq: u64) -> Option<wire::Status> {
        self.seen.get(&(Arc::from(from), seq)).map(|e| e.0)
    }

    /// Remembers the reply to request (`from`, `seq`).
    pub fn remember(&self, from: &str, seq: u64, status: wire::Status, now: Instant) {
        let key = (Arc::<str>::from(from), seq);
        self.seen_ages.written(key.clone(), now);
        self.seen.insert(key, (status, now));
    }

    /// Whether one-shot datagram (`from`, `seq`) arrives for the first time (a repeat is a
    /// replay: the caller drops and counts it). `reply`: it answers one of our requests (its
    /// sequence number is ours, not the sender's).
    pub fn first_time(&self, from: &str, seq: u64, reply: bool, now: Instant) -> bool {
        match self.oneshot.entry((Arc::from(from), seq, reply)) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(v) => {
                self.oneshot_ages.written(v.key().clone(), now);
                v.insert(now);
                true
            }
        }
    }
}
