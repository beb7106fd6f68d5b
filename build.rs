//! Records the git commit the binary is built from, for `sigrouter_build_info` and the
//! startup log line. `SIGROUTER_COMMIT` (set by the Dockerfile's build argument, where there
//! is no `.git`) wins; otherwise `git rev-parse`; otherwise the code says `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=SIGROUTER_COMMIT");
    let commit = std::env::var("SIGROUTER_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            // Rebuild when HEAD moves: HEAD itself, the branch it points at, packed refs.
            for f in ["HEAD", "packed-refs"] {
                if let Some(p) = git(&["rev-parse", "--git-path", f]) {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
            if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
                if let Some(p) = git(&["rev-parse", "--git-path", &r]) {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        });
    if let Some(c) = commit {
        println!("cargo:rustc-env=SIGROUTER_COMMIT={c}");
    }
}
