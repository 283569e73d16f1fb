//! The escrow bundle of KMIP objects (docs/kmip-escrow.md): what `kms-server` writes into
//! `kmip_escrow_dir` and what `kmsctl kmip import` reads back with the rebuilt recovery
//! identity. Two standard age v1 files per object, encrypted to the recovery recipient
//! (an X25519 `age1...`, so writing one needs no secret and the stock `age -d -i` opens it):
//!
//! - `<uid>.key.age`: the material and what never changes ([`KeyRecord`]); written once,
//!   before the object is committed, and deleted when its data key is destroyed;
//! - `<uid>.state.age`: what changes ([`StateRecord`]); rewritten before each change commits.
//!
//! The plaintext is one JSON object with a `format` tag. Dates are RFC 3339 UTC; numbers
//! are the KMIP 1.4 enumeration values. No message here ever carries key material or
//! decrypted text (a JSON error gives its kind and position only).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use kluis_age::fsutil::{self, FsError};

/// `format` of a key file's plaintext.
pub const KEY_FORMAT: &str = "kluis-kmip-escrow-key/v1";
/// `format` of a state file's plaintext.
pub const STATE_FORMAT: &str = "kluis-kmip-escrow-state/v1";
/// The file name endings.
pub const KEY_SUFFIX: &str = ".key.age";
pub const STATE_SUFFIX: &str = ".state.age";
/// The largest bundle file read (the largest material, 8192 bytes, is 16 KiB of hex; the
/// attributes are bounded by the server: 16 names and 16 entries of 256 bytes).
pub const MAX_FILE: usize = 64 * 1024;
/// The largest material a key file carries (the server's `MAX_MATERIAL`).
pub const MAX_MATERIAL: usize = 8192;

/// What is wrong with a bundle file, or could not be done with one.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: not an age file ({reason})")]
    NotAge { path: PathBuf, reason: String },
    #[error("{path}: the recovery identity given does not open it: it is encrypted to another recipient (is this the identity the custodians rebuilt for this server's escrow?)")]
    WrongIdentity { path: PathBuf },
    #[error("{path}: damaged or altered: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("{path}: larger than {limit} bytes; not a bundle file")]
    TooLarge { path: PathBuf, limit: usize },
    #[error("{path}: the decrypted text is not bundle JSON ({kind} at line {line}, column {column})")]
    NotJson { path: PathBuf, kind: &'static str, line: usize, column: usize },
    #[error("{path}: format {found:?}, expected {expected:?}")]
    Format { path: PathBuf, found: String, expected: &'static str },
    #[error("{path}: {field} is not valid: {reason}")]
    Field { path: PathBuf, field: &'static str, reason: &'static str },
    #[error("{path}: its name says object {named} but it holds object {inside}: renamed or swapped")]
    UidMismatch { path: PathBuf, named: String, inside: String },
    #[error("the recovery recipient {0:?} is not an age X25519 recipient (age1...)")]
    Recipient(String),
    #[error("age encryption failed: {0}")]
    Encrypt(String),
    #[error("could not {} {}: {}", .0.action, .0.path.display(), .0.source)]
    Io(FsError),
}

impl From<FsError> for BundleError {
    fn from(e: FsError) -> Self {
        BundleError::Io(e)
    }
}

/// Whether `s` is a Unique Identifier as Kluis makes them: 32 lowercase hex digits (so it
/// is also a safe file name).
pub fn is_uid(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn key_file_name(uid: &str) -> String {
    format!("{uid}{KEY_SUFFIX}")
}

pub fn state_file_name(uid: &str) -> String {
    format!("{uid}{STATE_SUFFIX}")
}

/// A key file's content: the material and the attributes that never change. No `Debug`;
/// the material is zeroized on drop.
pub struct KeyRecord {
    pub uid: String,
    pub keyring: String,
    /// KMIP Object Type (Symmetric Key 2, Secret Data 7, ...).
    pub object_type: u32,
    /// Cryptographic Algorithm (AES 3, ...), Length in bits.
    pub algorithm: Option<u32>,
    pub length: Option<i32>,
    /// Key Format Type the material is in (Raw 1, ...).
    pub key_format: u32,
    /// Initial Date, unix seconds.
    pub initial_date: i64,
    /// The principal that made the object.
    pub created_by: String,
    pub material: Zeroizing<Vec<u8>>,
    /// Links to other objects: (KMIP Link Type, uid); a key pair's two keys name each other.
    pub links: Vec<(u32, String)>,
    /// Secret Data Type (Password 1, Seed 2) of Secret Data.
    pub secret_data_type: Option<u32>,
}

/// Application Specific Information: namespace and data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppInfo {
    pub namespace: String,
    pub data: String,
}

/// Revocation Reason: code and message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub code: u32,
    pub message: Option<String>,
}

/// A state file's content: what may change after the object is made. Dates are unix
/// seconds here and RFC 3339 in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateRecord {
    pub uid: String,
    /// The object's KMIP State before any Destroy (Pre-Active 1, Active 2, Deactivated 3,
    /// Compromised 4).
    pub state: u32,
    pub usage_mask: Option<i32>,
    pub names: Vec<String>,
    pub app_info: Vec<AppInfo>,
    pub activation_date: Option<i64>,
    pub deactivation_date: Option<i64>,
    pub compromise_date: Option<i64>,
    pub compromise_occurrence: Option<i64>,
    pub revocation: Option<Revocation>,
    /// Set when the object is Destroyed to KMIP clients (a Destroy waiting out its period,
    /// or carried out, or its keyring destroyed): when that happened.
    pub destroyed: Option<i64>,
}

/// The KMIP State names (section 9.1.3.2.17), as the file shows them beside the number.
pub fn state_name(s: u32) -> &'static str {
    match s {
        1 => "Pre-Active",
        2 => "Active",
        3 => "Deactivated",
        4 => "Compromised",
        5 => "Destroyed",
        6 => "Destroyed Compromised",
        _ => "unknown",
    }
}

mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;

    pub fn text(unix: i64) -> Result<String, &'static str> {
        time::OffsetDateTime::from_unix_timestamp(unix).ok().and_then(|t| t.format(&Rfc3339).ok()).ok_or("a date out of range")
    }

    pub fn serialize<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(u) => s.serialize_str(&text(*u).map_err(serde::ser::Error::custom)?),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(t) => time::OffsetDateTime::parse(&t, &Rfc3339)
                .map(|t| Some(t.unix_timestamp()))
                .map_err(|_| serde::de::Error::custom("a date that is not RFC 3339")),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyWire {
    format: String,
    uid: String,
    keyring: String,
    object_type: u32,
    algorithm: Option<u32>,
    length: Option<i32>,
    key_format: u32,
    #[serde(with = "rfc3339")]
    initial_date: Option<i64>,
    created_by: String,
    /// The material, lowercase hex.
    material_hex: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    links: Vec<LinkWire>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret_data_type: Option<u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkWire {
    link_type: u32,
    uid: String,
}

/// Most links a key file carries (a key pair's keys have one each).
pub const MAX_LINKS: usize = 4;

impl Drop for KeyWire {
    fn drop(&mut self) {
        self.material_hex.zeroize();
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateWire {
    format: String,
    uid: String,
    state: u32,
    /// The name of `state`, for a person reading the file (not read back).
    state_name: String,
    usage_mask: Option<i32>,
    names: Vec<String>,
    app_info: Vec<AppInfo>,
    #[serde(with = "rfc3339")]
    activation_date: Option<i64>,
    #[serde(with = "rfc3339")]
    deactivation_date: Option<i64>,
    #[serde(with = "rfc3339")]
    compromise_date: Option<i64>,
    #[serde(with = "rfc3339")]
    compromise_occurrence: Option<i64>,
    revocation: Option<Revocation>,
    #[serde(with = "rfc3339")]
    destroyed: Option<i64>,
}

/// The age X25519 recipient `recipient` (`age1...`).
pub fn parse_recipient(recipient: &str) -> Result<age::x25519::Recipient, BundleError> {
    recipient.parse().map_err(|_| BundleError::Recipient(recipient.to_owned()))
}

/// Encrypts `plaintext` to `recipient` as a standard (binary) age v1 file.
fn encrypt(recipient: &age::x25519::Recipient, plaintext: &[u8]) -> Result<Vec<u8>, BundleError> {
    let enc = age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
        .map_err(|e| BundleError::Encrypt(e.to_string()))?;
    let mut out = Vec::with_capacity(plaintext.len() + 512);
    let mut w = enc.wrap_output(&mut out).map_err(|e| BundleError::Encrypt(e.to_string()))?;
    w.write_all(plaintext).map_err(|e| BundleError::Encrypt(e.to_string()))?;
    w.finish().map_err(|e| BundleError::Encrypt(e.to_string()))?;
    Ok(out)
}

/// Opens an age file with `identity`; `path` names it in errors.
fn decrypt(identity: &dyn age::Identity, bytes: &[u8], path: &Path) -> Result<Zeroizing<Vec<u8>>, BundleError> {
    if bytes.len() > MAX_FILE {
        return Err(BundleError::TooLarge { path: path.to_owned(), limit: MAX_FILE });
    }
    if !bytes.starts_with(b"age-encryption.org/") {
        return Err(BundleError::NotAge { path: path.to_owned(), reason: "it does not start with the age v1 header line".into() });
    }
    let dec = age::Decryptor::new(bytes).map_err(|e| match e {
        age::DecryptError::InvalidHeader | age::DecryptError::UnknownFormat => {
            BundleError::NotAge { path: path.to_owned(), reason: e.to_string() }
        }
        other => BundleError::Damaged { path: path.to_owned(), reason: other.to_string() },
    })?;
    let mut r = dec.decrypt(std::iter::once(identity)).map_err(|e| match e {
        age::DecryptError::NoMatchingKeys => BundleError::WrongIdentity { path: path.to_owned() },
        other => BundleError::Damaged { path: path.to_owned(), reason: other.to_string() },
    })?;
    // Allocated once (never grown: no copies left behind), zeroized on drop.
    let mut out = Zeroizing::new(Vec::with_capacity(MAX_FILE + 1));
    (&mut r)
        .take(MAX_FILE as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| BundleError::Damaged { path: path.to_owned(), reason: e.to_string() })?;
    if out.len() > MAX_FILE {
        return Err(BundleError::TooLarge { path: path.to_owned(), limit: MAX_FILE });
    }
    Ok(out)
}

fn json_error(path: &Path, e: &serde_json::Error) -> BundleError {
    use serde_json::error::Category;
    let kind = match e.classify() {
        Category::Io => "unreadable",
        Category::Syntax => "a syntax error",
        Category::Data => "a missing, unknown or wrongly typed field",
        Category::Eof => "an early end",
    };
    BundleError::NotJson { path: path.to_owned(), kind, line: e.line(), column: e.column() }
}

impl KeyRecord {
    /// The key file's content, encrypted to `recipient`.
    pub fn seal(&self, recipient: &age::x25519::Recipient) -> Result<Vec<u8>, BundleError> {
        let wire = KeyWire {
            format: KEY_FORMAT.to_owned(),
            uid: self.uid.clone(),
            keyring: self.keyring.clone(),
            object_type: self.object_type,
            algorithm: self.algorithm,
            length: self.length,
            key_format: self.key_format,
            initial_date: Some(self.initial_date),
            created_by: self.created_by.clone(),
            material_hex: hex::encode(self.material.as_slice()),
            links: self.links.iter().map(|(link_type, uid)| LinkWire { link_type: *link_type, uid: uid.clone() }).collect(),
            secret_data_type: self.secret_data_type,
        };
        let mut text = Zeroizing::new(Vec::with_capacity(4 * MAX_MATERIAL));
        serde_json::to_writer_pretty(&mut *text, &wire).map_err(|e| BundleError::Encrypt(e.to_string()))?;
        text.push(b'\n');
        encrypt(recipient, &text)
    }

    /// Reads a key file (`path`, whose name gives the uid expected) with `identity`.
    pub fn open(identity: &dyn age::Identity, bytes: &[u8], path: &Path) -> Result<KeyRecord, BundleError> {
        let text = decrypt(identity, bytes, path)?;
        let mut wire: KeyWire = serde_json::from_slice(&text).map_err(|e| json_error(path, &e))?;
        if wire.format != KEY_FORMAT {
            return Err(BundleError::Format { path: path.to_owned(), found: wire.format.chars().take(64).collect(), expected: KEY_FORMAT });
        }
        check_uid(path, &wire.uid, KEY_SUFFIX)?;
        let field = |field, reason| BundleError::Field { path: path.to_owned(), field, reason };
        let hex_text = Zeroizing::new(std::mem::take(&mut wire.material_hex));
        if hex_text.is_empty() || hex_text.len() > 2 * MAX_MATERIAL || !hex_text.len().is_multiple_of(2) {
            return Err(field("material_hex", "2 to 16384 hex digits"));
        }
        let mut material = Zeroizing::new(vec![0u8; hex_text.len() / 2]);
        hex::decode_to_slice(hex_text.as_bytes(), &mut material).map_err(|_| field("material_hex", "not hex"))?;
        let initial_date = wire.initial_date.ok_or_else(|| field("initial_date", "missing"))?;
        if wire.links.len() > MAX_LINKS {
            return Err(field("links", "at most 4"));
        }
        if wire.links.iter().any(|l| l.uid.len() != 32 || !l.uid.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))) {
            return Err(field("links", "a uid of 32 lowercase hex digits"));
        }
        let links = wire.links.drain(..).map(|l| (l.link_type, l.uid)).collect();
        Ok(KeyRecord {
            uid: std::mem::take(&mut wire.uid),
            keyring: std::mem::take(&mut wire.keyring),
            object_type: wire.object_type,
            algorithm: wire.algorithm,
            length: wire.length,
            key_format: wire.key_format,
            initial_date,
            created_by: std::mem::take(&mut wire.created_by),
            material,
            links,
            secret_data_type: wire.secret_data_type,
        })
    }
}

impl StateRecord {
    /// The state file's content, encrypted to `recipient`.
    pub fn seal(&self, recipient: &age::x25519::Recipient) -> Result<Vec<u8>, BundleError> {
        let wire = StateWire {
            format: STATE_FORMAT.to_owned(),
            uid: self.uid.clone(),
            state: self.state,
            state_name: state_name(self.state).to_owned(),
            usage_mask: self.usage_mask,
            names: self.names.clone(),
            app_info: self.app_info.clone(),
            activation_date: self.activation_date,
            deactivation_date: self.deactivation_date,
            compromise_date: self.compromise_date,
            compromise_occurrence: self.compromise_occurrence,
            revocation: self.revocation.clone(),
            destroyed: self.destroyed,
        };
        let mut text = serde_json::to_vec_pretty(&wire).map_err(|e| BundleError::Encrypt(e.to_string()))?;
        text.push(b'\n');
        encrypt(recipient, &text)
    }

    /// Reads a state file (`path`, whose name gives the uid expected) with `identity`.
    pub fn open(identity: &dyn age::Identity, bytes: &[u8], path: &Path) -> Result<StateRecord, BundleError> {
        let text = decrypt(identity, bytes, path)?;
        let wire: StateWire = serde_json::from_slice(&text).map_err(|e| json_error(path, &e))?;
        if wire.format != STATE_FORMAT {
            return Err(BundleError::Format { path: path.to_owned(), found: wire.format.chars().take(64).collect(), expected: STATE_FORMAT });
        }
        check_uid(path, &wire.uid, STATE_SUFFIX)?;
        Ok(StateRecord {
            uid: wire.uid,
            state: wire.state,
            usage_mask: wire.usage_mask,
            names: wire.names,
            app_info: wire.app_info,
            activation_date: wire.activation_date,
            deactivation_date: wire.deactivation_date,
            compromise_date: wire.compromise_date,
            compromise_occurrence: wire.compromise_occurrence,
            revocation: wire.revocation,
            destroyed: wire.destroyed,
        })
    }
}

/// The uid inside must be a Kluis uid and the one the file's name gives.
fn check_uid(path: &Path, inside: &str, suffix: &str) -> Result<(), BundleError> {
    if !is_uid(inside) {
        return Err(BundleError::Field { path: path.to_owned(), field: "uid", reason: "not 32 lowercase hex digits" });
    }
    let named = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(suffix)).unwrap_or_default();
    if named != inside {
        return Err(BundleError::UidMismatch { path: path.to_owned(), named: named.escape_debug().take(80).collect(), inside: inside.to_owned() });
    }
    Ok(())
}

/// Writes `bytes` as `dir/name` durably, replacing what is there: a temporary file in
/// `dir` (mode 0600) written and synced, renamed into place, then the directory synced.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), BundleError> {
    fsutil::replace_file_atomically(dir, &dir.join(name), ".kluis-escrow-", ".tmp", bytes, 0o600)?;
    fsutil::sync_dir_if_supported(dir)?;
    Ok(())
}

/// [`write_file`] for several files, with one directory sync after the last rename (each
/// file is synced before its rename): what a new object writes, its key and state files.
pub fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<(), BundleError> {
    for (name, bytes) in files {
        fsutil::replace_file_atomically(dir, &dir.join(name), ".kluis-escrow-", ".tmp", bytes, 0o600)?;
    }
    fsutil::sync_dir_if_supported(dir)?;
    Ok(())
}

/// Deletes `dir/name` durably (the directory synced); true if it was there.
pub fn remove_file(dir: &Path, name: &str) -> Result<bool, BundleError> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            fsutil::sync_dir_if_supported(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(BundleError::Io(FsError { action: "delete", path, source: e })),
    }
}

/// The uids of a bundle directory: every `<uid>.key.age` and `<uid>.state.age`, sorted,
/// each with whether its key file and its state file are there. Other entries are skipped.
pub fn list(dir: &Path) -> Result<Vec<(String, bool, bool)>, BundleError> {
    let rd = std::fs::read_dir(dir).map_err(|e| FsError { action: "read directory", path: dir.to_owned(), source: e })?;
    let mut found = std::collections::BTreeMap::<String, (bool, bool)>::new();
    for e in rd {
        let e = e.map_err(|e| FsError { action: "read directory", path: dir.to_owned(), source: e })?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(uid) = name.strip_suffix(KEY_SUFFIX).filter(|u| is_uid(u)) {
            found.entry(uid.to_owned()).or_default().0 = true;
        } else if let Some(uid) = name.strip_suffix(STATE_SUFFIX).filter(|u| is_uid(u)) {
            found.entry(uid.to_owned()).or_default().1 = true;
        }
    }
    Ok(found.into_iter().map(|(u, (k, s))| (u, k, s)).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const UID: &str = "00112233445566778899aabbccddeeff";

    fn key() -> KeyRecord {
        KeyRecord {
            uid: UID.into(),
            keyring: "dev".into(),
            object_type: 2,
            algorithm: Some(3),
            length: Some(256),
            key_format: 1,
            initial_date: 1_767_225_600,
            created_by: "dev".into(),
            material: Zeroizing::new((0u8..32).collect()),
            links: vec![(0x102, "ffeeddccbbaa99887766554433221100".into())],
            secret_data_type: None,
        }
    }

    fn state() -> StateRecord {
        StateRecord {
            uid: UID.into(),
            state: 3,
            usage_mask: Some(12),
            names: vec!["vsphere-kek-1".into()],
            app_info: vec![AppInfo { namespace: "LIBRARY-LTO".into(), data: "0123".into() }],
            activation_date: Some(1_767_225_601),
            deactivation_date: Some(1_767_225_602),
            compromise_date: None,
            compromise_occurrence: None,
            revocation: Some(Revocation { code: 5, message: Some("retired".into()) }),
            destroyed: None,
        }
    }

    #[test]
    fn both_files_round_trip_and_name_the_file_on_every_refusal() {
        let id = age::x25519::Identity::generate();
        let dir = Path::new("/bundle");
        let kp = dir.join(key_file_name(UID));
        let sp = dir.join(state_file_name(UID));
        let sealed = key().seal(&id.to_public()).unwrap();
        assert!(sealed.starts_with(b"age-encryption.org/v1\n"));
        let k = KeyRecord::open(&id, &sealed, &kp).unwrap();
        assert_eq!((k.uid.as_str(), k.keyring.as_str(), k.algorithm, k.length, k.initial_date), (UID, "dev", Some(3), Some(256), 1_767_225_600));
        assert_eq!(k.material.as_slice(), (0u8..32).collect::<Vec<_>>());
        assert_eq!((k.links, k.secret_data_type), (key().links, None));
        let s = StateRecord::open(&id, &state().seal(&id.to_public()).unwrap(), &sp).unwrap();
        assert_eq!(s, state());

        // Another identity: said so, not "damaged".
        let other = age::x25519::Identity::generate();
        let e = KeyRecord::open(&other, &sealed, &kp).err().unwrap();
        assert!(matches!(e, BundleError::WrongIdentity { .. }), "{e}");
        assert!(e.to_string().contains(UID), "{e}");
        // One bit flipped in the payload: refused, named.
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let e = KeyRecord::open(&id, &bad, &kp).err().unwrap();
        assert!(matches!(e, BundleError::Damaged { .. }), "{e}");
        assert!(e.to_string().starts_with(&kp.display().to_string()), "{e}");
        // Renamed to another uid: the name and the content disagree.
        let e = KeyRecord::open(&id, &sealed, &dir.join(key_file_name(&"f".repeat(32)))).err().unwrap();
        assert!(matches!(e, BundleError::UidMismatch { .. }), "{e}");
        // A state file where a key file is expected: the format tag says so.
        let e = KeyRecord::open(&id, &state().seal(&id.to_public()).unwrap(), &kp).err().unwrap();
        assert!(matches!(e, BundleError::NotJson { .. } | BundleError::Format { .. }), "{e}");
        // Not age at all.
        let e = KeyRecord::open(&id, b"hello", &kp).err().unwrap();
        assert!(matches!(e, BundleError::NotAge { .. }), "{e}");
    }

    #[test]
    fn a_json_error_shows_no_content() {
        let id = age::x25519::Identity::generate();
        let secret = "c0ffee".repeat(8);
        let text = format!("{{\"format\": \"{KEY_FORMAT}\", \"uid\": \"{UID}\", \"material_hex\": \"{secret}\", \"bogus\": 1}}");
        let sealed = encrypt(&id.to_public(), text.as_bytes()).unwrap();
        let e = KeyRecord::open(&id, &sealed, &Path::new("/b").join(key_file_name(UID))).err().unwrap();
        assert!(matches!(e, BundleError::NotJson { .. }), "{e}");
        assert!(!e.to_string().contains("c0ffee"), "{e}");
    }

    #[test]
    fn write_replaces_durably_and_list_pairs_the_files() {
        let d = tempfile::tempdir().unwrap();
        write_file(d.path(), &key_file_name(UID), b"one").unwrap();
        write_file(d.path(), &key_file_name(UID), b"two").unwrap();
        write_file(d.path(), &state_file_name(UID), b"s").unwrap();
        write_file(d.path(), &state_file_name(&"a".repeat(32)), b"s").unwrap();
        std::fs::write(d.path().join("README"), b"x").unwrap();
        assert_eq!(std::fs::read(d.path().join(key_file_name(UID))).unwrap(), b"two");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(d.path().join(key_file_name(UID))).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(list(d.path()).unwrap(), vec![(UID.to_owned(), true, true), ("a".repeat(32), false, true)]);
        assert!(remove_file(d.path(), &key_file_name(UID)).unwrap());
        assert!(!remove_file(d.path(), &key_file_name(UID)).unwrap());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 3);
    }
}
