//! The flags of `drain` and their checks.

use std::path::PathBuf;

/// Flags of `drain`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Sessions on the node that drains.
    #[arg(long, default_value_t = 100_000)]
    pub(super) sessions: usize,
    /// Nodes in the cluster (the first one drains).
    #[arg(long, default_value_t = 3)]
    pub(super) nodes: usize,
    /// Directory for result.json and the processes' logs.
    #[arg(long)]
    pub(super) out: PathBuf,
    /// The `sigrouter` binary (default: the one next to this executable).
    #[arg(long)]
    pub(super) sigrouter: Option<PathBuf>,
    /// `--drain-secs` of the nodes (default: the node's own default, 20 s).
    #[arg(long)]
    pub(super) drain_secs: Option<f64>,
    /// Sockets carrying the draining node's sessions.
    #[arg(long, default_value_t = 8)]
    pub(super) lanes: usize,
    /// Sessions on the other nodes, heartbeating during the whole run.
    #[arg(long, default_value_t = 10_000)]
    pub(super) hb_sessions: usize,
    /// Heartbeats per second over those sessions.
    #[arg(long, default_value_t = 2_000.0)]
    pub(super) hb_rate: f64,
    /// Seconds of heartbeats measured before the SIGTERM.
    #[arg(long, default_value_t = 3.0)]
    pub(super) baseline_secs: f64,
    /// Seconds of heartbeats measured after the drain.
    #[arg(long, default_value_t = 3.0)]
    pub(super) after_secs: f64,
    /// Sessions a client of the library queries afterwards (a tenth of them, at least one,
    /// it also connects to).
    #[arg(long, default_value_t = 1000)]
    pub(super) sample: usize,
    /// Longest time registration may take.
    #[arg(long, default_value_t = 600.0)]
    pub(super) register_timeout: f64,
    /// Extra flag for every node (repeat for several).
    #[arg(long = "node-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub(super) node_args: Vec<String>,
}

/// Refuses flags outside what the run can do.
pub(super) fn validate(a: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=10_000_000).contains(&a.sessions),
        "--sessions must be 1..=10000000"
    );
    anyhow::ensure!((2..=16).contains(&a.nodes), "--nodes must be 2..=16");
    anyhow::ensure!((1..=64).contains(&a.lanes), "--lanes must be 1..=64");
    anyhow::ensure!(
        a.sessions.div_ceil(a.lanes) <= 250 * 65_536,
        "too many sessions per lane: raise --lanes"
    );
    anyhow::ensure!(
        a.hb_sessions >= a.nodes - 1 && a.hb_sessions <= 1_000_000,
        "--hb-sessions must be at least --nodes - 1 and at most 1000000"
    );
    anyhow::ensure!(
        a.hb_rate > 0.0 && a.hb_rate <= 1_000_000.0,
        "--hb-rate must be in (0, 1000000]"
    );
    anyhow::ensure!(
        (0.5..=600.0).contains(&a.baseline_secs) && (0.5..=600.0).contains(&a.after_secs),
        "--baseline-secs and --after-secs must be 0.5..=600"
    );
    anyhow::ensure!(a.drain_secs.is_none_or(|d| d > 0.0 && d <= 3600.0));
    Ok(())
}
