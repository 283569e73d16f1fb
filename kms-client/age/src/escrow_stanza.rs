//! The escrow stanza that `backup-hook rewrap` adds to a file sealed before the escrow
//! was installed: a standard age `X25519` stanza to the recovery recipient, which the
//! stock `age` tool and the custodians' rebuilt identity open like any other.
//!
//! An X25519 stanza does not name its recipient, so a header cannot tell by itself
//! whether it already carries one to a given recipient. The stanza made here is
//! therefore deterministic: its ephemeral secret is derived from the file key and the
//! recipient (`HKDF-SHA-256(ikm = file key, salt = "kluis/v1/escrow-stanza-ephemeral",
//! info = recipient)`), so the same file and recipient always give the same stanza, and
//! a rewrap finds the stanza it added before byte for byte (idempotent). Everything
//! else is age's X25519 recipient stanza exactly (C2SP age, "X25519 recipient stanza"):
//! `shared = X25519(esk, recipient)`, `wrap key = HKDF-SHA-256(ikm = shared, salt =
//! epk || recipient, info = "age-encryption.org/v1/X25519")`, body = ChaCha20-Poly1305
//! of the file key under the wrap key with a zero nonce. The ephemeral secret is as
//! unpredictable as the file key it is derived from, and known only to who already
//! knows the file key.

use std::str::FromStr;

use age::secrecy::ExposeSecret;
use age_core::format::{FileKey, Stanza};
use age_core::primitives::{aead_encrypt, hkdf};
use base64::Engine;
use base64::prelude::BASE64_STANDARD_NO_PAD;
use zeroize::Zeroizing;

/// The tag of age's X25519 recipient stanza.
pub const X25519_TAG: &str = "X25519";
const EPHEMERAL_SALT: &[u8] = b"kluis/v1/escrow-stanza-ephemeral";
const X25519_LABEL: &[u8] = b"age-encryption.org/v1/X25519";
const RECIPIENT_HRP: bech32::Hrp = bech32::Hrp::parse_unchecked("age");

/// Why no escrow stanza can be made for a recipient.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EscrowStanzaError {
    #[error("the recovery recipient {0:?} is not an age X25519 recipient (age1...)")]
    NotARecipient(String),
    #[error("the recovery recipient {0} is a low-order point (no shared secret)")]
    LowOrder(String),
}

/// The 32 public-key bytes of an `age1...` recipient (checked by the age crate as well).
fn recipient_bytes(recipient: &str) -> Result<[u8; 32], EscrowStanzaError> {
    let bad = || EscrowStanzaError::NotARecipient(recipient.to_owned());
    age::x25519::Recipient::from_str(recipient).map_err(|_| bad())?;
    let (hrp, data) = bech32::decode(recipient).map_err(|_| bad())?;
    if hrp != RECIPIENT_HRP {
        return Err(bad());
    }
    data.try_into().map_err(|_| bad())
}

/// The escrow stanza of `file_key` to `recipient` (see the module docs): the same
/// stanza every time for the same file key and recipient.
pub fn escrow_stanza(file_key: &FileKey, recipient: &str) -> Result<Stanza, EscrowStanzaError> {
    let rpk = recipient_bytes(recipient)?;
    let esk = Zeroizing::new(hkdf(EPHEMERAL_SALT, recipient.as_bytes(), file_key.expose_secret()));
    let epk = x25519_dalek::x25519(*esk, x25519_dalek::X25519_BASEPOINT_BYTES);
    let shared = Zeroizing::new(x25519_dalek::x25519(*esk, rpk));
    if shared.iter().fold(0u8, |acc, b| acc | b) == 0 {
        return Err(EscrowStanzaError::LowOrder(recipient.to_owned()));
    }
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&epk);
    salt[32..].copy_from_slice(&rpk);
    let wrap_key = Zeroizing::new(hkdf(&salt, X25519_LABEL, &shared[..]));
    let body = aead_encrypt(&wrap_key, file_key.expose_secret());
    Ok(Stanza { tag: X25519_TAG.to_owned(), args: vec![BASE64_STANDARD_NO_PAD.encode(epk)], body })
}

/// Whether `stanzas` hold exactly the escrow stanza of `file_key` to `recipient`.
pub fn has_escrow_stanza(stanzas: &[Stanza], file_key: &FileKey, recipient: &str) -> Result<bool, EscrowStanzaError> {
    let want = escrow_stanza(file_key, recipient)?;
    Ok(stanzas.iter().any(|s| s.tag == want.tag && s.args == want.args && s.body == want.body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use age::Identity as _;

    fn fk(b: u8) -> FileKey {
        FileKey::new(Box::new([b; 16]))
    }

    #[test]
    fn the_recovery_identity_opens_it_and_it_is_the_same_each_time() {
        let id = age::x25519::Identity::generate();
        let r = id.to_public().to_string();
        let s = escrow_stanza(&fk(7), &r).unwrap();
        // Opened by the age crate's own X25519 identity: a standard stanza.
        let opened = id.unwrap_stanza(&s).unwrap().unwrap();
        assert_eq!(opened.expose_secret(), &[7u8; 16]);
        assert_eq!(escrow_stanza(&fk(7), &r).unwrap().body, s.body);
        assert_eq!(escrow_stanza(&fk(7), &r).unwrap().args, s.args);
        assert!(has_escrow_stanza(std::slice::from_ref(&s), &fk(7), &r).unwrap());
        // Another file key or another recipient: another stanza, not recognised.
        assert_ne!(escrow_stanza(&fk(8), &r).unwrap().args, s.args);
        let other = age::x25519::Identity::generate().to_public().to_string();
        assert!(!has_escrow_stanza(std::slice::from_ref(&s), &fk(7), &other).unwrap());
        assert!(!has_escrow_stanza(std::slice::from_ref(&s), &fk(8), &r).unwrap());
        // A stanza from the age crate's recipient (random ephemeral) opens too but is
        // not this one.
        let (random, _) = age::Recipient::wrap_file_key(&id.to_public(), &fk(7)).unwrap();
        assert!(!has_escrow_stanza(&random, &fk(7), &r).unwrap());
    }

    #[test]
    fn a_bad_recipient_is_named() {
        for bad in ["", "age1", "AGE1xyz", "age1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq", "ssh-ed25519 AAAA"] {
            assert!(matches!(escrow_stanza(&fk(1), bad), Err(EscrowStanzaError::NotARecipient(_))), "{bad:?}");
        }
    }
}
