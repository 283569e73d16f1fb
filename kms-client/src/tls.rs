//! The TLS under the gRPC channel: tokio-rustls over TCP, set up here rather than by
//! tonic so that the rustls error behind a failed read is kept by type.
//!
//! With TLS 1.3 the server checks this client's certificate after the client finished its
//! side of the handshake; a refusal (an alert: expired, revoked, unknown CA, ...) arrives on
//! the first read of the first request. HTTP/2 hands that failure up as an I/O error it
//! rebuilt from the kind and the text, without the rustls error. The stream here records
//! the rustls error of each failed read or write ([`LastTlsError`]), so the client can say
//! which alert the server sent, by type.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The ALPN protocol of gRPC.
const ALPN_H2: &[u8] = b"h2";

/// Errors setting up TLS from the client config's files.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{what} is not valid PEM: {source}")]
    Pem { what: &'static str, source: rustls::pki_types::pem::Error },
    #[error("the CA certificate in `ca` cannot be used: {0}")]
    Ca(#[source] rustls::Error),
    #[error("the client certificate and key cannot be used: {0}")]
    Identity(#[source] rustls::Error),
    #[error("the server name {name:?} is not a DNS name or IP address")]
    ServerName { name: String },
}

/// The rustls error of the last failed read or write on a connection of one client.
#[derive(Clone, Default)]
pub struct LastTlsError(Arc<Mutex<Option<rustls::Error>>>);

impl LastTlsError {
    pub(crate) fn record(&self, e: &io::Error) {
        if let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(tls.clone());
        }
    }

    /// The recorded error, if any (and forgets it).
    pub fn take(&self) -> Option<rustls::Error> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Where and how to open a TLS connection to the server.
pub struct TlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    /// `host:port` to connect to.
    addr: String,
    /// Deadline of the TCP connect alone (as tonic's own connector has it); the caller's
    /// deadline around the first connect covers the TLS handshake too.
    tcp_timeout: Duration,
}

impl TlsConnect {
    /// TLS 1.2/1.3 (ring) trusting the CA certificates in `ca`, presenting `cert` and `key`,
    /// checking the server's certificate for `name`, offering only `h2`.
    pub fn new(ca: &[u8], cert: &[u8], key: &[u8], name: &str, addr: String, tcp_timeout: Duration) -> Result<Self, TlsSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            let c = c.map_err(|source| TlsSetupError::Pem { what: "`ca`", source })?;
            roots.add(c).map_err(TlsSetupError::Ca)?;
        }
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsSetupError::Pem { what: "`cert`", source })?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsSetupError::Pem { what: "`key`", source })?;
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::Identity)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(TlsSetupError::Identity)?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let host = name.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).map_err(|_| TlsSetupError::ServerName { name: name.to_owned() })?;
        Ok(Self { config: Arc::new(config), name, addr, tcp_timeout })
    }

    /// TCP, then the TLS handshake; a TLS failure is an `io::Error` holding the rustls error
    /// (as tokio-rustls gives it). The stream records later TLS failures in `last`.
    /// `tcp_up` is set once the TCP connection is made: a caller whose own deadline ran out
    /// tells from it whether the server answered at all (not there) or was too slow.
    pub async fn connect(&self, last: LastTlsError, tcp_up: &AtomicBool) -> io::Result<Recording<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>> {
        let tcp = tokio::time::timeout(self.tcp_timeout, tokio::net::TcpStream::connect(self.addr.as_str()))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out"))??;
        tcp_up.store(true, Ordering::Relaxed);
        tcp.set_nodelay(true)?;
        let stream = tokio_rustls::TlsConnector::from(self.config.clone()).connect(self.name.clone(), tcp).await?;
        if stream.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Err(io::Error::other("the server did not agree to HTTP/2 (ALPN h2): it is not a Kluis gRPC server"));
        }
        Ok(Recording { inner: stream, last })
    }
}

/// A stream that records the rustls error of a failed read or write.
pub struct Recording<S> {
    inner: S,
    last: LastTlsError,
}

impl<S> Recording<S> {
    fn seen<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            self.last.record(e);
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.seen(r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.seen(r)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.seen(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.seen(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.seen(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_rustls_error_is_recorded() {
        let last = LastTlsError::default();
        last.record(&io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
        assert!(last.take().is_none());
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired);
        last.record(&io::Error::new(io::ErrorKind::InvalidData, alert.clone()));
        assert_eq!(last.take(), Some(alert));
        assert!(last.take().is_none(), "taken once");
    }
}
