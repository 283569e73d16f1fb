//! The typed async client. Generated protobuf types stay inside this module.

pub use kluis_proto::states::{ApprovalState, DataKeyState, DestructionKind, DestructionReason, DestructionState, VersionState};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use kluis_age::secret::{DataKey, IssuedKey};
use kluis_proto::error::{Reason, reason_of};
use kluis_proto::v1 as pb;
use kluis_proto::v1::admin_service_client::AdminServiceClient;
use kluis_proto::v1::audit_service_client::AuditServiceClient;
use kluis_proto::v1::key_service_client::KeyServiceClient;
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroize;

use crate::class::ErrorClass;
use crate::config::{ClientConfig, ConfigError};
use crate::retry::{Cause, FailoverNotice, Policy, Retrier, Rpc};
use crate::tls::{LastTlsError, TlsConnect, TlsSetupError};

/// Errors talking to the server.
///
/// What a program does with one is decided by [`ClientError::class`], from the
/// variant, the gRPC code and the server's [`Reason`], never from the text.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not read {path}: {source}")]
    ReadFile { path: std::path::PathBuf, source: std::io::Error },
    #[error("invalid server endpoint {endpoint:?}: {source}")]
    Endpoint { endpoint: String, source: tonic::transport::Error },
    /// An endpoint URI without a host to connect to.
    #[error("invalid server endpoint {endpoint:?}: it names no host (https://HOST:PORT)")]
    EndpointHost { endpoint: String },
    /// The CA, certificate or key of the client config cannot be used for TLS.
    #[error("cannot set up TLS from the client config: {0}")]
    TlsSetup(#[source] TlsSetupError),
    /// No connection: nothing listens, the server is down or restarting, or the TLS
    /// handshake was cut short without an alert. The request was never sent. `io` is
    /// the kind of the I/O error behind it, if any (connection refused, ...).
    #[error("cannot reach the Kluis server at {endpoint}: {detail}")]
    Connect { endpoint: String, detail: String, io: Option<std::io::ErrorKind> },
    /// The server sent a TLS alert: it refused this client's certificate (or TLS settings).
    /// `alert` is the alert when the error that carried it reached this side typed (a
    /// refusal during the handshake); on an established TLS 1.3 connection HTTP/2 hands up
    /// only that TLS failed (the kind of an I/O error), and `detail` its description.
    #[error("{}", rejected_text(.endpoint, *.alert, .detail))]
    TlsRejected { endpoint: String, alert: Option<rustls::AlertDescription>, detail: String },
    /// The server's certificate is not valid for the name this client checks
    /// (`server_name`, else the endpoint's host).
    #[error("the Kluis server at {endpoint} presented a certificate that is not valid for the name {expected:?} this client checks (the certificate names {}); set `server_name` in the client config to one of those names, or use an endpoint by that name", presented_text(.presented))]
    ServerNameMismatch { endpoint: String, expected: String, presented: Vec<String> },
    /// The server's certificate is not signed by the CA this client trusts.
    #[error("the Kluis server at {endpoint} presented a certificate this client does not trust: it is not signed by the CA in `ca` of the client config; point `ca` at the CA that issued the server's certificate (and `server_name` at a name in it)")]
    ServerUnknownIssuer { endpoint: String },
    /// The server's certificate has expired (times in Unix seconds, when rustls gave them).
    #[error("the Kluis server at {endpoint} presented an expired certificate{}: the server's certificate must be renewed (or this machine's clock is wrong)", validity_text("expired at", *.not_after, *.now))]
    ServerCertificateExpired { endpoint: String, not_after: Option<u64>, now: Option<u64> },
    /// The server's certificate is not valid yet.
    #[error("the Kluis server at {endpoint} presented a certificate that is not valid yet{}: check this machine's clock (and the server's certificate)", validity_text("valid from", *.not_before, *.now))]
    ServerCertificateNotYetValid { endpoint: String, not_before: Option<u64>, now: Option<u64> },
    /// This client does not accept the server's certificate, for another reason.
    #[error("the Kluis server at {endpoint} presented a certificate this client does not trust ({detail}); check `ca` and `server_name` in the client config")]
    ServerNotTrusted { endpoint: String, detail: String },
    /// Any other TLS failure on this side (no common protocol, a malformed record, ...).
    #[error("TLS with the Kluis server at {endpoint} failed: {detail}")]
    Tls { endpoint: String, detail: String },
    /// The connection broke while a request was in flight (server killed or
    /// restarting, network): nothing says the request was refused.
    #[error("the connection to the Kluis server at {endpoint} was lost during the request ({detail}); the server is unavailable or restarting: retry later")]
    ConnectionLost { endpoint: String, detail: String, io: Option<std::io::ErrorKind> },
    #[error("the Kluis server at {endpoint} did not answer in time")]
    DeadlineExceeded { endpoint: String },
    /// The server answered with an error status. `reason` is `None` when the status
    /// carries no Kluis `ErrorInfo` (an older server, or the gRPC stack).
    #[error("{}", server_text(.endpoint, *.code, .message))]
    Server { endpoint: String, code: tonic::Code, reason: Option<Reason>, message: String },
    #[error("the server's answer is malformed: {what}")]
    BadResponse { what: &'static str },
    /// Several endpoints, and each failed in a way that moves on to the next one (the
    /// failures in the order they were tried, at most one per endpoint).
    #[error("no Kluis server in `endpoints` is available ({} tried): {}", .failures.len(), failures_text(.failures))]
    NoEndpointAvailable { failures: Vec<EndpointFailure> },
    /// The server stayed unavailable until the retry deadline (`[retry] deadline_secs`).
    #[error("the Kluis server stayed unavailable: gave up after {attempts} attempts in {:.1} s (retry.deadline_secs in the client config); the last failure ({cause}): {last}", .elapsed.as_secs_f64())]
    GaveUp { attempts: u32, elapsed: std::time::Duration, cause: Cause, last: Box<ClientError> },
}

/// Why one of several endpoints was passed over.
#[derive(Debug)]
pub struct EndpointFailure {
    pub endpoint: String,
    pub error: ClientError,
}

/// The most characters of one endpoint's failure in [`ClientError::NoEndpointAvailable`]'s
/// message (16 endpoints at most: the message stays bounded).
const FAILURE_TEXT_MAX: usize = 300;

/// "[1] TEXT; [2] TEXT": each failure's own message (it names its endpoint), cut to a bound.
fn failures_text(failures: &[EndpointFailure]) -> String {
    failures
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut text = f.error.to_string();
            if let Some((cut, _)) = text.char_indices().nth(FAILURE_TEXT_MAX) {
                text.truncate(cut);
                text.push_str("...");
            }
            format!("[{}] {text}", i + 1)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The message of a TLS refusal by the server, by its alert when known.
fn rejected_text(endpoint: &str, alert: Option<rustls::AlertDescription>, detail: &str) -> String {
    use rustls::AlertDescription as A;
    let why = match alert {
        Some(A::CertificateExpired) => {
            "it says this client's certificate has expired or is not valid yet; renew `cert` in the client config (or check this machine's clock)"
        }
        Some(A::CertificateRevoked) => "it says this client's certificate is revoked; this client needs a new certificate",
        Some(A::CertificateRequired) => "it requires a client certificate and got none; set `cert` and `key` in the client config",
        Some(A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::UnsupportedCertificate | A::DecryptError) => {
            "it does not accept this client's certificate; check that this client's certificate is signed by the server's client CA and is a client certificate"
        }
        _ => "check that this client's certificate is signed by the server's client CA, unexpired and not revoked",
    };
    format!("the TLS connection to {endpoint} was refused by the server ({detail}): {why}")
}

/// The names a certificate holds, as rustls lists them.
fn presented_text(presented: &[String]) -> String {
    if presented.is_empty() { "no names".to_owned() } else { presented.join(", ") }
}

/// " (LABEL DATE; this machine's clock says DATE)" when the times are known.
fn validity_text(label: &str, when: Option<u64>, now: Option<u64>) -> String {
    let date = |secs: u64| {
        i64::try_from(secs)
            .ok()
            .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_else(|| format!("{secs} s after 1970"))
    };
    match (when, now) {
        (Some(w), Some(n)) => format!(" ({label} {}; this machine's clock says {})", date(w), date(n)),
        (Some(w), None) => format!(" ({label} {})", date(w)),
        _ => String::new(),
    }
}

fn server_text(endpoint: &str, code: tonic::Code, message: &str) -> String {
    use tonic::Code;
    match code {
        Code::PermissionDenied => format!("the Kluis server refused: {message}"),
        Code::Unauthenticated => format!("the Kluis server did not accept this client's certificate: {message}"),
        Code::NotFound | Code::FailedPrecondition | Code::AlreadyExists => message.to_owned(),
        Code::InvalidArgument => format!("the server rejected the request: {message}"),
        Code::Unavailable => format!("the Kluis server at {endpoint} is unavailable: {message}; retry later"),
        code => format!("the Kluis server failed ({code:?}): {message}"),
    }
}

impl ClientError {
    /// What this failure means for the caller (and so the exit code).
    pub fn class(&self) -> ErrorClass {
        match self {
            ClientError::Config(_)
            | ClientError::ReadFile { .. }
            | ClientError::Endpoint { .. }
            | ClientError::EndpointHost { .. }
            | ClientError::TlsSetup(_) => ErrorClass::Other,
            ClientError::Connect { .. } | ClientError::ConnectionLost { .. } | ClientError::DeadlineExceeded { .. } => {
                ErrorClass::Unavailable
            }
            ClientError::TlsRejected { .. }
            | ClientError::ServerNameMismatch { .. }
            | ClientError::ServerUnknownIssuer { .. }
            | ClientError::ServerCertificateExpired { .. }
            | ClientError::ServerCertificateNotYetValid { .. }
            | ClientError::ServerNotTrusted { .. } => ErrorClass::Refused,
            ClientError::Tls { .. } | ClientError::BadResponse { .. } => ErrorClass::Other,
            ClientError::Server { code, reason, .. } => match reason {
                Some(r) => ErrorClass::of_reason(*r),
                None => ErrorClass::of_code(*code),
            },
            ClientError::NoEndpointAvailable { .. } => ErrorClass::Unavailable,
            ClientError::GaveUp { last, .. } => last.class(),
        }
    }

    /// The gRPC code of a server answer.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            ClientError::NoEndpointAvailable { failures } => failures.last().and_then(|f| f.error.code()),
            ClientError::GaveUp { last, .. } => last.code(),
            _ => None,
        }
    }

    /// The server's reason, when it sent one.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            ClientError::Server { reason, .. } => *reason,
            ClientError::NoEndpointAvailable { failures } => failures.last().and_then(|f| f.error.reason()),
            ClientError::GaveUp { last, .. } => last.reason(),
            _ => None,
        }
    }

    /// The error for a failed call to `endpoint`: a TLS alert or a lost connection
    /// (recognised by the error types in the status's source chain), or the server's
    /// answer with its code and reason.
    pub fn from_status(endpoint: &str, s: tonic::Status) -> Self {
        Self::from_status_with(endpoint, s, &LastTlsError::default())
    }

    /// [`ClientError::from_status`] for a call on a channel whose connections record their
    /// TLS failures in `last_tls`: a TLS failure that HTTP/2 handed up untyped is named by
    /// the rustls error recorded there (e.g. the alert refusing this client's certificate).
    pub fn from_status_with(endpoint: &str, s: tonic::Status, last_tls: &LastTlsError) -> Self {
        let endpoint = endpoint.to_owned();
        // A status with a source was made on this side, from a transport error.
        if let Some(source) = std::error::Error::source(&s) {
            if let Some(tls) = rustls_error(source) {
                return ClientError::from_tls(endpoint, tls);
            }
            // On an established connection h2 passes the TLS failure up as an io::Error
            // it rebuilt from the kind and the text, without the rustls error; the kind
            // (InvalidData, which tokio-rustls gives every TLS failure and a plain TCP
            // socket never does) still says TLS refused the connection: in practice the
            // server's alert after it checked this client's certificate (TLS 1.3).
            if let Some(io) = chain(source)
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .find(|io| io.kind() == std::io::ErrorKind::InvalidData)
            {
                return match last_tls.take() {
                    Some(tls) => ClientError::from_tls(endpoint, &tls),
                    None => ClientError::TlsRejected { endpoint, alert: None, detail: io.to_string() },
                };
            }
            if chain(source).any(|e| e.is::<tonic::TimeoutExpired>()) {
                return ClientError::DeadlineExceeded { endpoint };
            }
            // The channel reconnects by itself after a lost connection; when that fails,
            // the call fails with the connect error (tonic's ConnectError, as UNAVAILABLE)
            // and the request was never sent.
            if chain(source).any(|e| e.is::<tonic::ConnectError>()) {
                return ClientError::Connect { endpoint, detail: innermost(source), io: io_kind(source) };
            }
            if matches!(s.code(), tonic::Code::Cancelled | tonic::Code::Unknown) {
                return ClientError::ConnectionLost { endpoint, detail: innermost(source), io: io_kind(source) };
            }
        }
        match s.code() {
            tonic::Code::DeadlineExceeded => ClientError::DeadlineExceeded { endpoint },
            code => ClientError::Server { endpoint, code, reason: reason_of(&s), message: s.message().to_owned() },
        }
    }

    /// The error for a failed connect: TLS (by the rustls error in the chain) or unreachable.
    /// Public for tools that open their own tonic channels (the load generator), so that
    /// [`crate::retry::next_step`] decides for them too whether to move on to the next endpoint.
    pub fn from_connect(endpoint: &str, e: tonic::transport::Error) -> Self {
        match rustls_error(&e) {
            Some(tls) => ClientError::from_tls(endpoint.to_owned(), tls),
            None => ClientError::Connect { endpoint: endpoint.to_owned(), detail: innermost(&e), io: io_kind(&e) },
        }
    }

    fn from_tls(endpoint: String, e: &rustls::Error) -> Self {
        use rustls::CertificateError as C;
        let detail = e.to_string();
        match e {
            rustls::Error::AlertReceived(alert) => ClientError::TlsRejected { endpoint, alert: Some(*alert), detail },
            rustls::Error::InvalidCertificate(c) => match c {
                C::NotValidForName => ClientError::ServerNameMismatch { endpoint, expected: String::new(), presented: Vec::new() },
                C::NotValidForNameContext { expected, presented } => {
                    ClientError::ServerNameMismatch { endpoint, expected: expected.to_str().into_owned(), presented: presented.clone() }
                }
                C::UnknownIssuer => ClientError::ServerUnknownIssuer { endpoint },
                C::Expired => ClientError::ServerCertificateExpired { endpoint, not_after: None, now: None },
                C::ExpiredContext { time, not_after } => ClientError::ServerCertificateExpired {
                    endpoint,
                    not_after: Some(not_after.as_secs()),
                    now: Some(time.as_secs()),
                },
                C::NotValidYet => ClientError::ServerCertificateNotYetValid { endpoint, not_before: None, now: None },
                C::NotValidYetContext { time, not_before } => ClientError::ServerCertificateNotYetValid {
                    endpoint,
                    not_before: Some(not_before.as_secs()),
                    now: Some(time.as_secs()),
                },
                _ => ClientError::ServerNotTrusted { endpoint, detail },
            },
            _ => ClientError::Tls { endpoint, detail },
        }
    }
}

/// `e` and its sources.
fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// The text of the innermost error of a chain (e.g. "Connection refused (os error 111)").
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    chain(e).last().map(ToString::to_string).unwrap_or_default()
}

/// The kind of the first I/O error in a chain.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    chain(e).find_map(|e| e.downcast_ref::<std::io::Error>()).map(std::io::Error::kind)
}

/// The rustls error behind a transport error, if TLS failed. tokio-rustls hands it
/// up inside an `io::Error`, whose `source()` skips it, so look inside those too.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    chain(e).find_map(|e| {
        e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|inner| inner.downcast_ref::<rustls::Error>())
        })
    })
}

/// An unwrapped data key with the context the server recorded.
pub struct UnwrappedKey {
    pub data_key: DataKey,
    pub keyring: String,
    pub version: u32,
    pub backup_id: String,
}

/// A dual-control request.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ApprovalInfo {
    pub id: u64,
    pub action: String,
    pub requested_by: String,
    pub requested_unix: i64,
    pub expires_unix: i64,
    pub state: ApprovalState,
    pub approved_by: String,
}

fn approval(a: pb::Approval) -> ApprovalInfo {
    ApprovalInfo {
        id: a.id,
        action: a.action,
        requested_by: a.requested_by,
        requested_unix: a.requested_unix,
        expires_unix: a.expires_unix,
        state: ApprovalState::from_wire(a.approval_state, &a.state),
        approved_by: a.approved_by,
    }
}

/// One grant: who holds which role on which keyrings, and where it comes from.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GrantInfo {
    pub principal: String,
    pub role: String,
    pub keyring: String,
    /// `config` (the server's config file) or `runtime` (granted by an officer).
    pub source: String,
}

fn grants(g: pb::Grants) -> Vec<GrantInfo> {
    g.grants
        .into_iter()
        .map(|e| GrantInfo { principal: e.principal, role: e.role, keyring: e.keyring, source: e.source })
        .collect()
}

/// The outcome of one restore test, as reported to the server.
#[derive(Clone, Debug)]
pub struct RestoreTest {
    pub keyring: String,
    pub key_id: String,
    pub backup_id: String,
    pub ok: bool,
    pub detail: String,
    pub bytes: u64,
    pub duration_ms: u64,
    pub host: String,
}

/// Keyring metadata.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyringInfo {
    pub name: String,
    pub current_version: u32,
    pub created_unix: i64,
    pub retention_days: u32,
    pub issued_keys: u64,
    pub versions: Vec<KeyringVersionInfo>,
    pub rotation_period_days: u32,
    /// 0: no rotation period.
    pub next_rotation_unix: i64,
    pub held: bool,
    pub hold_reason: String,
    pub hold_by: String,
    pub hold_since_unix: i64,
    /// 0 unless destroyed.
    pub destroyed_unix: i64,
}

/// Registry facts of one data key (no key material).
#[derive(Clone, Debug, serde::Serialize)]
pub struct DataKeyInfo {
    pub key_id: String,
    pub keyring: String,
    pub keyring_version: u32,
    pub backup_id: String,
    pub created_unix: i64,
    /// 0: does not expire.
    pub expires_unix: i64,
    pub state: DataKeyState,
    pub destroyed_unix: i64,
    pub issued_to: String,
    pub escrowed: bool,
    pub labels: BTreeMap<String, String>,
    pub destruction_id: u64,
}

/// The data keys issued for one backup id, newest first.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FoundDataKeys {
    pub keys: Vec<DataKeyInfo>,
    /// More keys matched than the server returns (100).
    pub truncated: bool,
}

fn data_key_info(k: pb::DataKeyInfo) -> DataKeyInfo {
    DataKeyInfo {
        key_id: k.key_id,
        keyring: k.keyring,
        keyring_version: k.keyring_version,
        backup_id: k.backup_id,
        created_unix: k.created_unix,
        expires_unix: k.expires_unix,
        state: DataKeyState::from_wire(k.key_state, &k.state),
        destroyed_unix: k.destroyed_unix,
        issued_to: k.issued_to,
        escrowed: k.escrowed,
        labels: k.labels.into_iter().collect(),
        destruction_id: k.destruction_id,
    }
}

/// A scheduled (or cancelled, or carried out) destruction.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DestructionInfo {
    pub id: u64,
    pub target_kind: DestructionKind,
    pub target: String,
    pub keyring: String,
    pub requested_by: String,
    pub requested_unix: i64,
    pub due_unix: i64,
    pub state: DestructionState,
    pub cancelled_by: String,
    pub done_unix: i64,
    pub approval_id: u64,
    pub reason: DestructionReason,
}

/// What a destroy request led to.
#[derive(Clone, Debug, serde::Serialize)]
pub enum DestroyOutcome {
    /// Dual control: a second officer must approve.
    PendingApproval(ApprovalInfo),
    /// Scheduled after the waiting period.
    Scheduled(DestructionInfo),
}

/// What a request that may need a second officer led to.
#[derive(Clone, Debug)]
pub enum Requested<T> {
    /// Done: the new state.
    Done(T),
    /// Dual control: nothing changed until a second officer approves.
    PendingApproval(ApprovalInfo),
}

impl<T> Requested<T> {
    fn of(pending: Option<pb::Approval>, done: impl FnOnce() -> T) -> Self {
        match pending {
            Some(a) => Requested::PendingApproval(approval(a)),
            None => Requested::Done(done()),
        }
    }
}

/// The master key in force after a rotation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MasterStatus {
    pub generation: u32,
    pub description: String,
    pub keyrings_rewrapped: u32,
    pub versions_rewrapped: u32,
}

/// A data key re-wrapped under the keyring's current version.
#[derive(Clone, Debug)]
pub struct Rewrapped {
    pub wrapped: Vec<u8>,
    pub version: u32,
    pub previous_version: u32,
    /// The escrow recovery recipient in force ("age1..."), if any.
    pub recovery_recipient: Option<String>,
    /// The registry counts the key as escrowed.
    pub escrowed: bool,
    /// The key was issued with `recovery_recipient`: its file carries that stanza from sealing.
    pub sealed_with_recipient: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyringVersionInfo {
    pub version: u32,
    pub created_unix: i64,
    pub state: VersionState,
}

/// The escrow manifest in force at the server.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EscrowStatus {
    pub installed: bool,
    pub ceremony_id: String,
    pub recovery_recipient: String,
    pub threshold: u32,
    pub shares: u32,
    pub installed_unix: i64,
    pub custodians: Vec<String>,
    pub keys_without_escrow: u64,
    /// Recovery recipients in force earlier; backups sealed then need those ceremonies' shares.
    pub previous_recipients: Vec<String>,
}

/// A connection to the Kluis server (or to one of several: the client config's
/// `endpoints`). Cheap to clone.
///
/// Every call goes through the retry loop of [`crate::retry`] (the client config's
/// `[retry]`); each attempt tries the endpoints in order from the one that answered last,
/// moving on when [`crate::retry::next_step`] says so. A channel reconnects by itself
/// after a lost connection.
#[derive(Clone)]
pub struct KmsClient {
    targets: Arc<[Target]>,
    /// The endpoint that answered last: the next call starts there.
    active: Arc<AtomicUsize>,
    retry: Retrier,
}

/// One endpoint: where it is, how to reach it, and its connection once made.
struct Target {
    endpoint: String,
    /// `http://AUTHORITY` with the request timeout: TLS is done by the connector.
    channel_endpoint: Endpoint,
    tls: Arc<TlsConnect>,
    connect_timeout: std::time::Duration,
    /// The TLS error behind the last failed read or write of this channel's connections.
    last_tls: LastTlsError,
    services: tokio::sync::OnceCell<Services>,
}

/// The gRPC services on one channel.
struct Services {
    keys: KeyServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    audit: AuditServiceClient<Channel>,
}

impl Target {
    /// The endpoint as the client config names it, checked for the same CA and client
    /// certificate as every other; the server name is `server_name`, else its own host.
    fn new(endpoint: &str, cfg: &ClientConfig, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, ClientError> {
        let parsed = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| ClientError::Endpoint { endpoint: endpoint.to_owned(), source: e })?;
        let uri = parsed.uri();
        let (Some(host), Some(authority)) = (uri.host(), uri.authority()) else {
            return Err(ClientError::EndpointHost { endpoint: endpoint.to_owned() });
        };
        let addr = format!("{host}:{}", uri.port_u16().unwrap_or(443));
        let name = cfg.server_name.as_deref().unwrap_or(host);
        let tls = TlsConnect::new(ca, cert, key, name, addr, cfg.connect_timeout()).map_err(ClientError::TlsSetup)?;
        // TLS is done by the connector (crate::tls), so the scheme tonic sees is http.
        // No connect timeout on the endpoint: it would wrap TCP and TLS both and race the
        // deadline in `services`; the connector bounds the TCP connect of every (re)connection.
        let channel_endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| ClientError::Endpoint { endpoint: endpoint.to_owned(), source: e })?
            .timeout(cfg.timeout());
        Ok(Self {
            endpoint: endpoint.to_owned(),
            channel_endpoint,
            tls: Arc::new(tls),
            connect_timeout: cfg.connect_timeout(),
            last_tls: LastTlsError::default(),
            services: tokio::sync::OnceCell::new(),
        })
    }

    /// The services on this endpoint's channel, connecting first if it is not connected yet.
    async fn services(&self) -> Result<&Services, ClientError> {
        self.services
            .get_or_try_init(|| async {
                let tcp_up = Arc::new(AtomicBool::new(false));
                let connector = {
                    let (tls, last_tls, tcp_up) = (self.tls.clone(), self.last_tls.clone(), tcp_up.clone());
                    tower::service_fn(move |_: tonic::codegen::http::Uri| {
                        let (tls, last_tls, tcp_up) = (tls.clone(), last_tls.clone(), tcp_up.clone());
                        async move { tls.connect(last_tls, &tcp_up).await.map(hyper_util::rt::TokioIo::new) }
                    })
                };
                // The connector's timeout covers TCP only; this deadline also covers the TLS
                // handshake (a peer that accepts but never answers): DeadlineExceeded, not retried.
                // When it runs out before TCP was even up (the two deadlines are the same and race),
                // it is the connector's TCP timeout: the server is not there, retried and moved on from.
                let channel = match tokio::time::timeout(self.connect_timeout, self.channel_endpoint.connect_with_connector(connector)).await {
                    Ok(r) => r.map_err(|e| ClientError::from_connect(&self.endpoint, e))?,
                    Err(_) if !tcp_up.load(Ordering::Relaxed) => {
                        return Err(ClientError::Connect {
                            endpoint: self.endpoint.clone(),
                            detail: "TCP connect timed out".to_owned(),
                            io: Some(std::io::ErrorKind::TimedOut),
                        });
                    }
                    Err(_) => return Err(ClientError::DeadlineExceeded { endpoint: self.endpoint.clone() }),
                };
                Ok(Services {
                    keys: KeyServiceClient::new(channel.clone()),
                    admin: AdminServiceClient::new(channel.clone()),
                    audit: AuditServiceClient::new(channel),
                })
            })
            .await
    }
}

/// One unary call through the retry loop: `call!(self, Rpc::X, service.method(request))`.
/// The request is built once and cloned for each attempt.
macro_rules! call {
    ($self:ident, $rpc:expr, $svc:ident . $method:ident ( $req:expr )) => {{
        let req = $req;
        $self
            .call($rpc, |s: &Services| {
                let mut svc = s.$svc.clone();
                let req = req.clone();
                async move { svc.$method(req).await }
            })
            .await
    }};
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::ReadFile { path: path.to_owned(), source: e })
}

impl KmsClient {
    /// Connects with mTLS to the first endpoint that answers, within the config's connect
    /// deadline per endpoint; while none is reachable, retries as the config's `[retry]` says.
    pub async fn connect(cfg: &ClientConfig) -> Result<Self, ClientError> {
        Self::connect_with(cfg, Retrier::new(Policy::from(&cfg.retry))).await
    }

    /// [`KmsClient::connect`] with a given retry loop (its clock, jitter and notices).
    pub async fn connect_with(cfg: &ClientConfig, retry: Retrier) -> Result<Self, ClientError> {
        cfg.check_key_permissions()?;
        let (ca, cert, key) = (read(&cfg.ca)?, read(&cfg.cert)?, read(&cfg.key)?);
        // Named here: an encrypted or missing key, a file with no certificate (tonic
        // would only say "transport error").
        crate::config::check_certificate_pem(&cfg.ca, &ca, "ca")?;
        crate::config::check_certificate_pem(&cfg.cert, &cert, "cert")?;
        crate::config::check_key_pem(&cfg.key, &key)?;
        let targets = cfg.endpoints.iter().map(|e| Target::new(e, cfg, &ca, &cert, &key)).collect::<Result<Vec<_>, _>>()?;
        if targets.is_empty() {
            return Err(ClientError::Config(ConfigError::NoEndpoint { path: std::path::PathBuf::new() }));
        }
        let client = Self { targets: targets.into(), active: Arc::new(AtomicUsize::new(0)), retry };
        client.call(Rpc::Connect, |_: &Services| std::future::ready(Ok::<(), tonic::Status>(()))).await?;
        Ok(client)
    }

    /// The endpoint that answered last (the first of the config before any call).
    pub fn endpoint(&self) -> &str {
        let i = self.active.load(Ordering::Relaxed) % self.targets.len();
        self.targets[i].endpoint.as_str()
    }

    /// Runs one call (`f` makes one attempt on an endpoint's services) through the retry loop.
    async fn call<T, F, Fut>(&self, rpc: Rpc, f: F) -> Result<T, ClientError>
    where
        F: Fn(&Services) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.call_at(rpc, f).await.map(|(v, _)| v)
    }

    /// [`KmsClient::call`], also saying which endpoint answered (its index).
    async fn call_at<T, F, Fut>(&self, rpc: Rpc, f: F) -> Result<(T, usize), ClientError>
    where
        F: Fn(&Services) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let f = &f;
        self.retry.run(rpc, || self.pass(rpc, f)).await
    }

    /// One attempt: the endpoints in order from the one that answered last, moving on after
    /// each failure that [`crate::retry::next_step`] retries; any other failure is final.
    async fn pass<T, F, Fut>(&self, rpc: Rpc, f: &F) -> Result<(T, usize), ClientError>
    where
        F: Fn(&Services) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let n = self.targets.len();
        let start = self.active.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            let t = &self.targets[i];
            let r = match t.services().await {
                Ok(s) => f(s).await.map_err(|s| ClientError::from_status_with(&t.endpoint, s, &t.last_tls)),
                Err(e) => Err(e),
            };
            let e = match r {
                Ok(v) => {
                    self.active.store(i, Ordering::Relaxed);
                    return Ok((v, i));
                }
                // One endpoint: its error as it is, for the retry loop.
                Err(e) if n == 1 => return Err(e),
                Err(e) => e,
            };
            let Some(cause) = crate::retry::next_step(rpc, &e) else { return Err(e) };
            if k + 1 < n {
                let to = self.targets[(i + 1) % n].endpoint.clone();
                self.retry.failover(&FailoverNotice { rpc, from: t.endpoint.clone(), cause, to });
            }
            failures.push(EndpointFailure { endpoint: t.endpoint.clone(), error: e });
        }
        Err(ClientError::NoEndpointAvailable { failures })
    }

    /// Asks for a fresh data key for one backup object.
    pub async fn generate_data_key(
        &self,
        keyring: &str,
        backup_id: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<IssuedKey, ClientError> {
        let req = pb::GenerateDataKeyRequest {
            keyring: keyring.to_owned(),
            backup_id: backup_id.to_owned(),
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let mut r = call!(self, Rpc::GenerateDataKey, keys.generate_data_key(req))?.into_inner();
        let data_key = DataKey::from_slice(&r.plaintext_key);
        r.plaintext_key.zeroize();
        let data_key = data_key.ok_or(ClientError::BadResponse { what: "data key is not 32 bytes" })?;
        Ok(IssuedKey {
            key_id: std::mem::take(&mut r.key_id),
            keyring: std::mem::take(&mut r.keyring),
            version: r.keyring_version,
            data_key,
            wrapped: std::mem::take(&mut r.wrapped_key),
            recovery_recipient: Some(std::mem::take(&mut r.recovery_recipient)).filter(|s| !s.is_empty()),
        })
    }

    /// Asks the server to unwrap a data key (needs the restorer role on the keyring).
    pub async fn unwrap_data_key(&self, key_id: &str, keyring: &str, wrapped: &[u8]) -> Result<UnwrappedKey, ClientError> {
        let req = pb::UnwrapDataKeyRequest {
            key_id: key_id.to_owned(),
            wrapped_key: wrapped.to_vec(),
            keyring: keyring.to_owned(),
        };
        let mut r = call!(self, Rpc::UnwrapDataKey, keys.unwrap_data_key(req))?.into_inner();
        let data_key = DataKey::from_slice(&r.plaintext_key);
        r.plaintext_key.zeroize();
        Ok(UnwrappedKey {
            data_key: data_key.ok_or(ClientError::BadResponse { what: "data key is not 32 bytes" })?,
            keyring: std::mem::take(&mut r.keyring),
            version: r.keyring_version,
            backup_id: std::mem::take(&mut r.backup_id),
        })
    }

    /// Creates a keyring with a retention and an automatic rotation period (days; 0 = none).
    pub async fn create_keyring_with(&self, name: &str, retention_days: u32, rotation_period_days: u32) -> Result<KeyringInfo, ClientError> {
        let req = pb::CreateKeyringRequest { name: name.to_owned(), retention_days, rotation_period_days };
        let r = call!(self, Rpc::CreateKeyring, admin.create_keyring(req))?;
        Ok(keyring_info(r.into_inner()))
    }

    /// Adds a version to a keyring (officer).
    pub async fn rotate_keyring(&self, name: &str) -> Result<KeyringInfo, ClientError> {
        let r = call!(self, Rpc::RotateKeyring, admin.rotate_keyring(pb::RotateKeyringRequest { name: name.to_owned() }))?;
        Ok(keyring_info(r.into_inner()))
    }

    /// Grants (`grant = true`) or revokes a role on a keyring at run time (officer).
    /// A grant needs a second officer's approval (the answer is then pending); a
    /// revocation is done at once.
    pub async fn change_grant(&self, keyring: &str, principal: &str, role: &str, grant: bool) -> Result<Requested<Vec<GrantInfo>>, ClientError> {
        let req = pb::ChangeGrantRequest { keyring: keyring.to_owned(), principal: principal.to_owned(), role: role.to_owned(), grant };
        let mut r = call!(self, Rpc::ChangeGrant, admin.change_grant(req))?.into_inner();
        Ok(Requested::of(r.pending.take(), || grants(r)))
    }

    /// The grants on a keyring, from the server config and from officers.
    pub async fn list_grants(&self, keyring: &str) -> Result<Vec<GrantInfo>, ClientError> {
        let r = call!(self, Rpc::ListGrants, admin.list_grants(pb::ListGrantsRequest { keyring: keyring.to_owned() }))?;
        Ok(grants(r.into_inner()))
    }

    /// Asks to retire versions below `below` (officer); returns the pending approval.
    /// `force`: even though keys are still wrapped under those versions.
    pub async fn retire_versions(&self, keyring: &str, below: u32, force: bool) -> Result<ApprovalInfo, ClientError> {
        let req = pb::RetireKeyringVersionsRequest { keyring: keyring.to_owned(), below_version: below, force };
        let r = call!(self, Rpc::RetireKeyringVersions, admin.retire_keyring_versions(req))?;
        Ok(approval(r.into_inner()))
    }

    /// Approves another officer's pending request; it is carried out at once.
    pub async fn approve(&self, id: u64) -> Result<ApprovalInfo, ClientError> {
        let r = call!(self, Rpc::Approve, admin.approve(pb::ApproveRequest { id }))?;
        Ok(approval(r.into_inner()))
    }

    /// All approval requests.
    pub async fn approvals(&self) -> Result<Vec<ApprovalInfo>, ClientError> {
        let r = call!(self, Rpc::ListApprovals, admin.list_approvals(pb::ListApprovalsRequest {}))?;
        Ok(r.into_inner().approvals.into_iter().map(approval).collect())
    }

    /// Records the outcome of a restore test (restorer).
    pub async fn record_restore_test(&self, t: &RestoreTest) -> Result<(), ClientError> {
        let req = pb::RecordRestoreTestRequest {
            keyring: t.keyring.clone(),
            key_id: t.key_id.clone(),
            backup_id: t.backup_id.clone(),
            ok: t.ok,
            detail: t.detail.clone(),
            bytes: t.bytes,
            duration_ms: t.duration_ms,
            host: t.host.clone(),
        };
        call!(self, Rpc::RecordRestoreTest, keys.record_restore_test(req))?;
        Ok(())
    }

    pub async fn list_keyrings(&self) -> Result<Vec<KeyringInfo>, ClientError> {
        let r = call!(self, Rpc::ListKeyrings, admin.list_keyrings(pb::ListKeyringsRequest {}))?;
        Ok(r.into_inner().keyrings.into_iter().map(keyring_info).collect())
    }

    pub async fn get_keyring(&self, name: &str) -> Result<KeyringInfo, ClientError> {
        let r = call!(self, Rpc::GetKeyring, admin.get_keyring(pb::GetKeyringRequest { name: name.to_owned() }))?;
        Ok(keyring_info(r.into_inner()))
    }

    /// Installs a manifest; `allow_new_recipient` is needed to switch to a different recovery recipient.
    /// A new recovery recipient (or the first) needs a second officer's approval (the
    /// answer is then pending); the same recipient again is installed at once.
    pub async fn install_escrow(&self, manifest_json: &str, allow_new_recipient: bool) -> Result<Requested<EscrowStatus>, ClientError> {
        let r = call!(self, Rpc::InstallEscrow, admin.install_escrow(pb::InstallEscrowRequest { manifest_json: manifest_json.to_owned(), allow_new_recipient }))?;
        let mut r = r.into_inner();
        Ok(Requested::of(r.pending.take(), || escrow_status(r)))
    }

    pub async fn escrow_status(&self) -> Result<EscrowStatus, ClientError> {
        let r = call!(self, Rpc::GetEscrowStatus, admin.get_escrow_status(pb::GetEscrowStatusRequest {}))?;
        Ok(escrow_status(r.into_inner()))
    }
}

impl KmsClient {
    /// Re-wraps a data key under the keyring's current version (restorer).
    pub async fn rewrap_data_key(&self, key_id: &str, keyring: &str, wrapped: &[u8]) -> Result<Rewrapped, ClientError> {
        let req = pb::RewrapDataKeyRequest { key_id: key_id.to_owned(), wrapped_key: wrapped.to_vec(), keyring: keyring.to_owned() };
        let r = call!(self, Rpc::RewrapDataKey, keys.rewrap_data_key(req))?.into_inner();
        Ok(Rewrapped {
            wrapped: r.wrapped_key,
            version: r.keyring_version,
            previous_version: r.previous_version,
            recovery_recipient: (!r.recovery_recipient.is_empty()).then_some(r.recovery_recipient),
            escrowed: r.escrowed,
            sealed_with_recipient: r.sealed_with_recipient,
        })
    }

    /// Reports that a sealed file of this key now carries a durable stanza to
    /// `recovery_recipient` (restorer); the server refuses a recipient not in force.
    /// Returns whether the registry did not count the key as escrowed before.
    pub async fn mark_data_key_escrowed(
        &self,
        key_id: &str,
        keyring: &str,
        wrapped: &[u8],
        recovery_recipient: &str,
    ) -> Result<bool, ClientError> {
        let req = pb::MarkDataKeyEscrowedRequest {
            key_id: key_id.to_owned(),
            wrapped_key: wrapped.to_vec(),
            keyring: keyring.to_owned(),
            recovery_recipient: recovery_recipient.to_owned(),
        };
        let r = call!(self, Rpc::MarkDataKeyEscrowed, keys.mark_data_key_escrowed(req))?.into_inner();
        Ok(r.newly_escrowed)
    }

    /// Asks to remove the escrow manifest in force (officer; dual control).
    pub async fn remove_escrow(&self) -> Result<ApprovalInfo, ClientError> {
        let r = call!(self, Rpc::RemoveEscrow, admin.remove_escrow(pb::RemoveEscrowRequest {}))?;
        Ok(approval(r.into_inner()))
    }

    /// Changes a keyring's retention and/or rotation period (officer).
    /// Lowering the retention needs a second officer's approval (the answer is then
    /// pending); raising it and the rotation period apply at once.
    pub async fn set_keyring_policy(&self, name: &str, retention_days: Option<u32>, rotation_period_days: Option<u32>) -> Result<Requested<KeyringInfo>, ClientError> {
        let req = pb::SetKeyringPolicyRequest { name: name.to_owned(), retention_days, rotation_period_days };
        let mut r = call!(self, Rpc::SetKeyringPolicy, admin.set_keyring_policy(req))?.into_inner();
        Ok(Requested::of(r.pending.take(), || keyring_info(r)))
    }

    /// Places (`hold = true`) or releases a legal hold on a keyring (officer). A release
    /// needs a second officer's approval (the answer is then pending).
    pub async fn set_legal_hold(&self, keyring: &str, hold: bool, reason: &str) -> Result<Requested<KeyringInfo>, ClientError> {
        let req = pb::SetLegalHoldRequest { keyring: keyring.to_owned(), hold, reason: reason.to_owned() };
        let mut r = call!(self, Rpc::SetLegalHold, admin.set_legal_hold(req))?.into_inner();
        Ok(Requested::of(r.pending.take(), || keyring_info(r)))
    }

    /// Registry facts of one data key (officer, auditor).
    pub async fn get_data_key(&self, key_id: &str) -> Result<DataKeyInfo, ClientError> {
        let r = call!(self, Rpc::GetDataKey, admin.get_data_key(pb::GetDataKeyRequest { key_id: key_id.to_owned() }))?;
        Ok(data_key_info(r.into_inner()))
    }

    /// The data keys issued for `backup_id`, newest first, at most 100 (officer, auditor):
    /// in `keyring` if given, else in every keyring the caller's grants cover.
    pub async fn find_data_keys(&self, backup_id: &str, keyring: Option<&str>) -> Result<FoundDataKeys, ClientError> {
        let req = pb::FindDataKeysRequest { backup_id: backup_id.to_owned(), keyring: keyring.unwrap_or_default().to_owned() };
        let r = call!(self, Rpc::FindDataKeys, admin.find_data_keys(req))?.into_inner();
        Ok(FoundDataKeys { keys: r.keys.into_iter().map(data_key_info).collect(), truncated: r.truncated })
    }

    /// Asks to destroy one data key (officer).
    pub async fn destroy_key(&self, key_id: &str) -> Result<DestroyOutcome, ClientError> {
        let r = call!(self, Rpc::DestroyKey, admin.destroy_key(pb::DestroyKeyRequest { key_id: key_id.to_owned() }))?;
        destroy_outcome(r.into_inner())
    }

    /// Asks to destroy a keyring (officer; always dual control).
    pub async fn destroy_keyring(&self, name: &str) -> Result<DestroyOutcome, ClientError> {
        let r = call!(self, Rpc::DestroyKeyring, admin.destroy_keyring(pb::DestroyKeyringRequest { name: name.to_owned() }))?;
        destroy_outcome(r.into_inner())
    }

    /// Cancels a scheduled destruction (officer).
    pub async fn cancel_destruction(&self, id: u64) -> Result<DestructionInfo, ClientError> {
        let r = call!(self, Rpc::CancelDestruction, admin.cancel_destruction(pb::CancelDestructionRequest { id }))?;
        Ok(destruction(r.into_inner()))
    }

    /// Every destruction, scheduled or past (officer, auditor).
    pub async fn destructions(&self) -> Result<Vec<DestructionInfo>, ClientError> {
        let r = call!(self, Rpc::ListDestructions, admin.list_destructions(pb::ListDestructionsRequest {}))?;
        Ok(r.into_inner().destructions.into_iter().map(destruction).collect())
    }

    /// Creates a new master key and rewraps the keyring keys under it (officer).
    pub async fn rotate_master(&self) -> Result<MasterStatus, ClientError> {
        let r = call!(self, Rpc::RotateMaster, admin.rotate_master(pb::RotateMasterRequest {}))?.into_inner();
        Ok(MasterStatus {
            generation: r.generation,
            description: r.description,
            keyrings_rewrapped: r.keyrings_rewrapped,
            versions_rewrapped: r.versions_rewrapped,
        })
    }

    /// Recreates one KMIP object of an escrow bundle with its Unique Identifier (officer,
    /// `kmsctl kmip import`); answers the uid. The material travels in the protobuf
    /// request, a plain `Vec` that the transport (and each retry's copy) does not zeroize,
    /// as with the keys the server answers.
    pub async fn import_kmip_object(&self, req: pb::ImportKmipObjectRequest) -> Result<String, ClientError> {
        let r = call!(self, Rpc::ImportKmipObject, admin.import_kmip_object(req.clone()));
        Ok(r?.into_inner().uid)
    }

    /// The compliance report (officer, auditor).
    pub async fn report(&self, since: Option<&str>) -> Result<kluis_proto::report::Report, ClientError> {
        let req = pb::GetReportRequest { since: since.unwrap_or_default().to_owned() };
        let r = call!(self, Rpc::GetReport, admin.get_report(req))?.into_inner();
        serde_json::from_str(&r.json).map_err(|_| ClientError::BadResponse { what: "report is not kluis-report/v1 JSON" })
    }

    /// The audit trail as JSON lines ending with a signed head; `since` is RFC 3339, `tail` 0 for all.
    pub async fn export_audit(&self, since: Option<&str>, tail: u64) -> Result<Vec<String>, ClientError> {
        let req = pb::ExportAuditRequest { since: since.unwrap_or_default().to_owned(), tail };
        // The whole stream is one attempt: a stream cut short is read again from the start.
        self.call(Rpc::ExportAudit, |s: &Services| {
            let mut audit = s.audit.clone();
            let req = req.clone();
            async move {
                let mut stream = audit.export_audit(req).await?.into_inner();
                let mut lines = Vec::new();
                while let Some(line) = stream.message().await? {
                    lines.push(line.json);
                }
                Ok(lines)
            }
        })
        .await
    }

    /// The audit trail as it streams in: `line` is called with each JSON line as it
    /// arrives (nothing is held whole in memory); an error from `line` stops the export.
    pub async fn export_audit_each<E: From<ClientError>>(
        &self,
        since: Option<&str>,
        tail: u64,
        mut line: impl FnMut(String) -> Result<(), E>,
    ) -> Result<(), E> {
        let req = pb::ExportAuditRequest { since: since.unwrap_or_default().to_owned(), tail };
        // Opening the stream goes through the retry loop; once lines have been handed to `line`,
        // a stream cut short is an error (it cannot be read again from the start here).
        let (stream, at) = self
            .call_at(Rpc::ExportAudit, |s: &Services| {
                let mut audit = s.audit.clone();
                let req = req.clone();
                async move { audit.export_audit(req).await }
            })
            .await?;
        let mut stream = stream.into_inner();
        let t = &self.targets[at];
        while let Some(l) = stream.message().await.map_err(|s| ClientError::from_status_with(&t.endpoint, s, &t.last_tls))? {
            line(l.json)?;
        }
        Ok(())
    }

    /// The server's Ed25519 audit public key (32 bytes).
    pub async fn audit_public_key(&self) -> Result<Vec<u8>, ClientError> {
        let r = call!(self, Rpc::GetAuditPublicKey, audit.get_audit_public_key(pb::GetAuditPublicKeyRequest {}))?;
        Ok(r.into_inner().ed25519)
    }
}

fn destruction(d: pb::Destruction) -> DestructionInfo {
    DestructionInfo {
        id: d.id,
        target_kind: DestructionKind::from_wire(d.kind, &d.target_kind),
        target: d.target,
        keyring: d.keyring,
        requested_by: d.requested_by,
        requested_unix: d.requested_unix,
        due_unix: d.due_unix,
        state: DestructionState::from_wire(d.destruction_state, &d.state),
        cancelled_by: d.cancelled_by,
        done_unix: d.done_unix,
        approval_id: d.approval_id,
        reason: DestructionReason::from_wire(d.destruction_reason, &d.reason),
    }
}

fn destroy_outcome(r: pb::DestroyResponse) -> Result<DestroyOutcome, ClientError> {
    match (r.approval, r.destruction) {
        (Some(a), None) => Ok(DestroyOutcome::PendingApproval(approval(a))),
        (None, Some(d)) => Ok(DestroyOutcome::Scheduled(destruction(d))),
        _ => Err(ClientError::BadResponse { what: "destroy answer must carry an approval or a destruction" }),
    }
}

fn keyring_info(k: pb::Keyring) -> KeyringInfo {
    KeyringInfo {
        name: k.name,
        current_version: k.current_version,
        created_unix: k.created_unix,
        retention_days: k.retention_days,
        issued_keys: k.issued_keys,
        versions: k
            .versions
            .into_iter()
            .map(|v| KeyringVersionInfo {
                version: v.version,
                created_unix: v.created_unix,
                state: VersionState::from_wire(v.version_state, &v.state),
            })
            .collect(),
        rotation_period_days: k.rotation_period_days,
        next_rotation_unix: k.next_rotation_unix,
        held: k.held,
        hold_reason: k.hold_reason,
        hold_by: k.hold_by,
        hold_since_unix: k.hold_since_unix,
        destroyed_unix: k.destroyed_unix,
    }
}

fn escrow_status(s: pb::EscrowStatus) -> EscrowStatus {
    EscrowStatus {
        installed: s.installed,
        ceremony_id: s.ceremony_id,
        recovery_recipient: s.recovery_recipient,
        threshold: s.threshold,
        shares: s.shares,
        installed_unix: s.installed_unix,
        custodians: s.custodians,
        keys_without_escrow: s.keys_without_escrow,
        previous_recipients: s.previous_recipients,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tonic::{Code, Status};

    const EP: &str = "https://kms.example:8443";

    /// A status as the client reads it off the wire (headers and details only).
    fn over_the_wire(s: Status) -> Status {
        Status::from_header_map(s.into_http::<()>().headers()).unwrap()
    }

    #[test]
    fn every_reason_from_the_server_gives_its_class() {
        for &r in Reason::ALL {
            let sent = kluis_proto::error::status(Code::FailedPrecondition, "m", r);
            let e = ClientError::from_status(EP, over_the_wire(sent));
            assert_eq!(e.reason(), Some(r));
            assert_eq!(e.code(), Some(Code::FailedPrecondition));
            assert_eq!(e.class(), ErrorClass::of_reason(r), "{r}");
        }
    }

    #[test]
    fn the_reason_decides_where_one_code_covers_several_failures() {
        let tampered = kluis_proto::error::status(Code::InvalidArgument, "does not authenticate", Reason::WrappedKeyNotAuthentic);
        assert_eq!(ClientError::from_status(EP, over_the_wire(tampered)).class(), ErrorClass::Integrity);
        let mismatch = kluis_proto::error::status(Code::InvalidArgument, "belongs to keyring b", Reason::KeyringMismatch);
        assert_eq!(ClientError::from_status(EP, over_the_wire(mismatch)).class(), ErrorClass::Integrity);
        // The same code and even the same words, without the integrity reason: not integrity.
        let field = kluis_proto::error::status(Code::InvalidArgument, "invalid wrapped_key: empty", Reason::InvalidArgument);
        assert_eq!(ClientError::from_status(EP, over_the_wire(field)).class(), ErrorClass::Other);
        let audit = kluis_proto::error::status(Code::Unavailable, "the audit trail cannot be written", Reason::AuditUnavailable);
        assert_eq!(ClientError::from_status(EP, over_the_wire(audit)).class(), ErrorClass::Unavailable);
    }

    /// Version skew: an older server sends no ErrorInfo; the code still decides.
    #[test]
    fn a_status_without_details_is_classified_by_its_code() {
        let cases = [
            (Status::permission_denied("principal \"sealer\" may not UnwrapDataKey"), ErrorClass::Refused),
            (Status::unauthenticated("the client certificate is revoked"), ErrorClass::Refused),
            (Status::not_found("data key k1 is not known to this server"), ErrorClass::Refused),
            (Status::failed_precondition("keyring \"k\" was destroyed"), ErrorClass::Refused),
            (Status::unavailable("the audit trail cannot be written"), ErrorClass::Unavailable),
            // Before reasons, this was exit 5 only because its text said "wrapped".
            (Status::invalid_argument("the wrapped data key k1 does not authenticate"), ErrorClass::Other),
            (Status::already_exists("keyring \"k\" already exists"), ErrorClass::Other),
            (Status::internal("internal error: x"), ErrorClass::Other),
        ];
        for (s, class) in cases {
            let text = s.message().to_owned();
            let e = ClientError::from_status(EP, over_the_wire(s));
            assert_eq!(e.reason(), None, "{text}");
            assert!(matches!(e, ClientError::Server { .. }), "{e:?}");
            assert_eq!(e.class(), class, "{text}");
        }
        let deadline = ClientError::from_status(EP, Status::deadline_exceeded("too slow"));
        assert!(matches!(deadline, ClientError::DeadlineExceeded { .. }), "{deadline:?}");
        assert_eq!(deadline.class(), ErrorClass::Unavailable);
    }

    /// A transport error as tonic hands it up: Unknown (or another code) with a source.
    fn transport(e: impl std::error::Error + Send + Sync + 'static) -> Status {
        Status::from_error(Box::new(e))
    }

    #[test]
    fn a_connection_lost_mid_request_is_unavailable_and_does_not_blame_the_certificate() {
        for kind in [std::io::ErrorKind::ConnectionReset, std::io::ErrorKind::BrokenPipe, std::io::ErrorKind::UnexpectedEof] {
            let e = ClientError::from_status(EP, transport(std::io::Error::new(kind, "gone")));
            assert!(matches!(e, ClientError::ConnectionLost { .. }), "{e:?}");
            assert_eq!(e.class(), ErrorClass::Unavailable);
            assert_eq!(e.class().exit_code(), 3);
            let text = e.to_string();
            assert!(text.contains("retry later") && !text.contains("certificate"), "{text}");
        }
        // Cancelled with a transport source (hyper's "canceled") is the same.
        let mut s = Status::cancelled("connection closed");
        s.set_source(std::sync::Arc::new(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset")));
        assert!(matches!(ClientError::from_status(EP, s), ClientError::ConnectionLost { .. }));
    }

    /// The channel's own reconnect failed: tonic hands up UNAVAILABLE with its
    /// ConnectError in the chain. That request was never sent.
    #[test]
    fn a_failed_reconnect_is_a_connect_failure_with_its_io_kind() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let s = Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(s.code(), Code::Unavailable);
        let e = ClientError::from_status(EP, s);
        match &e {
            ClientError::Connect { io, detail, .. } => {
                assert_eq!(*io, Some(std::io::ErrorKind::ConnectionRefused));
                assert_eq!(detail, "Connection refused (os error 111)");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.class(), ErrorClass::Unavailable);
        assert!(e.to_string().starts_with("cannot reach the Kluis server at https://kms.example:8443: Connection refused"), "{e}");
        // Lost mid-request: the kind is kept for the retry line.
        let e = ClientError::from_status(EP, transport(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset")));
        assert!(matches!(e, ClientError::ConnectionLost { io: Some(std::io::ErrorKind::ConnectionReset), .. }), "{e:?}");
        // A TLS alert during the reconnect is still a refusal, not "unreachable".
        let alert = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked));
        let e = ClientError::from_status(EP, Status::from_error(Box::new(tonic::ConnectError(Box::new(alert)))));
        assert!(matches!(e, ClientError::TlsRejected { .. }), "{e:?}");
    }

    #[test]
    fn a_tls_alert_from_the_server_is_a_refusal_that_says_what_was_refused() {
        use rustls::AlertDescription as A;
        for (alert, words) in [
            (A::BadCertificate, "signed by the server's client CA"),
            (A::UnknownCA, "signed by the server's client CA"),
            (A::CertificateUnknown, "signed by the server's client CA"),
            (A::CertificateRevoked, "this client's certificate is revoked"),
            (A::CertificateExpired, "this client's certificate has expired or is not valid yet"),
            (A::DecryptError, "signed by the server's client CA"),
            (A::CertificateRequired, "requires a client certificate"),
            (A::HandshakeFailure, "unexpired and not revoked"),
        ] {
            // tokio-rustls hands the rustls error up inside an io::Error.
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::AlertReceived(alert));
            let e = ClientError::from_status(EP, transport(io));
            assert!(matches!(e, ClientError::TlsRejected { alert: Some(a), .. } if a == alert), "{alert:?}: {e:?}");
            assert_eq!(e.class(), ErrorClass::Refused);
            let text = e.to_string();
            assert!(text.contains("refused by the server") && text.contains(words), "{alert:?}: {text}");
        }
    }

    /// On an established connection HTTP/2 hands the TLS failure up rebuilt from kind and
    /// text; the alert recorded by the connection's stream names it.
    #[test]
    fn an_alert_behind_an_untyped_tls_failure_is_named_from_the_connection() {
        let rebuilt = || transport(std::io::Error::new(std::io::ErrorKind::InvalidData, "received fatal alert: CertificateRevoked"));
        let last = LastTlsError::default();
        let e = ClientError::from_status_with(EP, rebuilt(), &last);
        assert!(matches!(e, ClientError::TlsRejected { alert: None, .. }), "{e:?}");
        assert_eq!(e.class(), ErrorClass::Refused);
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked);
        last.record(&std::io::Error::new(std::io::ErrorKind::InvalidData, alert));
        let e = ClientError::from_status_with(EP, rebuilt(), &last);
        assert!(matches!(e, ClientError::TlsRejected { alert: Some(rustls::AlertDescription::CertificateRevoked), .. }), "{e:?}");
        assert!(e.to_string().contains("this client's certificate is revoked"), "{e}");
        // A lost connection does not pick up a recorded alert.
        last.record(&std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA)));
        let lost = ClientError::from_status_with(EP, transport(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset")), &last);
        assert!(matches!(lost, ClientError::ConnectionLost { .. }), "{lost:?}");
    }

    /// Each reason this client does not accept the server's certificate has its own
    /// variant and words, from the rustls error's type (never its text); all are exit 4.
    #[test]
    fn each_server_certificate_problem_is_named() {
        use rustls::CertificateError as C;
        use rustls::pki_types::{ServerName, UnixTime};
        let at = |secs: u64| UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
        let cases: Vec<(C, &str)> = vec![
            (
                C::NotValidForNameContext {
                    expected: ServerName::try_from("kms.example").unwrap().to_owned(),
                    presented: vec!["DnsName(\"localhost\")".into()],
                },
                "not valid for the name \"kms.example\" this client checks (the certificate names DnsName(\"localhost\")); set `server_name`",
            ),
            (C::NotValidForName, "not valid for the name"),
            (C::UnknownIssuer, "not signed by the CA in `ca`"),
            (
                C::ExpiredContext { time: at(1_800_000_000), not_after: at(1_700_000_000) },
                "an expired certificate (expired at 2023-11-14T22:13:20Z; this machine's clock says 2027-01-15T08:00:00Z)",
            ),
            (C::Expired, "an expired certificate: the server's certificate must be renewed"),
            (
                C::NotValidYetContext { time: at(1_700_000_000), not_before: at(1_800_000_000) },
                "not valid yet (valid from 2027-01-15T08:00:00Z; this machine's clock says 2023-11-14T22:13:20Z): check this machine's clock",
            ),
            (C::NotValidYet, "not valid yet: check this machine's clock"),
            (C::BadSignature, "does not trust"),
        ];
        for (c, words) in cases {
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::InvalidCertificate(c.clone()));
            let e = ClientError::from_status(EP, transport(io));
            assert_eq!(e.class(), ErrorClass::Refused, "{c:?}");
            let text = e.to_string();
            assert!(text.contains(words), "{c:?}: {text}");
        }
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::InvalidCertificate(C::UnknownIssuer));
        assert!(matches!(ClientError::from_status(EP, transport(io)), ClientError::ServerUnknownIssuer { .. }));
    }

    #[test]
    fn a_request_timeout_is_a_deadline_not_a_lost_connection() {
        let e = ClientError::from_status(EP, transport(tonic::TimeoutExpired(())));
        assert!(matches!(e, ClientError::DeadlineExceeded { .. }), "{e:?}");
        assert_eq!(e.class(), ErrorClass::Unavailable);
    }

    #[test]
    fn local_failures_have_their_class() {
        assert_eq!(ClientError::BadResponse { what: "x" }.class(), ErrorClass::Other);
        let read = ClientError::ReadFile { path: "/nonexistent".into(), source: std::io::Error::other("no") };
        assert_eq!(read.class(), ErrorClass::Other);
        assert_eq!(ClientError::DeadlineExceeded { endpoint: EP.into() }.class(), ErrorClass::Unavailable);
    }
}
