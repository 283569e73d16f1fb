//! Every error status the api layer builds keeps its gRPC code and message and carries
//! the reason clients act on.
#![allow(clippy::unwrap_used)]

use kluis_proto::error::{Reason, reason_of};
use tonic::Code;

use super::{auth_status, key_status};
use crate::audit::AuditError;
use crate::auth::AuthError;
use crate::keys::KeyError;
use crate::keys::master_rewrap::RewrapError;
use crate::master::MasterError;
use crate::store::StoreError;

/// One number per `KeyError` variant. No wildcard: a new variant does not compile
/// here until it is numbered (and `KEY_VARIANTS` raised), and then the table below
/// must cover it.
fn key_variant(e: &KeyError) -> usize {
    match e {
        KeyError::InvalidArgument { .. } => 0,
        KeyError::KeyringNotFound { .. } => 1,
        KeyError::KeyringExists { .. } => 2,
        KeyError::UnknownKeyId { .. } => 3,
        KeyError::KeyringMismatch { .. } => 4,
        KeyError::Destroyed { .. } => 5,
        KeyError::VersionRetired { .. } => 6,
        KeyError::UnwrapFailed { .. } => 7,
        KeyError::MasterMismatch { .. } => 8,
        KeyError::KeyringUnwrap { .. } => 9,
        KeyError::Master(_) => 10,
        KeyError::Store(_) => 11,
        KeyError::Audit(_) => 12,
        KeyError::EscrowManifest { .. } => 13,
        KeyError::EscrowRecipientChange { .. } => 14,
        KeyError::NotCovered => 15,
        KeyError::Rewrap(_) => 16,
        KeyError::Internal { .. } => 17,
        KeyError::Rng => 18,
        KeyError::Join(_) => 19,
        KeyError::GrantNotFound { .. } => 20,
        KeyError::ApprovalNotFound { .. } => 21,
        KeyError::ApprovalExpired { .. } => 22,
        KeyError::SelfApproval { .. } => 23,
        KeyError::ApprovalDone { .. } => 24,
        KeyError::BadRetire { .. } => 25,
        KeyError::AuditKey { .. } => 26,
        KeyError::KeyringDestroyed { .. } => 27,
        KeyError::LegalHold { .. } => 28,
        KeyError::NoHold { .. } => 29,
        KeyError::AlreadyScheduled { .. } => 30,
        KeyError::DestructionNotFound { .. } => 31,
        KeyError::DestructionNotPending { .. } => 32,
        KeyError::NoEscrow => 33,
        KeyError::MasterGeneration { .. } => 34,
        KeyError::ApprovalOutdated { .. } => 35,
        KeyError::KeyMaterialErased { .. } => 36,
        KeyError::Derivation => 37,
        KeyError::RetireStrands { .. } => 38,
        KeyError::EscrowRecipientNotInForce { .. } => 39,
        KeyError::KmipObjectNotFound { .. } => 40,
        KeyError::KmipState { .. } => 41,
        KeyError::KmipAttributeMissing { .. } => 42,
        KeyError::KmipAttributeFixed { .. } => 43,
        KeyError::KmipObjectExists { .. } => 44,
        KeyError::KmipEscrowNoRecipient { .. } => 45,
        KeyError::KmipEscrow { .. } => 46,
    }
}
const KEY_VARIANTS: usize = 47;

async fn join_error() -> tokio::task::JoinError {
    let task = tokio::spawn(std::future::pending::<()>());
    task.abort();
    task.await.unwrap_err()
}

/// A sample of each variant with the code it had before reasons existed and its reason.
async fn key_errors() -> Vec<(KeyError, Code, Reason)> {
    let s = String::from;
    vec![
        (KeyError::InvalidArgument { field: "keyring", reason: "must not be empty" }, Code::InvalidArgument, Reason::InvalidArgument),
        (KeyError::KeyringNotFound { name: s("ehr-db") }, Code::NotFound, Reason::KeyringNotFound),
        (KeyError::KeyringExists { name: s("ehr-db") }, Code::AlreadyExists, Reason::KeyringExists),
        (KeyError::UnknownKeyId { key_id: s("k1") }, Code::NotFound, Reason::KeyUnknown),
        (KeyError::KmipObjectNotFound { uid: s("k1") }, Code::NotFound, Reason::KeyUnknown),
        (KeyError::KmipState { uid: s("k1"), state: "Active", operation: "Activate" }, Code::FailedPrecondition, Reason::InvalidArgument),
        (KeyError::KmipAttributeMissing { name: "Name", index: 2 }, Code::NotFound, Reason::InvalidArgument),
        (KeyError::KmipAttributeFixed { name: "Cryptographic Usage Mask", reason: "it cannot be deleted" }, Code::FailedPrecondition, Reason::InvalidArgument),
        (KeyError::KeyringMismatch { key_id: s("k1"), claimed: s("a"), actual: s("b") }, Code::InvalidArgument, Reason::KeyringMismatch),
        (KeyError::Destroyed { key_id: s("k1"), date: s("2026-01-01") }, Code::FailedPrecondition, Reason::KeyDestroyed),
        (KeyError::VersionRetired { keyring: s("ehr-db"), version: 1 }, Code::FailedPrecondition, Reason::VersionRetired),
        (KeyError::KeyMaterialErased { key_id: s("k1") }, Code::FailedPrecondition, Reason::KeyDestroyed),
        (KeyError::Derivation, Code::Internal, Reason::Internal),
        (KeyError::RetireStrands { keyring: s("ehr-db"), below: 2, count: 3 }, Code::FailedPrecondition, Reason::RetireNotPossible),
        (KeyError::UnwrapFailed { key_id: s("k1") }, Code::InvalidArgument, Reason::WrappedKeyNotAuthentic),
        (KeyError::MasterMismatch { master: s("software") }, Code::Internal, Reason::Internal),
        (KeyError::KeyringUnwrap { keyring: s("ehr-db"), version: 1, source: MasterError::UnwrapFailed }, Code::Internal, Reason::Internal),
        (KeyError::Master(MasterError::Unavailable(Box::new(std::io::Error::other("token removed")))), Code::Unavailable, Reason::MasterKeyUnavailable),
        (KeyError::Master(MasterError::UnwrapFailed), Code::Internal, Reason::Internal),
        (KeyError::Store(StoreError::WriterGone), Code::Unavailable, Reason::StoreUnavailable),
        (KeyError::Store(StoreError::ConnectionLost { store: s("postgresql://db/kluis") }), Code::Unavailable, Reason::StoreUnavailable),
        (KeyError::Store(StoreError::TimedOut { store: s("postgresql://db/kluis"), secs: 2 }), Code::Unavailable, Reason::StoreUnavailable),
        (KeyError::Store(StoreError::BadFormat { store: s("kluis.redb") }), Code::Internal, Reason::Internal),
        (KeyError::Store(StoreError::Conflict { what: s("Meta \"state_epoch\"") }), Code::Aborted, Reason::ConcurrentChange),
        (KeyError::Store(StoreError::GroupFailed), Code::Internal, Reason::Internal),
        (KeyError::Audit(AuditError::SignerPoisoned), Code::Internal, Reason::Internal),
        (KeyError::EscrowManifest(kluis_escrow::Manifest::parse(b"{}").unwrap_err()), Code::InvalidArgument, Reason::EscrowManifestInvalid),
        (
            KeyError::EscrowRecipientChange { current: s("age1a"), new: s("age1b"), ceremony: s("c1") },
            Code::FailedPrecondition,
            Reason::EscrowRecipientChange,
        ),
        (KeyError::NotCovered, Code::PermissionDenied, Reason::PermissionDenied),
        (KeyError::Rewrap(RewrapError::Check(MasterError::UnwrapFailed)), Code::Internal, Reason::Internal),
        (KeyError::Internal { what: "impossible state" }, Code::Internal, Reason::Internal),
        (KeyError::Rng, Code::Internal, Reason::Internal),
        (KeyError::Join(join_error().await), Code::Internal, Reason::Internal),
        (KeyError::GrantNotFound { principal: s("p"), role: s("sealer"), keyring: s("k") }, Code::NotFound, Reason::GrantNotFound),
        (KeyError::ApprovalNotFound { id: 7 }, Code::NotFound, Reason::ApprovalNotFound),
        (KeyError::ApprovalExpired { id: 7, date: s("2026-01-01") }, Code::FailedPrecondition, Reason::ApprovalExpired),
        (KeyError::SelfApproval { id: 7, principal: s("officer") }, Code::PermissionDenied, Reason::SelfApproval),
        (KeyError::ApprovalDone { id: 7, by: s("officer2") }, Code::FailedPrecondition, Reason::ApprovalAlreadyDone),
        (KeyError::ApprovalOutdated { id: 7, reason: "the legal hold was replaced since the request" }, Code::FailedPrecondition, Reason::ApprovalOutdated),
        (KeyError::BadRetire { keyring: s("k"), below: 9, reason: "no such version" }, Code::FailedPrecondition, Reason::RetireNotPossible),
        (KeyError::AuditKey { reason: "wrong length" }, Code::Internal, Reason::Internal),
        (KeyError::KeyringDestroyed { keyring: s("k"), date: s("2026-01-01") }, Code::FailedPrecondition, Reason::KeyringDestroyed),
        (
            KeyError::LegalHold { keyring: s("k"), by: s("officer"), since: s("2026-01-01"), reason: s("case 12") },
            Code::FailedPrecondition,
            Reason::LegalHold,
        ),
        (KeyError::NoHold { keyring: s("k") }, Code::FailedPrecondition, Reason::NoLegalHold),
        (KeyError::AlreadyScheduled { target: s("key k1"), id: 3, due: s("2026-02-01") }, Code::FailedPrecondition, Reason::AlreadyScheduled),
        (KeyError::DestructionNotFound { id: 3 }, Code::NotFound, Reason::DestructionNotFound),
        (KeyError::DestructionNotPending { id: 3, state: "done" }, Code::FailedPrecondition, Reason::DestructionNotPending),
        (KeyError::NoEscrow, Code::FailedPrecondition, Reason::NoEscrow),
        (
            KeyError::EscrowRecipientNotInForce { requested: s("age1a"), in_force: s("age1b") },
            Code::FailedPrecondition,
            Reason::EscrowRecipientNotInForce,
        ),
        (KeyError::MasterGeneration { generation: 2, source: MasterError::Rng }, Code::Internal, Reason::Internal),
        (KeyError::KmipObjectExists { uid: s("00112233445566778899aabbccddeeff") }, Code::AlreadyExists, Reason::KmipObjectExists),
        (KeyError::KmipEscrowNoRecipient { dir: "/escrow".into() }, Code::FailedPrecondition, Reason::NoEscrow),
        (
            KeyError::KmipEscrow {
                dir: "/escrow".into(),
                source: kluis_escrow::kmip_bundle::BundleError::Recipient(s("x")),
            },
            Code::Unavailable,
            Reason::KmipEscrowUnavailable,
        ),
    ]
}

#[tokio::test]
async fn every_key_error_maps_to_its_code_and_reason_and_keeps_its_message() {
    let mut covered = [false; KEY_VARIANTS];
    for (e, code, reason) in key_errors().await {
        covered[key_variant(&e)] = true;
        let message = e.to_string();
        let s = key_status(e);
        assert_eq!(s.code(), code, "{message}");
        assert_eq!(s.message(), message);
        assert_eq!(reason_of(&s), Some(reason), "{message}");
    }
    let missing: Vec<usize> = (0..KEY_VARIANTS).filter(|&i| !covered[i]).collect();
    assert!(missing.is_empty(), "KeyError variants without a sample: {missing:?}");
}

#[test]
fn every_auth_error_maps_to_its_code_and_reason_and_keeps_its_message() {
    let s = String::from;
    let cases = [
        (AuthError::NoCertificate, Code::Unauthenticated, Reason::CertificateNotAccepted),
        (AuthError::BadCertificate, Code::Unauthenticated, Reason::CertificateNotAccepted),
        (AuthError::NoCommonName, Code::Unauthenticated, Reason::CertificateNotAccepted),
        (AuthError::Denied { principal: s("sealer"), action: "UnwrapDataKey", keyring: s("k") }, Code::PermissionDenied, Reason::PermissionDenied),
        (AuthError::DeniedGlobal { principal: s("sealer"), action: "RotateMaster" }, Code::PermissionDenied, Reason::PermissionDenied),
        (AuthError::NoSan { kind: "URI" }, Code::Unauthenticated, Reason::CertificateNotAccepted),
        (AuthError::Revoked { principal: s("sealer"), fingerprint: s("ab") }, Code::Unauthenticated, Reason::CertificateRevoked),
        (AuthError::RevocationUnavailable, Code::Internal, Reason::Internal),
        (
            AuthError::AmbiguousIdentity { reason: crate::auth::AmbiguousIdentity::SeveralCommonNames { count: 2 } },
            Code::Unauthenticated,
            Reason::CertificateNotAccepted,
        ),
    ];
    let mut covered = [false; AUTH_VARIANTS];
    for (e, code, reason) in cases {
        covered[auth_variant(&e)] = true;
        let message = e.to_string();
        let s = auth_status(e);
        assert_eq!(s.code(), code, "{message}");
        assert_eq!(s.message(), message);
        assert_eq!(reason_of(&s), Some(reason), "{message}");
    }
    assert!(covered.iter().all(|&c| c), "AuthError variants without a case: {covered:?}");
}

/// One number per `AuthError` variant (no wildcard, as for `KeyError`).
fn auth_variant(e: &AuthError) -> usize {
    match e {
        AuthError::NoCertificate => 0,
        AuthError::BadCertificate => 1,
        AuthError::NoCommonName => 2,
        AuthError::Denied { .. } => 3,
        AuthError::DeniedGlobal { .. } => 4,
        AuthError::NoSan { .. } => 5,
        AuthError::Revoked { .. } => 6,
        AuthError::RevocationUnavailable => 7,
        AuthError::AmbiguousIdentity { .. } => 8,
    }
}
const AUTH_VARIANTS: usize = 9;
