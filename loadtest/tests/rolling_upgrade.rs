//! `loadtest/rolling-upgrade`, small: three real nodes and a real redis-server, 40 clients of
//! the client library at 50 connects/s for 20 s, every node restarted with drain. Runs the
//! executable itself (its build step skipped: `SIGROUTER_BIN_DIR` points at this build's
//! binaries), then checks its verdict, DIR/result.json and DIR/report.svg.
//!
//! Needs the `sigrouter` binary next to `sigrouter-loadtest`: `cargo test --workspace` (the
//! test command) builds both; alone, run `cargo build -p sigrouter` first.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

const RATE: f64 = 50.0;

#[test]
fn a_small_rolling_upgrade_passes_and_writes_its_result_and_plot() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_sigrouter-loadtest"));
    let bin_dir = exe.parent().unwrap().to_path_buf();
    assert!(
        bin_dir.join("sigrouter").exists(),
        "no sigrouter binary in {} (run `cargo build -p sigrouter`)",
        bin_dir.display()
    );
    let out =
        std::env::temp_dir().join(format!("sigrouter-rolling-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let tool = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rolling-upgrade");
    let run = Command::new(&tool)
        .env("SIGROUTER_BIN_DIR", &bin_dir)
        .args([
            "--clients",
            "40",
            "--duration",
            "20",
            "--rate",
            &RATE.to_string(),
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run loadtest/rolling-upgrade");
    let stderr = String::from_utf8_lossy(&run.stderr);
    let summary: Value = serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|e| panic!("summary on stdout ({e}); stderr:\n{stderr}"));

    let r: Value = serde_json::from_slice(&std::fs::read(out.join("result.json")).unwrap())
        .expect("result.json is JSON");
    let passed = r["criteria"]["passed"].as_bool().expect("criteria.passed");
    assert_eq!(summary["passed"], r["criteria"]["passed"]);
    assert_eq!(
        run.status.code(),
        Some(if passed { 0 } else { 1 }),
        "exit code and verdict disagree; stderr:\n{stderr}"
    );

    // Every node restarted in turn: SIGTERM, a clean exit, ready again, one after the other.
    let restarts = r["restarts"].as_array().unwrap();
    let ids: Vec<&str> = restarts
        .iter()
        .map(|x| x["node"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["n1", "n2", "n3"]);
    let mut last_ready = 0.0;
    for x in restarts {
        let t = |k: &str| x[k].as_f64().unwrap();
        assert_eq!(x["exit"], "exit status: 0", "{x}");
        assert!(
            last_ready <= t("sigterm_s")
                && t("sigterm_s") < t("exited_s")
                && t("exited_s") <= t("ready_s"),
            "{x}"
        );
        last_ready = t("ready_s");
    }
    let (from, to) = (
        r["upgrade"]["from_s"].as_f64().unwrap(),
        r["upgrade"]["to_s"].as_f64().unwrap(),
    );
    assert_eq!(from, restarts[0]["sigterm_s"].as_f64().unwrap());
    assert!(to >= last_ready);

    // Open loop: connects started at the asked rate over the whole run, and each is counted
    // in exactly one phase, before, during and after all non-empty.
    let run_s = r["run_s"].as_f64().unwrap();
    assert!(run_s >= 20.0);
    let total = r["total"]["attempts"].as_u64().unwrap();
    let expected = RATE * run_s;
    assert!(
        (total as f64) > expected * 0.95 && (total as f64) <= expected + 1.0,
        "{total} connects for {expected} due"
    );
    let phase = |p: &str| r["phases"][p]["attempts"].as_u64().unwrap();
    assert!(phase("before") > 0 && phase("during") > 0 && phase("after") > 0);
    assert_eq!(phase("before") + phase("during") + phase("after"), total);
    let timeline = r["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), run_s.ceil() as usize);
    let per_second: u64 = timeline
        .iter()
        .map(|s| s["attempts"].as_u64().unwrap())
        .sum();
    assert_eq!(per_second, total);
    assert!(r["phases"]["during"]["latency_all"]["p99"]
        .as_f64()
        .is_some());

    // The plot: an SVG with both charts and every restart marked.
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for label in [
        "n1 SIGTERM",
        "n2 SIGTERM",
        "n3 SIGTERM",
        "success rate",
        "p99 connect latency",
    ] {
        assert!(svg.contains(label), "report.svg lacks {label:?}");
    }

    // Today's router passes this small run; a failure here is a regression in drain or
    // client behaviour, with the figures in result.json.
    assert!(
        passed,
        "criteria failed: {}; see {}",
        r["criteria"]["reasons"],
        out.display()
    );
    let _ = std::fs::remove_dir_all(&out);
}
