//! The sealed-file format: a standard age v1 file.
//!
//! Header stanzas:
//! - `-> kluis KEYRING KEY_ID` whose body is the server-wrapped data key
//!   followed by the age file key encrypted (ChaCha20-Poly1305, zero nonce, as
//!   age's own X25519 stanza does) under a key derived from the data key with
//!   HKDF-SHA-256 (salt `KEYRING \0 KEY_ID`, label `kluis/v1/file-key`);
//! - `-> X25519 ...` to the escrow recovery recipient, when the server hands one out.
//!
//! Payload: age STREAM (ChaCha20-Poly1305, 64 KiB chunks). So the custodians'
//! recovery identity opens any sealed file with the stock `age` tool, and
//! unsealing ignores stanzas it does not know.
//!
//! The header and the payload are written and read by [`crate::stream`]
//! (`ring`'s ChaCha20-Poly1305, chunks on several threads); the stanzas are
//! made and opened by the `age` crate's recipients and identities.

use std::cell::RefCell;
use std::collections::HashSet;
use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use age_core::format::{FILE_KEY_BYTES, FileKey, Stanza};
use age_core::primitives::{aead_decrypt, aead_encrypt, hkdf};
use zeroize::Zeroizing;

use crate::secret::{DataKey, IssuedKey};
use crate::stream::header::{self, HeaderDefect, Rule};
use crate::stream::{self, StreamError, Tuning};

/// The age stanza tag of a Kluis data key.
pub const STANZA_TAG: &str = "kluis";
const FILE_KEY_LABEL: &[u8] = b"kluis/v1/file-key";
const ENC_FILE_KEY_LEN: usize = FILE_KEY_BYTES + 16;
/// I/O buffer size for the payload copy.
pub const IO_BUF: usize = 1 << 20;

/// Errors sealing a stream.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the server handed out a recovery recipient that is not an age X25519 recipient")]
    BadRecoveryRecipient,
    #[error("could not build the age header: {0}")]
    Header(#[source] age::EncryptError),
    #[error("reading the input failed: {0}")]
    ReadInput(#[source] io::Error),
    #[error("writing the sealed output failed: {0}")]
    WriteOutput(#[source] io::Error),
}

/// Errors unsealing a stream. `E` is the error of the resolver that asks the server for
/// the data key of a Kluis stanza ([`KluisIdentity`]); [`Infallible`] when no server is
/// asked (offline, with recovery identities only).
#[derive(Debug, thiserror::Error)]
pub enum UnsealError<E = Infallible> {
    #[error("the input is empty, not a sealed backup")]
    Empty,
    #[error("the input is not a sealed backup (no age v1 header)")]
    NotSealed,
    /// The header breaks the age v1 grammar (the defect names the line and the rule),
    /// is truncated, or has a stanza its recipient type refuses.
    #[error("the header of the sealed file is damaged: {0}")]
    HeaderDamaged(HeaderDefect),
    #[error("the header of the sealed file was altered (header MAC does not verify)")]
    HeaderMac,
    #[error("the Kluis stanza is malformed: {reason}")]
    StanzaMalformed { reason: &'static str },
    #[error("no stanza in this file can be opened: it has no Kluis stanza and no stanza for the given recovery identity")]
    NoMatchingStanza,
    #[error("this backup has no escrow copy of its key (it was sealed before an escrow was installed); the file is not damaged, but only the Kluis server that sealed it can open it")]
    NoEscrowStanza,
    #[error("this backup's escrow copy is for another recovery key (another ceremony, or an earlier recovery recipient); the file is not damaged: use that ceremony's shares")]
    OtherRecoveryKey,
    #[error("the data key from the server does not open this file's key (the Kluis stanza was altered)")]
    FileKeyMismatch,
    #[error("{0}")]
    Server(#[source] E),
    #[error("the sealed file is truncated (its last chunk is missing)")]
    Truncated,
    #[error("the sealed payload is damaged, truncated or altered (a chunk failed to authenticate)")]
    PayloadDamaged,
    #[error("reading the sealed input failed: {0}")]
    ReadInput(#[source] io::Error),
    #[error("writing the plaintext failed: {0}")]
    WriteOutput(#[source] io::Error),
}

/// The contents of a Kluis stanza.
pub struct KluisStanza {
    pub keyring: String,
    pub key_id: String,
    pub wrapped: Vec<u8>,
    enc_file_key: Vec<u8>,
}

fn wrap_key(dk: &DataKey, keyring: &str, key_id: &str) -> Zeroizing<[u8; 32]> {
    let mut salt = Vec::with_capacity(keyring.len() + 1 + key_id.len());
    salt.extend_from_slice(keyring.as_bytes());
    salt.push(0);
    salt.extend_from_slice(key_id.as_bytes());
    Zeroizing::new(hkdf(&salt, FILE_KEY_LABEL, dk.expose()))
}

/// Reads a Kluis stanza; `Ok(None)` if the stanza is of another kind.
pub fn parse_stanza<E>(s: &Stanza) -> Result<Option<KluisStanza>, UnsealError<E>> {
    if s.tag != STANZA_TAG {
        return Ok(None);
    }
    let [keyring, key_id] = s.args.as_slice() else {
        return Err(UnsealError::StanzaMalformed { reason: "expected two arguments (keyring, key id)" });
    };
    if s.body.len() <= ENC_FILE_KEY_LEN {
        return Err(UnsealError::StanzaMalformed { reason: "body too short" });
    }
    let (wrapped, enc) = s.body.split_at(s.body.len() - ENC_FILE_KEY_LEN);
    Ok(Some(KluisStanza {
        keyring: keyring.clone(),
        key_id: key_id.clone(),
        wrapped: wrapped.to_vec(),
        enc_file_key: enc.to_vec(),
    }))
}

/// age recipient for a server-issued data key.
struct KluisRecipient<'a> {
    key: &'a IssuedKey,
}

impl age::Recipient for KluisRecipient<'_> {
    fn wrap_file_key(&self, file_key: &FileKey) -> Result<(Vec<Stanza>, HashSet<String>), age::EncryptError> {
        let wk = wrap_key(&self.key.data_key, &self.key.keyring, &self.key.key_id);
        let mut body = self.key.wrapped.clone();
        body.extend_from_slice(&aead_encrypt(&wk, file_key.expose_secret()));
        Ok((
            vec![Stanza {
                tag: STANZA_TAG.to_owned(),
                args: vec![self.key.keyring.clone(), self.key.key_id.clone()],
                body,
            }],
            HashSet::new(),
        ))
    }
}

/// age identity that resolves a Kluis stanza to its data key (normally by asking
/// the server, whose error is `E`) and remembers why it failed, so the caller gets
/// the real reason.
pub struct KluisIdentity<F, E = Infallible>
where
    F: Fn(&KluisStanza) -> Result<DataKey, E>,
{
    resolve: F,
    failure: RefCell<Option<UnsealError<E>>>,
}

impl<F, E> KluisIdentity<F, E>
where
    F: Fn(&KluisStanza) -> Result<DataKey, E>,
{
    pub fn new(resolve: F) -> Self {
        Self { resolve, failure: RefCell::new(None) }
    }

    fn fail(&self, e: UnsealError<E>) -> Option<Result<FileKey, age::DecryptError>> {
        *self.failure.borrow_mut() = Some(e);
        Some(Err(age::DecryptError::KeyDecryptionFailed))
    }

    /// Why resolving failed, if it did.
    pub fn take_failure(&self) -> Option<UnsealError<E>> {
        self.failure.borrow_mut().take()
    }
}

impl<F, E> age::Identity for KluisIdentity<F, E>
where
    F: Fn(&KluisStanza) -> Result<DataKey, E>,
{
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
        let st = match parse_stanza(stanza) {
            Ok(Some(st)) => st,
            Ok(None) => return None,
            Err(e) => return self.fail(e),
        };
        let dk = match (self.resolve)(&st) {
            Ok(dk) => dk,
            Err(e) => return self.fail(UnsealError::Server(e)),
        };
        let wk = wrap_key(&dk, &st.keyring, &st.key_id);
        match aead_decrypt(&wk, FILE_KEY_BYTES, &st.enc_file_key) {
            Ok(mut pt) => {
                let fk = FileKey::try_init_with_mut(|k: &mut [u8; FILE_KEY_BYTES]| {
                    k.copy_from_slice(&pt);
                    Ok::<(), ()>(())
                });
                zeroize::Zeroize::zeroize(&mut pt);
                match fk {
                    Ok(fk) => Some(Ok(fk)),
                    Err(()) => self.fail(UnsealError::FileKeyMismatch),
                }
            }
            Err(_) => self.fail(UnsealError::FileKeyMismatch),
        }
    }
}

/// Records the tags of the stanzas it is shown and opens none of them.
#[derive(Default)]
struct TagProbe {
    tags: RefCell<Vec<String>>,
}

impl age::Identity for TagProbe {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
        self.tags.borrow_mut().push(stanza.tag.clone());
        None
    }
}

/// Bytes moved by a seal or unseal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moved {
    pub plaintext_bytes: u64,
}

/// Seals `input` into `output` for `key` (and its recovery recipient, if any).
/// The caller must treat any error as "no sealed output": the age stream is
/// only complete after the final chunk, which this writes last.
pub fn seal<R: Read, W: Write>(key: &IssuedKey, input: R, output: W) -> Result<(W, Moved), SealError> {
    seal_with(key, input, output, Tuning::default())
}

fn other(msg: &'static str) -> io::Error {
    io::Error::other(msg)
}

/// [`seal`] with the given stream tuning (threads, batch size).
pub(crate) fn seal_with<R: Read, W: Write>(
    key: &IssuedKey,
    mut input: R,
    mut output: W,
    tuning: Tuning,
) -> Result<(W, Moved), SealError> {
    let recovery = match &key.recovery_recipient {
        Some(r) => Some(age::x25519::Recipient::from_str(r).map_err(|_| SealError::BadRecoveryRecipient)?),
        None => None,
    };
    let file_key = FileKey::try_init_with_mut(|k: &mut [u8; FILE_KEY_BYTES]| stream::random(k))
        .map_err(|_| SealError::Header(age::EncryptError::Io(other("the system random generator failed"))))?;
    let (mut stanzas, _) = age::Recipient::wrap_file_key(&KluisRecipient { key }, &file_key).map_err(SealError::Header)?;
    if let Some(r) = &recovery {
        stanzas.extend(age::Recipient::wrap_file_key(r, &file_key).map_err(SealError::Header)?.0);
    }
    let hdr = header::write(&file_key, &stanzas).map_err(|e| match e {
        header::HeaderError::Unwritable(why) => SealError::Header(age::EncryptError::Io(other(why))),
        _ => SealError::Header(age::EncryptError::Io(other("the age header could not be written"))),
    })?;
    output.write_all(&hdr).map_err(SealError::WriteOutput)?;
    let total = stream::seal_payload(&file_key, &mut input, &mut output, tuning).map_err(|e| match e {
        StreamError::ReadInput(e) => SealError::ReadInput(e),
        StreamError::WriteOutput(e) => SealError::WriteOutput(e),
        StreamError::Internal(why) => SealError::Header(age::EncryptError::Io(other(why))),
        StreamError::Truncated | StreamError::Damaged => {
            SealError::Header(age::EncryptError::Io(other("sealing the payload failed")))
        }
    })?;
    output.flush().map_err(SealError::WriteOutput)?;
    Ok((output, Moved { plaintext_bytes: total }))
}

/// The unseal error for a header that could not be read.
pub fn header_read_error<E>(e: header::HeaderError) -> UnsealError<E> {
    match e {
        header::HeaderError::Empty => UnsealError::Empty,
        header::HeaderError::NotAge => UnsealError::NotSealed,
        header::HeaderError::Read(e) => UnsealError::ReadInput(e),
        header::HeaderError::Damaged(d) => UnsealError::HeaderDamaged(d),
        header::HeaderError::Unwritable(why) => UnsealError::HeaderDamaged(HeaderDefect::whole(Rule::Unencodable(why))),
    }
}

fn header_error<E>(e: age::DecryptError) -> UnsealError<E> {
    match e {
        age::DecryptError::InvalidMac => UnsealError::HeaderMac,
        // No identity opens a stanza; or one recognised its stanza and could not open it.
        age::DecryptError::NoMatchingKeys | age::DecryptError::DecryptionFailed => UnsealError::NoMatchingStanza,
        age::DecryptError::Io(e) => UnsealError::ReadInput(e),
        // An identity recognised its stanza and refused its arguments or body.
        e => UnsealError::HeaderDamaged(HeaderDefect::whole(Rule::StanzaRefused(e.to_string()))),
    }
}

/// The resolver type of an unseal that uses no server (`E`: the error type the caller's
/// [`UnsealError`] carries).
pub type NoServer<E = Infallible> = fn(&KluisStanza) -> Result<DataKey, E>;

/// Unseals `input` into `output` with the given identities (a [`KluisIdentity`]
/// and/or recovery identities). Bytes are written only after their chunk
/// authenticated; an error at any point means the output must be discarded.
pub fn unseal<R: Read, W: Write, F, E>(
    input: R,
    kluis: Option<&KluisIdentity<F, E>>,
    others: &[&dyn age::Identity],
    output: W,
) -> Result<(W, Moved), UnsealError<E>>
where
    F: Fn(&KluisStanza) -> Result<DataKey, E>,
{
    unseal_with(input, kluis, others, output, Tuning::default())
}

/// Unseals with recovery identities only: no server, no network.
pub fn unseal_offline<R: Read, W: Write>(
    input: R,
    recovery: &[&dyn age::Identity],
    output: W,
) -> Result<(W, Moved), UnsealError> {
    unseal(input, None::<&KluisIdentity<NoServer>>, recovery, output)
}

/// Finds the file key: the first identity that opens a stanza wins (Kluis
/// first, then the recovery identities), as the `age` crate does.
fn unwrap_file_key<F, E>(
    stanzas: &[Stanza],
    kluis: Option<&KluisIdentity<F, E>>,
    others: &[&dyn age::Identity],
) -> Result<FileKey, UnsealError<E>>
where
    F: Fn(&KluisStanza) -> Result<DataKey, E>,
{
    let probe = TagProbe::default();
    let mut ids: Vec<&dyn age::Identity> = Vec::with_capacity(others.len() + 2);
    if let Some(k) = kluis {
        ids.push(k);
    }
    ids.extend_from_slice(others);
    ids.push(&probe);
    let found = ids
        .iter()
        .find_map(|id| id.unwrap_stanzas(stanzas))
        .unwrap_or(Err(age::DecryptError::NoMatchingKeys));
    match found {
        Ok(fk) => Ok(fk),
        Err(e) => {
            if let Some(f) = kluis.and_then(KluisIdentity::take_failure) {
                return Err(f);
            }
            if matches!(e, age::DecryptError::NoMatchingKeys) && kluis.is_none() {
                // Offline: say why the recovery identity does not open this file.
                let tags = probe.tags.borrow();
                if tags.iter().any(|t| t == "X25519") {
                    return Err(UnsealError::OtherRecoveryKey);
                }
                if tags.iter().any(|t| t == STANZA_TAG) {
                    return Err(UnsealError::NoEscrowStanza);
                }
            }
            Err(header_error(e))
        }
    }
}

/// [`unseal`] with the given stream tuning (threads, batch size).
pub(crate) fn unseal_with<R: Read, W: Write, F, E>(
    mut input: R,
    kluis: Option<&KluisIdentity<F, E>>,
    others: &[&dyn age::Identity],
    mut output: W,
    tuning: Tuning,
) -> Result<(W, Moved), UnsealError<E>>
where
    F: Fn(&KluisStanza) -> Result<DataKey, E>,
{
    let (hdr, read_past) = header::read(&mut input).map_err(header_read_error)?;
    let file_key = unwrap_file_key(&hdr.stanzas, kluis, others)?;
    hdr.verify_mac(&file_key).map_err(|_| UnsealError::HeaderMac)?;
    let mut payload = io::Cursor::new(read_past).chain(input);
    let total = stream::open_payload(&file_key, &mut payload, &mut output, tuning).map_err(|e| match e {
        StreamError::ReadInput(e) => UnsealError::ReadInput(e),
        StreamError::WriteOutput(e) => UnsealError::WriteOutput(e),
        StreamError::Truncated => UnsealError::Truncated,
        StreamError::Damaged => UnsealError::PayloadDamaged,
        StreamError::Internal(why) => UnsealError::ReadInput(other(why)),
    })?;
    output.flush().map_err(UnsealError::WriteOutput)?;
    Ok((output, Moved { plaintext_bytes: total }))
}

/// Reads only the header of a sealed file and returns its Kluis stanza.
pub fn read_kluis_stanza<R: Read>(mut input: R) -> Result<KluisStanza, UnsealError> {
    let (hdr, _) = header::read(&mut input).map_err(header_read_error)?;
    for s in &hdr.stanzas {
        if let Some(st) = parse_stanza(s)? {
            return Ok(st);
        }
    }
    Err(UnsealError::NoMatchingStanza)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(recovery: Option<String>) -> IssuedKey {
        IssuedKey {
            key_id: "00112233445566778899aabbccddeeff".into(),
            keyring: "default".into(),
            version: 1,
            data_key: DataKey::from_slice(&[7u8; 32]).unwrap(),
            wrapped: vec![1u8; 65],
            recovery_recipient: recovery,
        }
    }

    fn resolver(st: &KluisStanza) -> Result<DataKey, Infallible> {
        assert_eq!(st.wrapped, vec![1u8; 65]);
        Ok(DataKey::from_slice(&[7u8; 32]).unwrap())
    }

    #[test]
    fn round_trip_and_age_interop() {
        let id = age::x25519::Identity::generate();
        let key = issued(Some(id.to_public().to_string()));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (sealed, m) = seal(&key, data.as_slice(), Vec::new()).unwrap();
        assert_eq!(m.plaintext_bytes, data.len() as u64);
        let ident = KluisIdentity::new(resolver);
        let (out, _) = unseal(sealed.as_slice(), Some(&ident), &[], Vec::new()).unwrap();
        assert_eq!(out, data);
        // The recovery identity alone, through the age crate's own decryptor.
        let dec = age::Decryptor::new(sealed.as_slice()).unwrap();
        let mut r = dec.decrypt(std::iter::once(&id as &dyn age::Identity)).unwrap();
        let mut out2 = Vec::new();
        r.read_to_end(&mut out2).unwrap();
        assert_eq!(out2, data);
        // And through our unseal with no server at all.
        let none: Option<&KluisIdentity<NoServer>> = None;
        let (out3, _) = unseal(sealed.as_slice(), none, &[&id], Vec::new()).unwrap();
        assert_eq!(out3, data);
        let st = read_kluis_stanza(sealed.as_slice()).unwrap();
        assert_eq!(st.key_id, key.key_id);
        // Another recovery identity: named as such, not as damage.
        let other = age::x25519::Identity::generate();
        assert!(matches!(unseal(sealed.as_slice(), none, &[&other], Vec::new()), Err(UnsealError::OtherRecoveryKey)));
        // A file without an escrow stanza.
        let (plain, _) = seal(&issued(None), data.as_slice(), Vec::new()).unwrap();
        assert!(matches!(unseal(plain.as_slice(), none, &[&id], Vec::new()), Err(UnsealError::NoEscrowStanza)));
    }

    #[test]
    fn tampering_is_detected_and_named() {
        let key = issued(None);
        let data = vec![42u8; 70_000];
        let (sealed, _) = seal(&key, data.as_slice(), Vec::new()).unwrap();
        let ident = KluisIdentity::new(resolver);
        let run = |bytes: &[u8]| unseal(bytes, Some(&ident), &[], Vec::new()).map(|_| ());
        // Payload bit flip.
        let mut bad = sealed.clone();
        let n = bad.len();
        bad[n - 100] ^= 1;
        assert!(matches!(run(&bad), Err(UnsealError::PayloadDamaged)));
        // Truncation at a chunk boundary and mid-chunk.
        let hdr_end = sealed.windows(4).position(|w| w == b"\n---").unwrap() + 48;
        let first_chunk_end = hdr_end + 16 + 65536 + 16;
        assert!(matches!(run(&sealed[..first_chunk_end]), Err(UnsealError::Truncated | UnsealError::PayloadDamaged)));
        assert!(matches!(run(&sealed[..n - 10]), Err(UnsealError::PayloadDamaged)));
        // Header MAC.
        let mut bad = sealed.clone();
        let mac_pos = sealed.windows(4).position(|w| w == b"--- ").unwrap() + 6;
        bad[mac_pos] = if bad[mac_pos] == b'A' { b'B' } else { b'A' };
        assert!(matches!(run(&bad), Err(UnsealError::HeaderMac | UnsealError::HeaderDamaged(_))));
        // Not an age file; empty.
        assert!(matches!(run(b"hello world, this is not sealed"), Err(UnsealError::NotSealed)));
        assert!(matches!(run(b""), Err(UnsealError::Empty)));
        // A resolver whose key is wrong: the file key does not open.
        let wrong = KluisIdentity::new(|_: &KluisStanza| Ok::<_, Infallible>(DataKey::from_slice(&[8u8; 32]).unwrap()));
        assert!(matches!(
            unseal(sealed.as_slice(), Some(&wrong), &[], Vec::new()),
            Err(UnsealError::FileKeyMismatch)
        ));
    }
}
