//! The age v1 header: reading, checking and writing.
//!
//! ```text
//! age-encryption.org/v1
//! -> TAG ARG...
//! BODY (canonical base64, no padding, 64 columns, final line shorter, empty if need be)
//! ...
//! --- MAC
//! ```
//! `MAC = HMAC-SHA-256(key = HKDF-SHA-256(ikm = file key, salt = "", info = "header"),
//! message = the header up to and including "---")`.
//!
//! Stanzas are parsed with `age_core`'s own parser (the one the `age` crate
//! uses, including its tolerance of the legacy body encoding), so what this
//! accepts is what `age` accepts.

use std::io::{self, Read};

use age_core::format::{FileKey, Stanza, is_arbitrary_string, read::legacy_age_stanza};
use age_core::primitives::hkdf;
use age_core::secrecy::ExposeSecret;
use base64::Engine;
use base64::prelude::BASE64_STANDARD_NO_PAD;
use ring::hmac;
use zeroize::Zeroizing;

/// Every age file starts with this.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/";
const V1_LINE: &[u8] = b"age-encryption.org/v1\n";
const STANZA_PREFIX: &[u8] = b"-> ";
const MAC_PREFIX: &[u8] = b"---";
const ENCODED_MAC_LEN: usize = 43;
const HEADER_KEY_LABEL: &[u8] = b"header";
/// Headers longer than this are refused (thousands of recipients fit).
pub const MAX_HEADER: usize = 1 << 20;
const READ_STEP: usize = 16 * 1024;
const SCRYPT_TAG: &str = "scrypt";

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the input is empty")]
    Empty,
    #[error("the input does not start with an age header")]
    NotAge,
    #[error("the age header is malformed, truncated or of an unknown version")]
    Damaged,
    #[error("reading the input failed: {0}")]
    Read(#[source] io::Error),
    #[error("a stanza cannot be written in an age header: {0}")]
    Unwritable(&'static str),
}

/// A parsed v1 header whose MAC is still to be checked (that needs the file key).
pub struct Header {
    pub stanzas: Vec<Stanza>,
    /// The header bytes the MAC covers (up to and including `---`).
    mac_input: Vec<u8>,
    mac: [u8; 32],
}

impl Header {
    /// Checks the header MAC (constant time) with the file key a stanza gave.
    pub fn verify_mac(&self, file_key: &FileKey) -> Result<(), HeaderMacMismatch> {
        hmac::verify(&mac_key(file_key), &self.mac_input, &self.mac).map_err(|_| HeaderMacMismatch)
    }
}

/// The header MAC does not verify under the file key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the header MAC does not verify")]
pub struct HeaderMacMismatch;

fn mac_key(file_key: &FileKey) -> hmac::Key {
    let k = Zeroizing::new(hkdf(&[], HEADER_KEY_LABEL, file_key.expose_secret()));
    hmac::Key::new(hmac::HMAC_SHA256, &k[..])
}

/// Appends the canonical encoding of one stanza (its `-> ` line and body lines).
fn encode_stanza(s: &Stanza, out: &mut Vec<u8>) -> Result<(), HeaderError> {
    if !is_arbitrary_string(&s.tag) {
        return Err(HeaderError::Unwritable("a stanza tag must be printable ASCII without spaces"));
    }
    if !s.args.iter().all(is_arbitrary_string) {
        return Err(HeaderError::Unwritable("a stanza argument must be printable ASCII without spaces"));
    }
    out.extend_from_slice(STANZA_PREFIX);
    out.extend_from_slice(s.tag.as_bytes());
    for a in &s.args {
        out.push(b' ');
        out.extend_from_slice(a.as_bytes());
    }
    out.push(b'\n');
    let body = BASE64_STANDARD_NO_PAD.encode(&s.body);
    let mut lines = body.as_bytes().chunks_exact(64);
    for line in lines.by_ref() {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    // The final line is always shorter than 64 columns: empty if need be.
    out.extend_from_slice(lines.remainder());
    out.push(b'\n');
    Ok(())
}

/// Closes a header: `mac_input` ends with the stanzas; appends `---`, the MAC over
/// everything up to it, and the newline.
fn close_with_mac(file_key: &FileKey, mut out: Vec<u8>) -> Vec<u8> {
    out.extend_from_slice(MAC_PREFIX);
    let tag = hmac::sign(&mac_key(file_key), &out);
    out.push(b' ');
    out.extend_from_slice(BASE64_STANDARD_NO_PAD.encode(tag.as_ref()).as_bytes());
    out.push(b'\n');
    out
}

/// Writes a v1 header for `stanzas`, MACed with `file_key`.
pub fn write(file_key: &FileKey, stanzas: &[Stanza]) -> Result<Vec<u8>, HeaderError> {
    let mut out = Vec::with_capacity(256 * (stanzas.len() + 1));
    out.extend_from_slice(V1_LINE);
    for s in stanzas {
        encode_stanza(s, &mut out)?;
    }
    Ok(close_with_mac(file_key, out))
}

/// The header `raw` with the stanza at byte range `span` replaced by `stanza` (in its
/// canonical encoding) and a new MAC under `file_key`; every other byte before the
/// `---` that ends at `dashes_end` is kept as it was (other stanzas stay byte for
/// byte). The same writer and MAC as [`write`]; the caller checks the result parses.
pub fn replace_stanza(
    raw: &[u8],
    span: std::ops::Range<usize>,
    dashes_end: usize,
    stanza: &Stanza,
    file_key: &FileKey,
) -> Result<Vec<u8>, HeaderError> {
    let bad = || HeaderError::Unwritable("the stanza to replace is not inside the header");
    let mac_start = dashes_end.checked_sub(MAC_PREFIX.len()).ok_or_else(bad)?;
    if span.start < V1_LINE.len() || span.end > mac_start || span.start > span.end || raw.get(mac_start..dashes_end) != Some(MAC_PREFIX) {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(raw.len() + 256);
    out.extend_from_slice(&raw[..span.start]);
    encode_stanza(stanza, &mut out)?;
    out.extend_from_slice(&raw[span.end..mac_start]);
    Ok(close_with_mac(file_key, out))
}

/// Reads a header from `input`. Returns it and the bytes read past it (the
/// start of the payload), which the caller must read before the rest of `input`.
pub fn read<R: Read + ?Sized>(input: &mut R) -> Result<(Header, Vec<u8>), HeaderError> {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_STEP);
    // Where to look for "\n---" next, and where the "---" line starts once found.
    let mut scan = 0;
    let mut mac_line: Option<usize> = None;
    loop {
        // Enough to decide?
        if buf.len() < AGE_MAGIC.len() {
            if !AGE_MAGIC.starts_with(&buf) {
                return Err(HeaderError::NotAge);
            }
        } else if !buf.starts_with(AGE_MAGIC) {
            return Err(HeaderError::NotAge);
        } else if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            if &buf[..=nl] != V1_LINE {
                return Err(HeaderError::Damaged);
            }
            if mac_line.is_none() {
                if let Some(p) = find(&buf[scan..], b"\n---") {
                    mac_line = Some(scan + p + 1);
                } else {
                    scan = buf.len().saturating_sub(3);
                }
            }
            if let Some(m) = mac_line
                && let Some(e) = buf[m..].iter().position(|&b| b == b'\n')
            {
                let rest = buf.split_off(m + e + 1);
                return Ok((parse(&buf)?, rest));
            }
        } else if buf.len() > V1_LINE.len() {
            return Err(HeaderError::Damaged);
        }
        if buf.len() >= MAX_HEADER {
            return Err(HeaderError::Damaged);
        }
        // Read more.
        let old = buf.len();
        buf.resize(old + READ_STEP.min(MAX_HEADER - old), 0);
        let n = loop {
            match input.read(&mut buf[old..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HeaderError::Read(e)),
            }
        };
        buf.truncate(old + n);
        if n == 0 {
            return Err(if buf.is_empty() {
                HeaderError::Empty
            } else if buf.len() < AGE_MAGIC.len() {
                HeaderError::NotAge
            } else {
                HeaderError::Damaged
            });
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses a complete header: the version line, one or more stanzas, the MAC line.
pub fn parse(h: &[u8]) -> Result<Header, HeaderError> {
    let rest = h.strip_prefix(V1_LINE).ok_or(HeaderError::Damaged)?;
    let mac_line = rest.strip_suffix(b"\n").ok_or(HeaderError::Damaged)?;
    // The stanzas, then "---" (kept as a terminator the parser stops at).
    let dashes = find(mac_line, b"\n---").map(|p| p + 1).or_else(|| mac_line.starts_with(MAC_PREFIX).then_some(0));
    let Some(dashes) = dashes else { return Err(HeaderError::Damaged) };
    let mac_text = &mac_line[dashes + MAC_PREFIX.len()..];
    let mut section = &mac_line[..dashes + MAC_PREFIX.len()];
    let mut stanzas = Vec::new();
    while section != MAC_PREFIX {
        if !section.starts_with(STANZA_PREFIX) {
            return Err(HeaderError::Damaged);
        }
        match legacy_age_stanza(section) {
            Ok((r, s)) if r.len() < section.len() => {
                stanzas.push(Stanza::from(s));
                section = r;
            }
            _ => return Err(HeaderError::Damaged),
        }
    }
    if stanzas.is_empty() {
        return Err(HeaderError::Damaged);
    }
    // An scrypt stanza must be the only one (as the `age` crate enforces).
    if stanzas.len() > 1 && stanzas.iter().any(|s| s.tag == SCRYPT_TAG) {
        return Err(HeaderError::Damaged);
    }
    let encoded = mac_text.strip_prefix(b" ").ok_or(HeaderError::Damaged)?;
    if encoded.len() != ENCODED_MAC_LEN {
        return Err(HeaderError::Damaged);
    }
    // Canonical base64 only: the decoder refuses padding and trailing bits.
    // (The decoder wants room for its 33-byte estimate of 43 characters.)
    let mut decoded = [0u8; 33];
    let mut mac = [0u8; 32];
    match BASE64_STANDARD_NO_PAD.decode_slice(encoded, &mut decoded) {
        Ok(32) => mac.copy_from_slice(&decoded[..32]),
        _ => return Err(HeaderError::Damaged),
    }
    let mac_input_len = V1_LINE.len() + dashes + MAC_PREFIX.len();
    Ok(Header { stanzas, mac_input: h[..mac_input_len].to_vec(), mac })
}

#[cfg(test)]
mod replace_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn stanza(tag: &str, body: &[u8]) -> Stanza {
        Stanza { tag: tag.into(), args: vec!["a1".into()], body: body.to_vec() }
    }

    #[test]
    fn replacing_a_stanza_gives_what_write_would_have_written() {
        let fk = FileKey::new(Box::new([7u8; 16]));
        let (a, b, c) = (stanza("one", &[1; 40]), stanza("two", &[2; 80]), stanza("three", &[3; 100]));
        let old = write(&fk, &[stanza("one", &[1; 40]), b]).unwrap();
        let dashes_end = old.windows(4).position(|w| w == b"\n---").unwrap() + 4;
        let mut first = Vec::new();
        encode_stanza(&a, &mut first).unwrap();
        let span = V1_LINE.len() + first.len()..dashes_end - 3;
        let new = replace_stanza(&old, span, dashes_end, &c, &fk).unwrap();
        assert_eq!(new, write(&fk, &[a, stanza("three", &[3; 100])]).unwrap());
        parse(&new).unwrap().verify_mac(&fk).unwrap();
        // A span outside the stanzas, or a wrong end of the MAC input, is refused.
        assert!(replace_stanza(&old, 0..5, dashes_end, &c, &fk).is_err());
        assert!(replace_stanza(&old, V1_LINE.len()..V1_LINE.len(), dashes_end - 1, &c, &fk).is_err());
    }
}
