//! The audit trail: every request recorded, exported, verified offline; tampering
//! in the export or in the store is named; the server fails closed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use kluis_proto::audit::{AuditRecord, ExportLine};
use redb::ReadableTable;
use kluis_tests::*;

fn export(server: &Server, dir: &Path) -> (PathBuf, PathBuf) {
    let out = server.kmsctl("auditor", &["audit", "export"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let file = dir.join("audit.jsonl");
    std::fs::write(&file, &out.stdout).unwrap();
    let out = server.kmsctl("auditor", &["audit", "public-key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = dir.join("audit.pub");
    std::fs::write(&key, &out.stdout).unwrap();
    (file, key)
}

/// Offline verification (no client config, no server).
fn verify(file: &Path, key: &Path) -> std::process::Output {
    kmsctl_offline(&["audit", "verify", s(file), "--public-key", s(key)])
}

fn records(file: &Path) -> Vec<AuditRecord> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter_map(|l| match serde_json::from_str::<ExportLine>(l).unwrap() {
            ExportLine::Record(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn mixed_requests(server: &Server) {
    let sealed = seal(server, "sealer", "default", "ehr/2026-11-22/full", b"backup");
    assert!(unseal(server, "restorer", &sealed).status.success());
    assert_eq!(unseal(server, "sealer", &sealed).status.code(), Some(4));
    assert!(server.kmsctl("officer", &["keyring", "create", "pacs"]).status.success());
    assert_eq!(server.kmsctl("sealer", &["keyring", "list"]).status.code(), Some(4));
    assert!(server.kmsctl("auditor", &["keyring", "list"]).status.success());
}

fn rewrite(file: &Path, f: impl FnOnce(&mut Vec<String>)) -> PathBuf {
    let mut lines: Vec<String> = std::fs::read_to_string(file).unwrap().lines().map(str::to_owned).collect();
    f(&mut lines);
    let p = file.with_extension(format!("t{}", lines.len()));
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn assert_broken(out: std::process::Output, needle: &str) {
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("audit trail NOT intact") && err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn every_request_is_recorded_and_the_export_verifies_offline() {
    let server = Server::start();
    mixed_requests(&server);
    let dir = tempfile::tempdir().unwrap();
    let (file, key) = export(&server, dir.path());
    let out = verify(&file, &key);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("audit trail intact"), "{}", String::from_utf8_lossy(&out.stdout));
    // Without a key file the key is fetched from the server.
    let out = server.kmsctl("auditor", &["audit", "verify", s(&file)]);
    assert!(out.status.success(), "{}", stderr(&out));

    let recs = records(&file);
    let issued = recs.iter().find(|r| r.action == "GenerateDataKey").unwrap();
    assert_eq!((issued.principal.as_str(), issued.outcome.as_str()), ("sealer", "ok"));
    assert_eq!(issued.backup_id.as_deref(), Some("ehr/2026-11-22/full"));
    assert_eq!(issued.key_id.as_ref().map(String::len), Some(32));
    let unwrapped = recs.iter().find(|r| r.action == "UnwrapDataKey" && r.outcome == "ok").unwrap();
    assert_eq!(unwrapped.principal, "restorer");
    assert_eq!(unwrapped.key_id, issued.key_id);
    let denied = recs.iter().find(|r| r.action == "UnwrapDataKey" && r.principal == "sealer").unwrap();
    assert!(denied.outcome.starts_with("denied: principal \"sealer\" may not UnwrapDataKey"), "{}", denied.outcome);
    assert!(recs.iter().any(|r| r.action == "ListKeyrings" && r.principal == "sealer" && r.outcome.starts_with("denied")));
    assert!(recs.iter().any(|r| r.action == "CreateKeyring" && r.keyring.as_deref() == Some("pacs") && r.outcome == "ok"));
    assert!(recs.iter().any(|r| r.action == "ExportAudit" && r.principal == "auditor"), "the export records itself");
    // No key bytes anywhere in the trail.
    assert!(!std::fs::read_to_string(&file).unwrap().contains("plaintext"));

    // `audit tail` shows the newest entries.
    let out = server.kmsctl("auditor", &["audit", "tail", "-n", "3"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}

#[test]
fn changed_removed_reordered_inserted_entries_are_named() {
    let server = Server::start();
    mixed_requests(&server);
    let dir = tempfile::tempdir().unwrap();
    let (file, key) = export(&server, dir.path());
    let n = records(&file).len();
    assert!(n >= 8, "{n}");

    let changed = rewrite(&file, |l| l[2] = l[2].replace("\"outcome\":\"ok\"", "\"outcome\":\"ok \""));
    assert_broken(verify(&changed, &key), "entry seq 3 (line 3) was changed");
    let removed = rewrite(&file, |l| {
        l.remove(3);
    });
    assert_broken(verify(&removed, &key), "entry seq 5 (line 4) follows seq 3");
    let reordered = rewrite(&file, |l| l.swap(4, 5));
    assert_broken(verify(&reordered, &key), "entry seq 6 (line 5) follows seq 4");
    let inserted = rewrite(&file, |l| {
        let copy = l[1].clone();
        l.insert(2, copy);
    });
    assert_broken(verify(&inserted, &key), "entry seq 2 (line 3) follows seq 2");
    let cut = rewrite(&file, |l| {
        l.pop();
    });
    assert_broken(verify(&cut, &key), "no signed head");
}

#[test]
fn an_entry_changed_in_the_store_is_named_and_no_export_is_signed_over_it() {
    let mut server = Server::start();
    mixed_requests(&server);
    server.kill9();
    {
        let db = redb::Database::open(server.data_dir().join("data/kluis.redb")).unwrap();
        let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            // Whatever the stored form, the principal's name is in it as text: change one letter.
            let mut edited = t.get(3).unwrap().unwrap().value().to_vec();
            let name = ["kms-server", "officer", "auditor", "restorer", "sealer", "dev"]
                .into_iter()
                .find_map(|n| edited.windows(n.len()).position(|w| w == n.as_bytes()))
                .expect("no principal found in the stored audit record 3");
            edited[name] = b'x';
            t.insert(3, edited.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    server.restart();
    // The server checks its stored history before it signs a head over it: no export.
    let out = server.kmsctl("auditor", &["audit", "export"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("entry 3 in the store was changed"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("\"head\""), "nothing signed over the changed history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_checkpoints_appear_every_256_entries() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let server = Server::start();
    let pki = server.data_dir().join("pki");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.join("ca.pem")).unwrap()))
        .identity(Identity::from_pem(std::fs::read(pki.join("clients/auditor.pem")).unwrap(), std::fs::read(pki.join("clients/auditor.key")).unwrap()))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let mut admin = kluis_proto::v1::admin_service_client::AdminServiceClient::new(ch);
    for _ in 0..300 {
        admin.list_keyrings(kluis_proto::v1::ListKeyringsRequest {}).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (file, key) = export(&server, dir.path());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("{\"checkpoint\":{\"seq\":256,"), "no checkpoint at 256");
    let out = verify(&file, &key);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 signed checkpoints"), "{}", String::from_utf8_lossy(&out.stdout));
    // A forged checkpoint signature is refused.
    let forged = rewrite(&file, |l| {
        let i = l.iter().position(|x| x.starts_with("{\"checkpoint\"")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&l[i]).unwrap();
        v["checkpoint"]["signature"] = serde_json::Value::String(base64_of(&[7u8; 64]));
        l[i] = v.to_string();
    });
    assert_broken(verify(&forged, &key), "signature of the checkpoint at seq 256");
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn when_the_audit_cannot_be_written_nothing_is_issued() {
    let mut server = Server::start();
    server.env.push(("KLUIS_TEST_FAIL_AUDIT".into(), "1".into()));
    server.restart();
    let out = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", "x"], b"d");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("audit trail cannot be written"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let out = server.kmsctl("officer", &["keyring", "list"]);
    assert!(!out.status.success(), "reads are audited too");
    // Back to normal: nothing was issued while the audit was down.
    server.env.clear();
    server.restart();
    let out = server.kmsctl("officer", &["keyring", "show", "default", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["issued_keys"], 0);
}
