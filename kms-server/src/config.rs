//! Server configuration: versioned TOML, unknown fields refused, relative paths
//! resolved against the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::{Grant, IdentitySource};

/// The only config version this build understands.
pub const CONFIG_VERSION: u32 = 1;
/// Store file name inside `data_dir`.
pub const STORE_FILE: &str = "kluis.redb";

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} could not be read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("config file {path} has version {found}; this kms-server understands version {CONFIG_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("config file {path} could not be written: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("config could not be serialised: {0}")]
    Serialize(#[from] toml::ser::Error),
}

/// The server configuration file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub version: u32,
    /// Address to listen on, e.g. `127.0.0.1:8443` (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Directory of the redb store (`kluis.redb`).
    pub data_dir: PathBuf,
    /// How long a destructive request waits for a second officer's approval, seconds (default 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_ttl_secs: Option<u64>,
    /// Waiting period between a destruction request (or its approval) and the destruction, days (default 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destruction_wait_days: Option<u32>,
    /// How often the server runs its scheduled work (rotation periods, due destructions,
    /// expired keys), seconds (default 60). Requests never wait for it: a request that
    /// meets due work does it first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_interval_secs: Option<u64>,
    /// Plain-HTTP Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9464`; off if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
    pub master: MasterConfig,
    /// How client certificates become principals, and which are revoked.
    #[serde(default, skip_serializing_if = "AuthConfig::is_default")]
    pub auth: AuthConfig,
    /// Who may do what on which keyrings. Anything not granted is refused.
    #[serde(default, rename = "grant")]
    pub grants: Vec<Grant>,
    /// `[audit]`: exports and anchors of the audit trail.
    #[serde(default, skip_serializing_if = "AuditConfig::is_default")]
    pub audit: AuditConfig,
}

/// Audit exports running at once unless `[audit] max_concurrent_exports` says otherwise.
pub const DEFAULT_MAX_CONCURRENT_EXPORTS: usize = 4;

/// `[audit]`: how many exports may run at once, and where checkpoints and heads are anchored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Where every checkpoint and export head also goes: `file:PATH` (appended, synced),
    /// `syslog` (`/dev/log`), `syslog:unix:PATH`, `syslog:udp:HOST:PORT`, `syslog:tcp:HOST:PORT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anchors: Vec<String>,
    /// Audit exports running at once (default 4); more are refused with AUDIT_EXPORT_BUSY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_exports: Option<usize>,
}

impl AuditConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn max_concurrent_exports(&self) -> usize {
        self.max_concurrent_exports.unwrap_or(DEFAULT_MAX_CONCURRENT_EXPORTS).max(1)
    }
}

/// `[auth]`: identity mapping and revocation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `cn` (default), `san-uri` or `san-dns`.
    #[serde(default)]
    pub identity: IdentitySource,
    /// A deny list of certificate SHA-256 fingerprints, re-read when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<PathBuf>,
}

/// Server TLS: certificate and key, and the CA that signs client certificates.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// Where the master key lives.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum MasterConfig {
    /// A key file; optionally passphrase-protected (age scrypt format).
    Software {
        key_file: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        passphrase_file: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        passphrase_env: Option<String>,
    },
    /// A non-extractable AES-256 key on a PKCS#11 token.
    Pkcs11 {
        module: PathBuf,
        token_label: String,
        key_label: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pin_file: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pin_env: Option<String>,
        /// After the token went away, milliseconds between reconnect attempts (default 1000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reconnect_backoff_ms: Option<u64>,
    },
}

impl AuthConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl ServerConfig {
    /// Reads and validates a config file; relative paths become relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.to_owned(), source: e })?;
        let mut cfg: ServerConfig = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), source: Box::new(e) })?;
        if cfg.version != CONFIG_VERSION {
            return Err(ConfigError::Version { path: path.to_owned(), found: cfg.version });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base);
        Ok(cfg)
    }

    fn resolve(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.data_dir);
        abs(&mut self.tls.cert);
        abs(&mut self.tls.key);
        abs(&mut self.tls.client_ca);
        if let Some(p) = &mut self.auth.revoked {
            abs(p);
        }
        match &mut self.master {
            MasterConfig::Software { key_file, passphrase_file, .. } => {
                abs(key_file);
                if let Some(p) = passphrase_file {
                    abs(p);
                }
            }
            MasterConfig::Pkcs11 { pin_file, .. } => {
                if let Some(p) = pin_file {
                    abs(p);
                }
            }
        }
    }

    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join(STORE_FILE)
    }

    /// Writes the config as TOML (used by `kms-server dev`).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self)?;
        std::fs::write(path, text).map_err(|e| ConfigError::Write { path: path.to_owned(), source: e })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
version = 1
listen = "127.0.0.1:0"
data_dir = "data"
[tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
[master]
provider = "software"
key_file = "master.key"
[[grant]]
principal = "host1"
roles = ["sealer"]
keyrings = ["ehr-db"]
"#;

    #[test]
    fn loads_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kluis.toml");
        std::fs::write(&p, GOOD).unwrap();
        let c = ServerConfig::load(&p).unwrap();
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.grants.len(), 1);
        assert!(matches!(c.master, MasterConfig::Software { ref key_file, .. } if *key_file == dir.path().join("master.key")));
    }

    #[test]
    fn refuses_unknown_fields_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kluis.toml");
        std::fs::write(&p, GOOD.replace("[tls]", "colour = \"blue\"\n[tls]")).unwrap();
        let e = ServerConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        std::fs::write(&p, GOOD.replace("version = 1", "version = 2")).unwrap();
        assert!(matches!(ServerConfig::load(&p), Err(ConfigError::Version { found: 2, .. })));
        std::fs::write(&p, GOOD.replace("key_file = \"master.key\"", "key_file = \"m\"\npin = \"1234\"")).unwrap();
        assert!(ServerConfig::load(&p).is_err());
    }
}
