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
}

impl Action {
    /// The roles that permit this action (on the keyring concerned).
    pub fn permitted_roles(self) -> &'static [Role] {
        match self {
            Action::GenerateDataKey => &[Role::Sealer],
            Action::UnwrapDataKey => &[Role::Restorer],
            Action::CreateKeyring | Action::InstallEscrow => &[Role::Officer],
            Action::ListKeyrings | Action::GetKeyring | Action::GetEscrowStatus => {
                &[Role::Officer, Role::Auditor]
            }
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
}

/// An authenticated caller, named by its certificate's common name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal(String);

impl Principal {
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The principal of a DER-encoded, already TLS-verified client certificate.
    pub fn from_certificate(der: &[u8]) -> Result<Self, AuthError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| AuthError::BadCertificate)?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(AuthError::NoCommonName)?;
        Ok(Self(cn.to_owned()))
    }

    #[cfg(test)]
    pub fn for_test(name: &str) -> Self {
        Self(name.to_owned())
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
    fn covers(&self, keyring: &str) -> bool {
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

/// Deny-by-default policy from the server configuration.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    grants: Vec<Grant>,
}

impl Policy {
    pub fn new(grants: Vec<Grant>) -> Self {
        Self { grants }
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
        let ok = self.grants.iter().filter(|g| g.principal == principal.0).any(|g| {
            g.roles.iter().any(|r| roles.contains(r))
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
        self.grants
            .iter()
            .filter(|g| g.principal == auth.principal.0)
            .any(|g| g.roles.iter().any(|r| roles.contains(r)) && g.covers(keyring))
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
}
