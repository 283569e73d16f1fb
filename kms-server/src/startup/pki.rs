//! The throwaway PKI of `kms-server dev`: a CA, a server certificate for localhost, and
//! one client certificate per dev identity, all made with `kluis-pki` (the writer
//! `kmsctl cert` uses too). Real deployments bring their own PKI.

use std::path::{Path, PathBuf};

use kluis_pki::{Ca, Subject, Usage, Validity};
pub use kluis_pki::PkiError;

/// Validity of dev certificates.
const DEV_VALIDITY_DAYS: i64 = 825;

fn dev_subject(cn: &str) -> Subject {
    let mut s = Subject::named(cn);
    s.organization = Some("Kluis dev".to_owned());
    s
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
    let validity = Validity::days_from_now(DEV_VALIDITY_DAYS);
    let ca = Ca::create(dir, &dev_subject("Kluis dev CA"), validity)?;
    let mut server = dev_subject("localhost");
    server.dns = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    ca.issue(dir, "server", Usage::Server, &server, validity)?;
    for name in client_names {
        ca.issue(&dir.join("clients"), name, Usage::Client, &dev_subject(name), validity)?;
    }
    Ok(DevPkiPaths::under(dir))
}
