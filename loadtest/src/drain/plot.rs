//! The drain's plot (DIR/drain.svg): sessions told and resumed elsewhere since SIGTERM, and
//! the heartbeat p99 on the other nodes, per second, with `--drain-secs` marked.

use std::path::Path;

use plotters::prelude::*;

/// What one second since SIGTERM saw.
pub(crate) struct Second {
    /// Sessions that got their first Migrate in this second.
    pub(crate) told: u64,
    /// Sessions that resumed elsewhere in this second.
    pub(crate) resumed: u64,
    /// p99 (ms) of the heartbeats on the other nodes sent in this second.
    pub(crate) hb_p99_ms: Option<f64>,
}

/// Draws the plot to `path`; `total` is the sessions on the drained node.
pub(crate) fn plot(
    path: &Path,
    title: &str,
    secs: &[Second],
    total: u64,
    drain_secs: f64,
    hb_p99_before_ms: Option<f64>,
) -> anyhow::Result<()> {
    let x_max = (secs.len() as f64).max(drain_secs + 2.0);
    let share = |n: u64| n as f64 * 100.0 / total.max(1) as f64;
    let (mut told, mut resumed) = (0u64, 0u64);
    let mut told_pts = vec![(0.0, 0.0)];
    let mut resumed_pts = vec![(0.0, 0.0)];
    for (t, s) in secs.iter().enumerate() {
        told += s.told;
        resumed += s.resumed;
        told_pts.push((t as f64 + 1.0, share(told)));
        resumed_pts.push((t as f64 + 1.0, share(resumed)));
    }
    let p99: Vec<(f64, f64)> = secs
        .iter()
        .enumerate()
        .filter_map(|(t, s)| Some((t as f64 + 0.5, s.hb_p99_ms?)))
        .collect();
    let p99_max = p99
        .iter()
        .map(|p| p.1)
        .chain(hb_p99_before_ms)
        .fold(1.0_f64, f64::max)
        * 1.15;

    let root = SVGBackend::new(path, (1200, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let (top, bottom) = root.split_vertically(390);
    let deadline = |lo: f64, hi: f64| {
        PathElement::new(
            vec![(drain_secs, lo), (drain_secs, hi)],
            RED.stroke_width(2),
        )
    };

    let mut c = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .caption(
            format!("sessions of the drained node, cumulative (% of {total})"),
            ("sans-serif", 16),
        )
        .build_cartesian_2d(0.0..x_max, 0.0..105.0)?;
    c.configure_mesh()
        .x_desc("seconds since SIGTERM")
        .y_desc("% of sessions")
        .draw()?;
    c.draw_series(std::iter::once(deadline(0.0, 105.0)))?
        .label("--drain-secs (the node exits)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
    c.draw_series(LineSeries::new(told_pts, BLUE.mix(0.6).stroke_width(2)))?
        .label("told (first Migrate arrived)")
        .legend(|(x, y)| {
            PathElement::new(vec![(x, y), (x + 18, y)], BLUE.mix(0.6).stroke_width(2))
        });
    c.draw_series(LineSeries::new(resumed_pts, GREEN.stroke_width(2)))?
        .label("resumed at another node")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], GREEN.stroke_width(2)));
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let mut c = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .caption(
            "p99 heartbeat latency on the other nodes, by the second it was sent (ms)",
            ("sans-serif", 16),
        )
        .build_cartesian_2d(0.0..x_max, 0.0..p99_max)?;
    c.configure_mesh()
        .x_desc("seconds since SIGTERM")
        .y_desc("p99 ms")
        .draw()?;
    c.draw_series(std::iter::once(deadline(0.0, p99_max)))?;
    if let Some(b) = hb_p99_before_ms {
        c.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, b), (x_max, b)],
            BLACK.mix(0.4).stroke_width(1),
        )))?
        .label("p99 before SIGTERM")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.4)));
    }
    c.draw_series(LineSeries::new(p99, BLACK.stroke_width(2)))?
        .label("p99 per second")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(2)));
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
