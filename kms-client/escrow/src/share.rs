//! Share files: the decrypted share text, reading (and decrypting) share files, and
//! checking one share against the manifest on its own.

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
    /// Parses a decrypted share text (see the module documentation for the format).
    ///
    /// Blank lines and lines starting with `#` are ignored; line endings may be LF or CRLF.
    pub fn parse(text: &str) -> Result<ShareText, EscrowError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let start = text.trim_start();
        if start.starts_with(AGE_MAGIC) || start.starts_with(AGE_ARMOR_BEGIN) {
            return Err(EscrowError::StillEncrypted);
        }

        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));

        match lines.next() {
            Some((_, header)) if header == SHARE_HEADER => {}
            Some((_, header)) if header.starts_with("kluis-escrow-share") => {
                return Err(EscrowError::UnsupportedShareVersion {
                    found: header.chars().take(64).collect(),
                });
            }
            _ => return Err(EscrowError::NotAShare),
        }

        let mut values: [Option<&str>; FIELDS.len()] = [None; FIELDS.len()];
        for (line_no, line) in lines {
            let Some((key, value)) = line.split_once(':') else {
                return Err(EscrowError::MalformedLine { line: line_no });
            };
            let key = key.trim();
            let Some(slot) = FIELDS.iter().position(|f| *f == key) else {
                return Err(EscrowError::UnknownField {
                    line: line_no,
                    field: key.chars().take(40).collect(),
                });
            };
            if values[slot].is_some() {
                return Err(EscrowError::DuplicateField {
                    field: FIELDS[slot],
                });
            }
            values[slot] = Some(value.trim());
        }
        let get = |field: &'static str| -> Result<&str, EscrowError> {
            FIELDS
                .iter()
                .position(|f| *f == field)
                .and_then(|i| values[i])
                .ok_or(EscrowError::MissingField { field })
        };

        let ceremony_id = get(F_CEREMONY)?.to_ascii_lowercase();
        if !manifest::is_lower_hex(&ceremony_id, 32) {
            return Err(EscrowError::BadField {
                field: F_CEREMONY,
                expected: "a ceremony id of 32 hexadecimal digits",
            });
        }
        let custodian = get(F_CUSTODIAN)?.to_owned();
        if !manifest::valid_custodian_name(&custodian) {
            return Err(EscrowError::BadField {
                field: F_CUSTODIAN,
                expected: "a custodian name of letters, digits, '.', '_' and '-'",
            });
        }
        let index = parse_u8(get(F_INDEX)?, F_INDEX)?;
        if index == 0 {
            return Err(EscrowError::IndexZero);
        }
        let threshold = parse_u8(get(F_THRESHOLD)?, F_THRESHOLD)?;
        let shares = parse_u8(get(F_SHARES)?, F_SHARES)?;
        if threshold < 2 || threshold > shares {
            return Err(EscrowError::BadField {
                field: F_THRESHOLD,
                expected: "a number from 2 up to the number of shares",
            });
        }
        let recovery_recipient = get(F_RECIPIENT)?.to_owned();
        if recovery_recipient
            .parse::<age::x25519::Recipient>()
            .is_err()
        {
            return Err(EscrowError::BadField {
                field: F_RECIPIENT,
                expected: "an age recipient (age1...)",
            });
        }

        let share = decode_share_value(get(F_SHARE)?)?;
        let embedded = share.first().copied().unwrap_or(0);
        if embedded != index {
            return Err(EscrowError::ShareIndexMismatch {
                field: index,
                embedded,
            });
        }

        Ok(ShareText {
            ceremony_id,
            custodian,
            index,
            threshold,
            shares,
            recovery_recipient,
            share,
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

fn parse_u8(value: &str, field: &'static str) -> Result<u8, EscrowError> {
    value.parse::<u8>().map_err(|_| EscrowError::BadField {
        field,
        expected: "a number from 0 to 255",
    })
}

/// Decodes the base64 `share:` value into exactly [`SHARE_BYTES_LEN`] bytes, through a
/// zeroized buffer.
fn decode_share_value(value: &str) -> Result<Vec<u8>, EscrowError> {
    let mut buf = Zeroizing::new([0u8; 96]);
    let n = match B64_READ.decode_slice(value, &mut buf[..]) {
        Ok(n) => n,
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
            return Err(EscrowError::BadShareLength {
                len: value.len() / 4 * 3,
            });
        }
        Err(base64::DecodeSliceError::DecodeError(_)) => return Err(EscrowError::BadShareEncoding),
    };
    if n != SHARE_BYTES_LEN {
        return Err(EscrowError::BadShareLength { len: n });
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
    let data = fsutil::read_file_limited(path, SHARE_FILE_LIMIT)?;
    decode_share(&data, identities)
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
        let text = std::str::from_utf8(data).map_err(|_| EscrowError::NotAShare)?;
        return ShareText::parse(text);
    }
    if identities.is_empty() {
        return Err(EscrowError::StillEncrypted);
    }
    let plaintext = recipient::decrypt_limited(head, &identities.identities, SHARE_TEXT_LIMIT)?
        .ok_or(EscrowError::NotAShare)?;
    let text = std::str::from_utf8(&plaintext).map_err(|_| EscrowError::NotAShare)?;
    ShareText::parse(text)
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
