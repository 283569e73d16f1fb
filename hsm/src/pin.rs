//! The token user PIN, held as a secret.

use std::fmt;
use std::path::Path;

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::HsmError;

/// The PKCS#11 user PIN.
///
/// The PIN lives in a [`cryptoki::types::AuthPin`] (a `secrecy::SecretString`), which zeroizes
/// its buffer on drop. There is deliberately no `Display`, and `Debug` prints `Pin(<redacted>)`.
pub struct Pin {
    secret: AuthPin,
}

impl Pin {
    /// Wraps a PIN given as a string. The string's buffer is zeroized before this returns.
    #[must_use]
    pub fn new(pin: String) -> Self {
        let pin = Zeroizing::new(pin);
        Self {
            secret: AuthPin::from(pin.as_str()),
        }
    }

    /// Reads a PIN from a file, removing trailing `\n` / `\r\n`.
    ///
    /// The file must contain UTF-8 text; an empty PIN is an error. File permissions are not
    /// checked here (that is the caller's policy).
    ///
    /// # Errors
    /// [`HsmError::PinFile`] if the file cannot be read, [`HsmError::EmptyPin`] if it is empty.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, HsmError> {
        let path = path.as_ref();
        let raw =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| HsmError::PinFile {
                    path: path.to_path_buf(),
                    source,
                })?,
            );
        let pin = raw.trim_end_matches(['\n', '\r']);
        if pin.is_empty() {
            return Err(HsmError::EmptyPin {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            secret: AuthPin::from(pin),
        })
    }

    /// The PIN as cryptoki wants it for `C_Login`.
    pub(crate) fn auth(&self) -> &AuthPin {
        &self.secret
    }

    /// A second copy, kept by [`crate::Hsm`] to log in again after the token comes back.
    pub(crate) fn duplicate(&self) -> Self {
        Self {
            secret: self.secret.clone(),
        }
    }
}

impl From<String> for Pin {
    fn from(pin: String) -> Self {
        Self::new(pin)
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let pin = Pin::new("123456".to_owned());
        assert_eq!(format!("{pin:?}"), "Pin(<redacted>)");
        assert!(!format!("{pin:?}").contains("123456"));
    }

    #[test]
    fn from_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(Pin::from_file(&p), Err(HsmError::EmptyPin { .. })));
        let missing = dir.path().join("nope");
        let err = Pin::from_file(&missing).unwrap_err();
        assert!(matches!(err, HsmError::PinFile { .. }));
    }
}
