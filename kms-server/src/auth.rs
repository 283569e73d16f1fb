//! Authentication (mTLS client certificate to principal) and authorization
//! (principal, action, keyring to an [`Authorized`] proof value).
//!
//! Handlers cannot build an [`Authorized`] themselves: its fields are private to
//! this module, so holding one proves the policy check happened.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

pub use crate::model::Role;

/// Every RPC the server offers, as an authorization action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    GenerateDataKey,
    UnwrapDataKey,
    CreateKeyring,
    ListKeyrings,
    GetKeyring,
    InstallEscrow,
    GetEscrowStatus,
    ExportAudit,
    GetAuditPublicKey,
    RotateKeyring,
    RecordRestoreTest,
    ChangeGrant,
    ListGrants,
    RetireVersions,
    Approve,
    ListApprovals,
    RewrapDataKey,
    RemoveEscrow,
    SetKeyringPolicy,
    SetLegalHold,
    GetDataKey,
    FindDataKeys,
    DestroyKey,
    DestroyKeyring,
    CancelDestruction,
    ListDestructions,
    RotateMaster,
    GetReport,
    MarkDataKeyEscrowed,
    KmipImport,
}

impl Action {
    /// The roles that permit this action (on the keyring concerned).
    pub fn permitted_roles(self) -> &'static [Role] {
        match self {
            Action::GenerateDataKey => &[Role::Sealer],
            Action::UnwrapDataKey | Action::RecordRestoreTest | Action::RewrapDataKey | Action::MarkDataKeyEscrowed => {
                &[Role::Restorer]
            }
            Action::RemoveEscrow
            | Action::SetKeyringPolicy
            | Action::SetLegalHold
            | Action::DestroyKey
            | Action::DestroyKeyring
            | Action::CancelDestruction
            | Action::RotateMaster
            | Action::KmipImport => &[Role::Officer],
            Action::GetDataKey | Action::FindDataKeys | Action::ListDestructions | Action::GetReport => &[Role::Officer, Role::Auditor],
            Action::RotateKeyring | Action::ChangeGrant | Action::RetireVersions | Action::Approve => &[Role::Officer],
            Action::ListApprovals => &[Role::Officer, Role::Auditor],
            Action::ListGrants => &[Role::Officer, Role::Auditor],
            Action::CreateKeyring | Action::InstallEscrow => &[Role::Officer],
            Action::ListKeyrings
            | Action::GetKeyring
            | Action::GetEscrowStatus
            | Action::ExportAudit
            | Action::GetAuditPublicKey => &[Role::Officer, Role::Auditor],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::GenerateDataKey => "GenerateDataKey",
            Action::UnwrapDataKey => "UnwrapDataKey",
            Action::CreateKeyring => "CreateKeyring",
            Action::ListKeyrings => "ListKeyrings",
            Action::GetKeyring => "GetKeyring",
            Action::InstallEscrow => "InstallEscrow",
            Action::GetEscrowStatus => "GetEscrowStatus",
            Action::ExportAudit => "ExportAudit",
            Action::GetAuditPublicKey => "GetAuditPublicKey",
            Action::RotateKeyring => "RotateKeyring",
            Action::RecordRestoreTest => "RecordRestoreTest",
            Action::ChangeGrant => "ChangeGrant",
            Action::ListGrants => "ListGrants",
            Action::RetireVersions => "RetireKeyringVersions",
            Action::Approve => "Approve",
            Action::ListApprovals => "ListApprovals",
            Action::RewrapDataKey => "RewrapDataKey",
            Action::RemoveEscrow => "RemoveEscrow",
            Action::SetKeyringPolicy => "SetKeyringPolicy",
            Action::SetLegalHold => "SetLegalHold",
            Action::GetDataKey => "GetDataKey",
            Action::FindDataKeys => "FindDataKeys",
            Action::DestroyKey => "DestroyKey",
            Action::DestroyKeyring => "DestroyKeyring",
            Action::CancelDestruction => "CancelDestruction",
            Action::ListDestructions => "ListDestructions",
            Action::RotateMaster => "RotateMaster",
            Action::GetReport => "GetReport",
            Action::MarkDataKeyEscrowed => "MarkDataKeyEscrowed",
            Action::KmipImport => "KmipImport",
        }
    }
}

/// Errors of the auth layer.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the client certificate could not be parsed")]
    BadCertificate,
    #[error("the client certificate has no subject common name")]
    NoCommonName,
    #[error("principal {principal:?} may not {action} on keyring {keyring:?}")]
    Denied { principal: String, action: &'static str, keyring: String },
    #[error("principal {principal:?} may not {action}")]
    DeniedGlobal { principal: String, action: &'static str },
    #[error("the client certificate has no {kind} subject alternative name, which this server uses as the identity")]
    NoSan { kind: &'static str },
    #[error("the client certificate of {principal:?} (SHA-256 {fingerprint}) is revoked")]
    Revoked { principal: String, fingerprint: String },
    /// The revocation list cannot be consulted: the request is refused (fail closed),
    /// but as the server's fault, not as a verdict on the certificate.
    #[error("the revocation list cannot be checked (its lock was poisoned); refusing the request")]
    RevocationUnavailable,
    /// The certificate names more than one identity of the configured kind: which one
    /// is meant is not for the server to guess.
    #[error("the client certificate's identity is ambiguous: {reason}")]
    AmbiguousIdentity { reason: AmbiguousIdentity },
}

/// Why a certificate's identity is ambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AmbiguousIdentity {
    #[error("its subject has {count} common names (CN); exactly one is accepted")]
    SeveralCommonNames { count: usize },
    #[error("it has {count} {kind} subject alternative names; exactly one is accepted as the identity")]
    SeveralSans { kind: &'static str, count: usize },
}

/// Which part of the client certificate names the principal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    /// The subject common name.
    #[default]
    Cn,
    /// The URI subject alternative name (e.g. `spiffe://clinic/backup01`); a certificate
    /// with several is refused as ambiguous.
    SanUri,
    /// The DNS subject alternative name; a certificate with several is refused as ambiguous.
    SanDns,
}

/// An authenticated caller, named by its certificate's common name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal(String);

impl Principal {
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The principal of a DER-encoded, already TLS-verified client certificate.
    pub fn from_certificate(der: &[u8], source: IdentitySource) -> Result<Self, AuthError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| AuthError::BadCertificate)?;
        // Exactly one name of the configured kind, or the certificate is refused.
        let san = |want_uri: bool, kind: &'static str| -> Result<Self, AuthError> {
            let names: Vec<&str> = match cert.subject_alternative_name() {
                Ok(Some(ext)) => ext
                    .value
                    .general_names
                    .iter()
                    .filter_map(|n| match (n, want_uri) {
                        (GeneralName::URI(u), true) => Some(*u),
                        (GeneralName::DNSName(d), false) => Some(*d),
                        _ => None,
                    })
                    .collect(),
                Ok(None) => Vec::new(),
                // A duplicated extension is itself ambiguous; x509-parser refuses it.
                Err(_) => return Err(AuthError::BadCertificate),
            };
            match names.as_slice() {
                [] => Err(AuthError::NoSan { kind }),
                [one] => Ok(Self((*one).to_owned())),
                several => Err(AuthError::AmbiguousIdentity {
                    reason: AmbiguousIdentity::SeveralSans { kind, count: several.len() },
                }),
            }
        };
        match source {
            IdentitySource::Cn => {
                let cns: Vec<_> = cert.subject().iter_common_name().collect();
                match cns.as_slice() {
                    [] => Err(AuthError::NoCommonName),
                    [one] => one.as_str().map(|cn| Self(cn.to_owned())).map_err(|_| AuthError::NoCommonName),
                    several => Err(AuthError::AmbiguousIdentity {
                        reason: AmbiguousIdentity::SeveralCommonNames { count: several.len() },
                    }),
                }
            }
            IdentitySource::SanUri => san(true, "URI"),
            IdentitySource::SanDns => san(false, "DNS"),
        }
    }

    #[cfg(test)]
    pub fn for_test(name: &str) -> Self {
        Self(name.to_owned())
    }
}

/// Largest revocation list read (a fingerprint line is about 100 bytes: tens of thousands fit).
pub const MAX_REVOCATION_LIST_BYTES: u64 = 8 << 20;

/// A deny list of client certificates (SHA-256 fingerprints of the DER, hex, one
/// per line; `#` comments), re-read whenever the file changes: revoking needs no restart.
///
/// Grammar, per line: blank; a comment starting with `#`; or one fingerprint, 64 hex
/// digits (either case) or 32 two-digit groups separated by `:`, optionally followed
/// by whitespace and a `#` comment. Anything else refuses the whole file, naming the line.
pub struct RevocationList {
    path: std::path::PathBuf,
    state: std::sync::Mutex<RevocationState>,
    /// Counts refused reloads (`kluis_reload_failures_total`; the metrics layer reads it).
    reload_failures: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

#[derive(Default)]
struct RevocationState {
    stamp: Option<(std::time::SystemTime, u64)>,
    fingerprints: std::collections::HashSet<String>,
}

/// What is wrong with a line of the revocation list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RevocationLineError {
    #[error("not a SHA-256 fingerprint (64 hex digits, or 32 hex pairs separated by ':')")]
    NotFingerprint,
    #[error("text after the fingerprint that is not a '#' comment")]
    TrailingText,
    #[error("not UTF-8 text")]
    NotUtf8,
}

/// Errors loading the deny list.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("revocation list {path} could not be read: {source}")]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("revocation list {path} is larger than {cap} bytes")]
    TooLarge { path: std::path::PathBuf, cap: u64 },
    #[error("revocation list {path}, line {line}: {reason}")]
    Parse { path: std::path::PathBuf, line: usize, reason: RevocationLineError },
}

/// One fingerprint, lower-case hex, or why the text is not one.
fn parse_fingerprint(s: &str) -> Result<String, RevocationLineError> {
    let hex: String = if s.contains(':') {
        let groups: Vec<&str> = s.split(':').collect();
        if groups.len() != 32 || groups.iter().any(|g| g.len() != 2) {
            return Err(RevocationLineError::NotFingerprint);
        }
        groups.concat()
    } else {
        s.to_owned()
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RevocationLineError::NotFingerprint);
    }
    Ok(hex.to_ascii_lowercase())
}

/// Parses the deny list; the error names the first bad line (1-based).
pub fn parse_revocation_list(bytes: &[u8]) -> Result<std::collections::HashSet<String>, (usize, RevocationLineError)> {
    let mut fingerprints = std::collections::HashSet::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = std::str::from_utf8(raw).map_err(|_| (i + 1, RevocationLineError::NotUtf8))?;
        let line = line.strip_suffix('\r').unwrap_or(line).trim_matches(|c| c == ' ' || c == '\t');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (fp, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
        let rest = rest.trim_start_matches([' ', '\t']);
        if !rest.is_empty() && !rest.starts_with('#') {
            // Tell a bad fingerprint from a good one followed by junk.
            parse_fingerprint(fp).map_err(|e| (i + 1, e))?;
            return Err((i + 1, RevocationLineError::TrailingText));
        }
        fingerprints.insert(parse_fingerprint(fp).map_err(|e| (i + 1, e))?);
    }
    Ok(fingerprints)
}

impl RevocationList {
    /// Loads the list; a missing or malformed file refuses the start.
    pub fn load(path: &std::path::Path) -> Result<Self, RevocationError> {
        let mut list = Self { path: path.to_owned(), state: std::sync::Mutex::new(RevocationState::default()), reload_failures: None };
        list.state = std::sync::Mutex::new(list.read()?);
        Ok(list)
    }

    /// Counts failed reloads in `counter` (`kluis_reload_failures_total`).
    pub fn with_failure_counter(mut self, counter: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.reload_failures = Some(counter);
        self
    }

    fn read(&self) -> Result<RevocationState, RevocationError> {
        use std::io::Read as _;
        let err = |e| RevocationError::Read { path: self.path.clone(), source: e };
        let file = std::fs::File::open(&self.path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let mut bytes = Vec::new();
        file.take(MAX_REVOCATION_LIST_BYTES + 1).read_to_end(&mut bytes).map_err(err)?;
        if bytes.len() as u64 > MAX_REVOCATION_LIST_BYTES {
            return Err(RevocationError::TooLarge { path: self.path.clone(), cap: MAX_REVOCATION_LIST_BYTES });
        }
        let fingerprints = parse_revocation_list(&bytes)
            .map_err(|(line, reason)| RevocationError::Parse { path: self.path.clone(), line, reason })?;
        Ok(RevocationState { stamp: meta.modified().ok().map(|m| (m, meta.len())), fingerprints })
    }

    /// Refuses a revoked certificate. Re-reads the file if it changed; if it became
    /// unreadable or malformed, keeps the last good list, logs why (with the line) and
    /// counts the failure.
    pub fn check(&self, principal: &Principal, der: &[u8]) -> Result<(), AuthError> {
        let stamp = std::fs::metadata(&self.path).ok().and_then(|m| m.modified().ok().map(|t| (t, m.len())));
        let mut st = self.state.lock().map_err(|_| AuthError::RevocationUnavailable)?;
        if stamp != st.stamp {
            match self.read() {
                Ok(fresh) => {
                    tracing::info!(path = %self.path.display(), entries = fresh.fingerprints.len(), "revocation list reloaded");
                    *st = fresh;
                }
                Err(e) => {
                    tracing::error!(error = %e, "revocation list not reloaded; keeping the previous one");
                    // Retry only when the file changes again.
                    st.stamp = stamp;
                    if let Some(c) = &self.reload_failures {
                        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
        let fp = hex::encode(ring::digest::digest(&ring::digest::SHA256, der));
        if st.fingerprints.contains(&fp) {
            tracing::warn!(principal = %principal.0, fingerprint = %fp, "revoked certificate refused");
            return Err(AuthError::Revoked { principal: principal.0.clone(), fingerprint: fp });
        }
        Ok(())
    }
}

/// Turns a verified client certificate into a principal, refusing revoked ones.
pub struct Authenticator {
    source: IdentitySource,
    revoked: Option<RevocationList>,
}

impl Authenticator {
    pub fn new(source: IdentitySource, revoked: Option<RevocationList>) -> Self {
        Self { source, revoked }
    }

    /// The principal of the leaf certificate (DER) the TLS layer verified.
    pub fn authenticate(&self, leaf_der: &[u8]) -> Result<Principal, AuthError> {
        let p = Principal::from_certificate(leaf_der, self.source)?;
        if let Some(r) = &self.revoked {
            r.check(&p, leaf_der)?;
        }
        Ok(p)
    }
}

/// Keyrings a grant applies to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The certificate common name of the principal.
    pub principal: String,
    pub roles: BTreeSet<Role>,
    /// Keyring names, or `"*"` for all keyrings.
    pub keyrings: Vec<String>,
}

impl Grant {
    pub(crate) fn covers(&self, keyring: &str) -> bool {
        self.keyrings.iter().any(|k| k == "*" || k == keyring)
    }
}

/// Proof that `principal` may perform `action` (on `keyring`, if any).
/// Only [`Policy::authorize`] makes one.
#[derive(Debug)]
pub struct Authorized {
    principal: Principal,
    action: Action,
    keyring: Option<String>,
}

impl Authorized {
    pub fn principal(&self) -> &Principal {
        &self.principal
    }
    pub fn action(&self) -> Action {
        self.action
    }
    /// The keyring this authorization is for, if the action concerns one keyring.
    pub fn keyring(&self) -> Option<&str> {
        self.keyring.as_deref()
    }
    /// Whether this proof covers `action` on `keyring`.
    pub fn covers(&self, action: Action, keyring: Option<&str>) -> bool {
        self.action == action && self.keyring.as_deref() == keyring
    }
}

/// A role on one keyring granted at run time by an officer (stored in the store).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuntimeGrant {
    pub principal: String,
    pub role: Role,
    pub keyring: String,
}

/// Deny-by-default policy: the config file's grants plus the runtime grants.
#[derive(Debug, Default)]
pub struct Policy {
    config: Vec<Grant>,
    runtime: arc_swap::ArcSwap<Vec<Grant>>,
}

impl Policy {
    pub fn new(grants: Vec<Grant>) -> Self {
        Self { config: grants, runtime: arc_swap::ArcSwap::from_pointee(Vec::new()) }
    }

    /// Replaces the runtime grants (after a ChangeGrant, or at start).
    pub fn set_runtime(&self, grants: &[RuntimeGrant]) {
        let as_grants = grants
            .iter()
            .map(|g| Grant { principal: g.principal.clone(), roles: [g.role].into(), keyrings: vec![g.keyring.clone()] })
            .collect();
        self.runtime.store(std::sync::Arc::new(as_grants));
    }

    /// The config file's grants (for listings).
    pub fn config_grants(&self) -> &[Grant] {
        &self.config
    }

    /// Whether any grant, from the config or the runtime set, satisfies `pred`.
    fn any_grant(&self, pred: impl Fn(&Grant) -> bool) -> bool {
        self.config.iter().any(&pred) || self.runtime.load().iter().any(&pred)
    }

    /// Checks `principal` for `action`; `keyring` is `None` for actions not tied to one
    /// keyring (listing, escrow), which need the role on all keyrings (`"*"`) or, for
    /// listing keyrings and finding data keys, on at least one (the answer is then
    /// filtered with [`Policy::may_see`]).
    pub fn authorize(
        &self,
        principal: &Principal,
        action: Action,
        keyring: Option<&str>,
    ) -> Result<Authorized, AuthError> {
        let roles = action.permitted_roles();
        let ok = self.any_grant(|g| {
            g.principal == principal.0
                && g.roles.iter().any(|r| roles.contains(r))
                && match (keyring, action) {
                    (Some(k), _) => g.covers(k),
                    (None, Action::ListKeyrings | Action::FindDataKeys) => !g.keyrings.is_empty(),
                    (None, _) => g.keyrings.iter().any(|k| k == "*"),
                }
        });
        if ok {
            Ok(Authorized { principal: principal.clone(), action, keyring: keyring.map(str::to_owned) })
        } else {
            tracing::warn!(principal = %principal.0, action = action.name(), keyring = keyring.unwrap_or("*"), "request refused");
            Err(match keyring {
                Some(k) => AuthError::Denied { principal: principal.0.clone(), action: action.name(), keyring: k.to_owned() },
                None => AuthError::DeniedGlobal { principal: principal.0.clone(), action: action.name() },
            })
        }
    }

    /// The keyring a KMIP client's objects go to, from its grants: the one keyring its
    /// `sealer` grants name (not `"*"`), if there is exactly one.
    pub fn kmip_keyring(&self, principal: &Principal) -> Option<String> {
        let mut named = BTreeSet::new();
        let mut visit = |g: &Grant| {
            if g.principal == principal.0 && g.roles.contains(&Role::Sealer) {
                named.extend(g.keyrings.iter().filter(|k| *k != "*").cloned());
            }
        };
        self.config.iter().for_each(&mut visit);
        self.runtime.load().iter().for_each(&mut visit);
        if named.len() == 1 { named.pop_first() } else { None }
    }

    /// Whether `principal` holds `sealer` or `restorer` on `keyring`: the objects a KMIP
    /// Locate may show it.
    pub fn may_use(&self, principal: &Principal, keyring: &str) -> bool {
        self.any_grant(|g| {
            g.principal == principal.0 && (g.roles.contains(&Role::Sealer) || g.roles.contains(&Role::Restorer)) && g.covers(keyring)
        })
    }

    /// Whether an authorized lister may see `keyring` in a listing.
    pub fn may_see(&self, auth: &Authorized, keyring: &str) -> bool {
        let roles = auth.action.permitted_roles();
        self.any_grant(|g| g.principal == auth.principal.0 && g.roles.iter().any(|r| roles.contains(r)) && g.covers(keyring))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::new(vec![
            Grant { principal: "host1".into(), roles: [Role::Sealer].into(), keyrings: vec!["ehr".into()] },
            Grant { principal: "ops".into(), roles: [Role::Restorer].into(), keyrings: vec!["*".into()] },
            Grant { principal: "so".into(), roles: [Role::Officer].into(), keyrings: vec!["*".into()] },
        ])
    }

    #[test]
    fn deny_by_default_and_per_keyring() {
        let p = policy();
        let host = Principal::for_test("host1");
        assert!(p.authorize(&host, Action::GenerateDataKey, Some("ehr")).is_ok());
        assert!(p.authorize(&host, Action::GenerateDataKey, Some("pacs")).is_err());
        let e = p.authorize(&host, Action::UnwrapDataKey, Some("ehr")).unwrap_err();
        assert_eq!(e.to_string(), "principal \"host1\" may not UnwrapDataKey on keyring \"ehr\"");
        assert!(p.authorize(&Principal::for_test("nobody"), Action::ListKeyrings, None).is_err());
        assert!(p.authorize(&Principal::for_test("ops"), Action::UnwrapDataKey, Some("x")).is_ok());
        assert!(p.authorize(&Principal::for_test("ops"), Action::CreateKeyring, Some("x")).is_err());
        assert!(p.authorize(&Principal::for_test("so"), Action::InstallEscrow, None).is_ok());
        let a = p.authorize(&Principal::for_test("so"), Action::CreateKeyring, Some("x")).unwrap();
        assert!(a.covers(Action::CreateKeyring, Some("x")));
        assert!(!a.covers(Action::CreateKeyring, Some("y")));
    }

    #[test]
    fn finding_keys_needs_the_role_on_one_keyring_and_sees_only_those() {
        let p = Policy::new(vec![
            Grant { principal: "aud".into(), roles: [Role::Auditor].into(), keyrings: vec!["pacs".into()] },
            Grant { principal: "host1".into(), roles: [Role::Sealer].into(), keyrings: vec!["*".into()] },
        ]);
        let aud = Principal::for_test("aud");
        let a = p.authorize(&aud, Action::FindDataKeys, None).unwrap();
        assert!(p.may_see(&a, "pacs") && !p.may_see(&a, "ehr"));
        assert!(p.authorize(&aud, Action::FindDataKeys, Some("pacs")).is_ok());
        let e = p.authorize(&aud, Action::FindDataKeys, Some("ehr")).unwrap_err();
        assert_eq!(e.to_string(), "principal \"aud\" may not FindDataKeys on keyring \"ehr\"");
        assert!(p.authorize(&aud, Action::ListDestructions, None).is_err(), "other global reads still need \"*\"");
        let e = p.authorize(&Principal::for_test("host1"), Action::FindDataKeys, None).unwrap_err();
        assert_eq!(e.to_string(), "principal \"host1\" may not FindDataKeys");
    }

    #[test]
    fn a_poisoned_revocation_list_refuses_instead_of_letting_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.txt");
        std::fs::write(&path, "# none revoked\n").unwrap();
        let list = std::sync::Arc::new(RevocationList::load(&path).unwrap());
        let p = Principal::for_test("host1");
        assert!(list.check(&p, b"some certificate").is_ok());
        let poison = list.clone();
        let _ = std::thread::spawn(move || {
            let _g = poison.state.lock();
            panic!("poison the lock");
        })
        .join();
        assert!(matches!(list.check(&p, b"some certificate"), Err(AuthError::RevocationUnavailable)));
    }

    const FP: &str = "25601742e95796c1358e8b6ae9d73754a0aa296b47e31a01e6a8a3b9d694b0b0";

    fn line_error(text: &str) -> (usize, RevocationLineError) {
        parse_revocation_list(text.as_bytes()).unwrap_err()
    }

    #[test]
    fn revocation_list_accepts_fingerprints_comments_and_blank_lines() {
        let colon = FP.to_ascii_uppercase().as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(":");
        let text = format!("# revoked\n\n  {FP}  # laptop\n{}\r\n\t{colon}\n", FP.to_ascii_uppercase());
        let set = parse_revocation_list(text.as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.contains(FP));
        assert!(parse_revocation_list(b"").unwrap().is_empty());
    }

    #[test]
    fn revocation_list_refuses_a_short_or_long_fingerprint_naming_the_line() {
        assert_eq!(line_error(&format!("# x\n{}\n", &FP[..63])), (2, RevocationLineError::NotFingerprint));
        assert_eq!(line_error(&format!("{FP}0\n")), (1, RevocationLineError::NotFingerprint));
    }

    #[test]
    fn revocation_list_refuses_non_hex_naming_the_line() {
        assert_eq!(line_error(&format!("{FP}\n\n{}g\n", &FP[..63])), (3, RevocationLineError::NotFingerprint));
        assert_eq!(line_error("sealer\n"), (1, RevocationLineError::NotFingerprint));
    }

    #[test]
    fn revocation_list_refuses_malformed_colon_groups() {
        let bad = format!("{}:{}", &FP[..3], &FP[3..]);
        assert_eq!(line_error(&bad), (1, RevocationLineError::NotFingerprint));
        let mixed = format!("{}:{}", &FP[..2], &FP[2..]);
        assert_eq!(line_error(&mixed), (1, RevocationLineError::NotFingerprint));
    }

    #[test]
    fn revocation_list_refuses_text_after_a_fingerprint_that_is_not_a_comment() {
        assert_eq!(line_error(&format!("{FP}\n{FP} sealer\n")), (2, RevocationLineError::TrailingText));
        assert_eq!(line_error(&format!("{FP} {FP}\n")), (1, RevocationLineError::TrailingText));
    }

    #[test]
    fn revocation_list_refuses_non_utf8_naming_the_line() {
        assert_eq!(parse_revocation_list(b"# ok\n# \xff\n").unwrap_err(), (2, RevocationLineError::NotUtf8));
    }

    #[test]
    fn revocation_list_over_the_cap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.txt");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_REVOCATION_LIST_BYTES + 1).unwrap();
        let e = RevocationList::load(&path).err().unwrap();
        assert!(matches!(e, RevocationError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn a_malformed_reload_keeps_the_previous_list_and_counts_the_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.txt");
        let der = b"some certificate";
        let fp = hex::encode(ring::digest::digest(&ring::digest::SHA256, der));
        std::fs::write(&path, format!("{fp}\n")).unwrap();
        let failures = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let list = RevocationList::load(&path).unwrap().with_failure_counter(failures.clone());
        let p = Principal::for_test("host1");
        assert!(matches!(list.check(&p, der), Err(AuthError::Revoked { .. })));
        // Not a fingerprint on line 2: the previous list stays in force.
        std::fs::write(&path, format!("{fp}\nnot-a-fingerprint\n# and more\n")).unwrap();
        assert!(matches!(list.check(&p, der), Err(AuthError::Revoked { .. })));
        assert_eq!(failures.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Checked again without a change: not counted again.
        assert!(matches!(list.check(&p, der), Err(AuthError::Revoked { .. })));
        assert_eq!(failures.load(std::sync::atomic::Ordering::Relaxed), 1);
        // A good file again takes effect.
        std::fs::write(&path, "# nobody revoked\n").unwrap();
        assert!(list.check(&p, der).is_ok());
    }

    fn cert_with(dn: rcgen::DistinguishedName, sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn several_common_names_are_refused_as_ambiguous() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "dev");
        // A second CN attribute (OID 2.5.4.3) after the first: CN=dev,CN=nobody.
        dn.push(rcgen::DnType::CustomDnType(vec![2, 5, 4, 3]), "nobody");
        let der = cert_with(dn, vec![]);
        let e = Principal::from_certificate(&der, IdentitySource::Cn).unwrap_err();
        assert!(
            matches!(e, AuthError::AmbiguousIdentity { reason: AmbiguousIdentity::SeveralCommonNames { count: 2 } }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "the client certificate's identity is ambiguous: its subject has 2 common names (CN); exactly one is accepted"
        );
        let mut one = rcgen::DistinguishedName::new();
        one.push(rcgen::DnType::CommonName, "dev");
        assert_eq!(Principal::from_certificate(&cert_with(one, vec![]), IdentitySource::Cn).unwrap().name(), "dev");
    }

    #[test]
    fn several_matching_sans_are_refused_as_ambiguous() {
        let uri = |u: &str| rcgen::SanType::URI(u.try_into().unwrap());
        let dns = |d: &str| rcgen::SanType::DnsName(d.try_into().unwrap());
        let der = cert_with(rcgen::DistinguishedName::new(), vec![uri("spiffe://clinic/a"), uri("spiffe://clinic/b"), dns("a.clinic")]);
        let e = Principal::from_certificate(&der, IdentitySource::SanUri).unwrap_err();
        assert!(matches!(e, AuthError::AmbiguousIdentity { reason: AmbiguousIdentity::SeveralSans { kind: "URI", count: 2 } }), "{e}");
        // One DNS name among them: unambiguous for san-dns.
        assert_eq!(Principal::from_certificate(&der, IdentitySource::SanDns).unwrap().name(), "a.clinic");
        let der = cert_with(rcgen::DistinguishedName::new(), vec![dns("a.clinic"), dns("b.clinic")]);
        let e = Principal::from_certificate(&der, IdentitySource::SanDns).unwrap_err();
        assert!(matches!(e, AuthError::AmbiguousIdentity { reason: AmbiguousIdentity::SeveralSans { kind: "DNS", count: 2 } }), "{e}");
        assert!(matches!(Principal::from_certificate(&der, IdentitySource::SanUri), Err(AuthError::NoSan { kind: "URI" })));
    }
}
