//! A small, safe wrapper over PKCS#11 (via [`cryptoki`]) for keys that must never leave an HSM.
//!
//! It knows tokens by label, secret keys by label, and does one kind of cryptography: AES-256-GCM
//! with a random 96-bit IV under a non-extractable token key. It has no idea what the keys are
//! for.
//!
//! ```no_run
//! use kluis_hsm::{Hsm, Pin};
//! # fn main() -> Result<(), kluis_hsm::HsmError> {
//! let pin = Pin::from_file("/etc/kluis/hsm.pin")?;
//! let hsm = Hsm::open("/usr/lib/softhsm/libsofthsm2.so", "kluis", &pin, 4)?;
//! hsm.check_master_key("kluis-mk")?;
//! let blob = hsm.encrypt_aes_gcm("kluis-mk", b"context", b"secret")?;
//! let plain = hsm.decrypt_aes_gcm("kluis-mk", b"context", &blob)?;
//! assert_eq!(plain.as_slice(), b"secret");
//! # Ok(()) }
//! ```
//!
//! # Sessions and threads
//! [`Hsm`] keeps a pool of logged-in R/W sessions (login state is per application and slot in
//! PKCS#11, so it logs in once and opens further sessions lazily). Key object handles are looked
//! up per operation in the session that uses them and never cached.
//!
//! # Token loss and SoftHSM2
//! Errors meaning the session or token is gone become [`HsmError::Unavailable`]; the `Hsm` then
//! reconnects on a later call by itself (see [`Hsm`]). What SoftHSM2 2.6 does when its token
//! directory is moved away while the process runs (this is how the tests simulate unplugging a
//! token):
//! - `C_FindObjects` succeeds and finds nothing, `C_GetSessionInfo` still says logged in,
//!   `C_OpenSession` works, `C_GetSlotList` still lists the slot; only `C_GetTokenInfo` fails
//!   (`CKR_GENERAL_ERROR`). So an empty key search is double-checked with `C_GetTokenInfo` before
//!   it is reported as [`HsmError::KeyMissing`].
//! - Moving the directory back does not help: the token object stays invalid until
//!   `C_Finalize` + `C_Initialize`, which is why reconnecting re-initializes the module.
//! - After `C_Initialize`, session handles restart at 1, so a stale handle can alias a new
//!   session; the module epoch (see `module.rs`) makes sure stale sessions are never used or
//!   closed.
//! - A failed GCM tag check gives `CKR_GENERAL_ERROR` from `C_Decrypt` (the spec says
//!   `CKR_ENCRYPTED_DATA_INVALID`); both become [`HsmError::DecryptFailed`] if the token is
//!   still there.
#![forbid(unsafe_code)]

mod error;
mod hsm;
mod module;
mod pin;

pub use cryptoki;
pub use error::HsmError;
pub use hsm::{
    AES256_KEY_LEN, DEFAULT_RECONNECT_BACKOFF, GCM_IV_LEN, GCM_TAG_LEN, Hsm, HsmConfig, KeyInfo,
};
pub use pin::Pin;
