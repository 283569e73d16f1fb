//! `scripts/kill-loop`, short: the real server killed with SIGKILL 3 times under concurrent
//! seals and officer writes, restarted each time; every acknowledged write must be there and
//! the audit chain must verify (the script checks; this test runs it and reads its result).
//! The long run (100 kills) and its figures are in docs/reliability.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Output};

use kluis_tests::*;

fn script(kills: u32, env: &[(&str, &str)]) -> Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = bin("kms-server").parent().unwrap().to_owned();
    let mut cmd = Command::new(root.join("scripts/kill-loop"));
    cmd.arg(kills.to_string()).env("BIN_DIR", &bin_dir).env("MAX_SECONDS", "600").env_remove("KILL_LOOP_INJECT_LOSS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("scripts/kill-loop could not be run (needs bash)")
}

/// `key=value` of the script's result line.
fn field(out: &str, key: &str) -> u64 {
    let line = out.lines().find(|l| l.starts_with("kill-loop: result ")).unwrap_or_else(|| panic!("no result line in {out}"));
    let v = line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("no {key} in {line}"));
    v.parse().unwrap_or_else(|_| panic!("{key}={v}"))
}

#[test]
fn three_kills_under_load_lose_no_acknowledged_write() {
    let o = script(3, &[]);
    ok(&o, "scripts/kill-loop 3");
    let out = stdout(&o);
    assert_eq!(field(&out, "kills"), 3);
    assert_eq!(field(&out, "starts"), 4, "the server started every time");
    assert_eq!(field(&out, "lost"), 0);
    // Load went on across the kills: writes were acknowledged, and some were cut by a kill.
    assert!(field(&out, "seals_acked") >= 3 * 8 / 2, "{out}");
    assert!(field(&out, "officer_acked") >= 1, "{out}");
    assert!(field(&out, "audit_entries") >= field(&out, "seals_acked") + field(&out, "officer_acked"), "{out}");
}

/// The script's checks catch a lost write: it is told it was acknowledged a seal, or a
/// keyring, that the server never had.
#[test]
fn the_loop_fails_when_an_acknowledged_write_is_missing() {
    let o = script(1, &[("KILL_LOOP_INJECT_LOSS", "seal")]);
    refused(&o, 1, &["FAILED: 1 acknowledged seals do not unseal", "s0-never"]);
    let o = script(1, &[("KILL_LOOP_INJECT_LOSS", "officer")]);
    refused(&o, 1, &["lost: keyring create ko0-never", "FAILED: 1 acknowledged officer writes are missing"]);
}
