//! Watching the run: the nodes' /metrics and logs, the processes' CPU time, and the lanes of
//! simulated clients, run as tasks and parked between phases.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::fleet::{Ctl, Lane, STOP};
use crate::scale::procs::{clk_tck, cpu_ticks};

/// Sum of the lines of a /metrics page that start with `prefix`.
pub(super) fn metric(page: &str, prefix: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// `left=` and `secs=` of the node's "drain finished" log line.
pub(super) fn drain_line(log: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(line) = text.lines().rev().find(|l| l.contains("drain finished")) else {
        return Value::Null;
    };
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse::<f64>().ok())
    };
    json!({
        "left": field("left"),
        "awaiting_handover": field("awaiting_handover"),
        "secs": field("secs"),
    })
}

/// CPU seconds of processes since a reading. A process that exits keeps the last reading
/// taken while it ran ([`Cpu::sample`]).
pub(super) struct Cpu {
    pids: Vec<(String, u32)>,
    start: Vec<u64>,
    last: Vec<Option<u64>>,
}

impl Cpu {
    pub(super) fn start(pids: Vec<(String, u32)>) -> Self {
        let start = pids
            .iter()
            .map(|(_, p)| cpu_ticks(*p).unwrap_or(0))
            .collect();
        let last = vec![None; pids.len()];
        Self { pids, start, last }
    }

    /// Reads every process still running.
    pub(super) fn sample(&mut self) {
        for ((_, pid), last) in self.pids.iter().zip(&mut self.last) {
            if let Ok(t) = cpu_ticks(*pid) {
                *last = Some(t);
            }
        }
    }

    /// Seconds per process, and their sum.
    pub(super) fn since(&mut self) -> (Value, f64) {
        self.sample();
        let tck = clk_tck();
        let mut m = serde_json::Map::new();
        let mut sum = 0.0;
        for (((name, _), t0), last) in self.pids.iter().zip(&self.start).zip(&self.last) {
            let t = last.map(|t| t.saturating_sub(*t0) as f64 / tck);
            sum += t.unwrap_or(0.0);
            m.insert(
                name.clone(),
                t.map_or(Value::Null, |t| json!((t * 100.0).round() / 100.0)),
            );
        }
        (Value::Object(m), sum)
    }
}

/// The lanes, run as tasks until [`STOP`], then handed back.
pub(super) struct Lanes {
    ctl: Arc<Ctl>,
    running: JoinSet<(usize, Lane)>,
    parked: Vec<Option<Lane>>,
}

impl Lanes {
    pub(super) fn start(ctl: Arc<Ctl>, lanes: Vec<Lane>) -> Self {
        let mut s = Self {
            ctl,
            running: JoinSet::new(),
            parked: lanes.into_iter().map(Some).collect(),
        };
        s.resume();
        s
    }

    pub(super) fn resume(&mut self) {
        for (i, l) in self.parked.iter_mut().enumerate() {
            if let Some(l) = l.take() {
                self.running.spawn(async move { (i, l.run().await) });
            }
        }
    }

    /// Stops every lane (phase STOP) and takes them back; `next` is the phase to run in when
    /// resumed.
    pub(super) async fn park(&mut self, next: u8) -> anyhow::Result<()> {
        self.ctl.set_phase(STOP);
        while let Some(r) = self.running.join_next().await {
            let (i, l) = r?;
            self.parked[i] = Some(l);
        }
        self.ctl.set_phase(next);
        Ok(())
    }

    pub(super) fn lanes(&self) -> impl Iterator<Item = &Lane> {
        self.parked.iter().flatten()
    }
}
