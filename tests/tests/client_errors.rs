//! Client-side failures each say what is wrong, with the exit code of the one table
//! (`kms_client::class`), the same from backup-hook and kmsctl: a server certificate for
//! another name, from an unknown CA, expired or not yet valid (4); this client's
//! certificate refused by the server (4, not "connection lost, retry later"); an
//! encrypted private key and a plain `http://` endpoint (1, not "the server failed").
//! Real server, real certificates (the dev CA, rcgen, the openssl CLI).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kluis_tests::*;
use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};

/// The client config of dev identity `who`, with lines changed by `change`.
fn config_with(server: &Server, who: &str, file: &str, change: impl Fn(&str) -> Option<String>) -> PathBuf {
    let text = std::fs::read_to_string(server.client(who)).unwrap();
    let text: Vec<String> = text.lines().map(|l| change(l).unwrap_or_else(|| l.to_owned())).collect();
    let p = server.dir.path().join(file);
    std::fs::write(&p, text.join("\n") + "\n").unwrap();
    p
}

/// Runs `backup-hook seal -o FILE` as the sealer and `kmsctl keyring list` as the officer,
/// each with its config changed by `change`; both must fail with `code`, one line on
/// stderr holding every needle, nothing on stdout, and no sealed file.
fn both_fail(server: &Server, name: &str, change: impl Fn(&str) -> Option<String>, code: i32, needles: &[&str]) {
    let sealer = config_with(server, "sealer", &format!("{name}-sealer.toml"), &change);
    let officer = config_with(server, "officer", &format!("{name}-officer.toml"), &change);
    let sealed = server.dir.path().join(format!("{name}.age"));
    let out = backup_hook(&sealer, &["seal", "--keyring", "default", "--backup-id", name, "-o", s(&sealed)], b"data");
    let err = refused_one_line(&out, code, needles);
    assert!(err.starts_with("backup-hook: error: "), "{err}");
    assert!(!sealed.exists(), "{name}: a sealed file was written");
    assert_eq!(std::fs::read_dir(server.dir.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".partial")).count(), 0);
    let out = kmsctl(&officer, &["keyring", "list"]);
    let err = refused_one_line(&out, code, needles);
    assert!(err.starts_with("kmsctl: error: "), "{err}");
}

fn dev_ca(server: &Server) -> Issuer<'static, KeyPair> {
    let pki = server.data_dir().join("pki");
    let key = KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).unwrap()).unwrap();
    Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.join("ca.pem")).unwrap(), key).unwrap()
}

fn write_key(path: &Path, key: &KeyPair) {
    std::fs::write(path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// Replaces the server's certificate with one from the dev CA for localhost valid from
/// `not_before` to `not_after`, and restarts the server on it.
fn serve_certificate(server: &mut Server, not_before: time::OffsetDateTime, not_after: time::OffsetDateTime) {
    let pki = server.data_dir().join("pki");
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &dev_ca(server)).unwrap();
    std::fs::write(pki.join("server.pem"), cert.pem()).unwrap();
    write_key(&pki.join("server.key"), &key);
    server.restart();
}

#[test]
fn a_server_certificate_for_another_name_is_named_with_server_name() {
    let server = Server::start();
    both_fail(
        &server,
        "wrong-name",
        |l| l.starts_with("server_name =").then(|| "server_name = \"backup.example\"".to_owned()),
        4,
        &["not valid for the name \"backup.example\"", "localhost", "set `server_name` in the client config"],
    );
}

#[test]
fn a_server_certificate_from_an_unknown_ca_is_named() {
    let server = Server::start();
    // A CA of its own (self-signed), that never signed the server's certificate.
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
    let other_ca = server.dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, ca.pem()).unwrap();
    both_fail(
        &server,
        "unknown-ca",
        |l| l.starts_with("ca =").then(|| format!("ca = {:?}", s(&other_ca))),
        4,
        &["does not trust", "not signed by the CA in `ca`"],
    );
}

#[test]
fn an_expired_or_not_yet_valid_server_certificate_is_named_with_its_date() {
    let mut server = Server::start();
    let now = time::OffsetDateTime::now_utc();
    serve_certificate(&mut server, now - time::Duration::days(30), now - time::Duration::days(1));
    both_fail(&server, "expired", |_| None, 4, &["presented an expired certificate (expired at ", "must be renewed"]);

    serve_certificate(&mut server, now + time::Duration::days(1), now + time::Duration::days(30));
    both_fail(&server, "not-yet", |_| None, 4, &["a certificate that is not valid yet (valid from ", "check this machine's clock"]);

    // Control: a valid one again, and the same configs work.
    serve_certificate(&mut server, now - time::Duration::days(1), now + time::Duration::days(30));
    ok(&server.kmsctl("officer", &["keyring", "list"]), "keyring list with a valid server certificate");
}

/// This client's certificate refused by the server (TLS 1.3: after the handshake, on the
/// first request): exit 4 "refused by the server", never exit 3 "lost, retry later".
#[test]
fn a_client_certificate_the_server_refuses_is_a_refusal_not_a_lost_connection() {
    let server = Server::start();
    let pki = server.data_dir().join("pki");
    let now = time::OffsetDateTime::now_utc();
    let (past, future) = (now - time::Duration::days(30), now + time::Duration::days(30));
    for (name, not_before, not_after) in [("expired", past, now - time::Duration::days(1)), ("future", now + time::Duration::days(1), future)] {
        let dir = server.dir.path().join(name);
        let issued = kmsctl_offline(&[
            "cert", "issue", "--ca-dir", s(&pki), "--name", "officer", "--out", s(&dir),
            "--not-before", &not_before.format(&time::format_description::well_known::Rfc3339).unwrap(),
            "--not-after", &not_after.format(&time::format_description::well_known::Rfc3339).unwrap(),
        ]);
        ok(&issued, "cert issue");
        let (cert, key) = (dir.join("officer.pem"), dir.join("officer.key"));
        let change = |l: &str| {
            if l.starts_with("cert =") {
                Some(format!("cert = {:?}", s(&cert)))
            } else if l.starts_with("key =") {
                Some(format!("key = {:?}", s(&key)))
            } else {
                None
            }
        };
        // The alert (certificate_expired, for both) is named by type: TLS 1.3 delivers it
        // after the handshake, where HTTP/2 keeps only the text of the failure.
        both_fail(&server, name, change, 4, &["was refused by the server", "this client's certificate has expired or is not valid yet", "renew `cert`"]);
    }

    // A certificate from a CA the server does not know, for the same name.
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "officer");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (server.dir.path().join("foreign.pem"), server.dir.path().join("foreign.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    write_key(&key_path, &key);
    let change = |l: &str| {
        if l.starts_with("cert =") {
            Some(format!("cert = {:?}", s(&cert_path)))
        } else if l.starts_with("key =") {
            Some(format!("key = {:?}", s(&key_path)))
        } else {
            None
        }
    };
    both_fail(&server, "foreign", change, 4, &["was refused by the server", "it does not accept this client's certificate", "signed by the server's client CA"]);
}

#[test]
fn an_encrypted_private_key_is_named_with_how_to_decrypt_it() {
    let server = Server::start();
    let plain = server.data_dir().join("pki/clients/officer.key");
    let encrypted = server.dir.path().join("encrypted.key");
    let o = Command::new("openssl")
        .args(["pkcs8", "-topk8", "-v2", "aes256", "-passout", "pass:secret", "-in", s(&plain), "-out", s(&encrypted)])
        .output()
        .expect("the openssl CLI is required");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::set_permissions(&encrypted, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert!(std::fs::read_to_string(&encrypted).unwrap().starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    let path = s(&encrypted).to_owned();
    both_fail(
        &server,
        "encrypted",
        |l| l.starts_with("key =").then(|| format!("key = {path:?}")),
        1,
        &["is encrypted; encrypted private keys are not supported", &format!("openssl pkey -in {path}")],
    );
    // And a key file that holds no key at all.
    let cert = s(&server.data_dir().join("pki/clients/officer.pem")).to_owned();
    let not_a_key = server.dir.path().join("not-a.key");
    std::fs::copy(&cert, &not_a_key).unwrap();
    std::fs::set_permissions(&not_a_key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    both_fail(&server, "no-key", |l| l.starts_with("key =").then(|| format!("key = {:?}", s(&not_a_key))), 1, &["holds no PEM private key"]);
}

#[test]
fn a_plain_http_endpoint_is_refused_as_such_and_does_not_blame_the_server() {
    let server = Server::start();
    both_fail(
        &server,
        "http",
        |l| l.starts_with("endpoint =").then(|| l.replace("https://", "http://")),
        1,
        &["is plain http://; the Kluis server speaks mutual TLS only: use https://HOST:PORT"],
    );
    let out = kmsctl(&config_with(&server, "officer", "http-again.toml", |l| l.starts_with("endpoint =").then(|| l.replace("https://", "http://"))), &["keyring", "list"]);
    let err = stderr(&out);
    assert!(!err.contains("server failed") && !err.contains("h2 protocol"), "{err}");
}
