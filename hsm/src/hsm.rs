//! The `Hsm` handle: a token found by label, a pool of logged-in sessions, key operations.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::Ulong;
use zeroize::Zeroizing;

use crate::error::{is_unavailable_rv, rv_of};
use crate::module::Module;
use crate::{HsmError, Pin};

/// Length of the random AES-GCM IV (96 bits) at the front of every ciphertext blob.
pub const GCM_IV_LEN: usize = 12;
/// Length of the AES-GCM tag (128 bits) at the end of every ciphertext blob.
pub const GCM_TAG_LEN: usize = 16;
/// Length in bytes of the keys made by [`Hsm::generate_aes256_key`].
pub const AES256_KEY_LEN: usize = 32;

/// `CK_GCM_PARAMS.ulTagBits`: cryptoki's `GcmParams::new` takes the tag length in *bits*
/// (checked against SoftHSM2: 16 gives a 2-byte tag, 128 a 16-byte one).
const GCM_TAG_BITS: Ulong = Ulong::new(128);
/// `CKA_VALUE_LEN` of a generated key, [`AES256_KEY_LEN`] as a PKCS#11 `CK_ULONG`.
const AES256_VALUE_LEN: Ulong = Ulong::new(32);

/// Default pause between two reconnect attempts while the token stays away.
pub const DEFAULT_RECONNECT_BACKOFF: Duration = Duration::from_secs(1);

/// Where the HSM is and how to use it. The PIN is passed separately (see [`Pin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module_path: PathBuf,
    /// `CKA_LABEL` of the token (without the space padding).
    pub token_label: String,
    /// Number of R/W sessions kept open, i.e. how many operations can run concurrently.
    pub pool_size: usize,
    /// Minimum pause between reconnect attempts while the token is unavailable; calls in between
    /// fail fast with [`HsmError::Unavailable`].
    pub reconnect_backoff: Duration,
}

impl HsmConfig {
    /// A config with the default back-off ([`DEFAULT_RECONNECT_BACKOFF`]).
    #[must_use]
    pub fn new(
        module_path: impl Into<PathBuf>,
        token_label: impl Into<String>,
        pool_size: usize,
    ) -> Self {
        Self {
            module_path: module_path.into(),
            token_label: token_label.into(),
            pool_size,
            reconnect_backoff: DEFAULT_RECONNECT_BACKOFF,
        }
    }
}

/// What the token says about a secret key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_KEY_TYPE` (`None` if the token did not report it).
    pub key_type: Option<KeyType>,
    /// `CKA_VALUE_LEN` in bytes (`None` if the token did not report it).
    pub value_len: Option<usize>,
    /// `CKA_SENSITIVE` (false if not reported).
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE` (true if not reported, to fail safe).
    pub extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE` (false if not reported).
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE` (false if not reported).
    pub never_extractable: bool,
    /// `CKA_TOKEN`: a persistent token object rather than a session object.
    pub token: bool,
    /// `CKA_ENCRYPT`.
    pub encrypt: bool,
    /// `CKA_DECRYPT`.
    pub decrypt: bool,
}

/// A logged-in connection to one PKCS#11 token, found by label, with a pool of R/W sessions.
///
/// `Hsm` is `Send + Sync`; share it (`Arc<Hsm>` or `&Hsm`) between threads. Each operation
/// borrows a session from the pool for its duration, so up to `pool_size` operations run in
/// parallel and the rest wait.
///
/// Keys are always looked up by label inside the session that uses them; object handles are never
/// kept between calls.
///
/// # Token loss
/// When an operation fails because the session, login or token is gone (see
/// [`HsmError::Unavailable`]), the session is dropped and the pool is marked disconnected. The
/// next call reconnects: it re-initializes the module (`C_Finalize` + `C_Initialize`, the only way
/// SoftHSM2 and many vendor modules rediscover a token), finds the slot again by token label (slot
/// ids may change), opens a session and logs in with the PIN it kept. While the token stays away,
/// reconnects are attempted at most once per `reconnect_backoff`, and calls fail fast with
/// `Unavailable` in between. If the reconnect login says `CKR_PIN_INCORRECT`, the `Hsm` stops
/// logging in for good (to never lock the token) and every call returns
/// [`HsmError::PinIncorrect`].
///
/// Re-initializing affects every `Hsm` in the process that uses the same module: their sessions
/// become stale and they reconnect transparently on their next call.
pub struct Hsm {
    module: Arc<Module>,
    token_label: String,
    pin: Pin,
    pool_size: usize,
    backoff: Duration,
    state: Mutex<PoolState>,
    returned: Condvar,
    /// Serializes `generate_aes256_key` so two callers in this process cannot both create a label.
    generate: Mutex<()>,
}

struct PoolState {
    /// Logged-in sessions ready for use, all from generation `generation`.
    idle: Vec<Session>,
    /// Sessions of the current generation that exist (idle + lent out).
    open: usize,
    /// Bumped on every (re)connect; leases from older generations are not returned to `idle`.
    generation: u64,
    /// Module epoch the current generation's sessions were opened in.
    epoch: u64,
    /// The token's slot; `None` means disconnected, the next checkout reconnects.
    slot: Option<Slot>,
    /// When the last failed reconnect was attempted (for the back-off).
    last_attempt: Option<Instant>,
    /// The PIN was rejected (incorrect / locked) on a reconnect: never try it again.
    pin_rejected: Option<PinRejected>,
}

#[derive(Clone, Copy)]
enum PinRejected {
    Incorrect,
    Locked,
}

/// What to do with a lent session when it comes back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Disposal {
    Keep,
    /// An unexpected PKCS#11 error: close this session (it might be left in an odd state, e.g.
    /// an operation still active) but keep the others.
    Close,
    /// The session (and probably the token) is unusable: close it and reconnect.
    Reconnect,
}

/// A session borrowed from the pool; goes back on drop.
struct Lease<'a> {
    hsm: &'a Hsm,
    session: Option<Session>,
    slot: Slot,
    generation: u64,
    epoch: u64,
    disposal: Disposal,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.hsm
                .give_back(session, self.generation, self.epoch, self.disposal);
        }
    }
}

/// Internal marker: the lease's session predates a module re-initialization; nothing was called.
struct Stale;

impl Hsm {
    /// Loads `module_path`, finds the token labelled `token_label`, logs in with `pin` and keeps
    /// up to `pool_size` R/W sessions. Uses [`DEFAULT_RECONNECT_BACKOFF`].
    ///
    /// # Errors
    /// [`HsmError::ModuleLoad`], [`HsmError::ModuleInit`], [`HsmError::TokenNotFound`],
    /// [`HsmError::TokenAmbiguous`], [`HsmError::PinIncorrect`], [`HsmError::PinLocked`],
    /// [`HsmError::LoginFailed`], [`HsmError::InvalidPoolSize`] or a PKCS#11 error.
    pub fn open(
        module_path: impl AsRef<Path>,
        token_label: &str,
        pin: &Pin,
        pool_size: usize,
    ) -> Result<Self, HsmError> {
        Self::open_with(
            &HsmConfig::new(module_path.as_ref(), token_label, pool_size),
            pin,
        )
    }

    /// Like [`Hsm::open`], from an [`HsmConfig`].
    ///
    /// # Errors
    /// As [`Hsm::open`].
    pub fn open_with(config: &HsmConfig, pin: &Pin) -> Result<Self, HsmError> {
        if config.pool_size == 0 {
            return Err(HsmError::InvalidPoolSize);
        }
        let module = Module::get(&config.module_path)?;
        let hsm = Self {
            module,
            token_label: config.token_label.clone(),
            pin: pin.duplicate(),
            pool_size: config.pool_size,
            backoff: config.reconnect_backoff,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
                generation: 0,
                epoch: 0,
                slot: None,
                last_attempt: None,
                pin_rejected: None,
            }),
            returned: Condvar::new(),
            generate: Mutex::new(()),
        };
        {
            let mut st = hsm.lock_state();
            st.epoch = *hsm.module.read();
            hsm.connect(&mut st)?;
        }
        tracing::info!(
            module = %hsm.module.path.display(),
            token = %hsm.token_label,
            pool_size = hsm.pool_size,
            "HSM token opened"
        );
        Ok(hsm)
    }

    /// How many sessions the pool holds open right now (idle + in use), at most `pool_size`.
    /// For metrics and tests.
    #[must_use]
    pub fn session_count(&self) -> usize {
        self.lock_state().open
    }

    /// The token label this `Hsm` is bound to.
    #[must_use]
    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// Reads the attributes of the secret key labelled `label`.
    ///
    /// # Errors
    /// [`HsmError::KeyMissing`], [`HsmError::KeyAmbiguous`], [`HsmError::Unavailable`], or a
    /// PKCS#11 error.
    pub fn find_key(&self, label: &str) -> Result<KeyInfo, HsmError> {
        self.run(|session, slot| {
            let key = self.find_handle(session, slot, label)?;
            self.key_info(session, slot, key, label)
        })
    }

    /// Generates a token AES-256 key labelled `label` that never leaves the HSM:
    /// `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, `CKA_ENCRYPT`, `CKA_DECRYPT` true,
    /// `CKA_EXTRACTABLE` false.
    ///
    /// # Errors
    /// [`HsmError::KeyExists`] if a secret key with this label exists, [`HsmError::Unavailable`],
    /// or a PKCS#11 error.
    pub fn generate_aes256_key(&self, label: &str) -> Result<(), HsmError> {
        let _serial = self.generate.lock().unwrap_or_else(PoisonError::into_inner);
        self.run(|session, slot| {
            match self.find_handle(session, slot, label) {
                Ok(_) | Err(HsmError::KeyAmbiguous { .. }) => {
                    return Err(HsmError::KeyExists {
                        label: label.to_owned(),
                    });
                }
                Err(HsmError::KeyMissing { .. }) => {}
                Err(other) => return Err(other),
            }
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                // Least privilege: the key only encrypts and decrypts with AES-GCM.
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Derive(false),
                Attribute::ValueLen(AES256_VALUE_LEN),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            session
                .generate_key(&Mechanism::AesKeyGen, &template)
                .map_err(|e| self.ck_err("C_GenerateKey", e))?;
            tracing::info!(token = %self.token_label, key = label, "generated AES-256 key");
            Ok(())
        })
    }

    /// Checks that `label` names a key fit to be a master key: AES, 32 bytes, sensitive,
    /// non-extractable, a token object, usable for encrypt and decrypt. Returns its attributes.
    ///
    /// # Errors
    /// [`HsmError::KeyMissing`], [`HsmError::WrongKeyType`], [`HsmError::WrongKeyLength`],
    /// [`HsmError::KeyExtractable`], [`HsmError::KeyNotSensitive`],
    /// [`HsmError::KeyNotPersistent`], [`HsmError::KeyUsage`], [`HsmError::Unavailable`], ...
    pub fn check_master_key(&self, label: &str) -> Result<KeyInfo, HsmError> {
        let info = self.find_key(label)?;
        let label = label.to_owned();
        if info.key_type != Some(KeyType::AES) {
            return Err(HsmError::WrongKeyType {
                label,
                found: info.key_type,
            });
        }
        if info.value_len != Some(AES256_KEY_LEN) {
            return Err(HsmError::WrongKeyLength {
                label,
                expected: AES256_KEY_LEN,
                found: info.value_len,
            });
        }
        if info.extractable {
            return Err(HsmError::KeyExtractable { label });
        }
        if !info.sensitive {
            return Err(HsmError::KeyNotSensitive { label });
        }
        if !info.token {
            return Err(HsmError::KeyNotPersistent { label });
        }
        if !(info.encrypt && info.decrypt) {
            return Err(HsmError::KeyUsage { label });
        }
        Ok(info)
    }

    /// AES-256-GCM encrypts `plaintext` under the key labelled `label`, authenticating `aad`.
    ///
    /// The 96-bit IV comes from the token's RNG (`C_GenerateRandom`); the output is
    /// `IV (12) || ciphertext || tag (16)`. Random IVs are safe for up to about 2^32 messages per
    /// key, far beyond wrapping keyring keys.
    ///
    /// # Errors
    /// [`HsmError::KeyMissing`], [`HsmError::Unavailable`], or a PKCS#11 error.
    pub fn encrypt_aes_gcm(
        &self,
        label: &str,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.run(|session, slot| {
            let key = self.find_handle(session, slot, label)?;
            let mut iv = [0u8; GCM_IV_LEN];
            session
                .generate_random_slice(&mut iv)
                .map_err(|e| self.ck_err("C_GenerateRandom", e))?;
            let ciphertext = {
                let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS).map_err(|source| {
                    HsmError::Pkcs11 {
                        op: "CK_GCM_PARAMS",
                        source,
                    }
                })?;
                session
                    .encrypt(&Mechanism::AesGcm(params), key, plaintext)
                    .map_err(|e| self.key_op_err("C_Encrypt", slot, label, e))?
            };
            let expected = plaintext.len() + GCM_TAG_LEN;
            if ciphertext.len() != expected {
                return Err(HsmError::UnexpectedOutput {
                    op: "C_Encrypt",
                    expected,
                    actual: ciphertext.len(),
                });
            }
            let mut out = Vec::with_capacity(GCM_IV_LEN + ciphertext.len());
            out.extend_from_slice(&iv);
            out.extend_from_slice(&ciphertext);
            Ok(out)
        })
    }

    /// Reverses [`Hsm::encrypt_aes_gcm`]: checks the tag over `aad` and the ciphertext, returns
    /// the plaintext (zeroized on drop).
    ///
    /// # Errors
    /// [`HsmError::CiphertextTooShort`], [`HsmError::DecryptFailed`] (wrong key / AAD, altered
    /// blob), [`HsmError::KeyMissing`], [`HsmError::Unavailable`], or a PKCS#11 error.
    pub fn decrypt_aes_gcm(
        &self,
        label: &str,
        aad: &[u8],
        blob: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let min = GCM_IV_LEN + GCM_TAG_LEN;
        if blob.len() < min {
            return Err(HsmError::CiphertextTooShort {
                len: blob.len(),
                min,
            });
        }
        let (iv, ciphertext) = blob.split_at(GCM_IV_LEN);
        self.run(|session, slot| {
            let key = self.find_handle(session, slot, label)?;
            let mut iv = iv.to_vec();
            let params =
                GcmParams::new(&mut iv, aad, GCM_TAG_BITS).map_err(|source| HsmError::Pkcs11 {
                    op: "CK_GCM_PARAMS",
                    source,
                })?;
            match session.decrypt(&Mechanism::AesGcm(params), key, ciphertext) {
                Ok(plaintext) => {
                    let plaintext = Zeroizing::new(plaintext);
                    let expected = ciphertext.len() - GCM_TAG_LEN;
                    if plaintext.len() != expected {
                        return Err(HsmError::UnexpectedOutput {
                            op: "C_Decrypt",
                            expected,
                            actual: plaintext.len(),
                        });
                    }
                    Ok(plaintext)
                }
                // Tag mismatch. The spec says CKR_ENCRYPTED_DATA_INVALID; SoftHSM2 2.6 returns
                // CKR_GENERAL_ERROR, which otherwise means "token gone", so probe the token.
                Err(source)
                    if matches!(
                        rv_of(&source),
                        Some(
                            RvError::EncryptedDataInvalid
                                | RvError::EncryptedDataLenRange
                                | RvError::GeneralError
                        )
                    ) =>
                {
                    self.probe_token(slot)?;
                    Err(HsmError::DecryptFailed {
                        label: label.to_owned(),
                        source,
                    })
                }
                Err(e) => Err(self.key_op_err("C_Decrypt", slot, label, e)),
            }
        })
    }

    /// Checks that a pooled session is logged in and the token is present with its label.
    ///
    /// Cheap (two PKCS#11 calls, no cryptography), meant for readiness probes. If the pool is
    /// disconnected it first attempts a reconnect (subject to the back-off), so polling `health`
    /// also brings the `Hsm` back once the token returns.
    ///
    /// # Errors
    /// [`HsmError::Unavailable`] when the token is gone (this also schedules a reconnect), or
    /// [`HsmError::PinIncorrect`] once the PIN has been rejected.
    pub fn health(&self) -> Result<(), HsmError> {
        self.run(|session, slot| self.probe(session, slot))
    }

    // ---- pool ----

    fn lock_state(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `op` on a pooled session while holding the module's epoch read lock. Errors that mean
    /// the token/session is gone make the session be discarded and the pool reconnect later.
    fn run<T>(
        &self,
        mut op: impl FnMut(&Session, Slot) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        // One retry, only when the borrowed session turned out stale before anything was called
        // (another Hsm on the same module re-initialized it).
        for _ in 0..2 {
            let mut lease = self.checkout()?;
            let result = {
                let epoch = self.module.read();
                if *epoch == lease.epoch {
                    match lease.session.as_ref() {
                        Some(session) => Ok(op(session, lease.slot)),
                        None => Err(Stale),
                    }
                } else {
                    Err(Stale)
                }
            };
            match result {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(err)) => {
                    lease.disposal = match &err {
                        HsmError::Unavailable { .. } => {
                            tracing::debug!(token = %self.token_label, error = %err, "HSM operation failed: token unavailable");
                            Disposal::Reconnect
                        }
                        HsmError::Pkcs11 { .. } | HsmError::UnexpectedOutput { .. } => {
                            Disposal::Close
                        }
                        _ => Disposal::Keep,
                    };
                    return Err(err);
                }
                Err(Stale) => lease.disposal = Disposal::Reconnect,
            }
        }
        Err(self.unavailable("session invalidated by module re-initialization", None))
    }

    /// Borrows a logged-in session, reconnecting or opening a new session if needed, waiting if
    /// all `pool_size` sessions are in use.
    fn checkout(&self) -> Result<Lease<'_>, HsmError> {
        let mut st = self.lock_state();
        loop {
            match st.pin_rejected {
                Some(PinRejected::Incorrect) => {
                    return Err(HsmError::PinIncorrect {
                        token: self.token_label.clone(),
                    });
                }
                Some(PinRejected::Locked) => {
                    return Err(HsmError::PinLocked {
                        token: self.token_label.clone(),
                    });
                }
                None => {}
            }
            if st.slot.is_some() && *self.module.read() != st.epoch {
                // Another `Hsm` re-initialized the module: our sessions are void, but the token is
                // not known to be gone, so reconnect right away without re-initializing again.
                st.slot = None;
                st.last_attempt = None;
            }
            let slot = match st.slot {
                Some(slot) => slot,
                None => {
                    if st
                        .last_attempt
                        .is_some_and(|at| at.elapsed() < self.backoff)
                    {
                        return Err(self.unavailable("reconnect back-off", None));
                    }
                    st.last_attempt = Some(Instant::now());
                    tracing::warn!(token = %self.token_label, "reconnecting to HSM token");
                    match self.reconnect(&mut st) {
                        Ok(slot) => {
                            tracing::info!(token = %self.token_label, "reconnected to HSM token");
                            self.returned.notify_all();
                            slot
                        }
                        Err(err) => {
                            tracing::warn!(token = %self.token_label, error = %err, "HSM reconnect failed");
                            // Let waiters see the new state (they fail fast during the back-off).
                            self.returned.notify_all();
                            return Err(err);
                        }
                    }
                }
            };
            if let Some(session) = st.idle.pop() {
                return Ok(self.lease(session, slot, &st));
            }
            if st.open < self.pool_size {
                match self.open_session(slot, st.epoch) {
                    Ok(session) => {
                        st.open += 1;
                        return Ok(self.lease(session, slot, &st));
                    }
                    Err(err) => {
                        self.note_connect_error(&mut st, &err);
                        self.returned.notify_all();
                        return Err(err);
                    }
                }
            }
            st = self
                .returned
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn lease(&self, session: Session, slot: Slot, st: &PoolState) -> Lease<'_> {
        Lease {
            hsm: self,
            session: Some(session),
            slot,
            generation: st.generation,
            epoch: st.epoch,
            disposal: Disposal::Keep,
        }
    }

    fn give_back(&self, session: Session, generation: u64, epoch: u64, disposal: Disposal) {
        let mut st = self.lock_state();
        if generation != st.generation {
            // From before a reconnect: not counted in `open` any more.
            self.close_session(session, epoch);
        } else if disposal == Disposal::Keep {
            st.idle.push(session);
            drop(st);
            self.returned.notify_one();
            return;
        } else {
            st.open = st.open.saturating_sub(1);
            self.close_session(session, epoch);
            if disposal == Disposal::Reconnect && st.slot.take().is_some() {
                tracing::warn!(token = %self.token_label, "HSM token unavailable; will reconnect");
            }
        }
        drop(st);
        // The pool changed shape: every waiter re-checks (may open a session or reconnect).
        self.returned.notify_all();
    }

    /// Closes a session if it belongs to the module's current epoch. Sessions from an older epoch
    /// are simply forgotten: their handle may now name another, live session.
    fn close_session(&self, session: Session, epoch: u64) {
        let current = self.module.read();
        if *current == epoch
            && let Err(err) = session.close()
        {
            tracing::debug!(token = %self.token_label, error = %err, "C_CloseSession failed");
        }
    }

    /// Reconnect after a loss: drop all sessions, re-initialize the module (unless another `Hsm`
    /// already did since our sessions were opened), find the slot again and log in.
    fn reconnect(&self, st: &mut PoolState) -> Result<Slot, HsmError> {
        for session in std::mem::take(&mut st.idle) {
            self.close_session(session, st.epoch);
        }
        st.open = 0;
        st.generation += 1;
        if let Err(source) = self.module.reinitialize(st.epoch) {
            st.epoch = *self.module.read();
            return Err(self.unavailable("C_Initialize", Some(source)));
        }
        st.epoch = *self.module.read();
        match self.connect(st) {
            Ok(()) => st.slot.ok_or_else(|| self.unavailable("reconnect", None)),
            Err(HsmError::TokenNotFound { .. }) => Err(self.unavailable("token not present", None)),
            Err(HsmError::Pkcs11 { op, source }) => Err(self.unavailable(op, Some(source))),
            Err(HsmError::LoginFailed { source, .. }) => {
                Err(self.unavailable("C_Login", Some(source)))
            }
            Err(other) => Err(other),
        }
    }

    /// Finds the slot by token label, opens one session and logs in (for the current epoch).
    fn connect(&self, st: &mut PoolState) -> Result<(), HsmError> {
        let slot = {
            let epoch = self.module.read();
            st.epoch = *epoch;
            self.find_slot()?
        };
        let session = match self.open_session(slot, st.epoch) {
            Ok(session) => session,
            Err(err) => {
                self.note_connect_error(st, &err);
                return Err(err);
            }
        };
        st.idle.push(session);
        st.open = 1;
        st.slot = Some(slot);
        st.last_attempt = None;
        Ok(())
    }

    fn note_connect_error(&self, st: &mut PoolState, err: &HsmError) {
        match err {
            HsmError::PinIncorrect { .. } => {
                tracing::error!(token = %self.token_label, error = %err, "PIN rejected; not logging in again");
                st.pin_rejected = Some(PinRejected::Incorrect);
            }
            HsmError::PinLocked { .. } => {
                tracing::error!(token = %self.token_label, error = %err, "PIN locked; not logging in again");
                st.pin_rejected = Some(PinRejected::Locked);
            }
            e if e.is_unavailable() => st.slot = None,
            _ => {}
        }
    }

    /// The one slot whose token carries our label. Call with the epoch read lock held.
    fn find_slot(&self) -> Result<Slot, HsmError> {
        let ctx = &self.module.ctx;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| self.ck_err("C_GetSlotList", e))?;
        let matching: Vec<Slot> = slots
            .into_iter()
            .filter(|slot| match ctx.get_token_info(*slot) {
                // cryptoki already strips the blank padding of the 32-byte label.
                Ok(info) => info.label().trim_end() == self.token_label,
                Err(err) => {
                    tracing::debug!(slot = slot.id(), error = %err, "C_GetTokenInfo failed; skipping slot");
                    false
                }
            })
            .collect();
        match matching.as_slice() {
            [slot] => Ok(*slot),
            [] => Err(HsmError::TokenNotFound {
                label: self.token_label.clone(),
            }),
            many => Err(HsmError::TokenAmbiguous {
                label: self.token_label.clone(),
                count: many.len(),
            }),
        }
    }

    /// Opens a R/W session on `slot` and makes sure the user is logged in.
    ///
    /// Login state is per application and slot, so normally only the first session logs in; we
    /// ask the session itself rather than tracking it, since the token may have logged us out.
    /// Sessions are opened "no close on drop": the pool closes them explicitly, and never closes
    /// one from an old module epoch.
    fn open_session(&self, slot: Slot, epoch: u64) -> Result<Session, HsmError> {
        let current = self.module.read();
        if *current != epoch {
            return Err(self.unavailable("session invalidated by module re-initialization", None));
        }
        let session = self
            .module
            .ctx
            .open_rw_session_no_drop(slot)
            .map_err(|e| self.ck_err("C_OpenSession", e))?;
        match self.ensure_login(&session) {
            Ok(()) => Ok(session),
            Err(err) => {
                let _ = session.close();
                Err(err)
            }
        }
    }

    fn ensure_login(&self, session: &Session) -> Result<(), HsmError> {
        let info = session
            .get_session_info()
            .map_err(|e| self.ck_err("C_GetSessionInfo", e))?;
        if matches!(
            info.session_state(),
            SessionState::RwUser | SessionState::RoUser
        ) {
            return Ok(());
        }
        let token = || self.token_label.clone();
        match session.login(UserType::User, Some(self.pin.auth())) {
            Ok(()) => Ok(()),
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                Err(HsmError::PinIncorrect { token: token() })
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                Err(HsmError::PinLocked { token: token() })
            }
            Err(source) if rv_of(&source).is_some_and(is_unavailable_rv) => {
                Err(self.unavailable("C_Login", Some(source)))
            }
            Err(source) => Err(HsmError::LoginFailed {
                token: token(),
                source,
            }),
        }
    }

    // ---- helpers used inside a leased session ----

    /// The handle of the single secret key labelled `label`, valid in `session` only.
    fn find_handle(
        &self,
        session: &Session,
        slot: Slot,
        label: &str,
    ) -> Result<ObjectHandle, HsmError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        let found = session
            .find_objects(&template)
            .map_err(|e| self.ck_err("C_FindObjects", e))?;
        match found.as_slice() {
            [handle] => Ok(*handle),
            [] => {
                // A vanished token may just look empty (SoftHSM2 does this), and a logged-out
                // session does not see private keys, so check both before blaming the key.
                self.probe(session, slot)?;
                Err(HsmError::KeyMissing {
                    label: label.to_owned(),
                })
            }
            many => Err(HsmError::KeyAmbiguous {
                label: label.to_owned(),
                count: many.len(),
            }),
        }
    }

    fn key_info(
        &self,
        session: &Session,
        slot: Slot,
        key: ObjectHandle,
        label: &str,
    ) -> Result<KeyInfo, HsmError> {
        let attrs = session
            .get_attributes(
                key,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Token,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                ],
            )
            .map_err(|e| self.key_op_err("C_GetAttributeValue", slot, label, e))?;
        let mut info = KeyInfo {
            label: label.to_owned(),
            key_type: None,
            value_len: None,
            sensitive: false,
            extractable: true,
            always_sensitive: false,
            never_extractable: false,
            token: false,
            encrypt: false,
            decrypt: false,
        };
        for attr in attrs {
            match attr {
                Attribute::KeyType(t) => info.key_type = Some(t),
                Attribute::ValueLen(len) => info.value_len = Some(usize::from(len)),
                Attribute::Sensitive(b) => info.sensitive = b,
                Attribute::Extractable(b) => info.extractable = b,
                Attribute::AlwaysSensitive(b) => info.always_sensitive = b,
                Attribute::NeverExtractable(b) => info.never_extractable = b,
                Attribute::Token(b) => info.token = b,
                Attribute::Encrypt(b) => info.encrypt = b,
                Attribute::Decrypt(b) => info.decrypt = b,
                _ => {}
            }
        }
        Ok(info)
    }

    /// Is the session still logged in, and the token still in `slot`?
    fn probe(&self, session: &Session, slot: Slot) -> Result<(), HsmError> {
        let info = session
            .get_session_info()
            .map_err(|e| self.ck_err("C_GetSessionInfo", e))?;
        if !matches!(
            info.session_state(),
            SessionState::RwUser | SessionState::RoUser
        ) {
            return Err(self.unavailable("session not logged in", None));
        }
        self.probe_token(slot)
    }

    /// Is the token still in `slot`, with our label? Any failure means "unavailable".
    fn probe_token(&self, slot: Slot) -> Result<(), HsmError> {
        match self.module.ctx.get_token_info(slot) {
            Ok(info) if info.label().trim_end() == self.token_label => Ok(()),
            Ok(_) => Err(self.unavailable("token in slot has another label", None)),
            Err(source) => Err(self.unavailable("C_GetTokenInfo", Some(source))),
        }
    }

    /// Maps an error from an operation on a found key: an invalid handle right after finding it
    /// means the key or the token vanished meanwhile.
    fn key_op_err(&self, op: &'static str, slot: Slot, label: &str, err: CkError) -> HsmError {
        match rv_of(&err) {
            Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid) => {
                match self.probe_token(slot) {
                    Ok(()) => HsmError::KeyMissing {
                        label: label.to_owned(),
                    },
                    Err(unavailable) => unavailable,
                }
            }
            _ => self.ck_err(op, err),
        }
    }

    /// Maps a cryptoki error: token/session loss becomes `Unavailable`, the rest `Pkcs11`.
    fn ck_err(&self, op: &'static str, source: CkError) -> HsmError {
        if rv_of(&source).is_some_and(is_unavailable_rv) {
            self.unavailable(op, Some(source))
        } else {
            HsmError::Pkcs11 { op, source }
        }
    }

    fn unavailable(&self, op: &'static str, source: Option<CkError>) -> HsmError {
        HsmError::Unavailable {
            token: self.token_label.clone(),
            op,
            source,
        }
    }
}

impl Drop for Hsm {
    fn drop(&mut self) {
        let mut st = self.lock_state();
        let epoch = st.epoch;
        for session in std::mem::take(&mut st.idle) {
            self.close_session(session, epoch);
        }
    }
}

impl fmt::Debug for Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hsm")
            .field("module", &self.module.path)
            .field("token_label", &self.token_label)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}
