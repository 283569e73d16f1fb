//! What a failure tells the caller: the reason on every error status, the exit code
//! both CLIs derive from it (one table), and a lost connection told apart from a
//! refusal.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use base64::Engine;
use kluis_proto::error::{Reason, reason_of};
use kluis_proto::v1 as pb;
use kluis_tests::*;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The client config of dev identity `who`, with one line changed.
fn config_with(server: &Server, who: &str, file: &str, change: impl Fn(&str) -> Option<String>) -> PathBuf {
    let text = std::fs::read_to_string(server.client(who)).unwrap();
    let text: Vec<String> = text.lines().map(|l| change(l).unwrap_or_else(|| l.to_owned())).collect();
    let p = server.dir.path().join(file);
    std::fs::write(&p, text.join("\n") + "\n").unwrap();
    p
}

/// (a) A server that took the connection and the TLS handshake and then died with the
/// request in flight is "unavailable, retry later" (exit 3), not a refusal (exit 4,
/// which tells a backup wrapper not to retry).
#[test]
fn a_server_killed_with_a_seal_request_in_flight_means_retry_later() {
    let mut server = Server::start();
    let proxy = KillingProxy::start(&server.addr, server.pid(), AfterKill::Close);
    // No retrying here: this is about the one failure (retry.rs rides the restart out).
    let cfg = proxy.client_config(&server, "sealer", "via-proxy.toml", "[retry]\ndeadline_secs = 0\n");
    let out = backup_hook(&cfg, &["seal", "--keyring", "default", "--backup-id", "in-flight"], b"nightly dump");
    assert!(proxy.killed(), "the proxy never saw the request, so the server was not killed: {}", stderr(&out));
    let err = refused_one_line(&out, 3, &["unavailable", "retry later"]);
    assert!(!err.contains("refused") && !err.contains("certificate"), "a lost connection must not read as a refusal: {err}");

    // And retrying later is right: once the server is back, the same seal works.
    server.restart();
    let sealed = seal(&server, "sealer", "default", "in-flight", b"nightly dump");
    assert_eq!(stdout(&unseal(&server, "restorer", &sealed)), "nightly dump");
}

/// (b) The other side of the same line: a TLS alert is a refusal. Here the client
/// does not trust the server's certificate (its CA is another server's).
#[test]
fn a_server_certificate_this_client_does_not_trust_is_refused() {
    let server = Server::start();
    let other = Server::start();
    let other_ca = other.data_dir().join("pki/ca.pem");
    let cfg = config_with(&server, "sealer", "wrong-ca.toml", |l| l.starts_with("ca =").then(|| format!("ca = {:?}", s(&other_ca))));
    let out = backup_hook(&cfg, &["seal", "--keyring", "default", "--backup-id", "x"], b"data");
    refused_one_line(&out, 4, &["does not trust", "server_name"]);
    let out = kmsctl(&cfg, &["keyring", "list"]);
    refused_one_line(&out, 4, &["does not trust"]);
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

/// The Kluis stanza of a sealed file: keyring, key id, and the server-wrapped data key.
fn kluis_stanza(sealed: &[u8]) -> (String, String, Vec<u8>) {
    let head = header(sealed);
    let mut lines = head.lines().skip_while(|l| !l.starts_with("-> kluis "));
    let args: Vec<String> = lines.next().unwrap().split_whitespace().skip(2).map(str::to_owned).collect();
    let mut body = String::new();
    for l in lines {
        body.push_str(l);
        if l.len() < 64 {
            break;
        }
    }
    let body = base64::engine::general_purpose::STANDARD_NO_PAD.decode(body).unwrap();
    // The body is the wrapped data key, then the file key under the data key (32 bytes).
    (args[0].clone(), args[1].clone(), body[..body.len() - 32].to_vec())
}

/// (c) A wrapped key altered in the header: the server says why (the reason on the
/// wire), and backup-hook gives exit 5 from that reason.
#[tokio::test]
async fn an_altered_wrapped_key_is_an_integrity_failure_by_its_reason() {
    let server = Server::start();
    let sealed = seal(&server, "sealer", "default", "b1", b"payload");
    // One character of the stanza body's first line, inside the wrapped key.
    let head = header(&sealed);
    let stanza = head.find("-> kluis ").unwrap();
    let body_start = stanza + head[stanza..].find('\n').unwrap() + 1;
    let mut bad = sealed.clone();
    bad[body_start + 10] = if bad[body_start + 10] == b'A' { b'B' } else { b'A' };
    let (keyring, key_id, wrapped) = kluis_stanza(&bad);
    assert_ne!(wrapped, kluis_stanza(&sealed).2);

    let mut keys = pb::key_service_client::KeyServiceClient::new(channel(&server, "restorer").await);
    let st = keys.unwrap_data_key(pb::UnwrapDataKeyRequest { key_id, wrapped_key: wrapped, keyring }).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert_eq!(reason_of(&st), Some(Reason::WrappedKeyNotAuthentic), "{st:?}");
    assert!(st.message().contains("does not authenticate"), "the message stays: {}", st.message());

    // The same file through backup-hook.
    refused_one_line(&unseal(&server, "restorer", &bad), 5, &["does not authenticate"]);
}

/// Every error status the server sends carries its reason, for refusals at the auth
/// layer, in the key layer, and when the audit trail cannot be written.
#[tokio::test]
async fn error_statuses_carry_their_reason_on_the_wire() {
    let server = Server::start();
    let sealed = seal(&server, "sealer", "default", "b1", b"payload");
    let (keyring, key_id, wrapped) = kluis_stanza(&sealed);
    let unwrap = |key_id: &str, keyring: &str| pb::UnwrapDataKeyRequest {
        key_id: key_id.to_owned(),
        wrapped_key: wrapped.clone(),
        keyring: keyring.to_owned(),
    };

    let mut as_sealer = pb::key_service_client::KeyServiceClient::new(channel(&server, "sealer").await);
    let st = as_sealer.unwrap_data_key(unwrap(&key_id, &keyring)).await.unwrap_err();
    assert_eq!((st.code(), reason_of(&st)), (Code::PermissionDenied, Some(Reason::PermissionDenied)), "{st:?}");
    let st = as_sealer
        .generate_data_key(pb::GenerateDataKeyRequest { keyring: "nope".into(), backup_id: "x".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(reason_of(&st), Some(Reason::PermissionDenied), "no grant on an unknown keyring: {st:?}");

    let mut as_dev = pb::key_service_client::KeyServiceClient::new(channel(&server, "dev").await);
    let st = as_dev
        .generate_data_key(pb::GenerateDataKeyRequest { keyring: "nope".into(), backup_id: "x".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((st.code(), reason_of(&st)), (Code::NotFound, Some(Reason::KeyringNotFound)), "{st:?}");
    let st = as_dev.unwrap_data_key(unwrap("00000000000000000000000000000000", &keyring)).await.unwrap_err();
    assert_eq!(reason_of(&st), Some(Reason::KeyUnknown), "{st:?}");
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel(&server, "officer").await);
    let st = admin
        .create_keyring(pb::CreateKeyringRequest { name: "default".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((st.code(), reason_of(&st)), (Code::AlreadyExists, Some(Reason::KeyringExists)), "{st:?}");
    let st = admin.approve(pb::ApproveRequest { id: 999 }).await.unwrap_err();
    assert_eq!((st.code(), reason_of(&st)), (Code::NotFound, Some(Reason::ApprovalNotFound)), "{st:?}");
    let st = admin
        .create_keyring(pb::CreateKeyringRequest { name: "Bad Name!".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((st.code(), reason_of(&st)), (Code::InvalidArgument, Some(Reason::InvalidArgument)), "{st:?}");
}

#[tokio::test]
async fn an_unwritable_audit_trail_is_audit_unavailable_and_exit_3() {
    let mut server = Server::start();
    server.env.push(("KLUIS_TEST_FAIL_AUDIT".into(), "1".into()));
    server.restart();
    let mut keys = pb::key_service_client::KeyServiceClient::new(channel(&server, "sealer").await);
    let st = keys
        .generate_data_key(pb::GenerateDataKeyRequest { keyring: "default".into(), backup_id: "x".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((st.code(), reason_of(&st)), (Code::Unavailable, Some(Reason::AuditUnavailable)), "{st:?}");
    refused_one_line(&server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", "x"], b"d"), 3, &["audit trail"]);
    refused_one_line(&server.kmsctl("officer", &["keyring", "list"]), 3, &["audit trail"]);
}

/// (d) One exit-code table: the same server answer gives kmsctl and backup-hook the
/// same exit code (before, kmsctl exited 1 where backup-hook exited 4).
#[test]
fn kmsctl_and_backup_hook_give_the_same_exit_code_for_the_same_error() {
    let server = Server::start();
    let other = Server::start();

    // A keyring that does not exist (KEYRING_NOT_FOUND).
    let hook = server.backup_hook("dev", &["seal", "--keyring", "nope", "--backup-id", "x"], b"d");
    let ctl = server.kmsctl("dev", &["keyring", "show", "nope"]);
    refused_one_line(&hook, 4, &["keyring \"nope\" does not exist"]);
    refused_one_line(&ctl, 4, &["keyring \"nope\" does not exist"]);

    // A data key this server never issued (KEY_UNKNOWN): a file sealed by another server.
    let foreign = seal(&other, "sealer", "default", "elsewhere", b"d");
    let (_, key_id, _) = kluis_stanza(&foreign);
    let hook = unseal(&server, "dev", &foreign);
    let ctl = server.kmsctl("dev", &["key", "show", &key_id]);
    refused_one_line(&hook, 4, &["not known to this server"]);
    refused_one_line(&ctl, 4, &["not known to this server"]);

    // A role the caller does not have (PERMISSION_DENIED) was already the same (4) in both.
    refused_one_line(&server.backup_hook("sealer", &["unseal"], &foreign), 4, &["may not UnwrapDataKey"]);
    refused_one_line(&server.kmsctl("sealer", &["keyring", "list"]), 4, &["may not"]);
}
