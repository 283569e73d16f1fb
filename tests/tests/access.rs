//! Access control end to end: every RPC x every role, revocation without restart,
//! expired certificates, identities from a SAN.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use base64::Engine;
use kluis_proto::v1 as pb;
use kluis_tests::*;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// `kmsctl cert issue` from the dev CA; returns (cert, key).
fn issue(server: &Server, name: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    let pki = server.data_dir().join("pki");
    let out_dir = server.dir.path().join("issued");
    let mut args = vec!["cert", "issue", "--ca-dir", pki.to_str().unwrap(), "--name", name, "--out", out_dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = kmsctl_offline(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    (out_dir.join(format!("{name}.pem")), out_dir.join(format!("{name}.key")))
}

/// A client config for an issued certificate, next to the dev ones.
fn client_config(server: &Server, name: &str, cert: &Path, key: &Path) -> PathBuf {
    let text = std::fs::read_to_string(server.client("sealer")).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("cert =") {
                format!("cert = {:?}", cert.to_str().unwrap())
            } else if l.starts_with("key =") {
                format!("key = {:?}", key.to_str().unwrap())
            } else {
                l.to_owned()
            }
        })
        .collect();
    let p = server.dir.path().join(format!("{name}.toml"));
    std::fs::write(&p, text.join("\n")).unwrap();
    p
}

/// Appends to the dev server's config and restarts it (new port; dev configs rewritten).
fn reconfigure(server: &mut Server, extra_toml: &str) {
    let cfg = server.data_dir().join("server.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(extra_toml);
    std::fs::write(&cfg, text).unwrap();
    server.restart();
}

fn seal_with(cfg: &Path) -> std::process::Output {
    backup_hook(cfg, &["seal", "--keyring", "default", "--backup-id", "x"], b"data")
}

fn fingerprint(cert_pem: &Path) -> String {
    let pem = std::fs::read_to_string(cert_pem).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &der))
}

#[test]
fn revoked_certificate_is_refused_after_the_list_changes_without_restart() {
    let mut server = Server::start();
    let (cert, key) = issue(&server, "host9", &[]);
    let revoked = server.dir.path().join("revoked.txt");
    std::fs::write(&revoked, "# revoked client certificates\n").unwrap();
    reconfigure(
        &mut server,
        &format!(
            "\n[auth]\nrevoked = {:?}\n\n[[grant]]\nprincipal = \"host9\"\nroles = [\"sealer\"]\nkeyrings = [\"default\"]\n",
            revoked.to_str().unwrap()
        ),
    );
    let cfg = client_config(&server, "host9", &cert, &key);
    let out = seal_with(&cfg);
    assert!(out.status.success(), "{}", stderr(&out));
    let addr = server.addr.clone();

    std::fs::write(&revoked, format!("# revoked client certificates\n{}  # host9, stolen laptop\n", fingerprint(&cert))).unwrap();
    let out = seal_with(&cfg);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("\"host9\"") && stderr(&out).contains("is revoked"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    // Other identities are unaffected, and it is the same server process.
    assert!(seal_with(&server.client("sealer")).status.success());
    assert_eq!(server.addr, addr);

    std::fs::write(&revoked, "# revoked client certificates\n").unwrap();
    assert!(seal_with(&cfg).status.success(), "un-revoked without restart");
}

#[test]
fn malformed_revocation_list_refuses_the_start() {
    let mut server = Server::start();
    server.kill9();
    let revoked = server.dir.path().join("revoked.txt");
    std::fs::write(&revoked, "not-a-fingerprint\n").unwrap();
    let cfg = server.data_dir().join("server.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("\n[auth]\nrevoked = {:?}\n", revoked.to_str().unwrap()));
    std::fs::write(&cfg, text).unwrap();
    let out = std::process::Command::new(bin("kms-server")).args(["serve", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("revoked.txt, line 1"), "{err}");
}

#[test]
fn expired_and_not_yet_valid_certificates_are_refused() {
    let mut server = Server::start();
    reconfigure(&mut server, "\n[[grant]]\nprincipal = \"old\"\nroles = [\"sealer\"]\nkeyrings = [\"*\"]\n\n[[grant]]\nprincipal = \"future\"\nroles = [\"sealer\"]\nkeyrings = [\"*\"]\n");
    let (cert, key) = issue(&server, "old", &["--not-before", "2020-01-01T00:00:00Z", "--not-after", "2021-01-01T00:00:00Z"]);
    let out = seal_with(&client_config(&server, "old", &cert, &key));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let (cert, key) = issue(&server, "future", &["--not-before", "2099-01-01T00:00:00Z", "--not-after", "2100-01-01T00:00:00Z"]);
    let out = seal_with(&client_config(&server, "future", &cert, &key));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));
    // Control: the same CA and grant with a current certificate works.
    let (cert, key) = issue(&server, "old-renewed", &[]);
    reconfigure(&mut server, "\n[[grant]]\nprincipal = \"old-renewed\"\nroles = [\"sealer\"]\nkeyrings = [\"*\"]\n");
    assert!(seal_with(&client_config(&server, "old-renewed", &cert, &key)).status.success());
}

#[test]
fn identity_from_a_san_uri_when_configured() {
    let mut server = Server::start();
    reconfigure(
        &mut server,
        "\n[auth]\nidentity = \"san-uri\"\n\n[[grant]]\nprincipal = \"spiffe://clinic/backup01\"\nroles = [\"sealer\"]\nkeyrings = [\"default\"]\n",
    );
    // The CN is "sealer" (which has a grant), but the server now reads the URI SAN.
    let (cert, key) = issue(&server, "sealer", &["--san-uri", "spiffe://clinic/backup01"]);
    let out = seal_with(&client_config(&server, "sealer-san", &cert, &key));
    assert!(out.status.success(), "{}", stderr(&out));
    // A certificate without a URI SAN has no identity at all here.
    let out = seal_with(&server.client("sealer"));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("no URI subject alternative name"), "{}", stderr(&out));
}

async fn channel(server: &Server, cert: &Path, key: &Path) -> Channel {
    let ca = std::fs::read(server.data_dir().join("pki/ca.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Rpc {
    Generate,
    Unwrap,
    CreateKeyring,
    ListKeyrings,
    GetKeyring,
    InstallEscrow,
    EscrowStatus,
    Rotate,
    ChangeGrant,
    ListGrants,
    RecordRestoreTest,
    ExportAudit,
    AuditPublicKey,
    Retire,
    Approve,
    ListApprovals,
    Rewrap,
    MarkEscrowed,
    RemoveEscrow,
    SetKeyringPolicy,
    GetDataKey,
    FindDataKeys,
    DestroyKey,
    DestroyKeyring,
    SetLegalHold,
    CancelDestruction,
    ListDestructions,
    RotateMaster,
    GetReport,
}

const ALL: [Rpc; 29] = [
    Rpc::Generate,
    Rpc::Unwrap,
    Rpc::CreateKeyring,
    Rpc::ListKeyrings,
    Rpc::GetKeyring,
    Rpc::InstallEscrow,
    Rpc::EscrowStatus,
    Rpc::Rotate,
    Rpc::ChangeGrant,
    Rpc::ListGrants,
    Rpc::RecordRestoreTest,
    Rpc::ExportAudit,
    Rpc::AuditPublicKey,
    Rpc::Retire,
    Rpc::Approve,
    Rpc::ListApprovals,
    Rpc::Rewrap,
    // The escrow is in force (installed before the table).
    Rpc::MarkEscrowed,
    Rpc::RemoveEscrow,
    Rpc::SetKeyringPolicy,
    Rpc::GetDataKey,
    Rpc::FindDataKeys,
    Rpc::DestroyKey,
    Rpc::DestroyKeyring,
    // After the destroy requests: a hold would refuse them.
    Rpc::SetLegalHold,
    Rpc::CancelDestruction,
    Rpc::ListDestructions,
    Rpc::RotateMaster,
    Rpc::GetReport,
];

/// The expected answer of each cell: who may call what on keyring `default`.
fn allowed(who: &str, rpc: Rpc) -> bool {
    use Rpc::*;
    match who {
        "dev" => true,
        "sealer" => rpc == Generate,
        "restorer" => matches!(rpc, Unwrap | RecordRestoreTest | Rewrap | MarkEscrowed),
        "officer" => !matches!(rpc, Generate | Unwrap | RecordRestoreTest | Rewrap | MarkEscrowed),
        "auditor" => matches!(
            rpc,
            ListKeyrings
                | GetKeyring
                | EscrowStatus
                | ListGrants
                | ExportAudit
                | AuditPublicKey
                | ListApprovals
                | GetDataKey
                | FindDataKeys
                | ListDestructions
                | GetReport
        ),
        // Sealer and restorer, but only on keyring `pacs`.
        "pacs-only" => false,
        // Valid certificate from the right CA, but no grant at all.
        "stranger" => false,
        _ => unreachable!(),
    }
}

struct Fixture {
    key_id: String,
    wrapped: Vec<u8>,
    manifest_json: String,
    /// The manifest's recovery recipient.
    recovery_recipient: String,
    /// The two officers (`officer`, `dev`): whichever did not make a request approves it.
    approvers: Vec<Channel>,
}

/// Approves a pending dual-control request (if any) as the officer who did not make it.
async fn approve_pending(f: &Fixture, pending: Option<pb::Approval>) -> Result<(), tonic::Status> {
    let Some(a) = pending else { return Ok(()) };
    for ch in &f.approvers {
        match pb::admin_service_client::AdminServiceClient::new(ch.clone()).approve(pb::ApproveRequest { id: a.id }).await {
            Ok(_) => return Ok(()),
            Err(st) if st.code() == Code::PermissionDenied => continue,
            Err(st) => return Err(st),
        }
    }
    Err(tonic::Status::internal(format!("no second officer approved request {}", a.id)))
}

async fn call(ch: Channel, rpc: Rpc, f: &Fixture, n: usize) -> Result<(), tonic::Status> {
    let mut keys = pb::key_service_client::KeyServiceClient::new(ch.clone());
    let mut admin = pb::admin_service_client::AdminServiceClient::new(ch.clone());
    let mut audit = pb::audit_service_client::AuditServiceClient::new(ch);
    match rpc {
        Rpc::Generate => keys
            .generate_data_key(pb::GenerateDataKeyRequest { keyring: "default".into(), backup_id: format!("table-{n}"), labels: Default::default() })
            .await
            .map(drop),
        Rpc::Unwrap => keys
            .unwrap_data_key(pb::UnwrapDataKeyRequest { key_id: f.key_id.clone(), wrapped_key: f.wrapped.clone(), keyring: "default".into() })
            .await
            .map(drop),
        Rpc::CreateKeyring => admin
            .create_keyring(pb::CreateKeyringRequest { name: format!("ring-{n}"), retention_days: 0, rotation_period_days: 0 })
            .await
            .map(drop),
        Rpc::ListKeyrings => admin.list_keyrings(pb::ListKeyringsRequest {}).await.map(drop),
        Rpc::GetKeyring => admin.get_keyring(pb::GetKeyringRequest { name: "default".into() }).await.map(drop),
        // The first install is dual control: approved, so that the escrow is in force.
        Rpc::InstallEscrow => {
            let r = admin
                .install_escrow(pb::InstallEscrowRequest { manifest_json: f.manifest_json.clone(), allow_new_recipient: false })
                .await?;
            approve_pending(f, r.into_inner().pending).await
        }
        Rpc::EscrowStatus => admin.get_escrow_status(pb::GetEscrowStatusRequest {}).await.map(drop),
        Rpc::Rotate => admin.rotate_keyring(pb::RotateKeyringRequest { name: "default".into() }).await.map(drop),
        Rpc::ChangeGrant => admin
            .change_grant(pb::ChangeGrantRequest { keyring: "default".into(), principal: format!("p{n}"), role: "auditor".into(), grant: true })
            .await
            .map(drop),
        Rpc::ListGrants => admin.list_grants(pb::ListGrantsRequest { keyring: "default".into() }).await.map(drop),
        Rpc::RecordRestoreTest => keys
            .record_restore_test(pb::RecordRestoreTestRequest {
                keyring: "default".into(),
                key_id: f.key_id.clone(),
                ok: true,
                host: "table".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::ExportAudit => audit.export_audit(pb::ExportAuditRequest { since: String::new(), tail: 5 }).await.map(drop),
        Rpc::AuditPublicKey => audit.get_audit_public_key(pb::GetAuditPublicKeyRequest {}).await.map(drop),
        // Versions below 2 exist once an officer has rotated (Rotate runs earlier in ALL).
        Rpc::Retire => admin
            .retire_keyring_versions(pb::RetireKeyringVersionsRequest { keyring: "default".into(), below_version: 2, force: true })
            .await
            .map(drop),
        // An id that does not exist: an authorized caller gets NOT_FOUND, past the policy.
        Rpc::Approve => match admin.approve(pb::ApproveRequest { id: 999_999 }).await {
            Err(s) if s.code() == Code::NotFound => Ok(()),
            other => other.map(drop),
        },
        Rpc::ListApprovals => admin.list_approvals(pb::ListApprovalsRequest {}).await.map(drop),
        Rpc::Rewrap => keys
            .rewrap_data_key(pb::RewrapDataKeyRequest { key_id: f.key_id.clone(), wrapped_key: f.wrapped.clone(), keyring: "default".into() })
            .await
            .map(drop),
        Rpc::MarkEscrowed => keys
            .mark_data_key_escrowed(pb::MarkDataKeyEscrowedRequest {
                key_id: f.key_id.clone(),
                wrapped_key: f.wrapped.clone(),
                keyring: "default".into(),
                recovery_recipient: f.recovery_recipient.clone(),
            })
            .await
            .map(drop),
        // Escrow is in force (InstallEscrow runs earlier): each request waits for approval.
        Rpc::RemoveEscrow => admin.remove_escrow(pb::RemoveEscrowRequest {}).await.map(drop),
        Rpc::SetKeyringPolicy => admin
            .set_keyring_policy(pb::SetKeyringPolicyRequest { name: "default".into(), retention_days: None, rotation_period_days: Some(0) })
            .await
            .map(drop),
        Rpc::GetDataKey => admin.get_data_key(pb::GetDataKeyRequest { key_id: f.key_id.clone() }).await.map(drop),
        // On keyring `default`, as the table is; without a keyring the answer is filtered
        // to the caller's keyrings (tests/tests/key_lookup.rs).
        Rpc::FindDataKeys => admin
            .find_data_keys(pb::FindDataKeysRequest { backup_id: "fixture".into(), keyring: "default".into() })
            .await
            .map(drop),
        // The key does not expire: the answer is a pending approval, nothing is destroyed.
        Rpc::DestroyKey => admin.destroy_key(pb::DestroyKeyRequest { key_id: f.key_id.clone() }).await.map(drop),
        Rpc::DestroyKeyring => admin.destroy_keyring(pb::DestroyKeyringRequest { name: "default".into() }).await.map(drop),
        // Placed and released (dual control: approved), so that the next identity's
        // destroy requests are not held.
        Rpc::SetLegalHold => {
            admin.set_legal_hold(pb::SetLegalHoldRequest { keyring: "default".into(), hold: true, reason: format!("case {n}") }).await?;
            let r = admin.set_legal_hold(pb::SetLegalHoldRequest { keyring: "default".into(), hold: false, reason: String::new() }).await?;
            approve_pending(f, r.into_inner().pending).await
        }
        Rpc::CancelDestruction => match admin.cancel_destruction(pb::CancelDestructionRequest { id: 999_999 }).await {
            Err(s) if s.code() == Code::NotFound => Ok(()),
            other => other.map(drop),
        },
        Rpc::ListDestructions => admin.list_destructions(pb::ListDestructionsRequest {}).await.map(drop),
        Rpc::RotateMaster => admin.rotate_master(pb::RotateMasterRequest {}).await.map(drop),
        Rpc::GetReport => admin.get_report(pb::GetReportRequest { since: String::new() }).await.map(drop),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_by_every_role_matches_the_table() {
    let mut server = Server::start();
    reconfigure(&mut server, "\n[[grant]]\nprincipal = \"pacs-only\"\nroles = [\"sealer\", \"restorer\"]\nkeyrings = [\"pacs\"]\n");
    let out = server.kmsctl("officer", &["keyring", "create", "pacs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A key to unwrap, and a real escrow manifest to install.
    let dev_pki = server.data_dir().join("pki/clients");
    let dev = channel(&server, &dev_pki.join("dev.pem"), &dev_pki.join("dev.key")).await;
    let officer = channel(&server, &dev_pki.join("officer.pem"), &dev_pki.join("officer.key")).await;
    let issued = pb::key_service_client::KeyServiceClient::new(dev.clone())
        .generate_data_key(pb::GenerateDataKeyRequest { keyring: "default".into(), backup_id: "fixture".into(), labels: Default::default() })
        .await
        .unwrap()
        .into_inner();
    let ceremony = server.dir.path().join("ceremony");
    let (a, b) = (age::x25519::Identity::generate(), age::x25519::Identity::generate());
    let out = kmsctl_offline(&["escrow", "ceremony", "--threshold", "2", "--custodian", &format!("a={}", a.to_public()), "--custodian", &format!("b={}", b.to_public()), "--out", s(&ceremony)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest_json = std::fs::read_to_string(ceremony.join("manifest.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&manifest_json).unwrap();
    let fixture = Fixture {
        key_id: issued.key_id.clone(),
        wrapped: issued.wrapped_key.clone(),
        recovery_recipient: manifest["recovery_recipient"].as_str().unwrap().to_owned(),
        manifest_json,
        approvers: vec![officer.clone(), dev],
    };
    // The escrow is in force before the table: MarkEscrowed needs it for the restorer,
    // who comes before the officers (the table's InstallEscrow installs the same again).
    call(officer, Rpc::InstallEscrow, &fixture, 0).await.unwrap();

    let mut identities: Vec<(&str, PathBuf, PathBuf)> = ["sealer", "restorer", "officer", "auditor", "dev"]
        .iter()
        .map(|n| (*n, dev_pki.join(format!("{n}.pem")), dev_pki.join(format!("{n}.key"))))
        .collect();
    for n in ["pacs-only", "stranger"] {
        let (c, k) = issue(&server, n, &[]);
        identities.push((n, c, k));
    }

    let mut n = 0;
    let mut cells = 0;
    for (who, cert, key) in &identities {
        let ch = channel(&server, cert, key).await;
        for rpc in ALL {
            n += 1;
            cells += 1;
            let got = call(ch.clone(), rpc, &fixture, n).await;
            if allowed(who, rpc) {
                assert!(got.is_ok(), "{who} x {rpc:?} should be allowed: {got:?}");
            } else {
                let st = got.expect_err(&format!("{who} x {rpc:?} must be refused"));
                assert_eq!(st.code(), Code::PermissionDenied, "{who} x {rpc:?}: {st:?}");
                assert!(st.message().contains(&format!("principal {who:?} may not")), "{who} x {rpc:?}: {}", st.message());
                assert!(!st.message().contains(&hex::encode(&fixture.wrapped)), "no key bytes in refusals");
            }
        }
    }
    assert_eq!(cells, 7 * ALL.len());
    // The role on another keyring works there.
    let (_, c, k) = identities.iter().find(|(w, _, _)| *w == "pacs-only").unwrap();
    let ch = channel(&server, c, k).await;
    let on_pacs = pb::key_service_client::KeyServiceClient::new(ch)
        .generate_data_key(pb::GenerateDataKeyRequest { keyring: "pacs".into(), backup_id: "p".into(), labels: Default::default() })
        .await;
    assert!(on_pacs.is_ok(), "{on_pacs:?}");
}

#[test]
fn officer_grants_and_revokes_at_run_time_stored_and_audited() {
    let mut server = Server::start();
    assert!(server.kmsctl("officer", &["keyring", "create", "ehr-db"]).status.success());
    let (cert, key) = issue(&server, "backup02", &[]);
    let cfg = client_config(&server, "backup02", &cert, &key);
    let seal_ehr = |cfg: &Path| backup_hook(cfg, &["seal", "--keyring", "ehr-db", "--backup-id", "e"], b"d");
    assert_eq!(seal_ehr(&cfg).status.code(), Some(4), "no grant yet");

    // A sealer cannot grant itself anything.
    let out = server.kmsctl("sealer", &["keyring", "grant", "ehr-db", "--principal", "sealer", "--role", "restorer"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    let out = server.kmsctl("officer", &["keyring", "grant", "ehr-db", "--principal", "backup02", "--role", "sealer"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(seal_ehr(&cfg).status.code(), Some(4), "a grant waits for a second officer");
    let out = server.kmsctl("dev", &["approve", &approval_id(&out)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(seal_ehr(&cfg).status.success(), "granted at run time");
    // Only on that keyring, and only that role.
    let out = backup_hook(&cfg, &["seal", "--keyring", "default", "--backup-id", "e"], b"d");
    assert_eq!(out.status.code(), Some(4));
    let out = server.kmsctl("officer", &["keyring", "grants", "ehr-db", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.as_array().unwrap().iter().any(|g| g["principal"] == "backup02" && g["role"] == "sealer" && g["source"] == "runtime"), "{v}");
    let out = server.kmsctl("officer", &["keyring", "grant", "ehr-db", "--principal", "backup02", "--role", "janitor"]);
    assert!(stderr(&out).contains("invalid role"), "{}", stderr(&out));

    // Stored: survives a restart.
    server.restart();
    let cfg = client_config(&server, "backup02-2", &cert, &key);
    assert!(seal_ehr(&cfg).status.success(), "the grant was not stored");
    let out = server.kmsctl("officer", &["keyring", "revoke", "ehr-db", "--principal", "backup02", "--role", "sealer"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(seal_ehr(&cfg).status.code(), Some(4), "revoked at run time");
    let out = server.kmsctl("officer", &["keyring", "revoke", "ehr-db", "--principal", "backup02", "--role", "sealer"]);
    assert!(stderr(&out).contains("has no runtime grant"), "{}", stderr(&out));

    // Audited.
    let out = server.kmsctl("auditor", &["audit", "export"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for outcome in ["ok: pending approval 1: grant sealer on keyring ehr-db to backup02", "ok: revoked sealer backup02"] {
        assert!(text.lines().any(|l| l.contains("\"action\":\"ChangeGrant\"") && l.contains(outcome)), "{outcome}: {text}");
    }
    assert!(text.lines().any(|l| l.contains("ChangeGrant") && l.contains("\"principal\":\"sealer\"") && l.contains("denied")));
}
