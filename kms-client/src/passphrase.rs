//! Repository passphrases for backup tools that encrypt on their own (restic, borg, kopia,
//! pgBackRest): `backup-hook passphrase`.
//!
//! A passphrase is a random 256-bit secret. It is kept in a *key file*, which is an ordinary
//! Kluis sealed file (an age v1 file with the Kluis stanza and, once an escrow is installed,
//! the escrow stanza), sealed under a keyring with the backup id `passphrase/NAME` and the
//! label `kind=passphrase`. Without the server (restorer role) or the custodians' recovery
//! key the key file is useless.
//!
//! The plaintext of a key file is exactly one line: the standard, padded base64 encoding of
//! the 32 secret bytes (44 characters) and a newline, 45 bytes. That line is the passphrase,
//! byte for byte what `backup-hook passphrase --key-file F` prints and what the stock
//! `age -d -i recovery.key F` prints in a disaster; restic and borg strip the newline.
//!
//! The secret is held in [`Zeroizing`] buffers of fixed size here. It never appears in an
//! error message: errors name files and reasons, never content.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kluis_age::fsutil::{self, ReadLimitedError, WriteNewError, parent_dir};
use kluis_age::sealed::UnsealError;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::hook::{Hook, HookError, unseal_offline};

/// Length of the secret in bytes (256 bits).
pub const SECRET_BYTES: usize = 32;
/// Length of the base64 line (standard alphabet, padded), without the newline.
pub const LINE_LEN: usize = 44;
/// Length of a key file's plaintext: the line and a newline.
pub const PLAINTEXT_LEN: usize = LINE_LEN + 1;
/// The label every passphrase key file is sealed with.
pub const KIND_LABEL: (&str, &str) = ("kind", "passphrase");
/// Prefix of the backup id of a passphrase: `passphrase/NAME`.
pub const BACKUP_ID_PREFIX: &str = "passphrase/";
/// A key file is a few hundred bytes; anything beyond this is not one (a sealed backup?).
pub const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
const MAX_NAME_LEN: usize = 200;

/// Errors of the passphrase operations. Never carries secret material.
#[derive(Debug, thiserror::Error)]
pub enum PassphraseError {
    #[error("passphrase name {name:?} {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("the label {key}= is reserved: every passphrase key file is labelled kind=passphrase")]
    ReservedLabel { key: String },
    #[error(
        "{path} already exists; a passphrase key file is never written over (it may be the only way into a repository): choose another path, or remove it yourself if it is really unused"
    )]
    Exists { path: PathBuf },
    #[error("cannot create the key file {path}: its directory {dir} is not usable: {source}")]
    Directory { path: PathBuf, dir: PathBuf, source: io::Error },
    #[error("cannot read the key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a passphrase key file: it is larger than {MAX_KEY_FILE_BYTES} bytes (a sealed backup?)")]
    TooLarge { path: PathBuf },
    #[error(
        "{path} opened, but it is not a passphrase key file: its content is not one base64 line of a 256-bit secret (a sealed backup?)"
    )]
    NotPassphrase { path: PathBuf },
    #[error("cannot write the key file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("the system random number generator failed")]
    Random,
    #[error("{path}: {source}")]
    Hook { path: PathBuf, source: Box<HookError> },
}

/// A repository passphrase: the base64 line of a random 256-bit secret. No `Debug`, no
/// `Display`; zeroized on drop.
pub struct Passphrase {
    /// The line and its newline.
    line: Zeroizing<[u8; PLAINTEXT_LEN]>,
}

impl Passphrase {
    /// A fresh random 256-bit passphrase from the operating system's generator.
    pub fn generate() -> Result<Self, PassphraseError> {
        let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
        SystemRandom::new().fill(&mut secret[..]).map_err(|_| PassphraseError::Random)?;
        let mut line = Zeroizing::new([0u8; PLAINTEXT_LEN]);
        let n = STANDARD.encode_slice(&secret[..], &mut line[..LINE_LEN]).map_err(|_| PassphraseError::Random)?;
        if n != LINE_LEN {
            return Err(PassphraseError::Random);
        }
        line[LINE_LEN] = b'\n';
        Ok(Self { line })
    }

    /// Checks a key file's plaintext: exactly the base64 line of 32 bytes and a newline.
    fn parse(plaintext: &[u8]) -> Option<Self> {
        let line: [u8; PLAINTEXT_LEN] = plaintext.try_into().ok()?;
        let line = Zeroizing::new(line);
        if line[LINE_LEN] != b'\n' {
            return None;
        }
        let mut decoded = Zeroizing::new([0u8; SECRET_BYTES + 1]);
        match STANDARD.decode_slice(&line[..LINE_LEN], &mut decoded[..]) {
            Ok(SECRET_BYTES) => Some(Self { line }),
            _ => None,
        }
    }

    /// The passphrase (the base64 text, without newline).
    pub fn expose(&self) -> &str {
        // Only base64 characters get in (generate and parse check), so this never fails.
        std::str::from_utf8(&self.line[..LINE_LEN]).unwrap_or_default()
    }

    /// The passphrase and a newline: what the key file holds and what is printed.
    pub fn expose_line(&self) -> &[u8] {
        &self.line[..]
    }
}

/// The backup id of the passphrase `name`: `passphrase/NAME`.
pub fn backup_id(name: &str) -> Result<String, PassphraseError> {
    let bad = |reason| Err(PassphraseError::InvalidName { name: name.to_owned(), reason });
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("is too long (at most 200 characters)");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/')) {
        return bad("may only contain letters, digits, '.', '_', '-' and '/'");
    }
    Ok(format!("{BACKUP_ID_PREFIX}{name}"))
}

/// Refuses early (before any server round trip) when `key_file` exists or its directory
/// is not there.
pub fn check_new_key_file(key_file: &Path) -> Result<(), PassphraseError> {
    if key_file.symlink_metadata().is_ok() {
        return Err(PassphraseError::Exists { path: key_file.to_owned() });
    }
    let dir = parent_dir(key_file);
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(PassphraseError::Directory {
            path: key_file.to_owned(),
            dir: dir.to_owned(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        }),
        Err(e) => Err(PassphraseError::Directory { path: key_file.to_owned(), dir: dir.to_owned(), source: e }),
    }
}

/// What [`create`] did (nothing secret).
#[derive(Debug, Clone)]
pub struct CreateReport {
    pub key_file: PathBuf,
    pub keyring: String,
    pub key_id: String,
    pub backup_id: String,
    /// Whether the key file carries an escrow stanza (an escrow was installed).
    pub escrowed: bool,
}

/// Makes a fresh passphrase, seals it through the server under `keyring` with backup id
/// `passphrase/NAME` and the labels plus `kind=passphrase`, and writes the sealed file to
/// `key_file`: a new file (never written over), mode 0600, written atomically.
pub fn create(
    hook: &Hook,
    keyring: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    key_file: &Path,
) -> Result<CreateReport, PassphraseError> {
    let backup_id = backup_id(name)?;
    if let Some(key) = labels.keys().find(|k| k.as_str() == KIND_LABEL.0) {
        return Err(PassphraseError::ReservedLabel { key: key.clone() });
    }
    check_new_key_file(key_file)?;
    let mut labels = labels.clone();
    labels.insert(KIND_LABEL.0.to_owned(), KIND_LABEL.1.to_owned());

    let pass = Passphrase::generate()?;
    // Sealed in memory first: the server round trip is over before the file is created.
    let (sealed, report) = hook
        .seal(keyring, &backup_id, &labels, pass.expose_line(), Vec::with_capacity(1024))
        .map_err(|e| PassphraseError::Hook { path: key_file.to_owned(), source: Box::new(e) })?;
    drop(pass);
    write_new_file(key_file, &sealed)?;
    Ok(CreateReport {
        key_file: key_file.to_owned(),
        keyring: report.keyring,
        key_id: report.key_id,
        backup_id,
        escrowed: report.escrowed,
    })
}

/// A key file read into memory (it is small), not yet opened. Reading it before any
/// server round trip lets a missing or wrong file fail at once.
pub struct KeyFile {
    path: PathBuf,
    sealed: Zeroizing<Vec<u8>>,
}

impl KeyFile {
    /// Reads `path` (at most [`MAX_KEY_FILE_BYTES`]).
    pub fn read(path: &Path) -> Result<Self, PassphraseError> {
        Ok(Self { path: path.to_owned(), sealed: read_key_file(path)? })
    }

    /// Opens it through the server (restorer role on its keyring).
    pub fn open(&self, hook: &Hook) -> Result<Passphrase, PassphraseError> {
        let mut out = SecretSink::new();
        let res = hook.unseal(&self.sealed[..], &[], &mut out).map(|_| ());
        finish(&self.path, res, out)
    }

    /// Opens it with recovery identities only: no server, no network.
    pub fn open_offline(&self, recovery: &[&dyn age::Identity]) -> Result<Passphrase, PassphraseError> {
        let mut out = SecretSink::new();
        let res = unseal_offline(&self.sealed[..], recovery, &mut out).map(|_| ());
        finish(&self.path, res, out)
    }
}

fn finish(key_file: &Path, res: Result<(), HookError>, out: SecretSink) -> Result<Passphrase, PassphraseError> {
    match res {
        Ok(()) => {}
        // The only writer is the in-memory sink, which fails only when the plaintext is too
        // long for a passphrase.
        Err(HookError::Unseal(UnsealError::WriteOutput(_))) => {
            return Err(PassphraseError::NotPassphrase { path: key_file.to_owned() });
        }
        Err(e) => return Err(PassphraseError::Hook { path: key_file.to_owned(), source: Box::new(e) }),
    }
    Passphrase::parse(out.bytes()).ok_or_else(|| PassphraseError::NotPassphrase { path: key_file.to_owned() })
}

fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, PassphraseError> {
    let limit = usize::try_from(MAX_KEY_FILE_BYTES).unwrap_or(usize::MAX);
    fsutil::read_file_limited(path, limit).map_err(|e| match e {
        ReadLimitedError::Io(e) => PassphraseError::Read { path: path.to_owned(), source: e.source },
        ReadLimitedError::TooLarge { .. } => PassphraseError::TooLarge { path: path.to_owned() },
    })
}

/// Receives the unsealed plaintext into a fixed, zeroized buffer; refuses anything longer
/// than a passphrase (it never grows, so no copy is left behind by a reallocation).
struct SecretSink {
    buf: Zeroizing<[u8; PLAINTEXT_LEN + 1]>,
    len: usize,
}

impl SecretSink {
    fn new() -> Self {
        Self { buf: Zeroizing::new([0u8; PLAINTEXT_LEN + 1]), len: 0 }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for SecretSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let end = self.len.checked_add(data.len()).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                self.buf[self.len..end].copy_from_slice(data);
                self.len = end;
                Ok(data.len())
            }
            None => Err(io::Error::other("the plaintext is longer than a passphrase")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `bytes` to the new file `path`: a temporary file beside it, mode 0600, synced,
/// then linked into place without ever replacing an existing file; then the directory is
/// synced.
fn write_new_file(path: &Path, bytes: &[u8]) -> Result<(), PassphraseError> {
    let dir = parent_dir(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match fsutil::write_new_file_atomically(dir, path, &format!(".{name}."), ".partial", bytes, 0o600) {
        Ok(()) => {}
        Err(WriteNewError::Exists) => return Err(PassphraseError::Exists { path: path.to_owned() }),
        Err(WriteNewError::Io(e)) => return Err(PassphraseError::Write { path: path.to_owned(), source: e.source }),
    }
    let _ = fsutil::sync_dir(dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn generated_passphrase_is_one_base64_line_of_32_bytes() {
        let a = Passphrase::generate().unwrap();
        let b = Passphrase::generate().unwrap();
        assert_eq!(a.expose().len(), LINE_LEN);
        assert_eq!(a.expose_line().len(), PLAINTEXT_LEN);
        assert!(a.expose_line().ends_with(b"\n"));
        assert_eq!(STANDARD.decode(a.expose()).unwrap().len(), SECRET_BYTES);
        assert_ne!(a.expose(), b.expose());
        assert!(Passphrase::parse(a.expose_line()).is_some());
    }

    #[test]
    fn parse_refuses_anything_but_the_line() {
        let p = Passphrase::generate().unwrap();
        let line = p.expose_line().to_vec();
        assert!(Passphrase::parse(&line[..LINE_LEN]).is_none(), "no newline");
        let mut long = line.clone();
        long.push(b'\n');
        assert!(Passphrase::parse(&long).is_none());
        let mut bad = line.clone();
        bad[3] = b'!';
        assert!(Passphrase::parse(&bad).is_none());
        assert!(Passphrase::parse(b"").is_none());
        // 33 bytes of base64 text that decode to 33 bytes: not a passphrase.
        let mut other = STANDARD.encode([7u8; 33]).into_bytes();
        other.push(b'\n');
        assert!(Passphrase::parse(&other).is_none());
    }

    #[test]
    fn names_and_backup_ids() {
        assert_eq!(backup_id("restic-ehr").unwrap(), "passphrase/restic-ehr");
        assert_eq!(backup_id("site1/borg.ehr_2").unwrap(), "passphrase/site1/borg.ehr_2");
        for bad in ["", "a b", "x\ny", "ä", &"n".repeat(201)] {
            assert!(backup_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sink_refuses_long_plaintext() {
        let mut s = SecretSink::new();
        s.write_all(&[b'a'; PLAINTEXT_LEN]).unwrap();
        s.write_all(b"b").unwrap();
        assert!(s.write_all(b"c").is_err());
    }

    #[test]
    fn new_file_is_private_and_never_written_over() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k.age");
        write_new_file(&f, b"one").unwrap();
        assert_eq!(fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(write_new_file(&f, b"two"), Err(PassphraseError::Exists { .. })));
        assert!(matches!(check_new_key_file(&f), Err(PassphraseError::Exists { .. })));
        assert_eq!(fs::read(&f).unwrap(), b"one");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "temp file left behind");
        assert!(matches!(
            check_new_key_file(&dir.path().join("missing/k.age")),
            Err(PassphraseError::Directory { .. })
        ));
    }
}
