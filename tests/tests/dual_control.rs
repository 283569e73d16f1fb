//! Dual control: a destructive request waits for a second, different officer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kluis_tests::*;

#[test]
fn retiring_old_versions_needs_a_second_officer() {
    let mut server = Server::start();
    let officer2 = server.add_officer("officer2");
    let officer = server.client("officer");
    let old = seal(&server, "sealer", "default", "v1-backup", b"old");
    assert!(kmsctl(&officer, &["keyring", "rotate", "default"]).status.success());
    let new = seal(&server, "sealer", "default", "v2-backup", b"new");

    let out = server.kmsctl("sealer", &["keyring", "retire", "default", "--below-version", "2"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let out = kmsctl(&officer, &["keyring", "retire", "default", "--below-version", "3"]);
    assert!(stderr(&out).contains("the current version must stay active"), "{}", stderr(&out));

    let out = kmsctl(&officer, &["keyring", "retire", "default", "--below-version", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("kmsctl approve 1"), "{}", String::from_utf8_lossy(&out.stdout));
    // Pending: nothing retired yet.
    assert!(unseal(&server, "restorer", &old).status.success());

    let out = kmsctl(&officer, &["approve", "1"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("a second, different officer must approve it"), "{}", stderr(&out));
    assert!(unseal(&server, "restorer", &old).status.success(), "self-approval must change nothing");

    let out = kmsctl(&officer2, &["approve", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = unseal(&server, "restorer", &old);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("version 1 is retired"), "{}", stderr(&out));
    let out = unseal(&server, "restorer", &new);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"new");

    let out = kmsctl(&officer2, &["approve", "1"]);
    assert!(stderr(&out).contains("already approved by \"officer2\""), "{}", stderr(&out));
    let out = server.kmsctl("auditor", &["approvals", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["state"], "approved");
    assert_eq!(v[0]["requested_by"], "officer");
    assert_eq!(v[0]["approved_by"], "officer2");
    let out = server.kmsctl("auditor", &["audit", "export"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("\"action\":\"RetireKeyringVersions\"") && text.contains("ok: approved and carried out request 1"), "{text}");
    assert!(text.lines().any(|l| l.contains("\"action\":\"Approve\"") && l.contains("\"principal\":\"officer\"") && l.contains("denied")));
}

#[test]
fn an_expired_request_cannot_be_approved() {
    let mut server = Server::start();
    // Requests expire the moment they are made: no clock needed to test expiry.
    server.set_top_level("approval_ttl_secs = 0\n");
    let officer2 = server.add_officer("officer2");
    let officer = server.client("officer");
    assert!(kmsctl(&officer, &["keyring", "rotate", "default"]).status.success());
    let out = kmsctl(&officer, &["keyring", "retire", "default", "--below-version", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = kmsctl(&officer2, &["approve", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("approval request 1 expired"), "{}", stderr(&out));
    let out = kmsctl(&officer2, &["approve", "7"]);
    assert!(stderr(&out).contains("no approval request 7"), "{}", stderr(&out));
}
