//! Certificates for Kluis, written one way: a CA (`ca.pem`, `ca.key`), server
//! certificates (serverAuth, SANs for the names clients connect to) and client
//! certificates (clientAuth; the subject CN is the principal), each key a fresh
//! ECDSA P-256 key (PKCS#8 PEM, unencrypted). Each file is written whole or not at all
//! (a temporary file, fsynced, then linked or renamed into place) and never overwritten
//! unless asked ([`Existing::Replace`]): keys 0600, certificates 0644.
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

/// What to do when a file to be written already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Refuse ([`PkiError::Exists`]) and write nothing.
    Refuse,
    /// Replace it (`--force`).
    Replace,
}

/// Creates `path` with `data`, never overwriting, with `mode`, and fsyncs it.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    write_file(path, data, mode, Existing::Refuse)
}

/// Writes `path` whole or not at all: `data` goes to a new temporary file beside it
/// (created with `mode`, so a key is never readable by others, not even briefly), is
/// fsynced, then linked to `path` (refusing an existing file) or renamed over it
/// (replacing one); the directory is fsynced after. A failure leaves no temporary file.
pub fn write_file(path: &Path, data: &[u8], mode: u32, existing: Existing) -> Result<(), PkiError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let werr = |p: &Path, e: std::io::Error| PkiError::Write { path: p.to_owned(), source: e };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if existing == Existing::Refuse && std::fs::symlink_metadata(path).is_ok() {
        return Err(PkiError::Exists { path: path.to_owned() });
    }
    let tmp = dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| werr(&tmp, e))
        .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()).map_err(|e| werr(path, e)));
    let placed = written.and_then(|()| match existing {
        Existing::Refuse => std::fs::hard_link(&tmp, path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists { path: path.to_owned() }
            } else {
                werr(path, e)
            }
        }),
        Existing::Replace => std::fs::rename(&tmp, path).map_err(|e| werr(path, e)),
    });
    // After a link (or any failure) the temporary name is left over; after a rename it is gone.
    let _ = std::fs::remove_file(&tmp);
    placed?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| werr(dir, e))
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
    /// Makes a new CA and writes `dir/ca.pem` (0644) and `dir/ca.key` (0600), never
    /// overwriting either.
    pub fn create(dir: &Path, subject: &Subject, validity: Validity) -> Result<Ca, PkiError> {
        Self::create_with(dir, subject, validity, Existing::Refuse)
    }

    /// [`Ca::create`]; with [`Existing::Replace`] an existing CA in `dir` is replaced
    /// (every certificate it issued then no longer verifies against the new `ca.pem`).
    pub fn create_with(dir: &Path, subject: &Subject, validity: Validity, existing: Existing) -> Result<Ca, PkiError> {
        std::fs::create_dir_all(dir).map_err(|e| PkiError::Write { path: dir.to_owned(), source: e })?;
        let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.pem"));
        if existing == Existing::Refuse {
            for p in [&key_path, &cert_path] {
                if std::fs::symlink_metadata(p).is_ok() {
                    return Err(PkiError::Exists { path: p.clone() });
                }
            }
        }
        let mut p = params(subject, validity)?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, existing)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644, existing)?;
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
        self.issue_with(out_dir, name, usage, subject, validity, Existing::Refuse)
    }

    /// [`Ca::issue`]; with [`Existing::Replace`] existing files of that name are replaced.
    pub fn issue_with(
        &self,
        out_dir: &Path,
        name: &str,
        usage: Usage,
        subject: &Subject,
        validity: Validity,
        existing: Existing,
    ) -> Result<Issued, PkiError> {
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
        if existing == Existing::Refuse {
            for p in [&out.cert, &out.key] {
                if std::fs::symlink_metadata(p).is_ok() {
                    return Err(PkiError::Exists { path: p.clone() });
                }
            }
        }
        write_file(&out.key, key.serialize_pem().as_bytes(), 0o600, existing)?;
        write_file(&out.cert, cert.pem().as_bytes(), 0o644, existing)?;
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

    #[test]
    fn replacing_is_asked_for_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ca::create(dir.path(), &Subject::named("First CA"), Validity::days_from_now(30)).unwrap();
        let key_before = std::fs::read(dir.path().join("ca.key")).unwrap();
        // Refused: nothing changes, not even the key.
        assert!(matches!(
            Ca::create_with(dir.path(), &Subject::named("Second CA"), Validity::days_from_now(30), Existing::Refuse),
            Err(PkiError::Exists { .. })
        ));
        assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), key_before);
        let second = Ca::create_with(dir.path(), &Subject::named("Second CA"), Validity::days_from_now(30), Existing::Replace).unwrap();
        assert_ne!(std::fs::read(dir.path().join("ca.key")).unwrap(), key_before);
        assert_ne!(first.cert_pem, second.cert_pem);
        assert_eq!(std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode() & 0o777, 0o600);
        // A lone key of that name (a half pair) is refused too, naming it.
        std::fs::write(dir.path().join("srv.key"), b"old").unwrap();
        let e = second.issue(dir.path(), "srv", Usage::Server, &Subject::named("srv"), Validity::days_from_now(1)).unwrap_err();
        assert!(e.to_string().contains("srv.key"), "{e}");
        assert!(!dir.path().join("srv.pem").exists());
        let s = second
            .issue_with(dir.path(), "srv", Usage::Server, &Subject::named("srv"), Validity::days_from_now(1), Existing::Replace)
            .unwrap();
        assert!(std::fs::read_to_string(&s.key).unwrap().contains("BEGIN PRIVATE KEY"));
        assert_eq!(std::fs::metadata(&s.key).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }
}
