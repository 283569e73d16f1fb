//! Certificates for Kluis, written one way: a CA (`ca.pem`, `ca.key`), server
//! certificates (serverAuth, SANs for the names clients connect to) and client
//! certificates (clientAuth; the subject CN is the principal), each key a fresh
//! ECDSA P-256 key. Files are created, never overwritten: keys 0600, certificates
//! 0644, each fsynced before the call returns.
#![forbid(unsafe_code)]

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Errors making or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} already exists; refusing to overwrite a certificate or key")]
    Exists { path: PathBuf },
    #[error("the CA in {dir} is not usable: {source}")]
    Ca { dir: PathBuf, source: rcgen::Error },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid name {name:?}: use letters, digits, '.', '_' and '-' (it becomes the file name)")]
    BadName { name: String },
    #[error("the certificate's end of validity must be later than its start")]
    BadValidity,
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) for `days` days.
    pub fn days_from_now(days: i64) -> Self {
        let now = time::OffsetDateTime::now_utc();
        Validity { not_before: now - time::Duration::hours(1), not_after: now + time::Duration::days(days) }
    }
}

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server: the SANs are the names and addresses clients connect to.
    Server,
    /// A TLS client: the CN (or a SAN, if the server is configured so) is the principal.
    Client,
}

/// The subject and names of a certificate.
#[derive(Clone, Debug)]
pub struct Subject {
    pub common_name: String,
    /// An organization name (O), if any.
    pub organization: Option<String>,
    /// DNS names and IP addresses (IP literals become IP SANs).
    pub dns: Vec<String>,
    pub uris: Vec<String>,
}

impl Subject {
    pub fn named(common_name: &str) -> Self {
        Subject { common_name: common_name.to_owned(), organization: None, dns: vec![], uris: vec![] }
    }
}

/// Creates `path` with `data`, never overwriting, with `mode`, and fsyncs it.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists { path: path.to_owned() }
        } else {
            PkiError::Write { path: path.to_owned(), source: e }
        }
    })?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(|e| PkiError::Write { path: path.to_owned(), source: e })
}

/// Checks a certificate name, which becomes a file name: letters, digits, `.`, `_`, `-`.
pub fn check_name(name: &str) -> Result<(), PkiError> {
    if name.is_empty() || name.starts_with('.') || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(PkiError::BadName { name: name.to_owned() });
    }
    Ok(())
}

fn params(subject: &Subject, validity: Validity) -> Result<CertificateParams, PkiError> {
    if validity.not_after <= validity.not_before {
        return Err(PkiError::BadValidity);
    }
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    if let Some(o) = &subject.organization {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    dn.push(DnType::CommonName, subject.common_name.as_str());
    p.distinguished_name = dn;
    for d in &subject.dns {
        p.subject_alt_names.push(match d.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(d.as_str().try_into()?),
        });
    }
    for u in &subject.uris {
        p.subject_alt_names.push(SanType::URI(u.as_str().try_into()?));
    }
    p.not_before = validity.not_before;
    p.not_after = validity.not_after;
    Ok(p)
}

/// A CA that signs certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub cert_pem: String,
}

impl Ca {
    /// Makes a new CA and writes `dir/ca.pem` (0644) and `dir/ca.key` (0600).
    pub fn create(dir: &Path, subject: &Subject, validity: Validity) -> Result<Ca, PkiError> {
        std::fs::create_dir_all(dir).map_err(|e| PkiError::Write { path: dir.to_owned(), source: e })?;
        let mut p = params(subject, validity)?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        write_new(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&dir.join("ca.pem"), cert.pem().as_bytes(), 0o644)?;
        Ok(Ca { cert_pem: cert.pem(), issuer: Issuer::new(p, key) })
    }

    /// The CA of `dir/ca.pem` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| PkiError::Read { path: p, source: e });
        let cert_pem = read(dir.join("ca.pem"))?;
        let key = KeyPair::from_pem(&read(dir.join("ca.key"))?).map_err(|e| PkiError::Ca { dir: dir.to_owned(), source: e })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::Ca { dir: dir.to_owned(), source: e })?;
        Ok(Ca { issuer, cert_pem })
    }

    /// Issues a certificate for `subject` with a new key, written as `out_dir/NAME.pem`
    /// (0644) and `out_dir/NAME.key` (0600). Never overwrites either.
    pub fn issue(&self, out_dir: &Path, name: &str, usage: Usage, subject: &Subject, validity: Validity) -> Result<Issued, PkiError> {
        check_name(name)?;
        let mut p = params(subject, validity)?;
        p.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        std::fs::create_dir_all(out_dir).map_err(|e| PkiError::Write { path: out_dir.to_owned(), source: e })?;
        let out = Issued { cert: out_dir.join(format!("{name}.pem")), key: out_dir.join(format!("{name}.key")) };
        if out.cert.exists() {
            return Err(PkiError::Exists { path: out.cert });
        }
        write_new(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&out.cert, cert.pem().as_bytes(), 0o644)?;
        Ok(out)
    }
}

/// Paths written by [`Ca::issue`].
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_ca_issues_server_and_client_certificates_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create(dir.path(), &Subject::named("Test CA"), Validity::days_from_now(30)).unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode() & 0o777, 0o600);
        let mut server = Subject::named("kms.example");
        server.dns = vec!["kms.example".into(), "127.0.0.1".into()];
        let s = ca.issue(dir.path(), "server", Usage::Server, &server, Validity::days_from_now(30)).unwrap();
        let pem = std::fs::read(&s.cert).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = p.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap().value.general_names.len();
        assert_eq!(san, 2);
        assert!(cert.extended_key_usage().unwrap().unwrap().value.server_auth);
        // The same CA, loaded again, issues a client certificate.
        let again = Ca::load(dir.path()).unwrap();
        let c = again.issue(&dir.path().join("clients"), "host-1", Usage::Client, &Subject::named("host-1"), Validity::days_from_now(1)).unwrap();
        assert_eq!(std::fs::metadata(&c.key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(
            again.issue(&dir.path().join("clients"), "host-1", Usage::Client, &Subject::named("host-1"), Validity::days_from_now(1)),
            Err(PkiError::Exists { .. })
        ));
        assert!(matches!(Ca::create(dir.path(), &Subject::named("x"), Validity::days_from_now(1)), Err(PkiError::Exists { .. })));
        assert!(matches!(again.issue(dir.path(), "../evil", Usage::Client, &Subject::named("e"), Validity::days_from_now(1)), Err(PkiError::BadName { .. })));
        let backwards = Validity { not_before: Validity::days_from_now(2).not_after, not_after: Validity::days_from_now(1).not_after };
        assert!(matches!(again.issue(dir.path(), "late", Usage::Client, &Subject::named("l"), backwards), Err(PkiError::BadValidity)));
    }
}
