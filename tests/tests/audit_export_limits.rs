//! `[audit] max_concurrent_exports`: with the cap at N, N exports that are held open keep
//! their places, the next one is refused with AUDIT_EXPORT_BUSY (kmsctl exit 3, nothing
//! written), and once a held export has been read to its end a new export runs and verifies.
//!
//! How an export is held, without timing: the server holds an export's permit in the task
//! that reads the store and hands lines to the response stream; that task ends only when its
//! last line is queued. The trail here is several times larger than everything that can be
//! in flight between that task and a `kmsctl audit export` whose stdout nobody reads (the
//! stdout pipe, the client's HTTP/2 stream window, the server's send buffer and its line
//! queue), so the task blocks on the full queue and keeps the permit. The first line on
//! kmsctl's stdout shows that the server took the export (the permit is taken before the
//! response starts). Reading such an export to its end lets the task finish; kmsctl exits
//! only after the stream's end, which the server sends only after the task has returned its
//! permit, so the next export cannot race the release.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kluis_proto::audit::ExportLine;
use kluis_proto::error::{Reason, reason_of};
use kluis_proto::v1 as pb;
use kluis_tests::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The cap under test.
const CAP: usize = 2;
/// Issued keys that fill the trail: with 256-byte backup ids each record's line is about
/// 600 bytes, so the export is about 11 MB, four times what can be in flight (the client's
/// default HTTP/2 stream window is 2 MiB).
const ENTRIES: usize = 18_000;

/// Restarts `server` with `[audit] max_concurrent_exports = cap`.
fn with_export_cap(server: &mut Server, cap: usize) {
    let cfg = server.data_dir().join("server.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(!text.contains("[audit]"), "the dev config has no [audit] table yet:\n{text}");
    std::fs::write(&cfg, format!("{text}\n[audit]\nmax_concurrent_exports = {cap}\n")).unwrap();
    server.restart();
}

async fn channel(server: &Server, who: &str) -> Channel {
    let pki = server.data_dir().join("pki");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.join("ca.pem")).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(pki.join(format!("clients/{who}.pem"))).unwrap(),
            std::fs::read(pki.join(format!("clients/{who}.key"))).unwrap(),
        ))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap()
}

/// Issues `n` data keys (each one audit entry) over real mTLS, 64 requests in flight.
fn fill(server: &Server, n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ch = channel(server, "sealer").await;
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (mut keys, next) = (pb::key_service_client::KeyServiceClient::new(ch.clone()), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    // The longest backup id the server takes (256 bytes), so each entry is large.
                    let backup_id = format!("{i:08}-{}", "x".repeat(247));
                    let req = pb::GenerateDataKeyRequest { keyring: "default".into(), backup_id, labels: Default::default() };
                    keys.generate_data_key(req).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// The status of an export request made with the typed gRPC client (as the auditor): the
/// error status when refused; a started export is read to its end and gives OK.
fn export_status(server: &Server) -> tonic::Status {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut audit = pb::audit_service_client::AuditServiceClient::new(channel(server, "auditor").await);
        let mut stream = match audit.export_audit(pb::ExportAuditRequest { since: String::new(), tail: 0 }).await {
            Ok(r) => r.into_inner(),
            Err(st) => return st,
        };
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return tonic::Status::ok(""),
                Err(st) => return st,
            }
        }
    })
}

/// A `kmsctl audit export` to a stdout pipe that is not read beyond its first line.
struct HeldExport {
    child: Child,
    out: BufReader<ChildStdout>,
    first: String,
}

impl HeldExport {
    /// Starts the export and returns once its first line arrived (the server took it).
    fn start(server: &Server) -> Self {
        let mut child = Command::new(bin("kmsctl"))
            .arg("--client-config")
            .arg(server.client("auditor"))
            .args(["audit", "export"])
            .env_remove("KLUIS_CLIENT_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        if first.is_empty() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("kmsctl audit export ended without a line ({}): {err}", child.wait().unwrap());
        }
        match serde_json::from_str::<ExportLine>(&first).unwrap() {
            ExportLine::Record(r) => assert_eq!(r.seq, 1, "an export starts at entry 1: {first}"),
            other => panic!("an export starts with a record, not {other:?}"),
        }
        Self { child, out, first }
    }

    /// Reads the rest of the export and waits for kmsctl to exit.
    fn read_to_end(mut self) -> Output {
        let mut stdout = self.first.into_bytes();
        self.out.read_to_end(&mut stdout).unwrap();
        let mut stderr = Vec::new();
        self.child.stderr.take().unwrap().read_to_end(&mut stderr).unwrap();
        let status = self.child.wait().unwrap();
        Output { status, stdout, stderr }
    }
}

/// `kmsctl audit verify FILE --public-key KEY` (offline); asserts the whole trail verified.
fn verify_whole(file: &Path, key: &Path) {
    let out = kmsctl_offline(&["audit", "verify", s(file), "--public-key", s(key)]);
    ok(&out, "audit verify");
    assert!(stdout(&out).contains("audit trail intact: entries 1.."), "{}", stdout(&out));
}

fn lines(file: &Path) -> Vec<ExportLine> {
    std::fs::read_to_string(file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn exports_over_the_cap_are_refused_busy_until_a_held_one_has_been_read() {
    let mut server = Server::start();
    with_export_cap(&mut server, CAP);
    fill(&server, ENTRIES);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.pub");
    let out = server.kmsctl("auditor", &["audit", "public-key"]);
    ok(&out, "audit public-key");
    std::fs::write(&key, &out.stdout).unwrap();

    // CAP exports taken by the server and held open by readers that do not read.
    let mut held: Vec<HeldExport> = (0..CAP).map(|_| HeldExport::start(&server)).collect();

    // One more is refused: on the wire RESOURCE_EXHAUSTED with the reason AUDIT_EXPORT_BUSY,
    // for kmsctl "retry later" (exit 3), to stdout and to a file.
    let st = export_status(&server);
    assert_eq!((st.code(), reason_of(&st)), (tonic::Code::ResourceExhausted, Some(Reason::AuditExportBusy)), "{st:?}");
    let out = server.kmsctl("auditor", &["audit", "export"]);
    refused_one_line(&out, 3, &["too many audit exports are running at once"]);
    let refused_file = dir.path().join("refused.jsonl");
    let out = server.kmsctl("auditor", &["audit", "export", "-o", s(&refused_file)]);
    refused_one_line(&out, 3, &["too many audit exports are running at once"]);
    assert!(!refused_file.exists(), "a refused export leaves no file");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, [std::ffi::OsString::from("audit.pub")], "nothing half-written");

    // The first held export read to its end: complete, and it verifies.
    let first = held.remove(0).read_to_end();
    ok(&first, "the held export, read to its end");
    let first_file = dir.path().join("held.jsonl");
    std::fs::write(&first_file, &first.stdout).unwrap();
    verify_whole(&first_file, &key);
    let records = lines(&first_file).iter().filter(|l| matches!(l, ExportLine::Record(_))).count();
    assert!(records > ENTRIES, "the held export has the whole trail: {records} records");

    // Its place is free again: a new export runs, and it verifies.
    let next_file = dir.path().join("next.jsonl");
    ok(&server.kmsctl("auditor", &["audit", "export", "-o", s(&next_file)]), "export after one was read");
    verify_whole(&next_file, &key);
    // The two refusals are in the trail, with their reason.
    let busy: Vec<_> = lines(&next_file)
        .into_iter()
        .filter_map(|l| match l {
            ExportLine::Record(r) if r.action == "ExportAudit" && r.outcome.contains("too many audit exports") => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(busy.len(), 3, "the refused exports are audited");
    assert!(busy.iter().all(|r| r.principal == "auditor" && r.outcome.starts_with("failed")), "{busy:?}");

    // The export still held all along is whole too.
    let second = held.remove(0).read_to_end();
    ok(&second, "the other held export, read to its end");
    let second_file = dir.path().join("held2.jsonl");
    std::fs::write(&second_file, &second.stdout).unwrap();
    verify_whole(&second_file, &key);
}
