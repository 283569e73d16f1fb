//! The throwaway PKI of `kms-server dev`: a CA, a server certificate for
//! localhost, and one client certificate per dev identity. Real deployments
//! bring their own PKI.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// Errors making the dev PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("could not write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Validity of dev certificates.
const DEV_VALIDITY_DAYS: i64 = 825;

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let w = |e| PkiError::Write { path: path.to_owned(), source: e };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(w)?;
    f.write_all(contents).map_err(w)?;
    f.sync_all().map_err(w)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "Kluis dev");
    d.push(DnType::CommonName, cn);
    d
}

fn validity(p: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(DEV_VALIDITY_DAYS);
}

/// Paths of the dev PKI under a directory.
pub struct DevPkiPaths {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl DevPkiPaths {
    pub fn under(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }
    pub fn client_cert(dir: &Path, name: &str) -> PathBuf {
        dir.join("clients").join(format!("{name}.pem"))
    }
    pub fn client_key(dir: &Path, name: &str) -> PathBuf {
        dir.join("clients").join(format!("{name}.key"))
    }
}

/// Creates `dir/ca.pem`, `dir/ca.key`, `dir/server.{pem,key}` and
/// `dir/clients/NAME.{pem,key}` for each name. Keys are mode 0600.
pub fn create_dev_pki(dir: &Path, client_names: &[&str]) -> Result<DevPkiPaths, PkiError> {
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(|e| PkiError::Write { path: p.to_owned(), source: e });
    mkdir(dir)?;
    mkdir(&dir.join("clients"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = dn("Kluis dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut ca_params);
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let paths = DevPkiPaths::under(dir);
    write_file(&paths.ca_cert, ca.pem().as_bytes(), 0o644)?;
    write_file(&dir.join("ca.key"), ca_key_pem.as_bytes(), 0o600)?;

    let mut sp = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()])?;
    sp.distinguished_name = dn("localhost");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut sp);
    let sk = KeyPair::generate()?;
    let scert = sp.signed_by(&sk, &ca)?;
    write_file(&paths.server_cert, scert.pem().as_bytes(), 0o644)?;
    write_file(&paths.server_key, sk.serialize_pem().as_bytes(), 0o600)?;

    for name in client_names {
        let mut cp = CertificateParams::new(Vec::<String>::new())?;
        cp.distinguished_name = dn(name);
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        cp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut cp);
        let ck = KeyPair::generate()?;
        let cc = cp.signed_by(&ck, &ca)?;
        write_file(&DevPkiPaths::client_cert(dir, name), cc.pem().as_bytes(), 0o644)?;
        write_file(&DevPkiPaths::client_key(dir, name), ck.serialize_pem().as_bytes(), 0o600)?;
    }
    Ok(paths)
}
