//! `kmsctl kmip import --recovery-identity FILE DIR`: the escrow bundle of KMIP objects
//! (docs/kmip-escrow.md) read with the rebuilt recovery identity, offline, before anything
//! is sent; then each object recreated at the server with its Unique Identifier.
//!
//! Every file is opened and checked first: a file the identity does not open, or that is
//! damaged, altered or renamed, is named and counted as failed; if the identity opens none
//! of them, nothing is sent at all.

use std::path::{Path, PathBuf};

use kluis_age::fsutil;
use kluis_escrow::kmip_bundle::{self as bundle, BundleError, KeyRecord, StateRecord};
use kluis_proto::v1 as pb;

/// The largest identity file read.
const MAX_IDENTITY_FILE: usize = 64 * 1024;

/// What one uid of the bundle is, after reading it.
pub enum Entry {
    /// Both files open: to import.
    Ready(Box<(KeyRecord, StateRecord)>),
    /// Not imported, and rightly: why (its material was erased, or it was never made).
    Skipped(String),
    /// A file that could not be read: the reason names it.
    Bad(BundleError),
}

/// Why the bundle could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: not an age identity file ({reason}); give the recovery identity that `kmsctl escrow combine -o` wrote")]
    Identity { path: PathBuf, reason: String },
    #[error("{path}: holds {count} identities; give the recovery identity file alone")]
    Identities { path: PathBuf, count: usize },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{dir}: no KMIP escrow files (<uid>.key.age, <uid>.state.age) in this directory")]
    Empty { dir: PathBuf },
    #[error("the recovery identity {identity} opens none of the {count} files in {dir}: it is not the identity this bundle is encrypted to (the custodians' shares of another ceremony?); nothing was imported")]
    WrongIdentity { identity: PathBuf, dir: PathBuf, count: usize },
}

/// Reads an age identity file holding one identity.
pub fn read_identity(path: &Path) -> Result<Box<dyn age::Identity>, ImportError> {
    let bad = |reason: String| ImportError::Identity { path: path.to_owned(), reason };
    let text = fsutil::read_file_limited(path, MAX_IDENTITY_FILE).map_err(|e| match e {
        fsutil::ReadLimitedError::Io(e) => bad(format!("could not {}: {}", e.action, e.source)),
        fsutil::ReadLimitedError::TooLarge { limit, .. } => bad(format!("larger than {limit} bytes")),
    })?;
    let mut ids = age::IdentityFile::from_buffer(text.as_slice())
        .map_err(|e| bad(e.to_string()))?
        .into_identities()
        .map_err(|e| bad(e.to_string()))?;
    match ids.len() {
        1 => Ok(ids.remove(0)),
        0 => Err(bad("it holds no identity".into())),
        count => Err(ImportError::Identities { path: path.to_owned(), count }),
    }
}

/// Reads every object of the bundle in `dir` with `identity`, in uid order.
pub fn load(dir: &Path, identity: &dyn age::Identity, identity_path: &Path) -> Result<Vec<(String, Entry)>, ImportError> {
    let listed = bundle::list(dir)?;
    if listed.is_empty() {
        return Err(ImportError::Empty { dir: dir.to_owned() });
    }
    let read = |name: String| -> Result<Vec<u8>, BundleError> {
        let path = dir.join(name);
        let bytes = fsutil::read_file_limited(&path, bundle::MAX_FILE).map_err(|e| match e {
            fsutil::ReadLimitedError::Io(e) => BundleError::Io(e),
            fsutil::ReadLimitedError::TooLarge { path, limit } => BundleError::TooLarge { path, limit },
        })?;
        Ok(bytes.to_vec())
    };
    let (mut opened, mut files, mut wrong) = (0usize, 0usize, 0usize);
    let mut out = Vec::with_capacity(listed.len());
    for (uid, has_key, has_state) in listed {
        files += usize::from(has_key) + usize::from(has_state);
        let mut count = |r: &Result<(), &BundleError>| {
            match r {
                Ok(()) => opened += 1,
                Err(BundleError::WrongIdentity { .. }) => wrong += 1,
                Err(_) => {}
            }
        };
        let state_path = dir.join(bundle::state_file_name(&uid));
        let entry = if !has_state {
            Entry::Skipped("a key file without a state file: a Create that never completed (the object was never made)".into())
        } else {
            let state = read(bundle::state_file_name(&uid)).and_then(|b| StateRecord::open(identity, &b, &state_path));
            count(&state.as_ref().map(|_| ()));
            match state {
                Err(e) => Entry::Bad(e),
                Ok(st) if !has_key => Entry::Skipped(format!(
                    "destroyed{}: its material was erased with its data key",
                    st.destroyed.map(|d| format!(" on {}", date(d))).unwrap_or_default()
                )),
                Ok(st) if st.destroyed.is_some() => Entry::Skipped(format!(
                    "destroyed on {} by a KMIP Destroy (its material is erased after the waiting period; not imported)",
                    st.destroyed.map(date).unwrap_or_default()
                )),
                Ok(st) => {
                    let key_path = dir.join(bundle::key_file_name(&uid));
                    let key = read(bundle::key_file_name(&uid)).and_then(|b| KeyRecord::open(identity, &b, &key_path));
                    count(&key.as_ref().map(|_| ()));
                    match key {
                        Ok(k) => Entry::Ready(Box::new((k, st))),
                        Err(e) => Entry::Bad(e),
                    }
                }
            }
        };
        out.push((uid, entry));
    }
    if opened == 0 && wrong > 0 {
        return Err(ImportError::WrongIdentity { identity: identity_path.to_owned(), dir: dir.to_owned(), count: files });
    }
    Ok(out)
}

/// The import request of one object (the material copied: the client zeroizes its copy).
pub fn request(key: &KeyRecord, st: &StateRecord) -> pb::ImportKmipObjectRequest {
    pb::ImportKmipObjectRequest {
        uid: key.uid.clone(),
        keyring: key.keyring.clone(),
        object_type: key.object_type,
        algorithm: key.algorithm,
        length: key.length,
        key_format: key.key_format,
        initial_date_unix: key.initial_date,
        created_by: key.created_by.clone(),
        material: key.material.to_vec(),
        state: st.state,
        usage_mask: st.usage_mask,
        names: st.names.clone(),
        app_info: st.app_info.iter().map(|a| pb::KmipAppInfo { namespace: a.namespace.clone(), data: a.data.clone() }).collect(),
        activation_date_unix: st.activation_date,
        deactivation_date_unix: st.deactivation_date,
        compromise_date_unix: st.compromise_date,
        compromise_occurrence_unix: st.compromise_occurrence,
        revocation_code: st.revocation.as_ref().map(|r| r.code),
        revocation_message: st.revocation.as_ref().and_then(|r| r.message.clone()),
        links: key.links.iter().map(|(link_type, uid)| pb::KmipLink { link_type: *link_type, uid: uid.clone() }).collect(),
        secret_data_type: key.secret_data_type,
    }
}

fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// What the import of one object came to, counted for the summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub imported: usize,
    pub existing: usize,
    pub skipped: usize,
    pub failed: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} imported, {} already present, {} skipped, {} failed", self.imported, self.existing, self.skipped, self.failed)
    }
}
