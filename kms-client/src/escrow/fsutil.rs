//! Small file helpers: atomic create-only writes, directory sync, bounded reads.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::error::EscrowError;

/// Writes `bytes` to `dir/name` atomically: a temporary file in the same directory is
/// written, synced, given `mode` (Unix) and renamed into place without ever replacing an
/// existing file. `exists` builds the error for an existing target.
pub(crate) fn write_new_file_atomically(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    mode: u32,
    exists: impl FnOnce(PathBuf) -> EscrowError,
) -> Result<PathBuf, EscrowError> {
    let target = dir.join(name);
    let mut tmp = tempfile::Builder::new()
        .prefix(".kluis-escrow-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| EscrowError::io("create a temporary file in", dir, e))?;
    tmp.write_all(bytes)
        .map_err(|e| EscrowError::io("write", tmp.path(), e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| EscrowError::io("set permissions of", tmp.path(), e))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    tmp.as_file()
        .sync_all()
        .map_err(|e| EscrowError::io("sync", tmp.path(), e))?;
    match tmp.persist_noclobber(&target) {
        Ok(_) => Ok(target),
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Err(exists(target)),
        Err(e) => Err(EscrowError::io(
            "rename a temporary file to",
            target,
            e.error,
        )),
    }
}

/// Makes the directory entries (creations, renames) in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), EscrowError> {
    #[cfg(unix)]
    {
        let d = fs::File::open(dir).map_err(|e| EscrowError::io("open directory", dir, e))?;
        match d.sync_all() {
            Ok(()) => Ok(()),
            // Some file systems cannot sync a directory; nothing more can be done there.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(EscrowError::io("sync directory", dir, e)),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// The directory a file is in ("." for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Reads at most `limit` bytes from `reader`; `FileTooLarge` naming `path` beyond that.
/// The buffer is allocated once (it never grows, which would leave copies behind) and is
/// zeroized when dropped: a file may be a decrypted share.
pub(crate) fn read_limited(
    reader: impl Read,
    path: &Path,
    limit: usize,
) -> Result<Zeroizing<Vec<u8>>, EscrowError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(limit.saturating_add(2)));
    let take = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(take)
        .read_to_end(&mut buf)
        .map_err(|e| EscrowError::io("read", path, e))?;
    if buf.len() > limit {
        return Err(EscrowError::FileTooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(buf)
}

/// Opens and reads a file of at most `limit` bytes.
pub(crate) fn read_file_limited(
    path: &Path,
    limit: usize,
) -> Result<Zeroizing<Vec<u8>>, EscrowError> {
    let file = fs::File::open(path).map_err(|e| EscrowError::io("open", path, e))?;
    read_limited(file, path, limit)
}
