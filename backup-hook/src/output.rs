//! Output that is all or nothing: a file output is written to a temporary file
//! beside the target and renamed over it only when the whole stream succeeded.
//!
//! The temporary file is made by `tempfile`: a random name, opened with
//! `O_CREAT | O_EXCL` (create-new, which never follows a symbolic link: a link planted at
//! the name makes it pick another name), mode 0600.
//!
//! An existing entry at the target (a file, or a symbolic link, dangling or not) is never
//! replaced unless the caller asked to ([`Overwrite::Replace`], `--force`): the output is
//! refused before anything is read or asked of the server, and the final rename itself is
//! `renameat2(RENAME_NOREPLACE)` (or, where the file system lacks it, a hard link of the
//! temporary file then its unlink), which fails if an entry appeared at the target in the
//! meantime: no window between the check and the rename. With `--force` the rename
//! replaces whatever entry is at the target, a symbolic link included, and never writes
//! through it.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use kluis_age::sealed::IO_BUF;

/// Where results go: stdout, a regular file replaced atomically on
/// [`Output::commit`], or a special file (`/dev/null`, a FIFO) written directly.
pub enum Output {
    /// Standard output written directly (see [`kluis_age::stream::stdio`]), a pipe grown to 1 MiB.
    Stdout(BufWriter<File>),
    File { tmp: BufWriter<tempfile::NamedTempFile>, dest: PathBuf, overwrite: Overwrite },
    Special { file: BufWriter<File>, dest: PathBuf },
}

/// Errors finishing a file output.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot create a temporary file next to {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot finish writing {path}: {source}")]
    Finish { path: PathBuf, source: io::Error },
    /// The target exists and replacing it was not asked for.
    #[error("{path} already exists; it was not replaced (pass --force to replace it)")]
    Exists { path: PathBuf },
}

/// Whether an existing file at the target may be replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overwrite {
    /// Refuse (the default): an existing sealed backup or restored file is never silently replaced.
    Refuse,
    /// `--force`: replace it atomically.
    Replace,
}

impl Output {
    /// `None` or `-` is stdout. With [`Overwrite::Refuse`], an existing entry at `path`
    /// (other than a device or FIFO, which is written, never replaced) is refused here,
    /// and again, atomically, by the rename in [`Output::commit`].
    pub fn create(path: Option<&Path>, overwrite: Overwrite) -> Result<Self, OutputError> {
        match path {
            None => Self::stdout(),
            Some(p) if p == Path::new("-") => Self::stdout(),
            Some(p) if std::fs::metadata(p).map(|m| !m.is_file() && !m.is_dir()).unwrap_or(false) => {
                // A device or FIFO cannot be replaced by a rename (and must never be).
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map_err(|e| OutputError::Create { path: p.to_owned(), source: e })?;
                Ok(Output::Special { file: BufWriter::with_capacity(IO_BUF, file), dest: p.to_owned() })
            }
            Some(p) if overwrite == Overwrite::Refuse && std::fs::symlink_metadata(p).is_ok() => {
                Err(OutputError::Exists { path: p.to_owned() })
            }
            Some(p) => {
                let dir = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let tmp = tempfile::Builder::new()
                    .prefix(&format!(".{name}."))
                    .suffix(".partial")
                    .tempfile_in(dir)
                    .map_err(|e| OutputError::Create { path: p.to_owned(), source: e })?;
                Ok(Output::File { tmp: BufWriter::with_capacity(IO_BUF, tmp), dest: p.to_owned(), overwrite })
            }
        }
    }

    fn stdout() -> Result<Self, OutputError> {
        let file = kluis_age::stream::stdout_writer().map_err(|e| OutputError::Create { path: PathBuf::from("<stdout>"), source: e })?;
        Ok(Output::Stdout(BufWriter::with_capacity(IO_BUF, file)))
    }

    /// Makes the output final: flush (and for a file: fsync, rename, fsync the directory).
    pub fn commit(self) -> Result<(), OutputError> {
        match self {
            Output::Stdout(mut w) => w.flush().map_err(|e| OutputError::Finish { path: PathBuf::from("<stdout>"), source: e }),
            Output::Special { mut file, dest } => file.flush().map_err(|e| OutputError::Finish { path: dest, source: e }),
            Output::File { tmp, dest, overwrite } => {
                let fin = |e| OutputError::Finish { path: dest.clone(), source: e };
                let tmp = tmp.into_inner().map_err(|e| fin(e.into_error()))?;
                tmp.as_file().sync_all().map_err(fin)?;
                match overwrite {
                    Overwrite::Replace => tmp.persist(&dest).map(drop),
                    // RENAME_NOREPLACE (or link + unlink): fails with EEXIST if an entry
                    // appeared at `dest` since `create`; the temporary file is then removed.
                    Overwrite::Refuse => tmp.persist_noclobber(&dest).map(drop),
                }
                .map_err(|e| match e.error.kind() {
                    io::ErrorKind::AlreadyExists => OutputError::Exists { path: dest.clone() },
                    _ => fin(e.error),
                })?;
                let dir = dest.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
                Ok(())
            }
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::Stdout(w) => w.write(buf),
            Output::File { tmp, .. } => tmp.write(buf),
            Output::Special { file, .. } => file.write(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Output::Stdout(w) => w.write_all(buf),
            Output::File { tmp, .. } => tmp.write_all(buf),
            Output::Special { file, .. } => file.write_all(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Stdout(w) => w.flush(),
            Output::File { tmp, .. } => tmp.flush(),
            Output::Special { file, .. } => file.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_output_appears_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        let mut o = Output::create(Some(&dest), Overwrite::Refuse).unwrap();
        o.write_all(b"hello").unwrap();
        assert!(!dest.exists());
        drop(o);
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temp file left behind");
        let mut o = Output::create(Some(&dest), Overwrite::Refuse).unwrap();
        o.write_all(b"hello").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let victim = elsewhere.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dest = dir.path().join("out.bin");
        std::os::unix::fs::symlink(&victim, &dest).unwrap();
        // Not replaced without --force, not even a link.
        assert!(matches!(Output::create(Some(&dest), Overwrite::Refuse), Err(OutputError::Exists { .. })));
        let mut o = Output::create(Some(&dest), Overwrite::Replace).unwrap();
        assert!(matches!(o, Output::File { .. }));
        o.write_all(b"hello").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&dest).unwrap().file_type().is_file());
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        // A dangling link: nothing is created where it points.
        let dangling = elsewhere.path().join("created-through-the-link");
        let dest2 = dir.path().join("out2.bin");
        std::os::unix::fs::symlink(&dangling, &dest2).unwrap();
        assert!(matches!(Output::create(Some(&dest2), Overwrite::Refuse), Err(OutputError::Exists { .. })));
        let mut o = Output::create(Some(&dest2), Overwrite::Replace).unwrap();
        o.write_all(b"x").unwrap();
        o.commit().unwrap();
        assert!(std::fs::symlink_metadata(&dangling).is_err());
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 1);
    }

    /// The refusal is atomic with the rename: a file that appears at the target after the
    /// check (here: between create and commit) is not replaced, and no temporary is left.
    #[test]
    fn a_file_that_appears_before_the_rename_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        let mut o = Output::create(Some(&dest), Overwrite::Refuse).unwrap();
        o.write_all(b"new").unwrap();
        std::fs::write(&dest, b"precious").unwrap();
        assert!(matches!(o.commit(), Err(OutputError::Exists { .. })));
        assert_eq!(std::fs::read(&dest).unwrap(), b"precious");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temp file left behind");
        // With --force the same race ends with the new content.
        let mut o = Output::create(Some(&dest), Overwrite::Replace).unwrap();
        o.write_all(b"new").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn dev_null_is_written_not_replaced() {
        let mut o = Output::create(Some(Path::new("/dev/null")), Overwrite::Refuse).unwrap();
        assert!(matches!(o, Output::Special { .. }));
        o.write_all(b"discarded").unwrap();
        o.commit().unwrap();
        let meta = std::fs::metadata("/dev/null").unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type()), "/dev/null must stay a device");
    }
}
