//! `kmsctl cert issue`: a client certificate from a CA directory (the dev CA of
//! `kms-server dev`, or a small site's own CA). Real deployments use their PKI.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

/// Errors issuing a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
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
    #[error("--not-after must be later than --not-before")]
    BadValidity,
}

/// What to put in the certificate.
pub struct CertRequest {
    /// Subject common name (the principal, unless the server maps SANs).
    pub name: String,
    pub san_uris: Vec<String>,
    pub san_dns: Vec<String>,
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
}

/// Paths written by [`issue`].
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists { path: path.to_owned() }
        } else {
            CertError::Write { path: path.to_owned(), source: e }
        }
    })?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(|e| CertError::Write { path: path.to_owned(), source: e })
}

/// Issues a client certificate signed by `ca_dir/ca.pem` + `ca_dir/ca.key`, written
/// as `out_dir/NAME.pem` and `out_dir/NAME.key` (0600). Never overwrites.
pub fn issue(ca_dir: &Path, out_dir: &Path, req: &CertRequest) -> Result<Issued, CertError> {
    if req.name.is_empty() || !req.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(CertError::BadName { name: req.name.clone() });
    }
    if req.not_after <= req.not_before {
        return Err(CertError::BadValidity);
    }
    let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| CertError::Read { path: p, source: e });
    let ca_pem = read(ca_dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&read(ca_dir.join("ca.key"))?)
        .map_err(|e| CertError::Ca { dir: ca_dir.to_owned(), source: e })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| CertError::Ca { dir: ca_dir.to_owned(), source: e })?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.name.as_str());
    params.distinguished_name = dn;
    for u in &req.san_uris {
        params.subject_alt_names.push(SanType::URI(u.as_str().try_into()?));
    }
    for d in &req.san_dns {
        params.subject_alt_names.push(SanType::DnsName(d.as_str().try_into()?));
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = req.not_before;
    params.not_after = req.not_after;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out_dir).map_err(|e| CertError::Write { path: out_dir.to_owned(), source: e })?;
    let out = Issued { cert: out_dir.join(format!("{}.pem", req.name)), key: out_dir.join(format!("{}.key", req.name)) };
    if out.cert.exists() {
        return Err(CertError::Exists { path: out.cert });
    }
    write_new(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&out.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(out)
}
