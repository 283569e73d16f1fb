//! An audit trail no operator can quietly rewrite (issue 15): a store rewritten with the
//! server stopped (entries removed and changed, chain recomputed, checkpoints deleted)
//! is refused at restart, nothing is signed over it and the alarm is counted; an export
//! cut after a checkpoint relabelled as head fails; an export that starts after entry 1
//! is reported as partial, never as the whole trail; a later export is shown to
//! continue an earlier one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kluis_proto::audit::{AuditRecord, ExportLine, GENESIS};
use kluis_tests::*;
use redb::ReadableTableMetadata;

/// `n` audited requests (each one entry), over one connection.
async fn requests(server: &Server, n: usize) {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let pki = server.data_dir().join("pki");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.join("ca.pem")).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(pki.join("clients/auditor.pem")).unwrap(),
            std::fs::read(pki.join("clients/auditor.key")).unwrap(),
        ))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let mut admin = kluis_proto::v1::admin_service_client::AdminServiceClient::new(ch);
    for _ in 0..n {
        admin.list_keyrings(kluis_proto::v1::ListKeyringsRequest {}).await.unwrap();
    }
}

fn export_to(server: &Server, file: &Path) {
    let out = server.kmsctl("auditor", &["audit", "export", "-o", s(file)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "-o writes the file, not standard output");
}

fn pin_key(server: &Server, dir: &Path) -> PathBuf {
    let out = server.kmsctl("auditor", &["audit", "public-key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = dir.join("audit.pub");
    std::fs::write(&key, &out.stdout).unwrap();
    key
}

fn verify(file: &Path, key: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["audit", "verify", s(file), "--public-key", s(key)];
    args.extend_from_slice(extra);
    kmsctl_offline(&args)
}

fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file).unwrap().lines().map(str::to_owned).collect()
}

fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn records(lines: &[String]) -> Vec<AuditRecord> {
    lines
        .iter()
        .filter_map(|l| match serde_json::from_str::<ExportLine>(l).unwrap() {
            ExportLine::Record(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// The rewrite of the issue: entries 10..=19 removed, entry 5 changed, the rest
/// renumbered and the chain recomputed.
fn rewrite(recs: &[AuditRecord]) -> Vec<AuditRecord> {
    let mut out: Vec<AuditRecord> = Vec::new();
    for r in recs.iter().filter(|r| !(10..=19).contains(&r.seq)) {
        let mut r = r.clone();
        if r.seq == 5 {
            r.outcome = "ok (nothing happened here)".into();
        }
        r.seq = out.len() as u64 + 1;
        r.prev = out.last().map_or(GENESIS.to_owned(), |p| p.hash.clone());
        r.hash = r.compute_hash();
        out.push(r);
    }
    out
}

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_rewritten_while_stopped_is_refused_and_nothing_is_signed_over_it() {
    let mut server = Server::start();
    server.set_top_level("metrics_listen = \"127.0.0.1:0\"\n");
    server.restart();
    requests(&server, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let key = pin_key(&server, dir.path());
    let before = dir.path().join("before.jsonl");
    export_to(&server, &before);
    let out = verify(&before, &key, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("audit trail intact: entries 1.."), "{}", stdout(&out));

    // With the server stopped: the audit table rewritten (format 1 JSON rows, still
    // read), the chain recomputed, every checkpoint row deleted.
    server.kill9();
    let forged = rewrite(&records(&lines(&before)));
    {
        let db = redb::Database::open(server.data_dir().join("data/kluis.redb")).unwrap();
        let audit: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");
        let checkpoints: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit_checkpoints");
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(audit).unwrap();
            t.retain(|_, _| false).unwrap();
            for r in &forged {
                t.insert(r.seq, serde_json::to_vec(r).unwrap().as_slice()).unwrap();
            }
            let mut c = txn.open_table(checkpoints).unwrap();
            assert!(c.len().unwrap() >= 1, "the trail had a checkpoint to delete");
            c.retain(|_, _| false).unwrap();
        }
        txn.commit().unwrap();
    }
    server.restart();

    // No export: nothing is signed over the changed history.
    let after = dir.path().join("after.jsonl");
    let out = server.kmsctl("auditor", &["audit", "export", "-o", s(&after)]);
    let err = refused(&out, 5, &["the signed checkpoint at entry 256 is missing from the store"]);
    assert!(!after.exists(), "a refused export leaves no file: {err}");
    let out = server.kmsctl("auditor", &["audit", "export"]);
    refused(&out, 5, &["audit trail does not verify"]);
    assert!(!stdout(&out).contains("\"head\""), "no head signed: {}", stdout(&out));
    assert!(server.log().contains("AUDIT INTEGRITY ALARM"), "{}", server.log());
    let addr = server.metrics_addr.clone().expect("metrics endpoint announced");
    let alarms: u64 = scrape(&addr)
        .lines()
        .find_map(|l| l.strip_prefix("kluis_audit_integrity_alarms_total ").and_then(|v| v.trim().parse().ok()))
        .expect("kluis_audit_integrity_alarms_total");
    assert!(alarms >= 1, "{alarms}");
    // Issuance goes on (the backups must), and is still audited.
    let sealed = seal(&server, "sealer", "default", "after-alarm", b"backup");
    assert!(!sealed.is_empty());

    // The same rewrite in an export file (checkpoint lines dropped, the old head kept):
    // verify with the key pinned before the edit names what is missing.
    let mut forged_lines: Vec<String> = forged.iter().map(|r| serde_json::to_string(&ExportLine::Record(r.clone())).unwrap()).collect();
    forged_lines.push(lines(&before).last().unwrap().clone());
    let forged_file = write_lines(dir.path(), "forged.jsonl", &forged_lines);
    let out = verify(&forged_file, &key, &[]);
    refused(&out, 5, &["audit trail NOT intact", "the signed checkpoint after entry 256 is missing (line 257)"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_and_partial_exports_say_exactly_what_they_prove() {
    let server = Server::start();
    requests(&server, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let key = pin_key(&server, dir.path());
    let first = dir.path().join("first.jsonl");
    export_to(&server, &first);
    let all = lines(&first);

    // Cut right after the checkpoint at 256, that line relabelled as the head.
    let at = all.iter().position(|l| l.starts_with("{\"checkpoint\":{\"seq\":256,")).expect("a checkpoint at 256");
    let mut cut: Vec<String> = all[..=at].to_vec();
    cut[at] = cut[at].replacen("{\"checkpoint\":", "{\"head\":", 1);
    let cut = write_lines(dir.path(), "cut.jsonl", &cut);
    refused(&verify(&cut, &key, &[]), 5, &["audit trail NOT intact", "the signed checkpoint after entry 256 is missing"]);
    // Kept as a checkpoint and a copy relabelled after it: the signature binds its kind.
    let mut cut2: Vec<String> = all[..=at].to_vec();
    cut2.push(all[at].replacen("{\"checkpoint\":", "{\"head\":", 1));
    let cut2 = write_lines(dir.path(), "cut2.jsonl", &cut2);
    refused(&verify(&cut2, &key, &[]), 5, &["the signature of the head at seq 256", "is not valid"]);

    // The first ten entries cut off: verified only as what it is.
    let partial = write_lines(dir.path(), "partial.jsonl", &all[10..]);
    let out = verify(&partial, &key, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("entries 11..") && said.contains("entries before 11 not checked"), "{said}");
    assert!(!said.contains("intact"), "a partial export is never the whole, intact trail: {said}");

    // A later export continues the earlier one (and proves the whole trail with it).
    requests(&server, 5).await;
    let second = dir.path().join("second.jsonl");
    export_to(&server, &second);
    let out = verify(&second, &key, &["--since-head", s(&first)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let head_seq = records(&all).last().unwrap().seq;
    assert!(stdout(&out).contains(&format!("entries 1..{head_seq} by the earlier export")), "{}", stdout(&out));
    // A partial later export that covers the earlier head continues it too...
    let later_part = write_lines(dir.path(), "later-part.jsonl", &lines(&second)[200..]);
    let out = verify(&later_part, &key, &["--since-head", s(&first)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("audit trail intact: entries 1.."), "{}", stdout(&out));
    // ...but one that does not reach back to it cannot show it.
    let after_head = lines(&second).iter().position(|l| l.starts_with(&format!("{{\"seq\":{},", head_seq + 1))).unwrap();
    let late = write_lines(dir.path(), "late.jsonl", &lines(&second)[after_head..]);
    refused(&verify(&late, &key, &["--since-head", s(&first)]), 5, &["cannot show that it continues the earlier one"]);
    // And an earlier export that is not one is named.
    refused(&verify(&second, &key, &["--since-head", s(&cut)]), 5, &["the earlier export", "checkpoint after entry 256 is missing"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anchors_outside_the_server_catch_a_cut_trail_the_server_signs_again() {
    let mut server = Server::start();
    let anchors = server.dir.path().join("elsewhere/kluis.anchors");
    std::fs::create_dir_all(anchors.parent().unwrap()).unwrap();
    let cfg = server.data_dir().join("server.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\n[audit]\nanchors = [\"file:{}\"]\n", anchors.display())).unwrap();
    server.restart();
    requests(&server, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let key = pin_key(&server, dir.path());
    let first = dir.path().join("first.jsonl");
    export_to(&server, &first);
    // The committed checkpoint and the export's head, one line each, as in the export.
    let anchored = lines(&anchors);
    let all = lines(&first);
    assert_eq!(anchored.len(), 2, "{anchored:?}");
    assert!(anchored[0].starts_with("{\"checkpoint\":{\"seq\":256,") && all.contains(&anchored[0]), "{anchored:?}");
    assert_eq!(&anchored[1], all.last().unwrap());
    let out = verify(&first, &key, &["--anchors", s(&anchors)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("2 anchored checkpoints/heads match"), "{}", stdout(&out));

    // With the server stopped, the entries after the checkpoint are cut off. The stored
    // history is consistent, so the server signs a new head over it...
    server.kill9();
    {
        let db = redb::Database::open(server.data_dir().join("data/kluis.redb")).unwrap();
        let audit: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");
        let txn = db.begin_write().unwrap();
        txn.open_table(audit).unwrap().retain(|seq, _| seq <= 280).unwrap();
        txn.commit().unwrap();
    }
    server.restart();
    let second = dir.path().join("second.jsonl");
    export_to(&server, &second);
    assert!(verify(&second, &key, &[]).status.success(), "the export alone cannot tell");
    // ...but not over what the anchors kept elsewhere.
    refused(&verify(&second, &key, &["--anchors", s(&anchors)]), 5, &["audit trail NOT intact", "anchor"]);
    // A bad anchors file is named.
    let junk = write_lines(dir.path(), "junk.anchors", &["{\"head\":{\"seq\":1}}".to_owned()]);
    refused(&verify(&first, &key, &["--anchors", s(&junk)]), 5, &["junk.anchors", "anchors line 1"]);
}
