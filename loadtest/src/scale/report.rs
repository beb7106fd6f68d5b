//! Medians and ranges over the measured rounds, for the summary.

use serde_json::{json, Value};

/// Median, minimum and maximum of the finite values (null when there is none).
fn median_range(mut v: Vec<f64>) -> Value {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let m = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({ "median": r(m), "min": r(v[0]), "max": r(v[v.len() - 1]) })
}

/// [`median_range`] of the number at `key` (a JSON pointer) in each round.
pub(super) fn median_of(rounds: &[Value], key: &str) -> Value {
    median_range(
        rounds
            .iter()
            .filter_map(|r| r.pointer(key).and_then(Value::as_f64))
            .collect(),
    )
}
