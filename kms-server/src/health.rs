//! The standard gRPC health service (`grpc.health.v1.Health`), answering from the
//! real state of what every request needs: a `Check` asks the master-key provider (for
//! an HSM: the token) and the store (for PostgreSQL: a query, bounded in time) at that
//! moment, so the answer is never stale. SERVING only when both answer.

use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::master::MasterKeyProvider;
use crate::store::Store;

/// Services this server reports on ("" is the server as a whole).
const SERVICES: &[&str] = &["", "kluis.v1.KeyService", "kluis.v1.AdminService", "kluis.v1.AuditService"];
/// How often `Watch` re-checks.
const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// What a request needs, asked on demand (by the health service and the metrics).
#[derive(Clone)]
pub struct Probe {
    master: Arc<dyn MasterKeyProvider>,
    store: Arc<dyn Store>,
}

/// What a [`Probe`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub master_up: bool,
    pub store_up: bool,
}

impl Probe {
    pub fn new(master: Arc<dyn MasterKeyProvider>, store: Arc<dyn Store>) -> Self {
        Self { master, store }
    }

    /// Asks both now (a failure is logged as a warning, naming what failed).
    pub async fn check(&self) -> Found {
        let m = self.master.clone();
        let master_up = match tokio::task::spawn_blocking(move || m.health()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "health: master key provider not serving");
                false
            }
            Err(_) => false,
        };
        let store_up = match self.store.health().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "health: store not serving");
                false
            }
        };
        Found { master_up, store_up }
    }
}

/// Health answered from a [`Probe`].
pub struct HealthService {
    probe: Probe,
}

impl HealthService {
    pub fn new(probe: Probe) -> Self {
        Self { probe }
    }
}

async fn status_of(probe: &Probe) -> ServingStatus {
    let found = probe.check().await;
    if found.master_up && found.store_up { ServingStatus::Serving } else { ServingStatus::NotServing }
}

fn response(s: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: tonic_health::pb::health_check_response::ServingStatus::from(s) as i32 }
}

fn known(service: &str) -> Result<(), Status> {
    if SERVICES.contains(&service) { Ok(()) } else { Err(Status::not_found(format!("unknown service {service:?}"))) }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(&self, req: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        known(&req.get_ref().service)?;
        Ok(Response::new(response(status_of(&self.probe).await)))
    }

    type WatchStream = ReceiverStream<Result<HealthCheckResponse, Status>>;

    async fn watch(&self, req: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        known(&req.get_ref().service)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let probe = self.probe.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let s = status_of(&probe).await;
                if last != Some(s) {
                    if tx.send(Ok(response(s))).await.is_err() {
                        return;
                    }
                    last = Some(s);
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
