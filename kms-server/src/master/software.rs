//! Software master key: a 256-bit key in a file created by `kms-server init`,
//! refused at start if group- or world-readable, optionally passphrase-protected
//! with the age scrypt passphrase format.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use ring::rand::SystemRandom;
use zeroize::Zeroizing;

use super::{MasterError, MasterKeyProvider};
use crate::secret::{Key256, aes_gcm_open, aes_gcm_seal};

const HEADER: &str = "kluis-master-key-v1";
const AGE_MAGIC: &[u8] = b"age-encryption.org/v1";
/// Largest scrypt work factor (log2 N) accepted for a passphrase-protected key file (age's
/// own encryptor picks about 18 here).
const MAX_SCRYPT_WORK_FACTOR: u8 = 22;

/// The software master-key provider.
pub struct SoftwareMasterKey {
    key: Key256,
    /// The file this key lives in (the configured file, or a `.g<N>` sibling of it).
    path: PathBuf,
    /// The configured key file (generation 1): generations are always named after it.
    base: PathBuf,
    /// The configured passphrase source, used for every generation.
    passphrase: PassphraseSource,
    rng: SystemRandom,
}

/// The key file of `generation` of the configured key file `base`: `base` itself for generation
/// 1, the sibling `<base>.g<N>` (same directory) for N > 1.
pub fn generation_path(base: &Path, generation: u32) -> Result<PathBuf, MasterError> {
    match generation {
        0 => Err(MasterError::InvalidGeneration { generation }),
        1 => Ok(base.to_owned()),
        g => {
            let mut name = base.as_os_str().to_owned();
            name.push(format!(".g{g}"));
            Ok(PathBuf::from(name))
        }
    }
}

/// Writes `contents` to a new file `path` (mode 0600) atomically and never over an existing file:
/// a temp file in the same directory is written and fsynced, then hard-linked to `path` (which
/// fails if `path` exists, unlike rename), then removed; finally the directory is fsynced. After a
/// crash `path` is either absent or complete; at worst a `.<name>.tmp-*` file is left behind.
fn write_new_file_atomically(path: &Path, contents: &[u8], rng: &SystemRandom) -> Result<(), MasterError> {
    let wr = |e| MasterError::WriteKeyFile { path: path.to_owned(), source: e };
    let exists = || MasterError::KeyFileExists { path: path.to_owned() };
    // Refuse early (also for a dangling symlink) so a refusal leaves no temp file behind.
    if path.symlink_metadata().is_ok() {
        return Err(exists());
    }
    let name = path
        .file_name()
        .ok_or_else(|| wr(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the key file path has no file name")))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut suffix = [0u8; 8];
    ring::rand::SecureRandom::fill(rng, &mut suffix).map_err(|_| MasterError::Rng)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", hex::encode(suffix)));
    let tmp = dir.join(tmp_name);

    let written = write_and_link(&tmp, path, contents);
    // The temp name goes in every case (after a successful link `path` keeps the inode).
    let removed = std::fs::remove_file(&tmp);
    written?;
    removed.map_err(wr)?;
    std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(wr)?;
    Ok(())
}

/// Writes and fsyncs the new file `tmp` (mode 0600), then links it as `path` unless that exists.
fn write_and_link(tmp: &Path, path: &Path, contents: &[u8]) -> Result<(), MasterError> {
    let wr = |e| MasterError::WriteKeyFile { path: path.to_owned(), source: e };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(tmp).map_err(wr)?;
    f.write_all(contents).map_err(wr)?;
    f.sync_all().map_err(wr)?;
    drop(f);
    std::fs::hard_link(tmp, path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            MasterError::KeyFileExists { path: path.to_owned() }
        } else {
            wr(e)
        }
    })
}

/// Where the passphrase of a protected key file comes from.
#[derive(Clone)]
pub enum PassphraseSource {
    None,
    File(PathBuf),
    Env(String),
}

impl PassphraseSource {
    fn read(&self) -> Result<Option<Zeroizing<String>>, MasterError> {
        match self {
            PassphraseSource::None => Ok(None),
            PassphraseSource::File(p) => {
                let s = Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
                    MasterError::PassphraseSource { source_name: p.display().to_string(), reason: e }
                })?);
                Ok(Some(Zeroizing::new(s.trim_end_matches(['\r', '\n']).to_owned())))
            }
            PassphraseSource::Env(var) => match std::env::var(var) {
                Ok(v) => Ok(Some(Zeroizing::new(v))),
                Err(_) => Err(MasterError::PassphraseSource {
                    source_name: format!("environment variable {var}"),
                    reason: std::io::Error::new(std::io::ErrorKind::NotFound, "not set"),
                }),
            },
        }
    }
}

/// Refuses a key file that group or others can read or write.
pub fn check_key_file_permissions(path: &Path) -> Result<(), MasterError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| MasterError::ReadKeyFile { path: path.to_owned(), source: e })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(MasterError::KeyFilePermissions { path: path.to_owned(), mode });
    }
    Ok(())
}

impl SoftwareMasterKey {
    /// Creates a new key file (mode 0600, written atomically, never overwriting) and returns the
    /// provider.
    pub fn create(path: &Path, passphrase: &PassphraseSource) -> Result<Self, MasterError> {
        Self::create_at(path, path, passphrase)
    }

    /// Opens an existing key file after checking its permissions.
    pub fn open(path: &Path, passphrase: &PassphraseSource) -> Result<Self, MasterError> {
        Self::open_at(path, path, passphrase)
    }

    /// Opens generation `generation` of the configured key file `base` without reading
    /// `base` itself (after a rotation the configured file may be gone).
    pub fn open_generation(base: &Path, generation: u32, passphrase: &PassphraseSource) -> Result<Self, MasterError> {
        Self::open_at(&generation_path(base, generation)?, base, passphrase)
    }

    /// Creates the key file `path`, a generation of the configured key file `base`.
    fn create_at(path: &Path, base: &Path, passphrase: &PassphraseSource) -> Result<Self, MasterError> {
        if path.symlink_metadata().is_ok() {
            // Before asking for a passphrase or spending scrypt time on a refusal.
            return Err(MasterError::KeyFileExists { path: path.to_owned() });
        }
        let rng = SystemRandom::new();
        let key = Key256::generate(&rng).map_err(|_| MasterError::Rng)?;
        let text = Zeroizing::new(format!(
            "{HEADER}\n{}\n",
            base64::engine::general_purpose::STANDARD.encode(key.expose())
        ));
        let contents: Zeroizing<Vec<u8>> = match passphrase.read()? {
            None => Zeroizing::new(text.as_bytes().to_vec()),
            Some(pass) => {
                let enc = age::Encryptor::with_user_passphrase(age::secrecy::SecretString::from(
                    pass.as_str().to_owned(),
                ));
                let mut out = Vec::new();
                let wr = |e| MasterError::WriteKeyFile { path: path.to_owned(), source: e };
                let mut w = enc.wrap_output(&mut out).map_err(wr)?;
                w.write_all(text.as_bytes()).map_err(wr)?;
                w.finish().map_err(wr)?;
                Zeroizing::new(out)
            }
        };
        write_new_file_atomically(path, &contents, &rng)?;
        Ok(Self { key, path: path.to_owned(), base: base.to_owned(), passphrase: passphrase.clone(), rng })
    }

    /// Opens the existing key file `path`, a generation of the configured key file `base`.
    fn open_at(path: &Path, base: &Path, passphrase: &PassphraseSource) -> Result<Self, MasterError> {
        check_key_file_permissions(path)?;
        let raw = Zeroizing::new(
            std::fs::read(path).map_err(|e| MasterError::ReadKeyFile { path: path.to_owned(), source: e })?,
        );
        let text: Zeroizing<Vec<u8>> = if raw.starts_with(AGE_MAGIC) {
            let pass = passphrase
                .read()?
                .ok_or_else(|| MasterError::PassphraseMissing { path: path.to_owned() })?;
            let mut identity = age::scrypt::Identity::new(age::secrecy::SecretString::from(pass.as_str().to_owned()));
            // age derives its default limit from a timing of this machine, so a busy machine
            // refused its own key file; a fixed bound keeps the start independent of load.
            identity.set_max_work_factor(MAX_SCRYPT_WORK_FACTOR);
            let dec = age::Decryptor::new(raw.as_slice())
                .map_err(|_| MasterError::KeyFileFormat { path: path.to_owned(), reason: "corrupt age header" })?;
            let mut r = dec
                .decrypt(std::iter::once(&identity as &dyn age::Identity))
                .map_err(|_| MasterError::PassphraseWrong { path: path.to_owned() })?;
            let mut out = Zeroizing::new(Vec::new());
            r.read_to_end(&mut out)
                .map_err(|e| MasterError::ReadKeyFile { path: path.to_owned(), source: e })?;
            out
        } else {
            Zeroizing::new(raw.to_vec())
        };
        let s = std::str::from_utf8(&text)
            .map_err(|_| MasterError::KeyFileFormat { path: path.to_owned(), reason: "not UTF-8" })?;
        let mut lines = s.lines();
        if lines.next() != Some(HEADER) {
            return Err(MasterError::KeyFileFormat { path: path.to_owned(), reason: "missing kluis-master-key-v1 header" });
        }
        let b64 = lines
            .next()
            .ok_or(MasterError::KeyFileFormat { path: path.to_owned(), reason: "missing key line" })?;
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| MasterError::KeyFileFormat { path: path.to_owned(), reason: "key line is not base64" })?,
        );
        let key = Key256::from_slice(&bytes)
            .ok_or(MasterError::KeyFileFormat { path: path.to_owned(), reason: "key is not 32 bytes" })?;
        Ok(Self {
            key,
            path: path.to_owned(),
            base: base.to_owned(),
            passphrase: passphrase.clone(),
            rng: SystemRandom::new(),
        })
    }
}

impl MasterKeyProvider for SoftwareMasterKey {
    fn describe(&self) -> String {
        format!("software master key {}", self.path.display())
    }

    fn wrap(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, MasterError> {
        aes_gcm_seal(&self.key, &self.rng, aad, plaintext).map_err(|_| MasterError::Rng)
    }

    fn unwrap(&self, aad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, MasterError> {
        aes_gcm_open(&self.key, aad, blob).map_err(|_| MasterError::UnwrapFailed)
    }

    fn health(&self) -> Result<(), MasterError> {
        Ok(())
    }

    fn generation(&self, generation: u32, create: bool) -> Result<Arc<dyn MasterKeyProvider>, MasterError> {
        let path = generation_path(&self.base, generation)?;
        let key = if create {
            Self::create_at(&path, &self.base, &self.passphrase)?
        } else {
            Self::open_at(&path, &self.base, &self.passphrase)?
        };
        Ok(Arc::new(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_and_permission_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        let mk = SoftwareMasterKey::create(&p, &PassphraseSource::None).unwrap();
        let blob = mk.wrap(b"a", b"hello").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let mk2 = SoftwareMasterKey::open(&p, &PassphraseSource::None).unwrap();
        assert_eq!(mk2.unwrap(b"a", &blob).unwrap().as_slice(), b"hello");
        assert!(matches!(
            SoftwareMasterKey::create(&p, &PassphraseSource::None),
            Err(MasterError::KeyFileExists { .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = SoftwareMasterKey::open(&p, &PassphraseSource::None).err().unwrap();
        assert!(matches!(err, MasterError::KeyFilePermissions { mode: 0o640, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn passphrase_protected_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        let pf = dir.path().join("pass");
        std::fs::write(&pf, "correct horse\n").unwrap();
        let mk = SoftwareMasterKey::create(&p, &PassphraseSource::File(pf.clone())).unwrap();
        let blob = mk.wrap(b"", b"x").unwrap();
        assert!(std::fs::read(&p).unwrap().starts_with(AGE_MAGIC));
        let mk2 = SoftwareMasterKey::open(&p, &PassphraseSource::File(pf.clone())).unwrap();
        assert_eq!(mk2.unwrap(b"", &blob).unwrap().as_slice(), b"x");
        assert!(matches!(
            SoftwareMasterKey::open(&p, &PassphraseSource::None),
            Err(MasterError::PassphraseMissing { .. })
        ));
        std::fs::write(&pf, "wrong\n").unwrap();
        assert!(matches!(
            SoftwareMasterKey::open(&p, &PassphraseSource::File(pf)),
            Err(MasterError::PassphraseWrong { .. })
        ));
    }

    #[test]
    fn garbage_key_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        std::fs::write(&p, "hello\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = SoftwareMasterKey::open(&p, &PassphraseSource::None).err().unwrap();
        assert!(matches!(err, MasterError::KeyFileFormat { .. }), "{err}");
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn generation_paths() {
        let base = Path::new("/etc/kluis/master.key");
        assert_eq!(generation_path(base, 1).unwrap(), base);
        assert_eq!(generation_path(base, 2).unwrap(), Path::new("/etc/kluis/master.key.g2"));
        assert_eq!(generation_path(base, 13).unwrap(), Path::new("/etc/kluis/master.key.g13"));
        assert!(matches!(generation_path(base, 0), Err(MasterError::InvalidGeneration { generation: 0 })));
    }

    #[test]
    fn generation_two_is_a_new_sibling_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        let g1 = SoftwareMasterKey::create(&p, &PassphraseSource::None).unwrap();
        let blob1 = g1.wrap(b"aad", b"keyring key").unwrap();

        let g2 = g1.generation(2, true).unwrap();
        let p2 = dir.path().join("master.key.g2");
        assert!(p2.exists());
        assert_eq!(mode(&p2), 0o600);
        assert_eq!(g2.describe(), format!("software master key {}", p2.display()));
        // Only the two key files: no temp file left behind.
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["master.key", "master.key.g2"]);

        // A different key than generation 1.
        let blob2 = g2.wrap(b"aad", b"keyring key").unwrap();
        assert!(matches!(g2.unwrap(b"aad", &blob1), Err(MasterError::UnwrapFailed)));
        assert!(matches!(g1.unwrap(b"aad", &blob2), Err(MasterError::UnwrapFailed)));

        // Refuses to overwrite, from the base provider and from generation 2 itself; the file is unchanged.
        let before = std::fs::read(&p2).unwrap();
        assert!(matches!(g1.generation(2, true), Err(MasterError::KeyFileExists { path }) if path == p2));
        assert!(matches!(g2.generation(2, true), Err(MasterError::KeyFileExists { .. })));
        assert!(matches!(g2.generation(1, true), Err(MasterError::KeyFileExists { path }) if path == p));
        assert_eq!(std::fs::read(&p2).unwrap(), before);

        // Opens again (also reopened as a plain key file), from either generation.
        let again = g1.generation(2, false).unwrap();
        assert_eq!(again.unwrap(b"aad", &blob2).unwrap().as_slice(), b"keyring key");
        let plain = SoftwareMasterKey::open(&p2, &PassphraseSource::None).unwrap();
        assert_eq!(plain.unwrap(b"aad", &blob2).unwrap().as_slice(), b"keyring key");

        // Generations stay relative to the configured file, not master.key.g2.g3.
        let g3 = g2.generation(3, true).unwrap();
        assert!(dir.path().join("master.key.g3").exists());
        assert!(!dir.path().join("master.key.g2.g3").exists());
        assert_eq!(g3.generation(1, false).unwrap().unwrap(b"aad", &blob1).unwrap().as_slice(), b"keyring key");
        assert_eq!(g3.generation(2, false).unwrap().unwrap(b"aad", &blob2).unwrap().as_slice(), b"keyring key");

        // Missing generation: a read error naming the file; generation 0 is refused.
        match g1.generation(4, false) {
            Err(MasterError::ReadKeyFile { path, source }) => {
                assert_eq!(path, dir.path().join("master.key.g4"));
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{:?}", other.err()),
        }
        assert!(matches!(g1.generation(0, true), Err(MasterError::InvalidGeneration { generation: 0 })));

        // An unsafe sibling is refused like the configured file.
        std::fs::set_permissions(&p2, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(g1.generation(2, false), Err(MasterError::KeyFilePermissions { mode: 0o644, .. })));
    }

    #[test]
    fn passphrase_protected_base_yields_protected_generation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        let pf = dir.path().join("pass");
        std::fs::write(&pf, "correct horse\n").unwrap();
        let pass = PassphraseSource::File(pf.clone());
        let g1 = SoftwareMasterKey::create(&p, &pass).unwrap();
        let g2 = g1.generation(2, true).unwrap();
        let p2 = dir.path().join("master.key.g2");
        assert!(std::fs::read(&p2).unwrap().starts_with(AGE_MAGIC), "the sibling must be passphrase-protected");
        assert_eq!(mode(&p2), 0o600);
        let blob = g2.wrap(b"", b"x").unwrap();
        assert!(matches!(SoftwareMasterKey::open(&p2, &PassphraseSource::None), Err(MasterError::PassphraseMissing { .. })));
        let reopened = SoftwareMasterKey::open(&p2, &pass).unwrap();
        assert_eq!(reopened.unwrap(b"", &blob).unwrap().as_slice(), b"x");
        // The provider keeps the passphrase source: opening the generation again reads it again.
        std::fs::write(&pf, "wrong\n").unwrap();
        assert!(matches!(g1.generation(2, false), Err(MasterError::PassphraseWrong { .. })));
    }

    #[test]
    fn atomic_write_never_replaces_a_dangling_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        let g1 = SoftwareMasterKey::create(&p, &PassphraseSource::None).unwrap();
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, dir.path().join("master.key.g2")).unwrap();
        assert!(matches!(g1.generation(2, true), Err(MasterError::KeyFileExists { .. })));
        assert!(!target.exists());
    }
}
