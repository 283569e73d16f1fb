//! The crate's single error type.

use std::path::PathBuf;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::KeyType;

/// Everything that can go wrong talking to the HSM.
///
/// No variant ever carries the PIN or key material. Token and key labels are included because
/// they are identifiers, not secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The PKCS#11 module (shared library) could not be loaded.
    #[error("cannot load PKCS#11 module {}", path.display())]
    ModuleLoad {
        /// Path given for the module.
        path: PathBuf,
        /// Loader / symbol lookup error.
        #[source]
        source: CkError,
    },

    /// `C_Initialize` failed (other than "already initialized").
    #[error("PKCS#11 module {} failed to initialize", path.display())]
    ModuleInit {
        /// Path of the module.
        path: PathBuf,
        /// The PKCS#11 error.
        #[source]
        source: CkError,
    },

    /// The pool size was zero.
    #[error("session pool size must be at least 1")]
    InvalidPoolSize,

    /// No slot holds a token with this label.
    #[error("no token labelled {label:?} is present")]
    TokenNotFound {
        /// The token label that was looked for.
        label: String,
    },

    /// More than one present token carries this label, so the choice would be ambiguous.
    #[error("{count} tokens are labelled {label:?}; token labels must be unique")]
    TokenAmbiguous {
        /// The token label.
        label: String,
        /// How many tokens carry it.
        count: usize,
    },

    /// `C_Login` said `CKR_PIN_INCORRECT`.
    ///
    /// After this is seen on a reconnect, the [`crate::Hsm`] stops trying to log in (every call
    /// returns this error) so it never locks the token by retrying a bad PIN.
    #[error("wrong user PIN for token {token:?}")]
    PinIncorrect {
        /// The token label.
        token: String,
    },

    /// `C_Login` said `CKR_PIN_LOCKED`.
    #[error("user PIN of token {token:?} is locked")]
    PinLocked {
        /// The token label.
        token: String,
    },

    /// `C_Login` failed for another reason.
    #[error("login to token {token:?} failed")]
    LoginFailed {
        /// The token label.
        token: String,
        /// The PKCS#11 error.
        #[source]
        source: CkError,
    },

    /// The PIN file could not be read.
    #[error("cannot read PIN file {}", path.display())]
    PinFile {
        /// The PIN file path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The PIN file was empty (after removing the trailing newline).
    #[error("PIN file {} is empty", path.display())]
    EmptyPin {
        /// The PIN file path.
        path: PathBuf,
    },

    /// No secret key carries this label.
    #[error("no secret key labelled {label:?} on the token")]
    KeyMissing {
        /// The key label.
        label: String,
    },

    /// More than one secret key carries this label.
    #[error("{count} secret keys are labelled {label:?}; key labels must be unique")]
    KeyAmbiguous {
        /// The key label.
        label: String,
        /// How many keys carry it.
        count: usize,
    },

    /// Refused to generate a key because one with this label already exists.
    #[error("a secret key labelled {label:?} already exists")]
    KeyExists {
        /// The key label.
        label: String,
    },

    /// The key is not an AES key.
    #[error("key {label:?} has type {found:?}, expected AES")]
    WrongKeyType {
        /// The key label.
        label: String,
        /// The key type read back (`None` if the token did not report one).
        found: Option<KeyType>,
    },

    /// The key does not have the expected length.
    #[error("key {label:?} is {found:?} bytes long, expected {expected}")]
    WrongKeyLength {
        /// The key label.
        label: String,
        /// Expected `CKA_VALUE_LEN` in bytes.
        expected: usize,
        /// `CKA_VALUE_LEN` read back (`None` if the token did not report one).
        found: Option<usize>,
    },

    /// The key has `CKA_EXTRACTABLE=true`: it could be wrapped out of the HSM.
    #[error("key {label:?} is extractable (CKA_EXTRACTABLE=true)")]
    KeyExtractable {
        /// The key label.
        label: String,
    },

    /// The key has `CKA_SENSITIVE=false`: its value can be read in plaintext.
    #[error("key {label:?} is not sensitive (CKA_SENSITIVE=false)")]
    KeyNotSensitive {
        /// The key label.
        label: String,
    },

    /// The key is a session object (`CKA_TOKEN=false`), it would vanish with the session.
    #[error("key {label:?} is not a token object (CKA_TOKEN=false)")]
    KeyNotPersistent {
        /// The key label.
        label: String,
    },

    /// The key may not be used to encrypt and decrypt (`CKA_ENCRYPT` / `CKA_DECRYPT`).
    #[error("key {label:?} lacks CKA_ENCRYPT or CKA_DECRYPT")]
    KeyUsage {
        /// The key label.
        label: String,
    },

    /// A ciphertext blob is shorter than IV + tag, so it cannot be ours.
    #[error("ciphertext is {len} bytes, shorter than IV + tag ({min} bytes)")]
    CiphertextTooShort {
        /// Length of the blob given.
        len: usize,
        /// Minimum length (IV + tag).
        min: usize,
    },

    /// AES-GCM authentication failed: wrong key, wrong AAD, or the blob was altered.
    #[error("AES-GCM decryption with key {label:?} failed authentication")]
    DecryptFailed {
        /// The key label.
        label: String,
        /// The PKCS#11 error as returned (SoftHSM2 says `CKR_GENERAL_ERROR`, the spec says
        /// `CKR_ENCRYPTED_DATA_INVALID`).
        #[source]
        source: CkError,
    },

    /// The token returned output of an unexpected size.
    #[error("{op} returned {actual} bytes, expected {expected}")]
    UnexpectedOutput {
        /// The PKCS#11 function.
        op: &'static str,
        /// Expected length.
        expected: usize,
        /// Returned length.
        actual: usize,
    },

    /// The token (or the session to it) is gone: removed, reset, logged out, or the module was
    /// re-initialized. The failed session has been dropped and the next call reconnects (after a
    /// short back-off), so this is retryable.
    #[error("token {token:?} unavailable ({op})")]
    Unavailable {
        /// The token label.
        token: String,
        /// What failed: a PKCS#11 function name or a reconnect step.
        op: &'static str,
        /// The PKCS#11 error, when there was one.
        #[source]
        source: Option<CkError>,
    },

    /// Any other PKCS#11 failure.
    #[error("PKCS#11 {op} failed")]
    Pkcs11 {
        /// The PKCS#11 function (or cryptoki helper) that failed.
        op: &'static str,
        /// The PKCS#11 error.
        #[source]
        source: CkError,
    },
}

impl HsmError {
    /// True for [`HsmError::Unavailable`]: the token or session went away and a later call may
    /// succeed without re-opening the [`crate::Hsm`].
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// The PKCS#11 return value inside a cryptoki error, if it is one.
pub(crate) fn rv_of(err: &CkError) -> Option<RvError> {
    match err {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Return values that mean "this session / token / login is no longer usable": the session is
/// dropped and the pool reconnects.
///
/// `CKR_GENERAL_ERROR` is included because SoftHSM2 answers `C_GetTokenInfo` with it once the
/// token directory has gone; it is handled separately for `C_Decrypt` (see `decrypt_aes_gcm`).
pub(crate) fn is_unavailable_rv(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::UserNotLoggedIn
            | RvError::CryptokiNotInitialized
            | RvError::SlotIdInvalid
            | RvError::GeneralError
    )
}
