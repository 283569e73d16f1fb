//! Offline escrow of the recovery key (design: "Escrow: Shamir split of the recovery key").
//!
//! The recovery key is an age X25519 identity. Sealed backups carry an `X25519` stanza to
//! its recipient, so the rebuilt identity opens them with `kmsctl` or the stock `age` tool,
//! with no Kluis server, disk or HSM. Everything here runs offline: no gRPC, no server.
//!
//! - [`ceremony`]: generate the 32-byte X25519 secret, split it k-of-n over GF(256) with
//!   `blahaj` (never `sharks`, RUSTSEC-2024-0398), write one age-encrypted share file per
//!   custodian (`share-NAME.age`) and `manifest.json`.
//! - [`verify_share`]: check one share against the manifest on its own.
//! - [`combine`]: check every share, refuse duplicates and foreign shares, rebuild, and
//!   check the rebuilt key against the manifest's recipient before returning it.
//! - [`reshare`]: rebuild and split the same secret to a new custodian set.
//!
//! # Share text (the plaintext of a share file)
//!
//! ```text
//! kluis-escrow-share v1
//! ceremony: <32 hex digits>
//! custodian: <name>
//! index: <1..=shares>
//! threshold: <k>
//! shares: <n>
//! recovery-recipient: age1...
//! share: <standard base64 of the 33 blahaj share bytes: index byte, 32 y bytes>
//!
//! # comment lines (ignored when read)
//! ```
//!
//! # Manifest (`manifest.json`)
//!
//! ```json
//! {
//!   "format": "kluis-escrow-manifest/v1",
//!   "ceremony_id": "<32 hex digits>",
//!   "created": "2026-01-01T00:00:00Z",
//!   "recovery_recipient": "age1...",
//!   "threshold": 3,
//!   "shares": 5,
//!   "custodians": [
//!     { "name": "alice", "recipient": "age1...", "index": 1, "commitment": "<64 hex>" }
//!   ],
//!   "replaces": null
//! }
//! ```
//!
//! The commitment is [`share_commitment`]: SHA-256 over a domain-separated encoding of
//! ceremony id, index and share bytes. [`Manifest::parse`] reads and checks a manifest
//! from its JSON text alone (no file), with a typed [`ManifestError`].
#![forbid(unsafe_code)]

mod ceremony;
mod error;
pub mod kmip_bundle;
mod manifest;
mod recipient;
mod secret;
mod share;

#[cfg(test)]
mod grammar_tests;
#[cfg(test)]
mod tests;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

pub use ceremony::{Custodian, ceremony, combine, reshare, share_file_name};
pub use error::{EscrowError, ManifestError, ManifestProblem};
pub use manifest::{
    CustodianEntry, MANIFEST_FILE_NAME, MANIFEST_FORMAT, Manifest, share_commitment,
};
pub use secret::RecoveryIdentity;
pub use share::{
    SHARE_HEADER, ShareIdentities, ShareText, VerifiedShare, decode_share, read_share,
    read_share_with, verify_share,
};

/// Now, RFC 3339 UTC, whole seconds.
pub(crate) fn now_rfc3339() -> Result<String, EscrowError> {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .map_err(|_| EscrowError::Clock)
}
