//! Latency summaries and the guard on target addresses.

use std::net::SocketAddr;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// A histogram of latencies in microseconds, 1 µs to 60 s, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds")
}

/// Records a latency, clamped into the histogram's range.
pub(crate) fn record(h: &mut Histogram<u64>, micros: u64) {
    h.saturating_record(micros.max(1));
}

/// Percentiles of a microsecond histogram, in `unit` (`"us"` or `"ms"`).
pub(crate) fn summary(h: &Histogram<u64>, unit: &str) -> Value {
    let div = if unit == "ms" { 1000.0 } else { 1.0 };
    let q = |x: f64| {
        if h.is_empty() {
            Value::Null
        } else {
            let v = h.value_at_quantile(x) as f64 / div;
            json!((v * 1000.0).round() / 1000.0)
        }
    };
    json!({
        "unit": unit,
        "count": h.len(),
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": q(1.0),
        "mean": if h.is_empty() { Value::Null } else { json!((h.mean() / div * 1000.0).round() / 1000.0) },
    })
}

/// Refuses targets off this machine unless the operator said otherwise: a load test sends
/// traffic only where its operator points it.
pub(crate) fn check_targets(addrs: &[SocketAddr], allow_remote: bool) -> anyhow::Result<()> {
    for a in addrs {
        anyhow::ensure!(
            allow_remote || a.ip().is_loopback(),
            "{a} is not a loopback address; pass --allow-remote to load a server you run elsewhere"
        );
    }
    Ok(())
}

/// Validates a run duration in seconds: positive and at most an hour.
pub(crate) fn check_duration(secs: f64) -> anyhow::Result<std::time::Duration> {
    anyhow::ensure!(
        secs > 0.0 && secs <= 3600.0,
        "--duration must be between 0 and 3600 seconds, got {secs}"
    );
    Ok(std::time::Duration::from_secs_f64(secs))
}
