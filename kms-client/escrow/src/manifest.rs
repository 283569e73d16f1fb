//! The ceremony manifest (`manifest.json`): public, installed on the server, given to every
//! custodian. It holds no secret: the commitments are hashes of shares that reveal nothing
//! a guesser of the 256-bit key could not already check against the recovery recipient.
//!
//! # Grammar of the manifest
//!
//! What [`Manifest::to_json`] writes, and all that [`Manifest::parse`] (the server's
//! `InstallEscrow`) and [`Manifest::load`] (kmsctl) accept: one JSON text (RFC 8259,
//! UTF-8, no BOM, at most 256 KiB, nothing but white space after it) that is an object
//! with exactly these members, each once, in any order; no other member, no other type:
//!
//! ```text
//! format              string  "kluis-escrow-manifest/v1"
//! ceremony_id         string  32 lowercase hexadecimal digits
//! created             string  RFC 3339 UTC in whole seconds: YYYY-MM-DDTHH:MM:SSZ
//! recovery_recipient  string  an age X25519 recipient, age1 + lowercase Bech32
//! threshold           integer 2..=shares
//! shares              integer 2..=255
//! custodians          array   exactly `shares` objects, each with exactly:
//!   name              string  [A-Za-z0-9._-]{1,64}, unique ignoring ASCII case
//!   recipient         string  an age recipient (X25519 or plugin), no surrounding
//!                             white space, not the recovery recipient
//!   index             integer 1..=shares, each index once
//!   commitment        string  64 lowercase hexadecimal digits
//! replaces            string or null, optional (absent = null): the 32-hex-digit id of
//!                             another ceremony
//! ```
//!
//! Objects are JSON objects (never an array of their values in order, which serde would
//! take). Integers are JSON integers without fraction or exponent (`3`, never `3.0` or `"3"`);
//! strings may use any JSON escape, and their decoded value must match. The depth is
//! fixed by the shape (three levels), so nesting is bounded before any size matters.
//! A refusal names the field by its JSON path: `custodians[1].index`, or `.` for the
//! whole text.

use std::path::{Path, PathBuf};

use ring::digest;
use serde::{Deserialize, Serialize};

use super::error::{EscrowError, ManifestError, ManifestProblem};
use super::recipient;
use super::share;

/// The value of the manifest's `format` field.
pub const MANIFEST_FORMAT: &str = "kluis-escrow-manifest/v1";

/// The manifest's file name inside a ceremony directory.
pub const MANIFEST_FILE_NAME: &str = "manifest.json";

/// A manifest of 255 custodians is under 100 KiB; anything above this is not one.
pub(crate) const MANIFEST_SIZE_LIMIT: usize = 256 * 1024;

/// Domain separation for share commitments.
const COMMITMENT_DOMAIN: &[u8] = b"kluis-escrow-share-commitment/v1\0";

/// The public record of one escrow ceremony.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Random 128-bit id, 32 lowercase hex digits.
    pub ceremony_id: String,
    /// When the ceremony ran, RFC 3339 UTC.
    pub created: String,
    /// The recovery recipient (`age1...`) that sealed backups are encrypted to.
    pub recovery_recipient: String,
    /// Shares needed to rebuild the recovery key (k).
    pub threshold: u8,
    /// Shares made (n), one per custodian.
    pub shares: u8,
    /// One entry per custodian.
    #[serde(deserialize_with = "custodian_objects")]
    pub custodians: Vec<CustodianEntry>,
    /// The ceremony this one replaces (re-share), if any.
    #[serde(default)]
    pub replaces: Option<String>,
}

/// One custodian of a ceremony.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustodianEntry {
    /// Custodian name (`[A-Za-z0-9._-]{1,64}`); the share file is `share-NAME.age`.
    pub name: String,
    /// The age recipient the share file was encrypted to.
    pub recipient: String,
    /// The share index (Shamir x coordinate), 1..=shares.
    pub index: u8,
    /// [`share_commitment`] of this custodian's share, 64 lowercase hex digits.
    pub commitment: String,
}

impl Manifest {
    /// Reads and checks a manifest. `path` may be the ceremony directory, in which case
    /// its `manifest.json` is read.
    pub fn load(path: &Path) -> Result<Manifest, EscrowError> {
        let path: PathBuf = if path.is_dir() {
            path.join(MANIFEST_FILE_NAME)
        } else {
            path.to_owned()
        };
        let bytes = share::read_file_capped(&path, MANIFEST_SIZE_LIMIT)?;
        Self::parse_file(&bytes, &path)
    }

    /// Parses and checks a manifest from JSON text (errors name the file `manifest.json`).
    pub fn from_json(json: &str) -> Result<Manifest, EscrowError> {
        Self::parse_file(json.as_bytes(), Path::new(MANIFEST_FILE_NAME))
    }

    /// Parses and checks ([`Manifest::validate`]) a manifest from its JSON text alone, no
    /// file involved: what a server that is handed `manifest.json` needs.
    ///
    /// Exactly the grammar in the module documentation; bounded: a text over 256 KiB is
    /// refused by its length before it is parsed.
    pub fn parse(json: &[u8]) -> Result<Manifest, ManifestError> {
        if json.len() > MANIFEST_SIZE_LIMIT {
            return Err(ManifestError::TooLarge {
                len: json.len(),
                limit: MANIFEST_SIZE_LIMIT,
            });
        }
        let mut de = serde_json::Deserializer::from_slice(json);
        let Object(manifest): Object<Manifest> =
            serde_path_to_error::deserialize(&mut de).map_err(|e| ManifestError::Json {
                field: e.path().to_string(),
                source: e.into_inner(),
            })?;
        // Only white space after the object.
        de.end().map_err(|source| ManifestError::Json {
            field: ".".to_owned(),
            source,
        })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// [`Manifest::parse`] for the contents of the file `path`, which errors name.
    fn parse_file(bytes: &[u8], path: &Path) -> Result<Manifest, EscrowError> {
        Self::parse(bytes).map_err(|e| match e {
            ManifestError::Json { field, source } => EscrowError::ManifestParse {
                path: path.to_owned(),
                field,
                source,
            },
            ManifestError::TooLarge { limit, .. } => EscrowError::FileTooLarge {
                path: path.to_owned(),
                limit,
            },
            ManifestError::Invalid { problem } => problem.into(),
        })
    }

    /// The manifest as pretty JSON with a final newline.
    pub fn to_json(&self) -> Result<String, EscrowError> {
        let mut s = serde_json::to_string_pretty(self)
            .map_err(|source| EscrowError::ManifestSerialize { source })?;
        s.push('\n');
        Ok(s)
    }

    /// The custodian holding share `index`.
    pub fn custodian(&self, index: u8) -> Option<&CustodianEntry> {
        self.custodians.iter().find(|c| c.index == index)
    }

    /// Checks internal consistency: format, ids, recipients, threshold, one custodian per
    /// index 1..=shares, unique names, well-formed commitments.
    pub fn validate(&self) -> Result<(), ManifestProblem> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestProblem::UnsupportedFormat {
                found: self.format.clone(),
            });
        }
        if !is_lower_hex(&self.ceremony_id, 32) {
            return Err(ManifestProblem::BadCeremonyId);
        }
        if let Some(old) = &self.replaces
            && (!is_lower_hex(old, 32) || *old == self.ceremony_id)
        {
            return Err(ManifestProblem::BadReplaces);
        }
        if !is_created_time(&self.created) {
            return Err(ManifestProblem::BadCreated);
        }
        if !share::is_canonical_x25519_recipient(&self.recovery_recipient) {
            return Err(ManifestProblem::BadRecoveryRecipient);
        }
        if self.threshold < 2 {
            return Err(ManifestProblem::ThresholdTooSmall {
                threshold: self.threshold,
            });
        }
        if self.threshold > self.shares {
            return Err(ManifestProblem::ThresholdAboveShares {
                threshold: self.threshold,
                shares: self.shares,
            });
        }
        if self.custodians.len() != usize::from(self.shares) {
            return Err(ManifestProblem::CustodianCount {
                listed: self.custodians.len(),
                shares: self.shares,
            });
        }
        let mut seen_index = [false; 256];
        let mut names: Vec<String> = Vec::with_capacity(self.custodians.len());
        for (at, c) in self.custodians.iter().enumerate() {
            if !valid_custodian_name(&c.name) {
                return Err(ManifestProblem::BadCustodianName {
                    at,
                    name: c.name.clone(),
                });
            }
            let folded = c.name.to_ascii_lowercase();
            if names.contains(&folded) {
                return Err(ManifestProblem::DuplicateCustodian {
                    at,
                    name: c.name.clone(),
                });
            }
            names.push(folded);
            if c.index == 0 || c.index > self.shares {
                return Err(ManifestProblem::BadIndex {
                    at,
                    custodian: c.name.clone(),
                    index: c.index,
                    shares: self.shares,
                });
            }
            let slot = &mut seen_index[usize::from(c.index)];
            if *slot {
                return Err(ManifestProblem::DuplicateIndex { at, index: c.index });
            }
            *slot = true;
            if !is_lower_hex(&c.commitment, 64) {
                return Err(ManifestProblem::BadCommitment {
                    at,
                    custodian: c.name.clone(),
                });
            }
            if c.recipient.trim() != c.recipient
                || recipient::parse_recipient(&c.name, &c.recipient).is_err()
            {
                return Err(ManifestProblem::BadCustodianRecipient {
                    at,
                    custodian: c.name.clone(),
                });
            }
            if c.recipient == self.recovery_recipient {
                return Err(ManifestProblem::CustodianIsRecoveryRecipient {
                    at,
                    custodian: c.name.clone(),
                });
            }
        }
        Ok(())
    }
}

/// A `T` read only from a JSON object: serde's derived structs also take an array of
/// their values in order, which the grammar does not have.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectOnly<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(ObjectOnly(std::marker::PhantomData)).map(Object)
    }
}

/// `custodians`: an array of objects.
fn custodian_objects<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<CustodianEntry>, D::Error> {
    let entries = Vec::<Object<CustodianEntry>>::deserialize(d)?;
    Ok(entries.into_iter().map(|Object(c)| c).collect())
}

/// The commitment to one share: lowercase hex SHA-256 over
///
/// ```text
/// "kluis-escrow-share-commitment/v1" 0x00
/// u32be(len(ceremony_id)) ceremony_id (ASCII hex)
/// index (1 byte)
/// u32be(len(share)) share (the blahaj share bytes: index byte, then 32 y bytes)
/// ```
///
/// It lets one share be checked on its own, without any other share.
pub fn share_commitment(ceremony_id: &str, index: u8, share: &[u8]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(COMMITMENT_DOMAIN);
    ctx.update(&len_be(ceremony_id.len()));
    ctx.update(ceremony_id.as_bytes());
    ctx.update(&[index]);
    ctx.update(&len_be(share.len()));
    ctx.update(share);
    hex::encode(ctx.finish())
}

fn len_be(len: usize) -> [u8; 4] {
    u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes()
}

/// Compares two byte strings in time independent of where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// `YYYY-MM-DDTHH:MM:SSZ`, a valid date and time (what the ceremony writes: RFC 3339,
/// UTC, whole seconds).
fn is_created_time(s: &str) -> bool {
    let b = s.as_bytes();
    let shape = b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    shape
        && time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
}

/// `[A-Za-z0-9._-]{1,64}`: custodian names become file names.
pub(crate) fn valid_custodian_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Exactly `len` lowercase hexadecimal digits.
pub(crate) fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
