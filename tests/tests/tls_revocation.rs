//! X.509 CRLs (`[auth] crl`): a client certificate whose serial the CA revoked is refused
//! at the TLS handshake; the CRL is re-read when it changes (PEM or DER), a malformed
//! replacement keeps the last good one, and a malformed CRL at start refuses the start,
//! naming the file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kluis_tests::*;
use rcgen::{CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevocationReason, RevokedCertParams, SerialNumber};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn pki(server: &Server) -> PathBuf {
    server.data_dir().join("pki")
}

/// A client certificate from the dev CA, as `kmsctl cert issue` makes them.
fn issue(server: &Server, name: &str) {
    ok(&kmsctl_offline(&["cert", "issue", "--ca-dir", s(&pki(server)), "--name", name]), "cert issue");
}

fn serial_of(server: &Server, name: &str) -> Vec<u8> {
    let pem = std::fs::read(pki(server).join("clients").join(format!("{name}.pem"))).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    p.parse_x509().unwrap().raw_serial().to_vec()
}

/// A CRL signed by the dev CA revoking the certificates `names`; (PEM, DER).
fn crl(server: &Server, number: u64, names: &[&str]) -> (String, Vec<u8>) {
    let dir = pki(server);
    let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(dir.join("ca.pem")).unwrap(), key).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(7),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: names
            .iter()
            .map(|n| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial_of(server, n)),
                revocation_time: now - time::Duration::minutes(5),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer).unwrap();
    (crl.pem().unwrap(), crl.der().to_vec())
}

/// Appends an `[auth]` table naming `crls` (and a metrics endpoint) to `server.toml`.
fn configure(server: &Server, crls: &[&Path]) {
    server.set_top_level("metrics_listen = \"127.0.0.1:0\"\n");
    let cfg = server.data_dir().join("server.toml");
    let list: Vec<String> = crls.iter().map(|p| format!("{:?}", s(p))).collect();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\n[auth]\ncrl = [{}]\n", list.join(", "))).unwrap();
}

async fn health(server: &Server, name: &str) -> Result<(), String> {
    let ca = std::fs::read(pki(server).join("ca.pem")).unwrap();
    let d = pki(server).join("clients");
    let id = Identity::from_pem(std::fs::read(d.join(format!("{name}.pem"))).unwrap(), std::fs::read(d.join(format!("{name}.key"))).unwrap());
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost").identity(id);
    let ep = Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap();
    let ch = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(ch)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map(|_| ())
        .map_err(|s| format!("status {:?}: {}", s.code(), s.message()))
}

/// Refused below gRPC: a TLS-level refusal, not a status from the service.
async fn refused_at_tls(server: &Server, name: &str) {
    let err = health(server, name).await.expect_err(name);
    assert!(!err.contains("PermissionDenied") && !err.contains("Unauthenticated"), "{name} refused above TLS: {err}");
}

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_serial_revoked_by_the_ca_is_refused_at_tls_and_crl_changes_apply_without_restart() {
    let mut server = Server::start();
    issue(&server, "lost");
    issue(&server, "kept");
    let crl_path = server.dir.path().join("ca.crl");
    std::fs::write(&crl_path, crl(&server, 1, &["lost"]).0).unwrap();
    configure(&server, &[&crl_path]);
    server.restart();

    refused_at_tls(&server, "lost").await;
    health(&server, "kept").await.unwrap();
    health(&server, "auditor").await.unwrap();
    // backup-hook reads the TLS alert: refused (exit 4), naming the revocation.
    let cfg = server.dir.path().join("lost.toml");
    let text = std::fs::read_to_string(server.client("sealer")).unwrap().replace("sealer.pem", "lost.pem").replace("sealer.key", "lost.key");
    std::fs::write(&cfg, text).unwrap();
    let out = backup_hook(&cfg, &["seal", "--keyring", "default", "--backup-id", "x"], b"data");
    refused(&out, 4, &["CertificateRevoked"]);
    assert!(out.stdout.is_empty());

    // The CA publishes a new CRL (DER this time) that also revokes `kept`: no restart.
    std::fs::write(&crl_path, crl(&server, 2, &["lost", "kept"]).1).unwrap();
    refused_at_tls(&server, "kept").await;
    refused_at_tls(&server, "lost").await;
    health(&server, "auditor").await.unwrap();

    // A damaged CRL is not taken: the last good set stays in force, and it is counted.
    std::fs::write(&crl_path, b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n").unwrap();
    refused_at_tls(&server, "kept").await;
    health(&server, "auditor").await.unwrap();
    let metrics = scrape(server.metrics_addr.as_deref().unwrap());
    assert!(metrics.contains("\nkluis_reload_failures_total 1\n"), "{metrics}");
    assert!(server.log().contains("CRLs not reloaded"), "{}", server.log());

    // An empty CRL lifts the revocations.
    std::fs::write(&crl_path, crl(&server, 3, &[]).0).unwrap();
    health(&server, "kept").await.unwrap();
    health(&server, "lost").await.unwrap();
}

#[test]
fn a_malformed_or_missing_crl_at_start_refuses_the_start_naming_the_file() {
    let mut server = Server::start();
    server.kill9();
    let start = |server: &Server| {
        run("kms-server", &["dev", "--data-dir", s(&server.data_dir()), "--listen", "127.0.0.1:0"], b"")
    };

    let bad = server.dir.path().join("bad.crl");
    std::fs::write(&bad, b"this is not a CRL").unwrap();
    configure(&server, &[&bad]);
    let out = start(&server);
    refused_one_line(&out, 1, &[&format!("CRL file {} is not a valid X.509 CRL", bad.display())]);

    // PEM without any CRL block.
    std::fs::write(&bad, crl(&server, 1, &[]).0.replace("X509 CRL", "CERTIFICATE")).unwrap();
    let out = start(&server);
    refused_one_line(&out, 1, &[&format!("CRL file {} holds no CRL", bad.display())]);

    std::fs::remove_file(&bad).unwrap();
    let out = start(&server);
    refused_one_line(&out, 1, &[&format!("CRL file {} could not be read", bad.display())]);
}
