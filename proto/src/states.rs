//! The states the wire carries as enums, as the CLIs name them (`kmsctl` prints these
//! words and writes them in `--json`).
//!
//! Each state is read from its enum field; when that is 0 (an older server that does not
//! set it), from the text field beside it; a state this version does not know is
//! [`Unknown`](VersionState::Unknown), never an error, so a newer server can add one.

use std::fmt;

use crate::v1 as pb;

macro_rules! wire_state {
    ($(#[$doc:meta])* $name:ident, $pb:ident { $($var:ident = $pbvar:ident, $text:literal;)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($var,)*
            /// A state this client does not know (from a newer server).
            Unknown,
        }

        impl $name {
            /// The word kmsctl prints.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$var => $text,)*
                    $name::Unknown => "unknown",
                }
            }

            /// From the enum field, or (0 from an older server) from the text beside it.
            pub fn from_wire(value: i32, legacy: &str) -> Self {
                match pb::$pb::try_from(value) {
                    $(Ok(pb::$pb::$pbvar) => $name::$var,)*
                    _ => match legacy {
                        $($text => $name::$var,)*
                        _ => $name::Unknown,
                    },
                }
            }

            /// The enum field's value.
            pub fn to_wire(self) -> i32 {
                match self {
                    $($name::$var => pb::$pb::$pbvar as i32,)*
                    $name::Unknown => 0,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // `pad`, so that width and alignment in format strings apply.
                f.pad(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

wire_state!(
    /// A keyring version.
    VersionState, VersionState { Active = Active, "active"; Retired = Retired, "retired"; }
);
wire_state!(
    /// An issued data key.
    DataKeyState, DataKeyState { Active = Active, "active"; Destroyed = Destroyed, "destroyed"; }
);
wire_state!(
    /// A destruction.
    DestructionState, DestructionState {
        Scheduled = Scheduled, "scheduled";
        Held = Held, "held";
        Cancelled = Cancelled, "cancelled";
        Destroyed = Destroyed, "destroyed";
    }
);
wire_state!(
    /// What a destruction destroys.
    DestructionKind, DestructionKind { Key = Key, "key"; Keyring = Keyring, "keyring"; }
);
wire_state!(
    /// Why a destruction happens.
    DestructionReason, DestructionReason { Request = Request, "request"; Expiry = Expiry, "expiry"; }
);
wire_state!(
    /// A dual-control request.
    ApprovalState, ApprovalState { Pending = Pending, "pending"; Approved = Approved, "approved"; Expired = Expired, "expired"; }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enum_wins_the_text_is_the_fallback_and_unknown_is_not_an_error() {
        assert_eq!(VersionState::from_wire(pb::VersionState::Retired as i32, "active"), VersionState::Retired);
        // An older server sets no enum: the text decides.
        assert_eq!(VersionState::from_wire(0, "retired"), VersionState::Retired);
        // A newer server's state, enum value and text both unknown here.
        assert_eq!(DestructionState::from_wire(99, "shredded"), DestructionState::Unknown);
        assert_eq!(ApprovalState::from_wire(ApprovalState::Expired.to_wire(), ""), ApprovalState::Expired);
        for s in [DestructionState::Scheduled, DestructionState::Held, DestructionState::Cancelled, DestructionState::Destroyed] {
            assert_eq!(DestructionState::from_wire(s.to_wire(), ""), s);
            assert_eq!(DestructionState::from_wire(0, s.as_str()), s);
        }
        assert_eq!(serde_json::to_string(&DataKeyState::Destroyed).unwrap(), "\"destroyed\"");
        assert_eq!(format!("{:<9}|", DestructionState::Held), "held     |", "widths apply as they did to the words");
    }

    /// A client built before the enum fields: how it sees a destruction from this server.
    #[derive(Clone, PartialEq, prost::Message)]
    struct OlderDestruction {
        #[prost(uint64, tag = "1")]
        id: u64,
        #[prost(string, tag = "2")]
        target_kind: String,
        #[prost(string, tag = "8")]
        state: String,
        #[prost(string, tag = "12")]
        reason: String,
    }

    #[test]
    fn version_skew_both_ways() {
        use prost::Message;
        // Newer server, older client: the added enum fields are skipped, the words are there.
        let newer = pb::Destruction {
            id: 7,
            target_kind: "keyring".into(),
            state: "held".into(),
            reason: "request".into(),
            destruction_state: DestructionState::Held.to_wire(),
            kind: DestructionKind::Keyring.to_wire(),
            destruction_reason: DestructionReason::Request.to_wire(),
            ..Default::default()
        };
        let old = OlderDestruction::decode(newer.encode_to_vec().as_slice()).unwrap();
        assert_eq!((old.id, old.target_kind.as_str(), old.state.as_str(), old.reason.as_str()), (7, "keyring", "held", "request"));
        // Older server, newer client: no enum fields, the words decide.
        let from_old = pb::Destruction::decode(old.encode_to_vec().as_slice()).unwrap();
        assert_eq!(from_old.destruction_state, 0);
        assert_eq!(DestructionState::from_wire(from_old.destruction_state, &from_old.state), DestructionState::Held);
        assert_eq!(DestructionKind::from_wire(from_old.kind, &from_old.target_kind), DestructionKind::Keyring);
    }
}
