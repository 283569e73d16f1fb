//! Master-key providers. The master key wraps keyring keys only (never data keys),
//! so a provider is used at start-up, at keyring creation and rotation, and for
//! master-key migration; never once per data key.

pub mod pkcs11;
pub mod software;

use std::sync::Arc;

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
    #[error("master key generation {generation} is invalid: generations start at 1 (the configured key)")]
    InvalidGeneration { generation: u32 },
    #[error("the store's master-key generation record is {len} bytes long, not 4 (u32 big-endian)")]
    GenerationRecord { len: usize },
    #[error("the [master] PKCS#11 config needs pin_file or pin_env (the PIN is never inline in the config)")]
    PinSourceMissing,
}

fn passphrase_source(file: &Option<std::path::PathBuf>, env: &Option<String>) -> software::PassphraseSource {
    match (file, env) {
        (Some(f), _) => software::PassphraseSource::File(f.clone()),
        (None, Some(v)) => software::PassphraseSource::Env(v.clone()),
        (None, None) => software::PassphraseSource::None,
    }
}

/// The PKCS#11 settings of a `[master]` section, if it is one.
pub fn pkcs11_settings(cfg: &crate::config::MasterConfig) -> Option<Result<pkcs11::Pkcs11Settings, MasterError>> {
    match cfg {
        crate::config::MasterConfig::Pkcs11 { module, token_label, key_label, pin_file, pin_env, reconnect_backoff_ms } => {
            Some(
                pkcs11::Pkcs11Settings::from_fields(module, token_label, key_label, pin_file, pin_env, *reconnect_backoff_ms)
                    .ok_or(MasterError::PinSourceMissing),
            )
        }
        crate::config::MasterConfig::Software { .. } => None,
    }
}

/// Opens the configured master key at `generation` (the store's): a software key file
/// (or token key) of a later generation is opened without the configured (generation 1)
/// one, so an officer may remove that once no older copy of the store needs it.
/// Key files readable by others are refused.
pub fn open_configured(
    cfg: &crate::config::MasterConfig,
    generation: u32,
) -> Result<std::sync::Arc<dyn MasterKeyProvider>, MasterError> {
    use crate::config::MasterConfig;
    match cfg {
        MasterConfig::Software { key_file, passphrase_file, passphrase_env } => Ok(std::sync::Arc::new(
            software::SoftwareMasterKey::open_generation(key_file, generation, &passphrase_source(passphrase_file, passphrase_env))?,
        )),
        MasterConfig::Pkcs11 { .. } => match pkcs11_settings(cfg) {
            Some(s) => Ok(std::sync::Arc::new(pkcs11::Pkcs11MasterKey::open_generation(&s?, generation)?)),
            None => Err(MasterError::PinSourceMissing),
        },
    }
}

/// Creates the configured master key (a new key file, or a new token key).
pub fn create_configured(cfg: &crate::config::MasterConfig) -> Result<std::sync::Arc<dyn MasterKeyProvider>, MasterError> {
    use crate::config::MasterConfig;
    match cfg {
        MasterConfig::Software { key_file, passphrase_file, passphrase_env } => Ok(std::sync::Arc::new(
            software::SoftwareMasterKey::create(key_file, &passphrase_source(passphrase_file, passphrase_env))?,
        )),
        MasterConfig::Pkcs11 { .. } => match pkcs11_settings(cfg) {
            Some(s) => Ok(std::sync::Arc::new(pkcs11::Pkcs11MasterKey::create(&s?)?)),
            None => Err(MasterError::PinSourceMissing),
        },
    }
}

/// Opens the configured master key (generation 1), creating it if it does not exist yet.
/// Returns whether it was created.
pub fn open_or_create_configured(
    cfg: &crate::config::MasterConfig,
) -> Result<(std::sync::Arc<dyn MasterKeyProvider>, bool), MasterError> {
    match open_configured(cfg, 1) {
        Ok(k) => Ok((k, false)),
        // No key file, or no key of that label on the token: make it.
        Err(MasterError::ReadKeyFile { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok((create_configured(cfg)?, true))
        }
        Err(MasterError::Hsm(e)) if matches!(*e, kluis_hsm::HsmError::KeyMissing { .. }) => {
            Ok((create_configured(cfg)?, true))
        }
        Err(e) => Err(e),
    }
}

/// The store META value recording master-key generation `generation` (u32 big-endian).
pub fn encode_generation(generation: u32) -> Vec<u8> {
    generation.to_be_bytes().to_vec()
}

/// Reads the store META value of the master-key generation: absent means 1 (the configured key
/// itself); anything but 4 bytes, or generation 0, is an error.
pub fn decode_generation(value: Option<&[u8]>) -> Result<u32, MasterError> {
    let Some(bytes) = value else { return Ok(1) };
    let arr: [u8; 4] = bytes.try_into().map_err(|_| MasterError::GenerationRecord { len: bytes.len() })?;
    match u32::from_be_bytes(arr) {
        0 => Err(MasterError::InvalidGeneration { generation: 0 }),
        g => Ok(g),
    }
}

impl MasterError {
    /// Whether the error says a key of that name already exists (file or token key).
    pub fn is_key_exists(&self) -> bool {
        match self {
            MasterError::KeyFileExists { .. } => true,
            MasterError::Hsm(e) => matches!(**e, kluis_hsm::HsmError::KeyExists { .. }),
            _ => false,
        }
    }
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
    /// The key of `generation` of this configured master key: generation 1 is the configured key
    /// itself; generation g > 1 is a sibling: the key file `<key_file>.g<g>` (same directory, same
    /// passphrase source, mode 0600) or the token key labelled `<key_label>.g<g>` on the same token.
    /// `create = false` opens an existing one (error if missing); `create = true` makes a new one and
    /// refuses to overwrite an existing key (KeyFileExists / HSM KeyExists).
    ///
    /// Always relative to the configured base key, also when called on a provider that is itself
    /// a generation g > 1. Generation 0 is [`MasterError::InvalidGeneration`].
    fn generation(&self, generation: u32, create: bool) -> Result<Arc<dyn MasterKeyProvider>, MasterError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_record_round_trip() {
        assert_eq!(decode_generation(None).unwrap(), 1);
        assert_eq!(encode_generation(1), vec![0, 0, 0, 1]);
        assert_eq!(decode_generation(Some(&encode_generation(7))).unwrap(), 7);
        assert_eq!(decode_generation(Some(&[0, 0, 1, 0])).unwrap(), 256);
        assert!(matches!(decode_generation(Some(&[0, 0, 0, 0])), Err(MasterError::InvalidGeneration { generation: 0 })));
        assert!(matches!(decode_generation(Some(&[2])), Err(MasterError::GenerationRecord { len: 1 })));
    }
}
