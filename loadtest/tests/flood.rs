//! `sigrouter-loadtest flood` end to end, small: a Register flood from a thousand loopback
//! sources against a node with live clients. The node must keep the flood within its
//! node-wide budget of new sessions, answer no flood datagram with more bytes than it got, and
//! keep serving the live clients (no failed heartbeat or connect).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// The `sigrouter` binary built beside this one (`cargo test --workspace` builds it).
fn router_bin() -> PathBuf {
    let me = PathBuf::from(env!("CARGO_BIN_EXE_sigrouter-loadtest"));
    let bin = me.with_file_name(format!("sigrouter{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first",
        bin.display()
    );
    bin
}

/// Runs `sigrouter-loadtest flood` with `args` (space-separated) against this build's router;
/// its JSON summary, which must say it passed.
fn flood(args: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_sigrouter-loadtest"))
        .args(["--threads", "2", "flood"])
        .args(["--router-bin", router_bin().to_str().unwrap()])
        .args(args.split_whitespace())
        .output()
        .expect("run sigrouter-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout).expect("one JSON summary");
    assert_eq!(v["passed"], true, "{v:#}");
    v
}

/// The live clients connected, before and during the flood, and nothing of theirs failed.
fn live_clients_kept_working(v: &Value) {
    for phase in ["live_quiet", "live_during_flood"] {
        let p = &v[phase];
        assert!(
            p["failures"].as_object().unwrap().is_empty(),
            "{phase}: {p}"
        );
        assert!(
            p["connect_ms"]["count"].as_u64().unwrap() > 0,
            "{phase}: {p}"
        );
    }
}

#[test]
fn a_register_flood_stays_within_the_budget_and_live_clients_keep_working() {
    let v = flood(
        "--registers 5000 --sources 1000 --live 6 --quiet-secs 1 --new-session-rate 300 --new-session-burst 600",
    );
    let f = &v["flood"];
    assert!(f["datagrams_in"].as_u64().unwrap() >= 4_900, "{f}");
    let created = f["sessions_created"].as_f64().unwrap();
    assert!(created > 0.0, "the budget lets some in: {f}");
    assert!(created <= f["session_budget"].as_f64().unwrap(), "{f}");
    assert!(
        created < 2_000.0,
        "most of 5,000 Registers refused by the budget: {f}"
    );
    // Never more bytes back than in.
    assert!(f["bytes_out_per_byte_in"].as_f64().unwrap() <= 1.0, "{f}");
    live_clients_kept_working(&v);
}

#[test]
fn with_address_validation_always_a_forged_flood_creates_no_session() {
    let v =
        flood("--registers 3000 --sources 600 --live 4 --quiet-secs 1 --address-validation always");
    let f = &v["flood"];
    assert_eq!(f["sessions_created"].as_f64(), Some(0.0), "{f}");
    assert_eq!(f["registered_answers"].as_u64(), Some(0), "{f}");
    assert!(f["retry_answers"].as_u64().unwrap() >= 2_900, "{f}");
    // A Retry is a sixth of the Register it answers.
    assert!(f["bytes_out_per_byte_in"].as_f64().unwrap() < 0.2, "{f}");
    // The live clients (the client library) registered through their Retry and kept working.
    live_clients_kept_working(&v);
}
