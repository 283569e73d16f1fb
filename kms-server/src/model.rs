//! The typed records, actions and outcomes that every layer shares. Plain data: no
//! persistence, no key material in clear (wrapped keys only), no knowledge of the wire.

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

/// State of one keyring version.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionState {
    Active,
    Retired,
}

/// One keyring version: its key wrapped by the master key.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct VersionRecord {
    pub version: u32,
    pub created: i64,
    pub state: VersionState,
    /// The keyring key wrapped by the master key (AAD binds keyring and version).
    pub wrapped_key: Vec<u8>,
}

/// A keyring as stored.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct KeyringRecord {
    pub name: String,
    pub created: i64,
    pub retention_days: u32,
    pub versions: Vec<VersionRecord>,
    /// Automatic rotation this many days after the current version was made; 0 = none.
    pub rotation_period_days: u32,
    /// A legal hold: nothing of this keyring is destroyed while it is set.
    pub hold: Option<Hold>,
    /// Set when the keyring was destroyed: its version keys are erased, a tombstone stays.
    pub destroyed: Option<i64>,
}

/// A legal hold on a keyring.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub by: String,
    pub since: i64,
    pub reason: String,
}

/// What a destruction destroys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum DestructionTarget {
    Key { id: [u8; 16], keyring: String },
    Keyring { name: String },
}

impl DestructionTarget {
    pub fn keyring(&self) -> &str {
        match self {
            DestructionTarget::Key { keyring, .. } => keyring,
            DestructionTarget::Keyring { name } => name,
        }
    }
}

/// Where a destruction stands.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum DestructionState {
    Scheduled,
    Cancelled { by: String, at: i64 },
    Done { at: i64 },
}

/// Why a destruction happens.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestructionReason {
    /// An officer asked for it.
    Request,
    /// The key reached the end of its keyring's retention period.
    Expiry,
}

/// A scheduled or past destruction: the record stays after the key is gone.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct DestructionRecord {
    pub id: u64,
    pub target: DestructionTarget,
    pub requested_by: String,
    pub requested: i64,
    pub due: i64,
    pub state: DestructionState,
    /// The dual-control approval it came from.
    pub approval: Option<u64>,
    pub reason: DestructionReason,
}

/// State of an issued data key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Destroyed { at: i64 },
}

/// The registry record of one issued data key. It holds no key material.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct DataKeyRecord {
    pub keyring: String,
    pub version: u32,
    pub backup_id: String,
    pub labels: Vec<(String, String)>,
    pub created: i64,
    pub expires: Option<i64>,
    pub state: KeyState,
    pub issued_to: String,
    /// Whether a recovery recipient went out with this key (its file has an escrow stanza).
    pub escrowed: bool,
}


/// A destructive action waiting for (or given) a second officer's approval.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ApprovalRecord {
    pub id: u64,
    pub action: PendingAction,
    pub requested_by: String,
    pub requested: i64,
    pub expires: i64,
    pub approved_by: Option<String>,
    pub approved: Option<i64>,
}

/// The destructive actions that need dual control.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum PendingAction {
    RetireVersions { keyring: String, below: u32 },
    /// Schedule destruction of one data key before its expiry.
    DestroyKey { id: [u8; 16], keyring: String },
    /// Schedule destruction of a keyring.
    DestroyKeyring { keyring: String },
    /// Remove the escrow manifest in force.
    RemoveEscrow,
    // Variants are only ever added at the end: postcard encodes the variant by its
    // index, so records stored by an older server keep decoding.
    /// Install an escrow manifest whose recovery recipient differs from the one in force
    /// (or when none is in force). `replaces` is the recipient in force at the request;
    /// the approval is refused if that changed in the meantime.
    InstallEscrow { manifest_json: String, ceremony_id: String, recovery_recipient: String, replaces: Option<String> },
    /// Grant `role` on `keyring` to `principal` at run time.
    Grant { principal: String, role: Role, keyring: String },
    /// Release the legal hold in force at the request (`hold`); a hold placed later is
    /// not released by it.
    ReleaseHold { keyring: String, hold: Hold },
    /// Lower a keyring's retention (0 = keep until destroyed counts as the longest).
    LowerRetention { keyring: String, from_days: u32, to_days: u32 },
    /// Retire versions below `below` although `stranded` active keys were still wrapped
    /// under them at the request (forced): their backups no longer open through the server.
    RetireVersionsForced { keyring: String, below: u32, stranded: u64 },
}

/// The outcome of one restore test (`backup-hook verify`).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct RestoreTestRecord {
    pub time: i64,
    pub keyring: String,
    pub key_id: String,
    pub backup_id: String,
    pub ok: bool,
    pub detail: String,
    pub bytes: u64,
    pub duration_ms: u64,
    pub host: String,
    pub principal: String,
}

/// The escrow manifest in force, as the server keeps it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct EscrowInfo {
    pub ceremony_id: String,
    pub recovery_recipient: String,
    pub threshold: u32,
    pub shares: u32,
    pub custodians: Vec<String>,
    pub installed: i64,
    pub manifest_json: String,
    /// Recovery recipients in force before this one (oldest first).
    pub previous_recipients: Vec<String>,
    /// Set when the manifest was removed (dual control): no recipient is then in force.
    pub removed: Option<i64>,
}

impl EscrowInfo {
    /// The recovery recipient in force, if the manifest was not removed.
    pub fn in_force(&self) -> Option<&str> {
        self.removed.is_none().then_some(self.recovery_recipient.as_str())
    }
}

/// How a request ended, as the audit trail records it. Written into each audit record
/// as text (`ok`, `ok: DETAIL`, `denied: WHY`, `failed: KIND: WHY`), which the chain
/// hashes; read back with [`Outcome::parse`], never by matching prefixes elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done; with what was done when there is more to say.
    Ok(Option<String>),
    /// Refused: the caller may not (role, certificate).
    Denied(String),
    /// Not done: what kind of failure (the gRPC code's name) and why.
    Failed { kind: String, detail: String },
}

impl Outcome {
    pub fn ok() -> Self {
        Outcome::Ok(None)
    }

    pub fn ok_with(detail: impl Into<String>) -> Self {
        Outcome::Ok(Some(detail.into()))
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }

    /// Reads the text form back. Text in no known form (never written by Kluis) is a
    /// failure of kind `unknown`, so a report never counts it as a success.
    pub fn parse(text: &str) -> Self {
        if text == "ok" {
            return Outcome::Ok(None);
        }
        if let Some(d) = text.strip_prefix("ok: ") {
            return Outcome::Ok(Some(d.to_owned()));
        }
        if let Some(d) = text.strip_prefix("denied: ") {
            return Outcome::Denied(d.to_owned());
        }
        if let Some((kind, detail)) = text.strip_prefix("failed: ").and_then(|r| r.split_once(": ")) {
            return Outcome::Failed { kind: kind.to_owned(), detail: detail.to_owned() };
        }
        Outcome::Failed { kind: "unknown".to_owned(), detail: text.to_owned() }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ok(None) => f.write_str("ok"),
            Outcome::Ok(Some(d)) => write!(f, "ok: {d}"),
            Outcome::Denied(d) => write!(f, "denied: {d}"),
            Outcome::Failed { kind, detail } => write!(f, "failed: {kind}: {detail}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The approval record as servers before the dual-control variants stored it (the
    /// same fields; the action enum with its first four variants only).
    mod old {
        use serde::{Deserialize, Serialize};

        #[derive(Serialize, Deserialize)]
        pub enum PendingAction {
            RetireVersions { keyring: String, below: u32 },
            DestroyKey { id: [u8; 16], keyring: String },
            DestroyKeyring { keyring: String },
            RemoveEscrow,
        }

        #[derive(Serialize, Deserialize)]
        pub struct ApprovalRecord {
            pub id: u64,
            pub action: PendingAction,
            pub requested_by: String,
            pub requested: i64,
            pub expires: i64,
            pub approved_by: Option<String>,
            pub approved: Option<i64>,
        }
    }

    #[test]
    fn approval_records_of_an_older_server_still_decode() {
        let olds = [
            old::PendingAction::RetireVersions { keyring: "ehr".into(), below: 3 },
            old::PendingAction::DestroyKey { id: [7; 16], keyring: "ehr".into() },
            old::PendingAction::DestroyKeyring { keyring: "pacs".into() },
            old::PendingAction::RemoveEscrow,
        ];
        let news = [
            PendingAction::RetireVersions { keyring: "ehr".into(), below: 3 },
            PendingAction::DestroyKey { id: [7; 16], keyring: "ehr".into() },
            PendingAction::DestroyKeyring { keyring: "pacs".into() },
            PendingAction::RemoveEscrow,
        ];
        for (i, (o, n)) in olds.into_iter().zip(news).enumerate() {
            let rec = old::ApprovalRecord {
                id: i as u64 + 1,
                action: o,
                requested_by: "officer".into(),
                requested: 1_700_000_000,
                expires: 1_700_086_400,
                approved_by: (i % 2 == 1).then(|| "officer2".into()),
                approved: (i % 2 == 1).then_some(1_700_000_100),
            };
            let bytes = postcard::to_allocvec(&rec).unwrap();
            let back: ApprovalRecord = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back.action, n);
            assert_eq!((back.id, back.requested_by.as_str(), back.expires), (i as u64 + 1, "officer", 1_700_086_400));
            assert_eq!(back.approved_by.is_some(), i % 2 == 1);
            // And the new server writes them the same way.
            assert_eq!(postcard::to_allocvec(&back).unwrap(), bytes);
        }
        // The new variants round-trip.
        for a in [
            PendingAction::InstallEscrow {
                manifest_json: "{}".into(),
                ceremony_id: "c1".into(),
                recovery_recipient: "age1x".into(),
                replaces: Some("age1y".into()),
            },
            PendingAction::Grant { principal: "backup01".into(), role: Role::Restorer, keyring: "ehr".into() },
            PendingAction::ReleaseHold { keyring: "ehr".into(), hold: Hold { by: "officer".into(), since: 5, reason: "case 7".into() } },
            PendingAction::LowerRetention { keyring: "ehr".into(), from_days: 0, to_days: 1 },
        ] {
            let back: PendingAction = postcard::from_bytes(&postcard::to_allocvec(&a).unwrap()).unwrap();
            assert_eq!(back, a);
        }
    }

    #[test]
    fn outcomes_round_trip_through_their_text() {
        for o in [
            Outcome::ok(),
            Outcome::ok_with("version 1 -> 2"),
            Outcome::Denied("principal \"h\" may not UnwrapDataKey on keyring \"ehr\"".into()),
            Outcome::Failed { kind: "FailedPrecondition".into(), detail: "data key x was destroyed on 2026-01-01: really".into() },
        ] {
            assert_eq!(Outcome::parse(&o.to_string()), o, "{o}");
        }
        assert_eq!(Outcome::ok().to_string(), "ok");
        assert!(!Outcome::parse("okay").is_ok(), "only the written forms are read as success");
        assert!(matches!(Outcome::parse("failed: no colon"), Outcome::Failed { ref kind, .. } if kind == "unknown"));
    }
}
