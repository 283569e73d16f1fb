//! Standard input and output for the streams, read and written directly.
//!
//! `io::stdin().lock()` reads through an 8 KiB buffer and `io::stdout()` writes
//! through a line buffer that looks for newlines in every write; and a pipe holds
//! only 64 KiB by default, so a process in a pipe wakes up its neighbours every
//! 64 KiB. Here stdin and stdout are plain [`File`]s on duplicates of fd 0 and 1
//! (safe: `AsFd` + `try_clone_to_owned`), and a pipe on either side is grown to
//! [`PIPE_SIZE`] (or what `/proc/sys/fs/pipe-max-size` allows) with
//! `fcntl(F_SETPIPE_SZ)`, best effort: a pipe that cannot grow works as before.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;

/// Pipe capacity asked for on a stdin or stdout pipe: one batch of the pipeline.
pub const PIPE_SIZE: usize = 1 << 20;

/// Standard input as a [`File`] (a duplicate of fd 0); a pipe is grown to
/// [`PIPE_SIZE`] first. Reads go straight to the kernel, in the caller's sizes.
pub fn stdin_reader() -> io::Result<File> {
    let file = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    grow_pipe(&file);
    Ok(file)
}

/// Standard output as a [`File`] (a duplicate of fd 1); a pipe is grown to
/// [`PIPE_SIZE`] first. Writes go straight to the kernel, unbuffered: nothing
/// else may write to standard output through `io::stdout()` meanwhile.
pub fn stdout_writer() -> io::Result<File> {
    let file = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    grow_pipe(&file);
    Ok(file)
}

/// Grows `file` to [`PIPE_SIZE`] if it is a pipe (FIFO), within the system's
/// limit for unprivileged processes. Returns the capacity now, if it is a pipe.
pub fn grow_pipe(file: &File) -> Option<usize> {
    let is_pipe = file.metadata().map(|m| m.file_type().is_fifo()).unwrap_or(false);
    if !is_pipe {
        return None;
    }
    let current = rustix::pipe::fcntl_getpipe_size(file.as_fd()).ok()?;
    let want = PIPE_SIZE.min(pipe_max_size().unwrap_or(PIPE_SIZE));
    if current >= want {
        return Some(current);
    }
    // EPERM when the user's pipe quota (fs.pipe-user-pages-soft) is used up,
    // EBUSY when the pipe holds more than `want`: keep the pipe as it is.
    Some(rustix::pipe::fcntl_setpipe_size(file.as_fd(), want).unwrap_or(current))
}

fn pipe_max_size() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/fs/pipe-max-size").ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_pipe_grows_and_a_file_is_left_alone() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        let (mut r, mut w) = (File::from(r), File::from(w));
        let before = rustix::pipe::fcntl_getpipe_size(&r).unwrap();
        let after = grow_pipe(&w).unwrap();
        assert!(after >= before, "{after} < {before}");
        assert_eq!(rustix::pipe::fcntl_getpipe_size(&r).unwrap(), after);
        if pipe_max_size().is_some_and(|m| m >= PIPE_SIZE) && after < PIPE_SIZE {
            // Allowed to fail only for a user over the pipe quota.
            eprintln!("pipe not grown: {after} bytes");
        }
        w.write_all(b"through the pipe").unwrap();
        drop(w);
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "through the pipe");

        let f = tempfile::tempfile().unwrap();
        assert_eq!(grow_pipe(&f), None);
    }
}
