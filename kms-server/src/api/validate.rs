//! Request validation: one pure function per RPC, from the decoded protobuf request to a
//! validated, typed request, or an [`Invalid`] naming the field and what is wrong with it.
//!
//! Every handler calls it first, before anything of the request reaches the audit trail,
//! the log, the policy or the key manager. What a refused request leaves behind is bounded
//! too: its keyring, key id and backup id enter the audit entry and the log only as
//! [`Shown`] (at most [`KEEP`] bytes, control characters escaped, and when anything was
//! cut or escaped, the length and SHA-256 of the whole value).
//!
//! The whole message is bounded before this, at the gRPC layer: [`MAX_KEY_REQUEST`],
//! [`MAX_ADMIN_REQUEST`] and [`MAX_AUDIT_REQUEST`] (tonic `max_decoding_message_size`).
//!
//! The key manager (`keys`) keeps its own checks of the same rules: this layer makes
//! them hold before the audit and the log see the request.

use std::fmt;

use kluis_proto::v1 as pb;

use crate::auth::Role;
use crate::keys::WRAPPED_DK_LEN;

/// Largest KeyService request (bytes, encoded): a GenerateDataKey with 32 labels of the
/// largest allowed size is about 11 KiB.
pub const MAX_KEY_REQUEST: usize = 64 * 1024;
/// Largest AdminService request: an escrow manifest of [`MAX_MANIFEST`] and a margin.
pub const MAX_ADMIN_REQUEST: usize = MAX_MANIFEST + 64 * 1024;
/// Largest AuditService request.
pub const MAX_AUDIT_REQUEST: usize = 4 * 1024;

/// Keyring names: 1 to 64 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub const MAX_KEYRING: usize = 64;
/// Backup ids, hosts, principals, label values.
pub const MAX_TEXT: usize = 256;
/// Label keys.
pub const MAX_LABEL_KEY: usize = 64;
/// Labels per data key.
pub const MAX_LABELS: usize = 32;
/// A restore test's detail.
pub const MAX_DETAIL: usize = 1024;
/// A legal hold's reason.
pub const MAX_REASON: usize = 512;
/// A time given as `since`.
pub const MAX_SINCE: usize = 64;
/// An escrow manifest (the same limit as `kmsctl escrow` reading `manifest.json`).
pub const MAX_MANIFEST: usize = 1 << 20;
/// Bytes of a refused field kept in the audit entry and the log.
pub const KEEP: usize = 256;

/// What is wrong with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("must not be empty")]
    Empty,
    #[error("is {len} bytes, at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    #[error("has {count} entries, at most {max} are allowed")]
    TooMany { count: usize, max: usize },
    #[error("may contain only letters, digits, '.', '_' and '-'")]
    Charset,
    #[error("must start with a letter or digit")]
    Start,
    #[error("must not contain control characters, line separators or bidirectional overrides")]
    Control,
    #[error("must be 32 lowercase hex characters")]
    KeyIdFormat,
    #[error("must be {0} bytes (a Kluis v1 wrapped data key)")]
    WrappedLength(usize),
    #[error("must be sealer, restorer, officer or auditor")]
    Role,
    #[error("must be an RFC 3339 time, e.g. 2026-01-01T00:00:00Z")]
    Time,
    #[error("must be given (ids start at 1)")]
    ZeroId,
    #[error("give a retention or a rotation period to change")]
    NothingToChange,
    #[error("must be an age X25519 recipient (age1 and lowercase Bech32, at most 128 characters)")]
    Recipient,
}

/// A refused request: the field and its problem (never its value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {problem}")]
pub struct Invalid {
    pub field: &'static str,
    pub problem: Problem,
}

fn bad<T>(field: &'static str, problem: Problem) -> Result<T, Invalid> {
    Err(Invalid { field, problem })
}

/// Characters that never enter the audit or the log raw: C0, DEL and C1 controls, the
/// Unicode line and paragraph separators, and the bidirectional overrides and isolates.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), Invalid> {
    if s.len() > max {
        return bad(field, Problem::TooLong { len: s.len(), max });
    }
    Ok(())
}

/// Free text: at most `max` bytes, no unsafe characters, empty only if allowed.
fn text(field: &'static str, s: &str, max: usize, allow_empty: bool) -> Result<String, Invalid> {
    if s.is_empty() && !allow_empty {
        return bad(field, Problem::Empty);
    }
    check_len(field, s, max)?;
    if s.chars().any(is_unsafe_char) {
        return bad(field, Problem::Control);
    }
    Ok(s.to_owned())
}

/// A keyring name: 1 to 64 of `[A-Za-z0-9._-]`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyringName(String);

impl KeyringName {
    pub fn parse(field: &'static str, s: &str) -> Result<Self, Invalid> {
        if s.is_empty() {
            return bad(field, Problem::Empty);
        }
        check_len(field, s, MAX_KEYRING)?;
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return bad(field, Problem::Charset);
        }
        if !s.as_bytes()[0].is_ascii_alphanumeric() {
            return bad(field, Problem::Start);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A data key id: exactly 32 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId(String);

impl KeyId {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return bad("key_id", Problem::KeyIdFormat);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A backup id: 1 to 256 bytes of text without unsafe characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupId(String);

impl BackupId {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        text("backup_id", s, MAX_TEXT, false).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A wrapped data key of the one length the server makes.
fn wrapped(s: &[u8]) -> Result<Vec<u8>, Invalid> {
    if s.len() != WRAPPED_DK_LEN {
        return bad("wrapped_key", Problem::WrappedLength(WRAPPED_DK_LEN));
    }
    Ok(s.to_vec())
}

fn id(field: &'static str, id: u64) -> Result<u64, Invalid> {
    if id == 0 {
        return bad(field, Problem::ZeroId);
    }
    Ok(id)
}

fn rfc3339(field: &'static str, s: &str) -> Result<Option<String>, Invalid> {
    if s.is_empty() {
        return Ok(None);
    }
    check_len(field, s, MAX_SINCE)?;
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|_| Invalid { field, problem: Problem::Time })?;
    Ok(Some(s.to_owned()))
}

/// What the audit entry of a request names: keyring, key id, backup id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subject<'a> {
    pub keyring: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub backup_id: Option<&'a str>,
}

/// A request type and its validation.
pub trait Validate {
    /// The validated, typed request.
    type Valid;
    /// The pure check: the decoded request in, the typed request or the first bad field out.
    fn validate(&self) -> Result<Self::Valid, Invalid>;
    /// The fields the audit entry of this request names, as the caller sent them (for a
    /// refused request: to be recorded only as [`Shown`]).
    fn claimed(&self) -> Subject<'_> {
        Subject::default()
    }
    /// The same fields of the validated request.
    fn subject(_: &Self::Valid) -> Subject<'_> {
        Subject::default()
    }
}

/// A request with no fields (unknown fields are dropped by the decoder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Empty;

macro_rules! empty_requests {
    ($($t:ty),* $(,)?) => {
        $(impl Validate for $t {
            type Valid = Empty;
            fn validate(&self) -> Result<Empty, Invalid> {
                Ok(Empty)
            }
        })*
    };
}

empty_requests!(
    pb::ListKeyringsRequest,
    pb::GetEscrowStatusRequest,
    pb::RemoveEscrowRequest,
    pb::ListApprovalsRequest,
    pb::ListDestructionsRequest,
    pb::RotateMasterRequest,
    pb::GetAuditPublicKeyRequest,
);

/// A request naming one keyring (in field `keyring` or `name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnKeyring {
    pub keyring: KeyringName,
}

macro_rules! keyring_requests {
    ($($t:ty => $f:ident),* $(,)?) => {
        $(impl Validate for $t {
            type Valid = OnKeyring;
            fn validate(&self) -> Result<OnKeyring, Invalid> {
                Ok(OnKeyring { keyring: KeyringName::parse(stringify!($f), &self.$f)? })
            }
            fn claimed(&self) -> Subject<'_> {
                Subject { keyring: Some(self.$f.as_str()), ..Subject::default() }
            }
            fn subject(v: &OnKeyring) -> Subject<'_> {
                Subject { keyring: Some(v.keyring.as_str()), ..Subject::default() }
            }
        })*
    };
}

keyring_requests!(
    pb::GetKeyringRequest => name,
    pb::RotateKeyringRequest => name,
    pb::DestroyKeyringRequest => name,
    pb::ListGrantsRequest => keyring,
);

/// A request naming one data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnKey {
    pub key_id: KeyId,
}

macro_rules! key_requests {
    ($($t:ty),* $(,)?) => {
        $(impl Validate for $t {
            type Valid = OnKey;
            fn validate(&self) -> Result<OnKey, Invalid> {
                Ok(OnKey { key_id: KeyId::parse(&self.key_id)? })
            }
            fn claimed(&self) -> Subject<'_> {
                Subject { key_id: Some(self.key_id.as_str()), ..Subject::default() }
            }
            fn subject(v: &OnKey) -> Subject<'_> {
                Subject { key_id: Some(v.key_id.as_str()), ..Subject::default() }
            }
        })*
    };
}

key_requests!(pb::GetDataKeyRequest, pb::DestroyKeyRequest);

/// The most key material one imported KMIP object carries (the key layer's `MAX_MATERIAL`).
pub const MAX_KMIP_MATERIAL: usize = 8192;

/// ImportKmipObject, validated: its identifier and keyring (the key layer checks the
/// attributes, as it does for a KMIP Create).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportKmipObject {
    pub uid: KeyId,
    pub keyring: KeyringName,
}

impl Validate for pb::ImportKmipObjectRequest {
    type Valid = ImportKmipObject;
    fn validate(&self) -> Result<ImportKmipObject, Invalid> {
        let uid = KeyId::parse(&self.uid).map_err(|e| Invalid { field: "uid", ..e })?;
        let keyring = KeyringName::parse("keyring", &self.keyring)?;
        if self.material.is_empty() {
            return bad("material", Problem::Empty);
        }
        if self.material.len() > MAX_KMIP_MATERIAL {
            return bad("material", Problem::TooLong { len: self.material.len(), max: MAX_KMIP_MATERIAL });
        }
        if self.names.len() > 16 {
            return bad("names", Problem::TooMany { count: self.names.len(), max: 16 });
        }
        if self.app_info.len() > 16 {
            return bad("app_info", Problem::TooMany { count: self.app_info.len(), max: 16 });
        }
        text("created_by", &self.created_by, MAX_TEXT, false)?;
        for n in &self.names {
            text("names", n, MAX_TEXT, false)?;
        }
        for a in &self.app_info {
            text("app_info", &a.namespace, MAX_TEXT, false)?;
            text("app_info", &a.data, MAX_TEXT, true)?;
        }
        if let Some(m) = &self.revocation_message {
            text("revocation_message", m, MAX_TEXT, false)?;
        }
        if self.links.len() > 4 {
            return bad("links", Problem::TooMany { count: self.links.len(), max: 4 });
        }
        for l in &self.links {
            KeyId::parse(&l.uid).map_err(|e| Invalid { field: "links", ..e })?;
        }
        Ok(ImportKmipObject { uid, keyring })
    }
    fn claimed(&self) -> Subject<'_> {
        Subject { keyring: Some(self.keyring.as_str()), key_id: Some(self.uid.as_str()), ..Subject::default() }
    }
    fn subject(v: &ImportKmipObject) -> Subject<'_> {
        Subject { keyring: Some(v.keyring.as_str()), key_id: Some(v.uid.as_str()), ..Subject::default() }
    }
}

/// FindDataKeys, validated: the backup id as GenerateDataKey's, the keyring optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FindDataKeys {
    pub backup_id: BackupId,
    /// `None`: every keyring the caller's grants cover.
    pub keyring: Option<KeyringName>,
}

impl Validate for pb::FindDataKeysRequest {
    type Valid = FindDataKeys;
    fn validate(&self) -> Result<FindDataKeys, Invalid> {
        let backup_id = BackupId::parse(&self.backup_id)?;
        let keyring = if self.keyring.is_empty() { None } else { Some(KeyringName::parse("keyring", &self.keyring)?) };
        Ok(FindDataKeys { backup_id, keyring })
    }
    fn claimed(&self) -> Subject<'_> {
        Subject {
            keyring: Some(self.keyring.as_str()).filter(|k| !k.is_empty()),
            backup_id: Some(self.backup_id.as_str()),
            ..Subject::default()
        }
    }
    fn subject(v: &FindDataKeys) -> Subject<'_> {
        Subject { keyring: v.keyring.as_ref().map(KeyringName::as_str), backup_id: Some(v.backup_id.as_str()), ..Subject::default() }
    }
}

/// A request naming one approval or destruction by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ById {
    pub id: u64,
}

impl Validate for pb::ApproveRequest {
    type Valid = ById;
    fn validate(&self) -> Result<ById, Invalid> {
        Ok(ById { id: id("id", self.id)? })
    }
}

impl Validate for pb::CancelDestructionRequest {
    type Valid = ById;
    fn validate(&self) -> Result<ById, Invalid> {
        Ok(ById { id: id("id", self.id)? })
    }
}

/// GenerateDataKey, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateDataKey {
    pub keyring: KeyringName,
    pub backup_id: BackupId,
    /// Sorted by key.
    pub labels: Vec<(String, String)>,
}

impl Validate for pb::GenerateDataKeyRequest {
    type Valid = GenerateDataKey;
    fn validate(&self) -> Result<GenerateDataKey, Invalid> {
        let keyring = KeyringName::parse("keyring", &self.keyring)?;
        let backup_id = BackupId::parse(&self.backup_id)?;
        if self.labels.len() > MAX_LABELS {
            return bad("labels", Problem::TooMany { count: self.labels.len(), max: MAX_LABELS });
        }
        let mut labels = Vec::with_capacity(self.labels.len());
        for (k, v) in &self.labels {
            labels.push((text("labels", k, MAX_LABEL_KEY, false)?, text("labels", v, MAX_TEXT, true)?));
        }
        labels.sort();
        Ok(GenerateDataKey { keyring, backup_id, labels })
    }
    fn claimed(&self) -> Subject<'_> {
        Subject { keyring: Some(self.keyring.as_str()), backup_id: Some(self.backup_id.as_str()), ..Subject::default() }
    }
    fn subject(v: &GenerateDataKey) -> Subject<'_> {
        Subject { keyring: Some(v.keyring.as_str()), backup_id: Some(v.backup_id.as_str()), ..Subject::default() }
    }
}

/// UnwrapDataKey and RewrapDataKey, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub keyring: KeyringName,
    pub key_id: KeyId,
    pub wrapped_key: Vec<u8>,
}

macro_rules! wrapped_requests {
    ($($t:ty),* $(,)?) => {
        $(impl Validate for $t {
            type Valid = WrappedKey;
            fn validate(&self) -> Result<WrappedKey, Invalid> {
                Ok(WrappedKey {
                    keyring: KeyringName::parse("keyring", &self.keyring)?,
                    key_id: KeyId::parse(&self.key_id)?,
                    wrapped_key: wrapped(&self.wrapped_key)?,
                })
            }
            fn claimed(&self) -> Subject<'_> {
                Subject { keyring: Some(self.keyring.as_str()), key_id: Some(self.key_id.as_str()), ..Subject::default() }
            }
            fn subject(v: &WrappedKey) -> Subject<'_> {
                Subject { keyring: Some(v.keyring.as_str()), key_id: Some(v.key_id.as_str()), ..Subject::default() }
            }
        })*
    };
}

wrapped_requests!(pb::UnwrapDataKeyRequest, pb::RewrapDataKeyRequest);

/// MarkDataKeyEscrowed, validated: the wrapped key as for UnwrapDataKey, and the
/// recovery recipient the file's new stanza is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkEscrowed {
    pub key: WrappedKey,
    pub recovery_recipient: String,
}

/// An age X25519 recipient as text: `age1` and lowercase Bech32 characters, bounded.
/// (Whether it is the one in force is the key manager's check.)
fn recipient(field: &'static str, s: &str) -> Result<String, Invalid> {
    if s.is_empty() {
        return bad(field, Problem::Empty);
    }
    check_len(field, s, 128)?;
    if !s.starts_with("age1") || !s.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()) {
        return bad(field, Problem::Recipient);
    }
    Ok(s.to_owned())
}

impl Validate for pb::MarkDataKeyEscrowedRequest {
    type Valid = MarkEscrowed;
    fn validate(&self) -> Result<MarkEscrowed, Invalid> {
        Ok(MarkEscrowed {
            key: WrappedKey {
                keyring: KeyringName::parse("keyring", &self.keyring)?,
                key_id: KeyId::parse(&self.key_id)?,
                wrapped_key: wrapped(&self.wrapped_key)?,
            },
            recovery_recipient: recipient("recovery_recipient", &self.recovery_recipient)?,
        })
    }
    fn claimed(&self) -> Subject<'_> {
        Subject { keyring: Some(self.keyring.as_str()), key_id: Some(self.key_id.as_str()), ..Subject::default() }
    }
    fn subject(v: &MarkEscrowed) -> Subject<'_> {
        Subject { keyring: Some(v.key.keyring.as_str()), key_id: Some(v.key.key_id.as_str()), ..Subject::default() }
    }
}

/// RecordRestoreTest, validated. The key id and backup id may be empty (a test of a
/// file whose key the restorer did not name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRestoreTest {
    pub keyring: KeyringName,
    pub key_id: Option<KeyId>,
    pub backup_id: String,
    pub ok: bool,
    pub detail: String,
    pub bytes: u64,
    pub duration_ms: u64,
    pub host: String,
}

impl Validate for pb::RecordRestoreTestRequest {
    type Valid = RecordRestoreTest;
    fn validate(&self) -> Result<RecordRestoreTest, Invalid> {
        Ok(RecordRestoreTest {
            keyring: KeyringName::parse("keyring", &self.keyring)?,
            key_id: if self.key_id.is_empty() { None } else { Some(KeyId::parse(&self.key_id)?) },
            backup_id: text("backup_id", &self.backup_id, MAX_TEXT, true)?,
            ok: self.ok,
            detail: text("detail", &self.detail, MAX_DETAIL, true)?,
            bytes: self.bytes,
            duration_ms: self.duration_ms,
            host: text("host", &self.host, MAX_TEXT, true)?,
        })
    }
    fn claimed(&self) -> Subject<'_> {
        Subject { keyring: Some(self.keyring.as_str()), key_id: Some(self.key_id.as_str()).filter(|k| !k.is_empty()), backup_id: None }
    }
    fn subject(v: &RecordRestoreTest) -> Subject<'_> {
        Subject { keyring: Some(v.keyring.as_str()), key_id: v.key_id.as_ref().map(KeyId::as_str), backup_id: None }
    }
}

/// CreateKeyring, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateKeyring {
    pub name: KeyringName,
    pub retention_days: u32,
    pub rotation_period_days: u32,
}

impl Validate for pb::CreateKeyringRequest {
    type Valid = CreateKeyring;
    fn validate(&self) -> Result<CreateKeyring, Invalid> {
        Ok(CreateKeyring {
            name: KeyringName::parse("name", &self.name)?,
            retention_days: self.retention_days,
            rotation_period_days: self.rotation_period_days,
        })
    }
    fn claimed(&self) -> Subject<'_> {
        Subject { keyring: Some(self.name.as_str()), ..Subject::default() }
    }
    fn subject(v: &CreateKeyring) -> Subject<'_> {
        Subject { keyring: Some(v.name.as_str()), ..Subject::default() }
    }
}

/// SetKeyringPolicy, validated: at least one of the two is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetKeyringPolicy {
    pub name: KeyringName,
    pub retention_days: Option<u32>,
    pub rotation_period_days: Option<u32>,
}

impl Validate for pb::SetKeyringPolicyRequest {
    type Valid = SetKeyringPolicy;
    fn validate(&self) -> Result<SetKeyringPolicy, Invalid> {
        let name = KeyringName::parse("name", &self.name)?;
        if self.retention_days.is_none() && self.rotation_period_days.is_none() {
            return bad("retention_days", Problem::NothingToChange);
        }
        Ok(SetKeyringPolicy { name, retention_days: self.retention_days, rotation_period_days: self.rotation_period_days })
    }
    fn claimed(&self) -> Subject<'_> {
        Subject { keyring: Some(self.name.as_str()), ..Subject::default() }
    }
    fn subject(v: &SetKeyringPolicy) -> Subject<'_> {
        Subject { keyring: Some(v.name.as_str()), ..Subject::default() }
    }
}

/// SetLegalHold, validated: placing a hold needs a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetLegalHold {
    pub keyring: KeyringName,
    pub hold: bool,
    pub reason: String,
}

impl Validate for pb::SetLegalHoldRequest {
    type Valid = SetLegalHold;
    fn validate(&self) -> Result<SetLegalHold, Invalid> {
        Ok(SetLegalHold {
            keyring: KeyringName::parse("keyring", &self.keyring)?,
            hold: self.hold,
            reason: text("reason", &self.reason, MAX_REASON, !self.hold)?,
        })
    }
    fn claimed(&self) -> Subject<'_> {
        Subject { keyring: Some(self.keyring.as_str()), ..Subject::default() }
    }
    fn subject(v: &SetLegalHold) -> Subject<'_> {
        Subject { keyring: Some(v.keyring.as_str()), ..Subject::default() }
    }
}

/// ChangeGrant, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeGrant {
    pub keyring: KeyringName,
    pub principal: String,
    pub role: Role,
    pub grant: bool,
}

impl Validate for pb::ChangeGrantRequest {
    type Valid = ChangeGrant;
    fn validate(&self) -> Result<ChangeGrant, Invalid> {
        let keyring = KeyringName::parse("keyring", &self.keyring)?;
        let principal = text("principal", &self.principal, MAX_TEXT, false)?;
        check_len("role", &self.role, 16)?;
        let role = self.role.parse().map_err(|()| Invalid { field: "role", problem: Problem::Role })?;
        Ok(ChangeGrant { keyring, principal, role, grant: self.grant })
    }
    fn claimed(&self) -> Subject<'_> {
        Subject { keyring: Some(self.keyring.as_str()), ..Subject::default() }
    }
    fn subject(v: &ChangeGrant) -> Subject<'_> {
        Subject { keyring: Some(v.keyring.as_str()), ..Subject::default() }
    }
}

/// RetireKeyringVersions, validated (whether the versions can go is the key manager's call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetireVersions {
    pub keyring: KeyringName,
    pub below_version: u32,
    pub force: bool,
}

impl Validate for pb::RetireKeyringVersionsRequest {
    type Valid = RetireVersions;
    fn validate(&self) -> Result<RetireVersions, Invalid> {
        Ok(RetireVersions { keyring: KeyringName::parse("keyring", &self.keyring)?, below_version: self.below_version, force: self.force })
    }
    fn claimed(&self) -> Subject<'_> {
        Subject { keyring: Some(self.keyring.as_str()), ..Subject::default() }
    }
    fn subject(v: &RetireVersions) -> Subject<'_> {
        Subject { keyring: Some(v.keyring.as_str()), ..Subject::default() }
    }
}

/// InstallEscrow, validated for size; the manifest itself is checked by the key manager
/// (`kluis_escrow::Manifest::parse`, the same checks as `kmsctl escrow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallEscrow {
    pub manifest_json: String,
    pub allow_new_recipient: bool,
}

impl Validate for pb::InstallEscrowRequest {
    type Valid = InstallEscrow;
    fn validate(&self) -> Result<InstallEscrow, Invalid> {
        if self.manifest_json.is_empty() {
            return bad("manifest_json", Problem::Empty);
        }
        check_len("manifest_json", &self.manifest_json, MAX_MANIFEST)?;
        Ok(InstallEscrow { manifest_json: self.manifest_json.clone(), allow_new_recipient: self.allow_new_recipient })
    }
}

/// GetReport, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetReport {
    pub since: Option<String>,
}

impl Validate for pb::GetReportRequest {
    type Valid = GetReport;
    fn validate(&self) -> Result<GetReport, Invalid> {
        Ok(GetReport { since: rfc3339("since", &self.since)? })
    }
}

/// ExportAudit, validated: `since` is bounded text (the key manager compares it with
/// the entries' times), `tail` any count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportAudit {
    pub since: Option<String>,
    pub tail: u64,
}

impl Validate for pb::ExportAuditRequest {
    type Valid = ExportAudit;
    fn validate(&self) -> Result<ExportAudit, Invalid> {
        let since = text("since", &self.since, MAX_SINCE, true)?;
        Ok(ExportAudit { since: Some(since).filter(|s| !s.is_empty()), tail: self.tail })
    }
}

/// A request field as the audit and the log show it: the value itself when it is at
/// most [`KEEP`] bytes with no unsafe character; otherwise at most [`KEEP`] bytes of it
/// with unsafe characters escaped (`\u{1b}`), then `…[N bytes, sha256 HEX]` with the
/// length and SHA-256 of the whole value. Never more than about 350 bytes, never a
/// control character.
#[derive(Clone, Copy)]
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s.len() <= KEEP && !s.chars().any(is_unsafe_char) {
            return f.write_str(s);
        }
        let mut used = 0;
        let mut buf = [0u8; 4];
        for c in s.chars() {
            if is_unsafe_char(c) {
                let esc = c.escape_unicode().to_string();
                if used + esc.len() > KEEP {
                    break;
                }
                used += esc.len();
                f.write_str(&esc)?;
            } else {
                let enc: &str = c.encode_utf8(&mut buf);
                if used + enc.len() > KEEP {
                    break;
                }
                used += enc.len();
                f.write_str(enc)?;
            }
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
        write!(f, "…[{} bytes, sha256 {}]", s.len(), hex::encode(digest.as_ref()))
    }
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// [`Shown`] as an owned string, for the audit entry.
pub fn shown(s: &str) -> String {
    Shown(s).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shown_keeps_a_clean_value_and_bounds_and_escapes_the_rest() {
        assert_eq!(shown("nightly-2026-01-01"), "nightly-2026-01-01");
        let long = "a".repeat(4 << 20);
        let s = shown(&long);
        assert!(s.len() < 400, "{}", s.len());
        assert!(s.starts_with(&"a".repeat(KEEP)));
        assert!(s.contains(&format!("[{} bytes, sha256 ", long.len())));
        let evil = "x\n2026-01-01T00:00:00Z  INFO forged line\u{1b}[2J";
        let s = shown(evil);
        assert!(!s.chars().any(is_unsafe_char), "{s:?}");
        assert!(s.contains("\\u{a}") && s.contains("\\u{1b}"), "{s:?}");
        // The mark of a changed value: length and digest of the original.
        assert!(s.contains(&format!("[{} bytes, sha256 ", evil.len())), "{s:?}");
        // Multi-byte characters are cut at a boundary.
        let s = shown(&"é".repeat(300));
        assert!(s.starts_with(&"é".repeat(KEEP / 2)));
    }

    #[test]
    fn each_field_is_named() {
        let r = pb::GenerateDataKeyRequest { keyring: "default".into(), backup_id: "b".repeat(MAX_TEXT + 1), labels: Default::default() };
        let e = r.validate().unwrap_err();
        assert_eq!(e, Invalid { field: "backup_id", problem: Problem::TooLong { len: MAX_TEXT + 1, max: MAX_TEXT } });
        assert_eq!(e.to_string(), "invalid backup_id: is 257 bytes, at most 256 are allowed");
        let r = pb::GenerateDataKeyRequest { keyring: "bad name".into(), backup_id: "b".into(), labels: Default::default() };
        assert_eq!(r.validate().unwrap_err().field, "keyring");
        let r = pb::GenerateDataKeyRequest { keyring: "k".into(), backup_id: "a\u{1b}b".into(), labels: Default::default() };
        assert_eq!(r.validate().unwrap_err().problem, Problem::Control);
        let r = pb::UnwrapDataKeyRequest { key_id: "AB".repeat(16), wrapped_key: vec![1; WRAPPED_DK_LEN], keyring: "k".into() };
        assert_eq!(r.validate().unwrap_err(), Invalid { field: "key_id", problem: Problem::KeyIdFormat });
        let r = pb::UnwrapDataKeyRequest { key_id: "ab".repeat(16), wrapped_key: vec![1; 3], keyring: "k".into() };
        assert_eq!(r.validate().unwrap_err().field, "wrapped_key");
        let r = pb::ChangeGrantRequest { keyring: "k".into(), principal: "p".into(), role: "janitor".into(), grant: true };
        assert_eq!(r.validate().unwrap_err().to_string(), "invalid role: must be sealer, restorer, officer or auditor");
        assert_eq!(pb::ApproveRequest { id: 0 }.validate().unwrap_err().problem, Problem::ZeroId);
        let labels = (0..=MAX_LABELS).map(|i| (i.to_string(), String::new())).collect();
        let r = pb::GenerateDataKeyRequest { keyring: "k".into(), backup_id: "b".into(), labels };
        assert_eq!(r.validate().unwrap_err().field, "labels");
        assert_eq!(pb::GetReportRequest { since: "yesterday".into() }.validate().unwrap_err().problem, Problem::Time);
        assert!(pb::SetLegalHoldRequest { keyring: "k".into(), hold: true, reason: String::new() }.validate().is_err());
        assert!(pb::SetLegalHoldRequest { keyring: "k".into(), hold: false, reason: String::new() }.validate().is_ok());
        let find = |backup_id: &str, keyring: &str| pb::FindDataKeysRequest { backup_id: backup_id.into(), keyring: keyring.into() }.validate();
        assert_eq!(find("", "").unwrap_err(), Invalid { field: "backup_id", problem: Problem::Empty });
        assert_eq!(find(&"b".repeat(MAX_TEXT + 1), "").unwrap_err().field, "backup_id");
        assert_eq!(find("a\nb", "").unwrap_err(), Invalid { field: "backup_id", problem: Problem::Control });
        assert_eq!(find("b", "bad name").unwrap_err(), Invalid { field: "keyring", problem: Problem::Charset });
        assert_eq!(find("b", "").unwrap().keyring, None);
        assert_eq!(find("b", "ehr-db").unwrap().keyring.map(|k| k.as_str().to_owned()).as_deref(), Some("ehr-db"));
    }

    #[test]
    fn a_valid_request_keeps_its_values() {
        let mut labels = std::collections::HashMap::new();
        labels.insert("tool".to_owned(), "restic".to_owned());
        labels.insert("host".to_owned(), String::new());
        let r = pb::GenerateDataKeyRequest { keyring: "ehr-db".into(), backup_id: "nightly 2026-01-01".into(), labels };
        let v = r.validate().unwrap();
        assert_eq!(v.keyring.as_str(), "ehr-db");
        assert_eq!(v.backup_id.as_str(), "nightly 2026-01-01");
        assert_eq!(v.labels, vec![("host".into(), String::new()), ("tool".into(), "restic".into())]);
        let s = <pb::GenerateDataKeyRequest as Validate>::subject(&v);
        assert_eq!(s, Subject { keyring: Some("ehr-db"), key_id: None, backup_id: Some("nightly 2026-01-01") });
    }
}
