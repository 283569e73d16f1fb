//! Dual control: a destructive request waits for a second, different officer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use kluis_tests::*;

fn ctl(cfg: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--client-config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    run("kmsctl", &all, b"")
}

/// A second officer: certificate from the dev CA, granted officer on all keyrings in the config.
fn second_officer(server: &mut Server, top_level: &str) -> PathBuf {
    let pki = server.data_dir().join("pki");
    let out = run("kmsctl", &["cert", "issue", "--ca-dir", pki.to_str().unwrap(), "--name", "officer2"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg = server.data_dir().join("server.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replacen("version = 1\n", &format!("version = 1\n{top_level}"), 1);
    std::fs::write(&cfg, text + "\n[[grant]]\nprincipal = \"officer2\"\nroles = [\"officer\"]\nkeyrings = [\"*\"]\n").unwrap();
    server.restart();
    let text = std::fs::read_to_string(server.client("officer")).unwrap().replace("officer.pem", "officer2.pem").replace("officer.key", "officer2.key");
    let p = server.dir.path().join("officer2.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn retiring_old_versions_needs_a_second_officer() {
    let mut server = Server::start();
    let officer2 = second_officer(&mut server, "");
    let officer = server.client("officer");
    let old = seal(&server, "sealer", "default", "v1-backup", b"old");
    assert!(ctl(&officer, &["keyring", "rotate", "default"]).status.success());
    let new = seal(&server, "sealer", "default", "v2-backup", b"new");

    let out = ctl(&server.client("sealer"), &["keyring", "retire", "default", "--below-version", "2"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let out = ctl(&officer, &["keyring", "retire", "default", "--below-version", "3"]);
    assert!(stderr(&out).contains("the current version must stay active"), "{}", stderr(&out));

    let out = ctl(&officer, &["keyring", "retire", "default", "--below-version", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("kmsctl approve 1"), "{}", String::from_utf8_lossy(&out.stdout));
    // Pending: nothing retired yet.
    assert!(unseal(&server, "restorer", &old).status.success());

    let out = ctl(&officer, &["approve", "1"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("a second, different officer must approve it"), "{}", stderr(&out));
    assert!(unseal(&server, "restorer", &old).status.success(), "self-approval must change nothing");

    let out = ctl(&officer2, &["approve", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = unseal(&server, "restorer", &old);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("version 1 is retired"), "{}", stderr(&out));
    let out = unseal(&server, "restorer", &new);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"new");

    let out = ctl(&officer2, &["approve", "1"]);
    assert!(stderr(&out).contains("already approved by \"officer2\""), "{}", stderr(&out));
    let out = ctl(&server.client("auditor"), &["approvals", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["state"], "approved");
    assert_eq!(v[0]["requested_by"], "officer");
    assert_eq!(v[0]["approved_by"], "officer2");
    let out = ctl(&server.client("auditor"), &["audit", "export"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("\"action\":\"RetireKeyringVersions\"") && text.contains("ok: approved and carried out request 1"), "{text}");
    assert!(text.lines().any(|l| l.contains("\"action\":\"Approve\"") && l.contains("\"principal\":\"officer\"") && l.contains("denied")));
}

#[test]
fn an_expired_request_cannot_be_approved() {
    let mut server = Server::start();
    // Requests expire the moment they are made: no clock needed to test expiry.
    let officer2 = second_officer(&mut server, "approval_ttl_secs = 0\n");
    let officer = server.client("officer");
    assert!(ctl(&officer, &["keyring", "rotate", "default"]).status.success());
    let out = ctl(&officer, &["keyring", "retire", "default", "--below-version", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = ctl(&officer2, &["approve", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("approval request 1 expired"), "{}", stderr(&out));
    let out = ctl(&officer2, &["approve", "7"]);
    assert!(stderr(&out).contains("no approval request 7"), "{}", stderr(&out));
}
