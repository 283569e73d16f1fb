//! The gRPC server: serves KeyService, AdminService, AuditService, health and
//! reflection over mTLS for a key manager that start-up opened, and runs the
//! scheduled work.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kluis_proto::v1::admin_service_server::AdminServiceServer;
use kluis_proto::v1::audit_service_server::AuditServiceServer;
use kluis_proto::v1::key_service_server::KeyServiceServer;
use tonic::transport::Server;

use crate::api::{Api, validate};
use crate::auth::{Authenticator, Policy, RevocationError, RevocationList};
use crate::health::{HealthService, Probe};
use crate::metrics::Metrics;
use tonic_health::pb::health_server::HealthServer;
use crate::config::ServerConfig;
use crate::keys::{KeyError, KeyManager};
use crate::master::MasterError;
use crate::master::software::check_key_file_permissions;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Master(#[from] MasterError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    #[error("{role} {path} could not be read: {source}")]
    TlsFile { role: &'static str, path: PathBuf, source: std::io::Error },
    #[error("TLS setup failed: {0}")]
    Tls(#[source] crate::tls::TlsSetupError),
    #[error("could not listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("gRPC reflection setup failed: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
}

fn read(role: &'static str, path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|e| ServerError::TlsFile { role, path: path.to_owned(), source: e })
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
        // Here, not in the start-up run: the keys are already gone for the server, only their
        // bytes are left, and a restart should not wait for a copy of the whole store.
        if let Err(e) = keys.scrub_if_due().await {
            tracing::error!(error = %e, "store scrub failed; retrying at the next tick");
        }
    }
}

/// How often a replica looks for changes another replica made ([`KeyManager::sync`]): the
/// bound on how late a change reaches it (a destroyed key or retired version is checked at
/// each unwrap, at once).
pub const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Brings the state up to the store's every [`SYNC_INTERVAL`], and the runtime grants to
/// the state loaded (whoever loaded it: this poll or an unwrap). A failed poll keeps what
/// is in force; it is logged once, and once more when polls succeed again.
async fn sync_loop(keys: Arc<KeyManager>, policy: Arc<Policy>) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut applied = keys.loaded_epoch();
    loop {
        tick.tick().await;
        let r = keys.sync().await.and_then(|_| {
            let loaded = keys.loaded_epoch();
            if loaded != applied {
                policy.set_runtime(&keys.runtime_grants()?);
                tracing::info!(epoch = %loaded.as_deref().map(hex::encode).unwrap_or_default(), "runtime grants in force");
                applied = loaded;
            }
            Ok(())
        });
        match r {
            Ok(()) if failing => {
                failing = false;
                tracing::warn!("state poll works again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "state poll failed; the state in force is kept");
            }
            Err(_) => {}
        }
    }
}

/// The TLS listener's configuration, checked before the server announces itself, and
/// the metrics it counts into.
pub struct Prepared {
    tls: crate::tls::Tls,
    metrics: Arc<Metrics>,
    revoked: Option<RevocationList>,
}

/// Reads the TLS certificate, key, client CA, CRLs and the revocation list; any problem
/// is an error naming the file.
pub fn prepare(cfg: &ServerConfig) -> Result<Prepared, ServerError> {
    check_key_file_permissions(&cfg.tls.key).map_err(|e| match e {
        MasterError::KeyFilePermissions { path, mode } => {
            ServerError::TlsFile { role: "TLS key", path, source: std::io::Error::other(format!("readable by group or others (mode {mode:o}); run chmod 600")) }
        }
        // The check is the master key file's; a missing or unreadable file here is the TLS key.
        MasterError::ReadKeyFile { path, source } => ServerError::TlsFile { role: "TLS key", path, source },
        other => ServerError::Master(other),
    })?;
    let metrics = Arc::new(Metrics::default());
    let tls = crate::tls::Tls::new(
        (&cfg.tls.cert, &read("TLS certificate", &cfg.tls.cert)?),
        (&cfg.tls.key, &read("TLS key", &cfg.tls.key)?),
        (&cfg.tls.client_ca, &read("CA", &cfg.tls.client_ca)?),
        &cfg.auth.crl,
        metrics.clone(),
    )
    .map_err(ServerError::Tls)?;
    let revoked = match &cfg.auth.revoked {
        Some(p) => Some(RevocationList::load(p)?.with_failure_counter(metrics.reload_failure_counter())),
        None => None,
    };
    Ok(Prepared { tls, metrics, revoked })
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    cfg: &ServerConfig,
    keys: Arc<KeyManager>,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    prepared: Prepared,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let Prepared { tls, metrics, revoked } = prepared;
    let policy = Arc::new(Policy::new(cfg.grants.clone()));
    policy.set_runtime(&keys.runtime_grants()?);
    let authn = Arc::new(Authenticator::new(cfg.auth.identity, revoked));
    let probe = Probe::new(keys.master().clone(), keys.store());
    let health_service = HealthServer::new(HealthService::new(probe.clone()));
    metrics.attach_audit_counters(keys.audit_counters());
    if let Some(l) = metrics_listener {
        tokio::spawn(crate::metrics::serve(l, metrics.clone(), probe));
    }
    // Work that fell due while the server was down is done before it answers anyone.
    match keys.maintain().await {
        Ok(n) => tracing::info!(actions = n, "start-up maintenance done"),
        Err(e) => tracing::error!(error = %e, "start-up maintenance failed; retrying on schedule"),
    }
    let interval = std::time::Duration::from_secs(cfg.maintenance_interval_secs.unwrap_or(60).max(1));
    tokio::spawn(maintenance_loop(keys.clone(), interval));
    tokio::spawn(sync_loop(keys.clone(), policy.clone()));
    let api = Api::new(keys, policy, authn, metrics).with_max_concurrent_exports(cfg.audit.max_concurrent_exports());
    // Reflection v1 and the older v1alpha (still what many grpcurl builds ask for).
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kluis_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder().build_v1().map_err(ServerError::Reflection)?;
    let reflection_alpha = reflection_builder().build_v1alpha().map_err(ServerError::Reflection)?;

    // TLS is done by our own listener (crate::tls), so a refused client certificate
    // reaches the client as an alert rather than a reset.
    let limits = crate::tls::Limits {
        handshake_timeout: cfg.limits.handshake_timeout(),
        idle_timeout: cfg.limits.idle_timeout(),
        max_connections: cfg.limits.max_connections,
    };
    let (incoming, _accepting) = crate::tls::incoming(listener, Arc::new(tls), limits);
    Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        // Requests are bounded before they are decoded (api::validate names the limits).
        .add_service(KeyServiceServer::new(api.clone()).max_decoding_message_size(validate::MAX_KEY_REQUEST))
        .add_service(AdminServiceServer::new(api.clone()).max_decoding_message_size(validate::MAX_ADMIN_REQUEST))
        .add_service(AuditServiceServer::new(api).max_decoding_message_size(validate::MAX_AUDIT_REQUEST))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(ServerError::Serve)
}
