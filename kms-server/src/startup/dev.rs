//! `kms-server dev`: a self-contained quick start in one directory (software
//! master key, throwaway CA and certificates, client configs, keyring `default`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::auth::{Grant, Role};
use crate::config::{CONFIG_VERSION, MasterConfig, ServerConfig, StoreConfig, TlsConfig};
use super::open::{StartupError, init};
use super::pki::{DevPkiPaths, create_dev_pki};

/// Dev identities and their roles. `dev` holds every role on every keyring.
pub const DEV_IDENTITIES: &[(&str, &[Role], &str)] = &[
    ("sealer", &[Role::Sealer], "default"),
    ("restorer", &[Role::Restorer], "default"),
    ("officer", &[Role::Officer], "*"),
    ("auditor", &[Role::Auditor], "*"),
    ("dev", &[Role::Sealer, Role::Restorer, Role::Officer, Role::Auditor], "*"),
];

/// The keyring every dev setup has.
pub const DEFAULT_KEYRING: &str = "default";

pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("server.toml")
}

/// The master key of a dev setup: a key file in the directory, or a PKCS#11 token.
pub enum DevMaster {
    Software,
    Pkcs11 { module: PathBuf, token_label: String, key_label: String, pin_file: PathBuf },
}

/// Creates the dev directory on first run; returns its config.
///
/// `store` is the store of a new directory (default: the redb file in it); a directory that
/// exists keeps the store its config names.
pub fn prepare(dir: &Path, listen: SocketAddr, master: DevMaster, store: &StoreConfig) -> Result<(ServerConfig, bool), StartupError> {
    let cfg_path = config_path(dir);
    if cfg_path.exists() {
        let mut cfg = ServerConfig::load(&cfg_path)?;
        // Compared by backend and URL only: a password_file or ca_file added to the
        // config by hand stays.
        if *store != StoreConfig::default() && (cfg.store.backend, &cfg.store.url) != (store.backend, &store.url) {
            return Err(StartupError::DevStore { config: cfg_path, store: cfg.store_describe() });
        }
        cfg.listen = listen;
        return Ok((cfg, false));
    }
    let existed = dir.exists();
    create_private_dir(dir)?;
    let made = make(dir, &cfg_path, listen, master, store);
    if made.is_err() && !existed {
        // Nothing half-made: a store that could not be reached leaves no directory whose
        // keys a second run would refuse to overwrite.
        let _ = std::fs::remove_dir_all(dir);
    }
    made.map(|cfg| (cfg, true))
}

/// Makes the PKI, the config, the master key and the store of a new dev directory.
fn make(dir: &Path, cfg_path: &Path, listen: SocketAddr, master: DevMaster, store: &StoreConfig) -> Result<ServerConfig, StartupError> {
    let pki_dir = dir.join("pki");
    let names: Vec<&str> = DEV_IDENTITIES.iter().map(|(n, _, _)| *n).collect();
    let pki = create_dev_pki(&pki_dir, &names)?;
    let cfg = ServerConfig {
        version: CONFIG_VERSION,
        listen,
        data_dir: dir.join("data"),
        metrics_listen: None,
        kmip_listen: None,
        kmip_keyring: Some(DEFAULT_KEYRING.to_owned()),
        kmip_escrow_dir: None,
        approval_ttl_secs: None,
        destruction_wait_days: None,
        maintenance_interval_secs: None,
        maintenance_lease_secs: None,
        scrub_interval_secs: None,
        tls: TlsConfig { cert: pki.server_cert, key: pki.server_key, client_ca: pki.ca_cert },
        master: match master {
            DevMaster::Software => {
                MasterConfig::Software { key_file: dir.join("master.key"), passphrase_file: None, passphrase_env: None }
            }
            DevMaster::Pkcs11 { module, token_label, key_label, pin_file } => {
                MasterConfig::Pkcs11 {
                    module,
                    token_label,
                    key_label,
                    pin_file: Some(pin_file),
                    pin_env: None,
                    reconnect_backoff_ms: None,
                }
            }
        },
        auth: Default::default(),
        limits: Default::default(),
        audit: Default::default(),
        store: store.clone(),
        grants: DEV_IDENTITIES
            .iter()
            .map(|(name, roles, ring)| Grant {
                principal: (*name).to_owned(),
                roles: roles.iter().copied().collect::<BTreeSet<_>>(),
                keyrings: vec![(*ring).to_owned()],
            })
            .collect(),
    };
    init(&cfg)?;
    cfg.save(cfg_path)?;
    Ok(cfg)
}

fn create_private_dir(dir: &Path) -> Result<(), StartupError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StartupError::Io { path: dir.to_owned(), source: e })
}

/// The most endpoints a client config may list (kms-client's `MAX_ENDPOINTS`).
pub const MAX_CLIENT_ENDPOINTS: usize = 16;

/// A `--client-endpoint` that the written client configs could not carry.
#[derive(Debug, thiserror::Error)]
pub enum DevEndpointError {
    #[error("--client-endpoint {endpoint:?} is not https://HOST:PORT (Kluis clients speak mutual TLS only)")]
    NotHttps { endpoint: String },
    #[error("--client-endpoint {endpoint:?} is named twice (or is this server's own address); name each server once")]
    Duplicate { endpoint: String },
    #[error("{count} endpoints with this server's own; a client config takes at most {MAX_CLIENT_ENDPOINTS}")]
    TooMany { count: usize },
}

/// Checks one `--client-endpoint` value: `https://` and a host (clap's value parser).
pub fn parse_client_endpoint(s: &str) -> Result<String, DevEndpointError> {
    let rest = s.get(..8).filter(|p| p.eq_ignore_ascii_case("https://")).map(|_| &s[8..]);
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with(['/', ':']) => Ok(s.to_owned()),
        _ => Err(DevEndpointError::NotHttps { endpoint: s.to_owned() }),
    }
}

/// This server's own endpoint first, then `extra` in order; refuses a repeat and more
/// than a client config takes.
pub fn client_endpoints(addr: SocketAddr, extra: &[String]) -> Result<Vec<String>, DevEndpointError> {
    let mut all = vec![format!("https://{addr}")];
    for e in extra {
        let norm = |s: &str| s.trim_end_matches('/').to_ascii_lowercase();
        if all.iter().any(|a| norm(a) == norm(e)) {
            return Err(DevEndpointError::Duplicate { endpoint: e.clone() });
        }
        all.push(e.clone());
    }
    if all.len() > MAX_CLIENT_ENDPOINTS {
        return Err(DevEndpointError::TooMany { count: all.len() });
    }
    Ok(all)
}

/// The endpoint line of a client config: `endpoint = "..."` for one, `endpoints = [...]` for several.
fn endpoint_line(endpoints: &[String]) -> String {
    match endpoints {
        [one] => format!("endpoint = {one:?}"),
        several => format!("endpoints = [{}]", several.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(", ")),
    }
}

/// Writes `DIR/clients/NAME.toml` for every dev identity, pointing at `endpoints` (this
/// server's own first; see [`client_endpoints`]).
pub fn write_client_configs(dir: &Path, endpoints: &[String]) -> Result<PathBuf, StartupError> {
    let endpoint_line = endpoint_line(endpoints);
    let clients = dir.join("clients");
    create_private_dir(&clients)?;
    let pki_dir = dir.join("pki");
    let paths = DevPkiPaths::under(&pki_dir);
    for (name, _, _) in DEV_IDENTITIES {
        let text = format!(
            "# Kluis client config for the dev identity {name:?}, written by `kms-server dev`.\n\
             version = 1\n\
             {endpoint_line}\n\
             server_name = \"localhost\"\n\
             ca = \"{ca}\"\n\
             cert = \"{cert}\"\n\
             key = \"{key}\"\n",
            ca = paths.ca_cert.display(),
            cert = DevPkiPaths::client_cert(&pki_dir, name).display(),
            key = DevPkiPaths::client_key(&pki_dir, name).display(),
        );
        let p = clients.join(format!("{name}.toml"));
        let tmp = clients.join(format!(".{name}.toml.tmp"));
        std::fs::write(&tmp, text).map_err(|e| StartupError::Io { path: tmp.clone(), source: e })?;
        std::fs::rename(&tmp, &p).map_err(|e| StartupError::Io { path: p.clone(), source: e })?;
    }
    Ok(clients)
}

/// Creates the dev keyring `name` as the server itself (audited as `kms-server dev`).
pub async fn bootstrap_keyring(keys: &crate::keys::KeyManager, name: &str) -> Result<(), crate::keys::KeyError> {
    let ev = keys.event("kms-server dev", "CreateKeyring", Some(name), None, crate::model::Outcome::ok_with("dev bootstrap"));
    keys.create_keyring_unchecked(name, 0, 0, ev).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn extra_endpoints_follow_this_servers_own() {
        let addr: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        assert_eq!(endpoint_line(&client_endpoints(addr, &[]).unwrap()), "endpoint = \"https://127.0.0.1:8443\"");
        let two = client_endpoints(addr, &["https://kms-b:8443".to_owned()]).unwrap();
        assert_eq!(endpoint_line(&two), "endpoints = [\"https://127.0.0.1:8443\", \"https://kms-b:8443\"]");
        let e = client_endpoints(addr, &["HTTPS://127.0.0.1:8443/".to_owned()]).unwrap_err();
        assert!(matches!(e, DevEndpointError::Duplicate { .. }), "{e:?}");
        let many: Vec<String> = (1..=16).map(|i| format!("https://kms{i}:8443")).collect();
        assert!(matches!(client_endpoints(addr, &many[..15]), Ok(v) if v.len() == 16));
        assert!(matches!(client_endpoints(addr, &many), Err(DevEndpointError::TooMany { count: 17 })));
    }

    #[test]
    fn a_client_endpoint_must_be_https_with_a_host() {
        assert_eq!(parse_client_endpoint("https://kms-b:8443").unwrap(), "https://kms-b:8443");
        for bad in ["http://kms-b:8443", "kms-b:8443", "https://", "https://:8443", "ftp://x", ""] {
            let e = parse_client_endpoint(bad).unwrap_err();
            assert!(e.to_string().contains("is not https://HOST:PORT"), "{bad}: {e}");
        }
    }
}
