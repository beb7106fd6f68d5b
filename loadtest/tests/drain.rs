//! `sigrouter-loadtest drain`, small: three real nodes and a real redis-server, 5,000
//! simulated sessions on the first node, SIGTERM with `--drain-secs 4` while the other nodes
//! carry heartbeats. Every session must resume at another node before the node exits and answer
//! there afterwards; the result and the plot must be written.
//!
//! Needs the `sigrouter` binary next to `sigrouter-loadtest`: `cargo test --workspace` (the
//! test command) builds both; alone, run `cargo build -p sigrouter` first.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

const SESSIONS: u64 = 5000;

#[test]
fn a_small_drain_moves_every_session_and_each_answers_at_its_new_node() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_sigrouter-loadtest"));
    assert!(
        exe.with_file_name("sigrouter").exists(),
        "no sigrouter binary next to {} (run `cargo build -p sigrouter`)",
        exe.display()
    );
    let out = std::env::temp_dir().join(format!("sigrouter-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(&exe)
        .args(["drain", "--sessions", &SESSIONS.to_string()])
        .args([
            "--drain-secs",
            "4",
            "--hb-sessions",
            "500",
            "--hb-rate",
            "200",
        ])
        .args([
            "--baseline-secs",
            "1",
            "--after-secs",
            "1",
            "--sample",
            "200",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run sigrouter-loadtest drain");
    let stderr = String::from_utf8_lossy(&run.stderr);
    let summary: Value = serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|e| panic!("summary on stdout ({e}); stderr:\n{stderr}"));
    let r: Value = serde_json::from_slice(&std::fs::read(out.join("result.json")).unwrap())
        .expect("result.json is JSON");
    assert_eq!(summary["passed"], r["criteria"]["passed"]);
    assert_eq!(
        r["criteria"]["passed"], true,
        "{}\nstderr:\n{stderr}",
        r["criteria"]
    );

    // Every session told, every one resumed at another node (counted there as a migrate
    // resume), before the drained node exited on its own.
    let d = &r["drain"];
    assert_eq!(d["told"].as_u64(), Some(SESSIONS), "{d}");
    assert_eq!(d["resumed"].as_u64(), Some(SESSIONS), "{d}");
    assert_eq!(d["not_resumed"].as_u64(), Some(0), "{d}");
    let on: u64 = d["resumed_on"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(on, SESSIONS, "{d}");
    assert!(d["all_resumed_after_s"].as_f64().unwrap() <= 4.0, "{d}");
    assert_eq!(d["n1_exit"], "exit status: 0", "{d}");
    assert_eq!(
        r["resumed_by_cause"]["migrate"].as_f64(),
        Some(SESSIONS as f64),
        "{}",
        r["resumed_by_cause"]
    );

    // The receiving nodes were told ahead by the drained one (Expect) and took most Resumes
    // without a Redis read (a Resume may overtake its Expect: then it is looked up).
    let expected: f64 = r["nodes_after"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n["resumes_expected"].as_f64().unwrap())
        .sum();
    assert!(
        expected >= SESSIONS as f64 / 2.0,
        "{expected} of {SESSIONS} resumes taken without a lookup: {}",
        r["nodes_after"]
    );

    // Afterwards every session (the moved ones and the heartbeating ones) answers at its node,
    // and a client of the library finds and connects to a sample of them.
    let reach = &r["reachability"];
    assert_eq!(reach["heartbeat_answered"], reach["held"], "{reach}");
    assert_eq!(reach["held"].as_u64(), Some(SESSIONS + 500), "{reach}");
    assert_eq!(reach["query_online"], reach["query_sample"], "{reach}");
    assert_eq!(reach["connected"], reach["connect_sample"], "{reach}");

    // Heartbeats on the other nodes were answered during the drain, their latency reported.
    let hb = &r["heartbeats_other_nodes"]["during"];
    assert!(hb["answered"].as_u64().unwrap() > 0, "{hb}");
    assert!(hb["latency"]["p99"].as_f64().is_some(), "{hb}");

    let svg = std::fs::read_to_string(out.join("drain.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for label in ["resumed at another node", "p99 heartbeat latency"] {
        assert!(svg.contains(label), "drain.svg lacks {label:?}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
