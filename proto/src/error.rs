//! Why a request failed, in a form a program can act on.
//!
//! Every error status the Kluis server sends carries a `google.rpc.ErrorInfo` in its
//! details (the gRPC richer error model) with `domain = "kluis.v1"` and `reason` one of
//! the [`Reason`] strings below. The gRPC code and the human message stay as they are;
//! the reason says which of several failures behind one code happened (a wrapped key
//! that does not authenticate and a malformed field are both `INVALID_ARGUMENT`).
//!
//! The strings are part of the contract: they never change meaning and are never
//! reused. A client that meets a reason it does not know (a newer server), or a
//! status without details (an older server, or an error made by the gRPC stack
//! itself), falls back to the gRPC code.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of Kluis reasons.
pub const DOMAIN: &str = "kluis.v1";

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident = $text:literal, )*) => {
        /// One distinct failure the server reports.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $( $(#[$doc])* $variant, )*
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The stable wire string (`ErrorInfo.reason`).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Reason::$variant => $text, )*
                }
            }
        }

        impl FromStr for Reason {
            type Err = UnknownReason;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $text => Ok(Reason::$variant), )*
                    _ => Err(UnknownReason(s.to_owned())),
                }
            }
        }
    };
}

reasons! {
    /// The caller's role or keyring grants do not allow this action.
    PermissionDenied = "PERMISSION_DENIED",
    /// The client certificate names no usable identity (missing, unparsable, no CN or SAN).
    CertificateNotAccepted = "CERTIFICATE_NOT_ACCEPTED",
    /// The client certificate is on the server's revocation list.
    CertificateRevoked = "CERTIFICATE_REVOKED",
    /// A request field is malformed; the message names the field.
    InvalidArgument = "INVALID_ARGUMENT",
    /// The named keyring does not exist.
    KeyringNotFound = "KEYRING_NOT_FOUND",
    /// The data key id is not known to this server.
    KeyUnknown = "KEY_UNKNOWN",
    /// The data key belongs to another keyring than the one the request names.
    KeyringMismatch = "KEYRING_MISMATCH",
    /// The wrapped data key does not authenticate: altered, or its context does not match.
    WrappedKeyNotAuthentic = "WRAPPED_KEY_NOT_AUTHENTIC",
    /// The data key was destroyed; the server never unwraps it again.
    KeyDestroyed = "KEY_DESTROYED",
    /// The keyring was destroyed; nothing under it unwraps again.
    KeyringDestroyed = "KEYRING_DESTROYED",
    /// The keyring version is retired; the server no longer unwraps its keys.
    VersionRetired = "VERSION_RETIRED",
    /// The requested retirement of keyring versions is not possible.
    RetireNotPossible = "RETIRE_NOT_POSSIBLE",
    /// A legal hold blocks the destruction.
    LegalHold = "LEGAL_HOLD",
    /// There is no legal hold to release.
    NoLegalHold = "NO_LEGAL_HOLD",
    /// No such dual-control approval request.
    ApprovalNotFound = "APPROVAL_NOT_FOUND",
    /// The approval request expired.
    ApprovalExpired = "APPROVAL_EXPIRED",
    /// The officer who asked tried to approve their own request.
    SelfApproval = "SELF_APPROVAL",
    /// The approval request was already approved.
    ApprovalAlreadyDone = "APPROVAL_ALREADY_DONE",
    /// What the approval request was made against changed since (the retention, the
    /// hold, the recovery recipient in force); ask again.
    ApprovalOutdated = "APPROVAL_OUTDATED",
    /// The target already has a destruction scheduled.
    AlreadyScheduled = "ALREADY_SCHEDULED",
    /// No such destruction.
    DestructionNotFound = "DESTRUCTION_NOT_FOUND",
    /// The destruction is no longer pending (done or cancelled).
    DestructionNotPending = "DESTRUCTION_NOT_PENDING",
    /// No such runtime grant.
    GrantNotFound = "GRANT_NOT_FOUND",
    /// No escrow manifest is in force.
    NoEscrow = "NO_ESCROW",
    /// The escrow manifest is not valid.
    EscrowManifestInvalid = "ESCROW_MANIFEST_INVALID",
    /// The manifest would change the recovery recipient and the request did not allow it.
    EscrowRecipientChange = "ESCROW_RECIPIENT_CHANGE",
    /// The recovery recipient a request names is not the one in force (the escrow was
    /// replaced or removed in between).
    EscrowRecipientNotInForce = "ESCROW_RECIPIENT_NOT_IN_FORCE",
    /// A keyring of that name exists.
    KeyringExists = "KEYRING_EXISTS",
    /// The audit entry could not be written, so nothing was done (fail closed).
    AuditUnavailable = "AUDIT_UNAVAILABLE",
    /// The stored audit trail does not verify (an integrity alarm): the server signs
    /// nothing over it and gives out no export.
    AuditTampered = "AUDIT_TAMPERED",
    /// Too many audit exports are running at once; try again later.
    AuditExportBusy = "AUDIT_EXPORT_BUSY",
    /// The master-key provider (key file, HSM) cannot be used right now.
    MasterKeyUnavailable = "MASTER_KEY_UNAVAILABLE",
    /// The store is not taking writes (the server is stopping or failed, or cannot reach
    /// its database).
    StoreUnavailable = "STORE_UNAVAILABLE",
    /// Another replica changed the same state at the same moment; nothing was done. Run
    /// the request again (it is then made on the state the other replica left).
    ConcurrentChange = "CONCURRENT_CHANGE",
    /// A fault of the server itself; see its log.
    Internal = "INTERNAL",
    /// A KMIP object with this Unique Identifier exists already (an import run twice).
    KmipObjectExists = "KMIP_OBJECT_EXISTS",
    /// The escrow bundle of KMIP objects (`kmip_escrow_dir`) could not be written, so
    /// nothing was done; see the message and the server's log.
    KmipEscrowUnavailable = "KMIP_ESCROW_UNAVAILABLE",
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason string this build does not know (from a newer server).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown Kluis error reason {0:?}")]
pub struct UnknownReason(pub String);

/// A status with `code`, the human `message`, and `reason` as its `ErrorInfo`.
pub fn status(code: tonic::Code, message: impl Into<String>, reason: Reason) -> tonic::Status {
    let details = ErrorDetails::with_error_info(reason.as_str(), DOMAIN, HashMap::new());
    tonic::Status::with_error_details(code, message, details)
}

/// The Kluis reason a status carries: `None` without `ErrorInfo` details (an older
/// server, or a status made by the gRPC stack), for another domain, or for a reason
/// this build does not know.
pub fn reason_of(status: &tonic::Status) -> Option<Reason> {
    let info = status.get_details_error_info()?;
    if info.domain != DOMAIN {
        return None;
    }
    info.reason.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_reason_round_trips_through_a_status_with_details() {
        for &r in Reason::ALL {
            let s = status(tonic::Code::FailedPrecondition, format!("because {r}"), r);
            // As the client sees it: the status travels as headers, details in grpc-status-details-bin.
            let wire = tonic::Status::from_header_map(s.into_http::<()>().headers()).unwrap();
            assert_eq!(reason_of(&wire), Some(r), "{r}");
            assert_eq!(wire.code(), tonic::Code::FailedPrecondition);
            assert_eq!(wire.message(), format!("because {r}"));
        }
    }

    #[test]
    fn reason_strings_are_distinct_screaming_snake_and_parse_back() {
        let mut seen = std::collections::BTreeSet::new();
        for &r in Reason::ALL {
            let s = r.as_str();
            assert!(seen.insert(s), "{s} used twice");
            assert!(!s.is_empty() && s.chars().all(|c| c.is_ascii_uppercase() || c == '_'), "{s}");
            assert_eq!(s.parse::<Reason>(), Ok(r));
            assert_eq!(r.to_string(), s);
        }
        assert_eq!("NOT_A_REASON".parse::<Reason>(), Err(UnknownReason("NOT_A_REASON".into())));
    }

    #[test]
    fn a_status_without_details_or_of_another_domain_has_no_reason() {
        assert_eq!(reason_of(&tonic::Status::not_found("no keyring")), None);
        let other = ErrorDetails::with_error_info("KEY_DESTROYED", "example.com", HashMap::new());
        assert_eq!(reason_of(&tonic::Status::with_error_details(tonic::Code::NotFound, "x", other)), None);
        let newer = ErrorDetails::with_error_info("SOMETHING_NEW", DOMAIN, HashMap::new());
        assert_eq!(reason_of(&tonic::Status::with_error_details(tonic::Code::NotFound, "x", newer)), None);
        let garbage = tonic::Status::with_details(tonic::Code::NotFound, "x", vec![0xff, 0x01].into());
        assert_eq!(reason_of(&garbage), None);
    }
}
