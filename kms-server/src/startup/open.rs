//! `kms-server init` and opening the key manager of a config: the master key and the
//! store, checked against each other.

use std::path::PathBuf;
use std::sync::Arc;

use super::env::Environment;
use crate::audit::AuditChain;
use crate::config::{ConfigError, ServerConfig, StoreBackend};
use crate::keys::{KeyError, KeyManager};
use crate::master::MasterError;
use crate::store::redb::RedbStore;
use crate::store::postgres::{PgOptions, PostgresStore};
use crate::store::{Chain, Store, StoreError};

/// Why the server's key manager could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Master(#[from] MasterError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Pki(#[from] super::pki::PkiError),
    #[error(transparent)]
    Anchor(#[from] crate::audit::anchor::BadAnchor),
    #[error(transparent)]
    DevEndpoint(#[from] super::dev::DevEndpointError),
    #[error("{config} keeps its store in {store}; a dev directory keeps the store it was made with (use another --data-dir)")]
    DevStore { config: PathBuf, store: String },
    #[error("could not create {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// `kms-server init`: creates the master key (software: a new key file) and an empty store.
pub fn init(cfg: &ServerConfig) -> Result<(), StartupError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| StartupError::Io { path: cfg.data_dir.clone(), source: e })?;
    let store_path = cfg.store_path();
    if cfg.store.backend == StoreBackend::Redb && store_path.exists() {
        return Err(StoreError::AlreadyExists { store: store_path.display().to_string() }.into());
    }
    // The PostgreSQL schema is made first: a database that has one is refused before a
    // master key is made for it.
    let pg = match cfg.store.backend {
        StoreBackend::Redb => None,
        StoreBackend::Postgres => Some(open_store(cfg, AuditChain::new(), true)?),
    };
    let master = crate::master::create_configured(&cfg.master)?;
    let store = match pg {
        Some(store) => store,
        None => Arc::new(RedbStore::create(&store_path, AuditChain::new())?),
    };
    KeyManager::init_store(store, master.as_ref())?;
    Ok(())
}

/// Opens (or, with `create`, makes) the store a config names.
pub fn open_store(cfg: &ServerConfig, chain: Arc<dyn Chain>, create: bool) -> Result<Arc<dyn Store>, StartupError> {
    Ok(match cfg.store.backend {
        StoreBackend::Redb if create => Arc::new(RedbStore::create(&cfg.store_path(), chain)?),
        StoreBackend::Redb => Arc::new(RedbStore::open(&cfg.store_path(), chain)?),
        StoreBackend::Postgres => {
            let url = cfg.store.url.clone().ok_or_else(|| ConfigError::Store {
                path: cfg.data_dir.clone(),
                field: "url",
                problem: "is required with backend = \"postgres\"",
            })?;
            let opts = PgOptions { url, password: cfg.store.read_password()?, ca_file: cfg.store.ca_file.clone() };
            if create { Arc::new(PostgresStore::create(&opts, chain)?) } else { Arc::new(PostgresStore::open(&opts, chain)?) }
        }
    })
}

/// The KMIP escrow directory of the config, made (mode 0700) if absent; logged either way.
fn kmip_escrow_dir(cfg: &ServerConfig) -> Result<Option<PathBuf>, StartupError> {
    let Some(dir) = &cfg.kmip_escrow_dir else {
        tracing::info!("kmip_escrow_dir is not set: no escrow bundle of KMIP objects is written");
        return Ok(None);
    };
    if !dir.is_dir() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StartupError::Io { path: dir.clone(), source: e })?;
    }
    tracing::info!(dir = %dir.display(), "KMIP objects are escrowed to the recovery recipient in this directory");
    Ok(Some(dir.clone()))
}

/// Opens master key and store and returns the key manager; every failure says why.
pub fn open_keys(cfg: &ServerConfig, env: &Environment) -> Result<Arc<KeyManager>, StartupError> {
    let chain = AuditChain::new();
    let anchors = cfg.audit.anchors.iter().map(|a| a.parse()).collect::<Result<Vec<_>, _>>()?;
    chain.set_anchors(anchors).map_err(KeyError::from)?;
    let store = env.store(open_store(cfg, chain.clone(), false)?);
    let generation = crate::master::decode_generation(
        store.get(crate::store::Table::Meta, crate::keys::MASTER_GENERATION_META.as_bytes())?.as_deref(),
    )?;
    let master = crate::master::open_configured(&cfg.master, generation)?;
    master.health()?;
    let ttl = cfg.approval_ttl_secs.unwrap_or(crate::keys::DEFAULT_APPROVAL_TTL_SECS);
    let wait = cfg.destruction_wait_days.unwrap_or(crate::keys::DEFAULT_DESTRUCTION_WAIT_DAYS);
    Ok(Arc::new(
        KeyManager::open(store, &chain, generation, master, env.clock.clone())?
            .with_approval_ttl(ttl)
            .with_destruction_wait_days(wait)
            .with_scrub_interval_secs(cfg.scrub_interval_secs.unwrap_or(crate::keys::DEFAULT_SCRUB_INTERVAL_SECS))
            .with_kmip_escrow_dir(kmip_escrow_dir(cfg)?),
    ))
}

