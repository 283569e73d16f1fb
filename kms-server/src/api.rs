//! gRPC handlers: protobuf in, domain calls out. The only place a `Status` is built.
//! Handlers are thin: authenticate, authorize (getting an `Authorized` proof),
//! call the key manager, convert the answer.

use std::sync::Arc;

use kluis_proto::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::auth::{Action, AuthError, Authenticator, Authorized, Policy, Principal};
use crate::keys::{DestroyOutcome, KeyError, KeyManager, KeyringInfo, Requested, WireDestruction, wire_version_state};
use kluis_proto::states as wire;
use crate::master::MasterError;
use crate::metrics::Metrics;
use crate::audit::AuditEvent;
use crate::model::{Outcome, RestoreTestRecord};

pub mod validate;

use validate::{Shown, Validate};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Api {
    keys: Arc<KeyManager>,
    policy: Arc<Policy>,
    authn: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    /// Audit exports running at once (`[audit] max_concurrent_exports`).
    exports: Arc<tokio::sync::Semaphore>,
}

/// Export lines buffered between the store reader and the client: with the store read a
/// page (at most 4096 records) at a time, what one export holds in memory is bounded.
const EXPORT_BUFFER: usize = 256;

/// The audit entry of one request, filled in as the handler learns more.
struct Ev {
    principal: String,
    action: Action,
    keyring: Option<String>,
    key_id: Option<String>,
    backup_id: Option<String>,
    started: std::time::Instant,
    metrics: Arc<Metrics>,
    keys: Arc<KeyManager>,
}

impl Drop for Ev {
    fn drop(&mut self) {
        self.metrics.observe(self.action.name(), self.started.elapsed());
    }
}

impl Ev {

    fn with_outcome(&self, outcome: Outcome) -> AuditEvent {
        let mut e = self.keys.event(&self.principal, self.action.name(), self.keyring.as_deref(), self.backup_id.as_deref(), outcome);
        e.key_id = self.key_id.clone();
        e
    }

    fn ok(&self) -> AuditEvent {
        self.with_outcome(Outcome::ok())
    }
}

fn outcome_of(s: &Status) -> Outcome {
    match s.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => Outcome::Denied(s.message().to_owned()),
        code => Outcome::Failed { kind: format!("{code:?}"), detail: s.message().to_owned() },
    }
}

impl Api {
    pub fn new(keys: Arc<KeyManager>, policy: Arc<Policy>, authn: Arc<Authenticator>, metrics: Arc<Metrics>) -> Self {
        let exports = Arc::new(tokio::sync::Semaphore::new(crate::config::DEFAULT_MAX_CONCURRENT_EXPORTS));
        Self { keys, policy, authn, metrics, exports }
    }

    /// At most `n` audit exports at once; more are refused (RESOURCE_EXHAUSTED).
    pub fn with_max_concurrent_exports(mut self, n: usize) -> Self {
        self.exports = Arc::new(tokio::sync::Semaphore::new(n.max(1)));
        self
    }

    /// The audit entry of a new request (also times it for the latency metric).
    fn ev(&self, action: Action, keyring: Option<&str>) -> Ev {
        Ev {
            principal: "<unauthenticated>".into(),
            action,
            keyring: keyring.map(str::to_owned),
            key_id: None,
            backup_id: None,
            started: std::time::Instant::now(),
            metrics: self.metrics.clone(),
            keys: self.keys.clone(),
        }
    }

    /// Validates the request before anything else sees it ([`validate`]). A valid one
    /// gives the typed request and its audit entry; an invalid one is audited (who sent
    /// it, and its keyring, key id and backup id only as [`Shown`], so bounded and
    /// escaped) and answered INVALID_ARGUMENT naming the field, or the authentication
    /// refusal when the certificate names no one.
    async fn valid<T: Validate>(&self, req: &Request<T>, action: Action) -> Result<(T::Valid, Ev), Status> {
        let invalid = match req.get_ref().validate() {
            Ok(v) => {
                let s = T::subject(&v);
                let mut ev = self.ev(action, s.keyring);
                ev.key_id = s.key_id.map(str::to_owned);
                ev.backup_id = s.backup_id.map(str::to_owned);
                return Ok((v, ev));
            }
            Err(invalid) => invalid,
        };
        let claimed = req.get_ref().claimed();
        let mut ev = self.ev(action, None);
        ev.keyring = claimed.keyring.map(validate::shown);
        ev.key_id = claimed.key_id.map(validate::shown);
        ev.backup_id = claimed.backup_id.map(validate::shown);
        match self.principal_of(req) {
            Ok(principal) => {
                ev.principal = principal.name().to_owned();
                tracing::Span::current().record("principal", principal.name());
            }
            Err(e) => {
                self.metrics.refused(action.name(), if matches!(e, AuthError::Revoked { .. }) { "revoked" } else { "unauthenticated" });
                return Err(self.fail(&ev, auth_status(e)).await);
            }
        }
        tracing::warn!(error = %invalid, "request refused");
        Err(self.fail(&ev, invalid_status(invalid)).await)
    }

    /// Authenticates and authorizes; a refusal is audited before it is returned.
    async fn authorize<T>(&self, req: &Request<T>, ev: &mut Ev) -> Result<Authorized, Status> {
        let decision = match self.principal_of(req) {
            Ok(principal) => {
                ev.principal = principal.name().to_owned();
                tracing::Span::current().record("principal", principal.name());
                self.policy.authorize(&principal, ev.action, ev.keyring.as_deref())
            }
            Err(e) => Err(e),
        };
        match decision {
            Ok(a) => Ok(a),
            Err(e) => {
                let reason = match e {
                    AuthError::Denied { .. } | AuthError::DeniedGlobal { .. } => "permission",
                    AuthError::Revoked { .. } => "revoked",
                    _ => "unauthenticated",
                };
                self.metrics.refused(ev.action.name(), reason);
                Err(self.fail(ev, auth_status(e)).await)
            }
        }
    }

    /// Audits a failed request and returns the status to send (UNAVAILABLE if
    /// even the audit entry cannot be written: fail closed).
    async fn fail(&self, ev: &Ev, status: Status) -> Status {
        if !matches!(status.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) {
            self.metrics.failed(ev.action.name(), status.code());
        }
        match self.keys.audit(ev.with_outcome(outcome_of(&status))).await {
            Ok(()) => status,
            Err(e) => self.audit_unavailable(e),
        }
    }

    /// Audits a successful request that wrote nothing else.
    async fn done(&self, ev: &Ev) -> Result<(), Status> {
        self.keys.audit(ev.ok()).await.map_err(|e| self.audit_unavailable(e))
    }

    fn audit_unavailable(&self, e: KeyError) -> Status {
        self.metrics.audit_failure();
        if let KeyError::Store(s) = &e
            && s.is_unavailable()
        {
            // Nothing was written; the same request may succeed once the store is back
            // (or on another replica): say so, so the client retries.
            tracing::error!(error = %e, "store unavailable; request refused");
            return kluis_proto::error::status(
                tonic::Code::Unavailable,
                format!("the store cannot be reached, so nothing was done: {e}"),
                kluis_proto::error::Reason::StoreUnavailable,
            );
        }
        tracing::error!(error = %e, "audit trail not writable; request refused");
        kluis_proto::error::status(
            tonic::Code::Unavailable,
            format!("the audit trail cannot be written, so nothing was done: {e}"),
            kluis_proto::error::Reason::AuditUnavailable,
        )
    }

    /// The answer to a write whose audit entry commits with it: a store failure means
    /// nothing was recorded (unavailable); any other refusal is audited as failed.
    async fn settle<T>(&self, ev: &Ev, r: Result<T, KeyError>) -> Result<T, Status> {
        match r {
            Ok(v) => Ok(v),
            // Refused before anything was written: audited as failed like any refusal.
            Err(e @ KeyError::Store(crate::store::StoreError::Conflict { .. })) => Err(self.fail(ev, key_status(e)).await),
            Err(e @ KeyError::Store(_)) => Err(self.audit_unavailable(e)),
            Err(e) => Err(self.fail(ev, key_status(e)).await),
        }
    }

    /// The answer to a read: audited as done on success, as failed otherwise.
    async fn settle_read<T>(&self, ev: &Ev, r: Result<T, KeyError>) -> Result<T, Status> {
        match r {
            Ok(v) => {
                self.done(ev).await?;
                Ok(v)
            }
            Err(e) => Err(self.fail(ev, key_status(e)).await),
        }
    }

    fn principal_of<T>(&self, req: &Request<T>) -> Result<Principal, AuthError> {
        let certs = req.peer_certs().ok_or(AuthError::NoCertificate)?;
        let leaf = certs.first().ok_or(AuthError::NoCertificate)?;
        self.authn.authenticate(leaf.as_ref())
    }
}

/// Registry facts of one data key on the wire (GetDataKey, FindDataKeys).
fn data_key_pb(key_id: String, k: crate::model::DataKeyRecord, sched: Option<u64>) -> pb::DataKeyInfo {
    let (state, destroyed) = match k.state {
        crate::model::KeyState::Active => (wire::DataKeyState::Active, 0),
        crate::model::KeyState::Destroyed { at } => (wire::DataKeyState::Destroyed, at),
    };
    pb::DataKeyInfo {
        key_id,
        keyring: k.keyring,
        keyring_version: k.version,
        backup_id: k.backup_id,
        created_unix: k.created,
        expires_unix: k.expires.unwrap_or(0),
        state: state.as_str().into(),
        key_state: state.to_wire(),
        destroyed_unix: destroyed,
        issued_to: k.issued_to,
        escrowed: k.escrowed,
        labels: k.labels.into_iter().collect(),
        destruction_id: sched.unwrap_or(0),
    }
}

fn invalid_status(e: validate::Invalid) -> Status {
    kluis_proto::error::status(tonic::Code::InvalidArgument, e.to_string(), kluis_proto::error::Reason::InvalidArgument)
}

fn auth_status(e: AuthError) -> Status {
    let (code, reason) = auth_code_reason(&e);
    if code == tonic::Code::Internal {
        tracing::error!(error = %e, "internal error");
    }
    kluis_proto::error::status(code, e.to_string(), reason)
}

/// The gRPC code and the reason of each refusal by the auth layer.
fn auth_code_reason(e: &AuthError) -> (tonic::Code, kluis_proto::error::Reason) {
    use kluis_proto::error::Reason;
    use tonic::Code;
    match e {
        AuthError::Denied { .. } | AuthError::DeniedGlobal { .. } => (Code::PermissionDenied, Reason::PermissionDenied),
        AuthError::NoCertificate
        | AuthError::BadCertificate
        | AuthError::NoCommonName
        | AuthError::NoSan { .. }
        | AuthError::AmbiguousIdentity { .. } => {
            (Code::Unauthenticated, Reason::CertificateNotAccepted)
        }
        AuthError::Revoked { .. } => (Code::Unauthenticated, Reason::CertificateRevoked),
        // Fail closed, but as the server's fault, not as a verdict on the certificate.
        AuthError::RevocationUnavailable => (Code::Internal, Reason::Internal),
    }
}

fn key_status(e: KeyError) -> Status {
    let msg = e.to_string();
    let (code, reason) = key_code_reason(&e);
    if code == tonic::Code::Internal {
        tracing::error!(error = %msg, "internal error");
    }
    kluis_proto::error::status(code, msg, reason)
}

/// The gRPC code and the reason of each key-layer error. No wildcard: a new
/// `KeyError` variant does not compile until it is given both.
fn key_code_reason(e: &KeyError) -> (tonic::Code, kluis_proto::error::Reason) {
    use kluis_proto::error::Reason;
    use tonic::Code;
    match e {
        KeyError::InvalidArgument { .. } => (Code::InvalidArgument, Reason::InvalidArgument),
        KeyError::EscrowManifest { .. } => (Code::InvalidArgument, Reason::EscrowManifestInvalid),
        KeyError::KeyringNotFound { .. } => (Code::NotFound, Reason::KeyringNotFound),
        KeyError::DestructionNotFound { .. } => (Code::NotFound, Reason::DestructionNotFound),
        KeyError::UnknownKeyId { .. } | KeyError::KmipObjectNotFound { .. } => (Code::NotFound, Reason::KeyUnknown),
        // KMIP only; gRPC never reaches it.
        KeyError::KmipState { .. } | KeyError::KmipAttributeFixed { .. } => (Code::FailedPrecondition, Reason::InvalidArgument),
        KeyError::KmipAttributeMissing { .. } => (Code::NotFound, Reason::InvalidArgument),
        KeyError::GrantNotFound { .. } => (Code::NotFound, Reason::GrantNotFound),
        KeyError::ApprovalNotFound { .. } => (Code::NotFound, Reason::ApprovalNotFound),
        KeyError::SelfApproval { .. } => (Code::PermissionDenied, Reason::SelfApproval),
        KeyError::ApprovalExpired { .. } => (Code::FailedPrecondition, Reason::ApprovalExpired),
        KeyError::ApprovalDone { .. } => (Code::FailedPrecondition, Reason::ApprovalAlreadyDone),
        KeyError::ApprovalOutdated { .. } => (Code::FailedPrecondition, Reason::ApprovalOutdated),
        KeyError::BadRetire { .. } | KeyError::RetireStrands { .. } => (Code::FailedPrecondition, Reason::RetireNotPossible),
        KeyError::KeyringExists { .. } => (Code::AlreadyExists, Reason::KeyringExists),
        KeyError::KmipObjectExists { .. } => (Code::AlreadyExists, Reason::KmipObjectExists),
        // The config asks for a bundle and there is no recipient to write it to.
        KeyError::KmipEscrowNoRecipient { .. } => (Code::FailedPrecondition, Reason::NoEscrow),
        // The directory or disk failed; nothing was done, a retry may succeed once fixed.
        KeyError::KmipEscrow { .. } => (Code::Unavailable, Reason::KmipEscrowUnavailable),
        KeyError::KeyringMismatch { .. } => (Code::InvalidArgument, Reason::KeyringMismatch),
        KeyError::UnwrapFailed { .. } => (Code::InvalidArgument, Reason::WrappedKeyNotAuthentic),
        KeyError::Destroyed { .. } | KeyError::KeyMaterialErased { .. } => (Code::FailedPrecondition, Reason::KeyDestroyed),
        KeyError::KeyringDestroyed { .. } => (Code::FailedPrecondition, Reason::KeyringDestroyed),
        KeyError::LegalHold { .. } => (Code::FailedPrecondition, Reason::LegalHold),
        KeyError::NoHold { .. } => (Code::FailedPrecondition, Reason::NoLegalHold),
        KeyError::AlreadyScheduled { .. } => (Code::FailedPrecondition, Reason::AlreadyScheduled),
        KeyError::DestructionNotPending { .. } => (Code::FailedPrecondition, Reason::DestructionNotPending),
        KeyError::NoEscrow => (Code::FailedPrecondition, Reason::NoEscrow),
        KeyError::VersionRetired { .. } => (Code::FailedPrecondition, Reason::VersionRetired),
        KeyError::EscrowRecipientChange { .. } => (Code::FailedPrecondition, Reason::EscrowRecipientChange),
        KeyError::EscrowRecipientNotInForce { .. } => (Code::FailedPrecondition, Reason::EscrowRecipientNotInForce),
        KeyError::NotCovered => (Code::PermissionDenied, Reason::PermissionDenied),
        KeyError::Master(MasterError::Unavailable(_)) => (Code::Unavailable, Reason::MasterKeyUnavailable),
        KeyError::Store(s) if s.is_unavailable() => (Code::Unavailable, Reason::StoreUnavailable),
        KeyError::Store(crate::store::StoreError::Conflict { .. }) => (Code::Aborted, Reason::ConcurrentChange),
        KeyError::Audit(crate::audit::AuditError::Tampered(_)) => (Code::DataLoss, Reason::AuditTampered),
        KeyError::Master(_)
        | KeyError::Store(_)
        | KeyError::MasterMismatch { .. }
        | KeyError::KeyringUnwrap { .. }
        | KeyError::Audit(_)
        | KeyError::Rewrap(_)
        | KeyError::Internal { .. }
        | KeyError::Rng
        | KeyError::Derivation
        | KeyError::Join(_)
        | KeyError::AuditKey { .. }
        | KeyError::MasterGeneration { .. } => (Code::Internal, Reason::Internal),
    }
}

#[cfg(test)]
mod status_tests;

fn keyring_pb(k: KeyringInfo) -> pb::Keyring {
    pb::Keyring {
        name: k.name,
        current_version: k.current_version,
        versions: k
            .versions
            .into_iter()
            .map(|(version, created_unix, state)| {
                let state = wire_version_state(state);
                pb::KeyringVersion { version, created_unix, state: state.as_str().into(), version_state: state.to_wire() }
            })
            .collect(),
        created_unix: k.created,
        retention_days: k.retention_days,
        issued_keys: k.issued_keys,
        rotation_period_days: k.rotation_period_days,
        next_rotation_unix: k.next_rotation.unwrap_or(0),
        held: k.hold.is_some(),
        hold_reason: k.hold.as_ref().map(|h| h.reason.clone()).unwrap_or_default(),
        hold_by: k.hold.as_ref().map(|h| h.by.clone()).unwrap_or_default(),
        hold_since_unix: k.hold.as_ref().map(|h| h.since).unwrap_or(0),
        destroyed_unix: k.destroyed.unwrap_or(0),
        pending: None,
    }
}

/// The answer to a request that may need a second officer: the keyring as it now is,
/// with the pending approval when the change waits for one.
fn requested_keyring_pb(r: Requested<KeyringInfo>, now: i64) -> pb::Keyring {
    match r {
        Requested::Done(k) => keyring_pb(k),
        Requested::Pending { approval, current } => {
            pb::Keyring { pending: Some(approval_pb(approval, now)), ..keyring_pb(current) }
        }
    }
}

fn destruction_pb(d: crate::model::DestructionRecord, held: bool) -> pb::Destruction {
    use crate::model::DestructionState;
    let w = WireDestruction::of(&d, held);
    let (by, done) = match &d.state {
        DestructionState::Cancelled { by, at } => (by.clone(), *at),
        DestructionState::Done { at } => (String::new(), *at),
        DestructionState::Scheduled => (String::new(), 0),
    };
    pb::Destruction {
        id: d.id,
        target_kind: w.kind.as_str().into(),
        target: w.target,
        keyring: d.target.keyring().to_owned(),
        state: w.state.as_str().into(),
        reason: w.reason.as_str().into(),
        destruction_state: w.state.to_wire(),
        kind: w.kind.to_wire(),
        destruction_reason: w.reason.to_wire(),
        requested_by: d.requested_by,
        requested_unix: d.requested,
        due_unix: d.due,
        cancelled_by: by,
        done_unix: done,
        approval_id: d.approval.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for Api {
    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().keyring), backup_id = %Shown(&req.get_ref().backup_id)))]
    async fn generate_data_key(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let (r, mut ev) = self.valid(&req, Action::GenerateDataKey).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        // On success the audit entry is committed with the registry record.
        let issued = self.settle(&ev, self.keys.generate_data_key(&auth, r.keyring.as_str(), r.backup_id.as_str(), r.labels, ev.ok()).await).await?;
        self.metrics.issued();
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

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().keyring), key_id = %Shown(&req.get_ref().key_id)))]
    async fn unwrap_data_key(
        &self,
        req: Request<pb::UnwrapDataKeyRequest>,
    ) -> Result<Response<pb::UnwrapDataKeyResponse>, Status> {
        let (r, mut ev) = self.valid(&req, Action::UnwrapDataKey).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let k = match self.keys.unwrap_data_key(&auth, r.key_id.as_str(), r.keyring.as_str(), &r.wrapped_key).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "unwrap refused");
                return Err(self.fail(&ev, key_status(e)).await);
            }
        };
        ev.backup_id = Some(k.backup_id.clone());
        self.done(&ev).await?;
        self.metrics.unwrapped();
        tracing::info!("data key unwrapped");
        Ok(Response::new(pb::UnwrapDataKeyResponse {
            plaintext_key: k.data_key.expose().to_vec(),
            keyring: k.keyring,
            keyring_version: k.version,
            backup_id: k.backup_id,
        }))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().keyring), key_id = %Shown(&req.get_ref().key_id)))]
    async fn record_restore_test(
        &self,
        req: Request<pb::RecordRestoreTestRequest>,
    ) -> Result<Response<pb::RecordRestoreTestResponse>, Status> {
        let (r, mut ev) = self.valid(&req, Action::RecordRestoreTest).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let outcome = if r.ok { Outcome::ok_with("restore test passed") } else { Outcome::ok_with(format!("restore test FAILED: {}", r.detail)) };
        let rec = RestoreTestRecord {
            time: 0,
            keyring: r.keyring.as_str().to_owned(),
            key_id: r.key_id.as_ref().map(|k| k.as_str().to_owned()).unwrap_or_default(),
            backup_id: r.backup_id,
            ok: r.ok,
            detail: r.detail,
            bytes: r.bytes,
            duration_ms: r.duration_ms,
            host: r.host,
            principal: String::new(),
        };
        self.settle(&ev, self.keys.record_restore_test(&auth, rec, ev.with_outcome(outcome)).await).await?;
        Ok(Response::new(pb::RecordRestoreTestResponse {}))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().keyring), key_id = %Shown(&req.get_ref().key_id)))]
    async fn rewrap_data_key(
        &self,
        req: Request<pb::RewrapDataKeyRequest>,
    ) -> Result<Response<pb::RewrapDataKeyResponse>, Status> {
        let (r, mut ev) = self.valid(&req, Action::RewrapDataKey).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let o = self.settle(&ev, self.keys.rewrap_data_key(&auth, r.key_id.as_str(), r.keyring.as_str(), &r.wrapped_key, ev.ok()).await).await?;
        tracing::info!(from = o.previous_version, to = o.version, "data key rewrapped");
        Ok(Response::new(pb::RewrapDataKeyResponse {
            wrapped_key: o.wrapped,
            keyring_version: o.version,
            previous_version: o.previous_version,
            recovery_recipient: o.recovery_recipient.unwrap_or_default(),
            escrowed: o.escrowed,
            sealed_with_recipient: o.sealed_with_recipient,
        }))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().keyring), key_id = %Shown(&req.get_ref().key_id)))]
    async fn mark_data_key_escrowed(
        &self,
        req: Request<pb::MarkDataKeyEscrowedRequest>,
    ) -> Result<Response<pb::MarkDataKeyEscrowedResponse>, Status> {
        let (r, mut ev) = self.valid(&req, Action::MarkDataKeyEscrowed).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let k = &r.key;
        let newly_escrowed = self
            .settle(
                &ev,
                self.keys
                    .mark_data_key_escrowed(&auth, k.key_id.as_str(), k.keyring.as_str(), &k.wrapped_key, &r.recovery_recipient, ev.ok())
                    .await,
            )
            .await?;
        tracing::info!(newly_escrowed, "escrow stanza added to a sealed file");
        Ok(Response::new(pb::MarkDataKeyEscrowedResponse { newly_escrowed }))
    }
}

fn approval_pb(a: crate::model::ApprovalRecord, now: i64) -> pb::Approval {
    let action = crate::keys::describe_action(&a.action);
    let state = if a.approved_by.is_some() {
        wire::ApprovalState::Approved
    } else if now >= a.expires {
        wire::ApprovalState::Expired
    } else {
        wire::ApprovalState::Pending
    };
    pb::Approval {
        id: a.id,
        action,
        requested_by: a.requested_by,
        requested_unix: a.requested,
        expires_unix: a.expires,
        state: state.as_str().into(),
        approved_by: a.approved_by.unwrap_or_default(),
        approval_state: state.to_wire(),
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for Api {
    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().keyring)))]
    async fn retire_keyring_versions(
        &self,
        req: Request<pb::RetireKeyringVersionsRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let (r, mut ev) = self.valid(&req, Action::RetireVersions).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let outcome = Outcome::ok_with(format!("pending approval to retire versions below {}", r.below_version));
        let a = self.settle(&ev, self.keys.request_retire(&auth, r.keyring.as_str(), r.below_version, r.force, ev.with_outcome(outcome)).await).await?;
        Ok(Response::new(approval_pb(a, self.keys.now())))
    }

    #[instrument(skip_all, fields(principal, id = req.get_ref().id))]
    async fn approve(&self, req: Request<pb::ApproveRequest>) -> Result<Response<pb::Approval>, Status> {
        let (r, mut ev) = self.valid(&req, Action::Approve).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let id = r.id;
        let a = self.settle(&ev, self.keys.approve(&auth, id, ev.with_outcome(Outcome::ok_with(format!("approved and carried out request {id}")))).await).await?;
        if matches!(a.action, crate::model::PendingAction::Grant { .. }) {
            // The approved grant is in the store; the policy uses it from now on.
            self.policy.set_runtime(&self.keys.runtime_grants().map_err(key_status)?);
        }
        tracing::warn!(id, "dual-control request approved and carried out");
        Ok(Response::new(approval_pb(a, self.keys.now())))
    }

    #[instrument(skip_all, fields(principal))]
    async fn list_approvals(&self, req: Request<pb::ListApprovalsRequest>) -> Result<Response<pb::Approvals>, Status> {
        let (validate::Empty, mut ev) = self.valid(&req, Action::ListApprovals).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let list = self.settle_read(&ev, self.keys.approvals(&auth)).await?;
        Ok(Response::new(pb::Approvals { approvals: list.into_iter().map(|a| approval_pb(a, self.keys.now())).collect() }))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().keyring)))]
    async fn change_grant(&self, req: Request<pb::ChangeGrantRequest>) -> Result<Response<pb::Grants>, Status> {
        let (r, mut ev) = self.valid(&req, Action::ChangeGrant).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let what = Outcome::ok_with(format!("{} {} {}", if r.grant { "granted" } else { "revoked" }, r.role, r.principal));
        let role = r.role.to_string();
        let done = self.settle(&ev, self.keys.change_grant(&auth, r.keyring.as_str(), &r.principal, &role, r.grant, ev.with_outcome(what)).await).await?;
        let pending = match done {
            Requested::Done(set) => {
                self.policy.set_runtime(&set);
                tracing::info!(principal = %r.principal, role = %r.role, grant = r.grant, "grant changed");
                None
            }
            Requested::Pending { approval, .. } => Some(approval_pb(approval, self.keys.now())),
        };
        Ok(Response::new(pb::Grants { pending, ..self.grants_pb(r.keyring.as_str()) }))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().keyring)))]
    async fn list_grants(&self, req: Request<pb::ListGrantsRequest>) -> Result<Response<pb::Grants>, Status> {
        let (r, mut ev) = self.valid(&req, Action::ListGrants).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let () = self.settle_read(&ev, self.keys.check_list_grants(&auth, r.keyring.as_str())).await?;
        Ok(Response::new(self.grants_pb(r.keyring.as_str())))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().name)))]
    async fn rotate_keyring(&self, req: Request<pb::RotateKeyringRequest>) -> Result<Response<pb::Keyring>, Status> {
        let (r, mut ev) = self.valid(&req, Action::RotateKeyring).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let k = self.settle(&ev, self.keys.rotate_keyring(&auth, r.keyring.as_str(), ev.ok()).await).await?;
        tracing::info!(version = k.current_version, "keyring rotated");
        Ok(Response::new(keyring_pb(k)))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().name)))]
    async fn create_keyring(&self, req: Request<pb::CreateKeyringRequest>) -> Result<Response<pb::Keyring>, Status> {
        let (r, mut ev) = self.valid(&req, Action::CreateKeyring).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let k = self.settle(&ev, self.keys.create_keyring(&auth, r.name.as_str(), r.retention_days, r.rotation_period_days, ev.ok()).await).await?;
        tracing::info!("keyring created");
        Ok(Response::new(keyring_pb(k)))
    }

    #[instrument(skip_all, fields(principal))]
    async fn list_keyrings(
        &self,
        req: Request<pb::ListKeyringsRequest>,
    ) -> Result<Response<pb::ListKeyringsResponse>, Status> {
        let (validate::Empty, mut ev) = self.valid(&req, Action::ListKeyrings).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        // What another replica changed counts at once here too (one read by key).
        let list = self.keys.sync().await.and_then(|_| self.keys.list_keyrings(&auth, |name| self.policy.may_see(&auth, name)));
        let list = self.settle_read(&ev, list).await?;
        Ok(Response::new(pb::ListKeyringsResponse { keyrings: list.into_iter().map(keyring_pb).collect() }))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().name)))]
    async fn get_keyring(&self, req: Request<pb::GetKeyringRequest>) -> Result<Response<pb::Keyring>, Status> {
        let (r, mut ev) = self.valid(&req, Action::GetKeyring).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let k = self.keys.sync().await.and_then(|_| self.keys.get_keyring(&auth, r.keyring.as_str()));
        let k = self.settle_read(&ev, k).await?;
        Ok(Response::new(keyring_pb(k)))
    }

    #[instrument(skip_all, fields(principal))]
    async fn install_escrow(&self, req: Request<pb::InstallEscrowRequest>) -> Result<Response<pb::EscrowStatus>, Status> {
        let (r, mut ev) = self.valid(&req, Action::InstallEscrow).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let done = self.settle(&ev, self.keys.install_escrow(&auth, &r.manifest_json, r.allow_new_recipient, ev.ok()).await).await?;
        let pending = match done {
            Requested::Done(()) => None,
            Requested::Pending { approval, .. } => Some(approval_pb(approval, self.keys.now())),
        };
        let mut status_ev = self.ev(Action::GetEscrowStatus, None);
        let status_auth = self.authorize(&req, &mut status_ev).await?;
        let status = self.escrow_status_pb(&status_auth)?.into_inner();
        Ok(Response::new(pb::EscrowStatus { pending, ..status }))
    }

    #[instrument(skip_all, fields(principal))]
    async fn get_escrow_status(
        &self,
        req: Request<pb::GetEscrowStatusRequest>,
    ) -> Result<Response<pb::EscrowStatus>, Status> {
        let (validate::Empty, mut ev) = self.valid(&req, Action::GetEscrowStatus).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        match self.escrow_status_pb(&auth) {
            Ok(r) => {
                self.done(&ev).await?;
                Ok(r)
            }
            Err(s) => Err(self.fail(&ev, s).await),
        }
    }
    #[instrument(skip_all, fields(principal))]
    async fn remove_escrow(&self, req: Request<pb::RemoveEscrowRequest>) -> Result<Response<pb::Approval>, Status> {
        let (validate::Empty, mut ev) = self.valid(&req, Action::RemoveEscrow).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let a = self.settle(&ev, self.keys.request_remove_escrow(&auth, ev.with_outcome(Outcome::ok_with("pending approval to remove the escrow manifest"))).await).await?;
        Ok(Response::new(approval_pb(a, self.keys.now())))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().name)))]
    async fn set_keyring_policy(&self, req: Request<pb::SetKeyringPolicyRequest>) -> Result<Response<pb::Keyring>, Status> {
        let (r, mut ev) = self.valid(&req, Action::SetKeyringPolicy).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let what = Outcome::ok_with(format!("retention_days={:?} rotation_period_days={:?}", r.retention_days, r.rotation_period_days));
        let k = self.settle(&ev, self.keys.set_keyring_policy(&auth, r.name.as_str(), r.retention_days, r.rotation_period_days, ev.with_outcome(what)).await).await?;
        Ok(Response::new(requested_keyring_pb(k, self.keys.now())))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().keyring)))]
    async fn set_legal_hold(&self, req: Request<pb::SetLegalHoldRequest>) -> Result<Response<pb::Keyring>, Status> {
        let (r, mut ev) = self.valid(&req, Action::SetLegalHold).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let what = if r.hold { Outcome::ok_with(format!("legal hold placed: {}", r.reason)) } else { Outcome::ok_with("legal hold released") };
        let k = self.settle(&ev, self.keys.set_legal_hold(&auth, r.keyring.as_str(), r.hold, &r.reason, ev.with_outcome(what)).await).await?;
        if matches!(k, Requested::Done(_)) {
            tracing::warn!(hold = r.hold, "legal hold changed");
        }
        Ok(Response::new(requested_keyring_pb(k, self.keys.now())))
    }

    #[instrument(skip_all, fields(principal, key_id = %Shown(&req.get_ref().key_id)))]
    async fn get_data_key(&self, req: Request<pb::GetDataKeyRequest>) -> Result<Response<pb::DataKeyInfo>, Status> {
        let (r, mut ev) = self.valid(&req, Action::GetDataKey).await?;
        let auth = self.authorize_for_key(&req, &mut ev, r.key_id.as_str()).await?;
        let key_id = r.key_id.as_str().to_owned();
        match self.keys.get_data_key(&auth, &key_id) {
            Ok((k, sched)) => {
                ev.backup_id = Some(k.backup_id.clone());
                self.done(&ev).await?;
                Ok(Response::new(data_key_pb(key_id, k, sched)))
            }
            Err(e) => Err(self.fail(&ev, key_status(e)).await),
        }
    }

    #[instrument(skip_all, fields(principal, backup_id = %Shown(&req.get_ref().backup_id)))]
    async fn find_data_keys(&self, req: Request<pb::FindDataKeysRequest>) -> Result<Response<pb::DataKeyInfos>, Status> {
        let (r, mut ev) = self.valid(&req, Action::FindDataKeys).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let keyring = r.keyring.as_ref().map(validate::KeyringName::as_str);
        match self.keys.find_data_keys(&auth, r.backup_id.as_str(), keyring, |k| self.policy.may_see(&auth, k)) {
            Ok(found) => {
                let more = if found.truncated { " (more matched)" } else { "" };
                let outcome = Outcome::ok_with(format!("{} keys found{more}", found.keys.len()));
                self.keys.audit(ev.with_outcome(outcome)).await.map_err(|e| self.audit_unavailable(e))?;
                let keys = found.keys.into_iter().map(|(key_id, k, sched)| data_key_pb(key_id, k, sched)).collect();
                Ok(Response::new(pb::DataKeyInfos { keys, truncated: found.truncated }))
            }
            Err(e) => Err(self.fail(&ev, key_status(e)).await),
        }
    }

    #[instrument(skip_all, fields(principal, key_id = %Shown(&req.get_ref().key_id)))]
    async fn destroy_key(&self, req: Request<pb::DestroyKeyRequest>) -> Result<Response<pb::DestroyResponse>, Status> {
        let (r, mut ev) = self.valid(&req, Action::DestroyKey).await?;
        let auth = self.authorize_for_key(&req, &mut ev, r.key_id.as_str()).await?;
        let outcome = Outcome::ok_with("destruction requested");
        let o = self.settle(&ev, self.keys.request_destroy_key(&auth, r.key_id.as_str(), ev.with_outcome(outcome)).await).await?;
        Ok(Response::new(self.destroy_pb(o)))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().name)))]
    async fn destroy_keyring(&self, req: Request<pb::DestroyKeyringRequest>) -> Result<Response<pb::DestroyResponse>, Status> {
        let (r, mut ev) = self.valid(&req, Action::DestroyKeyring).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let outcome = Outcome::ok_with("pending approval to destroy the keyring");
        let o = self.settle(&ev, self.keys.request_destroy_keyring(&auth, r.keyring.as_str(), ev.with_outcome(outcome)).await).await?;
        Ok(Response::new(self.destroy_pb(o)))
    }

    #[instrument(skip_all, fields(principal, id = req.get_ref().id))]
    async fn cancel_destruction(&self, req: Request<pb::CancelDestructionRequest>) -> Result<Response<pb::Destruction>, Status> {
        let (r, mut ev) = self.valid(&req, Action::CancelDestruction).await?;
        let id = r.id;
        ev.keyring = self.keys.destruction_keyring(id);
        let auth = self.authorize(&req, &mut ev).await?;
        let d = self.settle(&ev, self.keys.cancel_destruction(&auth, id, ev.with_outcome(Outcome::ok_with(format!("destruction {id} cancelled")))).await).await?;
        Ok(Response::new(destruction_pb(d, false)))
    }

    #[instrument(skip_all, fields(principal))]
    async fn list_destructions(&self, req: Request<pb::ListDestructionsRequest>) -> Result<Response<pb::Destructions>, Status> {
        let (validate::Empty, mut ev) = self.valid(&req, Action::ListDestructions).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let list = self.settle_read(&ev, self.keys.destructions(&auth, |k| self.policy.may_see(&auth, k))).await?;
        let destructions = list
            .into_iter()
            .map(|d| {
                let held = self.keys.is_held(d.target.keyring());
                destruction_pb(d, held)
            })
            .collect();
        Ok(Response::new(pb::Destructions { destructions }))
    }

    #[instrument(skip_all, fields(principal))]
    async fn rotate_master(&self, req: Request<pb::RotateMasterRequest>) -> Result<Response<pb::MasterStatus>, Status> {
        let (validate::Empty, mut ev) = self.valid(&req, Action::RotateMaster).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let m = self.settle(&ev, self.keys.rotate_master(&auth, ev.ok()).await).await?;
        Ok(Response::new(pb::MasterStatus {
            generation: m.generation,
            description: m.description,
            keyrings_rewrapped: m.keyrings,
            versions_rewrapped: m.versions,
        }))
    }

    #[instrument(skip_all, fields(principal, keyring = %Shown(&req.get_ref().keyring), key_id = %Shown(&req.get_ref().uid)))]
    async fn import_kmip_object(&self, req: Request<pb::ImportKmipObjectRequest>) -> Result<Response<pb::ImportKmipObjectResponse>, Status> {
        let (r, mut ev) = self.valid(&req, Action::KmipImport).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let (key, st) = Self::kmip_import_records(&r, req.into_inner());
        let outcome = Outcome::ok_with(format!("KMIP object imported from the escrow bundle, state {}", kluis_escrow::kmip_bundle::state_name(st.state)));
        self.settle(&ev, self.keys.kmip_import(&auth, key, st, ev.with_outcome(outcome)).await).await?;
        tracing::warn!(uid = r.uid.as_str(), "KMIP object imported from the escrow bundle");
        Ok(Response::new(pb::ImportKmipObjectResponse { uid: r.uid.as_str().to_owned() }))
    }

    #[instrument(skip_all, fields(principal))]
    async fn get_report(&self, req: Request<pb::GetReportRequest>) -> Result<Response<pb::Report>, Status> {
        let (r, mut ev) = self.valid(&req, Action::GetReport).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let since = r.since.as_deref();
        let report = match self.keys.report(&auth, since, |k| self.policy.may_see(&auth, k)) {
            Ok(r) => r,
            Err(e) => return Err(self.fail(&ev, key_status(e)).await),
        };
        let json = serde_json::to_string(&report).map_err(|e| kluis_proto::error::status(tonic::Code::Internal, format!("report encoding: {e}"), kluis_proto::error::Reason::Internal))?;
        self.done(&ev).await?;
        Ok(Response::new(pb::Report { json }))
    }
}

impl Api {
    /// The bundle records of an import request (material moved out, zeroized on drop).
    fn kmip_import_records(
        r: &validate::ImportKmipObject,
        mut p: pb::ImportKmipObjectRequest,
    ) -> (kluis_escrow::kmip_bundle::KeyRecord, kluis_escrow::kmip_bundle::StateRecord) {
        use kluis_escrow::kmip_bundle::{AppInfo, KeyRecord, Revocation, StateRecord};
        let key = KeyRecord {
            uid: r.uid.as_str().to_owned(),
            keyring: r.keyring.as_str().to_owned(),
            object_type: p.object_type,
            algorithm: p.algorithm,
            length: p.length,
            key_format: p.key_format,
            initial_date: p.initial_date_unix,
            created_by: std::mem::take(&mut p.created_by),
            material: zeroize::Zeroizing::new(std::mem::take(&mut p.material)),
            links: p.links.drain(..).map(|l| (l.link_type, l.uid)).collect(),
            secret_data_type: p.secret_data_type,
        };
        let st = StateRecord {
            uid: r.uid.as_str().to_owned(),
            state: p.state,
            usage_mask: p.usage_mask,
            names: p.names,
            app_info: p.app_info.into_iter().map(|a| AppInfo { namespace: a.namespace, data: a.data }).collect(),
            activation_date: p.activation_date_unix,
            deactivation_date: p.deactivation_date_unix,
            compromise_date: p.compromise_date_unix,
            compromise_occurrence: p.compromise_occurrence_unix,
            revocation: p.revocation_code.map(|code| Revocation { code, message: p.revocation_message }),
            destroyed: None,
        };
        (key, st)
    }
}

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for Api {
    type ExportAuditStream = tokio_stream::wrappers::ReceiverStream<Result<pb::AuditLine, Status>>;

    #[instrument(skip_all, fields(principal))]
    async fn export_audit(&self, req: Request<pb::ExportAuditRequest>) -> Result<Response<Self::ExportAuditStream>, Status> {
        let (r, mut ev) = self.valid(&req, Action::ExportAudit).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let Ok(permit) = self.exports.clone().try_acquire_owned() else {
            let status = kluis_proto::error::status(
                tonic::Code::ResourceExhausted,
                "too many audit exports are running at once; try again when one has finished",
                kluis_proto::error::Reason::AuditExportBusy,
            );
            return Err(self.fail(&ev, status).await);
        };
        if let Err(e) = self.keys.audit_export_allowed(&auth) {
            return Err(self.fail(&ev, key_status(e)).await);
        }
        // The export is itself audited first, so it appears in the trail it returns.
        self.done(&ev).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(EXPORT_BUFFER);
        let keys = self.keys.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let sent = keys.audit_export(&auth, r.since.as_deref(), r.tail, |json| tx.blocking_send(Ok(pb::AuditLine { json })).is_ok());
            if let Err(e) = sent {
                let _ = tx.blocking_send(Err(key_status(e)));
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    #[instrument(skip_all, fields(principal))]
    async fn get_audit_public_key(
        &self,
        req: Request<pb::GetAuditPublicKeyRequest>,
    ) -> Result<Response<pb::AuditPublicKey>, Status> {
        let (validate::Empty, mut ev) = self.valid(&req, Action::GetAuditPublicKey).await?;
        let auth = self.authorize(&req, &mut ev).await?;
        let key = self.keys.audit_public_key(&auth).map_err(key_status)?;
        self.done(&ev).await?;
        Ok(Response::new(pb::AuditPublicKey { ed25519: key }))
    }
}

impl Api {
    /// Authorizes an action on a key: on its keyring when the key is known; an unknown
    /// key id is authorized as a global action, so it is NOT_FOUND only to callers
    /// with the role on every keyring.
    async fn authorize_for_key<T>(&self, req: &Request<T>, ev: &mut Ev, key_id: &str) -> Result<Authorized, Status> {
        match self.keys.keyring_of(key_id) {
            Ok(k) => ev.keyring = k,
            Err(e) => {
                let _ = self.authorize(req, ev).await?;
                return Err(self.fail(ev, key_status(e)).await);
            }
        }
        self.authorize(req, ev).await
    }

    fn destroy_pb(&self, o: DestroyOutcome) -> pb::DestroyResponse {
        match o {
            DestroyOutcome::Pending(a) => pb::DestroyResponse { approval: Some(approval_pb(a, self.keys.now())), destruction: None },
            DestroyOutcome::Scheduled(d) => pb::DestroyResponse { approval: None, destruction: Some(destruction_pb(d, false)) },
        }
    }

    /// Grants that apply to `keyring`, from the config and the runtime set.
    fn grants_pb(&self, keyring: &str) -> pb::Grants {
        let mut grants = Vec::new();
        for g in self.policy.config_grants() {
            if g.covers(keyring) {
                for r in &g.roles {
                    grants.push(pb::GrantEntry {
                        principal: g.principal.clone(),
                        role: r.to_string(),
                        keyring: g.keyrings.join(","),
                        source: "config".into(),
                    });
                }
            }
        }
        for g in self.keys.runtime_grants().unwrap_or_default() {
            if g.keyring == keyring {
                grants.push(pb::GrantEntry { principal: g.principal, role: g.role.to_string(), keyring: g.keyring, source: "runtime".into() });
            }
        }
        pb::Grants { grants, pending: None }
    }

    fn escrow_status_pb(&self, auth: &Authorized) -> Result<Response<pb::EscrowStatus>, Status> {
        let (info, without) = self.keys.escrow_status(auth).map_err(key_status)?;
        Ok(Response::new(match info {
            None => pb::EscrowStatus { installed: false, keys_without_escrow: without, ..Default::default() },
            // Removed under dual control: nothing in force; the earlier recipients still matter.
            Some(i) if i.removed.is_some() => pb::EscrowStatus {
                installed: false,
                keys_without_escrow: without,
                previous_recipients: i.previous_recipients,
                ..Default::default()
            },
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
                pending: None,
            },
        }))
    }
}
