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
/// The most servers one client config may name in `endpoints`.
pub const MAX_ENDPOINTS: usize = 16;

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
    /// A plain `http://` endpoint: Kluis speaks mutual TLS only. `field` is `endpoint`,
    /// or `endpoints[N]` (counted from 1).
    #[error("client config {path}: {field} {endpoint:?} is plain http://; the Kluis server speaks mutual TLS only: use https://HOST:PORT")]
    PlainHttp { path: PathBuf, field: String, endpoint: String },
    /// An endpoint that is not `https://HOST:PORT`.
    #[error("client config {path}: {field} {endpoint:?} is not https://HOST:PORT")]
    EndpointNotHttps { path: PathBuf, field: String, endpoint: String },
    /// Neither `endpoint` nor `endpoints`.
    #[error("client config {path}: no server: set `endpoint = \"https://HOST:PORT\"` (or `endpoints = [...]` for several servers)")]
    NoEndpoint { path: PathBuf },
    /// Both `endpoint` and `endpoints`.
    #[error("client config {path}: both `endpoint` and `endpoints` are set; use one of the two (`endpoints` for several servers)")]
    EndpointAndEndpoints { path: PathBuf },
    /// `endpoints = []`.
    #[error("client config {path}: `endpoints` is empty; name at least one server (https://HOST:PORT)")]
    EndpointsEmpty { path: PathBuf },
    /// More entries in `endpoints` than a client tries.
    #[error("client config {path}: `endpoints` has {count} entries; at most {MAX_ENDPOINTS} are allowed")]
    TooManyEndpoints { path: PathBuf, count: usize },
    /// The same server twice in `endpoints` (`field` is the second one, e.g. `endpoints[3]`).
    #[error("client config {path}: {field} {endpoint:?} repeats {first}; name each server once")]
    DuplicateEndpoint { path: PathBuf, field: String, endpoint: String, first: String },
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
///
/// In the file the server is `endpoint = "https://HOST:PORT"`, or several servers (replicas
/// of one Kluis service) are `endpoints = ["https://a:8443", "https://b:8443"]`: exactly one
/// of the two. Either way [`ClientConfig::endpoints`] holds them in order, at least one.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub version: u32,
    /// `https://host:port`, in the order they are tried; never empty, at most [`MAX_ENDPOINTS`].
    pub endpoints: Vec<String>,
    /// Name to verify in every server's certificate (defaults to each endpoint's own host).
    pub server_name: Option<String>,
    /// CA certificate that signed the server certificates (PEM).
    pub ca: PathBuf,
    /// This client's certificate and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Deadline of each request, seconds (default 30).
    pub timeout_secs: Option<u64>,
    /// Deadline to establish the connection, seconds (default 10).
    pub connect_timeout_secs: Option<u64>,
    /// Retrying while the server is unavailable (default: for 60 s).
    pub retry: RetryConfig,
}

/// The file as written: `endpoint` or `endpoints`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    version: u32,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    endpoints: Option<Vec<String>>,
    #[serde(default)]
    server_name: Option<String>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    timeout_secs: Option<u64>,
    #[serde(default)]
    connect_timeout_secs: Option<u64>,
    #[serde(default)]
    retry: RetryConfig,
}

impl ClientConfig {
    /// Loads a config; relative paths are relative to the config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read { path: path.to_owned(), source: e })?;
        let file: ConfigFile =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), source: Box::new(e) })?;
        if file.version != CONFIG_VERSION {
            return Err(ConfigError::Version { path: path.to_owned(), found: file.version });
        }
        file.retry.check(path)?;
        let endpoints = check_endpoints(path, file.endpoint, file.endpoints)?;
        let mut cfg = ClientConfig {
            version: file.version,
            endpoints,
            server_name: file.server_name,
            ca: file.ca,
            cert: file.cert,
            key: file.key,
            timeout_secs: file.timeout_secs,
            connect_timeout_secs: file.connect_timeout_secs,
            retry: file.retry,
        };
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

    /// The first endpoint (the only one of a config with `endpoint`).
    pub fn endpoint(&self) -> &str {
        self.endpoints.first().map(String::as_str).unwrap_or_default()
    }

    /// The endpoints for a message: `https://a:8443`, or `https://a:8443, https://b:8443`.
    pub fn endpoints_text(&self) -> String {
        self.endpoints.join(", ")
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

/// Exactly one of `endpoint` and `endpoints`; every entry `https://`, none twice, at most
/// [`MAX_ENDPOINTS`]. Each refusal names the field (`endpoints[N]`, counted from 1).
fn check_endpoints(path: &Path, one: Option<String>, several: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let path_buf = || path.to_owned();
    match (one, several) {
        (Some(_), Some(_)) => Err(ConfigError::EndpointAndEndpoints { path: path_buf() }),
        (None, None) => Err(ConfigError::NoEndpoint { path: path_buf() }),
        (Some(endpoint), None) => {
            check_endpoint(path, "endpoint", &endpoint)?;
            Ok(vec![endpoint])
        }
        (None, Some(list)) => {
            if list.is_empty() {
                return Err(ConfigError::EndpointsEmpty { path: path_buf() });
            }
            if list.len() > MAX_ENDPOINTS {
                return Err(ConfigError::TooManyEndpoints { path: path_buf(), count: list.len() });
            }
            for (i, endpoint) in list.iter().enumerate() {
                let field = format!("endpoints[{}]", i + 1);
                check_endpoint(path, &field, endpoint)?;
                if let Some(j) = list[..i].iter().position(|earlier| same_endpoint(earlier, endpoint)) {
                    return Err(ConfigError::DuplicateEndpoint {
                        path: path_buf(),
                        field,
                        endpoint: endpoint.clone(),
                        first: format!("endpoints[{}]", j + 1),
                    });
                }
            }
            Ok(list)
        }
    }
}

/// Two spellings of one server: scheme and host are case-insensitive, a trailing `/` is nothing.
fn same_endpoint(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim_end_matches('/').to_ascii_lowercase();
    norm(a) == norm(b)
}

/// Refuses an endpoint that is not `https://...`, naming plain `http://` on its own.
fn check_endpoint(path: &Path, field: &str, endpoint: &str) -> Result<(), ConfigError> {
    let scheme = endpoint.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
    let (path, field, endpoint) = (path.to_owned(), field.to_owned(), endpoint.to_owned());
    match scheme.as_deref() {
        Some("https") => Ok(()),
        Some("http") => Err(ConfigError::PlainHttp { path, field, endpoint }),
        _ => Err(ConfigError::EndpointNotHttps { path, field, endpoint }),
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

    /// A config with `endpoints = LIST` instead of `endpoint`.
    fn load_endpoints(list: &str) -> Result<ClientConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("client.toml");
        std::fs::write(&p, BASE.replace("endpoint = \"https://127.0.0.1:8443\"", &format!("endpoints = {list}"))).unwrap();
        ClientConfig::load(&p)
    }

    #[test]
    fn several_endpoints_are_kept_in_order() {
        let cfg = load_endpoints("[\"https://a.example:8443\", \"https://b.example:8443\", \"https://[::1]:8443\"]").unwrap();
        assert_eq!(cfg.endpoints, ["https://a.example:8443", "https://b.example:8443", "https://[::1]:8443"]);
        assert_eq!(cfg.endpoint(), "https://a.example:8443");
        assert_eq!(cfg.endpoints_text(), "https://a.example:8443, https://b.example:8443, https://[::1]:8443");
        let one = load("").unwrap();
        assert_eq!(one.endpoints, ["https://127.0.0.1:8443"]);
        let sixteen: Vec<String> = (1..=MAX_ENDPOINTS).map(|i| format!("\"https://kms{i}:8443\"")).collect();
        assert_eq!(load_endpoints(&format!("[{}]", sixteen.join(", "))).unwrap().endpoints.len(), 16);
    }

    #[test]
    fn bad_endpoint_lists_are_refused_naming_the_field() {
        let cases: &[(&str, &str)] = &[
            ("[]", "`endpoints` is empty"),
            ("[\"https://a:8443\", \"http://b:8443\"]", "endpoints[2] \"http://b:8443\" is plain http://"),
            ("[\"kms:8443\"]", "endpoints[1] \"kms:8443\" is not https://HOST:PORT"),
            ("[\"https://a:8443\", \"https://b:8443\", \"HTTPS://A:8443/\"]", "endpoints[3] \"HTTPS://A:8443/\" repeats endpoints[1]"),
            ("\"https://a:8443\"", "endpoints"),
            ("[1]", "endpoints"),
        ];
        for (list, words) in cases {
            let e = load_endpoints(list).unwrap_err();
            assert!(e.to_string().contains(words), "{list}: {e}");
        }
        let seventeen: Vec<String> = (1..=MAX_ENDPOINTS + 1).map(|i| format!("\"https://kms{i}:8443\"")).collect();
        let e = load_endpoints(&format!("[{}]", seventeen.join(", "))).unwrap_err();
        assert!(matches!(e, ConfigError::TooManyEndpoints { count: 17, .. }), "{e:?}");
        assert!(e.to_string().contains("`endpoints` has 17 entries; at most 16 are allowed"), "{e}");
        // Both, or neither.
        let e = load("endpoints = [\"https://b:8443\"]\n").unwrap_err();
        assert!(matches!(e, ConfigError::EndpointAndEndpoints { .. }), "{e:?}");
        assert!(e.to_string().contains("both `endpoint` and `endpoints` are set"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("client.toml");
        std::fs::write(&p, BASE.replace("endpoint = \"https://127.0.0.1:8443\"\n", "")).unwrap();
        let e = ClientConfig::load(&p).unwrap_err();
        assert!(matches!(e, ConfigError::NoEndpoint { .. }), "{e:?}");
        assert!(e.to_string().contains("no server: set `endpoint"), "{e}");
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
