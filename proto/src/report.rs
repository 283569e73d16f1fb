//! The compliance report (`kmsctl report`): what the server computes (`GetReport`,
//! as JSON) and what `kmsctl` renders as text, JSON or a self-contained HTML page.
//!
//! Times are RFC 3339 UTC strings. Lists that could grow with the registry
//! (untested backups) are capped; the `*_total` field next to them is exact.
//!
//! Version skew: readers ignore fields they do not know, so a server that adds one does
//! not break an older `kmsctl`; a field is only ever added, never renamed or retyped
//! (the `format` tag changes if a field must change meaning).

use serde::{Deserialize, Serialize};

/// The report format tag.
pub const REPORT_FORMAT: &str = "kluis-report/v1";

/// Longest list of untested backups a report carries per keyring.
pub const UNTESTED_CAP: usize = 1000;

/// The whole report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Always [`REPORT_FORMAT`].
    pub format: String,
    pub generated: String,
    /// Events (issuances, rotations, tests, failures) are counted from this time; `None`: all.
    pub since: Option<String>,
    /// The master key in force (provider and key, never key bytes) and its generation.
    pub master: MasterEntry,
    pub escrow: EscrowEntry,
    pub keyrings: Vec<KeyringReport>,
    /// Dual-control requests still waiting for a second officer.
    pub pending_approvals: Vec<ApprovalEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterEntry {
    pub description: String,
    pub generation: u32,
}

/// The escrow manifest in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowEntry {
    pub installed: bool,
    pub ceremony_id: Option<String>,
    pub recovery_recipient: Option<String>,
    pub threshold: u32,
    pub shares: u32,
    pub custodians: Vec<String>,
    pub installed_at: Option<String>,
    /// Recipients in force earlier; their recovery keys still open older backups.
    pub previous_recipients: Vec<String>,
}

/// Everything about one keyring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringReport {
    pub name: String,
    pub created: String,
    /// 0: keys do not expire.
    pub retention_days: u32,
    /// 0: no automatic rotation.
    pub rotation_period_days: u32,
    /// Keys issued in the report period (all time if no `since`).
    pub keys_issued: u64,
    /// Keys issued over the keyring's life.
    pub keys_issued_total: u64,
    pub keys_active: u64,
    pub keys_destroyed: u64,
    /// Active keys whose sealed files carry no escrow (recovery) stanza.
    pub keys_without_escrow: u64,
    pub versions: Vec<VersionEntry>,
    /// Rotations (versions after the first) made in the report period.
    pub rotations: Vec<RotationEntry>,
    /// When the next automatic rotation is due (`None`: no rotation period).
    pub next_rotation: Option<String>,
    /// True if a rotation period is set and the current version is older than it.
    pub rotation_overdue: bool,
    /// Backups (active keys) that were never restore-tested, oldest first, at most [`UNTESTED_CAP`].
    pub untested_backups: Vec<BackupEntry>,
    pub untested_backups_total: u64,
    /// The last restore test of each tested backup.
    pub last_tests: Vec<RestoreTestEntry>,
    /// The deviation register: failed restore tests, failed or refused unwraps, in the period.
    pub deviations: Vec<DeviationEntry>,
    /// Scheduled (not yet carried out or cancelled) destructions of the keyring or its keys.
    pub pending_destructions: Vec<DestructionEntry>,
    /// Destructions carried out in the period.
    pub destructions_done: Vec<DestructionEntry>,
    pub legal_hold: Option<HoldEntry>,
    /// Set if the keyring itself was destroyed (a tombstone).
    pub destroyed: Option<String>,
    /// The keyring's KMIP objects (absent: it has none, or the server predates KMIP). Their
    /// data keys count in `keys_*` and `versions` like any key of the keyring, but not in
    /// `keys_without_escrow` or the untested backups: they are appliances' keys, not backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kmip: Option<KmipEntry>,
}

/// The KMIP objects of one keyring: how many, in which state, who made them, and their use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmipEntry {
    pub objects: u64,
    /// Objects per state as KMIP clients see it ("Active", "Destroyed", ...).
    pub by_state: std::collections::BTreeMap<String, u64>,
    /// Objects per creating identity, most first.
    pub creators: Vec<KmipCreator>,
    /// Successful Gets of key material in the period.
    pub gets: u64,
    /// The last successful Get of key material (all time).
    pub last_get: Option<KmipGet>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmipCreator {
    pub principal: String,
    pub objects: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmipGet {
    pub time: String,
    pub principal: String,
    /// The object's Unique Identifier.
    pub uid: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionEntry {
    pub version: u32,
    pub created: String,
    pub age_days: u64,
    /// `active` or `retired`.
    pub state: String,
    /// Keys issued under this version that are still wrapped by it (after rewraps).
    pub keys: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationEntry {
    pub version: u32,
    pub time: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupEntry {
    pub backup_id: String,
    pub key_id: String,
    pub created: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreTestEntry {
    pub time: String,
    pub backup_id: String,
    pub key_id: String,
    pub ok: bool,
    /// Why it failed (empty on success).
    pub detail: String,
    pub bytes: u64,
    pub duration_ms: u64,
    pub host: String,
    pub principal: String,
}

/// One entry of the deviation register.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviationEntry {
    pub time: String,
    /// `restore-test-failed`, `unwrap-failed` or `unwrap-refused`.
    pub kind: String,
    pub principal: String,
    pub key_id: Option<String>,
    pub backup_id: Option<String>,
    pub detail: String,
    /// The audit record's sequence number, if the deviation comes from the audit trail.
    pub audit_seq: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestructionEntry {
    pub id: u64,
    /// `key` or `keyring`.
    pub target_kind: String,
    pub target: String,
    pub requested_by: String,
    pub requested: String,
    pub due: String,
    /// `scheduled`, `held`, `cancelled` or `destroyed`.
    pub state: String,
    /// `request` or `expiry`.
    pub reason: String,
    pub done: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldEntry {
    pub by: String,
    pub since: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalEntry {
    pub id: u64,
    pub action: String,
    pub requested_by: String,
    pub requested: String,
    pub expires: String,
}

#[cfg(test)]
mod skew_tests {
    use super::*;

    #[test]
    fn a_report_from_a_newer_server_with_fields_this_reader_does_not_know_is_read() {
        let r = Report {
            format: REPORT_FORMAT.into(),
            generated: "2026-12-03T00:00:00Z".into(),
            since: None,
            master: MasterEntry { description: "software master key".into(), generation: 2 },
            escrow: EscrowEntry {
                installed: false,
                ceremony_id: None,
                recovery_recipient: None,
                threshold: 0,
                shares: 0,
                custodians: vec![],
                installed_at: None,
                previous_recipients: vec![],
            },
            keyrings: vec![],
            pending_approvals: vec![],
        };
        let mut v = serde_json::to_value(&r).unwrap();
        v["kmip_objects"] = serde_json::json!({"total": 3});
        v["master"]["replica"] = serde_json::json!("kms-2");
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
