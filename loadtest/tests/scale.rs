//! `sigrouter-loadtest scale` end to end: it starts a router and the echo server itself,
//! registers sessions, heartbeats them in interleaved rounds and reports what the servers paid.
//! Small and short: a check of the tool, not a measurement.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// The `sigrouter` binary built beside this one (`cargo test --workspace` builds it).
fn router_bin() -> PathBuf {
    let me = PathBuf::from(env!("CARGO_BIN_EXE_sigrouter-loadtest"));
    let bin = me.with_file_name(format!("sigrouter{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo test --workspace) first",
        bin.display()
    );
    bin
}

#[test]
fn scale_reports_memory_throughput_and_cpu_for_a_router_and_the_echo_server() {
    let out = Command::new(env!("CARGO_BIN_EXE_sigrouter-loadtest"))
        .args([
            "--threads",
            "1",
            "scale",
            "--sessions",
            "300",
            "--sockets",
            "3",
        ])
        .args([
            "--rate",
            "2000",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--rounds",
            "2",
        ])
        .arg("--router-bin")
        .arg(router_bin())
        .output()
        .expect("run sigrouter-loadtest");
    assert!(
        out.status.success(),
        "scale failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let targets = v["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 2, "the router and the echo server");
    for t in targets {
        let label = t["label"].as_str().unwrap_or("?");
        let rounds = t["rounds"].as_array().expect("rounds");
        assert_eq!(rounds.len(), 2, "{label}: one entry per round");
        for r in rounds {
            // 2,000/s for 1 s: most of them answered (a loaded machine may lag a little).
            let acked = r["acked"].as_u64().unwrap_or(0);
            assert!(acked >= 1000, "{label}: only {acked} answers in a round");
            assert!(
                r["cpu_us_per_answer"].as_f64().is_some_and(|c| c > 0.0),
                "{label}: CPU per answer read from /proc: {r}"
            );
            assert!(r["latency"]["p99"].as_f64().is_some(), "{label}: latency");
        }
        assert!(
            t["acks_per_s"]["median"].as_f64().is_some(),
            "{label}: median"
        );
    }
    let router = targets
        .iter()
        .find(|t| t["kind"] == "router")
        .expect("a router");
    assert_eq!(router["registered"], 300);
    // Readings from /proc/PID/status (the growth of 300 sessions may fit in pages the
    // allocator already has, so only the readings themselves are checked).
    assert!(router["rss_before_bytes"].as_u64().is_some_and(|b| b > 0));
    assert!(router["rss_registered_bytes"]
        .as_u64()
        .is_some_and(|b| b > 0));
    assert!(router["rss_bytes_per_session"].as_f64().is_some());
    assert!(router["vs_echo"]["cpu_per_answer_ratio"].as_f64().is_some());
}
