//! Key material held by the server. Zeroized on drop, no `Debug`/`Display`,
//! readable only through [`Key256::expose`].

use zeroize::Zeroizing;

/// A 256-bit symmetric key (master, keyring or data key).
pub struct Key256(Zeroizing<[u8; 32]>);

impl Key256 {
    /// A fresh random key from the system CSPRNG.
    pub fn generate(rng: &dyn ring::rand::SecureRandom) -> Result<Self, ring::error::Unspecified> {
        let mut k = Zeroizing::new([0u8; 32]);
        rng.fill(k.as_mut())?;
        Ok(Self(k))
    }

    /// Takes key bytes from a slice of exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Self(Zeroizing::new(arr)))
    }

    /// The raw key bytes. Callers must not copy them into non-zeroizing storage.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Random bytes helper that maps ring's opaque error to a typed one at call sites.
pub fn random_array<const N: usize>(
    rng: &dyn ring::rand::SecureRandom,
) -> Result<[u8; N], ring::error::Unspecified> {
    let mut a = [0u8; N];
    rng.fill(&mut a)?;
    Ok(a)
}

/// AES-256-GCM seal with a random 96-bit nonce: output is `nonce || ciphertext || tag`.
pub fn aes_gcm_seal(
    key: &Key256,
    rng: &dyn ring::rand::SecureRandom,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, ring::error::Unspecified> {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.expose())?);
    let nonce_bytes: [u8; NONCE_LEN] = random_array(rng)?;
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len());
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(plaintext);
    let tag = k.seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce_bytes),
        Aad::from(aad),
        &mut out[NONCE_LEN..],
    )?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens an [`aes_gcm_seal`] blob. Any failure (short, tampered, wrong key or AAD) is one error.
pub fn aes_gcm_open(key: &Key256, aad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, ring::error::Unspecified> {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
    if blob.len() < NONCE_LEN + AES_256_GCM.tag_len() {
        return Err(ring::error::Unspecified);
    }
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.expose())?);
    let (nonce, ct) = blob.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce)?;
    let mut buf = Zeroizing::new(ct.to_vec());
    let len = k.open_in_place(nonce, Aad::from(aad), buf.as_mut_slice())?.len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    #[test]
    fn gcm_round_trip_and_tamper() {
        let rng = SystemRandom::new();
        let k = Key256::generate(&rng).unwrap();
        let blob = aes_gcm_seal(&k, &rng, b"aad", b"secret").unwrap();
        assert_eq!(aes_gcm_open(&k, b"aad", &blob).unwrap().as_slice(), b"secret");
        assert!(aes_gcm_open(&k, b"other", &blob).is_err());
        let mut bad = blob.clone();
        bad[14] ^= 1;
        assert!(aes_gcm_open(&k, b"aad", &bad).is_err());
        assert!(aes_gcm_open(&k, b"aad", &blob[..20]).is_err());
        let blob2 = aes_gcm_seal(&k, &rng, b"aad", b"secret").unwrap();
        assert_ne!(blob[..12], blob2[..12], "nonces must be random");
    }
}
