//! Header-only re-wrapping of sealed files under the keyring's newest version.
//!
//! After a keyring rotation, old backups still name the old keyring version in
//! their `kluis` stanza; before that version can be retired they must be moved
//! to the new one. The data key does not change (the server re-wraps the same
//! key, RPC `RewrapDataKey`), so the age file key and the payload do not change
//! either: only the wrapped-data-key part of the Kluis stanza, and the header
//! MAC, are rewritten. Every other stanza (the escrow `X25519` stanza, ...) is
//! kept byte for byte, and the payload (its nonce and chunks) is never read or
//! written.
//!
//! # Why this needs the restorer role
//!
//! The age header MAC is keyed from the file key
//! (`HKDF-SHA-256(file key, "", "header")`), and the file key is only reachable
//! through the data key. So a rewrap unwraps the data key (restorer role),
//! opens the file key from the stanza, checks the old header MAC (a tampered
//! header is refused and the file left alone), asks the server to re-wrap, checks
//! that the re-wrapped key opens the same file key (a second unwrap), and only
//! then writes the new header with a fresh MAC. A sealer-only identity is refused.
//!
//! # Cost and atomicity
//!
//! Reading: at most one read step of the header (16 KiB) plus, only when
//! recovering a journal, the payload nonce and first chunk (64 KiB). Writing: the
//! header. So the cost is independent of the payload size.
//!
//! A server-wrapped data key has a fixed length, so the new header normally has
//! exactly the old header's length and is written in place:
//!
//! 1. the new header is written to a journal `.<name>.kluis-rewrap` next to the
//!    file; the journal and the directory are fsynced;
//! 2. the new header is written at offset 0 of the file (`pwrite`), the file is
//!    fsynced;
//! 3. the journal is removed, the directory fsynced.
//!
//! A crash before step 2 leaves the old header, which is a valid sealed file
//! (the journal, complete or not, is ignored or completed by the next run). A
//! crash during step 2 may leave a mix of old and new header bytes, but the
//! journal is then complete and durable, and the next `rewrap` of the file
//! completes it: the journal is used only if it is a complete age header whose
//! Kluis stanza opens (at the server) a file key under which its MAC verifies
//! **and** under which the file's own payload (the nonce after the header and the
//! first chunk) authenticates, so a journal can never be applied to a file it was
//! not made for. A crash after step 2 leaves the new header (plus a journal that
//! the next run completes again, harmlessly). A journal that does not validate
//! was never applied (the file is only written once the journal is durable); it
//! is discarded when the file's own header verifies, and otherwise both are left
//! alone and the file is reported damaged. The file's inode, owner and mode stay.
//!
//! If the new header has another length (the new wrapped key is longer or shorter than
//! the old one; headers are parsed strictly, so the stanza's encoding is canonical), an in-place
//! write would shift the payload; then the file is copied into a temporary file
//! in the same directory with the new header, fsynced and renamed over the
//! original (atomic replace, but O(payload) and a new inode). The report says so.
//!
//! Concurrent rewraps of the same file are kept apart by an advisory lock. A
//! symlink given as the file is followed: the real file is rewritten, and its journal
//! lies next to it, in the real file's directory.
//!
//! # Files it creates
//!
//! The journal is created with `O_CREAT | O_EXCL | O_NOFOLLOW` (create-new, never through
//! a symbolic link) and mode 0600; it is read with `O_NOFOLLOW` and must be a regular
//! file. Something planted at the journal's name (a symbolic link, a FIFO, a directory)
//! makes the rewrap fail with [`RewrapError::JournalNotAFile`] before anything is
//! written, and nothing is created elsewhere. The copy of the copy path is a
//! `tempfile` (`O_EXCL`, a random name) in the same directory, renamed over the file.
//! The file itself is reopened for writing with `O_NOFOLLOW` and must be the very file
//! that was read and locked (same device and inode), or nothing is written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use age_core::format::{FileKey, Stanza};
use kluis_age::escrow_stanza::{EscrowStanzaError, X25519_TAG, escrow_stanza, has_escrow_stanza};
use kluis_age::fsutil::{self, parent_dir};
use kluis_age::sealed::{IO_BUF, KluisIdentity, KluisStanza, STANZA_TAG, UnsealError, header_read_error, parse_stanza};
use kluis_age::secret::DataKey;
use kluis_age::stream::{ENC_CHUNK_SIZE, NONCE_SIZE, PayloadKey, TAG_SIZE, header};
use kluis_proto::error::Reason;
use zeroize::Zeroizing;

use crate::client::{ClientError, Rewrapped, UnwrappedKey};
use crate::hook::Hook;

const JOURNAL_SUFFIX: &str = ".kluis-rewrap";

/// What a rewrap needs from the server. [`Hook`] is the real one.
pub trait KeyService {
    /// Unwraps the data key of a Kluis stanza (restorer role).
    fn unwrap(&self, st: &KluisStanza) -> Result<UnwrappedKey, ClientError>;
    /// Re-wraps the same data key under the keyring's current version (restorer role);
    /// the answer also names the escrow recovery recipient in force.
    fn rewrap(&self, st: &KluisStanza) -> Result<Rewrapped, ClientError>;
    /// Reports that the file of this Kluis stanza now durably carries a stanza to
    /// `recipient` (restorer role); true if the registry did not count the key as
    /// escrowed before.
    fn mark_escrowed(&self, st: &KluisStanza, recipient: &str) -> Result<bool, ClientError>;
}

impl KeyService for Hook {
    fn unwrap(&self, st: &KluisStanza) -> Result<UnwrappedKey, ClientError> {
        self.unwrap_data_key(st)
    }

    fn rewrap(&self, st: &KluisStanza) -> Result<Rewrapped, ClientError> {
        self.block_on(self.client().rewrap_data_key(&st.key_id, &st.keyring, &st.wrapped))
    }

    fn mark_escrowed(&self, st: &KluisStanza, recipient: &str) -> Result<bool, ClientError> {
        self.block_on(self.client().mark_data_key_escrowed(&st.key_id, &st.keyring, &st.wrapped, recipient))
    }
}

/// Why a file was not rewrapped. In every case the file was left as it was
/// (except [`RewrapError::Io`] while writing the header, whose message says that
/// the journal keeps the new header and the next run completes it).
#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    /// The file is not a sealed file, or its header is damaged or was altered.
    #[error("{0}; the file was not changed")]
    Integrity(#[source] UnsealError<ClientError>),
    /// The server refused to unwrap the data key for this identity.
    #[error(
        "the Kluis server refused to unwrap the data key (keyring {keyring}): {source}; rewrap needs the restorer role on the keyring, because the age header MAC is keyed from the file key, which only the data key opens; the file was not changed"
    )]
    NeedsRestorer {
        keyring: String,
        #[source]
        source: ClientError,
    },
    /// Any other server answer (unreachable, retired version, unknown key, ...).
    #[error("{source}{hint}; the file was not changed")]
    Server {
        #[source]
        source: ClientError,
        hint: &'static str,
    },
    /// The server's re-wrapped key does not open this file's key.
    #[error("the server's re-wrapped data key does not open this file's key ({0}); nothing was written")]
    ServerMismatch(&'static str),
    /// Another process is rewrapping the file.
    #[error("another process is rewrapping this file (it holds the file's lock); the file was not changed")]
    Busy,
    /// Something other than a regular file is at the journal's name (a symbolic link, a
    /// FIFO, a directory), or a journal appeared there while this run was working.
    #[error(
        "{journal} is {what}, not a rewrap journal this command made; it is never followed or written: remove it and run rewrap again; the file was not changed"
    )]
    JournalNotAFile { journal: PathBuf, what: &'static str },
    /// The file changed between reading its header and writing the new one.
    #[error("the file changed while it was being rewrapped; nothing was written, run rewrap again")]
    Changed,
    /// A leftover journal and the file's own header both fail to validate.
    #[error(
        "the file's header does not verify ({file}) and the rewrap journal {journal} next to it is not valid for this file ({why}); both were left as they are"
    )]
    BadJournal { file: Box<UnsealError<ClientError>>, journal: PathBuf, why: &'static str },
    /// The server named a recovery recipient no escrow stanza can be made for.
    #[error("{0}; the file was not changed")]
    BadRecoveryRecipient(#[source] EscrowStanzaError),
    /// The escrow stanza was added and is durable, but the server did not record it
    /// (unreachable, or the escrow was replaced in between).
    #[error(
        "the escrow stanza to {recipient} was added to the file and is durable, but the server did not record the key as escrowed: {source}; run rewrap again to report it (or to add a stanza to the recipient now in force)"
    )]
    NotRecorded {
        recipient: String,
        #[source]
        source: ClientError,
    },
    /// Reading or writing failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RewrapError {
    let what = what.into();
    move |source| RewrapError::Io { what, source }
}

/// What was done to the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do (the Kluis stanza already named the keyring's current version, and
    /// no escrow stanza was missing); nothing written.
    AlreadyCurrent,
    /// The header was rewritten in place (same length; journaled; O(header)).
    InPlace,
    /// The header length changed (an escrow stanza was added, or the wrapped key's
    /// length changed): the file was copied with the new header and renamed over the
    /// original (O(payload), new inode).
    Copied,
}

/// What happened about the escrow recovery stanza.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Escrow {
    /// No escrow recovery recipient is in force.
    NoneInForce,
    /// The file already carries a stanza to the recipient in force (from sealing, or
    /// added by an earlier rewrap); nothing written for escrow. `reported`: the
    /// registry did not count the key yet (a run interrupted after writing), so it
    /// was told now.
    Present { recipient: String, reported: bool },
    /// A stanza to `recipient` was added and the registry told. `kept`: X25519 stanzas
    /// that were there already (to an earlier recovery recipient), kept byte for byte.
    Added { recipient: String, kept: usize },
}

impl Escrow {
    /// The recipient in force, if any.
    pub fn recipient(&self) -> Option<&str> {
        match self {
            Escrow::NoneInForce => None,
            Escrow::Present { recipient, .. } | Escrow::Added { recipient, .. } => Some(recipient),
        }
    }
}

/// What happened to a rewrap journal found next to the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalNote {
    /// There was none.
    None,
    /// An interrupted rewrap was completed from it.
    Completed,
    /// It was not valid for this file (an interrupted run that had not yet written
    /// the file); it was removed.
    Discarded(&'static str),
}

/// The outcome of one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub keyring: String,
    pub key_id: String,
    /// The version the file's header named when this run read it.
    pub from_version: u32,
    /// The version it names now.
    pub to_version: u32,
    pub action: Action,
    pub journal: JournalNote,
    pub escrow: Escrow,
}

/// The journal path of `path`: `.<name>.kluis-rewrap` in the same directory.
pub fn journal_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let mut j = std::ffi::OsString::from(".");
    j.push(name);
    j.push(JOURNAL_SUFFIX);
    Some(path.with_file_name(j))
}

fn sync_dir(dir: &Path) -> Result<(), RewrapError> {
    fsutil::sync_dir(dir)
        .map_err(|e| RewrapError::Io { what: format!("syncing the directory {} failed", dir.display()), source: e.source })
}

/// A reader that keeps a copy of what it read (for the raw header bytes).
struct Recording<R> {
    inner: R,
    seen: Vec<u8>,
}

impl<R: Read> Read for Recording<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// As for unseal, except that a failed read is an I/O error here.
fn header_error(e: header::HeaderError) -> RewrapError {
    match e {
        header::HeaderError::Read(e) => RewrapError::Io { what: "reading the header failed".into(), source: e },
        e => RewrapError::Integrity(header_read_error(e)),
    }
}

/// A header as read from the file: its exact bytes, and where its stanzas are.
struct RawHeader {
    bytes: Vec<u8>,
    parsed: header::Header,
    /// Byte range of each stanza (its `-> ` line through its last body line).
    spans: Vec<Range<usize>>,
    /// End of the `---` that closes the MAC input.
    dashes_end: usize,
}

impl RawHeader {
    /// `bytes` and `parsed`, the result of `header::parse(&bytes)` (so the parser's
    /// stanza spans and MAC input are positions in `bytes`).
    fn from_parsed(bytes: Vec<u8>, parsed: header::Header) -> Self {
        let spans = parsed.stanza_spans().to_vec();
        let dashes_end = parsed.mac_input_len();
        Self { bytes, parsed, spans, dashes_end }
    }

    /// Reads the header at the start of `file` (one read step, never the payload).
    fn read(file: &File) -> Result<Self, RewrapError> {
        let mut rec = Recording { inner: file, seen: Vec::new() };
        let (parsed, past) = header::read(&mut rec).map_err(header_error)?;
        let mut bytes = rec.seen;
        bytes.truncate(bytes.len() - past.len());
        Ok(Self::from_parsed(bytes, parsed))
    }

    /// The first Kluis stanza: its index and contents.
    fn kluis(&self) -> Result<(usize, KluisStanza), RewrapError> {
        for (i, s) in self.parsed.stanzas.iter().enumerate() {
            if let Some(st) = parse_stanza(s).map_err(RewrapError::Integrity)? {
                return Ok((i, st));
            }
        }
        Err(RewrapError::Integrity(UnsealError::NoMatchingStanza))
    }
}

fn server_error(e: ClientError, keyring: &str) -> RewrapError {
    if e.code() == Some(tonic::Code::PermissionDenied) {
        return RewrapError::NeedsRestorer { keyring: keyring.to_owned(), source: e };
    }
    let hint = if e.reason() == Some(Reason::VersionRetired) {
        " (a file whose keyring version is retired can no longer be rewrapped; only the escrow recovery key opens it)"
    } else {
        ""
    };
    RewrapError::Server { source: e, hint }
}

/// Opens the file key of `stanza` with `dk`.
fn open_file_key(stanza: &Stanza, dk: &DataKey) -> Result<FileKey, UnsealError<ClientError>> {
    let ident = KluisIdentity::new(|_: &KluisStanza| {
        DataKey::from_slice(dk.expose()).ok_or(ClientError::BadResponse { what: "data key" })
    });
    match age::Identity::unwrap_stanza(&ident, stanza) {
        Some(Ok(fk)) => Ok(fk),
        Some(Err(_)) => Err(ident.take_failure().unwrap_or(UnsealError::FileKeyMismatch)),
        None => Err(UnsealError::NoMatchingStanza),
    }
}

/// What [`file_key_of`] found in a header.
struct Opened {
    file_key: FileKey,
    /// Index of the Kluis stanza among the header's stanzas.
    index: usize,
    stanza: KluisStanza,
    /// The keyring version the server unwrapped with.
    version: u32,
}

/// Unwraps at the server and opens the file key; verifies `hdr`'s MAC with it.
fn file_key_of(svc: &dyn KeyService, hdr: &RawHeader) -> Result<Opened, RewrapError> {
    let (index, stanza) = hdr.kluis()?;
    let uk = svc.unwrap(&stanza).map_err(|e| server_error(e, &stanza.keyring))?;
    let file_key = open_file_key(&hdr.parsed.stanzas[index], &uk.data_key).map_err(RewrapError::Integrity)?;
    hdr.parsed.verify_mac(&file_key).map_err(|_| RewrapError::Integrity(UnsealError::HeaderMac))?;
    Ok(Opened { file_key, index, stanza, version: uk.version })
}

/// The header with stanza `index` replaced by `stanza` (canonical encoding) and
/// a new MAC; every other byte up to `---` is kept. Checked to parse back and
/// verify under `fk`.
fn splice(hdr: &RawHeader, index: usize, stanza: &Stanza, fk: &FileKey) -> Result<RawHeader, RewrapError> {
    let span = hdr.spans.get(index).cloned().ok_or(RewrapError::ServerMismatch("the new stanza cannot be encoded"))?;
    let out = header::replace_stanza(&hdr.bytes, span, hdr.dashes_end, stanza, fk)
        .map_err(|_| RewrapError::ServerMismatch("the new stanza cannot be encoded"))?;
    // Cross-check with the header reader: it must parse back and verify.
    let back = header::parse(&out).map_err(|_| RewrapError::ServerMismatch("the new header does not parse"))?;
    back.verify_mac(fk).map_err(|_| RewrapError::ServerMismatch("the new header MAC does not verify"))?;
    Ok(RawHeader::from_parsed(out, back))
}

/// The header with the escrow stanza of `fk` to `recipient` added after its last
/// stanza, and a new MAC; every other byte up to `---` is kept. Checked to parse back,
/// verify under `fk` and hold the stanza.
fn append_escrow(hdr: &RawHeader, recipient: &str, fk: &FileKey) -> Result<RawHeader, RewrapError> {
    let stanza = escrow_stanza(fk, recipient).map_err(RewrapError::BadRecoveryRecipient)?;
    let out = header::append_stanza(&hdr.bytes, hdr.dashes_end, &stanza, fk)
        .map_err(|_| RewrapError::ServerMismatch("the escrow stanza cannot be encoded"))?;
    let back = header::parse(&out).map_err(|_| RewrapError::ServerMismatch("the header with the escrow stanza does not parse"))?;
    back.verify_mac(fk).map_err(|_| RewrapError::ServerMismatch("the header MAC does not verify"))?;
    if !has_escrow_stanza(&back.stanzas, fk, recipient).map_err(RewrapError::BadRecoveryRecipient)? {
        return Err(RewrapError::ServerMismatch("the escrow stanza did not survive encoding"));
    }
    Ok(RawHeader::from_parsed(out, back))
}

fn read_full_at(file: &File, buf: &mut [u8], mut offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// True when the payload that starts at `at` (its nonce, then its first chunk)
/// authenticates under `fk`: binds a header to this file's payload.
fn first_chunk_opens(file: &File, at: u64, fk: &FileKey) -> io::Result<bool> {
    let mut nonce = [0u8; NONCE_SIZE];
    if read_full_at(file, &mut nonce, at)? < NONCE_SIZE {
        return Ok(false);
    }
    let mut chunk = Zeroizing::new(vec![0u8; ENC_CHUNK_SIZE]);
    let n = read_full_at(file, &mut chunk, at + NONCE_SIZE as u64)?;
    if n < TAG_SIZE {
        return Ok(false);
    }
    let key = PayloadKey::derive(fk, &nonce);
    for last in [false, true] {
        let mut work = Zeroizing::new(chunk[..n].to_vec());
        if key.open_chunk(0, last, &mut work[..]).is_ok() {
            return Ok(true);
        }
    }
    Ok(false)
}

enum JournalCheck {
    /// Valid for this file: apply it.
    Valid,
    /// Not a header for this file; never applied.
    Invalid(&'static str),
}

/// Checks a journal against the file (see the module docs). Server errors abort.
fn check_journal(svc: &dyn KeyService, file: &File, journal: &[u8]) -> Result<JournalCheck, RewrapError> {
    let hdr = match header::read(&mut &journal[..]) {
        Ok((parsed, past)) if past.is_empty() => RawHeader::from_parsed(journal.to_vec(), parsed),
        _ => return Ok(JournalCheck::Invalid("not a complete age header")),
    };
    let fk = match file_key_of(svc, &hdr) {
        Ok(opened) => opened.file_key,
        Err(RewrapError::Integrity(_)) => return Ok(JournalCheck::Invalid("its header does not verify")),
        Err(e) => return Err(e),
    };
    match first_chunk_opens(file, journal.len() as u64, &fk) {
        Ok(true) => Ok(JournalCheck::Valid),
        Ok(false) => Ok(JournalCheck::Invalid("it was made for another file")),
        Err(e) => Err(RewrapError::Io { what: "reading the payload's first chunk failed".into(), source: e }),
    }
}

/// Writes `new` at offset 0 of `path` through the journal (steps 1-3 of the module docs).
fn write_in_place(path: &Path, file: &File, journal: &Path, new: &[u8], journal_written: bool) -> Result<(), RewrapError> {
    let dir = parent_dir(path);
    if !journal_written {
        let mut j = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(journal)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => {
                    RewrapError::JournalNotAFile { journal: journal.to_owned(), what: "an entry that appeared during the rewrap" }
                }
                _ => RewrapError::Io { what: format!("cannot create the rewrap journal {}", journal.display()), source: e },
            })?;
        j.write_all(new)
            .and_then(|()| j.sync_all())
            .map_err(io_err(format!("writing the rewrap journal {} failed; the file was not changed", journal.display())))?;
        sync_dir(dir)?;
    }
    let pending = || {
        format!(
            "the journal {} keeps the new header: run rewrap again to complete it (until then the header may be incomplete)",
            journal.display()
        )
    };
    let w = open_same_for_writing(path, file).map_err(|e| {
        if journal_written {
            RewrapError::Io { what: format!("cannot open the file for writing; {}", pending()), source: e }
        } else {
            let _ = fs::remove_file(journal);
            RewrapError::Io { what: "cannot open the file for writing; the file was not changed".into(), source: e }
        }
    })?;
    w.write_all_at(new, 0)
        .and_then(|()| w.sync_all())
        .map_err(io_err(format!("writing the new header failed; {}", pending())))?;
    fs::remove_file(journal).map_err(io_err(format!(
        "the new header is written, but removing the journal {} failed",
        journal.display()
    )))?;
    sync_dir(dir)
}

/// Opens `path` for writing without following a symbolic link, and only if it is still
/// `file` (the one read and locked): never a file swapped in since.
fn open_same_for_writing(path: &Path, file: &File) -> io::Result<File> {
    let w = OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    let (a, b) = (w.metadata()?, file.metadata()?);
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the file was replaced while it was being rewrapped"));
    }
    Ok(w)
}

/// Copies `file` with `new` in place of its first `old_len` bytes into a
/// temporary file next to `path` and renames it over `path`.
fn write_copy(path: &Path, file: &File, old_len: usize, new: &[u8]) -> Result<(), RewrapError> {
    let dir = parent_dir(path);
    let meta = file.metadata().map_err(io_err("reading the file's metadata failed"))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".kluis-rewrap.tmp")
        .tempfile_in(dir)
        .map_err(io_err(format!("cannot create a temporary file in {}", dir.display())))?;
    let copy_err = || "copying the file with its new header failed; the file was not changed".to_owned();
    {
        let mut out = BufWriter::with_capacity(IO_BUF, tmp.as_file());
        out.write_all(new).map_err(io_err(copy_err()))?;
        let mut src = file;
        src.seek(SeekFrom::Start(old_len as u64)).map_err(io_err(copy_err()))?;
        io::copy(&mut BufReader::with_capacity(IO_BUF, src), &mut out).map_err(io_err(copy_err()))?;
        out.flush().map_err(io_err(copy_err()))?;
    }
    let t = tmp.as_file();
    let tmeta = t.metadata().map_err(io_err(copy_err()))?;
    if (tmeta.uid(), tmeta.gid()) != (meta.uid(), meta.gid()) {
        std::os::unix::fs::fchown(t, Some(meta.uid()), Some(meta.gid()))
            .map_err(io_err("cannot give the copy the file's owner; the file was not changed"))?;
    }
    t.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777)).map_err(io_err(copy_err()))?;
    t.sync_all().map_err(io_err(copy_err()))?;
    tmp.persist(path).map_err(|e| RewrapError::Io {
        what: "replacing the file with its rewrapped copy failed; the file was not changed".into(),
        source: e.error,
    })?;
    sync_dir(dir)
}

/// Rewraps one sealed file in place (see the module docs).
pub fn rewrap_file(svc: &dyn KeyService, path: &Path) -> Result<Report, RewrapError> {
    // Through a symlink, the journal and a replacing copy belong next to the real file.
    let path = &fs::canonicalize(path).map_err(io_err("cannot open the file"))?;
    let journal = journal_path(path).ok_or_else(|| RewrapError::Io {
        what: "not a file name".into(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    let file = File::open(path).map_err(io_err("cannot open the file"))?;
    if !file.metadata().map_err(io_err("cannot read the file's metadata"))?.is_file() {
        return Err(RewrapError::Io { what: "not a regular file".into(), source: io::Error::from(io::ErrorKind::InvalidInput) });
    }
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Err(RewrapError::Busy),
        Err(fs::TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => {}
        Err(fs::TryLockError::Error(e)) => return Err(RewrapError::Io { what: "cannot lock the file".into(), source: e }),
    }

    // A journal left by an interrupted run?
    let mut note = JournalNote::None;
    let mut discard: Option<&'static str> = None;
    match read_journal(&journal)? {
        None => {}
        Some(bytes) => match check_journal(svc, &file, &bytes)? {
            JournalCheck::Valid => {
                write_in_place(path, &file, &journal, &bytes, true)?;
                note = JournalNote::Completed;
            }
            JournalCheck::Invalid(why) => discard = Some(why),
        },
    }

    let hdr = match RawHeader::read(&file) {
        Ok(h) => h,
        Err(RewrapError::Integrity(e)) => return Err(with_journal(e, &journal, discard)),
        Err(e) => return Err(e),
    };
    let Opened { file_key: fk, index, stanza: st, version: from_version } = match file_key_of(svc, &hdr) {
        Ok(x) => x,
        Err(RewrapError::Integrity(e)) => return Err(with_journal(e, &journal, discard)),
        Err(e) => return Err(e),
    };
    if let Some(why) = discard {
        // The file's own header verifies: the journal was never applied.
        fs::remove_file(&journal).map_err(io_err(format!("cannot remove the invalid rewrap journal {}", journal.display())))?;
        sync_dir(parent_dir(path))?;
        note = JournalNote::Discarded(why);
    }
    let mut report = Report {
        keyring: st.keyring.clone(),
        key_id: st.key_id.clone(),
        from_version,
        to_version: from_version,
        action: Action::AlreadyCurrent,
        journal: note,
        escrow: Escrow::NoneInForce,
    };

    let rw = svc.rewrap(&st).map_err(|e| server_error(e, &st.keyring))?;
    if rw.version < from_version {
        return Err(RewrapError::ServerMismatch("the server named an older keyring version"));
    }

    // The Kluis stanza of the header to write (the one the registry is told about).
    let mut rewrapped: Option<KluisStanza> = None;
    let mut new: Option<RawHeader> = None;
    if rw.version != from_version {
        // The new stanza: the re-wrapped key, then the same encrypted file key.
        let old = &hdr.parsed.stanzas[index];
        let mut body = rw.wrapped.clone();
        body.extend_from_slice(&old.body[st.wrapped.len()..]);
        let stanza = Stanza { tag: STANZA_TAG.to_owned(), args: old.args.clone(), body };
        // Never write a header that does not open: unwrap the new key and check it
        // yields the same file key (the new MAC is made with the old file key).
        let spliced = splice(&hdr, index, &stanza, &fk)?;
        match file_key_of(svc, &spliced) {
            Ok(opened) if opened.version == rw.version => rewrapped = Some(opened.stanza),
            Ok(_) => return Err(RewrapError::ServerMismatch("the re-wrapped key names another version")),
            Err(RewrapError::Integrity(_)) => return Err(RewrapError::ServerMismatch("it opens another file key")),
            Err(e) => return Err(e),
        }
        new = Some(spliced);
    }

    // The escrow stanza to the recipient in force, unless the file has it: added by an
    // earlier rewrap (found byte for byte, see kluis_age::escrow_stanza), or from
    // sealing (the registry says the key went out with this recipient).
    let mut mark: Option<String> = None;
    if let Some(recipient) = rw.recovery_recipient.clone() {
        let base = new.as_ref().unwrap_or(&hdr);
        if has_escrow_stanza(&base.parsed.stanzas, &fk, &recipient).map_err(RewrapError::BadRecoveryRecipient)? {
            if !rw.escrowed {
                mark = Some(recipient.clone());
            }
            report.escrow = Escrow::Present { recipient, reported: !rw.escrowed };
        } else if rw.sealed_with_recipient {
            report.escrow = Escrow::Present { recipient, reported: false };
        } else {
            let kept = base.parsed.stanzas.iter().filter(|s| s.tag == X25519_TAG).count();
            new = Some(append_escrow(base, &recipient, &fk)?);
            mark = Some(recipient.clone());
            report.escrow = Escrow::Added { recipient, kept };
        }
    }
    let kluis = rewrapped.as_ref().unwrap_or(&st);
    let Some(new) = new else {
        // Nothing to write; an escrow stanza from an interrupted run is reported.
        if let Some(recipient) = mark {
            svc.mark_escrowed(kluis, &recipient).map_err(|source| RewrapError::NotRecorded { recipient, source })?;
        }
        return Ok(report);
    };

    // Nothing may have changed since the header was read.
    let mut now = vec![0u8; hdr.bytes.len()];
    let n = read_full_at(&file, &mut now, 0).map_err(io_err("re-reading the header failed"))?;
    if n != now.len() || now != hdr.bytes {
        return Err(RewrapError::Changed);
    }
    if new.bytes.len() == hdr.bytes.len() {
        write_in_place(path, &file, &journal, &new.bytes, false)?;
        report.action = Action::InPlace;
    } else {
        write_copy(path, &file, hdr.bytes.len(), &new.bytes)?;
        report.action = Action::Copied;
    }
    report.to_version = rw.version;
    // Only now that the new header is durable: the registry counts the key as escrowed.
    if let Some(recipient) = mark {
        svc.mark_escrowed(kluis, &recipient).map_err(|source| RewrapError::NotRecorded { recipient, source })?;
    }
    Ok(report)
}

fn with_journal(e: UnsealError<ClientError>, journal: &Path, discard: Option<&'static str>) -> RewrapError {
    match discard {
        Some(why) => RewrapError::BadJournal { file: Box::new(e), journal: journal.to_owned(), why },
        None => RewrapError::Integrity(e),
    }
}

/// Reads a journal (bounded by the largest header); `None` if there is none.
/// Never through a symbolic link (`O_NOFOLLOW`), never blocking on a FIFO
/// (`O_NONBLOCK`), and only a regular file.
fn read_journal(journal: &Path) -> Result<Option<Vec<u8>>, RewrapError> {
    let not_a_file = |what| RewrapError::JournalNotAFile { journal: journal.to_owned(), what };
    let f = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(journal) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(not_a_file("a symbolic link")),
        Err(e) => return Err(RewrapError::Io { what: format!("cannot open the rewrap journal {}", journal.display()), source: e }),
    };
    let ft = f.metadata().map_err(io_err(format!("cannot read the metadata of the rewrap journal {}", journal.display())))?.file_type();
    if !ft.is_file() {
        return Err(not_a_file(if ft.is_dir() { "a directory" } else { "not a regular file" }));
    }
    let mut bytes = Vec::new();
    f.take(header::MAX_HEADER as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(format!("reading the rewrap journal {} failed", journal.display())))?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::cell::{Cell, RefCell};
    use std::collections::{HashMap, HashSet};
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use kluis_age::sealed;
    use kluis_age::secret::IssuedKey;

    /// A server answer as the real client reads it off the wire.
    fn fake_status(code: tonic::Code, message: &str, reason: Reason) -> ClientError {
        ClientError::from_status("fake", kluis_proto::error::status(code, message, reason))
    }

    /// A pretend server: wrapped = version || (data key XOR pad(version, key id)) || filler.
    struct Fake {
        keys: HashMap<String, [u8; 32]>,
        current: Cell<u32>,
        retired_below: Cell<u32>,
        deny: bool,
        /// Wraps under newer versions are one byte longer (forces the copy path).
        grow: bool,
        unwraps: Cell<u32>,
        /// The recovery recipient in force.
        recipient: RefCell<Option<String>>,
        /// The recipient each key was issued with.
        issued_with: HashMap<String, Option<String>>,
        /// Keys the registry counts as escrowed, and each mark_escrowed call.
        escrowed: RefCell<HashSet<String>>,
        marks: RefCell<Vec<(String, String)>>,
        /// mark_escrowed fails (the server unreachable after the write).
        mark_fails: Cell<bool>,
    }

    fn pad(version: u32, key_id: &str) -> [u8; 32] {
        age_core::primitives::hkdf(key_id.as_bytes(), b"fake", &version.to_be_bytes())
    }

    impl Fake {
        fn new() -> Self {
            Self {
                keys: HashMap::new(),
                current: Cell::new(1),
                retired_below: Cell::new(0),
                deny: false,
                grow: false,
                unwraps: Cell::new(0),
                recipient: RefCell::new(None),
                issued_with: HashMap::new(),
                escrowed: RefCell::new(HashSet::new()),
                marks: RefCell::new(Vec::new()),
                mark_fails: Cell::new(false),
            }
        }

        fn wrap(&self, key_id: &str, dk: &[u8; 32], version: u32) -> Vec<u8> {
            let mut w = vec![u8::try_from(version).unwrap()];
            let p = pad(version, key_id);
            w.extend(dk.iter().zip(p).map(|(a, b)| a ^ b));
            let len = if self.grow && version > 1 { 66 } else { 65 };
            w.resize(len, 0xAA);
            w
        }

        fn issue(&mut self, key_id: &str, dk: [u8; 32], recovery: Option<String>) -> IssuedKey {
            self.keys.insert(key_id.to_owned(), dk);
            self.issued_with.insert(key_id.to_owned(), recovery.clone());
            if recovery.is_some() {
                self.escrowed.borrow_mut().insert(key_id.to_owned());
            }
            IssuedKey {
                key_id: key_id.to_owned(),
                keyring: "default".into(),
                version: self.current.get(),
                data_key: DataKey::from_slice(&dk).unwrap(),
                wrapped: self.wrap(key_id, &dk, self.current.get()),
                recovery_recipient: recovery,
            }
        }

        fn open(&self, st: &KluisStanza) -> Result<([u8; 32], u32), ClientError> {
            if self.deny {
                return Err(fake_status(tonic::Code::PermissionDenied, "sealer may not unwrap", Reason::PermissionDenied));
            }
            let dk = self.keys.get(&st.key_id).ok_or_else(|| fake_status(tonic::Code::NotFound, "unknown key", Reason::KeyUnknown))?;
            let v = u32::from(st.wrapped[0]);
            if v < self.retired_below.get() {
                return Err(fake_status(tonic::Code::FailedPrecondition, &format!("keyring default version {v} is retired"), Reason::VersionRetired));
            }
            if st.wrapped != self.wrap(&st.key_id, dk, v) {
                return Err(fake_status(tonic::Code::InvalidArgument, "the wrapped key does not open", Reason::WrappedKeyNotAuthentic));
            }
            Ok((*dk, v))
        }
    }

    impl KeyService for Fake {
        fn unwrap(&self, st: &KluisStanza) -> Result<UnwrappedKey, ClientError> {
            self.unwraps.set(self.unwraps.get() + 1);
            let (dk, version) = self.open(st)?;
            Ok(UnwrappedKey {
                data_key: DataKey::from_slice(&dk).unwrap(),
                keyring: st.keyring.clone(),
                version,
                backup_id: String::new(),
            })
        }

        fn rewrap(&self, st: &KluisStanza) -> Result<Rewrapped, ClientError> {
            let (dk, v) = self.open(st)?;
            let cur = self.current.get();
            let recipient = self.recipient.borrow().clone();
            Ok(Rewrapped {
                wrapped: self.wrap(&st.key_id, &dk, cur),
                version: cur,
                previous_version: v,
                sealed_with_recipient: recipient.is_some() && self.issued_with.get(&st.key_id) == Some(&recipient),
                recovery_recipient: recipient,
                escrowed: self.escrowed.borrow().contains(&st.key_id),
            })
        }

        fn mark_escrowed(&self, st: &KluisStanza, recipient: &str) -> Result<bool, ClientError> {
            self.open(st)?;
            if self.mark_fails.get() {
                return Err(fake_status(tonic::Code::Unavailable, "server gone", Reason::StoreUnavailable));
            }
            if self.recipient.borrow().as_deref() != Some(recipient) {
                return Err(fake_status(tonic::Code::FailedPrecondition, "not in force", Reason::EscrowRecipientNotInForce));
            }
            self.marks.borrow_mut().push((st.key_id.clone(), recipient.to_owned()));
            Ok(self.escrowed.borrow_mut().insert(st.key_id.clone()))
        }
    }

    struct Setup {
        dir: tempfile::TempDir,
        fake: Fake,
        recovery: age::x25519::Identity,
        data: Vec<u8>,
    }

    fn setup() -> Setup {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        Setup { dir: tempfile::tempdir().unwrap(), fake: Fake::new(), recovery: age::x25519::Identity::generate(), data }
    }

    impl Setup {
        fn seal(&mut self, name: &str, key_id: &str, seed: u8) -> PathBuf {
            let r = Some(self.recovery.to_public().to_string());
            self.seal_for(name, key_id, seed, r)
        }

        /// Seals with the given recovery recipient (`None`: before any escrow).
        fn seal_for(&mut self, name: &str, key_id: &str, seed: u8, recovery: Option<String>) -> PathBuf {
            let key = self.fake.issue(key_id, [seed; 32], recovery);
            let (sealed, _) = sealed::seal(&key, self.data.as_slice(), Vec::new()).unwrap();
            let p = self.dir.path().join(name);
            fs::write(&p, sealed).unwrap();
            p
        }

        fn unseal(&self, bytes: &[u8]) -> Vec<u8> {
            let ident = KluisIdentity::new(|st: &KluisStanza| self.fake.unwrap(st).map(|u| u.data_key));
            sealed::unseal(bytes, Some(&ident), &[], Vec::new()).map_err(|e| e.to_string()).unwrap().0
        }

        fn unseal_recovery(&self, bytes: &[u8]) -> Vec<u8> {
            let dec = age::Decryptor::new(bytes).unwrap();
            let mut r = dec.decrypt(std::iter::once(&self.recovery as &dyn age::Identity)).unwrap();
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            out
        }
    }

    fn header_len(b: &[u8]) -> usize {
        let p = b.windows(5).position(|w| w == b"\n--- ").unwrap() + 1;
        p + b[p..].iter().position(|&c| c == b'\n').unwrap() + 1
    }

    fn stanza_lines(b: &[u8], tag: &str) -> Vec<u8> {
        let h = &b[..header_len(b)];
        let text = String::from_utf8(h.to_vec()).unwrap();
        let start = text.find(&format!("-> {tag}")).unwrap();
        let end = text[start + 3..].find("\n-> ").or_else(|| text[start + 3..].find("\n---")).unwrap() + start + 4;
        text.as_bytes()[start..end].to_vec()
    }

    #[test]
    fn rewraps_in_place_keeping_payload_and_other_stanzas() {
        let mut s = setup();
        let p = s.seal("a.age", "k1", 7);
        let before = fs::read(&p).unwrap();
        let ino = fs::metadata(&p).unwrap().ino();
        s.fake.current.set(3);
        let r = rewrap_file(&s.fake, &p).unwrap();
        assert_eq!((r.from_version, r.to_version, r.action, r.journal), (1, 3, Action::InPlace, JournalNote::None));
        let after = fs::read(&p).unwrap();
        assert_eq!(after.len(), before.len());
        let h = header_len(&before);
        assert_eq!(header_len(&after), h);
        assert_eq!(after[h..], before[h..], "payload bytes unchanged");
        assert_ne!(after[..h], before[..h]);
        assert_eq!(stanza_lines(&after, "X25519"), stanza_lines(&before, "X25519"));
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino);
        assert!(!journal_path(&p).unwrap().exists());
        assert_eq!(sealed::read_kluis_stanza(after.as_slice()).unwrap().wrapped[0], 3);
        assert_eq!(s.unseal(&after), s.data);
        assert_eq!(s.unseal_recovery(&after), s.data);
        // Again: already current, nothing written.
        let r = rewrap_file(&s.fake, &p).unwrap();
        assert_eq!((r.from_version, r.to_version, r.action), (3, 3, Action::AlreadyCurrent));
        assert_eq!(fs::read(&p).unwrap(), after);
    }

    #[test]
    fn a_symlink_planted_at_the_journal_name_is_refused_and_nothing_is_created_elsewhere() {
        let mut s = setup();
        let p = s.seal("a.age", "k1", 7);
        let before = fs::read(&p).unwrap();
        s.fake.current.set(2);
        let elsewhere = tempfile::tempdir().unwrap();
        let journal = journal_path(&p).unwrap();

        // A dangling link: following it would create the victim file.
        let victim = elsewhere.path().join("victim");
        std::os::unix::fs::symlink(&victim, &journal).unwrap();
        let e = rewrap_file(&s.fake, &p).unwrap_err();
        assert!(matches!(&e, RewrapError::JournalNotAFile { what: "a symbolic link", .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&journal.display().to_string()) && msg.contains("symbolic link"), "{msg}");
        assert!(msg.ends_with("the file was not changed"), "{msg}");
        assert!(fs::symlink_metadata(&victim).is_err(), "a file was created through the link");
        assert_eq!(fs::read(&p).unwrap(), before);
        assert!(fs::symlink_metadata(&journal).unwrap().file_type().is_symlink(), "the link is left for the operator");

        // A link to an existing file elsewhere: neither read as a journal nor truncated.
        fs::remove_file(&journal).unwrap();
        fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, &journal).unwrap();
        let e = rewrap_file(&s.fake, &p).unwrap_err();
        assert!(matches!(&e, RewrapError::JournalNotAFile { .. }), "{e:?}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&p).unwrap(), before);

        // A directory or a FIFO at the name: refused too, without blocking.
        fs::remove_file(&journal).unwrap();
        fs::create_dir(&journal).unwrap();
        assert!(matches!(rewrap_file(&s.fake, &p), Err(RewrapError::JournalNotAFile { what: "a directory", .. })));
        fs::remove_dir(&journal).unwrap();
        let status = std::process::Command::new("mkfifo").arg(&journal).status().unwrap();
        assert!(status.success());
        assert!(matches!(rewrap_file(&s.fake, &p), Err(RewrapError::JournalNotAFile { what: "not a regular file", .. })));
        fs::remove_file(&journal).unwrap();
        assert_eq!(fs::read(&p).unwrap(), before);

        // With the name clear, the same file rewraps, and the journal it made is gone.
        let r = rewrap_file(&s.fake, &p).unwrap();
        assert_eq!((r.action, r.to_version), (Action::InPlace, 2));
        assert!(fs::symlink_metadata(&journal).is_err());
        assert_eq!(fs::read_dir(elsewhere.path()).unwrap().count(), 1, "only the victim file the test wrote");
    }

    #[test]
    fn the_journal_is_created_new_and_never_through_a_link() {
        let mut s = setup();
        let p = s.seal("a.age", "k1", 7);
        let journal = journal_path(&p).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let victim = elsewhere.path().join("victim");
        // A link planted after the journal was looked for (between the check and the
        // create): the create itself refuses it.
        std::os::unix::fs::symlink(&victim, &journal).unwrap();
        let e = write_in_place(&p, &File::open(&p).unwrap(), &journal, b"new header", false).unwrap_err();
        assert!(matches!(&e, RewrapError::JournalNotAFile { .. }), "{e:?}");
        assert!(fs::symlink_metadata(&victim).is_err(), "a file was created through the link");
        // And the file to write must be the one that was read: a swapped-in link is refused.
        fs::remove_file(&journal).unwrap();
        let other = s.seal("b.age", "k2", 8);
        let before = fs::read(&other).unwrap();
        let read_file = File::open(&p).unwrap();
        fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&other, &p).unwrap();
        let e = write_in_place(&p, &read_file, &journal, b"new header", false).unwrap_err();
        assert!(matches!(&e, RewrapError::Io { .. }), "{e:?}");
        assert_eq!(fs::read(&other).unwrap(), before);
        assert!(fs::symlink_metadata(&journal).is_err(), "the journal of a refused write is removed");
    }

    #[test]
    fn refusals_and_tampering_leave_the_file_alone() {
        let mut s = setup();
        let p = s.seal("a.age", "k1", 7);
        let before = fs::read(&p).unwrap();
        s.fake.current.set(2);
        s.fake.deny = true;
        assert!(matches!(rewrap_file(&s.fake, &p), Err(RewrapError::NeedsRestorer { .. })));
        s.fake.deny = false;
        // A flipped MAC character.
        let mut bad = before.clone();
        let m = header_len(&bad) - 10;
        bad[m] = if bad[m] == b'A' { b'B' } else { b'A' };
        fs::write(&p, &bad).unwrap();
        assert!(matches!(rewrap_file(&s.fake, &p), Err(RewrapError::Integrity(UnsealError::HeaderMac))), "{:?}", rewrap_file(&s.fake, &p));
        assert_eq!(fs::read(&p).unwrap(), bad);
        // The X25519 stanza altered: the MAC catches it.
        let mut bad = before.clone();
        let x = bad.windows(9).position(|w| w == b"-> X25519").unwrap() + 12;
        bad[x] = if bad[x] == b'A' { b'B' } else { b'A' };
        fs::write(&p, &bad).unwrap();
        assert!(matches!(rewrap_file(&s.fake, &p), Err(RewrapError::Integrity(_))));
        assert_eq!(fs::read(&p).unwrap(), bad);
        // Not sealed at all.
        fs::write(&p, b"plain text").unwrap();
        assert!(matches!(rewrap_file(&s.fake, &p), Err(RewrapError::Integrity(UnsealError::NotSealed))));
        // A retired version.
        fs::write(&p, &before).unwrap();
        s.fake.retired_below.set(2);
        let e = rewrap_file(&s.fake, &p).unwrap_err();
        assert!(e.to_string().contains("retired") && e.to_string().contains("recovery key"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), before);
        assert!(!journal_path(&p).unwrap().exists());
    }

    #[test]
    fn completes_a_journal_left_by_a_crash() {
        let mut s = setup();
        let p = s.seal("a.age", "k1", 7);
        let twin = s.dir.path().join("twin.age");
        fs::copy(&p, &twin).unwrap();
        s.fake.current.set(2);
        rewrap_file(&s.fake, &twin).unwrap();
        let done = fs::read(&twin).unwrap();
        let h = header_len(&done);
        // The crash: journal durable, header half written.
        let mut torn = fs::read(&p).unwrap();
        torn[..h / 2].copy_from_slice(&done[..h / 2]);
        fs::write(&p, &torn).unwrap();
        fs::write(journal_path(&p).unwrap(), &done[..h]).unwrap();
        let r = rewrap_file(&s.fake, &p).unwrap();
        assert_eq!((r.journal, r.action, r.to_version), (JournalNote::Completed, Action::AlreadyCurrent, 2));
        assert_eq!(fs::read(&p).unwrap(), done);
        assert!(!journal_path(&p).unwrap().exists());
        assert_eq!(s.unseal(&done), s.data);
    }

    #[test]
    fn a_journal_for_another_file_or_torn_is_never_applied() {
        let mut s = setup();
        let a = s.seal("a.age", "k1", 7);
        let b = s.seal("b.age", "k2", 9);
        s.fake.current.set(2);
        rewrap_file(&s.fake, &b).unwrap();
        let b_new = fs::read(&b).unwrap();
        let a_old = fs::read(&a).unwrap();
        // b's (valid) header as a's journal: a's payload does not open under it.
        fs::write(journal_path(&a).unwrap(), &b_new[..header_len(&b_new)]).unwrap();
        let r = rewrap_file(&s.fake, &a).unwrap();
        assert_eq!(r.journal, JournalNote::Discarded("it was made for another file"));
        assert_eq!((r.action, r.from_version, r.to_version), (Action::InPlace, 1, 2));
        let a_new = fs::read(&a).unwrap();
        assert_eq!(a_new[header_len(&a_new)..], a_old[header_len(&a_old)..]);
        assert_eq!(s.unseal(&a_new), s.data);
        // A torn journal, and a file whose header is damaged too: both left alone.
        let mut bad = a_new.clone();
        bad[30] ^= 0x01;
        fs::write(&a, &bad).unwrap();
        fs::write(journal_path(&a).unwrap(), &a_new[..40]).unwrap();
        assert!(matches!(rewrap_file(&s.fake, &a), Err(RewrapError::BadJournal { .. })));
        assert_eq!(fs::read(&a).unwrap(), bad);
        assert!(journal_path(&a).unwrap().exists());
    }

    #[test]
    fn a_longer_header_is_copied_and_renamed() {
        let mut s = setup();
        s.fake.grow = true;
        let p = s.seal("a.age", "k1", 7);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let before = fs::read(&p).unwrap();
        s.fake.current.set(2);
        // Through a symlink: the real file is replaced, the link stays a link.
        let link = s.dir.path().join("link.age");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let r = rewrap_file(&s.fake, &link).unwrap();
        assert_eq!(r.action, Action::Copied);
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        fs::remove_file(&link).unwrap();
        let after = fs::read(&p).unwrap();
        assert_eq!(after[header_len(&after)..], before[header_len(&before)..]);
        assert_eq!(stanza_lines(&after, "X25519"), stanza_lines(&before, "X25519"));
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        assert_eq!(s.unseal(&after), s.data);
        assert_eq!(s.unseal_recovery(&after), s.data);
        let leftovers: Vec<_> = fs::read_dir(s.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn a_server_that_rewraps_another_key_is_caught_before_writing() {
        struct Liar(Fake);
        impl KeyService for Liar {
            fn unwrap(&self, st: &KluisStanza) -> Result<UnwrappedKey, ClientError> {
                self.0.unwrap(st)
            }
            fn rewrap(&self, st: &KluisStanza) -> Result<Rewrapped, ClientError> {
                let (_, v) = self.0.open(st)?;
                // The wrap of another key (k2's data key under k1's id would not
                // open; use a key the fake knows for this id but wrong bytes).
                let wrong = [1u8; 32];
                Ok(Rewrapped {
                    wrapped: self.0.wrap(&st.key_id, &wrong, 2),
                    version: 2,
                    previous_version: v,
                    recovery_recipient: None,
                    escrowed: false,
                    sealed_with_recipient: false,
                })
            }
            fn mark_escrowed(&self, st: &KluisStanza, recipient: &str) -> Result<bool, ClientError> {
                self.0.mark_escrowed(st, recipient)
            }
        }
        let mut s = setup();
        let p = s.seal("a.age", "k1", 7);
        let before = fs::read(&p).unwrap();
        s.fake.current.set(2);
        let liar = Liar(s.fake);
        let e = rewrap_file(&liar, &p).unwrap_err();
        assert!(matches!(e, RewrapError::Server { .. } | RewrapError::ServerMismatch(_)), "{e}");
        assert_eq!(fs::read(&p).unwrap(), before);
        assert!(!journal_path(&p).unwrap().exists());
    }

    fn x25519_count(b: &[u8]) -> usize {
        let h = String::from_utf8(b[..header_len(b)].to_vec()).unwrap();
        h.matches("\n-> X25519 ").count()
    }

    #[test]
    fn a_file_sealed_before_the_escrow_gets_the_stanza_once() {
        let mut s = setup();
        let p = s.seal_for("old.age", "k1", 7, None);
        let before = fs::read(&p).unwrap();
        assert_eq!(x25519_count(&before), 0);
        // No escrow in force: nothing to do.
        let r = rewrap_file(&s.fake, &p).unwrap();
        assert_eq!((r.action, r.escrow.clone()), (Action::AlreadyCurrent, Escrow::NoneInForce));
        assert_eq!(fs::read(&p).unwrap(), before);

        let recipient = s.recovery.to_public().to_string();
        *s.fake.recipient.borrow_mut() = Some(recipient.clone());
        let r = rewrap_file(&s.fake, &p).unwrap();
        assert_eq!(r.escrow, Escrow::Added { recipient: recipient.clone(), kept: 0 });
        assert_eq!((r.action, r.from_version, r.to_version), (Action::Copied, 1, 1));
        let after = fs::read(&p).unwrap();
        assert_eq!(after[header_len(&after)..], before[header_len(&before)..], "payload bytes unchanged");
        assert_eq!(stanza_lines(&after, "kluis"), stanza_lines(&before, "kluis"), "the Kluis stanza is kept byte for byte");
        assert_eq!(x25519_count(&after), 1);
        assert_eq!(s.unseal(&after), s.data);
        assert_eq!(s.unseal_recovery(&after), s.data);
        assert_eq!(*s.fake.marks.borrow(), vec![("k1".to_owned(), recipient.clone())]);
        assert!(s.fake.escrowed.borrow().contains("k1"));

        // Again: the stanza is found, nothing written, nothing reported.
        let r = rewrap_file(&s.fake, &p).unwrap();
        assert_eq!((r.action, r.escrow), (Action::AlreadyCurrent, Escrow::Present { recipient, reported: false }));
        assert_eq!(fs::read(&p).unwrap(), after);
        assert_eq!(s.fake.marks.borrow().len(), 1);
    }

    #[test]
    fn a_rotation_and_the_escrow_stanza_in_one_run() {
        let mut s = setup();
        let p = s.seal_for("old.age", "k1", 7, None);
        let before = fs::read(&p).unwrap();
        s.fake.current.set(2);
        let recipient = s.recovery.to_public().to_string();
        *s.fake.recipient.borrow_mut() = Some(recipient.clone());
        let r = rewrap_file(&s.fake, &p).unwrap();
        assert_eq!((r.action, r.from_version, r.to_version), (Action::Copied, 1, 2));
        assert_eq!(r.escrow, Escrow::Added { recipient, kept: 0 });
        let after = fs::read(&p).unwrap();
        assert_eq!(after[header_len(&after)..], before[header_len(&before)..]);
        assert_eq!(sealed::read_kluis_stanza(after.as_slice()).unwrap().wrapped[0], 2);
        assert_eq!(s.unseal(&after), s.data);
        assert_eq!(s.unseal_recovery(&after), s.data);
        // The registry is told with the key as the file now names it (version 2).
        assert_eq!(s.fake.marks.borrow().len(), 1);
    }

    #[test]
    fn a_stanza_to_an_earlier_recipient_is_kept_and_the_current_one_added() {
        let mut s = setup();
        let old = age::x25519::Identity::generate();
        let p = s.seal_for("a.age", "k1", 7, Some(old.to_public().to_string()));
        let before = fs::read(&p).unwrap();
        let recipient = s.recovery.to_public().to_string();
        *s.fake.recipient.borrow_mut() = Some(recipient.clone());
        let r = rewrap_file(&s.fake, &p).unwrap();
        assert_eq!(r.escrow, Escrow::Added { recipient, kept: 1 });
        let after = fs::read(&p).unwrap();
        assert_eq!(x25519_count(&after), 2);
        // The old stanza is still the first X25519 stanza, byte for byte.
        assert_eq!(stanza_lines(&after, "X25519"), stanza_lines(&before, "X25519"));
        assert_eq!(s.unseal_recovery(&after), s.data);
        let dec = age::Decryptor::new(after.as_slice()).unwrap();
        let mut out = Vec::new();
        dec.decrypt(std::iter::once(&old as &dyn age::Identity)).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, s.data, "the earlier recipient still opens it");
    }

    #[test]
    fn a_file_sealed_with_the_recipient_in_force_is_not_written() {
        let mut s = setup();
        let p = s.seal("a.age", "k1", 7);
        let before = fs::read(&p).unwrap();
        *s.fake.recipient.borrow_mut() = Some(s.recovery.to_public().to_string());
        let r = rewrap_file(&s.fake, &p).unwrap();
        assert_eq!(r.action, Action::AlreadyCurrent);
        assert!(matches!(r.escrow, Escrow::Present { reported: false, .. }), "{:?}", r.escrow);
        assert_eq!(fs::read(&p).unwrap(), before);
        assert!(s.fake.marks.borrow().is_empty());
    }

    #[test]
    fn a_stanza_the_server_did_not_record_is_reported_by_the_next_run() {
        let mut s = setup();
        let p = s.seal_for("old.age", "k1", 7, None);
        let recipient = s.recovery.to_public().to_string();
        *s.fake.recipient.borrow_mut() = Some(recipient.clone());
        s.fake.mark_fails.set(true);
        let e = rewrap_file(&s.fake, &p).unwrap_err();
        assert!(matches!(&e, RewrapError::NotRecorded { .. }), "{e:?}");
        assert!(e.to_string().contains("run rewrap again"), "{e}");
        let written = fs::read(&p).unwrap();
        assert_eq!(x25519_count(&written), 1, "the stanza is durable");
        assert!(!s.fake.escrowed.borrow().contains("k1"));
        s.fake.mark_fails.set(false);
        let r = rewrap_file(&s.fake, &p).unwrap();
        assert_eq!((r.action, r.escrow), (Action::AlreadyCurrent, Escrow::Present { recipient, reported: true }));
        assert_eq!(fs::read(&p).unwrap(), written);
        assert!(s.fake.escrowed.borrow().contains("k1"));
    }

    #[test]
    fn a_tampered_or_refused_file_gets_no_escrow_stanza() {
        let mut s = setup();
        let p = s.seal_for("old.age", "k1", 7, None);
        let before = fs::read(&p).unwrap();
        *s.fake.recipient.borrow_mut() = Some(s.recovery.to_public().to_string());
        s.fake.deny = true;
        assert!(matches!(rewrap_file(&s.fake, &p), Err(RewrapError::NeedsRestorer { .. })));
        assert_eq!(fs::read(&p).unwrap(), before);
        s.fake.deny = false;
        let mut bad = before.clone();
        let m = header_len(&bad) - 10;
        bad[m] = if bad[m] == b'A' { b'B' } else { b'A' };
        fs::write(&p, &bad).unwrap();
        assert!(matches!(rewrap_file(&s.fake, &p), Err(RewrapError::Integrity(UnsealError::HeaderMac))));
        assert_eq!(fs::read(&p).unwrap(), bad);
        assert!(s.fake.marks.borrow().is_empty());
        // A recipient that is not an age recipient: refused before writing.
        fs::write(&p, &before).unwrap();
        *s.fake.recipient.borrow_mut() = Some("age1notarecipient".into());
        assert!(matches!(rewrap_file(&s.fake, &p), Err(RewrapError::BadRecoveryRecipient(_))));
        assert_eq!(fs::read(&p).unwrap(), before);
    }
}
