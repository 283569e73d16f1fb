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

/// Largest config file read (the server config is a few KiB; grants make it grow slowly).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} could not be read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is larger than {cap} bytes; refusing to read it")]
    TooLarge { path: PathBuf, cap: u64 },
    #[error("config file {path} is not UTF-8 text (byte {offset})")]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("config file {path}{at}{fpath}: {message}", at = fmt_at(.line, .column), fpath = fmt_field(.field))]
    Parse { path: PathBuf, line: Option<usize>, column: Option<usize>, field: String, message: String },
    #[error("config file {path}: [limits] {field} must be at least 1")]
    Limit { path: PathBuf, field: &'static str },
    #[error("config file {path}: {field} must be between {min} and {max}")]
    Range { path: PathBuf, field: &'static str, min: u64, max: u64 },
    #[error("{role} file {path} could not be read: {source}")]
    File { role: &'static str, path: PathBuf, source: std::io::Error },
    #[error("config file {path} has version {found}; this kms-server understands version {CONFIG_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("config file {path} could not be written: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: [store] {field} {problem}")]
    Store { path: PathBuf, field: &'static str, problem: &'static str },
    #[error("config could not be serialised: {0}")]
    Serialize(#[from] toml::ser::Error),
}

fn fmt_at(line: &Option<usize>, column: &Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(", line {l}, column {c}"),
        (Some(l), None) => format!(", line {l}"),
        _ => String::new(),
    }
}

fn fmt_field(field: &str) -> String {
    if field.is_empty() || field == "." { String::new() } else { format!(", field `{field}`") }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
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
    /// Replicas on one store: how long the replica doing the scheduled work may go without
    /// renewing its lease before another takes the work over, seconds (default 10, 1 to
    /// 3600). The holder renews every quarter of it and stops at half of it; the work
    /// moves within 1.25 times it of the holder's last renewal (`keys::lease`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_lease_secs: Option<u64>,
    /// Least time between two scrubs of the store, seconds (default 86400). A scrub
    /// rewrites the store file so that the bytes of destroyed key material are gone from
    /// it; it runs with the scheduled work when something was destroyed since the last
    /// one, and commits wait while it copies (docs/benchmarks.md, "Store scrub").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub_interval_secs: Option<u64>,
    /// Plain-HTTP Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9464`; off if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// KMIP over mutual TLS (the same certificate, CA and principals as gRPC), e.g.
    /// `0.0.0.0:5696`; an address without a port gets KMIP's 5696. Off if absent.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "kmip_listen")]
    pub kmip_listen: Option<SocketAddr>,
    /// The keyring KMIP objects go to for a client whose `sealer` grants do not name exactly
    /// one keyring (such a client's objects go to that one). Absent: such a client cannot
    /// create objects (Permission Denied, naming this setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kmip_keyring: Option<String>,
    /// Where the escrow bundle of KMIP objects is written (docs/kmip-escrow.md): one age
    /// file per object with its material, one with its state, encrypted to the installed
    /// recovery recipient, written durably before an object is made or changes state. A
    /// directory that can sit beside the backups; made at start if absent. Absent: no
    /// bundle is written (the log says so at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kmip_escrow_dir: Option<PathBuf>,
    pub tls: TlsConfig,
    pub master: MasterConfig,
    /// How client certificates become principals, and which are revoked.
    #[serde(default, skip_serializing_if = "AuthConfig::is_default")]
    pub auth: AuthConfig,
    /// Connection limits of the TLS listener.
    #[serde(default, skip_serializing_if = "Limits::is_default")]
    pub limits: Limits,
    /// Who may do what on which keyrings. Anything not granted is refused.
    #[serde(default, rename = "grant")]
    pub grants: Vec<Grant>,
    /// `[audit]`: exports and anchors of the audit trail.
    #[serde(default, skip_serializing_if = "AuditConfig::is_default")]
    pub audit: AuditConfig,
    /// `[store]`: where the keys and the audit trail are kept (default: the redb file in `data_dir`).
    #[serde(default, skip_serializing_if = "StoreConfig::is_default")]
    pub store: StoreConfig,
}

/// KMIP's registered port (IANA), used when `kmip_listen` names only an address.
pub const KMIP_PORT: u16 = 5696;

fn kmip_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Some(a));
    }
    match s.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(Some(SocketAddr::new(ip, KMIP_PORT))),
        Err(_) => Err(serde::de::Error::custom(format!("`{s}` is not an address like 0.0.0.0:5696, 127.0.0.1 or [::1]:5696"))),
    }
}

/// Largest store password file read.
pub const MAX_PASSWORD_BYTES: u64 = 4096;

/// Which store the server keeps its data in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One redb file, `data_dir/kluis.redb`.
    #[default]
    Redb,
    /// A PostgreSQL database (`url`), which several kms-server replicas can share.
    Postgres,
}

/// `[store]`: the store backend and, for PostgreSQL, how to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `redb` (default) or `postgres`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// PostgreSQL: a libpq URL or key/value string, e.g.
    /// `postgresql://kluis@db1,db2/kluis?target_session_attrs=read-write`; never with a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// PostgreSQL: a file holding the password (one line, at most 4096 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PostgreSQL: CA certificates (PEM) the database server's certificate must chain to;
    /// with it the connection uses TLS (rustls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl StoreConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Refuses what does not fit the backend, and a URL that is not libpq's or carries a
    /// password; `path` names the config in the message.
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: &'static str, problem: &'static str| ConfigError::Store { path: path.to_owned(), field, problem };
        match self.backend {
            StoreBackend::Redb => {
                for (field, set) in
                    [("url", self.url.is_some()), ("password_file", self.password_file.is_some()), ("ca_file", self.ca_file.is_some())]
                {
                    if set {
                        return Err(bad(field, "is only read with backend = \"postgres\""));
                    }
                }
                Ok(())
            }
            StoreBackend::Postgres => {
                let url = self.url.as_deref().ok_or_else(|| bad("url", "is required with backend = \"postgres\""))?;
                match crate::store::postgres::check_url(url) {
                    Ok(()) => Ok(()),
                    Err(crate::store::StoreError::UrlPassword) => {
                        Err(bad("url", "carries a password; put the password in [store] password_file instead"))
                    }
                    Err(_) => Err(bad("url", "is not a libpq connection URL (postgresql://...) or key=value string")),
                }
            }
        }
    }

    /// Reads the password file (at most [`MAX_PASSWORD_BYTES`]; one trailing newline dropped).
    pub fn read_password(&self) -> Result<Option<zeroize::Zeroizing<String>>, ConfigError> {
        use std::io::Read as _;
        let Some(path) = &self.password_file else { return Ok(None) };
        let err = |e| ConfigError::File { role: "store password", path: path.clone(), source: e };
        let mut bytes = zeroize::Zeroizing::new(Vec::new());
        std::fs::File::open(path).and_then(|f| f.take(MAX_PASSWORD_BYTES + 1).read_to_end(&mut bytes)).map_err(err)?;
        if bytes.len() as u64 > MAX_PASSWORD_BYTES {
            return Err(err(std::io::Error::new(std::io::ErrorKind::InvalidData, "larger than 4096 bytes")));
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text")))?;
        let line = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(text);
        if line.is_empty() || line.contains('\n') {
            return Err(err(std::io::Error::new(std::io::ErrorKind::InvalidData, "must hold the password on one line")));
        }
        Ok(Some(zeroize::Zeroizing::new(line.to_owned())))
    }
}

/// The longest `maintenance_lease_secs`.
pub const MAX_LEASE_SECS: u64 = 3600;

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
    /// X.509 CRL files (PEM or DER) of the client CAs, checked at the TLS handshake and
    /// re-read when they change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crl: Vec<PathBuf>,
}

/// `[limits]`: what a connection may hold before it does anything useful.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Seconds a client has to finish the TLS handshake (default 10).
    pub handshake_timeout_secs: u64,
    /// Seconds a connection may go without any traffic before it is closed (default 300).
    pub idle_timeout_secs: u64,
    /// Most connections open at once, handshakes included (default 1024); more are closed at accept.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { handshake_timeout_secs: 10, idle_timeout_secs: 300, max_connections: 1024 }
    }
}

impl Limits {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
    pub fn handshake_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.handshake_timeout_secs)
    }
    pub fn idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.idle_timeout_secs)
    }
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
        use std::io::Read as _;
        let read_err = |e| ConfigError::Read { path: path.to_owned(), source: e };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes))
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge { path: path.to_owned(), cap: MAX_CONFIG_BYTES });
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| ConfigError::NotUtf8 { path: path.to_owned(), offset: e.utf8_error().valid_up_to() })?;
        let mut cfg = Self::parse(path, &text)?;
        if cfg.version != CONFIG_VERSION {
            return Err(ConfigError::Version { path: path.to_owned(), found: cfg.version });
        }
        for (field, v) in [
            ("handshake_timeout_secs", cfg.limits.handshake_timeout_secs),
            ("idle_timeout_secs", cfg.limits.idle_timeout_secs),
            ("max_connections", cfg.limits.max_connections as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::Limit { path: path.to_owned(), field });
            }
        }
        if let Some(v) = cfg.maintenance_lease_secs
            && !(1..=MAX_LEASE_SECS).contains(&v)
        {
            return Err(ConfigError::Range { path: path.to_owned(), field: "maintenance_lease_secs", min: 1, max: MAX_LEASE_SECS });
        }
        cfg.store.check(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base);
        Ok(cfg)
    }

    /// Parses TOML; an error names the line, column and field path.
    fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let parse_err = |e: toml::de::Error, field: String| {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_column(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            ConfigError::Parse { path: path.to_owned(), line, column, field, message: e.message().replace('\n', " ") }
        };
        let de = toml::Deserializer::parse(text).map_err(|e| parse_err(e, String::new()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            parse_err(e.into_inner(), field)
        })
    }

    /// Checks that every file the server reads at start exists and is readable, naming
    /// each missing one by its role.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let mut files: Vec<(&'static str, &Path)> =
            vec![("TLS certificate", &self.tls.cert), ("TLS key", &self.tls.key), ("CA", &self.tls.client_ca)];
        if let Some(p) = &self.store.password_file {
            files.push(("store password", p));
        }
        if let Some(p) = &self.store.ca_file {
            files.push(("store CA", p));
        }
        if let Some(p) = &self.auth.revoked {
            files.push(("revocation list", p));
        }
        files.extend(self.auth.crl.iter().map(|p| ("CRL", p.as_path())));
        match &self.master {
            MasterConfig::Software { passphrase_file, .. } => {
                // Not the key file: after a rotation the store needs generation N's file
                // (`key_file` + `.gN`), not the configured one, and opening the master key
                // names the file of the generation it needs.
                if let Some(p) = passphrase_file {
                    files.push(("passphrase", p));
                }
            }
            MasterConfig::Pkcs11 { module, pin_file, .. } => {
                // A bare module name is found by the dynamic loader's search path.
                if module.is_absolute() {
                    files.push(("PKCS#11 module", module));
                }
                if let Some(p) = pin_file {
                    files.push(("PIN", p));
                }
            }
        }
        for (role, path) in files {
            let opened = std::fs::File::open(path).and_then(|f| {
                if f.metadata()?.is_dir() {
                    Err(std::io::Error::other("is a directory"))
                } else {
                    Ok(())
                }
            });
            opened.map_err(|e| ConfigError::File { role, path: path.to_owned(), source: e })?;
        }
        Ok(())
    }

    fn resolve(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.data_dir);
        if let Some(p) = &mut self.kmip_escrow_dir {
            abs(p);
        }
        if let Some(p) = &mut self.store.password_file {
            abs(p);
        }
        if let Some(p) = &mut self.store.ca_file {
            abs(p);
        }
        abs(&mut self.tls.cert);
        abs(&mut self.tls.key);
        abs(&mut self.tls.client_ca);
        if let Some(p) = &mut self.auth.revoked {
            abs(p);
        }
        for p in &mut self.auth.crl {
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

    /// The store, for messages: the redb file's path or the PostgreSQL URL (no password).
    pub fn store_describe(&self) -> String {
        match (self.store.backend, &self.store.url) {
            (StoreBackend::Postgres, Some(url)) => url.clone(),
            _ => self.store_path().display().to_string(),
        }
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

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("kluis.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_config_over_the_cap_is_refused_naming_file_and_cap() {
        let dir = tempfile::tempdir().unwrap();
        let big = format!("{GOOD}\n{}", "# padding padding padding\n".repeat(50_000));
        let p = write(dir.path(), &big);
        let e = ServerConfig::load(&p).unwrap_err();
        assert!(matches!(e, ConfigError::TooLarge { cap: MAX_CONFIG_BYTES, .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&p.display().to_string()) && msg.contains("1048576"), "{msg}");
    }

    #[test]
    fn an_unknown_field_names_line_column_and_field_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &GOOD.replace("client_ca = \"ca.pem\"", "client_ca = \"ca.pem\"\ncolour = \"blue\""));
        let e = ServerConfig::load(&p).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Parse { line: Some(9), .. }), "{msg}");
        assert!(msg.contains("line 9, column 1") && msg.contains("colour"), "{msg}");
        assert!(msg.contains("field `tls`") || msg.contains("field `tls.colour`"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn a_wrong_type_names_the_field_path_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &format!("{GOOD}\n[limits]\nmax_connections = \"many\"\n"));
        let msg = ServerConfig::load(&p).unwrap_err().to_string();
        assert!(msg.contains("field `limits.max_connections`") && msg.contains("line 18"), "{msg}");
        let p = write(dir.path(), &GOOD.replace("roles = [\"sealer\"]", "roles = [\"sealer\", \"janitor\"]"));
        let msg = ServerConfig::load(&p).unwrap_err().to_string();
        assert!(msg.contains("field `grant[0].roles[1]`") && msg.contains("janitor") && msg.contains("line 14"), "{msg}");
    }

    #[test]
    fn a_toml_syntax_error_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &GOOD.replace("[master]", "[master"));
        let e = ServerConfig::load(&p).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { line: Some(9), .. }), "{e}");
    }

    #[test]
    fn non_utf8_is_refused_with_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kluis.toml");
        std::fs::write(&p, b"version = 1\n\xff\n").unwrap();
        assert!(matches!(ServerConfig::load(&p), Err(ConfigError::NotUtf8 { offset: 12, .. })));
    }

    #[test]
    fn limits_default_parse_and_refuse_zero() {
        let dir = tempfile::tempdir().unwrap();
        let c = ServerConfig::load(&write(dir.path(), GOOD)).unwrap();
        assert_eq!(c.limits, Limits { handshake_timeout_secs: 10, idle_timeout_secs: 300, max_connections: 1024 });
        let c = ServerConfig::load(&write(dir.path(), &format!("{GOOD}\n[limits]\nmax_connections = 2\n"))).unwrap();
        assert_eq!(c.limits, Limits { max_connections: 2, ..Limits::default() });
        let e = ServerConfig::load(&write(dir.path(), &format!("{GOOD}\n[limits]\nidle_timeout_secs = 0\n"))).unwrap_err();
        assert!(e.to_string().contains("[limits] idle_timeout_secs must be at least 1"), "{e}");
        let e = ServerConfig::load(&write(dir.path(), &format!("{GOOD}\n[limits]\nidle_timeout = 5\n"))).unwrap_err();
        assert!(e.to_string().contains("idle_timeout"), "{e}");
    }

    #[test]
    fn the_maintenance_lease_time_is_bounded_and_named_when_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        let with = |line: &str| GOOD.replacen("version = 1\n", &format!("version = 1\n{line}\n"), 1);
        assert_eq!(ServerConfig::load(&write(dir.path(), GOOD)).unwrap().maintenance_lease_secs, None);
        assert_eq!(ServerConfig::load(&write(dir.path(), &with("maintenance_lease_secs = 3600"))).unwrap().maintenance_lease_secs, Some(3600));
        for bad in ["maintenance_lease_secs = 0", "maintenance_lease_secs = 3601"] {
            let e = ServerConfig::load(&write(dir.path(), &with(bad))).unwrap_err();
            assert!(e.to_string().contains("maintenance_lease_secs must be between 1 and 3600"), "{bad}: {e}");
        }
    }

    #[test]
    fn crl_paths_resolve_and_check_files_names_each_missing_file_by_role() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{GOOD}\n[auth]\nrevoked = \"revoked.txt\"\ncrl = [\"ca.crl\", \"sub.crl\"]\n");
        let c = ServerConfig::load(&write(dir.path(), &text)).unwrap();
        assert_eq!(c.auth.crl, vec![dir.path().join("ca.crl"), dir.path().join("sub.crl")]);
        let expect = |role: &str, file: &str| {
            let e = c.check_files().unwrap_err();
            assert!(matches!(&e, ConfigError::File { role: r, path, .. } if *r == role && *path == dir.path().join(file)), "{e}");
            assert!(e.to_string().starts_with(&format!("{role} file {}", dir.path().join(file).display())), "{e}");
            std::fs::write(dir.path().join(file), "x").unwrap();
        };
        expect("TLS certificate", "server.pem");
        expect("TLS key", "server.key");
        expect("CA", "ca.pem");
        expect("revocation list", "revoked.txt");
        expect("CRL", "ca.crl");
        expect("CRL", "sub.crl");
        // The master key file is named by the master key's own open, which knows the
        // generation the store needs (after a rotation, not the configured file).
        c.check_files().unwrap();
    }

    #[test]
    fn the_store_section_defaults_to_redb_and_chooses_postgres() {
        let dir = tempfile::tempdir().unwrap();
        let c = ServerConfig::load(&write(dir.path(), GOOD)).unwrap();
        assert_eq!(c.store, StoreConfig::default());
        assert_eq!(c.store.backend, StoreBackend::Redb);
        let text = format!(
            "{GOOD}\n[store]\nbackend = \"postgres\"\nurl = \"postgresql://kluis@db1,db2/kluis?target_session_attrs=read-write\"\npassword_file = \"pg.pw\"\n"
        );
        let c = ServerConfig::load(&write(dir.path(), &text)).unwrap();
        assert_eq!(c.store.backend, StoreBackend::Postgres);
        assert_eq!(c.store.password_file, Some(dir.path().join("pg.pw")));
        assert_eq!(c.store_describe(), "postgresql://kluis@db1,db2/kluis?target_session_attrs=read-write");
        // The password file is a file the server needs: named by role when missing.
        for f in ["server.pem", "server.key", "ca.pem"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let e = c.check_files().unwrap_err();
        assert!(matches!(&e, ConfigError::File { role: "store password", .. }), "{e}");
        let text = format!("{GOOD}\n[store]\nbackend = \"postgres\"\nurl = \"host=/run/postgresql user=kluis dbname=kluis\"\n");
        ServerConfig::load(&write(dir.path(), &text)).unwrap();
    }

    #[test]
    fn a_bad_store_section_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let refused = |section: &str, needle: &str| {
            let e = ServerConfig::load(&write(dir.path(), &format!("{GOOD}\n[store]\n{section}\n"))).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(needle), "{section}: {msg}");
            assert!(!msg.contains("s3cret"), "the password is never in a message: {msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        };
        refused("backend = \"postgres\"\nurl = \"postgresql://kluis:s3cret@db/kluis\"", "[store] url carries a password");
        refused("backend = \"postgres\"\nurl = \"host=db user=kluis password=s3cret\"", "[store] url carries a password");
        refused("backend = \"postgres\"", "[store] url is required");
        refused("backend = \"postgres\"\nurl = \"mysql://db/kluis\"", "[store] url is not a libpq connection URL");
        refused("url = \"postgresql://kluis@db/kluis\"", "[store] url is only read with backend = \"postgres\"");
        refused("backend = \"sqlite\"", "sqlite");
        refused("backend = \"postgres\"\nurl = \"postgresql://kluis@db/kluis\"\npassword = \"s3cret\"", "unknown field `password`");
    }

    #[test]
    fn the_store_password_file_is_read_capped_and_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pg.pw");
        let store = StoreConfig {
            backend: StoreBackend::Postgres,
            url: Some("postgresql://kluis@db/kluis".into()),
            password_file: Some(pw.clone()),
            ca_file: None,
        };
        std::fs::write(&pw, "correct horse\n").unwrap();
        assert_eq!(store.read_password().unwrap().as_deref().map(String::as_str), Some("correct horse"));
        std::fs::write(&pw, "a\nb\n").unwrap();
        assert!(store.read_password().unwrap_err().to_string().contains("one line"));
        std::fs::write(&pw, "").unwrap();
        assert!(store.read_password().is_err());
        std::fs::write(&pw, "x".repeat(MAX_PASSWORD_BYTES as usize + 1)).unwrap();
        let e = store.read_password().unwrap_err().to_string();
        assert!(e.contains("store password") && e.contains("larger than 4096 bytes"), "{e}");
    }
}
