//! The recovery secret (32 raw X25519 bytes) and the rebuilt recovery identity.

use std::fmt::{self, Write as _};
use std::fs;
use std::io::{self, Write as _};
use std::path::Path;
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use kluis_age::fsutil;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::error::EscrowError;

/// Length of an X25519 secret key.
pub(crate) const SECRET_LEN: usize = 32;

/// The bech32 human-readable part of an age X25519 identity (encoded upper case).
const SECRET_KEY_HRP: bech32::Hrp = bech32::Hrp::parse_unchecked("age-secret-key-");

/// The raw recovery secret. Zeroized on drop; never printed, never written in clear.
pub(crate) struct RecoverySecret(Zeroizing<[u8; SECRET_LEN]>);

impl RecoverySecret {
    /// 32 fresh random bytes from the operating system.
    pub(crate) fn generate(rng: &SystemRandom) -> Result<Self, EscrowError> {
        let mut bytes = Zeroizing::new([0u8; SECRET_LEN]);
        rng.fill(&mut bytes[..])
            .map_err(|_| EscrowError::RandomUnavailable)?;
        Ok(RecoverySecret(bytes))
    }

    /// From rebuilt bytes (which the caller zeroizes).
    pub(crate) fn from_slice(bytes: &[u8]) -> Result<Self, EscrowError> {
        if bytes.len() != SECRET_LEN {
            return Err(EscrowError::Reconstruction {
                reason: "the rebuilt secret has the wrong length",
            });
        }
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        secret.copy_from_slice(bytes);
        Ok(RecoverySecret(secret))
    }

    pub(crate) fn bytes(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }

    /// The age identity for these bytes: bech32 `AGE-SECRET-KEY-1...`, parsed by age.
    pub(crate) fn identity(&self) -> Result<age::x25519::Identity, EscrowError> {
        // Capacity for the whole encoding (74 characters), so the string never reallocates
        // and leaves no unzeroized copy behind.
        let mut encoded = Zeroizing::new(String::with_capacity(128));
        bech32::encode_upper_to_fmt::<bech32::Bech32, String>(
            &mut encoded,
            SECRET_KEY_HRP,
            &self.0[..],
        )
        .map_err(|_| EscrowError::KeyEncoding)?;
        age::x25519::Identity::from_str(&encoded).map_err(|_| EscrowError::KeyEncoding)
    }
}

/// The recovery identity rebuilt from custodian shares, checked against the manifest's
/// recovery recipient. Opens any sealed backup (it implements [`age::Identity`]).
///
/// Its `Debug` output shows only the public recipient.
pub struct RecoveryIdentity {
    identity: age::x25519::Identity,
    recipient: age::x25519::Recipient,
    ceremony_id: String,
}

impl RecoveryIdentity {
    pub(crate) fn new(identity: age::x25519::Identity, ceremony_id: String) -> Self {
        let recipient = identity.to_public();
        RecoveryIdentity {
            identity,
            recipient,
            ceremony_id,
        }
    }

    /// The recovery recipient (`age1...`), equal to the manifest's `recovery_recipient`.
    pub fn recipient(&self) -> &age::x25519::Recipient {
        &self.recipient
    }

    /// The ceremony whose shares rebuilt this identity.
    pub fn ceremony_id(&self) -> &str {
        &self.ceremony_id
    }

    /// The age identity, to decrypt with (`&dyn age::Identity` via coercion).
    pub fn as_identity(&self) -> &age::x25519::Identity {
        &self.identity
    }

    /// Writes a standard age identity file (as `age-keygen` writes), readable by
    /// `age -d -i FILE`, `rage` and `age::IdentityFile`:
    ///
    /// ```text
    /// # created: 2026-01-01T00:00:00Z
    /// # recipient: age1...
    /// # kluis-escrow-ceremony: <ceremony id>
    /// AGE-SECRET-KEY-1...
    /// ```
    ///
    /// The file is created with mode 0600 (Unix) and never replaces an existing file; it is
    /// synced before this returns. If writing fails the partial file is removed.
    pub fn write_identity_file(&self, path: &Path) -> Result<(), EscrowError> {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = match options.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(EscrowError::IdentityFileExists {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(EscrowError::io("create", path, e)),
        };
        let result = self.write_contents(&mut file, path);
        if result.is_err() {
            drop(file);
            let _ = fs::remove_file(path);
            return result;
        }
        fsutil::sync_dir_if_supported(fsutil::parent_dir(path)).map_err(EscrowError::from)
    }

    fn write_contents(&self, file: &mut fs::File, path: &Path) -> Result<(), EscrowError> {
        let created = super::now_rfc3339()?;
        let secret = self.identity.to_string();
        let mut text = Zeroizing::new(String::with_capacity(512));
        write!(
            text,
            "# created: {created}\n# recipient: {}\n# kluis-escrow-ceremony: {}\n{}\n",
            self.recipient,
            self.ceremony_id,
            secret.expose_secret()
        )
        .map_err(|_| EscrowError::KeyEncoding)?;
        file.write_all(text.as_bytes())
            .map_err(|e| EscrowError::io("write", path, e))?;
        file.sync_all()
            .map_err(|e| EscrowError::io("sync", path, e))
    }
}

impl age::Identity for RecoveryIdentity {
    fn unwrap_stanza(
        &self,
        stanza: &age_core::format::Stanza,
    ) -> Option<Result<age_core::format::FileKey, age::DecryptError>> {
        self.identity.unwrap_stanza(stanza)
    }
}

impl fmt::Debug for RecoveryIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveryIdentity")
            .field("recipient", &self.recipient.to_string())
            .field("ceremony_id", &self.ceremony_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}
