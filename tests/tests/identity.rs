//! A client certificate whose identity is ambiguous (two subject common names, e.g.
//! `CN=dev,CN=nobody`) is refused with the reason, not taken as either name.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kluis_tests::*;
use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};

/// A client config like `dev`'s, with a certificate from the dev CA whose subject is `dn`.
fn client_with_subject(server: &Server, dn: DistinguishedName) -> std::path::PathBuf {
    let pki = server.data_dir().join("pki");
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.join("ca.pem")).unwrap(), ca_key).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (server.dir.path().join("odd.pem"), server.dir.path().join("odd.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = std::fs::read_to_string(server.client("dev"))
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("cert =") {
                format!("cert = {:?}", s(&cert_path))
            } else if l.starts_with("key =") {
                format!("key = {:?}", s(&key_path))
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let cfg = server.dir.path().join("odd.toml");
    std::fs::write(&cfg, text + "\n").unwrap();
    cfg
}

#[test]
fn a_certificate_with_two_common_names_is_refused_naming_the_reason() {
    let server = Server::start();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "dev");
    // A second CN attribute (OID 2.5.4.3): the subject reads CN=dev,CN=nobody.
    dn.push(DnType::CustomDnType(vec![2, 5, 4, 3]), "nobody");
    let cfg = client_with_subject(&server, dn);
    let out = kmsctl(&cfg, &["keyring", "list"]);
    refused(&out, 4, &["identity is ambiguous", "2 common names"]);
    assert!(out.stdout.is_empty());

    // Control: the same CA, one CN, is `dev` and allowed.
    let mut one = DistinguishedName::new();
    one.push(DnType::CommonName, "dev");
    let cfg = client_with_subject(&server, one);
    ok(&kmsctl(&cfg, &["keyring", "list"]), "keyring list with one CN");
}
