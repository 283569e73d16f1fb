//! `kmsctl cert issue`: a client certificate from a CA directory (the dev CA of
//! `kms-server dev`, or a small site's own CA), made by `kluis-pki`, the same writer
//! `kms-server dev` uses. Real deployments use their PKI.

use std::path::Path;

pub use kluis_pki::{Issued, PkiError as CertError};
use kluis_pki::{Ca, Subject, Usage, Validity};

/// What to put in the certificate.
pub struct CertRequest {
    /// Subject common name (the principal, unless the server maps SANs).
    pub name: String,
    pub san_uris: Vec<String>,
    pub san_dns: Vec<String>,
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
}

/// Issues a client certificate signed by `ca_dir/ca.pem` + `ca_dir/ca.key`, written
/// as `out_dir/NAME.pem` and `out_dir/NAME.key` (0600). Never overwrites.
pub fn issue(ca_dir: &Path, out_dir: &Path, req: &CertRequest) -> Result<Issued, CertError> {
    let subject = Subject { common_name: req.name.clone(), organization: None, dns: req.san_dns.clone(), uris: req.san_uris.clone() };
    let validity = Validity { not_before: req.not_before, not_after: req.not_after };
    // Name and validity are checked before the CA is read.
    kluis_pki::check_name(&req.name)?;
    if req.not_after <= req.not_before {
        return Err(CertError::BadValidity);
    }
    let ca = Ca::load(ca_dir)?;
    ca.issue(out_dir, &req.name, Usage::Client, &subject, validity)
}
