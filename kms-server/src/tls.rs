//! The mTLS listener in front of the gRPC server.
//!
//! tonic's own TLS acceptor drops a connection the moment its handshake fails. With
//! TLS 1.3 the server checks the client certificate only after the client has
//! finished its side of the handshake and started sending its request; closing a
//! socket with those bytes unread makes the kernel answer with a reset, and the
//! client then mostly sees a closed connection instead of the alert that says its
//! certificate was refused. It cannot tell "refused: do not retry" from "the server
//! went away: retry". Here a failed handshake ends in an orderly close: the alert is
//! sent, the write side is shut down, and whatever the client still sends is read
//! and dropped until it closes (at most [`LINGER`]), so the alert reaches it.
//!
//! The listener also bounds what a connection can hold ([`Limits`]): at most
//! `max_connections` open at once (more are closed at accept), a handshake deadline,
//! and an idle timeout after which a connection without traffic is closed. Client
//! certificates are checked against the configured X.509 CRLs, which are re-read
//! when a file changes (checked at each new connection; a bad file keeps the last
//! good set).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::Metrics;

/// How long a refused connection is kept open for the client to read the alert.
pub const LINGER: Duration = Duration::from_secs(5);

/// Largest CRL file read.
pub const MAX_CRL_BYTES: u64 = 64 << 20;

/// What a connection may hold (the config's `[limits]`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A connection that has not finished its TLS handshake by then is closed.
    pub handshake_timeout: Duration,
    /// A connection with no traffic either way for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once, handshakes included; more are closed at accept.
    pub max_connections: usize,
}

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: no PEM certificate could be read ({reason})")]
    Certificates { path: String, reason: String },
    #[error("{path}: no PEM private key could be read (expected an unencrypted `PRIVATE KEY` (PKCS#8), `EC PRIVATE KEY` or `RSA PRIVATE KEY` block)")]
    PrivateKey { path: String },
    #[error("{path}: the private key is encrypted; encrypted private keys are not supported (kms-server starts unattended): decrypt it to a file only its user can read, e.g. `openssl pkey -in {path} -out {path}.plain`")]
    EncryptedKey { path: String },
    #[error("{path}: no usable CA certificate")]
    ClientCa { path: String },
    #[error("CRL file {path} could not be read: {source}")]
    CrlRead { path: PathBuf, source: std::io::Error },
    #[error("CRL file {path} is larger than {cap} bytes")]
    CrlTooLarge { path: PathBuf, cap: u64 },
    #[error("CRL file {path}: {reason}")]
    CrlPem { path: PathBuf, reason: String },
    #[error("CRL file {path} holds no CRL")]
    CrlEmpty { path: PathBuf },
    #[error("CRL file {path} is not a valid X.509 CRL: {source}")]
    CrlInvalid { path: PathBuf, source: rustls::server::VerifierBuilderError },
    #[error("{0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Certificates { path: path.display().to_string(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Certificates { path: path.display().to_string(), reason: "none found".into() });
    }
    Ok(certs)
}

/// A PEM key that is encrypted: PKCS#8 `ENCRYPTED PRIVATE KEY`, or a legacy OpenSSL
/// key with `Proc-Type: 4,ENCRYPTED` headers. rustls_pemfile skips both silently.
pub fn is_encrypted_key(pem: &[u8]) -> bool {
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    has(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || has(b"Proc-Type: 4,ENCRYPTED")
}

/// The CRLs of one file (PEM with one or more `X509 CRL` blocks, or one DER CRL), each
/// checked to parse, so an error names the file.
pub fn load_crl_file(path: &Path, roots: &Arc<RootCertStore>) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsSetupError> {
    use std::io::Read as _;
    let err = |e| TlsSetupError::CrlRead { path: path.to_owned(), source: e };
    let mut bytes = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(MAX_CRL_BYTES + 1).read_to_end(&mut bytes)).map_err(err)?;
    if bytes.len() as u64 > MAX_CRL_BYTES {
        return Err(TlsSetupError::CrlTooLarge { path: path.to_owned(), cap: MAX_CRL_BYTES });
    }
    let is_pem = bytes.trim_ascii_start().starts_with(b"-----BEGIN");
    let crls: Vec<CertificateRevocationListDer<'static>> = if is_pem {
        rustls_pemfile::crls(&mut &bytes[..])
            .collect::<Result<_, _>>()
            .map_err(|e| TlsSetupError::CrlPem { path: path.to_owned(), reason: e.to_string() })?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    if crls.is_empty() {
        return Err(TlsSetupError::CrlEmpty { path: path.to_owned() });
    }
    // The verifier builder parses each CRL; built per file so the error names it.
    WebPkiClientVerifier::builder(roots.clone())
        .with_crls(crls.iter().cloned())
        .build()
        .map_err(|e| TlsSetupError::CrlInvalid { path: path.to_owned(), source: e })?;
    Ok(crls)
}

/// The size and modification time of each CRL file (None if unreadable), to see changes cheaply.
type Stamps = Vec<Option<(std::time::SystemTime, u64)>>;

fn stamps(paths: &[PathBuf]) -> Stamps {
    paths.iter().map(|p| std::fs::metadata(p).ok().and_then(|m| m.modified().ok().map(|t| (t, m.len())))).collect()
}

/// The server's TLS configuration, rebuilt when a CRL file changes.
pub struct Tls {
    /// The server's certificate and signing key, as rustls holds them (the raw key
    /// bytes are not kept).
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    roots: Arc<RootCertStore>,
    crl_paths: Vec<PathBuf>,
    current: Mutex<(Stamps, TlsAcceptor)>,
    metrics: Arc<Metrics>,
    alpn: Alpn,
}

/// The application protocol a listener announces by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/2, for gRPC (what tonic's `ServerTlsConfig` set up).
    H2,
    /// None: KMIP clients negotiate no application protocol.
    None,
}

impl Tls {
    /// The server's TLS: its certificate and key, client certificates required and
    /// verified against `client_ca` and the CRLs in `crls`, HTTP/2 by ALPN (what
    /// tonic's `ServerTlsConfig` set up). A CRL that cannot be read or parsed is an error.
    pub fn new(
        (cert_path, cert_pem): (&Path, &[u8]),
        (key_path, key_pem): (&Path, &[u8]),
        (ca_path, ca_pem): (&Path, &[u8]),
        crls: &[PathBuf],
        metrics: Arc<Metrics>,
        alpn: Alpn,
    ) -> Result<Self, TlsSetupError> {
        let certs = certificates(cert_path, cert_pem)?;
        if is_encrypted_key(key_pem) {
            return Err(TlsSetupError::EncryptedKey { path: key_path.display().to_string() });
        }
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
            .ok()
            .flatten()
            .ok_or_else(|| TlsSetupError::PrivateKey { path: key_path.display().to_string() })?;
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(certificates(ca_path, ca_pem)?);
        if added == 0 {
            return Err(TlsSetupError::ClientCa { path: ca_path.display().to_string() });
        }
        let roots = Arc::new(roots);
        let stamp = stamps(crls);
        let mut all = Vec::new();
        for p in crls {
            all.extend(load_crl_file(p, &roots)?);
        }
        let first = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier(&roots, all)?)
            .with_single_cert(certs, key)?;
        let resolver = first.cert_resolver.clone();
        let acceptor = acceptor_for(first, alpn);
        Ok(Self { resolver, roots, crl_paths: crls.to_vec(), current: Mutex::new((stamp, acceptor)), metrics, alpn })
    }

    /// The acceptor for a new connection: rebuilt first if a CRL file changed. A file
    /// that became unreadable or malformed keeps the last good set (logged, counted).
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut cur = match self.current.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.crl_paths.is_empty() {
            return cur.1.clone();
        }
        let now = stamps(&self.crl_paths);
        if now != cur.0 {
            cur.0 = now;
            let loaded: Result<Vec<_>, _> = self.crl_paths.iter().map(|p| load_crl_file(p, &self.roots)).collect();
            match loaded.and_then(|crls| verifier(&self.roots, crls.into_iter().flatten().collect())) {
                Ok(v) => {
                    tracing::info!(files = self.crl_paths.len(), "CRLs reloaded");
                    let config = rustls::ServerConfig::builder().with_client_cert_verifier(v).with_cert_resolver(self.resolver.clone());
                    cur.1 = acceptor_for(config, self.alpn);
                }
                Err(e) => {
                    tracing::error!(error = %e, "CRLs not reloaded; keeping the previous ones");
                    self.metrics.reload_failed();
                }
            }
        }
        cur.1.clone()
    }
}

/// Client certificates required, from `roots`, not revoked by `crls`.
fn verifier(
    roots: &Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsSetupError> {
    // A CA without a configured CRL has nothing to check against: its certificates
    // pass on the CA alone (and the fingerprint list), as without any CRL.
    Ok(WebPkiClientVerifier::builder(roots.clone()).with_crls(crls).allow_unknown_revocation_status().build()?)
}

fn acceptor_for(mut config: rustls::ServerConfig, alpn: Alpn) -> TlsAcceptor {
    config.alpn_protocols = match alpn {
        Alpn::H2 => vec![b"h2".to_vec()],
        Alpn::None => Vec::new(),
    };
    TlsAcceptor::from(Arc::new(config))
}

/// Accepts on `listener` until dropped; yields the connections whose handshake succeeded.
pub struct Incoming {
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// One open connection counted against `max_connections`, released when dropped.
struct Slot {
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connection_closed();
    }
}

/// A handshaken connection that is closed after `idle` without traffic either way.
pub struct Conn {
    inner: TlsStream<TcpStream>,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    slot: Slot,
}

impl Conn {
    /// The client's certificate (the handshake required one), DER.
    pub fn peer_leaf(&self) -> Option<&[u8]> {
        self.inner.get_ref().1.peer_certificates()?.first().map(|c| c.as_ref())
    }

    /// A write's result, for both write paths: progress is traffic; a write still waiting
    /// once the idle timeout has passed fails.
    fn wrote(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.idle_expired(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }

    fn touch(&mut self) {
        self.deadline.as_mut().reset(tokio::time::Instant::now() + self.idle);
    }

    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.slot.metrics.idle_closed();
            tracing::debug!("connection idle too long; closed");
            return true;
        }
        false
    }
}

fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle timeout")
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending if this.idle_expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(cx, r)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(cx, r)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::Connected::connect_info(&self.inner)
    }
}

/// The stream of handshaken connections to serve, and the guard that stops accepting when dropped.
pub fn incoming(listener: TcpListener, tls: Arc<Tls>, limits: Limits) -> (ReceiverStream<io::Result<Conn>>, Incoming) {
    let (tx, rx) = mpsc::channel(64);
    let open = Arc::new(AtomicUsize::new(0));
    let rejects = Arc::new(RejectLog::default());
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                // One connection that went away before it was accepted.
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            if open.load(Ordering::Acquire) >= limits.max_connections {
                tls.metrics.refused_over_cap();
                tracing::warn!(max_connections = limits.max_connections, "connection refused: too many open connections");
                drop(tcp);
                continue;
            }
            open.fetch_add(1, Ordering::AcqRel);
            tls.metrics.connection_opened();
            let slot = Slot { open: open.clone(), metrics: tls.metrics.clone() };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, metrics, rejects) = (tls.acceptor(), tx.clone(), tls.metrics.clone(), rejects.clone());
            tokio::spawn(async move {
                let mut handshake = Box::pin(acceptor.accept(tcp).into_fallible());
                match tokio::time::timeout(limits.handshake_timeout, &mut handshake).await {
                    Ok(Ok(tls)) => {
                        let deadline = Box::pin(tokio::time::sleep(limits.idle_timeout));
                        let conn = Conn { inner: tls, idle: limits.idle_timeout, deadline, slot };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err((e, tcp))) => {
                        if let Some(suppressed) = rejects.allow() {
                            // The reason is rustls' text; escaped and cut, it cannot forge a log line.
                            let reason: String = e.to_string().escape_debug().take(200).collect();
                            tracing::warn!(peer = %peer, reason = %reason, suppressed, "TLS handshake refused");
                        }
                        linger(tcp).await;
                        drop(slot);
                    }
                    Err(_) => {
                        // Counted before the socket closes, so whoever sees the close sees the count.
                        metrics.handshake_timed_out();
                        tracing::debug!("TLS handshake not completed in time; connection closed");
                        drop(handshake);
                        drop(slot);
                    }
                }
            });
        }
    });
    (ReceiverStream::new(rx), Incoming { accept_loop })
}

/// How often a refused handshake is logged: a scan or a flood of bad clients writes at
/// most one line per 10 s, each saying how many refusals it stands for.
struct RejectLog {
    base: std::time::Instant,
    every: Duration,
    /// When the next line may be written, in milliseconds after `base`.
    next_ms: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Default for RejectLog {
    fn default() -> Self {
        Self::every(Duration::from_secs(10))
    }
}

impl RejectLog {
    fn every(every: Duration) -> Self {
        Self { base: std::time::Instant::now(), every, next_ms: Default::default(), suppressed: Default::default() }
    }

    /// Whether to log this refusal now; if so, how many were not logged since the last line.
    fn allow(&self) -> Option<u64> {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Acquire);
        let until = now.saturating_add(u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX));
        if now < next || self.next_ms.compare_exchange(next, until, Ordering::AcqRel, Ordering::Acquire).is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// An orderly close after a failed handshake (the alert is already written): no
/// reset while the client has unread data for us, so it reads the alert.
async fn linger(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 4096];
    let drain = async {
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_handshakes_are_logged_once_per_window_with_the_count_of_the_rest() {
        // A window no test run reaches: the first refusal is logged, the rest are counted.
        let log = RejectLog::every(Duration::from_secs(86_400));
        assert_eq!(log.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(log.allow(), None);
        }
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 5);
        // A zero window logs every refusal, each reporting what was held back before it.
        let log = RejectLog::every(Duration::ZERO);
        log.suppressed.store(3, Ordering::Relaxed);
        assert_eq!(log.allow(), Some(3));
        assert_eq!(log.allow(), Some(0));
    }
}
