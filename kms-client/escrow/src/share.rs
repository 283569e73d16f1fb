//! Share files: the decrypted share text, reading (and decrypting) share files, and
//! checking one share against the manifest on its own.
//!
//! # Grammar of the share text
//!
//! What [`ShareText::to_text`] writes (the plaintext of `share-NAME.age`), in ABNF
//! (RFC 5234); [`ShareText::parse`] reads exactly this and refuses anything else with an
//! error that names the line (1-based, counted in the text after the optional BOM):
//!
//! ```text
//! share-text     = [BOM] header-line
//!                  *ignored ceremony-line  *ignored custodian-line *ignored index-line
//!                  *ignored threshold-line *ignored shares-line    *ignored recipient-line
//!                  *ignored share-line     *ignored
//! header-line    = "kluis-escrow-share v1" *WSP eol
//! ceremony-line  = "ceremony"           ":" *WSP ceremony-id *WSP eol
//! custodian-line = "custodian"          ":" *WSP custodian   *WSP eol
//! index-line     = "index"              ":" *WSP number      *WSP eol  ; 1..=255
//! threshold-line = "threshold"          ":" *WSP number      *WSP eol  ; 2..=shares
//! shares-line    = "shares"             ":" *WSP number      *WSP eol  ; 2..=255
//! recipient-line = "recovery-recipient" ":" *WSP recipient   *WSP eol
//! share-line     = "share"              ":" *WSP share-value *WSP eol
//! ignored        = blank-line / comment-line
//! blank-line     = *WSP eol
//! comment-line   = "#" *text eol
//! ceremony-id    = 32(DIGIT / %x61-66)          ; lowercase hexadecimal
//! custodian      = 1*64(ALPHA / DIGIT / "." / "_" / "-")
//! number         = "0" / %x31-39 *2DIGIT        ; decimal, no sign, no leading zero
//! recipient      = an age X25519 recipient, "age1" + lowercase Bech32, as age writes it
//! share-value    = base64, standard alphabet (RFC 4648 section 4), canonical, padding
//!                  optional; decodes to exactly 33 bytes whose first byte is the index
//! eol            = LF / CRLF / end of text (on the last line only)
//! WSP            = SP / HTAB
//! text           = any Unicode scalar value but the controls (U+0000..U+001F except HTAB,
//!                  U+007F..U+009F)
//! BOM            = %xFEFF
//! ```
//!
//! So: the header is the first line; the seven fields come once each, in this order,
//! names in lowercase, each on a line of its own with nothing before the name; blank
//! lines and `#` comment lines may stand between and after them; no control character
//! anywhere; the text is at most 16 KiB. The tolerances (a BOM, CRLF line ends, white
//! space after the colon and at the end of a line, missing base64 padding, no final
//! newline) are what an editor or a custodian retyping a share may add; none changes a
//! value. That the index is at most the number of shares, and every other agreement with
//! the ceremony, is checked against the manifest ([`verify_share`]), not here.

use std::fmt::{self, Write as _};
use std::io::BufReader;
use std::path::Path;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use kluis_age::fsutil;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::error::EscrowError;
use super::manifest::{self, Manifest};
use super::recipient::{self, StderrCallbacks};
use super::secret::SECRET_LEN;

/// The first line of every share text.
pub const SHARE_HEADER: &str = "kluis-escrow-share v1";

/// A blahaj share: one index byte, then one y byte per secret byte.
pub(crate) const SHARE_BYTES_LEN: usize = 1 + SECRET_LEN;

/// A share text is about 300 bytes; a share file (encrypted) well under 1 KiB.
const SHARE_TEXT_LIMIT: usize = 16 * 1024;
const SHARE_FILE_LIMIT: usize = 64 * 1024;

const AGE_MAGIC: &str = "age-encryption.org/v1";
const AGE_ARMOR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";

/// Base64 as written (standard alphabet, padded); on reading, missing padding is accepted
/// (a custodian retyping a share may drop the `=`).
const B64_WRITE: GeneralPurpose = base64::engine::general_purpose::STANDARD;
const B64_READ: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One custodian's share, as decrypted from a share file.
///
/// Holds secret material: zeroized on drop, and its `Debug` shows only public fields.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct ShareText {
    ceremony_id: String,
    custodian: String,
    index: u8,
    threshold: u8,
    shares: u8,
    recovery_recipient: String,
    share: Vec<u8>,
}

/// The fields of the v1 share text, in the order they are written.
const F_CEREMONY: &str = "ceremony";
const F_CUSTODIAN: &str = "custodian";
const F_INDEX: &str = "index";
const F_THRESHOLD: &str = "threshold";
const F_SHARES: &str = "shares";
const F_RECIPIENT: &str = "recovery-recipient";
const F_SHARE: &str = "share";
const FIELDS: [&str; 7] = [
    F_CEREMONY,
    F_CUSTODIAN,
    F_INDEX,
    F_THRESHOLD,
    F_SHARES,
    F_RECIPIENT,
    F_SHARE,
];

impl ShareText {
    /// Parses a decrypted share text, exactly by the grammar in the module documentation.
    pub fn parse(text: &str) -> Result<ShareText, EscrowError> {
        if text.len() > SHARE_TEXT_LIMIT {
            return Err(EscrowError::ShareTextTooLarge {
                len: text.len(),
                limit: SHARE_TEXT_LIMIT,
            });
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let start = text.trim_start();
        if start.starts_with(AGE_MAGIC) || start.starts_with(AGE_ARMOR_BEGIN) {
            return Err(EscrowError::StillEncrypted);
        }

        let mut lines = split_lines(text);
        match lines.next() {
            Some((_, header)) if trim_wsp_end(header) == SHARE_HEADER => {}
            Some((_, header)) if header.starts_with("kluis-escrow-share") => {
                return Err(EscrowError::UnsupportedShareVersion {
                    found: header.chars().take(64).collect(),
                });
            }
            _ => return Err(EscrowError::NotAShare),
        }

        // Each field once; where it stood.
        let mut values: [Option<(usize, &str)>; FIELDS.len()] = [None; FIELDS.len()];
        for (line, raw) in lines {
            if raw.chars().any(|c| c.is_control() && c != '\t') {
                return Err(EscrowError::ControlCharacter { line });
            }
            let content = trim_wsp_end(raw);
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            if content.starts_with([' ', '\t']) {
                return Err(EscrowError::MalformedLine {
                    line,
                    why: "it starts with white space",
                });
            }
            let Some((name, value)) = content.split_once(':') else {
                return Err(EscrowError::MalformedLine {
                    line,
                    why: "it has no colon",
                });
            };
            let Some(slot) = FIELDS.iter().position(|f| *f == name) else {
                return Err(EscrowError::UnknownField {
                    line,
                    field: name.chars().take(40).collect(),
                });
            };
            if values[slot].is_some() {
                return Err(EscrowError::DuplicateField {
                    line,
                    field: FIELDS[slot],
                });
            }
            values[slot] = Some((line, value.trim_start_matches([' ', '\t'])));
        }
        let mut fields = [(0usize, ""); FIELDS.len()];
        for (i, field) in FIELDS.iter().enumerate() {
            fields[i] = values[i].ok_or(EscrowError::MissingField { field })?;
        }
        for i in 1..FIELDS.len() {
            if fields[i].0 < fields[i - 1].0 {
                return Err(EscrowError::OutOfOrder {
                    line: fields[i].0,
                    field: FIELDS[i],
                    after: FIELDS[i - 1],
                });
            }
        }
        let [ceremony, custodian, index, threshold, shares, recipient, share] = fields;

        let bad = |(line, _): (usize, &str), field: &'static str, expected: &'static str| {
            EscrowError::BadField {
                line,
                field,
                expected,
            }
        };
        if !manifest::is_lower_hex(ceremony.1, 32) {
            return Err(bad(
                ceremony,
                F_CEREMONY,
                "a ceremony id of 32 lowercase hexadecimal digits",
            ));
        }
        if !manifest::valid_custodian_name(custodian.1) {
            return Err(bad(
                custodian,
                F_CUSTODIAN,
                "a custodian name of 1 to 64 letters, digits, '.', '_' and '-'",
            ));
        }
        let index_value = parse_number(index.1)
            .ok_or_else(|| bad(index, F_INDEX, "a share index from 1 to 255"))?;
        if index_value == 0 {
            return Err(EscrowError::IndexZero);
        }
        let shares_value = parse_number(shares.1)
            .filter(|n| *n >= 2)
            .ok_or_else(|| bad(shares, F_SHARES, "a number of shares from 2 to 255"))?;
        let threshold_value = parse_number(threshold.1)
            .filter(|k| (2..=shares_value).contains(k))
            .ok_or_else(|| {
                bad(
                    threshold,
                    F_THRESHOLD,
                    "a number from 2 up to the number of shares",
                )
            })?;
        if !is_canonical_x25519_recipient(recipient.1) {
            return Err(bad(
                recipient,
                F_RECIPIENT,
                "an age X25519 recipient (age1..., lowercase)",
            ));
        }

        let share_bytes = decode_share_value(share.1, share.0)?;
        let embedded = share_bytes.first().copied().unwrap_or(0);
        if embedded != index_value {
            return Err(EscrowError::ShareIndexMismatch {
                field: index_value,
                embedded,
            });
        }

        Ok(ShareText {
            ceremony_id: ceremony.1.to_owned(),
            custodian: custodian.1.to_owned(),
            index: index_value,
            threshold: threshold_value,
            shares: shares_value,
            recovery_recipient: recipient.1.to_owned(),
            share: share_bytes,
        })
    }

    /// The ceremony this share belongs to.
    pub fn ceremony_id(&self) -> &str {
        &self.ceremony_id
    }

    /// The custodian this share was made for.
    pub fn custodian(&self) -> &str {
        &self.custodian
    }

    /// The share index (1..=shares).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Shares needed to rebuild the key, as written in the share.
    pub fn threshold(&self) -> u8 {
        self.threshold
    }

    /// Shares made in the ceremony, as written in the share.
    pub fn shares(&self) -> u8 {
        self.shares
    }

    /// The recovery recipient, as written in the share.
    pub fn recovery_recipient(&self) -> &str {
        &self.recovery_recipient
    }

    /// The secret share bytes (blahaj encoding: index byte, then the y bytes).
    pub(crate) fn share_bytes(&self) -> &[u8] {
        &self.share
    }

    pub(crate) fn new(
        ceremony_id: &str,
        custodian: &str,
        threshold: u8,
        shares: u8,
        recovery_recipient: &str,
        share: &[u8],
    ) -> ShareText {
        ShareText {
            ceremony_id: ceremony_id.to_owned(),
            custodian: custodian.to_owned(),
            index: share.first().copied().unwrap_or(0),
            threshold,
            shares,
            recovery_recipient: recovery_recipient.to_owned(),
            share: share.to_vec(),
        }
    }

    /// The share text, as encrypted into a share file.
    pub(crate) fn to_text(&self) -> Result<Zeroizing<String>, EscrowError> {
        // Allocated once, large enough never to grow.
        let mut text = Zeroizing::new(String::with_capacity(2048));
        let write = |text: &mut String| -> fmt::Result {
            writeln!(text, "{SHARE_HEADER}")?;
            writeln!(text, "{F_CEREMONY}: {}", self.ceremony_id)?;
            writeln!(text, "{F_CUSTODIAN}: {}", self.custodian)?;
            writeln!(text, "{F_INDEX}: {}", self.index)?;
            writeln!(text, "{F_THRESHOLD}: {}", self.threshold)?;
            writeln!(text, "{F_SHARES}: {}", self.shares)?;
            writeln!(text, "{F_RECIPIENT}: {}", self.recovery_recipient)?;
            write!(text, "{F_SHARE}: ")?;
            B64_WRITE.encode_string(&self.share, text);
            writeln!(text)?;
            writeln!(text)?;
            writeln!(
                text,
                "# One share of the Kluis escrow recovery key, for custodian {}.",
                self.custodian
            )?;
            writeln!(
                text,
                "# Alone it reveals nothing; {} of the {} custodians together can rebuild the key.",
                self.threshold, self.shares
            )?;
            writeln!(
                text,
                "# Keep it secret and safe. Check it with `kmsctl escrow verify-share`."
            )
        };
        write(&mut text).map_err(|_| EscrowError::KeyEncoding)?;
        Ok(text)
    }
}

/// The lines of `text` with their 1-based numbers: split at LF, a CR before the LF
/// dropped; no empty last line after a final newline.
fn split_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let body = text.strip_suffix('\n').unwrap_or(text);
    body.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(move |_| !text.is_empty())
}

fn trim_wsp_end(s: &str) -> &str {
    s.trim_end_matches([' ', '\t'])
}

/// `number` of the grammar: `0` or 1 to 3 decimal digits without a leading zero, at most 255.
fn parse_number(value: &str) -> Option<u8> {
    let canonical = !value.is_empty()
        && value.len() <= 3
        && value.bytes().all(|b| b.is_ascii_digit())
        && (value == "0" || !value.starts_with('0'));
    if canonical { value.parse().ok() } else { None }
}

/// An age X25519 recipient written exactly as age writes it (lowercase Bech32).
pub(crate) fn is_canonical_x25519_recipient(value: &str) -> bool {
    value.starts_with("age1")
        && value
            .parse::<age::x25519::Recipient>()
            .is_ok_and(|r| r.to_string() == value)
}

/// Decodes the base64 `share:` value (on line `line`) into exactly [`SHARE_BYTES_LEN`]
/// bytes, through a zeroized buffer.
fn decode_share_value(value: &str, line: usize) -> Result<Vec<u8>, EscrowError> {
    let mut buf = Zeroizing::new([0u8; 96]);
    let n = match B64_READ.decode_slice(value, &mut buf[..]) {
        Ok(n) => n,
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
            return Err(EscrowError::BadShareLength {
                line,
                len: value.len() / 4 * 3,
            });
        }
        Err(base64::DecodeSliceError::DecodeError(_)) => {
            return Err(EscrowError::BadShareEncoding { line });
        }
    };
    if n != SHARE_BYTES_LEN {
        return Err(EscrowError::BadShareLength { line, len: n });
    }
    Ok(buf[..n].to_vec())
}

impl fmt::Debug for ShareText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShareText")
            .field("ceremony_id", &self.ceremony_id)
            .field("custodian", &self.custodian)
            .field("index", &self.index)
            .field("threshold", &self.threshold)
            .field("shares", &self.shares)
            .field("recovery_recipient", &self.recovery_recipient)
            .field("share", &"<redacted>")
            .finish()
    }
}

/// Identities (from age identity files) to open encrypted share files with.
pub struct ShareIdentities {
    identities: Vec<Box<dyn age::Identity + Send + Sync>>,
}

impl ShareIdentities {
    /// No identities: share files must already be decrypted.
    pub fn none() -> ShareIdentities {
        ShareIdentities {
            identities: Vec::new(),
        }
    }

    /// Loads age identity files (`AGE-SECRET-KEY-1...` or plugin identities such as
    /// `AGE-PLUGIN-YUBIKEY-1...`).
    pub fn from_files<P: AsRef<Path>>(paths: &[P]) -> Result<ShareIdentities, EscrowError> {
        let mut identities = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let file = std::fs::File::open(path).map_err(|source| EscrowError::IdentityFile {
                path: path.to_owned(),
                source,
            })?;
            let parsed = age::IdentityFile::from_buffer(BufReader::new(file))
                .map_err(|source| EscrowError::IdentityFile {
                    path: path.to_owned(),
                    source,
                })?
                .with_callbacks(StderrCallbacks)
                .into_identities()
                .map_err(|e| EscrowError::IdentityFile {
                    path: path.to_owned(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            if parsed.is_empty() {
                return Err(EscrowError::IdentityFile {
                    path: path.to_owned(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the file contains no age identity",
                    ),
                });
            }
            identities.extend(parsed);
        }
        Ok(ShareIdentities { identities })
    }

    /// True if no identity was loaded.
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }
}

/// Reads a share file: the decrypted share text, or the age-encrypted share file itself
/// (binary or armored) if `identity_file` is given.
pub fn read_share(path: &Path, identity_file: Option<&Path>) -> Result<ShareText, EscrowError> {
    let identities = match identity_file {
        Some(p) => ShareIdentities::from_files(&[p])?,
        None => ShareIdentities::none(),
    };
    read_share_with(path, &identities)
}

/// [`read_share`] with identities loaded once for several share files.
pub fn read_share_with(
    path: &Path,
    identities: &ShareIdentities,
) -> Result<ShareText, EscrowError> {
    let data = read_file_capped(path, SHARE_FILE_LIMIT)?;
    decode_share(&data, identities)
}

/// Reads a file of at most `limit` bytes: one larger is refused by its size before any of
/// it is read, and the read itself stops after `limit + 1` bytes (a file that grows, a
/// FIFO, a device).
pub(crate) fn read_file_capped(path: &Path, limit: usize) -> Result<Zeroizing<Vec<u8>>, EscrowError> {
    let file = std::fs::File::open(path).map_err(|e| EscrowError::io("open", path, e))?;
    let meta = file.metadata().map_err(|e| EscrowError::io("read", path, e))?;
    if meta.is_dir() {
        return Err(EscrowError::io(
            "read",
            path,
            std::io::Error::new(std::io::ErrorKind::IsADirectory, "it is a directory"),
        ));
    }
    if meta.is_file() && meta.len() > u64::try_from(limit).unwrap_or(u64::MAX) {
        return Err(EscrowError::FileTooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(fsutil::read_limited(file, path, limit)?)
}

/// Decodes the content of a share file (decrypted text, or age-encrypted and opened with
/// `identities`).
pub fn decode_share(data: &[u8], identities: &ShareIdentities) -> Result<ShareText, EscrowError> {
    let head_start = data
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(data.len());
    let head = &data[head_start..];
    let encrypted =
        head.starts_with(AGE_MAGIC.as_bytes()) || head.starts_with(AGE_ARMOR_BEGIN.as_bytes());
    if !encrypted {
        return ShareText::parse(share_text_utf8(data)?);
    }
    if identities.is_empty() {
        return Err(EscrowError::StillEncrypted);
    }
    let plaintext = recipient::decrypt_limited(head, &identities.identities, SHARE_TEXT_LIMIT)?
        .ok_or(EscrowError::NotAShare)?;
    ShareText::parse(share_text_utf8(&plaintext)?)
}

/// The bytes of a share text as UTF-8: bytes that do not start with the share header are
/// not a share; after it, a byte that is not UTF-8 is named by its line.
fn share_text_utf8(data: &[u8]) -> Result<&str, EscrowError> {
    if data.len() > SHARE_TEXT_LIMIT {
        return Err(EscrowError::ShareTextTooLarge {
            len: data.len(),
            limit: SHARE_TEXT_LIMIT,
        });
    }
    std::str::from_utf8(data).map_err(|e| {
        let valid = &data[..e.valid_up_to()];
        let body = valid.strip_prefix("\u{feff}".as_bytes()).unwrap_or(valid);
        if body.starts_with(SHARE_HEADER.as_bytes()) {
            EscrowError::ShareNotUtf8 {
                line: body.iter().filter(|b| **b == b'\n').count() + 1,
            }
        } else {
            EscrowError::NotAShare
        }
    })
}

/// The public facts of a share that passed [`verify_share`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedShare {
    /// The ceremony it belongs to.
    pub ceremony_id: String,
    /// Its custodian (from the manifest).
    pub custodian: String,
    /// Its index.
    pub index: u8,
    /// Shares needed.
    pub threshold: u8,
    /// Shares made.
    pub shares: u8,
}

/// Checks one share against the manifest on its own: same ceremony, index within
/// 1..=shares and held by the custodian the share names, descriptive lines equal to the
/// manifest's, and the share bytes match the manifest's commitment (compared in constant
/// time). Needs no other share.
pub fn verify_share(manifest: &Manifest, share: &ShareText) -> Result<VerifiedShare, EscrowError> {
    manifest.validate()?;
    verify_against_valid(manifest, share)
}

/// [`verify_share`] for a manifest already validated.
pub(crate) fn verify_against_valid(
    manifest: &Manifest,
    share: &ShareText,
) -> Result<VerifiedShare, EscrowError> {
    if share.ceremony_id != manifest.ceremony_id {
        return Err(EscrowError::ForeignCeremony {
            custodian: share.custodian.clone(),
            expected: manifest.ceremony_id.clone(),
            found: share.ceremony_id.clone(),
        });
    }
    if share.index == 0 {
        return Err(EscrowError::IndexZero);
    }
    let out_of_range = || EscrowError::IndexOutOfRange {
        index: share.index,
        shares: manifest.shares,
    };
    if share.index > manifest.shares {
        return Err(out_of_range());
    }
    let entry = manifest.custodian(share.index).ok_or_else(out_of_range)?;
    if share.custodian != entry.name {
        return Err(EscrowError::CustodianMismatch {
            index: share.index,
            expected: entry.name.clone(),
            found: share.custodian.clone(),
        });
    }
    let mismatch =
        |field: &'static str, manifest: String, share: String| EscrowError::ShareFieldMismatch {
            custodian: entry.name.clone(),
            field,
            manifest,
            share,
        };
    if share.threshold != manifest.threshold {
        return Err(mismatch(
            F_THRESHOLD,
            manifest.threshold.to_string(),
            share.threshold.to_string(),
        ));
    }
    if share.shares != manifest.shares {
        return Err(mismatch(
            F_SHARES,
            manifest.shares.to_string(),
            share.shares.to_string(),
        ));
    }
    if share.recovery_recipient != manifest.recovery_recipient {
        return Err(mismatch(
            F_RECIPIENT,
            manifest.recovery_recipient.clone(),
            share.recovery_recipient.clone(),
        ));
    }
    let computed = manifest::share_commitment(&manifest.ceremony_id, share.index, &share.share);
    if share.share.len() != SHARE_BYTES_LEN
        || share.share.first() != Some(&share.index)
        || !manifest::constant_time_eq(computed.as_bytes(), entry.commitment.as_bytes())
    {
        return Err(EscrowError::CommitmentMismatch {
            custodian: entry.name.clone(),
            index: share.index,
        });
    }
    Ok(VerifiedShare {
        ceremony_id: manifest.ceremony_id.clone(),
        custodian: entry.name.clone(),
        index: share.index,
        threshold: manifest.threshold,
        shares: manifest.shares,
    })
}
