//! The error types of the escrow: [`EscrowError`] for everything, [`ManifestProblem`] for
//! what is wrong inside a manifest, and [`ManifestError`] for a manifest read from its
//! text alone ([`crate::Manifest::parse`]).
//!
//! Every message is written for a custodian who rarely does this and may be doing it in a
//! disaster: it says what is wrong and, where there is one, what to do. No message ever
//! contains secret material (share bytes, key bytes, decrypted text).

use std::io;
use std::path::PathBuf;

use kluis_age::fsutil::{FsError, ReadLimitedError};

/// Everything that can go wrong in an escrow ceremony, share check, combination or re-share.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EscrowError {
    // ----- ceremony / re-share parameters -----
    /// The threshold is below 2: one custodian alone could rebuild the key.
    #[error(
        "threshold {threshold} is too small: at least 2 custodians must be needed to rebuild the recovery key"
    )]
    ThresholdTooSmall {
        /// The threshold asked for.
        threshold: u8,
    },
    /// The threshold is above the number of custodians: the key could never be rebuilt.
    #[error(
        "threshold {threshold} is larger than the number of custodians ({custodians}): the recovery key could never be rebuilt"
    )]
    ThresholdAboveCustodians {
        /// The threshold asked for.
        threshold: u8,
        /// The number of custodians given.
        custodians: usize,
    },
    /// More than 255 custodians (GF(256) Shamir has 255 share indices).
    #[error("{count} custodians given; at most 255 are possible")]
    TooManyCustodians {
        /// The number of custodians given.
        count: usize,
    },
    /// A custodian name that cannot be used as (part of) a file name.
    #[error(
        "custodian name {name:?} is not allowed: use 1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'"
    )]
    BadCustodianName {
        /// The offending name.
        name: String,
    },
    /// Two custodians with the same name (compared without regard to case, because the
    /// names become file names).
    #[error("custodian name {name:?} is given twice (names are compared ignoring case)")]
    DuplicateCustodian {
        /// The repeated name.
        name: String,
    },
    /// Two custodians with the same recipient: one key holder would hold two shares.
    #[error(
        "custodians {first:?} and {second:?} have the same recipient: one key holder would hold two shares"
    )]
    DuplicateRecipient {
        /// The first custodian with that recipient.
        first: String,
        /// The second custodian with that recipient.
        second: String,
    },
    /// A recipient string that is not an age recipient.
    #[error(
        "the recipient of custodian {custodian:?} is not a valid age recipient ({reason}); expected an age public key such as age1... or a plugin recipient such as age1yubikey1..."
    )]
    BadRecipient {
        /// The custodian whose recipient is bad.
        custodian: String,
        /// What the parser said (never secret: recipients are public).
        reason: &'static str,
    },
    /// An SSH public key was given as recipient; not supported for escrow shares.
    #[error(
        "the recipient of custodian {custodian:?} is an SSH key; SSH keys are not supported for escrow shares, give the custodian's age recipient (age1...) instead"
    )]
    SshRecipientUnsupported {
        /// The custodian whose recipient is an SSH key.
        custodian: String,
    },
    /// A plugin recipient whose plugin binary is not installed.
    #[error(
        "the recipient of custodian {custodian:?} needs the age plugin program {binary:?}, which was not found on the PATH; install it (for example age-plugin-yubikey) and run again"
    )]
    PluginMissing {
        /// The custodian whose recipient needs the plugin.
        custodian: String,
        /// The plugin's program name, e.g. `age-plugin-yubikey`.
        binary: String,
    },
    /// A plugin could not be resolved for another reason.
    #[error("the age plugin for the recipient of custodian {custodian:?} cannot be used: {source}")]
    PluginResolve {
        /// The custodian whose recipient needs the plugin.
        custodian: String,
        /// What age said.
        #[source]
        source: Box<age::plugin::ResolveError>,
    },
    /// Encrypting a share file to a custodian failed.
    #[error("could not encrypt the share of custodian {custodian:?}: {source}")]
    EncryptShare {
        /// The custodian whose share failed.
        custodian: String,
        /// What age said.
        #[source]
        source: Box<age::EncryptError>,
    },
    /// The output directory already holds a ceremony.
    #[error(
        "{path} already exists: this directory already holds a ceremony, which is never overwritten; choose a new directory"
    )]
    ManifestExists {
        /// The existing manifest.
        path: PathBuf,
    },
    /// The output directory already holds a share file of the same name.
    #[error("{path} already exists; share files are never overwritten, choose a new directory")]
    ShareFileExists {
        /// The existing share file.
        path: PathBuf,
    },
    /// The recovery key could not be encoded as an age identity (an internal error).
    #[error("internal error: the recovery key could not be encoded as an age identity")]
    KeyEncoding,
    /// The system clock cannot be written as an RFC 3339 time.
    #[error("the system clock gives a time that cannot be written as an RFC 3339 date")]
    Clock,
    /// Writing results to the output (standard output) failed.
    #[error("could not write the output: {source}")]
    Output {
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// No randomness available from the operating system.
    #[error("the operating system's random number generator failed")]
    RandomUnavailable,

    // ----- files -----
    /// An I/O error on a named file.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What was being done ("read", "write", "create", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A share text (decrypted) larger than any share text.
    #[error("the share text is {len} bytes long, more than the {limit} bytes any share text has; it is not a Kluis escrow share")]
    ShareTextTooLarge {
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// A file that is far larger than any manifest or share file.
    #[error("{path} is larger than {limit} bytes; it is not a Kluis escrow manifest or share file")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// The size limit in bytes.
        limit: usize,
    },

    // ----- manifest -----
    /// The manifest is not valid JSON of the expected shape.
    #[error("{path} is not a readable Kluis escrow manifest: at {field}: {source}")]
    ManifestParse {
        /// The manifest file.
        path: PathBuf,
        /// The JSON path of the field concerned (`custodians[1].index`; `.` for the whole).
        field: String,
        /// What the JSON parser said (line and column included).
        #[source]
        source: serde_json::Error,
    },
    /// The manifest could not be turned into JSON (an internal error).
    #[error("internal error: the manifest could not be written as JSON: {source}")]
    ManifestSerialize {
        /// What the JSON writer said.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest parsed, but its content is inconsistent.
    #[error("the escrow manifest is not valid: {problem}")]
    ManifestInvalid {
        /// What is wrong.
        #[source]
        problem: ManifestProblem,
    },

    // ----- share text -----
    /// The text is not a Kluis escrow share.
    #[error("this is not a Kluis escrow share (it does not start with \"kluis-escrow-share v1\")")]
    NotAShare,
    /// A Kluis share of a format version this program does not know.
    #[error("this share is of format {found:?}, which this version of kmsctl does not understand")]
    UnsupportedShareVersion {
        /// The header line found (public).
        found: String,
    },
    /// The share is still age-encrypted.
    #[error(
        "share file is still age-encrypted; decrypt it with `age -d -i YOUR_KEY` or pass --identity"
    )]
    StillEncrypted,
    /// A line of the share text that is not UTF-8 text.
    #[error("line {line} of the share is not UTF-8 text; the share is damaged")]
    ShareNotUtf8 {
        /// The line number (1-based).
        line: usize,
    },
    /// A control character (other than a tab, or a CR before the line's LF) in a line.
    #[error("line {line} of the share contains a control character; the share is damaged or was edited")]
    ControlCharacter {
        /// The line number (1-based).
        line: usize,
    },
    /// The share's lines are not in the order they are written.
    #[error("line {line} of the share is the {field:?} line, which belongs after the {after:?} line; the share was edited")]
    OutOfOrder {
        /// The line number (1-based).
        line: usize,
        /// The field found on that line.
        field: &'static str,
        /// The field that is written after it but came before it.
        after: &'static str,
    },
    /// A required line is missing from the share text.
    #[error("the share has no {field:?} line; it is incomplete or was edited")]
    MissingField {
        /// The missing field.
        field: &'static str,
    },
    /// A line appears twice in the share text.
    #[error("line {line} of the share is a second {field:?} line; it was edited")]
    DuplicateField {
        /// The line number (1-based) of the second one.
        line: usize,
        /// The repeated field.
        field: &'static str,
    },
    /// A line the v1 share format does not have.
    #[error("the share has an unexpected line {line} ({field:?}); it was edited or is damaged")]
    UnknownField {
        /// The line number (1-based).
        line: usize,
        /// The field name found (never the value).
        field: String,
    },
    /// A line that is not `name: value`.
    #[error("line {line} of the share is not of the form \"name: value\" ({why}); the share is damaged")]
    MalformedLine {
        /// The line number (1-based).
        line: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A field with a value of the wrong shape.
    #[error("line {line} of the share, the {field:?} line, is not valid: expected {expected}")]
    BadField {
        /// The line number (1-based).
        line: usize,
        /// The field.
        field: &'static str,
        /// What a valid value looks like.
        expected: &'static str,
    },
    /// The `share:` value is not base64.
    #[error("line {line} of the share, the \"share\" line, is not valid base64 (standard alphabet); the share was damaged or mistyped")]
    BadShareEncoding {
        /// The line number (1-based).
        line: usize,
    },
    /// The decoded share has the wrong length.
    #[error("line {line} of the share: the share value is {len} bytes long, expected 33; the share was damaged or mistyped")]
    BadShareLength {
        /// The line number (1-based).
        line: usize,
        /// The decoded length.
        len: usize,
    },
    /// Share index 0 (that would be the secret itself; no real share has it).
    #[error("the share has index 0, which no valid share has; it was altered")]
    IndexZero,
    /// The `index:` line and the index inside the share bytes differ.
    #[error(
        "the share says \"index: {field}\" but its share value is for index {embedded}; it was altered"
    )]
    ShareIndexMismatch {
        /// The `index:` line.
        field: u8,
        /// The index inside the share bytes.
        embedded: u8,
    },

    // ----- decrypting a share file -----
    /// An identity file could not be read or parsed.
    #[error("could not use identity file {path}: {source}")]
    IdentityFile {
        /// The identity file.
        path: PathBuf,
        /// What went wrong (age never puts key material in these messages).
        #[source]
        source: io::Error,
    },
    /// None of the identities opens this share file.
    #[error(
        "none of the given identities can open this share file: it was encrypted to another custodian's key"
    )]
    NoMatchingIdentity,
    /// The age plugin of the custodian's identity could not decrypt the share file (for
    /// example a hardware token that asks for a PIN, which this program cannot ask for).
    #[error(
        "the age plugin of your identity could not decrypt the share file ({source}); decrypt it with `age -d -i YOUR_KEY` first and give the decrypted share"
    )]
    PluginDecrypt {
        /// What age said.
        #[source]
        source: Box<age::DecryptError>,
    },
    /// Decryption of an encrypted share failed otherwise (damaged or truncated file).
    #[error("could not decrypt the share file; it is damaged or truncated: {source}")]
    ShareDecrypt {
        /// What age said.
        #[source]
        source: Box<age::DecryptError>,
    },

    // ----- verifying a share against the manifest -----
    /// The share belongs to another ceremony.
    #[error(
        "this share (custodian {custodian:?}) belongs to ceremony {found}, not to ceremony {expected} of this manifest: wrong manifest, or a share of a ceremony that was replaced by a re-share"
    )]
    ForeignCeremony {
        /// The custodian the share says it belongs to.
        custodian: String,
        /// The manifest's ceremony id.
        expected: String,
        /// The share's ceremony id.
        found: String,
    },
    /// The share index is larger than the number of shares of the ceremony.
    #[error(
        "the share has index {index}, but this ceremony has only {shares} shares; it was altered"
    )]
    IndexOutOfRange {
        /// The share's index.
        index: u8,
        /// The ceremony's number of shares.
        shares: u8,
    },
    /// The share names a different custodian than the manifest has for its index.
    #[error(
        "share {index} says it belongs to custodian {found:?}, but the manifest gives share {index} to {expected:?}; it was altered"
    )]
    CustodianMismatch {
        /// The share's index.
        index: u8,
        /// The custodian in the manifest.
        expected: String,
        /// The custodian in the share.
        found: String,
    },
    /// A descriptive line of the share disagrees with the manifest.
    #[error(
        "the share of custodian {custodian:?} says {field} is {share}, but the manifest says {manifest}; it was altered or belongs to another manifest"
    )]
    ShareFieldMismatch {
        /// The custodian.
        custodian: String,
        /// The field (threshold, shares, recovery-recipient).
        field: &'static str,
        /// The value in the manifest.
        manifest: String,
        /// The value in the share.
        share: String,
    },
    /// The share's commitment does not match the manifest.
    #[error(
        "share {index} of custodian {custodian:?} is damaged or altered: it does not match the commitment in the manifest"
    )]
    CommitmentMismatch {
        /// The custodian.
        custodian: String,
        /// The share index.
        index: u8,
    },

    // ----- combining -----
    /// The same share given twice.
    #[error(
        "the share of custodian {custodian:?} (index {index}) was given twice; give each share once"
    )]
    Duplicate {
        /// The custodian.
        custodian: String,
        /// The share index.
        index: u8,
    },
    /// Fewer valid shares than the threshold.
    #[error(
        "not enough shares: {have} valid, {need} needed to rebuild the recovery key; find more custodians"
    )]
    NotEnoughShares {
        /// Distinct valid shares given.
        have: usize,
        /// The threshold.
        need: u8,
    },
    /// The rebuilt key is not the manifest's recovery key.
    #[error(
        "the rebuilt key has recipient {found}, but the manifest's recovery recipient is {expected}; the key was NOT rebuilt"
    )]
    RecipientMismatch {
        /// The manifest's recovery recipient.
        expected: String,
        /// The rebuilt identity's recipient.
        found: String,
    },
    /// Shamir reconstruction failed (cannot happen after the checks above).
    #[error("the shares could not be combined: {reason}")]
    Reconstruction {
        /// What failed (never secret).
        reason: &'static str,
    },
    /// The identity file to write already exists.
    #[error("{path} already exists; the recovery identity is never written over an existing file")]
    IdentityFileExists {
        /// The existing file.
        path: PathBuf,
    },

    // ----- command line -----
    /// An error concerning one share file given on the command line.
    #[error("{path}: {source}")]
    InShareFile {
        /// The share file as given.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<EscrowError>,
    },
    /// `-` (standard input) was given for more than one share.
    #[error("standard input (\"-\") can be given for one share only")]
    StdinTwice,
}

/// What is wrong inside a manifest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestProblem {
    /// The `format` field is not `kluis-escrow-manifest/v1`.
    #[error("format {found:?} is not \"kluis-escrow-manifest/v1\"")]
    UnsupportedFormat {
        /// The format found.
        found: String,
    },
    /// The ceremony id is not 32 lowercase hexadecimal digits.
    #[error("ceremony_id is not 32 lowercase hexadecimal digits")]
    BadCeremonyId,
    /// `replaces` is not a ceremony id, or is this ceremony's own id.
    #[error("replaces is not the id of another ceremony")]
    BadReplaces,
    /// `created` is not an RFC 3339 UTC time in whole seconds, as written.
    #[error("created is not an RFC 3339 UTC time in whole seconds (YYYY-MM-DDTHH:MM:SSZ)")]
    BadCreated,
    /// `recovery_recipient` is not an age X25519 recipient (canonical: lowercase, no
    /// surrounding white space).
    #[error("recovery_recipient is not an age X25519 recipient (age1..., lowercase)")]
    BadRecoveryRecipient,
    /// Threshold below 2.
    #[error("threshold {threshold} is below 2")]
    ThresholdTooSmall {
        /// The threshold.
        threshold: u8,
    },
    /// Threshold above the number of shares.
    #[error("threshold {threshold} is above the number of shares {shares}")]
    ThresholdAboveShares {
        /// The threshold.
        threshold: u8,
        /// The number of shares.
        shares: u8,
    },
    /// The custodian list does not have one entry per share.
    #[error("custodians lists {listed} custodians but shares is {shares}")]
    CustodianCount {
        /// Entries in the list.
        listed: usize,
        /// The `shares` field.
        shares: u8,
    },
    /// A custodian name that is not allowed.
    #[error("custodians[{at}].name {name:?} is not allowed: 1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'")]
    BadCustodianName {
        /// Position in the `custodians` list (0-based).
        at: usize,
        /// The name.
        name: String,
    },
    /// A custodian's share is encrypted to the recovery recipient itself: whoever holds
    /// the recovery key would read every share, and nobody else could.
    #[error("custodians[{at}].recipient (custodian {custodian:?}) is the recovery recipient itself")]
    CustodianIsRecoveryRecipient {
        /// Position in the `custodians` list (0-based).
        at: usize,
        /// The custodian.
        custodian: String,
    },
    /// A custodian name listed twice.
    #[error("custodians[{at}].name: custodian {name:?} is listed twice (names are compared ignoring case)")]
    DuplicateCustodian {
        /// Position in the `custodians` list (0-based) of the second one.
        at: usize,
        /// The name.
        name: String,
    },
    /// A custodian's index is 0 or above the number of shares.
    #[error("custodians[{at}].index (custodian {custodian:?}) is {index}, outside 1..={shares}")]
    BadIndex {
        /// Position in the `custodians` list (0-based).
        at: usize,
        /// The custodian.
        custodian: String,
        /// The index.
        index: u8,
        /// The number of shares.
        shares: u8,
    },
    /// Two custodians with the same index.
    #[error("custodians[{at}].index: index {index} is given to more than one custodian")]
    DuplicateIndex {
        /// Position in the `custodians` list (0-based) of the second one.
        at: usize,
        /// The index.
        index: u8,
    },
    /// A commitment that is not 64 lowercase hexadecimal digits.
    #[error("custodians[{at}].commitment (custodian {custodian:?}) is not 64 lowercase hexadecimal digits")]
    BadCommitment {
        /// Position in the `custodians` list (0-based).
        at: usize,
        /// The custodian.
        custodian: String,
    },
    /// A custodian recipient that is not an age recipient.
    #[error("custodians[{at}].recipient (custodian {custodian:?}) is not an age recipient")]
    BadCustodianRecipient {
        /// Position in the `custodians` list (0-based).
        at: usize,
        /// The custodian.
        custodian: String,
    },
}

/// Why a manifest given as JSON text (no file) was refused by [`crate::Manifest::parse`]:
/// for example by a server that receives `manifest.json` over the wire.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The text is larger than any manifest.
    #[error("the manifest is {len} bytes long, more than the {limit} bytes any manifest has; it is not a Kluis escrow manifest")]
    TooLarge {
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The text is not JSON of the manifest's shape (an unknown or repeated field is
    /// refused too).
    #[error("this is not a Kluis escrow manifest: at {field}: {source}")]
    Json {
        /// The JSON path of the field concerned (`custodians[1].index`; `.` for the whole).
        field: String,
        /// What the JSON parser said (line and column included).
        #[source]
        source: serde_json::Error,
    },
    /// The manifest parsed, but its content is inconsistent.
    #[error("the escrow manifest is not valid: {problem}")]
    Invalid {
        /// What is wrong.
        #[source]
        problem: ManifestProblem,
    },
}

impl From<ManifestProblem> for ManifestError {
    fn from(problem: ManifestProblem) -> Self {
        ManifestError::Invalid { problem }
    }
}

impl From<ManifestProblem> for EscrowError {
    fn from(problem: ManifestProblem) -> Self {
        EscrowError::ManifestInvalid { problem }
    }
}

impl From<FsError> for EscrowError {
    fn from(e: FsError) -> Self {
        EscrowError::io(e.action, e.path, e.source)
    }
}

impl From<ReadLimitedError> for EscrowError {
    fn from(e: ReadLimitedError) -> Self {
        match e {
            ReadLimitedError::Io(e) => e.into(),
            ReadLimitedError::TooLarge { path, limit } => EscrowError::FileTooLarge { path, limit },
        }
    }
}

impl EscrowError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        EscrowError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// Attaches the share file (as given on the command line) to an error about that share.
    pub fn in_share_file(self, path: impl Into<PathBuf>) -> Self {
        EscrowError::InShareFile {
            path: path.into(),
            source: Box::new(self),
        }
    }

    /// The error itself, looking through [`EscrowError::InShareFile`].
    pub fn innermost(&self) -> &EscrowError {
        match self {
            EscrowError::InShareFile { source, .. } => source.innermost(),
            other => other,
        }
    }
}
