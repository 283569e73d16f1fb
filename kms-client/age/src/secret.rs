//! Client-side key material: zeroized on drop, no `Debug`/`Display`.

use zeroize::Zeroizing;

/// A 256-bit data key as handed out by the server.
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    /// Takes exactly 32 bytes; anything else is `None`.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Self(Zeroizing::new(arr)))
    }

    /// The raw key bytes.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

/// A data key issued for one backup. Holds the plaintext key: no `Debug`.
pub struct IssuedKey {
    pub key_id: String,
    pub keyring: String,
    pub version: u32,
    pub data_key: DataKey,
    pub wrapped: Vec<u8>,
    /// The escrow recovery recipient (`age1...`) in force, if any.
    pub recovery_recipient: Option<String>,
}
