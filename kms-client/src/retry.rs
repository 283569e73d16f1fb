//! Riding out a server restart: one retry loop for every RPC of [`KmsClient`].
//!
//! Only transport-level unavailability is retried:
//! - the connection could not be made (refused, or connecting failed before TLS finished):
//!   the request was provably never sent;
//! - the connection was reset or lost while the request was in flight (broken pipe, the
//!   server killed, an HTTP/2 GOAWAY that cut the stream), or the answer is `UNAVAILABLE`
//!   *without* a Kluis reason (the gRPC stack, a proxy): the request may have reached
//!   the server.
//!
//! - the answer is `UNAVAILABLE` with the reason `STORE_UNAVAILABLE`: that server cannot
//!   reach its database (down, restarting, failing over, or cut off from this server only),
//!   which another replica may reach, or this one again in a moment. Treated as "may have
//!   reached the server": a connection lost during the commit leaves the commit unknown.
//!
//! Never retried: any other status carrying a Kluis reason (a refusal, an integrity failure,
//! the audit trail or the master key unavailable, ...), any other code (`PERMISSION_DENIED`,
//! `INVALID_ARGUMENT`, ...), a TLS refusal, and a deadline that ran out (the server is
//! there but did not answer in time; the request deadline already bounded the wait).
//!
//! [`Rpc::replay`] says per RPC whether a request that may have reached the server is
//! replayed: reads, `GenerateDataKey` (a replay may leave an issued key no file uses; it
//! is in the registry with its backup id), `UnwrapDataKey`, `RewrapDataKey` and
//! `MarkDataKeyEscrowed` (a replay finds the flag set) are; officer
//! writes and the restore-test record are retried only when they were never sent.
//!
//! With several endpoints (`endpoints = [...]` in the client config) one attempt is a pass
//! over them, starting at the one that answered last: a failure that [`next_step`] retries
//! moves on to the next endpoint at once (one line on stderr); a failure it does not retry
//! is final, whichever endpoint gave it (a server certificate of another CA, a refusal, ...).
//! When every endpoint failed, the pass fails with all their failures
//! ([`ClientError::NoEndpointAvailable`]) and the backoff below runs before the next pass.
//! So the same rules decide a retry on one endpoint and a move to another: an officer write
//! that may have reached one server is not sent to another either.
//!
//! Backoff is exponential with full jitter (a delay drawn uniformly from zero to
//! `min(max, initial * 2^n)`), within a total deadline counted from the first attempt.
//! Each retry says so on stderr in one line; when the deadline runs out the error says
//! how many attempts were made and what the last failure was, and keeps its class (so
//! the CLIs' "unavailable" exit code).
//!
//! [`KmsClient`]: crate::client::KmsClient

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::ClientError;
use crate::config::RetryConfig;

/// Every call the client makes to the server (the connection counts as one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    Connect,
    GenerateDataKey,
    UnwrapDataKey,
    RewrapDataKey,
    MarkDataKeyEscrowed,
    RecordRestoreTest,
    CreateKeyring,
    RotateKeyring,
    SetKeyringPolicy,
    SetLegalHold,
    ChangeGrant,
    ListGrants,
    RetireKeyringVersions,
    Approve,
    ListApprovals,
    ListKeyrings,
    GetKeyring,
    GetDataKey,
    FindDataKeys,
    DestroyKey,
    DestroyKeyring,
    CancelDestruction,
    ListDestructions,
    RotateMaster,
    InstallEscrow,
    RemoveEscrow,
    GetEscrowStatus,
    GetReport,
    ExportAudit,
    GetAuditPublicKey,
    ImportKmipObject,
}

/// When a failed request may be sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Also after it may have reached the server: sending it twice does no harm.
    Always,
    /// Only when it provably never left this client (the connection was not made).
    OnlyIfNeverSent,
}

impl Rpc {
    /// Whether this call may be replayed after it may have reached the server. No
    /// wildcard: a new RPC does not compile until it is decided.
    pub const fn replay(self) -> Replay {
        match self {
            // Connecting sends no request.
            Rpc::Connect
            // A replay issues a second key; the first stays in the registry, unused.
            | Rpc::GenerateDataKey
            // No state changes (both are audited; a replay is one more audit entry).
            | Rpc::UnwrapDataKey
            | Rpc::RewrapDataKey
            // Sets a flag that a replay finds set (one more audit entry saying so).
            | Rpc::MarkDataKeyEscrowed
            // Reads.
            | Rpc::ListGrants
            | Rpc::ListApprovals
            | Rpc::ListKeyrings
            | Rpc::GetKeyring
            | Rpc::GetDataKey
            | Rpc::FindDataKeys
            | Rpc::ListDestructions
            | Rpc::GetEscrowStatus
            | Rpc::GetReport
            | Rpc::ExportAudit
            | Rpc::GetAuditPublicKey => Replay::Always,
            // Writes whose replay is a second, different act: a second restore-test record,
            // a second version, a second approval request or destruction, a refusal that
            // hides the first success (KEYRING_EXISTS, APPROVAL_ALREADY_DONE), a master key
            // rotated twice.
            Rpc::RecordRestoreTest
            | Rpc::CreateKeyring
            | Rpc::RotateKeyring
            | Rpc::SetKeyringPolicy
            | Rpc::SetLegalHold
            | Rpc::ChangeGrant
            | Rpc::RetireKeyringVersions
            | Rpc::Approve
            | Rpc::DestroyKey
            | Rpc::DestroyKeyring
            | Rpc::CancelDestruction
            | Rpc::RotateMaster
            | Rpc::InstallEscrow
            | Rpc::RemoveEscrow
            // A replay would answer KMIP_OBJECT_EXISTS, hiding that the first one made it.
            | Rpc::ImportKmipObject => Replay::OnlyIfNeverSent,
        }
    }

    /// May a request of this RPC be sent again after a failure delivered as `delivery`?
    pub const fn may_retry(self, delivery: Delivery) -> bool {
        match delivery {
            Delivery::NeverSent => true,
            Delivery::MaybeSent => matches!(self.replay(), Replay::Always),
        }
    }
}

/// How far a request got before a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The connection was never made: the server cannot have seen the request.
    NeverSent,
    /// The connection broke with the request in flight, or the answer was UNAVAILABLE:
    /// the server may have carried it out.
    MaybeSent,
}

/// Why the server is unavailable, for the retry line and the final error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    ConnectionRefused,
    ConnectFailed,
    ConnectionReset,
    BrokenPipe,
    ConnectionLost,
    /// `UNAVAILABLE` without a Kluis reason.
    Unavailable,
    /// `UNAVAILABLE` with the reason `STORE_UNAVAILABLE`.
    StoreUnavailable,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cause::ConnectionRefused => "connection refused",
            Cause::ConnectFailed => "could not connect",
            Cause::ConnectionReset => "connection reset",
            Cause::BrokenPipe => "broken pipe",
            Cause::ConnectionLost => "connection lost during the request",
            Cause::Unavailable => "UNAVAILABLE",
            Cause::StoreUnavailable => "its store cannot be reached",
        })
    }
}

/// A failure worth retrying: how far the request got and why. `None` for everything
/// else (refusals, integrity, reasons from the server, deadlines, TLS, local failures).
pub fn transient(e: &ClientError) -> Option<(Delivery, Cause)> {
    use std::io::ErrorKind;
    match e {
        ClientError::Connect { io, .. } => {
            Some((Delivery::NeverSent, if *io == Some(ErrorKind::ConnectionRefused) { Cause::ConnectionRefused } else { Cause::ConnectFailed }))
        }
        ClientError::ConnectionLost { io, .. } => Some((
            Delivery::MaybeSent,
            match io {
                Some(ErrorKind::ConnectionReset) => Cause::ConnectionReset,
                Some(ErrorKind::BrokenPipe) => Cause::BrokenPipe,
                _ => Cause::ConnectionLost,
            },
        )),
        ClientError::Server { code: tonic::Code::Unavailable, reason: None, .. } => Some((Delivery::MaybeSent, Cause::Unavailable)),
        ClientError::Server { code: tonic::Code::Unavailable, reason: Some(kluis_proto::error::Reason::StoreUnavailable), .. } => {
            Some((Delivery::MaybeSent, Cause::StoreUnavailable))
        }
        // Every endpoint failed in a way that is retried: as far as the farthest got, for
        // the cause of the last one.
        ClientError::NoEndpointAvailable { failures } => {
            let each: Vec<(Delivery, Cause)> = failures.iter().filter_map(|f| transient(&f.error)).collect();
            let (_, cause) = *each.last()?;
            let delivery = if each.iter().any(|(d, _)| *d == Delivery::MaybeSent) { Delivery::MaybeSent } else { Delivery::NeverSent };
            Some((delivery, cause))
        }
        ClientError::Config(_)
        | ClientError::ReadFile { .. }
        | ClientError::Endpoint { .. }
        | ClientError::EndpointHost { .. }
        | ClientError::TlsSetup(_)
        | ClientError::TlsRejected { .. }
        | ClientError::ServerNameMismatch { .. }
        | ClientError::ServerUnknownIssuer { .. }
        | ClientError::ServerCertificateExpired { .. }
        | ClientError::ServerCertificateNotYetValid { .. }
        | ClientError::ServerNotTrusted { .. }
        | ClientError::Tls { .. }
        | ClientError::DeadlineExceeded { .. }
        | ClientError::Server { .. }
        | ClientError::BadResponse { .. }
        | ClientError::GaveUp { .. } => None,
    }
}

/// What to do after a failed attempt of `rpc`: `Some(cause)` to try again (the next
/// endpoint at once, or the same after the backoff), `None` when the failure is final.
/// The one place that decides both retry and failover.
pub fn next_step(rpc: Rpc, e: &ClientError) -> Option<Cause> {
    transient(e).filter(|(delivery, _)| rpc.may_retry(*delivery)).map(|(_, cause)| cause)
}

/// A move to the next endpoint, as told to the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverNotice {
    pub rpc: Rpc,
    /// The endpoint that failed and why.
    pub from: String,
    pub cause: Cause,
    /// The endpoint tried now.
    pub to: String,
}

impl std::fmt::Display for FailoverNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kluis: server {} unavailable ({}), trying {}", self.from, self.cause, self.to)
    }
}

/// The retry settings in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Total time from the first attempt; zero: never retry.
    pub deadline: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl From<&RetryConfig> for Policy {
    fn from(c: &RetryConfig) -> Self {
        Self { deadline: c.deadline(), initial_backoff: c.initial_backoff(), max_backoff: c.max_backoff() }
    }
}

impl Policy {
    /// The most the backoff before retry number `retry` (1 for the first) may be:
    /// `min(max, initial * 2^(retry-1))`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// Time for the backoff: real in the client, simulated in tests.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// Tokio's clock.
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// The jitter: a duration drawn uniformly from zero to `ceiling` (inclusive, to the millisecond).
pub trait Jitter: Send + Sync {
    fn draw(&self, ceiling: Duration) -> Duration;
}

/// Jitter from the operating system's random source (ring's `SystemRandom`).
pub struct SystemJitter(ring::rand::SystemRandom);

impl SystemJitter {
    pub fn new() -> Self {
        Self(ring::rand::SystemRandom::new())
    }
}

impl Default for SystemJitter {
    fn default() -> Self {
        Self::new()
    }
}

impl Jitter for SystemJitter {
    fn draw(&self, ceiling: Duration) -> Duration {
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        let mut b = [0u8; 8];
        // Without randomness, no jitter: the full backoff is still a backoff.
        if ring::rand::SecureRandom::fill(&self.0, &mut b).is_err() {
            return ceiling;
        }
        // The modulo bias over 2^64 is far below anything a backoff cares about.
        Duration::from_millis(u64::from_le_bytes(b) % ms.saturating_add(1))
    }
}

/// One retry, as told to the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub rpc: Rpc,
    pub cause: Cause,
    pub delay: Duration,
    /// The attempt about to be made after the delay (2 for the first retry).
    pub attempt: u32,
    /// Time left until the deadline, counted when the delay starts.
    pub left: Duration,
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kluis: server unavailable ({}), retrying in {:.1} s (attempt {}, {} s left)",
            self.cause,
            self.delay.as_secs_f64(),
            self.attempt,
            // Rounded up: "0 s left" would read as if nothing were left.
            self.left.as_secs() + u64::from(self.left.subsec_nanos() > 0)
        )
    }
}

/// Where notices go: stderr in the client, a list in tests.
pub type Notify = Arc<dyn Fn(&Notice) + Send + Sync>;

/// Where failover notices go: stderr in the client.
pub type NotifyFailover = Arc<dyn Fn(&FailoverNotice) + Send + Sync>;

/// The retry loop with its policy, clock, jitter and notice sink.
#[derive(Clone)]
pub struct Retrier {
    policy: Policy,
    clock: Arc<dyn Clock>,
    jitter: Arc<dyn Jitter>,
    notify: Notify,
    notify_failover: NotifyFailover,
}

impl Retrier {
    /// The real thing: tokio's clock, system jitter, one line on stderr per retry.
    pub fn new(policy: Policy) -> Self {
        Self::with(policy, Arc::new(TokioClock), Arc::new(SystemJitter::new()), Arc::new(|n: &Notice| eprintln!("{n}")))
    }

    pub fn with(policy: Policy, clock: Arc<dyn Clock>, jitter: Arc<dyn Jitter>, notify: Notify) -> Self {
        Self { policy, clock, jitter, notify, notify_failover: Arc::new(|n: &FailoverNotice| eprintln!("{n}")) }
    }

    /// The same loop, telling moves to the next endpoint to `notify` instead of stderr.
    pub fn with_failover_notify(mut self, notify: NotifyFailover) -> Self {
        self.notify_failover = notify;
        self
    }

    /// Tells of a move to the next endpoint.
    pub fn failover(&self, n: &FailoverNotice) {
        (self.notify_failover)(n);
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Runs `attempt` until it succeeds, fails in a way that is not retried for `rpc`, or
    /// the deadline runs out (then [`ClientError::GaveUp`] with the last failure).
    pub async fn run<T, F, Fut>(&self, rpc: Rpc, mut attempt: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let started = self.clock.now();
        let mut attempts: u32 = 0;
        loop {
            attempts = attempts.saturating_add(1);
            let e = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let Some(cause) = next_step(rpc, &e) else { return Err(e) };
            if self.policy.deadline.is_zero() {
                return Err(e);
            }
            let elapsed = self.clock.now().saturating_duration_since(started);
            let left = self.policy.deadline.saturating_sub(elapsed);
            if left.is_zero() {
                return Err(ClientError::GaveUp { attempts, elapsed, cause, last: Box::new(e) });
            }
            // The last attempt is made at the deadline, not after it.
            let delay = self.jitter.draw(self.policy.ceiling(attempts)).min(left);
            (self.notify)(&Notice { rpc, cause, delay, attempt: attempts.saturating_add(1), left });
            self.clock.sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::VecDeque;
    use std::io::ErrorKind;
    use std::sync::Mutex;

    use kluis_proto::error::Reason;
    use tonic::Code;

    use super::*;

    const EP: &str = "https://kms.example:8443";

    /// A clock that moves only when slept on, and remembers each sleep.
    struct FakeClock {
        start: Instant,
        now: Mutex<Duration>,
        slept: Mutex<Vec<Duration>>,
    }

    impl FakeClock {
        fn new() -> Arc<Self> {
            Arc::new(Self { start: Instant::now(), now: Mutex::new(Duration::ZERO), slept: Mutex::new(Vec::new()) })
        }

        fn advance(&self, d: Duration) {
            *self.now.lock().unwrap() += d;
        }

        fn slept(&self) -> Vec<Duration> {
            self.slept.lock().unwrap().clone()
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.start + *self.now.lock().unwrap()
        }

        fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            self.advance(d);
            self.slept.lock().unwrap().push(d);
            Box::pin(std::future::ready(()))
        }
    }

    /// Always the top of the range: the schedule's ceilings, exactly.
    struct Top;
    impl Jitter for Top {
        fn draw(&self, ceiling: Duration) -> Duration {
            ceiling
        }
    }

    /// Half the range.
    struct Half;
    impl Jitter for Half {
        fn draw(&self, ceiling: Duration) -> Duration {
            ceiling / 2
        }
    }

    fn policy(deadline_secs: u64) -> Policy {
        Policy { deadline: Duration::from_secs(deadline_secs), initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(5) }
    }

    struct Harness {
        clock: Arc<FakeClock>,
        notices: Arc<Mutex<Vec<Notice>>>,
        retrier: Retrier,
    }

    fn harness(policy: Policy, jitter: Arc<dyn Jitter>) -> Harness {
        let clock = FakeClock::new();
        let notices = Arc::new(Mutex::new(Vec::new()));
        let sink = notices.clone();
        let retrier = Retrier::with(policy, clock.clone(), jitter, Arc::new(move |n: &Notice| sink.lock().unwrap().push(n.clone())));
        Harness { clock, notices, retrier }
    }

    fn refused_conn() -> ClientError {
        ClientError::Connect { endpoint: EP.into(), detail: "Connection refused (os error 111)".into(), io: Some(ErrorKind::ConnectionRefused) }
    }

    fn lost(kind: Option<ErrorKind>) -> ClientError {
        ClientError::ConnectionLost { endpoint: EP.into(), detail: "gone".into(), io: kind }
    }

    fn server(code: Code, reason: Option<Reason>) -> ClientError {
        ClientError::Server { endpoint: EP.into(), code, reason, message: "m".into() }
    }

    /// Runs `rpc` against scripted answers (then success); returns the result and how
    /// many attempts were made.
    async fn run_script(h: &Harness, rpc: Rpc, script: Vec<ClientError>) -> (Result<&'static str, ClientError>, usize) {
        let script = Mutex::new(VecDeque::from(script));
        let calls = Mutex::new(0usize);
        let r = h
            .retrier
            .run(rpc, || {
                *calls.lock().unwrap() += 1;
                let next = script.lock().unwrap().pop_front();
                async move {
                    match next {
                        Some(e) => Err(e),
                        None => Ok("done"),
                    }
                }
            })
            .await;
        (r, calls.into_inner().unwrap())
    }

    #[test]
    fn the_backoff_doubles_from_the_initial_value_up_to_the_cap() {
        let p = policy(60);
        let ceilings: Vec<u64> = (1..=10).map(|n| u64::try_from(p.ceiling(n).as_millis()).unwrap()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]);
        // No overflow however long it goes on.
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(5));
        assert_eq!(p.ceiling(40), Duration::from_secs(5));
    }

    #[test]
    fn system_jitter_stays_within_the_ceiling_and_varies() {
        let j = SystemJitter::new();
        let ceiling = Duration::from_millis(1000);
        let draws: Vec<Duration> = (0..200).map(|_| j.draw(ceiling)).collect();
        assert!(draws.iter().all(|d| *d <= ceiling), "{draws:?}");
        let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
        assert!(distinct.len() > 50, "full jitter spreads the delays: {distinct:?}");
        assert_eq!(j.draw(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_restart_is_ridden_out_with_growing_jittered_delays_and_one_line_each() {
        let h = harness(policy(60), Arc::new(Half));
        let (r, calls) = run_script(&h, Rpc::GenerateDataKey, vec![refused_conn(), refused_conn(), lost(Some(ErrorKind::ConnectionReset)), refused_conn()]).await;
        assert_eq!(r.unwrap(), "done");
        assert_eq!(calls, 5);
        let ms: Vec<u128> = h.clock.slept().iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [50, 100, 200, 400]);
        let notices = h.notices.lock().unwrap();
        let lines: Vec<String> = notices.iter().map(ToString::to_string).collect();
        assert_eq!(lines, [
            "kluis: server unavailable (connection refused), retrying in 0.1 s (attempt 2, 60 s left)",
            "kluis: server unavailable (connection refused), retrying in 0.1 s (attempt 3, 60 s left)",
            "kluis: server unavailable (connection reset), retrying in 0.2 s (attempt 4, 60 s left)",
            "kluis: server unavailable (connection refused), retrying in 0.4 s (attempt 5, 60 s left)",
        ]);
    }

    #[tokio::test]
    async fn at_the_deadline_it_gives_up_naming_the_attempts_and_the_last_cause() {
        let h = harness(policy(60), Arc::new(Top));
        let script: Vec<ClientError> = (0..1000).map(|_| refused_conn()).collect();
        let (r, calls) = run_script(&h, Rpc::Connect, script).await;
        let e = r.unwrap_err();
        // 0.1 + 0.2 + ... + 3.2 = 6.3 s, then 5 s steps: 6.3 + 10 * 5 = 56.3, then the 3.7 s left.
        let slept = h.clock.slept();
        assert_eq!(slept.len(), 17, "{slept:?}");
        assert_eq!(*slept.last().unwrap(), Duration::from_millis(3700));
        assert_eq!(slept.iter().sum::<Duration>(), Duration::from_secs(60));
        assert_eq!(calls, 18, "one attempt at the start, one after each delay, the last at the deadline");
        match &e {
            ClientError::GaveUp { attempts, cause, last, .. } => {
                assert_eq!((*attempts, *cause), (18, Cause::ConnectionRefused));
                assert!(matches!(**last, ClientError::Connect { .. }), "{last:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.class(), crate::class::ErrorClass::Unavailable, "the exit code stays 'unavailable'");
        let text = e.to_string();
        assert!(text.contains("gave up after 18 attempts in 60.0 s") && text.contains("connection refused"), "{text}");
        assert!(text.contains("cannot reach the Kluis server"), "the last failure is named: {text}");
    }

    #[tokio::test]
    async fn a_zero_deadline_never_retries_and_keeps_the_error_as_it_was() {
        let h = harness(policy(0), Arc::new(Top));
        let (r, calls) = run_script(&h, Rpc::GenerateDataKey, vec![refused_conn()]).await;
        assert!(matches!(r.unwrap_err(), ClientError::Connect { .. }));
        assert_eq!(calls, 1);
        assert!(h.notices.lock().unwrap().is_empty());
        assert!(h.clock.slept().is_empty());
    }

    #[tokio::test]
    async fn answers_from_the_server_are_never_retried() {
        let never = [
            server(Code::PermissionDenied, Some(Reason::PermissionDenied)),
            server(Code::PermissionDenied, None),
            server(Code::InvalidArgument, Some(Reason::InvalidArgument)),
            server(Code::InvalidArgument, Some(Reason::WrappedKeyNotAuthentic)),
            server(Code::NotFound, Some(Reason::KeyUnknown)),
            server(Code::FailedPrecondition, Some(Reason::KeyDestroyed)),
            server(Code::Unauthenticated, None),
            server(Code::ResourceExhausted, None),
            server(Code::Internal, None),
            server(Code::Cancelled, None),
            // UNAVAILABLE with a Kluis reason is the server speaking: not a restart.
            server(Code::Unavailable, Some(Reason::AuditUnavailable)),
            server(Code::Unavailable, Some(Reason::MasterKeyUnavailable)),
            ClientError::DeadlineExceeded { endpoint: EP.into() },
            ClientError::TlsRejected { endpoint: EP.into(), alert: None, detail: "bad certificate".into() },
            ClientError::TlsRejected { endpoint: EP.into(), alert: Some(rustls::AlertDescription::UnknownCA), detail: "x".into() },
            ClientError::ServerNameMismatch { endpoint: EP.into(), expected: "kms".into(), presented: Vec::new() },
            ClientError::ServerUnknownIssuer { endpoint: EP.into() },
            ClientError::ServerCertificateExpired { endpoint: EP.into(), not_after: None, now: None },
            ClientError::ServerCertificateNotYetValid { endpoint: EP.into(), not_before: None, now: None },
            ClientError::ServerNotTrusted { endpoint: EP.into(), detail: "unknown issuer".into() },
            ClientError::Tls { endpoint: EP.into(), detail: "x".into() },
            ClientError::BadResponse { what: "x" },
        ];
        for e in never {
            let text = format!("{e:?}");
            assert_eq!(transient(&e), None, "{text}");
            let h = harness(policy(60), Arc::new(Top));
            let (r, calls) = run_script(&h, Rpc::ListKeyrings, vec![e]).await;
            assert!(r.is_err(), "{text}");
            assert_eq!(calls, 1, "{text}");
            assert!(h.notices.lock().unwrap().is_empty(), "{text}");
        }
    }

    #[test]
    fn transport_failures_say_how_far_the_request_got() {
        assert_eq!(transient(&refused_conn()), Some((Delivery::NeverSent, Cause::ConnectionRefused)));
        let other = ClientError::Connect { endpoint: EP.into(), detail: "tls handshake eof".into(), io: Some(ErrorKind::UnexpectedEof) };
        assert_eq!(transient(&other), Some((Delivery::NeverSent, Cause::ConnectFailed)));
        assert_eq!(transient(&lost(Some(ErrorKind::ConnectionReset))), Some((Delivery::MaybeSent, Cause::ConnectionReset)));
        assert_eq!(transient(&lost(Some(ErrorKind::BrokenPipe))), Some((Delivery::MaybeSent, Cause::BrokenPipe)));
        assert_eq!(transient(&lost(None)), Some((Delivery::MaybeSent, Cause::ConnectionLost)));
        assert_eq!(transient(&server(Code::Unavailable, None)), Some((Delivery::MaybeSent, Cause::Unavailable)));
        // A replica without its database: another may reach it; the commit may have happened.
        let store = server(Code::Unavailable, Some(Reason::StoreUnavailable));
        assert_eq!(transient(&store), Some((Delivery::MaybeSent, Cause::StoreUnavailable)));
        assert_eq!(next_step(Rpc::GenerateDataKey, &store), Some(Cause::StoreUnavailable));
        assert_eq!(next_step(Rpc::UnwrapDataKey, &store), Some(Cause::StoreUnavailable));
        assert_eq!(next_step(Rpc::DestroyKey, &store), None, "an officer write whose commit is unknown is not sent again");
    }

    /// The table: what may be replayed after it may have reached the server.
    #[test]
    fn only_reads_and_data_key_calls_are_replayed_after_they_may_have_been_sent() {
        use Rpc::*;
        let replayable = [
            Connect, GenerateDataKey, UnwrapDataKey, RewrapDataKey, MarkDataKeyEscrowed, ListGrants, ListApprovals, ListKeyrings, GetKeyring,
            GetDataKey, FindDataKeys, ListDestructions, GetEscrowStatus, GetReport, ExportAudit, GetAuditPublicKey,
        ];
        let writes = [
            RecordRestoreTest, CreateKeyring, RotateKeyring, SetKeyringPolicy, SetLegalHold, ChangeGrant, RetireKeyringVersions,
            Approve, DestroyKey, DestroyKeyring, CancelDestruction, RotateMaster, InstallEscrow, RemoveEscrow,
        ];
        for rpc in replayable {
            assert_eq!(rpc.replay(), Replay::Always, "{rpc:?}");
            assert!(rpc.may_retry(Delivery::MaybeSent) && rpc.may_retry(Delivery::NeverSent), "{rpc:?}");
        }
        for rpc in writes {
            assert_eq!(rpc.replay(), Replay::OnlyIfNeverSent, "{rpc:?}");
            assert!(!rpc.may_retry(Delivery::MaybeSent), "{rpc:?}");
            assert!(rpc.may_retry(Delivery::NeverSent), "{rpc:?}");
        }
    }

    #[tokio::test]
    async fn an_officer_write_is_retried_while_unsent_and_never_replayed_once_it_may_have_been_sent() {
        for rpc in [Rpc::DestroyKey, Rpc::ChangeGrant, Rpc::SetKeyringPolicy, Rpc::InstallEscrow, Rpc::Approve, Rpc::CreateKeyring] {
            // Refused connections first: retried; then the connection is lost mid-request: stop.
            let h = harness(policy(60), Arc::new(Top));
            let (r, calls) = run_script(&h, rpc, vec![refused_conn(), refused_conn(), lost(Some(ErrorKind::ConnectionReset))]).await;
            assert!(matches!(r, Err(ClientError::ConnectionLost { .. })), "{rpc:?}: {r:?}");
            assert_eq!(calls, 3, "{rpc:?}");
            assert_eq!(h.notices.lock().unwrap().len(), 2, "{rpc:?}");
            // UNAVAILABLE without a reason may have been carried out, too.
            let h = harness(policy(60), Arc::new(Top));
            let (r, calls) = run_script(&h, rpc, vec![server(Code::Unavailable, None)]).await;
            assert!(r.is_err() && calls == 1, "{rpc:?}");
        }
        // The same failures are replayed for a data key.
        let h = harness(policy(60), Arc::new(Top));
        let (r, calls) = run_script(&h, Rpc::GenerateDataKey, vec![lost(Some(ErrorKind::ConnectionReset)), server(Code::Unavailable, None)]).await;
        assert_eq!((r.unwrap(), calls), ("done", 3));
    }

    fn at(endpoint: &str, error: ClientError) -> crate::client::EndpointFailure {
        crate::client::EndpointFailure { endpoint: endpoint.into(), error }
    }

    /// Failover and retry are one decision: what is retried moves on to the next endpoint,
    /// what is final stays final whichever endpoint said it.
    #[test]
    fn the_next_endpoint_is_tried_exactly_when_a_retry_would_be_made() {
        use crate::client::EndpointFailure;
        let finals = [
            server(Code::PermissionDenied, Some(Reason::PermissionDenied)),
            server(Code::InvalidArgument, Some(Reason::InvalidArgument)),
            server(Code::Unavailable, Some(Reason::AuditUnavailable)),
            ClientError::ServerUnknownIssuer { endpoint: EP.into() },
            ClientError::ServerNameMismatch { endpoint: EP.into(), expected: "kms".into(), presented: Vec::new() },
            ClientError::TlsRejected { endpoint: EP.into(), alert: Some(rustls::AlertDescription::UnknownCA), detail: "x".into() },
            ClientError::DeadlineExceeded { endpoint: EP.into() },
        ];
        for e in &finals {
            assert_eq!(next_step(Rpc::GenerateDataKey, e), None, "{e:?}");
            assert_eq!(next_step(Rpc::ListKeyrings, e), None, "{e:?}");
        }
        assert_eq!(next_step(Rpc::GenerateDataKey, &refused_conn()), Some(Cause::ConnectionRefused));
        assert_eq!(next_step(Rpc::DestroyKey, &refused_conn()), Some(Cause::ConnectionRefused));
        // An officer write that may have reached one server is not sent to another.
        assert_eq!(next_step(Rpc::DestroyKey, &lost(Some(ErrorKind::ConnectionReset))), None);
        assert_eq!(next_step(Rpc::DestroyKey, &server(Code::Unavailable, None)), None);
        assert_eq!(next_step(Rpc::GenerateDataKey, &lost(Some(ErrorKind::ConnectionReset))), Some(Cause::ConnectionReset));
        // Every endpoint failed: as far as the farthest got, the last cause.
        let all = ClientError::NoEndpointAvailable {
            failures: vec![at("https://a:8443", refused_conn()), at("https://b:8443", lost(Some(ErrorKind::BrokenPipe)))],
        };
        assert_eq!(transient(&all), Some((Delivery::MaybeSent, Cause::BrokenPipe)));
        assert_eq!(next_step(Rpc::UnwrapDataKey, &all), Some(Cause::BrokenPipe));
        assert_eq!(next_step(Rpc::Approve, &all), None);
        let unsent = ClientError::NoEndpointAvailable { failures: vec![at("https://a:8443", refused_conn()), at("https://b:8443", refused_conn())] };
        assert_eq!(next_step(Rpc::Approve, &unsent), Some(Cause::ConnectionRefused));
        assert_eq!(all.class(), crate::class::ErrorClass::Unavailable);
        assert_eq!(all.class().exit_code(), 3);
        let none: Vec<EndpointFailure> = Vec::new();
        assert_eq!(transient(&ClientError::NoEndpointAvailable { failures: none }), None);
    }

    #[test]
    fn the_error_after_every_endpoint_failed_names_each_and_stays_bounded() {
        let failures = (1..=16)
            .map(|i| {
                let ep = format!("https://kms{i}.example:8443");
                at(&ep, ClientError::Connect { endpoint: ep.clone(), detail: "x".repeat(10_000), io: Some(ErrorKind::ConnectionRefused) })
            })
            .collect();
        let e = ClientError::NoEndpointAvailable { failures };
        let text = e.to_string();
        assert!(text.starts_with("no Kluis server in `endpoints` is available (16 tried): [1] cannot reach the Kluis server at https://kms1.example:8443: xxx"), "{}", &text[..200]);
        for i in 1..=16 {
            assert!(text.contains(&format!("[{i}] cannot reach the Kluis server at https://kms{i}.example:8443")), "{i}");
        }
        assert!(text.len() < 16 * 320 + 100, "bounded: {} bytes", text.len());
    }

    /// The line said when moving on.
    #[test]
    fn a_move_to_the_next_endpoint_is_one_line() {
        let n = FailoverNotice { rpc: Rpc::GenerateDataKey, from: "https://a:8443".into(), cause: Cause::ConnectionRefused, to: "https://b:8443".into() };
        assert_eq!(n.to_string(), "kluis: server https://a:8443 unavailable (connection refused), trying https://b:8443");
    }

    /// The deadline counts from the first attempt, attempts' own time included.
    #[tokio::test]
    async fn time_spent_in_attempts_counts_against_the_deadline() {
        let h = harness(policy(2), Arc::new(Top));
        let clock = h.clock.clone();
        let calls = Mutex::new(0u32);
        let r: Result<(), ClientError> = h
            .retrier
            .run(Rpc::ListKeyrings, || {
                *calls.lock().unwrap() += 1;
                clock.advance(Duration::from_millis(900));
                async { Err(refused_conn()) }
            })
            .await;
        // t=0.9 fail, sleep 0.1 -> t=1.9 fail, sleep 0.1 (0.1 left) -> t=2.9 fail: gave up.
        assert!(matches!(r, Err(ClientError::GaveUp { attempts: 3, .. })), "{r:?}");
        assert_eq!(h.clock.slept(), [Duration::from_millis(100), Duration::from_millis(100)]);
    }
}
