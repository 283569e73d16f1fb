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

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How long a refused connection is kept open for the client to read the alert.
pub const LINGER: Duration = Duration::from_secs(5);

/// How long a client has to complete its TLS handshake. A connection that has not
/// finished by then is closed, so a peer that connects and stalls holds no task.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: no PEM certificate could be read ({reason})")]
    Certificates { path: String, reason: String },
    #[error("{path}: no PEM private key could be read")]
    PrivateKey { path: String },
    #[error("{path}: no usable CA certificate")]
    ClientCa { path: String },
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

/// The server's TLS: its certificate and key, client certificates required and
/// verified against `client_ca`, HTTP/2 by ALPN (what tonic's `ServerTlsConfig` set up).
pub fn acceptor(
    (cert_path, cert_pem): (&Path, &[u8]),
    (key_path, key_pem): (&Path, &[u8]),
    (ca_path, ca_pem): (&Path, &[u8]),
) -> Result<TlsAcceptor, TlsSetupError> {
    let certs = certificates(cert_path, cert_pem)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .ok()
        .flatten()
        .ok_or_else(|| TlsSetupError::PrivateKey { path: key_path.display().to_string() })?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates(ca_path, ca_pem)?);
    if added == 0 {
        return Err(TlsSetupError::ClientCa { path: ca_path.display().to_string() });
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
    let mut config = rustls::ServerConfig::builder().with_client_cert_verifier(verifier).with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
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

/// The stream of handshaken connections to serve, and the guard that stops accepting when dropped.
pub fn incoming(listener: TcpListener, acceptor: TlsAcceptor) -> (ReceiverStream<io::Result<TlsStream<TcpStream>>>, Incoming) {
    let (tx, rx) = mpsc::channel(64);
    let accept_loop = tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
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
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp).into_fallible()).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err((e, tcp))) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        linger(tcp).await;
                    }
                    Err(_) => tracing::debug!("TLS handshake not completed in time; connection closed"),
                }
            });
        }
    });
    (ReceiverStream::new(rx), Incoming { accept_loop })
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
