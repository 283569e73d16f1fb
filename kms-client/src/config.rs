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
