//! The standard gRPC health service (`grpc.health.v1.Health`), answering from the
//! real state of the master-key provider: a `Check` asks the provider (for an HSM:
//! the token) at that moment, so the answer is never stale.

use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::master::MasterKeyProvider;

/// Services this server reports on ("" is the server as a whole).
const SERVICES: &[&str] = &["", "kluis.v1.KeyService", "kluis.v1.AdminService", "kluis.v1.AuditService"];
/// How often `Watch` re-checks the provider.
const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// Health answered from the master-key provider.
pub struct HealthService {
    master: Arc<dyn MasterKeyProvider>,
}

impl HealthService {
    pub fn new(master: Arc<dyn MasterKeyProvider>) -> Self {
        Self { master }
    }
}

async fn status_of(master: &Arc<dyn MasterKeyProvider>) -> ServingStatus {
    let m = master.clone();
    match tokio::task::spawn_blocking(move || m.health()).await {
        Ok(Ok(())) => ServingStatus::Serving,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health: master key provider not serving");
            ServingStatus::NotServing
        }
        Err(_) => ServingStatus::NotServing,
    }
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
        Ok(Response::new(response(status_of(&self.master).await)))
    }

    type WatchStream = ReceiverStream<Result<HealthCheckResponse, Status>>;

    async fn watch(&self, req: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        known(&req.get_ref().service)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let master = self.master.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let s = status_of(&master).await;
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
