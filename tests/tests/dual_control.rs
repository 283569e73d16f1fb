//! Dual control: a destructive request waits for a second, different officer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Output;

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

    // `old` is still wrapped under version 1: refused, with the count, unless forced.
    let out = kmsctl(&officer, &["keyring", "retire", "default", "--below-version", "2"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("would strand 1 active key(s) still wrapped under them"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    // Under a legal hold even a forced retirement is refused.
    assert!(kmsctl(&officer, &["keyring", "hold", "default", "--reason", "court order 7"]).status.success());
    let out = kmsctl(&officer, &["keyring", "retire", "default", "--below-version", "2", "--force"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("legal hold"), "{}", stderr(&out));
    let out = kmsctl(&officer, &["keyring", "release", "default"]);
    let release = approval_id(&out);
    assert!(kmsctl(&officer2, &["approve", &release]).status.success());

    let out = kmsctl(&officer, &["keyring", "retire", "default", "--below-version", "2", "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(shown.contains("kmsctl approve 2") && shown.contains("forced: 1 key(s) still wrapped under them"), "{shown}");
    // Pending: nothing retired yet.
    assert!(unseal(&server, "restorer", &old).status.success());

    let out = kmsctl(&officer, &["approve", "2"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("a second, different officer must approve it"), "{}", stderr(&out));
    assert!(unseal(&server, "restorer", &old).status.success(), "self-approval must change nothing");

    let out = kmsctl(&officer2, &["approve", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = unseal(&server, "restorer", &old);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("version 1 is retired"), "{}", stderr(&out));
    let out = unseal(&server, "restorer", &new);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"new");

    let out = kmsctl(&officer2, &["approve", "2"]);
    assert!(stderr(&out).contains("already approved by \"officer2\""), "{}", stderr(&out));
    let out = server.kmsctl("auditor", &["approvals", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[1]["state"], "approved");
    assert_eq!(v[1]["requested_by"], "officer");
    assert_eq!(v[1]["approved_by"], "officer2");
    let out = server.kmsctl("auditor", &["audit", "export"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("\"action\":\"RetireKeyringVersions\"") && text.contains("ok: approved and carried out request 2"), "{text}");
    assert!(text.contains("forced: 1 key(s) still wrapped under them"), "the count is in the audit: {text}");
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

/// The approval `id` as `kmsctl approvals --json` lists it (read by the auditor).
fn listed(server: &Server, id: &str) -> serde_json::Value {
    let out = server.kmsctl("auditor", &["approvals", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().iter().find(|a| a["id"].as_u64().map(|n| n.to_string()).as_deref() == Some(id)).cloned().unwrap_or_else(|| panic!("no approval {id} in {v}"))
}

/// The audit trail as the auditor exports it.
fn audit_text(server: &Server) -> String {
    let out = server.kmsctl("auditor", &["audit", "export"]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A request by `officer` is pending: the requester's own approve and another
/// certificate of the same officer are refused, the approvals list describes it, and
/// nothing has changed (`unchanged` checks the effect is absent) until `dev` approves.
/// Returns the request id.
fn second_officer_applies(server: &Server, out: &Output, description: &str, unchanged: impl Fn()) -> String {
    assert!(out.status.success(), "{}", stderr(out));
    assert!(stdout(out).contains("is pending") && stdout(out).contains(description), "{}", stdout(out));
    let id = approval_id(out);
    unchanged();
    refused(&server.kmsctl("officer", &["approve", &id]), 4, &["a second, different officer must approve it"]);
    let again = server.another_certificate("officer");
    refused(&kmsctl(&again, &["approve", &id]), 4, &["a second, different officer must approve it"]);
    unchanged();
    let a = listed(server, &id);
    assert_eq!((a["state"].as_str(), a["requested_by"].as_str()), (Some("pending"), Some("officer")), "{a}");
    assert!(a["action"].as_str().unwrap().contains(description), "{a}");
    let o = server.kmsctl("dev", &["approve", &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(description), "{}", stdout(&o));
    assert_eq!(listed(server, &id)["approved_by"], "dev");
    let audit = audit_text(server);
    let pending = format!("pending approval {id}: {description}");
    let approved = format!("approved and carried out request {id} of officer: {description}");
    assert!(audit.lines().any(|l| l.contains("\"principal\":\"officer\"") && l.contains(&pending)), "no request entry {pending:?}");
    assert!(
        audit.lines().any(|l| l.contains("\"action\":\"Approve\"") && l.contains("\"principal\":\"dev\"") && l.contains(&approved)),
        "no approval entry {approved:?}"
    );
    let denied = audit.lines().filter(|l| l.contains("\"action\":\"Approve\"") && l.contains("\"principal\":\"officer\"") && l.contains("denied"));
    assert!(denied.count() >= 2, "both refused approvals are audited");
    id
}

/// The findings: one officer granted a backup host's principal `restorer`
/// (undoing write-only hosts). A grant is now a request; a revocation stays immediate.
#[test]
fn a_runtime_grant_needs_a_second_officer_and_a_revocation_does_not() {
    let server = Server::start();
    let sealed = seal(&server, "sealer", "default", "host-backup", b"patient data");
    let write_only = || {
        refused(&unseal(&server, "sealer", &sealed), 4, &["may not UnwrapDataKey"]);
        let g = stdout(&server.kmsctl("auditor", &["keyring", "grants", "default", "--json"]));
        assert!(!g.contains("\"principal\": \"sealer\",\n    \"role\": \"restorer\""), "{g}");
    };
    write_only();
    let out = server.kmsctl("officer", &["keyring", "grant", "default", "--principal", "sealer", "--role", "restorer"]);
    second_officer_applies(&server, &out, "grant restorer on keyring default to sealer", write_only);
    let o = unseal(&server, "sealer", &sealed);
    assert!(o.status.success(), "the approved grant applies at once: {}", stderr(&o));
    assert_eq!(o.stdout, b"patient data");
    // Revoking only protects: one officer, at once.
    let o = server.kmsctl("officer", &["keyring", "revoke", "default", "--principal", "sealer", "--role", "restorer"]);
    assert!(o.status.success() && !stdout(&o).contains("kmsctl approve"), "{}", stdout(&o));
    write_only();
    // Bad input is refused before any request is made.
    refused(&server.kmsctl("officer", &["keyring", "grant", "default", "--principal", "sealer", "--role", "janitor"]), 1, &["role"]);
    refused(&server.kmsctl("officer", &["keyring", "grant", "nope", "--principal", "sealer", "--role", "restorer"]), 4, &["keyring \"nope\" does not exist"]);
}

/// The finding: retention set to 1 day by one officer destroyed keys the next
/// day. Lowering is now a request; raising stays immediate.
#[test]
fn lowering_retention_needs_a_second_officer_and_raising_does_not() {
    let server = Server::start();
    let retention = || -> u64 {
        let o = server.kmsctl("auditor", &["keyring", "show", "ehr", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["retention_days"].as_u64().unwrap()
    };
    assert!(server.kmsctl("officer", &["keyring", "create", "ehr", "--retention-days", "30"]).status.success());
    let out = server.kmsctl("officer", &["keyring", "policy", "ehr", "--retention-days", "1"]);
    second_officer_applies(&server, &out, "lower the retention of keyring ehr from 30 days to 1 days", || assert_eq!(retention(), 30));
    assert_eq!(retention(), 1);
    // Raising (and 0: keep until destroyed, the longest) applies at once.
    for (days, want) in [("90", 90), ("0", 0)] {
        let o = server.kmsctl("officer", &["keyring", "policy", "ehr", "--retention-days", days]);
        assert!(o.status.success() && !stdout(&o).contains("kmsctl approve"), "{}", stdout(&o));
        assert_eq!(retention(), want);
    }
    // From "keep until destroyed" to 30 days is a lowering.
    let o = server.kmsctl("officer", &["keyring", "policy", "ehr", "--retention-days", "30"]);
    assert!(stdout(&o).contains("kmsctl approve"), "{}", stdout(&o));
    assert_eq!(retention(), 0);
    // Lowering together with a rotation change is refused whole.
    refused(
        &server.kmsctl("officer", &["keyring", "policy", "ehr", "--retention-days", "5", "--rotation-period-days", "30"]),
        1,
        &["rotation_period_days", "its own request"],
    );
    assert_eq!(retention(), 0);
}

/// Releasing a legal hold is a request: the hold keeps blocking destruction until a
/// second officer approves. Placing one stays immediate.
#[test]
fn releasing_a_legal_hold_needs_a_second_officer_and_placing_one_does_not() {
    let server = Server::start();
    let o = server.kmsctl("officer", &["keyring", "hold", "default", "--reason", "court order 2026-117"]);
    assert!(o.status.success() && !stdout(&o).contains("kmsctl approve"), "{}", stdout(&o));
    let still_held = || refused(&server.kmsctl("dev", &["keyring", "destroy", "default"]), 4, &["under legal hold", "court order 2026-117"]);
    still_held();
    let out = server.kmsctl("officer", &["keyring", "release", "default"]);
    let description = "release the legal hold on keyring default (placed by officer on ";
    second_officer_applies(&server, &out, description, || {
        still_held();
    });
    let o = server.kmsctl("dev", &["keyring", "destroy", "default"]);
    assert!(o.status.success() && stdout(&o).contains("kmsctl approve"), "released: the destroy request is taken: {}", stderr(&o));
    refused(&server.kmsctl("officer", &["keyring", "release", "default"]), 4, &["has no legal hold to release"]);
}
