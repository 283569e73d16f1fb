//! PKCS#11 master key: a non-extractable, sensitive AES-256 token key found by
//! label (never by a stored handle), used with CKM_AES_GCM and a random IV.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kluis_hsm::{Hsm, HsmConfig, HsmError, Pin};
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

/// Everything needed to reach the master key on a token.
pub struct Pkcs11Settings {
    pub module: PathBuf,
    pub token_label: String,
    pub key_label: String,
    pub pin: PinSource,
    /// After the token went away, how long to wait between attempts to reconnect.
    pub reconnect_backoff: Duration,
}

impl Pkcs11Settings {
    /// From the `[master]` fields of a config; `None` when neither `pin_file` nor `pin_env` is set.
    pub fn from_fields(
        module: &std::path::Path,
        token_label: &str,
        key_label: &str,
        pin_file: &Option<PathBuf>,
        pin_env: &Option<String>,
        reconnect_backoff_ms: Option<u64>,
    ) -> Option<Self> {
        let pin = match (pin_file, pin_env) {
            (Some(f), _) => PinSource::File(f.clone()),
            (None, Some(v)) => PinSource::Env(v.clone()),
            (None, None) => return None,
        };
        Some(Self {
            module: module.to_owned(),
            token_label: token_label.to_owned(),
            key_label: key_label.to_owned(),
            pin,
            reconnect_backoff: reconnect_backoff_ms
                .map(Duration::from_millis)
                .unwrap_or(kluis_hsm::DEFAULT_RECONNECT_BACKOFF),
        })
    }
}

/// The PKCS#11 master-key provider.
pub struct Pkcs11MasterKey {
    /// Shared by every generation of this configured key: one login, one session pool.
    hsm: Arc<Hsm>,
    /// The label of this generation's key.
    key_label: String,
    /// The configured key label (generation 1): generations are always named after it.
    base_label: String,
}

/// The token key label of `generation` of the configured label `base`: `base` itself for
/// generation 1, `<base>.g<N>` for N > 1.
pub fn generation_label(base: &str, generation: u32) -> Result<String, MasterError> {
    match generation {
        0 => Err(MasterError::InvalidGeneration { generation }),
        1 => Ok(base.to_owned()),
        g => Ok(format!("{base}.g{g}")),
    }
}

impl Pkcs11MasterKey {
    fn connect(s: &Pkcs11Settings) -> Result<Hsm, MasterError> {
        let pin = s.pin.read()?;
        let mut cfg = HsmConfig::new(&s.module, s.token_label.clone(), POOL_SIZE);
        cfg.reconnect_backoff = s.reconnect_backoff;
        Hsm::open_with(&cfg, &pin).map_err(|e| MasterError::Hsm(Box::new(e)))
    }

    /// Opens the token and checks that the key is a protected AES-256 master key.
    pub fn open(s: &Pkcs11Settings) -> Result<Self, MasterError> {
        let hsm = Self::connect(s)?;
        hsm.check_master_key(&s.key_label).map_err(|e| MasterError::Hsm(Box::new(e)))?;
        Ok(Self { hsm: Arc::new(hsm), key_label: s.key_label.clone(), base_label: s.key_label.clone() })
    }

    /// Opens generation `generation` of the configured key without needing the
    /// configured (generation 1) key on the token any more.
    pub fn open_generation(s: &Pkcs11Settings, generation: u32) -> Result<Self, MasterError> {
        let hsm = Self::connect(s)?;
        let label = generation_label(&s.key_label, generation)?;
        hsm.check_master_key(&label).map_err(|e| MasterError::Hsm(Box::new(e)))?;
        Ok(Self { hsm: Arc::new(hsm), key_label: label, base_label: s.key_label.clone() })
    }

    /// Generates the master key on the token; refuses if a key with the label exists.
    pub fn create(s: &Pkcs11Settings) -> Result<Self, MasterError> {
        let hsm = Self::connect(s)?;
        hsm.generate_aes256_key(&s.key_label).map_err(|e| MasterError::Hsm(Box::new(e)))?;
        hsm.check_master_key(&s.key_label).map_err(|e| MasterError::Hsm(Box::new(e)))?;
        Ok(Self { hsm: Arc::new(hsm), key_label: s.key_label.clone(), base_label: s.key_label.clone() })
    }

    /// The label of the token key this provider uses.
    pub fn key_label(&self) -> &str {
        &self.key_label
    }

    /// The attributes the token reports for this provider's key (for checks and tests).
    pub fn key_info(&self) -> Result<kluis_hsm::KeyInfo, MasterError> {
        self.hsm.find_key(&self.key_label).map_err(hsm_err)
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

    fn generation(&self, generation: u32, create: bool) -> Result<Arc<dyn MasterKeyProvider>, MasterError> {
        Ok(Arc::new(self.generation_key(generation, create)?))
    }
}

impl Pkcs11MasterKey {
    /// [`MasterKeyProvider::generation`] with the concrete type: the key `<base label>.g<N>` on the
    /// same token, through the same logged-in session pool. Creating uses the least-privilege
    /// template of [`Hsm::generate_aes256_key`] and refuses an existing label (`HsmError::KeyExists`);
    /// either way the key must pass [`Hsm::check_master_key`].
    pub fn generation_key(&self, generation: u32, create: bool) -> Result<Self, MasterError> {
        let label = generation_label(&self.base_label, generation)?;
        if create {
            self.hsm.generate_aes256_key(&label).map_err(hsm_err)?;
        }
        self.hsm.check_master_key(&label).map_err(hsm_err)?;
        Ok(Self { hsm: Arc::clone(&self.hsm), key_label: label, base_label: self.base_label.clone() })
    }
}
