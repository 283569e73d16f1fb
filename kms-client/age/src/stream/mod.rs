//! The age v1 payload and header, written for speed and kept byte-for-byte
//! compatible with the C2SP age specification (and so with `age`, `rage` and
//! the `age` crate).
//!
//! Payload ("STREAM"): a 16-byte random nonce, then the plaintext in 64 KiB
//! chunks, each sealed with ChaCha20-Poly1305 under the payload key
//! `HKDF-SHA-256(ikm = file key, salt = nonce, info = "payload")` and the
//! nonce `11-byte big-endian chunk counter || last-chunk flag`. Only the final
//! chunk may be short; it may be empty only if the whole plaintext is.
//!
//! Speed: `ring`'s ChaCha20-Poly1305, and chunks are independent, so batches of
//! 16 chunks (1 MiB) are sealed or opened on worker threads while the calling
//! thread reads ahead and writes finished batches in order (see [`pipeline`]
//! for the threads and the memory bound). Output is written only after its
//! chunk authenticated.

pub mod header;
mod pipeline;
pub mod stdio;

#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};

use age_core::format::FileKey;
use age_core::primitives::hkdf;
use age_core::secrecy::ExposeSecret;
use ring::aead::{CHACHA20_POLY1305, LessSafeKey, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use pipeline::{Direction, run};
pub use pipeline::{THREADS_ENV, Tuning};
pub use stdio::{stdin_reader, stdout_writer};

/// Plaintext bytes per chunk.
pub const CHUNK_SIZE: usize = 64 * 1024;
/// Poly1305 tag bytes per chunk.
pub const TAG_SIZE: usize = 16;
/// Bytes of a full sealed chunk.
pub const ENC_CHUNK_SIZE: usize = CHUNK_SIZE + TAG_SIZE;
/// Bytes of the payload nonce that starts the payload.
pub const NONCE_SIZE: usize = 16;
const PAYLOAD_KEY_LABEL: &[u8] = b"payload";

/// Errors of the payload stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the input failed: {0}")]
    ReadInput(#[source] io::Error),
    #[error("writing the output failed: {0}")]
    WriteOutput(#[source] io::Error),
    /// The payload ends before its final chunk (or before its nonce).
    #[error("the payload is truncated")]
    Truncated,
    /// A chunk failed to authenticate, is misplaced, or data follows the final chunk.
    #[error("the payload is damaged")]
    Damaged,
    /// The system's random generator failed, or a worker thread died.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// The ChaCha20-Poly1305 key of one payload. No `Debug`; the raw bytes live
/// only in a zeroizing buffer while the `ring` key is made.
pub struct PayloadKey(LessSafeKey);

impl PayloadKey {
    /// `HKDF-SHA-256(ikm = file key, salt = nonce, info = "payload")`.
    pub fn derive(file_key: &FileKey, nonce: &[u8; NONCE_SIZE]) -> Self {
        let bytes = Zeroizing::new(hkdf(nonce, PAYLOAD_KEY_LABEL, file_key.expose_secret()));
        Self::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &Zeroizing<[u8; 32]>) -> Self {
        // A 32-byte key is always a valid ChaCha20-Poly1305 key.
        match UnboundKey::new(&CHACHA20_POLY1305, &bytes[..]) {
            Ok(k) => Self(LessSafeKey::new(k)),
            Err(_) => unreachable!("ChaCha20-Poly1305 takes a 32-byte key"),
        }
    }

    /// The `ring` key, for the payload pipeline.
    pub(crate) fn aead(&self) -> &LessSafeKey {
        &self.0
    }

    /// Opens chunk number `index` (ciphertext and tag, in place) as the last chunk or
    /// not: a rewrap checks that a header belongs to its payload by opening the first.
    pub fn open_chunk(&self, index: u64, last: bool, chunk: &mut [u8]) -> Result<(), ChunkDamaged> {
        self.0
            .open_in_place(pipeline::chunk_nonce(index, last), ring::aead::Aad::empty(), chunk)
            .map(|_| ())
            .map_err(|_| ChunkDamaged)
    }
}

/// A chunk did not authenticate under its key and nonce.
#[derive(Debug, thiserror::Error)]
#[error("the chunk does not authenticate")]
pub struct ChunkDamaged;

/// Fills `buf` from the system's random generator.
pub(crate) fn random(buf: &mut [u8]) -> Result<(), StreamError> {
    SystemRandom::new().fill(buf).map_err(|_| StreamError::Internal("the system random generator failed"))
}

/// Writes the payload of `input` to `output`: a fresh nonce, then the sealed
/// chunks. Returns the plaintext bytes read. Any error means the output is
/// incomplete (the final chunk is written last).
pub fn seal_payload<R: Read, W: Write>(
    file_key: &FileKey,
    input: &mut R,
    output: &mut W,
    tuning: Tuning,
) -> Result<u64, StreamError> {
    let mut nonce = [0u8; NONCE_SIZE];
    random(&mut nonce)?;
    output.write_all(&nonce).map_err(StreamError::WriteOutput)?;
    let key = PayloadKey::derive(file_key, &nonce);
    run(Direction::Seal, &key, tuning, input, output)
}

/// Reads a payload (nonce and sealed chunks, up to the end of `input`) and
/// writes its plaintext to `output`, each chunk only after it authenticated.
/// Returns the plaintext bytes written. On an error, what was written is the
/// plaintext of the chunks before the bad one (all authenticated), which the
/// caller should still discard.
pub fn open_payload<R: Read, W: Write>(
    file_key: &FileKey,
    input: &mut R,
    output: &mut W,
    tuning: Tuning,
) -> Result<u64, StreamError> {
    let mut nonce = [0u8; NONCE_SIZE];
    let mut got = 0;
    while got < NONCE_SIZE {
        match input.read(&mut nonce[got..]) {
            Ok(0) => return Err(StreamError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StreamError::ReadInput(e)),
        }
    }
    let key = PayloadKey::derive(file_key, &nonce);
    run(Direction::Open, &key, tuning, input, output)
}
