//! The Kluis sealed-file format, with no server in sight: a sealed backup is a standard
//! age v1 file ([`sealed`]) whose header ([`stream::header`]) carries a Kluis stanza and,
//! once an escrow is installed, an `X25519` stanza to the recovery recipient; its payload
//! is age STREAM ([`stream`]). Sealing takes a data key the server issued ([`secret`]);
//! unsealing asks a caller-supplied resolver for the data key of a Kluis stanza, or opens
//! the file offline with a recovery identity ([`sealed::unseal_offline`]).
//!
//! What the custodians, the fuzzers and the typed gRPC client (`kms-client`) share. No
//! tonic, no protobuf, no async runtime. [`fsutil`] holds the small file helpers that the
//! escrow crate and the hook operations both use.
#![forbid(unsafe_code)]

pub mod escrow_stanza;
pub mod fsutil;
pub mod sealed;
pub mod secret;
pub mod stream;
