//! gRPC handlers: protobuf in, domain calls out. The only place a `Status` is built.
//! Handlers are thin: authenticate, authorize (getting an `Authorized` proof),
//! call the key manager, convert the answer.

use std::sync::Arc;

use kluis_proto::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::auth::{Action, AuthError, Authenticator, Authorized, Policy, Principal};
use crate::keys::{KeyError, KeyManager, KeyringInfo};
use crate::master::MasterError;
use crate::store::{StoreError, VersionState};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Api {
    keys: Arc<KeyManager>,
    policy: Arc<Policy>,
    authn: Arc<Authenticator>,
}

impl Api {
    pub fn new(keys: Arc<KeyManager>, policy: Arc<Policy>, authn: Arc<Authenticator>) -> Self {
        Self { keys, policy, authn }
    }

    fn authorize<T>(&self, req: &Request<T>, action: Action, keyring: Option<&str>) -> Result<Authorized, Status> {
        let principal = self.principal_of(req).map_err(auth_status)?;
        tracing::Span::current().record("principal", principal.name());
        self.policy.authorize(&principal, action, keyring).map_err(auth_status)
    }

    fn principal_of<T>(&self, req: &Request<T>) -> Result<Principal, AuthError> {
        let certs = req.peer_certs().ok_or(AuthError::NoCertificate)?;
        let leaf = certs.first().ok_or(AuthError::NoCertificate)?;
        self.authn.authenticate(leaf.as_ref())
    }
}

fn auth_status(e: AuthError) -> Status {
    match e {
        AuthError::Denied { .. } | AuthError::DeniedGlobal { .. } => Status::permission_denied(e.to_string()),
        AuthError::NoCertificate
        | AuthError::BadCertificate
        | AuthError::NoCommonName
        | AuthError::NoSan { .. }
        | AuthError::Revoked { .. } => Status::unauthenticated(e.to_string()),
    }
}

fn key_status(e: KeyError) -> Status {
    let msg = e.to_string();
    match e {
        KeyError::InvalidArgument { .. } | KeyError::EscrowManifest { .. } => Status::invalid_argument(msg),
        KeyError::KeyringNotFound { .. } | KeyError::UnknownKeyId { .. } => Status::not_found(msg),
        KeyError::KeyringExists { .. } => Status::already_exists(msg),
        KeyError::KeyringMismatch { .. } | KeyError::UnwrapFailed { .. } => Status::invalid_argument(msg),
        KeyError::Destroyed { .. } | KeyError::VersionRetired { .. } | KeyError::EscrowRecipientChange { .. } => {
            Status::failed_precondition(msg)
        }
        KeyError::Master(MasterError::Unavailable(_)) | KeyError::Store(StoreError::WriterGone) => {
            Status::unavailable(msg)
        }
        KeyError::NotCovered => Status::permission_denied(msg),
        _ => {
            tracing::error!(error = %msg, "internal error");
            Status::internal(msg)
        }
    }
}

fn keyring_pb(k: KeyringInfo) -> pb::Keyring {
    pb::Keyring {
        name: k.name,
        current_version: k.current_version,
        versions: k
            .versions
            .into_iter()
            .map(|(version, created_unix, state)| pb::KeyringVersion {
                version,
                created_unix,
                state: match state {
                    VersionState::Active => "active",
                    VersionState::Retired => "retired",
                }
                .to_owned(),
            })
            .collect(),
        created_unix: k.created,
        retention_days: k.retention_days,
        issued_keys: k.issued_keys,
    }
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for Api {
    #[instrument(skip_all, fields(principal, keyring = %req.get_ref().keyring, backup_id = %req.get_ref().backup_id))]
    async fn generate_data_key(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let auth = self.authorize(&req, Action::GenerateDataKey, Some(&req.get_ref().keyring))?;
        let r = req.into_inner();
        let issued = self
            .keys
            .generate_data_key(&auth, &r.keyring, &r.backup_id, r.labels)
            .await
            .map_err(key_status)?;
        tracing::info!(key_id = %issued.key_id, version = issued.version, "data key issued");
        Ok(Response::new(pb::GenerateDataKeyResponse {
            key_id: issued.key_id,
            plaintext_key: issued.data_key.expose().to_vec(),
            wrapped_key: issued.wrapped,
            keyring: issued.keyring,
            keyring_version: issued.version,
            recovery_recipient: issued.recovery_recipient.unwrap_or_default(),
        }))
    }

    #[instrument(skip_all, fields(principal, keyring = %req.get_ref().keyring, key_id = %req.get_ref().key_id))]
    async fn unwrap_data_key(
        &self,
        req: Request<pb::UnwrapDataKeyRequest>,
    ) -> Result<Response<pb::UnwrapDataKeyResponse>, Status> {
        let auth = self.authorize(&req, Action::UnwrapDataKey, Some(&req.get_ref().keyring))?;
        let r = req.into_inner();
        let k = self
            .keys
            .unwrap_data_key(&auth, &r.key_id, &r.keyring, &r.wrapped_key)
            .map_err(|e| {
                tracing::warn!(error = %e, "unwrap refused");
                key_status(e)
            })?;
        tracing::info!("data key unwrapped");
        Ok(Response::new(pb::UnwrapDataKeyResponse {
            plaintext_key: k.data_key.expose().to_vec(),
            keyring: k.keyring,
            keyring_version: k.version,
            backup_id: k.backup_id,
        }))
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for Api {
    #[instrument(skip_all, fields(principal, keyring = %req.get_ref().name))]
    async fn create_keyring(&self, req: Request<pb::CreateKeyringRequest>) -> Result<Response<pb::Keyring>, Status> {
        let auth = self.authorize(&req, Action::CreateKeyring, Some(&req.get_ref().name))?;
        let r = req.into_inner();
        let k = self.keys.create_keyring(&auth, &r.name, r.retention_days).await.map_err(key_status)?;
        tracing::info!("keyring created");
        Ok(Response::new(keyring_pb(k)))
    }

    #[instrument(skip_all, fields(principal))]
    async fn list_keyrings(
        &self,
        req: Request<pb::ListKeyringsRequest>,
    ) -> Result<Response<pb::ListKeyringsResponse>, Status> {
        let auth = self.authorize(&req, Action::ListKeyrings, None)?;
        let list = self
            .keys
            .list_keyrings(&auth, |name| self.policy.may_see(&auth, name))
            .map_err(key_status)?;
        Ok(Response::new(pb::ListKeyringsResponse { keyrings: list.into_iter().map(keyring_pb).collect() }))
    }

    #[instrument(skip_all, fields(principal, keyring = %req.get_ref().name))]
    async fn get_keyring(&self, req: Request<pb::GetKeyringRequest>) -> Result<Response<pb::Keyring>, Status> {
        let auth = self.authorize(&req, Action::GetKeyring, Some(&req.get_ref().name))?;
        let k = self.keys.get_keyring(&auth, &req.get_ref().name).map_err(key_status)?;
        Ok(Response::new(keyring_pb(k)))
    }

    #[instrument(skip_all, fields(principal))]
    async fn install_escrow(&self, req: Request<pb::InstallEscrowRequest>) -> Result<Response<pb::EscrowStatus>, Status> {
        let auth = self.authorize(&req, Action::InstallEscrow, None)?;
        let r = req.get_ref();
        self.keys.install_escrow(&auth, &r.manifest_json, r.allow_new_recipient).await.map_err(key_status)?;
        let status_auth = self.authorize(&req, Action::GetEscrowStatus, None)?;
        self.escrow_status_pb(&status_auth)
    }

    #[instrument(skip_all, fields(principal))]
    async fn get_escrow_status(
        &self,
        req: Request<pb::GetEscrowStatusRequest>,
    ) -> Result<Response<pb::EscrowStatus>, Status> {
        let auth = self.authorize(&req, Action::GetEscrowStatus, None)?;
        self.escrow_status_pb(&auth)
    }
}

impl Api {
    fn escrow_status_pb(&self, auth: &Authorized) -> Result<Response<pb::EscrowStatus>, Status> {
        let (info, without) = self.keys.escrow_status(auth).map_err(key_status)?;
        Ok(Response::new(match info {
            None => pb::EscrowStatus { installed: false, keys_without_escrow: without, ..Default::default() },
            Some(i) => pb::EscrowStatus {
                installed: true,
                ceremony_id: i.ceremony_id,
                recovery_recipient: i.recovery_recipient,
                threshold: i.threshold,
                shares: i.shares,
                installed_unix: i.installed,
                custodians: i.custodians,
                keys_without_escrow: without,
                manifest_json: i.manifest_json,
                previous_recipients: i.previous_recipients,
            },
        }))
    }
}
