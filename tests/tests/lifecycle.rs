//! Key lifecycle against a real server: scheduled destruction (cancel, legal hold,
//! waiting period, dual control), retention expiry, keyring destruction, rotation
//! periods, escrow removal. Time moves through the server's test clock file, never
//! by sleeping.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Output;

use kluis_tests::*;

const DAY: i64 = 86_400;

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "exit {:?}: {}", o.status.code(), stderr(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(o: &Output, code: i32, needle: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", stderr(o));
    assert!(stderr(o).contains(needle), "expected {needle:?} in: {}", stderr(o));
}

/// A server with a test clock and a second officer (`officer2`), started at `t0`.
struct World {
    server: Server,
    clock: PathBuf,
    officer: PathBuf,
    officer2: PathBuf,
    t0: i64,
}

impl World {
    fn new(top_level: &str) -> Self {
        let mut server = Server::start();
        let clock = server.dir.path().join("clock");
        let t0 = time::OffsetDateTime::now_utc().unix_timestamp();
        std::fs::write(&clock, t0.to_string()).unwrap();
        server.env.push(("KLUIS_TEST_CLOCK_FILE".into(), clock.to_str().unwrap().into()));
        server.set_top_level(top_level);
        let officer2 = server.add_officer("officer2");
        let officer = server.client("officer");
        World { server, clock, officer, officer2, t0 }
    }

    fn set_time(&self, t: i64) {
        std::fs::write(&self.clock, t.to_string()).unwrap();
    }

    fn date(&self, t: i64) -> String {
        time::OffsetDateTime::from_unix_timestamp(t).unwrap().format(&time::format_description::well_known::Rfc3339).unwrap()
    }

    /// The pending approval id printed by a dual-control request, approved by `officer2`
    /// after the requester's own approval is refused.
    fn approve_as_second(&self, out: &Output) -> String {
        ok(out);
        let id = approval_id(out);
        refused(&kmsctl(&self.officer, &["approve", &id]), 4, "a second, different officer must approve it");
        let approved = ok(&kmsctl(&self.officer2, &["approve", &id]));
        assert!(approved.contains("approved and carried out"), "{approved}");
        id
    }
}

/// The key id named in a sealed file's Kluis stanza.
fn key_id(sealed: &[u8]) -> String {
    let head = String::from_utf8_lossy(&sealed[..sealed.len().min(1024)]).into_owned();
    let line = head.lines().find(|l| l.starts_with("-> kluis ")).expect("kluis stanza");
    line.split_whitespace().nth(3).unwrap().to_owned()
}

fn destruction_state(w: &World, id: u32) -> String {
    let out = ok(&w.server.kmsctl("auditor", &["destruction", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let d = v.as_array().unwrap().iter().find(|d| d["id"] == id).unwrap_or_else(|| panic!("no destruction {id} in {out}"));
    d["state"].as_str().unwrap().to_owned()
}

#[test]
fn destruction_is_scheduled_cancelled_held_and_carried_out_after_the_wait() {
    let w = World::new("");
    let a = seal(&w.server, "sealer", "default", "ehr/a", b"backup a");
    let b = seal(&w.server, "sealer", "default", "ehr/b", b"backup b");
    let c = seal(&w.server, "sealer", "default", "ehr/c", b"backup c");

    // Not an officer: refused.
    refused(&w.server.kmsctl("restorer", &["key", "destroy", &key_id(&a)]), 4, "may not DestroyKey");

    // Before expiry (no retention: never expires): dual control, then the waiting period.
    let out = kmsctl(&w.officer, &["key", "destroy", &key_id(&a)]);
    w.approve_as_second(&out);
    assert_eq!(destruction_state(&w, 1), "scheduled");
    let shown = ok(&kmsctl(&w.officer, &["key", "show", &key_id(&a)]));
    assert!(shown.contains("scheduled:  destruction 1"), "{shown}");
    refused(&kmsctl(&w.officer, &["key", "destroy", &key_id(&a)]), 4, "already has destruction 1 scheduled");
    assert_eq!(unseal(&w.server, "restorer", &a).stdout, b"backup a", "still inside the waiting period");

    // Cancelled: nothing happens even long after the due date.
    ok(&kmsctl(&w.officer2, &["destruction", "cancel", "1"]));
    assert_eq!(destruction_state(&w, 1), "cancelled");
    refused(&kmsctl(&w.officer, &["destruction", "cancel", "1"]), 4, "cannot be cancelled: it is cancelled");
    w.set_time(w.t0 + 8 * DAY);
    assert_eq!(unseal(&w.server, "restorer", &a).stdout, b"backup a");

    // Scheduled, then held: the due date passes and nothing is destroyed.
    let out = kmsctl(&w.officer, &["key", "destroy", &key_id(&b)]);
    w.approve_as_second(&out);
    ok(&kmsctl(&w.officer, &["keyring", "hold", "default", "--reason", "court order 2026-117"]));
    refused(&kmsctl(&w.officer, &["key", "destroy", &key_id(&c)]), 4, "under legal hold");
    w.set_time(w.t0 + 20 * DAY);
    assert_eq!(destruction_state(&w, 2), "held");
    assert_eq!(unseal(&w.server, "restorer", &b).stdout, b"backup b", "a hold blocks a due destruction");
    let shown = ok(&kmsctl(&w.officer, &["keyring", "show", "default"]));
    assert!(shown.contains("legal hold:") && shown.contains("court order 2026-117"), "{shown}");

    // Released: the due destruction goes ahead, and the refusal names the date.
    // (Releasing is dual control: the second officer approves.)
    w.approve_as_second(&kmsctl(&w.officer, &["keyring", "release", "default"]));
    refused(&kmsctl(&w.officer, &["keyring", "release", "default"]), 4, "has no legal hold to release");
    let out = unseal(&w.server, "restorer", &b);
    let day = &w.date(w.t0 + 20 * DAY)[..10];
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("was destroyed on {day}")), "{}", stderr(&out));
    assert_eq!(destruction_state(&w, 2), "destroyed");
    let shown = ok(&w.server.kmsctl("auditor", &["key", "show", &key_id(&b)]));
    assert!(shown.contains(&format!("state:      destroyed on {day}")), "{shown}");
    // A tombstone stays: the record, and the refusal, survive a restart.
    let mut server = w.server;
    server.restart();
    let out = unseal(&server, "restorer", &b);
    assert!(stderr(&out).contains(&format!("was destroyed on {day}")), "{}", stderr(&out));
    assert_eq!(unseal(&server, "restorer", &c).stdout, b"backup c", "other keys are untouched");
    // Every step is in the audit trail, which still verifies.
    let export = server.dir.path().join("audit.jsonl");
    let text = ok(&server.kmsctl("auditor", &["audit", "export"]));
    std::fs::write(&export, &text).unwrap();
    assert!(text.lines().any(|l| l.contains("\"action\":\"DestroyKey\"") && l.contains("\"principal\":\"kms-server\"")), "{text}");
    assert!(text.contains("\"action\":\"SetLegalHold\"") && text.contains("\"action\":\"CancelDestruction\""));
    ok(&server.kmsctl("auditor", &["audit", "verify", export.to_str().unwrap()]));
}

#[test]
fn expired_keys_are_destroyed_by_the_server_and_after_expiry_one_officer_suffices() {
    // The scheduled sweep runs at start and then hourly: the test restarts to run it.
    let w = World::new("maintenance_interval_secs = 3600\n");
    ok(&kmsctl(&w.officer, &["keyring", "create", "short", "--retention-days", "1"]));
    for role in ["sealer", "restorer"] {
        w.approve_as_second(&kmsctl(&w.officer, &["keyring", "grant", "short", "--principal", role, "--role", role]));
    }
    let x = seal(&w.server, "sealer", "short", "short/x", b"x");
    let y = seal(&w.server, "sealer", "short", "short/y", b"y");
    let kept = seal(&w.server, "sealer", "default", "default/kept", b"kept");
    let shown = ok(&kmsctl(&w.officer, &["key", "show", &key_id(&x), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let expires = v["expires_unix"].as_i64().unwrap();
    assert!((expires - (w.t0 + DAY)).abs() < 120, "expiry = issue + retention: {shown}");

    // Past expiry, and the server restarted: its start-up sweep destroyed x without anyone asking.
    w.set_time(w.t0 + 2 * DAY);
    let mut w = w;
    w.server.restart();
    let shown = ok(&w.server.kmsctl("auditor", &["key", "show", &key_id(&x)]));
    assert!(shown.contains("state:      destroyed on"), "{shown}");
    let list = ok(&w.server.kmsctl("auditor", &["destruction", "list"]));
    assert!(list.contains("expiry") && list.contains(&key_id(&x)), "{list}");
    assert_eq!(unseal(&w.server, "restorer", &kept).stdout, b"kept", "keys of a keyring without retention stay");
    refused(&unseal(&w.server, "restorer", &x), 4, "was destroyed on");
    refused(&unseal(&w.server, "restorer", &y), 4, "was destroyed on");

    // A key that expired but that the sweep has not reached yet: one officer schedules it.
    let z = seal(&w.server, "sealer", "short", "short/z", b"z");
    w.set_time(w.t0 + 4 * DAY);
    let out = ok(&kmsctl(&w.officer, &["key", "destroy", &key_id(&z)]));
    assert!(out.contains("scheduled for"), "no approval needed after expiry: {out}");
    // Meanwhile an unwrap meets the expired key and destroys it then and there.
    refused(&unseal(&w.server, "restorer", &z), 4, "was destroyed on");
}

#[test]
fn a_keyring_is_destroyed_under_dual_control_and_rotates_on_its_period() {
    let w = World::new("");
    ok(&kmsctl(&w.officer, &["keyring", "create", "pacs", "--rotation-period-days", "30"]));
    for role in ["sealer", "restorer"] {
        w.approve_as_second(&kmsctl(&w.officer, &["keyring", "grant", "pacs", "--principal", role, "--role", role]));
    }
    let p1 = seal(&w.server, "sealer", "pacs", "pacs/1", b"p1");
    let shown = ok(&kmsctl(&w.officer, &["keyring", "show", "pacs"]));
    assert!(shown.contains("current version: 1") && shown.contains("rotation:        every 30 days"), "{shown}");

    // The period passes: the server rotates by itself (the next issuance meets it first).
    w.set_time(w.t0 + 31 * DAY);
    let p2 = seal(&w.server, "sealer", "pacs", "pacs/2", b"p2");
    let shown = ok(&kmsctl(&w.officer, &["keyring", "show", "pacs", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(v["current_version"], 2, "{shown}");
    assert_eq!(v["next_rotation_unix"].as_i64().unwrap(), w.t0 + 61 * DAY, "{shown}");
    assert_eq!(unseal(&w.server, "restorer", &p1).stdout, b"p1", "old versions keep unsealing");
    let audit = ok(&w.server.kmsctl("auditor", &["audit", "tail", "-n", "50"]));
    assert!(audit.lines().any(|l| l.contains("kms-server") && l.contains("RotateKeyring") && l.contains("rotation period reached")), "{audit}");

    // Destroying a keyring always needs a second officer, then waits.
    refused(&w.server.kmsctl("auditor", &["keyring", "destroy", "pacs"]), 4, "may not DestroyKeyring");
    let out = kmsctl(&w.officer, &["keyring", "destroy", "pacs"]);
    w.approve_as_second(&out);
    assert_eq!(unseal(&w.server, "restorer", &p2).stdout, b"p2", "inside the waiting period");
    w.set_time(w.t0 + 39 * DAY);
    let day = &w.date(w.t0 + 39 * DAY)[..10];
    let out = unseal(&w.server, "restorer", &p2);
    refused(&out, 4, &format!("keyring \"pacs\" was destroyed on {day}"));
    refused(&unseal(&w.server, "restorer", &p1), 4, "was destroyed on");
    let out = run_env("backup-hook", &["seal", "--keyring", "pacs", "--backup-id", "pacs/3"], b"p3", &[("KLUIS_CLIENT_CONFIG", &w.server.client("sealer"))]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("was destroyed on"), "{}", stderr(&out));
    let shown = ok(&kmsctl(&w.officer, &["keyring", "show", "pacs"]));
    assert!(shown.contains("DESTROYED:"), "{shown}");
    refused(&kmsctl(&w.officer, &["keyring", "create", "pacs"]), 1, "already exists");
    // The default keyring is untouched.
    let d = seal(&w.server, "sealer", "default", "d", b"d");
    assert_eq!(unseal(&w.server, "restorer", &d).stdout, b"d");
}
