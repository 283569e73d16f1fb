//! PKCS#11 master key: a non-extractable, sensitive AES-256 token key found by
//! label (never by a stored handle), used with CKM_AES_GCM and a random IV.

use std::path::{Path, PathBuf};

use kluis_hsm::{Hsm, HsmError, Pin};
use zeroize::Zeroizing;

use super::{MasterError, MasterKeyProvider};

/// Sessions kept open to the token.
const POOL_SIZE: usize = 4;

/// Where the PIN comes from (never inline in the config).
pub enum PinSource {
    File(PathBuf),
    Env(String),
}

impl PinSource {
    fn read(&self) -> Result<Pin, MasterError> {
        match self {
            PinSource::File(p) => Pin::from_file(p).map_err(|e| MasterError::Hsm(Box::new(e))),
            PinSource::Env(var) => std::env::var(var).map(Pin::new).map_err(|_| MasterError::PassphraseSource {
                source_name: format!("environment variable {var}"),
                reason: std::io::Error::new(std::io::ErrorKind::NotFound, "not set"),
            }),
        }
    }
}

/// The PKCS#11 master-key provider.
pub struct Pkcs11MasterKey {
    hsm: Hsm,
    key_label: String,
}

impl Pkcs11MasterKey {
    fn connect(module: &Path, token_label: &str, pin: &PinSource) -> Result<Hsm, MasterError> {
        let pin = pin.read()?;
        Hsm::open(module, token_label, &pin, POOL_SIZE).map_err(|e| MasterError::Hsm(Box::new(e)))
    }

    /// Opens the token and checks that the key is a protected AES-256 master key.
    pub fn open(module: &Path, token_label: &str, key_label: &str, pin: &PinSource) -> Result<Self, MasterError> {
        let hsm = Self::connect(module, token_label, pin)?;
        hsm.check_master_key(key_label).map_err(|e| MasterError::Hsm(Box::new(e)))?;
        Ok(Self { hsm, key_label: key_label.to_owned() })
    }

    /// Generates the master key on the token; refuses if a key with the label exists.
    pub fn create(module: &Path, token_label: &str, key_label: &str, pin: &PinSource) -> Result<Self, MasterError> {
        let hsm = Self::connect(module, token_label, pin)?;
        hsm.generate_aes256_key(key_label).map_err(|e| MasterError::Hsm(Box::new(e)))?;
        hsm.check_master_key(key_label).map_err(|e| MasterError::Hsm(Box::new(e)))?;
        Ok(Self { hsm, key_label: key_label.to_owned() })
    }
}

fn hsm_err(e: HsmError) -> MasterError {
    match e {
        HsmError::DecryptFailed { .. } | HsmError::CiphertextTooShort { .. } => MasterError::UnwrapFailed,
        e if e.is_unavailable() => MasterError::Unavailable(Box::new(e)),
        e => MasterError::Hsm(Box::new(e)),
    }
}

impl MasterKeyProvider for Pkcs11MasterKey {
    fn describe(&self) -> String {
        format!("PKCS#11 key {:?} on token {:?}", self.key_label, self.hsm.token_label())
    }

    fn wrap(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, MasterError> {
        self.hsm.encrypt_aes_gcm(&self.key_label, aad, plaintext).map_err(hsm_err)
    }

    fn unwrap(&self, aad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, MasterError> {
        self.hsm.decrypt_aes_gcm(&self.key_label, aad, blob).map_err(hsm_err)
    }

    fn health(&self) -> Result<(), MasterError> {
        self.hsm.health().map_err(hsm_err)
    }
}
