//! Software master key: a 256-bit key in a file created by `kms-server init`,
//! refused at start if group- or world-readable, optionally passphrase-protected
//! with the age scrypt passphrase format.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use ring::rand::SystemRandom;
use zeroize::Zeroizing;

use super::{MasterError, MasterKeyProvider};
use crate::secret::{Key256, aes_gcm_open, aes_gcm_seal};

const HEADER: &str = "kluis-master-key-v1";
const AGE_MAGIC: &[u8] = b"age-encryption.org/v1";

/// The software master-key provider.
pub struct SoftwareMasterKey {
    key: Key256,
    path: PathBuf,
    rng: SystemRandom,
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
    /// Creates a new key file (mode 0600, never overwriting) and returns the provider.
    pub fn create(path: &Path, passphrase: &PassphraseSource) -> Result<Self, MasterError> {
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
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    MasterError::KeyFileExists { path: path.to_owned() }
                } else {
                    MasterError::WriteKeyFile { path: path.to_owned(), source: e }
                }
            })?;
        let wr = |e| MasterError::WriteKeyFile { path: path.to_owned(), source: e };
        f.write_all(&contents).map_err(wr)?;
        f.sync_all().map_err(wr)?;
        Ok(Self { key, path: path.to_owned(), rng })
    }

    /// Opens an existing key file after checking its permissions.
    pub fn open(path: &Path, passphrase: &PassphraseSource) -> Result<Self, MasterError> {
        check_key_file_permissions(path)?;
        let raw = Zeroizing::new(
            std::fs::read(path).map_err(|e| MasterError::ReadKeyFile { path: path.to_owned(), source: e })?,
        );
        let text: Zeroizing<Vec<u8>> = if raw.starts_with(AGE_MAGIC) {
            let pass = passphrase
                .read()?
                .ok_or_else(|| MasterError::PassphraseMissing { path: path.to_owned() })?;
            let identity = age::scrypt::Identity::new(age::secrecy::SecretString::from(pass.as_str().to_owned()));
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
        Ok(Self { key, path: path.to_owned(), rng: SystemRandom::new() })
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
}
