//! Authentication (mTLS client certificate to principal) and authorization
//! (principal, action, keyring to an [`Authorized`] proof value).
//!
//! Handlers cannot build an [`Authorized`] themselves: its fields are private to
//! this module, so holding one proves the policy check happened.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A role a principal holds on some keyrings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Sealer,
    Restorer,
    Officer,
    Auditor,
}

impl std::str::FromStr for Role {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "sealer" => Ok(Role::Sealer),
            "restorer" => Ok(Role::Restorer),
            "officer" => Ok(Role::Officer),
            "auditor" => Ok(Role::Auditor),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Sealer => "sealer",
            Role::Restorer => "restorer",
            Role::Officer => "officer",
            Role::Auditor => "auditor",
        })
    }
}

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
    DestroyKey,
    DestroyKeyring,
    CancelDestruction,
    ListDestructions,
    RotateMaster,
    GetReport,
}

impl Action {
    /// The roles that permit this action (on the keyring concerned).
    pub fn permitted_roles(self) -> &'static [Role] {
        match self {
            Action::GenerateDataKey => &[Role::Sealer],
            Action::UnwrapDataKey | Action::RecordRestoreTest | Action::RewrapDataKey => &[Role::Restorer],
            Action::RemoveEscrow
            | Action::SetKeyringPolicy
            | Action::SetLegalHold
            | Action::DestroyKey
            | Action::DestroyKeyring
            | Action::CancelDestruction
            | Action::RotateMaster => &[Role::Officer],
            Action::GetDataKey | Action::ListDestructions | Action::GetReport => &[Role::Officer, Role::Auditor],
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
            Action::DestroyKey => "DestroyKey",
            Action::DestroyKeyring => "DestroyKeyring",
            Action::CancelDestruction => "CancelDestruction",
            Action::ListDestructions => "ListDestructions",
            Action::RotateMaster => "RotateMaster",
            Action::GetReport => "GetReport",
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
}

/// Which part of the client certificate names the principal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    /// The subject common name.
    #[default]
    Cn,
    /// The first URI subject alternative name (e.g. `spiffe://clinic/backup01`).
    SanUri,
    /// The first DNS subject alternative name.
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
        let san = |want_uri: bool| -> Option<String> {
            let ext = cert.subject_alternative_name().ok().flatten()?;
            ext.value.general_names.iter().find_map(|n| match (n, want_uri) {
                (GeneralName::URI(u), true) => Some((*u).to_owned()),
                (GeneralName::DNSName(d), false) => Some((*d).to_owned()),
                _ => None,
            })
        };
        match source {
            IdentitySource::Cn => {
                let cn = cert
                    .subject()
                    .iter_common_name()
                    .next()
                    .and_then(|cn| cn.as_str().ok())
                    .ok_or(AuthError::NoCommonName)?;
                Ok(Self(cn.to_owned()))
            }
            IdentitySource::SanUri => san(true).map(Self).ok_or(AuthError::NoSan { kind: "URI" }),
            IdentitySource::SanDns => san(false).map(Self).ok_or(AuthError::NoSan { kind: "DNS" }),
        }
    }

    #[cfg(test)]
    pub fn for_test(name: &str) -> Self {
        Self(name.to_owned())
    }
}

/// A deny list of client certificates (SHA-256 fingerprints of the DER, hex, one
/// per line; `#` comments), re-read whenever the file changes: revoking needs no restart.
pub struct RevocationList {
    path: std::path::PathBuf,
    state: std::sync::Mutex<RevocationState>,
}

#[derive(Default)]
struct RevocationState {
    stamp: Option<(std::time::SystemTime, u64)>,
    fingerprints: std::collections::HashSet<String>,
}

/// Errors loading the deny list at start.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("revocation list {path} could not be read: {source}")]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("revocation list {path}, line {line}: not a SHA-256 fingerprint (64 hex digits, colons allowed)")]
    Parse { path: std::path::PathBuf, line: usize },
}

impl RevocationList {
    /// Loads the list; a missing or malformed file refuses the start.
    pub fn load(path: &std::path::Path) -> Result<Self, RevocationError> {
        let mut list = Self { path: path.to_owned(), state: std::sync::Mutex::new(RevocationState::default()) };
        list.state = std::sync::Mutex::new(list.read()?);
        Ok(list)
    }

    fn read(&self) -> Result<RevocationState, RevocationError> {
        let err = |e| RevocationError::Read { path: self.path.clone(), source: e };
        let meta = std::fs::metadata(&self.path).map_err(err)?;
        let text = std::fs::read_to_string(&self.path).map_err(err)?;
        let mut fingerprints = std::collections::HashSet::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let hex: String = line.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(RevocationError::Parse { path: self.path.clone(), line: i + 1 });
            }
            fingerprints.insert(hex);
        }
        Ok(RevocationState { stamp: meta.modified().ok().map(|m| (m, meta.len())), fingerprints })
    }

    /// Refuses a revoked certificate. Re-reads the file if it changed; if it became
    /// unreadable, keeps the last good list and says so in the log.
    pub fn check(&self, principal: &Principal, der: &[u8]) -> Result<(), AuthError> {
        let stamp = std::fs::metadata(&self.path).ok().and_then(|m| m.modified().ok().map(|t| (t, m.len())));
        let mut st = self.state.lock().map_err(|_| AuthError::RevocationUnavailable)?;
        if stamp != st.stamp {
            match self.read() {
                Ok(fresh) => {
                    tracing::info!(path = %self.path.display(), entries = fresh.fingerprints.len(), "revocation list reloaded");
                    *st = fresh;
                }
                Err(e) => tracing::error!(error = %e, "revocation list unreadable; keeping the previous one"),
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
    /// listing, on at least one (the listing is then filtered with [`Policy::may_see`]).
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
                    (None, Action::ListKeyrings) => !g.keyrings.is_empty(),
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
}
