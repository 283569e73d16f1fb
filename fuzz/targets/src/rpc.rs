//! Request validation of every RPC: the first byte picks the RPC, the rest is decoded
//! with prost as tonic's codec does, then validated as the server does
//! (`kms_server::api::validate`). A valid request names only bounded, clean values; a
//! refused one names its field without its value, and what the audit and the log keep
//! of its keyring, key id and backup id is bounded and has no control character.

use kluis_proto::v1 as pb;
use kms_server::api::validate::{self, KEEP, MAX_TEXT, Subject, Validate, is_unsafe_char};
use prost::Message;

/// What [`validate::Shown`] may add after the kept bytes: `…[N bytes, sha256 HEX]`.
const MARK: usize = 3 + 2 + 20 + 14 + 64 + 1;

fn check_subject(s: Subject<'_>) {
    for f in [s.keyring, s.key_id, s.backup_id].into_iter().flatten() {
        assert!(f.len() <= MAX_TEXT, "a valid request names {} bytes", f.len());
        assert!(!f.chars().any(is_unsafe_char), "a valid request names a control character: {f:?}");
        assert_eq!(validate::shown(f), f, "a valid field is shown as it is");
    }
}

fn check<T: Message + Default + Validate>(bytes: &[u8]) {
    let Ok(req) = T::decode(bytes) else { return };
    match req.validate() {
        Ok(v) => check_subject(T::subject(&v)),
        Err(e) => {
            assert!(e.to_string().len() <= 160, "a refusal of {} bytes: {e}", e.to_string().len());
            let c = req.claimed();
            for f in [c.keyring, c.key_id, c.backup_id].into_iter().flatten() {
                let s = validate::shown(f);
                assert!(s.len() <= KEEP + MARK, "{} bytes shown of a {}-byte field", s.len(), f.len());
                assert!(!s.chars().any(is_unsafe_char), "a control character shown: {s:?}");
            }
        }
    }
}

fn valid<T: Message + Default + Validate>(bytes: &[u8]) -> Result<(), String> {
    let req = T::decode(bytes).map_err(|e| e.to_string())?;
    req.validate().map(drop).map_err(|e| e.to_string())
}

/// One RPC: its name, the fuzz check and the validity check of its request.
pub struct Rpc {
    pub name: &'static str,
    pub check: fn(&[u8]),
    pub valid: fn(&[u8]) -> Result<(), String>,
}

macro_rules! rpcs {
    ($($name:literal => $t:ty),* $(,)?) => {
        /// The RPCs, in the order of the selector byte.
        pub const RPCS: &[Rpc] = &[$(Rpc { name: $name, check: check::<$t>, valid: valid::<$t> }),*];
    };
}

rpcs!(
    "GenerateDataKey" => pb::GenerateDataKeyRequest,
    "UnwrapDataKey" => pb::UnwrapDataKeyRequest,
    "RecordRestoreTest" => pb::RecordRestoreTestRequest,
    "RewrapDataKey" => pb::RewrapDataKeyRequest,
    "CreateKeyring" => pb::CreateKeyringRequest,
    "ListKeyrings" => pb::ListKeyringsRequest,
    "GetKeyring" => pb::GetKeyringRequest,
    "RotateKeyring" => pb::RotateKeyringRequest,
    "ChangeGrant" => pb::ChangeGrantRequest,
    "ListGrants" => pb::ListGrantsRequest,
    "RetireKeyringVersions" => pb::RetireKeyringVersionsRequest,
    "Approve" => pb::ApproveRequest,
    "ListApprovals" => pb::ListApprovalsRequest,
    "InstallEscrow" => pb::InstallEscrowRequest,
    "GetEscrowStatus" => pb::GetEscrowStatusRequest,
    "RemoveEscrow" => pb::RemoveEscrowRequest,
    "SetKeyringPolicy" => pb::SetKeyringPolicyRequest,
    "SetLegalHold" => pb::SetLegalHoldRequest,
    "GetDataKey" => pb::GetDataKeyRequest,
    "DestroyKey" => pb::DestroyKeyRequest,
    "DestroyKeyring" => pb::DestroyKeyringRequest,
    "CancelDestruction" => pb::CancelDestructionRequest,
    "ListDestructions" => pb::ListDestructionsRequest,
    "RotateMaster" => pb::RotateMasterRequest,
    "GetReport" => pb::GetReportRequest,
    "ExportAudit" => pb::ExportAuditRequest,
    "GetAuditPublicKey" => pb::GetAuditPublicKeyRequest,
    // New RPCs go last: the selector bytes of the seeds already written stay theirs.
    "FindDataKeys" => pb::FindDataKeysRequest,
    "MarkDataKeyEscrowed" => pb::MarkDataKeyEscrowedRequest,
);

/// The target: selector byte, then the encoded request.
pub fn rpc(data: &[u8]) {
    let Some((sel, msg)) = data.split_first() else { return };
    (RPCS[usize::from(*sel) % RPCS.len()].check)(msg);
}

/// Whether `data` (selector byte, encoded request) decodes and validates.
pub fn validate_ok(data: &[u8]) -> Result<(), String> {
    let (sel, msg) = data.split_first().ok_or("empty")?;
    (RPCS[usize::from(*sel) % RPCS.len()].valid)(msg)
}

/// The selector byte of an RPC by name (for the seed generator).
pub fn selector(name: &str) -> Option<u8> {
    RPCS.iter().position(|r| r.name == name).and_then(|i| u8::try_from(i).ok())
}
