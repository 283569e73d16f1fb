//! Small file helpers shared by the escrow (`kluis-escrow`) and the hook operations of
//! `kms-client` (passphrase, rewrap): atomic create-only writes, directory sync, bounded
//! reads. Not part of the format; here because both of those crates build on this one.
//!
//! Errors say which step failed on which path ([`FsError`]); each caller maps them
//! to its own error type and messages.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

const SYNC_DIRECTORY: &str = "sync directory";

/// A file operation that failed: what was being done (`"open"`, `"write"`, ...), on
/// which path, and the I/O error.
#[derive(Debug)]
pub struct FsError {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

impl FsError {
    fn new(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self { action, path: path.into(), source }
    }
}

/// Why [`write_new_file_atomically`] wrote nothing.
#[derive(Debug)]
pub enum WriteNewError {
    /// The target already exists; it was left as it is.
    Exists,
    Io(FsError),
}

impl From<FsError> for WriteNewError {
    fn from(e: FsError) -> Self {
        WriteNewError::Io(e)
    }
}

/// Why [`read_limited`] or [`read_file_limited`] returned nothing.
#[derive(Debug)]
pub enum ReadLimitedError {
    Io(FsError),
    /// More than `limit` bytes.
    TooLarge { path: PathBuf, limit: usize },
}

/// Writes `bytes` to the new file `target` atomically: a temporary file
/// (`tmp_prefix`..`tmp_suffix`) in `dir`, the directory of `target`, is given `mode`,
/// written, synced and renamed into place without ever replacing an existing file.
/// The directory itself is not synced.
pub fn write_new_file_atomically(
    dir: &Path,
    target: &Path,
    tmp_prefix: &str,
    tmp_suffix: &str,
    bytes: &[u8],
    mode: u32,
) -> Result<(), WriteNewError> {
    let mut tmp = tempfile::Builder::new()
        .prefix(tmp_prefix)
        .suffix(tmp_suffix)
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(|e| FsError::new("create a temporary file in", dir, e))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| FsError::new("set permissions of", tmp.path(), e))?;
    tmp.write_all(bytes).map_err(|e| FsError::new("write", tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| FsError::new("sync", tmp.path(), e))?;
    match tmp.persist_noclobber(target) {
        Ok(_) => Ok(()),
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Err(WriteNewError::Exists),
        Err(e) => Err(FsError::new("rename a temporary file to", target, e.error).into()),
    }
}

/// Writes `bytes` to `target` atomically, replacing a file that is there: a temporary
/// file (`tmp_prefix`..`tmp_suffix`) in `dir`, the directory of `target`, is given `mode`,
/// written, synced and renamed over `target`. The directory itself is not synced.
pub fn replace_file_atomically(
    dir: &Path,
    target: &Path,
    tmp_prefix: &str,
    tmp_suffix: &str,
    bytes: &[u8],
    mode: u32,
) -> Result<(), FsError> {
    let mut tmp = tempfile::Builder::new()
        .prefix(tmp_prefix)
        .suffix(tmp_suffix)
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(|e| FsError::new("create a temporary file in", dir, e))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| FsError::new("set permissions of", tmp.path(), e))?;
    tmp.write_all(bytes).map_err(|e| FsError::new("write", tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| FsError::new("sync", tmp.path(), e))?;
    tmp.persist(target).map_err(|e| FsError::new("rename a temporary file to", target, e.error))?;
    Ok(())
}

/// Makes the directory entries (creations, renames) in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    let d = fs::File::open(dir).map_err(|e| FsError::new("open directory", dir, e))?;
    d.sync_all().map_err(|e| FsError::new(SYNC_DIRECTORY, dir, e))
}

/// [`sync_dir`], except that a file system that cannot sync a directory is not an
/// error (nothing more can be done there).
pub fn sync_dir_if_supported(dir: &Path) -> Result<(), FsError> {
    match sync_dir(dir) {
        Err(e)
            if e.action == SYNC_DIRECTORY
                && matches!(e.source.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// The directory a file is in ("." for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Reads at most `limit` bytes from `reader` (`path` names it in errors).
/// The buffer is allocated once (it never grows, which would leave copies behind) and
/// is zeroized when dropped: a file may be a decrypted share.
pub fn read_limited(reader: impl Read, path: &Path, limit: usize) -> Result<Zeroizing<Vec<u8>>, ReadLimitedError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(limit.saturating_add(2)));
    let take = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(take)
        .read_to_end(&mut buf)
        .map_err(|e| ReadLimitedError::Io(FsError::new("read", path, e)))?;
    if buf.len() > limit {
        return Err(ReadLimitedError::TooLarge { path: path.to_owned(), limit });
    }
    Ok(buf)
}

/// Opens and reads a file of at most `limit` bytes.
pub fn read_file_limited(path: &Path, limit: usize) -> Result<Zeroizing<Vec<u8>>, ReadLimitedError> {
    let file = fs::File::open(path).map_err(|e| ReadLimitedError::Io(FsError::new("open", path, e)))?;
    read_limited(file, path, limit)
}
