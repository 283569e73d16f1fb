//! Client configuration (`--client-config FILE` or `KLUIS_CLIENT_CONFIG`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Environment variable naming the client config file.
pub const CLIENT_CONFIG_ENV: &str = "KLUIS_CLIENT_CONFIG";
pub const CONFIG_VERSION: u32 = 1;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors reading a client config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("client config {path} could not be read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("client config {path} is not valid: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("client config {path} has version {found}; this client understands version {CONFIG_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("client key {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("no client config: pass --client-config FILE or set {CLIENT_CONFIG_ENV}")]
    Missing,
    /// A plain `http://` endpoint: Kluis speaks mutual TLS only.
    #[error("client config {path}: endpoint {endpoint:?} is plain http://; the Kluis server speaks mutual TLS only: use https://HOST:PORT")]
    PlainHttp { path: PathBuf, endpoint: String },
    /// An endpoint that is not `https://HOST:PORT`.
    #[error("client config {path}: endpoint {endpoint:?} is not https://HOST:PORT")]
    EndpointNotHttps { path: PathBuf, endpoint: String },
    /// A PEM private key encrypted with a passphrase (PKCS#8 `ENCRYPTED PRIVATE KEY`, or
    /// OpenSSL's legacy `Proc-Type: 4,ENCRYPTED`): this client never prompts.
    #[error("client key {path} is encrypted; encrypted private keys are not supported: decrypt it with `openssl pkey -in {path} -out PLAIN.key` (then `chmod 600 PLAIN.key`) and name that file as `key` in the client config")]
    EncryptedKey { path: PathBuf },
    /// The key file holds no PEM private key.
    #[error("client key {path} holds no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)")]
    NoPrivateKey { path: PathBuf },
    /// A certificate file (`what`: `cert` or `ca`) holds no PEM certificate.
    #[error("client config `{what}` {path} holds no PEM certificate")]
    NoCertificate { path: PathBuf, what: &'static str },
    /// A value outside its range; `field` is its TOML name, e.g. `retry.deadline_secs`.
    #[error("client config {path}: {field} = {value} is out of range; allowed: {min} to {max}")]
    Range { path: PathBuf, field: &'static str, value: u64, min: u64, max: u64 },
}

/// The `[retry]` table: how long a request is retried when the server is unavailable
/// (connection refused, reset or lost mid-request, UNAVAILABLE without a Kluis reason).
/// See `crate::retry` for what is retried and what never is.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Total time to keep retrying one request, seconds from its first attempt; 0 = never retry.
    pub deadline_secs: u64,
    /// Backoff before the first retry, milliseconds; doubles each time (with full jitter).
    pub initial_backoff_ms: u64,
    /// Cap of the backoff, milliseconds.
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { deadline_secs: 60, initial_backoff_ms: 100, max_backoff_ms: 5000 }
    }
}

impl RetryConfig {
    /// At most a day of retrying: a nightly job must end.
    pub const MAX_DEADLINE_SECS: u64 = 86_400;
    /// Backoffs from 1 ms to 5 minutes.
    pub const MAX_BACKOFF_MS: u64 = 300_000;

    pub fn deadline(&self) -> Duration {
        Duration::from_secs(self.deadline_secs)
    }

    pub fn initial_backoff(&self) -> Duration {
        Duration::from_millis(self.initial_backoff_ms)
    }

    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms)
    }

    /// Checks every value against its range, naming the field of the first one outside.
    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let range = |field: &'static str, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::Range { path: path.to_owned(), field, value, min, max })
            }
        };
        range("retry.deadline_secs", self.deadline_secs, 0, Self::MAX_DEADLINE_SECS)?;
        range("retry.initial_backoff_ms", self.initial_backoff_ms, 1, Self::MAX_BACKOFF_MS)?;
        range("retry.max_backoff_ms", self.max_backoff_ms, self.initial_backoff_ms, Self::MAX_BACKOFF_MS)
    }
}

/// Where the server is and how to authenticate to it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub version: u32,
    /// `https://host:port`
    pub endpoint: String,
    /// Name to verify in the server certificate (defaults to the endpoint's host).
    #[serde(default)]
    pub server_name: Option<String>,
    /// CA certificate that signed the server certificate (PEM).
    pub ca: PathBuf,
    /// This client's certificate and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Deadline of each request, seconds (default 30).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Deadline to establish the connection, seconds (default 10).
    #[serde(default)]
    pub connect_timeout_secs: Option<u64>,
    /// Retrying while the server is unavailable (default: for 60 s).
    #[serde(default)]
    pub retry: RetryConfig,
}

impl ClientConfig {
    /// Loads a config; relative paths are relative to the config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read { path: path.to_owned(), source: e })?;
        let mut cfg: ClientConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), source: Box::new(e) })?;
        if cfg.version != CONFIG_VERSION {
            return Err(ConfigError::Version { path: path.to_owned(), found: cfg.version });
        }
        cfg.retry.check(path)?;
        check_endpoint(path, &cfg.endpoint)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.ca, &mut cfg.cert, &mut cfg.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Loads from an explicit path, else from `KLUIS_CLIENT_CONFIG`.
    pub fn from_arg_or_env(arg: Option<&Path>) -> Result<Self, ConfigError> {
        match arg {
            Some(p) => Self::load(p),
            None => match std::env::var_os(CLIENT_CONFIG_ENV) {
                Some(p) => Self::load(Path::new(&p)),
                None => Err(ConfigError::Missing),
            },
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout_secs.map(Duration::from_secs).unwrap_or(DEFAULT_TIMEOUT)
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout_secs.map(Duration::from_secs).unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }

    /// Refuses a private key that group or others can read.
    pub fn check_key_permissions(&self) -> Result<(), ConfigError> {
        let meta = std::fs::metadata(&self.key).map_err(|e| ConfigError::Read { path: self.key.clone(), source: e })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ConfigError::KeyPermissions { path: self.key.clone(), mode });
        }
        Ok(())
    }
}

/// Refuses an endpoint that is not `https://...`, naming plain `http://` on its own.
fn check_endpoint(path: &Path, endpoint: &str) -> Result<(), ConfigError> {
    let scheme = endpoint.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("https") => Ok(()),
        Some("http") => Err(ConfigError::PlainHttp { path: path.to_owned(), endpoint: endpoint.to_owned() }),
        _ => Err(ConfigError::EndpointNotHttps { path: path.to_owned(), endpoint: endpoint.to_owned() }),
    }
}

/// The labels of the PEM blocks in `text` (`-----BEGIN LABEL-----`), each with whether
/// its RFC 1421 headers say `Proc-Type: 4,ENCRYPTED`.
fn pem_blocks(text: &str) -> Vec<(&str, bool)> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) else { continue };
        let mut encrypted = false;
        for l in lines.by_ref() {
            if l.starts_with("-----END ") {
                break;
            }
            if let Some((name, value)) = l.split_once(':')
                && name.trim().eq_ignore_ascii_case("Proc-Type")
                && value.split(',').any(|v| v.trim().eq_ignore_ascii_case("ENCRYPTED"))
            {
                encrypted = true;
            }
        }
        blocks.push((label, encrypted));
    }
    blocks
}

/// Checks the PEM key file before it goes to TLS: a key this client cannot use is named
/// (encrypted, or none at all) instead of failing deep in the TLS setup.
pub(crate) fn check_key_pem(path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    if PrivateKeyDer::from_pem_slice(pem).is_ok() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(pem);
    let encrypted = pem_blocks(&text).iter().any(|(label, proc_encrypted)| *label == "ENCRYPTED PRIVATE KEY" || *proc_encrypted);
    if encrypted {
        Err(ConfigError::EncryptedKey { path: path.to_owned() })
    } else {
        Err(ConfigError::NoPrivateKey { path: path.to_owned() })
    }
}

/// Checks that a PEM file (`what`: `cert` or `ca`) holds at least one certificate.
pub(crate) fn check_certificate_pem(path: &Path, pem: &[u8], what: &'static str) -> Result<(), ConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    match CertificateDer::pem_slice_iter(pem).next() {
        Some(Ok(_)) => Ok(()),
        _ => Err(ConfigError::NoCertificate { path: path.to_owned(), what }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    const BASE: &str = "version = 1\nendpoint = \"https://127.0.0.1:8443\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";

    fn load(extra: &str) -> Result<ClientConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("client.toml");
        std::fs::write(&p, format!("{BASE}{extra}")).unwrap();
        ClientConfig::load(&p)
    }

    #[test]
    fn a_plain_http_endpoint_is_refused_by_name() {
        for (endpoint, words) in [
            ("http://127.0.0.1:8443", "is plain http://; the Kluis server speaks mutual TLS only: use https://HOST:PORT"),
            ("HTTP://kms:8443", "is plain http://"),
            ("127.0.0.1:8443", "is not https://HOST:PORT"),
            ("grpc://kms:8443", "is not https://HOST:PORT"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("client.toml");
            std::fs::write(&p, BASE.replace("https://127.0.0.1:8443", endpoint)).unwrap();
            let e = ClientConfig::load(&p).unwrap_err();
            assert!(matches!(e, ConfigError::PlainHttp { .. } | ConfigError::EndpointNotHttps { .. }), "{e:?}");
            assert!(e.to_string().contains(words), "{endpoint}: {e}");
        }
        assert!(load("").is_ok());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("client.toml");
        std::fs::write(&p, BASE.replace("https://", "HTTPS://")).unwrap();
        ClientConfig::load(&p).unwrap();
    }

    #[test]
    fn an_encrypted_or_missing_key_is_named() {
        let p = Path::new("/etc/kluis/c.key");
        let pkcs8_encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIGjMF8GCSqGSIb3DQEFDTBSMDEGCSqGSIb3DQEFDDAkBBD=\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let e = check_key_pem(p, pkcs8_encrypted.as_bytes()).unwrap_err();
        assert!(matches!(e, ConfigError::EncryptedKey { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("encrypted private keys are not supported") && text.contains("openssl pkey -in /etc/kluis/c.key"), "{text}");
        let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,0123456789ABCDEF0123456789ABCDEF\n\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert!(matches!(check_key_pem(p, legacy.as_bytes()), Err(ConfigError::EncryptedKey { .. })));
        let cert_only = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = check_key_pem(p, cert_only.as_bytes()).unwrap_err();
        assert!(matches!(e, ConfigError::NoPrivateKey { .. }), "{e:?}");
        assert!(check_key_pem(p, b"").is_err());
        assert!(matches!(check_certificate_pem(p, b"not pem", "cert"), Err(ConfigError::NoCertificate { what: "cert", .. })));
    }

    #[test]
    fn retry_defaults_to_sixty_seconds() {
        let cfg = load("").unwrap();
        assert_eq!(cfg.retry, RetryConfig { deadline_secs: 60, initial_backoff_ms: 100, max_backoff_ms: 5000 });
        let cfg = load("[retry]\ndeadline_secs = 0\n").unwrap();
        assert_eq!(cfg.retry, RetryConfig { deadline_secs: 0, ..RetryConfig::default() });
        let cfg = load("[retry]\ndeadline_secs = 86400\ninitial_backoff_ms = 250\nmax_backoff_ms = 250\n").unwrap();
        assert_eq!((cfg.retry.deadline(), cfg.retry.initial_backoff(), cfg.retry.max_backoff()), (
            Duration::from_secs(86_400),
            Duration::from_millis(250),
            Duration::from_millis(250)
        ));
    }

    #[test]
    fn an_unknown_retry_field_is_refused_by_name() {
        let e = load("[retry]\ndeadline = 5\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert!(e.to_string().contains("unknown field `deadline`"), "{e}");
        let e = load("[retry]\ndeadline_secs = \"60\"\n").unwrap_err();
        assert!(e.to_string().contains("deadline_secs"), "{e}");
        let e = load("[retry]\ndeadline_secs = -1\n").unwrap_err();
        assert!(e.to_string().contains("deadline_secs"), "{e}");
    }

    #[test]
    fn out_of_range_retry_values_are_refused_naming_the_field() {
        for (extra, field) in [
            ("deadline_secs = 86401", "retry.deadline_secs = 86401"),
            ("initial_backoff_ms = 0", "retry.initial_backoff_ms = 0"),
            ("initial_backoff_ms = 300001", "retry.initial_backoff_ms = 300001"),
            ("max_backoff_ms = 300001", "retry.max_backoff_ms = 300001"),
            // The cap may not be below the first backoff.
            ("initial_backoff_ms = 500\nmax_backoff_ms = 499", "retry.max_backoff_ms = 499"),
        ] {
            let e = load(&format!("[retry]\n{extra}\n")).unwrap_err();
            assert!(matches!(e, ConfigError::Range { .. }), "{extra}: {e:?}");
            let text = e.to_string();
            assert!(text.contains(field) && text.contains("out of range"), "{extra}: {text}");
        }
    }
}
