//! Output that is all or nothing: a file output is written to a temporary file
//! beside the target and renamed over it only when the whole stream succeeded.
//!
//! The temporary file is made by `tempfile`: a random name, opened with
//! `O_CREAT | O_EXCL` (create-new, which never follows a symbolic link: a link planted at
//! the name makes it pick another name), mode 0600. The rename replaces whatever entry is
//! at the target, a symbolic link included, and never writes through it.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use kluis_age::sealed::IO_BUF;

/// Where results go: stdout, a regular file replaced atomically on
/// [`Output::commit`], or a special file (`/dev/null`, a FIFO) written directly.
pub enum Output {
    /// Standard output written directly (see [`kluis_age::stream::stdio`]), a pipe grown to 1 MiB.
    Stdout(BufWriter<File>),
    File { tmp: BufWriter<tempfile::NamedTempFile>, dest: PathBuf },
    Special { file: BufWriter<File>, dest: PathBuf },
}

/// Errors finishing a file output.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot create a temporary file next to {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot finish writing {path}: {source}")]
    Finish { path: PathBuf, source: io::Error },
}

impl Output {
    /// `None` or `-` is stdout.
    pub fn create(path: Option<&Path>) -> Result<Self, OutputError> {
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
                Ok(Output::File { tmp: BufWriter::with_capacity(IO_BUF, tmp), dest: p.to_owned() })
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
            Output::File { tmp, dest } => {
                let fin = |e| OutputError::Finish { path: dest.clone(), source: e };
                let tmp = tmp.into_inner().map_err(|e| fin(e.into_error()))?;
                tmp.as_file().sync_all().map_err(fin)?;
                tmp.persist(&dest).map_err(|e| fin(e.error))?;
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
        let mut o = Output::create(Some(&dest)).unwrap();
        o.write_all(b"hello").unwrap();
        assert!(!dest.exists());
        drop(o);
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temp file left behind");
        let mut o = Output::create(Some(&dest)).unwrap();
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
        let mut o = Output::create(Some(&dest)).unwrap();
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
        let mut o = Output::create(Some(&dest2)).unwrap();
        o.write_all(b"x").unwrap();
        o.commit().unwrap();
        assert!(std::fs::symlink_metadata(&dangling).is_err());
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 1);
    }

    #[test]
    fn dev_null_is_written_not_replaced() {
        let mut o = Output::create(Some(Path::new("/dev/null"))).unwrap();
        assert!(matches!(o, Output::Special { .. }));
        o.write_all(b"discarded").unwrap();
        o.commit().unwrap();
        let meta = std::fs::metadata("/dev/null").unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type()), "/dev/null must stay a device");
    }
}
