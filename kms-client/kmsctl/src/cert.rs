//! `kmsctl cert ca`, `cert server` and `cert issue`: a small CA for sites without one,
//! the server certificate it signs, and client certificates, made by `kluis-pki` (the
//! same writer `kms-server dev` uses). Sites with their own CA use it instead
//! (docs/certificates.md has the openssl recipe).
//!
//! Every key is a fresh ECDSA P-256 key, written unencrypted as PKCS#8 PEM, mode 0600,
//! whole or not at all; existing files are refused unless `force` is set.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub use kluis_pki::{Issued, PkiError};
use kluis_pki::{Ca, Existing, Subject, Usage, Validity};

/// Why a `kmsctl cert` command wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("a server certificate needs at least one name clients connect to: give --dns NAME and/or --ip ADDRESS")]
    NoServerName,
    #[error("--dns {name:?} is not a DNS name (an IP address goes in --ip)")]
    DnsIsAddress { name: String },
    #[error("--dns {name:?} is not a DNS name: letters, digits, '-' and '.', optionally starting with '*.'")]
    BadDnsName { name: String },
}

/// When the certificate is valid, and whether existing files may be replaced.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
    /// Replace existing files of the same name (`--force`).
    pub force: bool,
}

impl Options {
    fn validity(&self) -> Result<Validity, CertError> {
        if self.not_after <= self.not_before {
            return Err(PkiError::BadValidity.into());
        }
        Ok(Validity { not_before: self.not_before, not_after: self.not_after })
    }

    fn existing(&self) -> Existing {
        if self.force { Existing::Replace } else { Existing::Refuse }
    }
}

/// What to put in a client certificate.
pub struct CertRequest {
    /// Subject common name (the principal, unless the server maps SANs).
    pub name: String,
    pub san_uris: Vec<String>,
    pub san_dns: Vec<String>,
    pub options: Options,
}

/// Creates a CA: `dir/ca.pem` (give it to the server as `[tls] client_ca` and to every
/// client as `ca`) and `dir/ca.key` (0600; keep it off the server). Returns the path of
/// `ca.pem`.
pub fn create_ca(dir: &Path, common_name: &str, options: &Options) -> Result<PathBuf, CertError> {
    let validity = options.validity()?;
    Ca::create_with(dir, &Subject::named(common_name), validity, options.existing())?;
    Ok(dir.join("ca.pem"))
}

/// What to put in a server certificate.
pub struct ServerRequest {
    /// File name (`OUT/NAME.pem`, `OUT/NAME.key`).
    pub name: String,
    /// DNS names clients connect to (the endpoint's host, or their `server_name`).
    pub dns: Vec<String>,
    /// IP addresses clients connect to.
    pub ips: Vec<IpAddr>,
    pub options: Options,
}

fn check_dns_name(name: &str) -> Result<(), CertError> {
    if name.parse::<IpAddr>().is_ok() {
        return Err(CertError::DnsIsAddress { name: name.to_owned() });
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-') && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(CertError::BadDnsName { name: name.to_owned() });
    }
    Ok(())
}

/// Issues a server certificate (serverAuth) signed by `ca_dir`'s CA, with a SAN for each
/// DNS name and IP address; its common name is the first of them.
pub fn issue_server(ca_dir: &Path, out_dir: &Path, req: &ServerRequest) -> Result<Issued, CertError> {
    kluis_pki::check_name(&req.name)?;
    let validity = req.options.validity()?;
    for d in &req.dns {
        check_dns_name(d)?;
    }
    let names: Vec<String> = req.dns.iter().cloned().chain(req.ips.iter().map(IpAddr::to_string)).collect();
    let Some(first) = names.first() else {
        return Err(CertError::NoServerName);
    };
    let subject = Subject { common_name: first.clone(), organization: None, dns: names.clone(), uris: vec![] };
    let ca = Ca::load(ca_dir)?;
    Ok(ca.issue_with(out_dir, &req.name, Usage::Server, &subject, validity, req.options.existing())?)
}

/// Issues a client certificate signed by `ca_dir/ca.pem` + `ca_dir/ca.key`, written
/// as `out_dir/NAME.pem` and `out_dir/NAME.key` (0600).
pub fn issue(ca_dir: &Path, out_dir: &Path, req: &CertRequest) -> Result<Issued, CertError> {
    let subject = Subject { common_name: req.name.clone(), organization: None, dns: req.san_dns.clone(), uris: req.san_uris.clone() };
    // Name and validity are checked before the CA is read.
    kluis_pki::check_name(&req.name)?;
    let validity = req.options.validity()?;
    let ca = Ca::load(ca_dir)?;
    Ok(ca.issue_with(out_dir, &req.name, Usage::Client, &subject, validity, req.options.existing())?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn opts(force: bool) -> Options {
        let now = time::OffsetDateTime::now_utc();
        Options { not_before: now - time::Duration::hours(1), not_after: now + time::Duration::days(2), force }
    }

    #[test]
    fn a_server_certificate_carries_the_names_clients_connect_to() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        create_ca(&pki, "Clinic Kluis CA", &opts(false)).unwrap();
        let req = |dns: Vec<&str>, ips: Vec<&str>| ServerRequest {
            name: "server".into(),
            dns: dns.into_iter().map(str::to_owned).collect(),
            ips: ips.into_iter().map(|i| i.parse().unwrap()).collect(),
            options: opts(false),
        };
        assert!(matches!(issue_server(&pki, dir.path(), &req(vec![], vec![])), Err(CertError::NoServerName)));
        assert!(matches!(issue_server(&pki, dir.path(), &req(vec!["10.0.0.5"], vec![])), Err(CertError::DnsIsAddress { .. })));
        assert!(matches!(issue_server(&pki, dir.path(), &req(vec!["kms example"], vec![])), Err(CertError::BadDnsName { .. })));
        assert!(!dir.path().join("server.key").exists(), "nothing is written for a refused request");
        let s = issue_server(&pki, dir.path(), &req(vec!["kms.example"], vec!["10.0.0.5"])).unwrap();
        let pem = std::fs::read_to_string(&s.cert).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        // Again: refused without force, replaced with it.
        let e = issue_server(&pki, dir.path(), &req(vec!["kms.example"], vec![])).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        let mut forced = req(vec!["kms2.example"], vec![]);
        forced.options.force = true;
        issue_server(&pki, dir.path(), &forced).unwrap();
        assert_ne!(std::fs::read_to_string(&s.cert).unwrap(), pem);
    }

    #[test]
    fn a_ca_is_not_replaced_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), "One", &opts(false)).unwrap();
        let before = std::fs::read(dir.path().join("ca.key")).unwrap();
        let e = create_ca(dir.path(), "Two", &opts(false)).unwrap_err();
        assert!(e.to_string().contains("ca.key already exists"), "{e}");
        assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);
        create_ca(dir.path(), "Two", &opts(true)).unwrap();
        assert_ne!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);
    }
}
