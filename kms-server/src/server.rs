//! Start-up and the gRPC server: open the master key and the store, build the
//! key manager, serve KeyService, AdminService, health and reflection over mTLS.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kluis_proto::v1::admin_service_server::AdminServiceServer;
use kluis_proto::v1::audit_service_server::AuditServiceServer;
use kluis_proto::v1::key_service_server::KeyServiceServer;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::api::Api;
use crate::auth::{Authenticator, Policy, RevocationError, RevocationList};
use crate::health::HealthService;
use crate::metrics::Metrics;
use tonic_health::pb::health_server::HealthServer;
use crate::config::{ConfigError, MasterConfig, ServerConfig};
use crate::keys::{KeyError, KeyManager};
use crate::master::pkcs11::{Pkcs11MasterKey, Pkcs11Settings};
use crate::master::software::{PassphraseSource, SoftwareMasterKey, check_key_file_permissions};
use crate::master::{MasterError, MasterKeyProvider};
use crate::pki::PkiError;
use crate::store::{Store, StoreError};

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Master(#[from] MasterError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    #[error("TLS file {path} could not be read: {source}")]
    TlsFile { path: PathBuf, source: std::io::Error },
    #[error("TLS setup failed: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("could not listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("gRPC reflection setup failed: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error("the [master] PKCS#11 config needs pin_file or pin_env (the PIN is never inline in the config)")]
    PinSourceMissing,
    #[error(transparent)]
    Migrate(#[from] Box<crate::migrate::MigrateError>),
    #[error("could not create {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn passphrase_source(passphrase_file: &Option<PathBuf>, passphrase_env: &Option<String>) -> PassphraseSource {
    match (passphrase_file, passphrase_env) {
        (Some(f), _) => PassphraseSource::File(f.clone()),
        (None, Some(v)) => PassphraseSource::Env(v.clone()),
        (None, None) => PassphraseSource::None,
    }
}

/// The PKCS#11 settings of a `[master]` section, if it is one.
pub fn pkcs11_settings(cfg: &MasterConfig) -> Option<Result<Pkcs11Settings, ServerError>> {
    match cfg {
        MasterConfig::Pkcs11 { module, token_label, key_label, pin_file, pin_env, reconnect_backoff_ms } => Some(
            Pkcs11Settings::from_fields(module, token_label, key_label, pin_file, pin_env, *reconnect_backoff_ms)
                .ok_or(ServerError::PinSourceMissing),
        ),
        MasterConfig::Software { .. } => None,
    }
}

/// Opens the configured master-key provider (refusing unsafe key files).
pub fn open_master(cfg: &MasterConfig) -> Result<Arc<dyn MasterKeyProvider>, ServerError> {
    open_master_generation(cfg, 1)
}

/// Opens the configured master key at `generation` (the store's): a software key file
/// (or token key) of a later generation is opened without the configured (generation 1)
/// one, so an officer may remove that once no older copy of the store needs it.
pub fn open_master_generation(cfg: &MasterConfig, generation: u32) -> Result<Arc<dyn MasterKeyProvider>, ServerError> {
    match cfg {
        MasterConfig::Software { key_file, passphrase_file, passphrase_env } => Ok(Arc::new(
            SoftwareMasterKey::open_generation(key_file, generation, &passphrase_source(passphrase_file, passphrase_env))?,
        )),
        MasterConfig::Pkcs11 { .. } => match pkcs11_settings(cfg) {
            Some(s) => Ok(Arc::new(Pkcs11MasterKey::open_generation(&s?, generation)?)),
            None => Err(ServerError::PinSourceMissing),
        },
    }
}

/// `kms-server init`: creates the master key (software: a new key file) and an empty store.
pub fn init(cfg: &ServerConfig) -> Result<(), ServerError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| ServerError::Io { path: cfg.data_dir.clone(), source: e })?;
    let store_path = cfg.store_path();
    if store_path.exists() {
        return Err(StoreError::AlreadyExists { path: store_path }.into());
    }
    let master: Arc<dyn MasterKeyProvider> = match &cfg.master {
        MasterConfig::Software { key_file, passphrase_file, passphrase_env } => Arc::new(SoftwareMasterKey::create(
            key_file,
            &passphrase_source(passphrase_file, passphrase_env),
        )?),
        MasterConfig::Pkcs11 { .. } => match pkcs11_settings(&cfg.master) {
            Some(s) => Arc::new(Pkcs11MasterKey::create(&s?)?),
            None => return Err(ServerError::PinSourceMissing),
        },
    };
    let store = Store::create(&store_path)?;
    KeyManager::init_store(&store, master.as_ref())?;
    Ok(())
}

/// Opens master key and store and returns the key manager; every failure says why.
pub fn open_keys(cfg: &ServerConfig) -> Result<Arc<KeyManager>, ServerError> {
    let store = Store::open(&cfg.store_path())?;
    let generation = crate::master::decode_generation(store.get_meta(crate::keys::MASTER_GENERATION_META)?.as_deref())?;
    let master = open_master_generation(&cfg.master, generation)?;
    master.health()?;
    let ttl = cfg.approval_ttl_secs.unwrap_or(crate::keys::DEFAULT_APPROVAL_TTL_SECS);
    let wait = cfg.destruction_wait_days.unwrap_or(crate::keys::DEFAULT_DESTRUCTION_WAIT_DAYS);
    Ok(Arc::new(KeyManager::open(store, generation, master)?.with_approval_ttl(ttl).with_destruction_wait_days(wait)))
}

fn read(path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|e| ServerError::TlsFile { path: path.to_owned(), source: e })
}

/// Binds the listen address (port 0 picks a free port).
pub async fn bind(cfg: &ServerConfig) -> Result<tokio::net::TcpListener, ServerError> {
    tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ServerError::Bind { addr: cfg.listen, source: e })
}

/// Binds the metrics endpoint, if configured.
pub async fn bind_metrics(cfg: &ServerConfig) -> Result<Option<tokio::net::TcpListener>, ServerError> {
    match cfg.metrics_listen {
        None => Ok(None),
        Some(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|e| ServerError::Bind { addr, source: e }),
    }
}

/// Runs the scheduled work (rotation periods, due destructions, expired keys) every
/// `interval` (it also runs once at start, before the server listens).
async fn maintenance_loop(keys: Arc<KeyManager>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match keys.maintain().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(actions = n, "scheduled maintenance done"),
            Err(e) => tracing::error!(error = %e, "scheduled maintenance failed; retrying at the next tick"),
        }
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    cfg: &ServerConfig,
    keys: Arc<KeyManager>,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    check_key_file_permissions(&cfg.tls.key).map_err(|e| match e {
        MasterError::KeyFilePermissions { path, mode } => {
            ServerError::TlsFile { path, source: std::io::Error::other(format!("TLS key readable by group or others (mode {mode:o}); run chmod 600")) }
        }
        other => ServerError::Master(other),
    })?;
    let identity = Identity::from_pem(read(&cfg.tls.cert)?, read(&cfg.tls.key)?);
    let tls = ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(Certificate::from_pem(read(&cfg.tls.client_ca)?))
        .client_auth_optional(false);
    let policy = Arc::new(Policy::new(cfg.grants.clone()));
    policy.set_runtime(&keys.runtime_grants()?);
    let revoked = match &cfg.auth.revoked {
        Some(p) => Some(RevocationList::load(p)?),
        None => None,
    };
    let authn = Arc::new(Authenticator::new(cfg.auth.identity, revoked));
    let health_service = HealthServer::new(HealthService::new(keys.master().clone()));
    let metrics = Arc::new(Metrics::default());
    if let Some(l) = metrics_listener {
        tokio::spawn(crate::metrics::serve(l, metrics.clone(), keys.master().clone()));
    }
    // Work that fell due while the server was down is done before it answers anyone.
    match keys.maintain().await {
        Ok(n) => tracing::info!(actions = n, "start-up maintenance done"),
        Err(e) => tracing::error!(error = %e, "start-up maintenance failed; retrying on schedule"),
    }
    let interval = std::time::Duration::from_secs(cfg.maintenance_interval_secs.unwrap_or(60).max(1));
    tokio::spawn(maintenance_loop(keys.clone(), interval));
    let api = Api::new(keys, policy, authn, metrics);
    // Reflection v1 and the older v1alpha (still what many grpcurl builds ask for).
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kluis_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder().build_v1().map_err(ServerError::Reflection)?;
    let reflection_alpha = reflection_builder().build_v1alpha().map_err(ServerError::Reflection)?;

    Server::builder()
        .tls_config(tls)
        .map_err(ServerError::Tls)?
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(KeyServiceServer::new(api.clone()))
        .add_service(AdminServiceServer::new(api.clone()))
        .add_service(AuditServiceServer::new(api))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await
        .map_err(ServerError::Serve)
}
