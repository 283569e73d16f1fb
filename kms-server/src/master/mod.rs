//! Master-key providers. The master key wraps keyring keys only (never data keys),
//! so a provider is used at start-up, at keyring creation and rotation, and for
//! master-key migration; never once per data key.

pub mod pkcs11;
pub mod software;

use zeroize::Zeroizing;

/// Errors of the master-key layer.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("master key file {path} could not be read: {source}")]
    ReadKeyFile { path: std::path::PathBuf, source: std::io::Error },
    #[error("master key file {path} could not be written: {source}")]
    WriteKeyFile { path: std::path::PathBuf, source: std::io::Error },
    #[error("master key file {path} already exists; refusing to overwrite a master key")]
    KeyFileExists { path: std::path::PathBuf },
    #[error(
        "master key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    KeyFilePermissions { path: std::path::PathBuf, mode: u32 },
    #[error("master key file {path} is not a Kluis master key ({reason})")]
    KeyFileFormat { path: std::path::PathBuf, reason: &'static str },
    #[error("master key file {path} is passphrase-protected but no passphrase was configured (passphrase_file or passphrase_env)")]
    PassphraseMissing { path: std::path::PathBuf },
    #[error("the passphrase does not open master key file {path}")]
    PassphraseWrong { path: std::path::PathBuf },
    #[error("passphrase source {source_name} could not be read: {reason}")]
    PassphraseSource { source_name: String, reason: std::io::Error },
    #[error("unwrapping with the master key failed: wrong master key, or the wrapped key was altered")]
    UnwrapFailed,
    #[error("the system random number generator failed")]
    Rng,
    #[error("HSM: {0}")]
    Hsm(#[source] Box<kluis_hsm::HsmError>),
    #[error("master key provider unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A master key: wraps and unwraps keyring keys with AES-256-GCM and AAD.
///
/// Implementations must be safe to share between threads; `wrap`/`unwrap` may block
/// (an HSM round trip) and are called from blocking contexts.
pub trait MasterKeyProvider: Send + Sync {
    /// A short, non-secret description for logs and errors (provider kind and key label or file).
    fn describe(&self) -> String;
    /// AES-256-GCM encrypt `plaintext` with `aad`, returning an opaque blob.
    fn wrap(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, MasterError>;
    /// Reverse of [`wrap`](Self::wrap).
    fn unwrap(&self, aad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, MasterError>;
    /// Whether the provider can serve requests now.
    fn health(&self) -> Result<(), MasterError>;
}
