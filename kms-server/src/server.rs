//! The gRPC server: serves KeyService, AdminService, AuditService, health and
//! reflection over mTLS for a key manager that start-up opened, and runs the
//! scheduled work.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use crate::keys::lease::{self, Fence, Lease, Tick};
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
    #[error("no random bytes from the system")]
    Rng,
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

/// Binds the KMIP listener, if configured.
pub async fn bind_kmip(cfg: &ServerConfig) -> Result<Option<tokio::net::TcpListener>, ServerError> {
    match cfg.kmip_listen {
        None => Ok(None),
        Some(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|e| ServerError::Bind { addr, source: e }),
    }
}

/// The listeners a server serves on: gRPC, and the metrics and KMIP ones if configured.
pub struct Listeners {
    pub grpc: tokio::net::TcpListener,
    pub metrics: Option<tokio::net::TcpListener>,
    pub kmip: Option<tokio::net::TcpListener>,
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

/// Runs the scheduled work (rotation periods, due destructions, expired keys, the store
/// scrub) every `interval` while this process holds the maintenance lease, and at once
/// when it takes it (`taken`). Every write of the work is fenced by the lease.
async fn maintenance_loop(keys: Arc<KeyManager>, lease: Arc<Lease>, taken: Arc<tokio::sync::Notify>, interval: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = taken.notified() => {}
        }
        let Some(fence) = lease.fence(Instant::now()) else {
            tracing::debug!("scheduled work left to the holder of the maintenance lease");
            continue;
        };
        maintain(&keys, fence, "scheduled").await;
        // Here, not in the start-up run: the keys are already gone for the server, only their
        // bytes are left, and a restart should not wait for a copy of the whole store.
        if let Err(e) = keys.scrub_if_due(Some(fence)).await {
            tracing::error!(error = %e, "store scrub failed; retrying at the next tick");
        }
    }
}

async fn maintain(keys: &KeyManager, fence: Fence, what: &'static str) {
    match keys.maintain(Some(fence)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(actions = n, token = fence.token(), "{what} maintenance done"),
        Err(e) => tracing::error!(error = %e, token = fence.token(), "{what} maintenance failed; retrying at the next tick"),
    }
}

/// Renews, takes or watches the maintenance lease every quarter of its time, and says in
/// the log when this process takes it, loses it, or sees who holds it.
async fn lease_loop(keys: Arc<KeyManager>, lease: Arc<Lease>, taken: Arc<tokio::sync::Notify>) {
    let mut tick = tokio::time::interval(lease.renew_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let r = keys.tick_lease(&lease, Instant::now()).await;
        if r.is_ok() && failing {
            failing = false;
            tracing::warn!("maintenance lease works again");
        }
        match r {
            Ok(t) => {
                log_tick(&lease, &t);
                if matches!(t, Tick::Took { .. }) {
                    taken.notify_one();
                }
            }
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "maintenance lease could not be read or renewed; scheduled work stops on this replica until it can");
            }
            Err(_) => {}
        }
    }
}

fn log_tick(lease: &Lease, t: &Tick) {
    match t {
        Tick::Took { token, from: Some(from) } => {
            tracing::warn!(token, from = %from, me = %lease.me(), "maintenance lease taken over: this replica does the scheduled work now")
        }
        Tick::Took { token, from: None } => tracing::info!(token, me = %lease.me(), "maintenance lease taken: this replica does the scheduled work"),
        Tick::Lost { to } => tracing::warn!(to = %to.as_deref().unwrap_or("nobody"), "maintenance lease lost: this replica stops the scheduled work"),
        Tick::Following { holder, first: true } => {
            tracing::info!(holder = %holder, "scheduled work runs on the replica holding the maintenance lease")
        }
        Tick::Renewed | Tick::Following { first: false, .. } => {}
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
    /// The KMIP listener's TLS (the same files, no ALPN), if `kmip_listen` is set.
    kmip_tls: Option<crate::tls::Tls>,
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
    let tls_for = |alpn| {
        crate::tls::Tls::new(
            (&cfg.tls.cert, &read("TLS certificate", &cfg.tls.cert)?),
            (&cfg.tls.key, &read("TLS key", &cfg.tls.key)?),
            (&cfg.tls.client_ca, &read("CA", &cfg.tls.client_ca)?),
            &cfg.auth.crl,
            metrics.clone(),
            alpn,
        )
        .map_err(ServerError::Tls)
    };
    let tls = tls_for(crate::tls::Alpn::H2)?;
    let kmip_tls = cfg.kmip_listen.map(|_| tls_for(crate::tls::Alpn::None)).transpose()?;
    let revoked = match &cfg.auth.revoked {
        Some(p) => Some(RevocationList::load(p)?.with_failure_counter(metrics.reload_failure_counter())),
        None => None,
    };
    Ok(Prepared { tls, kmip_tls, metrics, revoked })
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    cfg: &ServerConfig,
    keys: Arc<KeyManager>,
    listeners: Listeners,
    prepared: Prepared,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let Listeners { grpc: listener, metrics: metrics_listener, kmip: kmip_listener } = listeners;
    let Prepared { tls, kmip_tls, metrics, revoked } = prepared;
    let policy = Arc::new(Policy::new(cfg.grants.clone()));
    policy.set_runtime(&keys.runtime_grants()?);
    let authn = Arc::new(Authenticator::new(cfg.auth.identity, revoked));
    let probe = Probe::new(keys.master().clone(), keys.store());
    let health_service = HealthServer::new(HealthService::new(probe.clone()));
    metrics.attach_audit_counters(keys.audit_counters());
    if let Some(l) = metrics_listener {
        tokio::spawn(crate::metrics::serve(l, metrics.clone(), probe));
    }
    // The maintenance lease: on a store only this process writes (redb) it is taken at
    // once; among replicas, by one of them.
    let me = match listener.local_addr() {
        Ok(a) => format!("{a} {}", hex::encode(crate::secret::random_array::<4>(&ring::rand::SystemRandom::new()).map_err(|_| ServerError::Rng)?)),
        Err(_) => hex::encode(crate::secret::random_array::<4>(&ring::rand::SystemRandom::new()).map_err(|_| ServerError::Rng)?),
    };
    let ttl = cfg.maintenance_lease_secs.map_or(lease::DEFAULT_TTL, Duration::from_secs);
    let lease = Arc::new(Lease::new(me, ttl));
    match keys.tick_lease(&lease, Instant::now()).await {
        Ok(t) => log_tick(&lease, &t),
        Err(e) => tracing::error!(error = %e, "maintenance lease could not be read; retrying on schedule"),
    }
    // Work that fell due while the server was down is done before it answers anyone (by
    // the replica that holds the lease).
    if let Some(fence) = lease.fence(Instant::now()) {
        maintain(&keys, fence, "start-up").await;
    }
    let interval = Duration::from_secs(cfg.maintenance_interval_secs.unwrap_or(60).max(1));
    let taken = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(maintenance_loop(keys.clone(), lease.clone(), taken.clone(), interval));
    tokio::spawn(lease_loop(keys.clone(), lease.clone(), taken));
    tokio::spawn(sync_loop(keys.clone(), policy.clone()));
    // KMIP beside gRPC, with the same limits; its accept loop stops when `_kmip_accepting` drops.
    let limits = crate::tls::Limits {
        handshake_timeout: cfg.limits.handshake_timeout(),
        idle_timeout: cfg.limits.idle_timeout(),
        max_connections: cfg.limits.max_connections,
    };
    let _kmip_accepting = match (kmip_listener, kmip_tls) {
        (Some(l), Some(t)) => {
            let (incoming, accepting) = crate::tls::incoming(l, Arc::new(t), limits);
            let kmip = Arc::new(crate::kmip::Kmip::new(keys.clone(), policy.clone(), authn.clone(), metrics.clone(), cfg.kmip_keyring.clone()));
            tokio::spawn(kmip.serve(incoming));
            Some(accepting)
        }
        _ => None,
    };
    let api = Api::new(keys.clone(), policy, authn, metrics).with_max_concurrent_exports(cfg.audit.max_concurrent_exports());
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
        .map_err(ServerError::Serve)?;
    // Another replica takes the scheduled work at its next tick rather than after the lease time.
    match keys.release_lease(&lease).await {
        Ok(true) => tracing::info!("maintenance lease released"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "maintenance lease could not be released; another replica takes it over after the lease time"),
    }
    Ok(())
}
