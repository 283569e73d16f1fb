//! Hostile requests stay bounded (issue 15, point 3): a refused request leaves at most a
//! bounded trace in the store and the log, whatever its size; a request over the size
//! cap is refused before it is decoded, with the reason; request text reaches the server
//! log only escaped, so it cannot forge a line or send a terminal escape sequence.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use kluis_proto::v1 as pb;
use kluis_tests::*;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// `kmsctl cert issue` from the dev CA (no grant in the config); returns (cert, key).
fn issue(server: &Server, name: &str) -> (PathBuf, PathBuf) {
    let pki = server.data_dir().join("pki");
    let out_dir = server.dir.path().join("issued");
    let out = kmsctl_offline(&["cert", "issue", "--ca-dir", s(&pki), "--name", name, "--out", s(&out_dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    (out_dir.join(format!("{name}.pem")), out_dir.join(format!("{name}.key")))
}

async fn channel(server: &Server, cert: &Path, key: &Path) -> Channel {
    let ca = std::fs::read(server.data_dir().join("pki/ca.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap()
}

async fn dev_channel(server: &Server, who: &str) -> Channel {
    let dir = server.data_dir().join("pki/clients");
    channel(server, &dir.join(format!("{who}.pem")), &dir.join(format!("{who}.key"))).await
}

/// Sizes of the store's files (the redb file and anything beside it), in bytes.
fn store_bytes(server: &Server) -> u64 {
    fn walk(p: &Path) -> u64 {
        let mut n = 0;
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                if e.file_name() != "pki" && e.file_name() != "clients" {
                    n += walk(&e.path());
                }
            } else {
                n += m.len();
            }
        }
        n
    }
    walk(&server.data_dir())
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
}

fn generate(backup_id: String) -> pb::GenerateDataKeyRequest {
    pb::GenerateDataKeyRequest { keyring: "default".into(), backup_id, labels: Default::default() }
}

/// Ten refused requests from a certificate with no grant (five of almost 4 MiB, five of
/// 48 KiB) add a bounded number of bytes to the store and the log, the small ones are
/// audited with the field cut, its length and its digest, and the export still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_leave_a_bounded_trace_and_the_export_still_works() {
    let server = Server::start();
    let (cert, key) = issue(&server, "stranger");
    let ch = channel(&server, &cert, &key).await;
    let mut keys = pb::key_service_client::KeyServiceClient::new(ch).max_encoding_message_size(usize::MAX);
    // A first refused request, so the store has written its first audit entries.
    let st = keys.generate_data_key(generate("warm-up".into())).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    let (store0, log0) = (store_bytes(&server), server.log().len());

    // Just under tonic's default 4 MiB, of a byte that JSON writes as six.
    let huge = "\u{1}".repeat(4 * 1024 * 1024 - 1024);
    for _ in 0..5 {
        let st = keys.generate_data_key(generate(huge.clone())).await.unwrap_err();
        assert_ne!(st.code(), Code::Ok);
    }
    let small: String = "b".repeat(48 * 1024);
    for _ in 0..5 {
        let st = keys.generate_data_key(generate(small.clone())).await.unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
        assert!(st.message().contains("invalid backup_id") && st.message().contains("at most 256"), "{}", st.message());
        assert!(st.message().len() < 200, "the refusal does not echo the field: {}", st.message().len());
    }

    let grown = store_bytes(&server).saturating_sub(store0);
    let logged = server.log().len().saturating_sub(log0);
    assert!(grown <= 1024 * 1024, "10 refused requests grew the store by {grown} bytes");
    assert!(logged <= 16 * 1024, "10 refused requests added {logged} bytes to the log");

    let out = server.kmsctl("auditor", &["audit", "export"]);
    ok(&out, "kmsctl audit export after refused requests");
    let text = stdout(&out);
    let longest = text.lines().map(str::len).max().unwrap();
    assert!(longest < 2048, "an audit line of {longest} bytes");
    let refused: Vec<&str> = text.lines().filter(|l| l.contains("invalid backup_id")).collect();
    assert_eq!(refused.len(), 5, "each invalid request is audited once: {text}");
    let mark = format!("[{} bytes, sha256 {}]", small.len(), sha256_hex(small.as_bytes()));
    for l in &refused {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["principal"], "stranger", "{l}");
        let b = v["backup_id"].as_str().unwrap();
        assert!(b.starts_with(&"b".repeat(256)) && b.ends_with(&mark), "{b}");
    }
    let export = server.dir.path().join("export.jsonl");
    std::fs::write(&export, &text).unwrap();
    let out = server.kmsctl("auditor", &["audit", "verify", s(&export)]);
    ok(&out, "kmsctl audit verify");
}

/// A request over the size cap is refused before it is decoded, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_cap_is_refused_with_the_reason() {
    let server = Server::start();
    let mut keys = pb::key_service_client::KeyServiceClient::new(dev_channel(&server, "sealer").await);
    // Well under tonic's 4 MiB default, over the KeyService cap.
    let st = keys.generate_data_key(generate("c".repeat(512 * 1024))).await.unwrap_err();
    assert_eq!(st.code(), Code::OutOfRange, "{st:?}");
    assert!(st.message().contains("message length too large") && st.message().contains("limit"), "{}", st.message());
    // A request of the largest allowed field sizes still passes.
    let mut labels = std::collections::HashMap::new();
    for i in 0..32 {
        labels.insert(format!("{i:0>64}"), "v".repeat(256));
    }
    let r = pb::GenerateDataKeyRequest { keyring: "default".into(), backup_id: "d".repeat(256), labels };
    keys.generate_data_key(r).await.unwrap();
    // The cap of the AuditService, as well.
    let mut audit = pb::audit_service_client::AuditServiceClient::new(dev_channel(&server, "auditor").await);
    let st = audit.export_audit(pb::ExportAuditRequest { since: "9".repeat(64 * 1024), tail: 1 }).await.unwrap_err();
    assert_eq!(st.code(), Code::OutOfRange, "{st:?}");
}

/// Request text with a newline and an escape sequence reaches the log only escaped: no
/// forged line, no ESC byte. Checked on the two paths that log request fields: a
/// refused backup id and a refused key id (UnwrapDataKey logs its refusals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_text_cannot_forge_a_log_line() {
    let mut server = Server::start();
    // At info the request's span (its keyring, key id, backup id) is in each log line.
    server.env.push(("KLUIS_LOG".into(), "info".into()));
    server.restart();
    let evil = "x\nFORGED-LINE 2026-01-01T00:00:00Z  WARN kms_server: all good\u{1b}[2J\u{1b}]0;owned\u{7}";
    let mut sealer = pb::key_service_client::KeyServiceClient::new(dev_channel(&server, "sealer").await);
    let st = sealer.generate_data_key(generate(evil.into())).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("invalid backup_id"), "{}", st.message());
    let mut restorer = pb::key_service_client::KeyServiceClient::new(dev_channel(&server, "restorer").await);
    let st = restorer
        .unwrap_data_key(pb::UnwrapDataKeyRequest { key_id: evil.into(), wrapped_key: vec![1; 65], keyring: "default".into() })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("invalid key_id"), "{}", st.message());

    let log = server.log();
    // The log is a file, not a terminal: no colour codes of its own, so no ESC byte at all.
    assert!(!log.contains('\u{1b}') && !log.contains('\u{7}'), "raw escape sequences in the log:\n{log:?}");
    assert!(!log.lines().any(|l| l.starts_with("FORGED-LINE")), "a forged line in the log:\n{log}");
    // Both refusals are in the log, escaped.
    let escaped = "x\\u{a}FORGED-LINE";
    assert!(log.lines().filter(|l| l.contains(escaped)).count() >= 2, "the refusals are logged, escaped:\n{log}");
}
