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
        approval_ttl_secs: None,
        destruction_wait_days: None,
        maintenance_interval_secs: None,
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

/// Writes `DIR/clients/NAME.toml` for every dev identity, pointing at `addr`.
pub fn write_client_configs(dir: &Path, addr: SocketAddr) -> Result<PathBuf, StartupError> {
    let clients = dir.join("clients");
    create_private_dir(&clients)?;
    let pki_dir = dir.join("pki");
    let paths = DevPkiPaths::under(&pki_dir);
    for (name, _, _) in DEV_IDENTITIES {
        let text = format!(
            "# Kluis client config for the dev identity {name:?}, written by `kms-server dev`.\n\
             version = 1\n\
             endpoint = \"https://{addr}\"\n\
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
