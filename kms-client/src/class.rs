//! What a failure means for the caller, and the exit code both CLIs give it.
//!
//! | exit | class | meaning for a backup wrapper |
//! |---|---|---|
//! | 0 | | success |
//! | 1 | [`ErrorClass::Other`] | any other failure (bad config: a plain `http://` endpoint, an encrypted key; invalid request, server fault) |
//! | 2 | [`ErrorClass::Usage`] | the command line is wrong |
//! | 3 | [`ErrorClass::Unavailable`] | the server is down, restarting, too slow, or the connection was lost: retry later |
//! | 4 | [`ErrorClass::Refused`] | refused: role, this client's certificate (a TLS alert), a server certificate this client does not accept (name, CA, validity), unknown or destroyed key or keyring, retired version, legal hold, ...: do not retry |
//! | 5 | [`ErrorClass::Integrity`] | not a sealed file, damaged, truncated or altered, a wrapped key that does not authenticate |
//! | 6 | [`ErrorClass::Io`] | reading or writing local data failed (including a closed pipe) |
//!
//! The class of a server answer comes from its [`Reason`], or from its gRPC code when
//! it has none (an older server), never from the message text.

use kluis_proto::error::Reason;
use tonic::Code;

/// What a failure means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Server down, restarting or too slow, connection lost: retry later.
    Unavailable,
    /// Refused by the server (or TLS): retrying the same request will not help.
    Refused,
    /// The sealed data or the wrapped key does not authenticate.
    Integrity,
    /// Local input or output failed.
    Io,
    /// The command line is wrong.
    Usage,
    /// Anything else.
    Other,
}

impl ErrorClass {
    /// The process exit code of this class (the table above).
    pub const fn exit_code(self) -> u8 {
        match self {
            ErrorClass::Other => 1,
            ErrorClass::Usage => 2,
            ErrorClass::Unavailable => 3,
            ErrorClass::Refused => 4,
            ErrorClass::Integrity => 5,
            ErrorClass::Io => 6,
        }
    }

    /// The class of a server reason. No wildcard: a new reason does not compile
    /// until it is classified.
    pub const fn of_reason(r: Reason) -> Self {
        match r {
            Reason::PermissionDenied
            | Reason::CertificateNotAccepted
            | Reason::CertificateRevoked
            | Reason::KeyringNotFound
            | Reason::KeyUnknown
            | Reason::KeyDestroyed
            | Reason::KeyringDestroyed
            | Reason::VersionRetired
            | Reason::RetireNotPossible
            | Reason::LegalHold
            | Reason::NoLegalHold
            | Reason::ApprovalNotFound
            | Reason::ApprovalExpired
            | Reason::SelfApproval
            | Reason::ApprovalAlreadyDone
            | Reason::ApprovalOutdated
            | Reason::AlreadyScheduled
            | Reason::DestructionNotFound
            | Reason::DestructionNotPending
            | Reason::GrantNotFound
            | Reason::NoEscrow
            | Reason::EscrowRecipientChange
            | Reason::EscrowRecipientNotInForce
            | Reason::KmipObjectExists => ErrorClass::Refused,
            Reason::WrappedKeyNotAuthentic | Reason::KeyringMismatch | Reason::AuditTampered => ErrorClass::Integrity,
            Reason::AuditUnavailable
            | Reason::MasterKeyUnavailable
            | Reason::StoreUnavailable
            | Reason::AuditExportBusy
            | Reason::ConcurrentChange
            | Reason::KmipEscrowUnavailable => {
                ErrorClass::Unavailable
            }
            Reason::InvalidArgument | Reason::EscrowManifestInvalid | Reason::KeyringExists | Reason::Internal => {
                ErrorClass::Other
            }
        }
    }

    /// The class of a gRPC code alone: a status without a reason (an older server, or
    /// one made by the gRPC stack).
    pub const fn of_code(code: Code) -> Self {
        match code {
            Code::PermissionDenied | Code::Unauthenticated | Code::NotFound | Code::FailedPrecondition => ErrorClass::Refused,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ErrorClass::Unavailable,
            Code::Ok
            | Code::Unknown
            | Code::InvalidArgument
            | Code::AlreadyExists
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss => ErrorClass::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_documented_table() {
        let table = [
            (ErrorClass::Other, 1),
            (ErrorClass::Usage, 2),
            (ErrorClass::Unavailable, 3),
            (ErrorClass::Refused, 4),
            (ErrorClass::Integrity, 5),
            (ErrorClass::Io, 6),
        ];
        for (class, code) in table {
            assert_eq!(class.exit_code(), code, "{class:?}");
        }
    }

    #[test]
    fn every_reason_has_the_class_of_its_meaning() {
        for &r in Reason::ALL {
            let want = match r {
                Reason::WrappedKeyNotAuthentic | Reason::KeyringMismatch | Reason::AuditTampered => ErrorClass::Integrity,
                Reason::AuditUnavailable
            | Reason::MasterKeyUnavailable
            | Reason::StoreUnavailable
            | Reason::AuditExportBusy
            | Reason::ConcurrentChange
            | Reason::KmipEscrowUnavailable => {
                    ErrorClass::Unavailable
                }
                Reason::InvalidArgument | Reason::EscrowManifestInvalid | Reason::KeyringExists | Reason::Internal => {
                    ErrorClass::Other
                }
                _ => ErrorClass::Refused,
            };
            assert_eq!(ErrorClass::of_reason(r), want, "{r}");
        }
    }

    #[test]
    fn every_code_has_a_class() {
        use Code::*;
        let table = [
            (Ok, ErrorClass::Other),
            (Cancelled, ErrorClass::Unavailable),
            (Unknown, ErrorClass::Other),
            (InvalidArgument, ErrorClass::Other),
            (DeadlineExceeded, ErrorClass::Unavailable),
            (NotFound, ErrorClass::Refused),
            (AlreadyExists, ErrorClass::Other),
            (PermissionDenied, ErrorClass::Refused),
            (ResourceExhausted, ErrorClass::Other),
            (FailedPrecondition, ErrorClass::Refused),
            (Aborted, ErrorClass::Other),
            (OutOfRange, ErrorClass::Other),
            (Unimplemented, ErrorClass::Other),
            (Internal, ErrorClass::Other),
            (Unavailable, ErrorClass::Unavailable),
            (DataLoss, ErrorClass::Other),
            (Unauthenticated, ErrorClass::Refused),
        ];
        for (code, class) in table {
            assert_eq!(ErrorClass::of_code(code), class, "{code:?}");
        }
    }
}
