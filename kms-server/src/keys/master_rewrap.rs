//! The one procedure that moves the store from one master key to another, used by
//! `kmsctl master rotate` (the next generation of the configured key) and by
//! `kms-server migrate-master` (another key or provider).
//!
//! 1. [`open_all`]: everything wrapped by the old key (every keyring version of a live
//!    keyring, the master check value, the audit signing key) is opened first, so a store
//!    the old key cannot fully open is refused before anything new is made.
//! 2. [`wrap_all`]: all of it wrapped by the new key under the same AAD, read back with the
//!    new key, and returned as the writes of ONE group: after a crash at any point exactly
//!    one of the two keys opens the whole store, never a mix. No per-data-key work.

use zeroize::Zeroizing;

use super::registry::WriteOp;
use super::{AUDIT_KEY_AAD, AUDIT_KEY_META, MASTER_CHECK_AAD, MASTER_CHECK_META, MASTER_GENERATION_META, krk_aad};
use crate::master::{MasterError, MasterKeyProvider, encode_generation};
use crate::model::KeyringRecord;
use crate::secret::Key256;

/// Why a rewrap stopped. Nothing is written unless all of it is.
#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    #[error("keyring {keyring:?} version {version} could not be unwrapped by the old master key: {source}")]
    Unwrap { keyring: String, version: u32, source: MasterError },
    #[error("the store's master check value could not be unwrapped by the old master key: {0}")]
    Check(#[source] MasterError),
    #[error("the audit signing key could not be unwrapped by the old master key: {0}")]
    AuditKey(#[source] MasterError),
    #[error("wrapping with the new master key failed ({what}): {source}")]
    Wrap { what: String, source: MasterError },
    #[error("keyring {keyring:?} version {version} does not open with the new master key after rewrapping: {source}")]
    ReadBack { keyring: String, version: u32, source: MasterError },
}

/// A keyring version's key, unwrapped (zeroized on drop).
struct Unwrapped {
    ring: usize,
    version: usize,
    key: Key256,
}

/// Everything the old master key wraps, opened.
pub struct Opened {
    records: Vec<KeyringRecord>,
    keys: Vec<Unwrapped>,
    probe: Zeroizing<Vec<u8>>,
    audit_key: Option<Zeroizing<Vec<u8>>>,
}

impl Opened {
    /// The keyrings as stored before the rewrap.
    pub fn records(&self) -> &[KeyringRecord] {
        &self.records
    }
}

/// What [`wrap_all`] made.
pub struct Rewrapped {
    /// The keyrings as they are stored after the rewrap.
    pub records: Vec<KeyringRecord>,
    /// The writes to commit in one group.
    pub ops: Vec<WriteOp>,
    /// Live keyrings and keyring versions rewrapped.
    pub keyrings: u32,
    pub versions: u32,
}

/// Opens every keyring version of the live keyrings, the master check value `check` and
/// the audit key blob with `old`. A destroyed keyring has no keys left to move.
pub fn open_all(
    old: &dyn MasterKeyProvider,
    records: Vec<KeyringRecord>,
    check: &[u8],
    audit_key: Option<&[u8]>,
) -> Result<Opened, RewrapError> {
    let probe = old.unwrap(MASTER_CHECK_AAD, check).map_err(RewrapError::Check)?;
    let mut keys = Vec::new();
    for (ring, record) in records.iter().enumerate().filter(|(_, r)| r.destroyed.is_none()) {
        for (version, v) in record.versions.iter().enumerate() {
            let err = |source| RewrapError::Unwrap { keyring: record.name.clone(), version: v.version, source };
            let raw = old.unwrap(&krk_aad(&record.name, v.version), &v.wrapped_key).map_err(err)?;
            let key = Key256::from_slice(&raw).ok_or_else(|| err(MasterError::UnwrapFailed))?;
            keys.push(Unwrapped { ring, version, key });
        }
    }
    let audit_key = audit_key.map(|blob| old.unwrap(AUDIT_KEY_AAD, blob).map_err(RewrapError::AuditKey)).transpose()?;
    Ok(Opened { records, keys, probe, audit_key })
}

/// Wraps everything `opened` holds with `new`, reads the keyring keys back with it, and
/// returns the writes that record `generation` as the store's master-key generation.
pub fn wrap_all(opened: Opened, new: &dyn MasterKeyProvider, generation: u32) -> Result<Rewrapped, RewrapError> {
    let wrap_err = |what: String| move |source| RewrapError::Wrap { what, source };
    let mut records = opened.records.clone();
    for u in &opened.keys {
        let rec = &mut records[u.ring];
        let version = rec.versions[u.version].version;
        let aad = krk_aad(&rec.name, version);
        rec.versions[u.version].wrapped_key =
            new.wrap(&aad, u.key.expose()).map_err(wrap_err(format!("keyring {:?} version {version}", rec.name)))?;
    }
    for u in &opened.keys {
        let rec = &records[u.ring];
        let v = &rec.versions[u.version];
        let back = new.unwrap(&krk_aad(&rec.name, v.version), &v.wrapped_key).map_err(|source| RewrapError::ReadBack {
            keyring: rec.name.clone(),
            version: v.version,
            source,
        })?;
        if back.as_slice() != u.key.expose().as_slice() {
            return Err(RewrapError::ReadBack { keyring: rec.name.clone(), version: v.version, source: MasterError::UnwrapFailed });
        }
    }
    let mut ops: Vec<WriteOp> = records.iter().cloned().map(WriteOp::PutKeyring).collect();
    let check = new.wrap(MASTER_CHECK_AAD, &opened.probe).map_err(wrap_err("master check".into()))?;
    ops.push(WriteOp::PutMeta { key: MASTER_CHECK_META, value: check });
    if let Some(pkcs8) = &opened.audit_key {
        let blob = new.wrap(AUDIT_KEY_AAD, pkcs8).map_err(wrap_err("audit signing key".into()))?;
        ops.push(WriteOp::PutMeta { key: AUDIT_KEY_META, value: blob });
    }
    ops.push(WriteOp::PutMeta { key: MASTER_GENERATION_META, value: encode_generation(generation) });
    let keyrings = u32::try_from(records.iter().filter(|r| r.destroyed.is_none()).count()).unwrap_or(u32::MAX);
    let versions = u32::try_from(opened.keys.len()).unwrap_or(u32::MAX);
    Ok(Rewrapped { records, ops, keyrings, versions })
}
