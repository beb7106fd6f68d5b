//! What a rolling-upgrade run measured: outcomes before, during and after the upgrade, latency
//! percentiles, a per-second timeline (DIR/result.json), and its plot (DIR/report.svg).

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde_json::{json, Value};

use super::fleet::Record;
use crate::stats;

/// One node's restart, in seconds since the load started.
#[derive(Clone, Debug)]
pub(crate) struct Restart {
    pub(crate) id: String,
    pub(crate) sigterm: f64,
    pub(crate) exited: f64,
    /// `exit status 0`, or `killed` when the drain overran its allowance.
    pub(crate) exit: String,
    pub(crate) ready: f64,
}

impl Restart {
    pub(crate) fn json(&self) -> Value {
        json!({
            "node": self.id,
            "sigterm_s": round3(self.sigterm),
            "exited_s": round3(self.exited),
            "drain_s": round3(self.exited - self.sigterm),
            "exit": self.exit,
            "ready_s": round3(self.ready),
            "down_s": round3(self.ready - self.sigterm),
        })
    }
}

/// `x` rounded to three decimals (milliseconds, for seconds).
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The part of the run a connect belongs to, by the time it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Before the first SIGTERM.
    Before,
    /// From the first SIGTERM until the upgrade ended (the last node ready, plus the settle
    /// time).
    During,
    /// After that.
    After,
}

/// When the upgrade began and ended, in seconds since the load started.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    pub(crate) from: f64,
    pub(crate) to: f64,
}

impl Window {
    pub(crate) fn phase(&self, t: f64) -> Phase {
        if t < self.from {
            Phase::Before
        } else if t < self.to {
            Phase::During
        } else {
            Phase::After
        }
    }
}

fn connected(r: &Record) -> bool {
    r.outcome == "connected"
}

/// Counts, success rate, outcomes by kind and latency percentiles of some connects.
pub(crate) fn summarize<'a>(records: impl Iterator<Item = &'a Record>) -> Value {
    let mut outcomes = BTreeMap::<&str, u64>::new();
    let mut all = stats::histogram();
    let mut ok = stats::histogram();
    let (mut n, mut good) = (0u64, 0u64);
    for r in records {
        n += 1;
        *outcomes.entry(r.outcome.as_str()).or_default() += 1;
        let us = u64::try_from(r.latency.as_micros()).unwrap_or(u64::MAX);
        stats::record(&mut all, us);
        if connected(r) {
            good += 1;
            stats::record(&mut ok, us);
        }
    }
    json!({
        "attempts": n,
        "connected": good,
        "failed": n - good,
        "success_rate": if n == 0 { Value::Null } else { json!(good as f64 / n as f64) },
        "outcomes": outcomes,
        "latency_all": stats::summary(&all, "ms"),
        "latency_connected": stats::summary(&ok, "ms"),
    })
}

/// One second of the timeline: connects that started in it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Second {
    pub(crate) attempts: u64,
    pub(crate) connected: u64,
    /// Latencies of every connect that started this second, ms, sorted.
    latencies: Vec<f64>,
    outcomes: BTreeMap<String, u64>,
}

impl Second {
    pub(crate) fn success_rate(&self) -> Option<f64> {
        (self.attempts > 0).then(|| self.connected as f64 / self.attempts as f64)
    }

    /// The `q` quantile of latency (nearest rank), ms.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.latencies.len();
        (n > 0).then(|| self.latencies[((q * n as f64).ceil() as usize).clamp(1, n) - 1])
    }

    fn json(&self, t: usize) -> Value {
        let r3 = |x: Option<f64>| x.map(round3);
        json!({
            "t": t,
            "attempts": self.attempts,
            "connected": self.connected,
            "success_rate": self.success_rate(),
            "p50_ms": r3(self.quantile(0.5)),
            "p99_ms": r3(self.quantile(0.99)),
            "max_ms": r3(self.quantile(1.0)),
            "outcomes": self.outcomes,
        })
    }
}

/// Connects by the second they started in.
pub(crate) fn timeline(records: &[Record]) -> Vec<Second> {
    let mut secs: Vec<Second> = Vec::new();
    for r in records {
        let t = r.start.as_secs() as usize;
        if secs.len() <= t {
            secs.resize_with(t + 1, Default::default);
        }
        let s = &mut secs[t];
        s.attempts += 1;
        if connected(r) {
            s.connected += 1;
        }
        s.latencies.push(r.latency.as_secs_f64() * 1000.0);
        *s.outcomes.entry(r.outcome.clone()).or_default() += 1;
    }
    for s in &mut secs {
        s.latencies.sort_by(f64::total_cmp);
    }
    secs
}

pub(crate) fn timeline_json(secs: &[Second]) -> Value {
    Value::Array(secs.iter().enumerate().map(|(t, s)| s.json(t)).collect())
}

/// Draws success rate and p99 connect latency per second, each restart marked, to `path`.
pub(crate) fn plot(
    path: &Path,
    title: &str,
    secs: &[Second],
    restarts: &[Restart],
    window: Window,
) -> anyhow::Result<()> {
    let x_max = (secs.len().max(1) as f64).max(window.to + 1.0);
    let rates: Vec<(f64, f64)> = secs
        .iter()
        .enumerate()
        .filter_map(|(t, s)| Some((t as f64 + 0.5, s.success_rate()? * 100.0)))
        .collect();
    let p99: Vec<(f64, f64)> = secs
        .iter()
        .enumerate()
        .filter_map(|(t, s)| Some((t as f64 + 0.5, s.quantile(0.99)?)))
        .collect();
    // Zoomed to the worst second (at least 99 % to 100 %): a dip of 0.1 % must be visible.
    let low = rates.iter().map(|p| p.1).fold(99.0_f64, f64::min);
    let y_rate = (low - (100.0 - low) * 0.1).floor().max(0.0)..100.0 + (100.0 - low) * 0.05;
    let p99_max = p99.iter().map(|p| p.1).fold(1.0_f64, f64::max) * 1.15;

    let root = SVGBackend::new(path, (1200, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let (top, bottom) = root.split_vertically(390);
    let marks = |chart: &mut ChartContext<'_, SVGBackend<'_>, Cartesian2d<_, _>>,
                 lo: f64,
                 hi: f64,
                 labels: bool|
     -> anyhow::Result<()> {
        chart.draw_series(std::iter::once(Rectangle::new(
            [(window.from, lo), (window.to, hi)],
            RGBAColor(255, 170, 0, 0.12).filled(),
        )))?;
        for r in restarts {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(r.sigterm, lo), (r.sigterm, hi)],
                RED.stroke_width(2),
            )))?;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(r.ready, lo), (r.ready, hi)],
                GREEN.mix(0.8).stroke_width(1),
            )))?;
            if labels {
                chart.draw_series(std::iter::once(Text::new(
                    format!("{} SIGTERM", r.id),
                    (r.sigterm + x_max * 0.004, hi),
                    ("sans-serif", 13).into_font().color(&RED),
                )))?;
            }
        }
        Ok(())
    };

    let mut c = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .caption(
            "connects that succeeded, by the second they started (%)",
            ("sans-serif", 16),
        )
        .build_cartesian_2d(0.0..x_max, y_rate.clone())?;
    c.configure_mesh()
        .x_desc("seconds since the load started")
        .y_desc("success %")
        .draw()?;
    marks(&mut c, y_rate.start, y_rate.end, true)?;
    c.draw_series(LineSeries::new(rates.iter().copied(), BLUE.stroke_width(2)))?
        .label("success rate")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(2)));
    c.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, 0.0)],
        RED.stroke_width(2),
    )))?
    .label("SIGTERM (drain starts)")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
    c.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, 0.0)],
        GREEN.stroke_width(1),
    )))?
    .label("restarted node ready")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], GREEN.stroke_width(1)));
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let mut c = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .caption(
            "p99 connect latency, by the second the connect started (ms)",
            ("sans-serif", 16),
        )
        .build_cartesian_2d(0.0..x_max, 0.0..p99_max)?;
    c.configure_mesh()
        .x_desc("seconds since the load started (shaded: the upgrade)")
        .y_desc("p99 ms")
        .draw()?;
    marks(&mut c, 0.0, p99_max, false)?;
    c.draw_series(LineSeries::new(p99.iter().copied(), BLACK.stroke_width(2)))?;
    root.present()?;
    Ok(())
}
