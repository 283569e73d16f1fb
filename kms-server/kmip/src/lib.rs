//! KMIP for Kluis, the format layer: the TTLV codec ([`ttlv`]), the tags Kluis uses ([`tag`])
//! and the request and response messages of KMIP 1.0 to 1.4 ([`message`]). It does no I/O and
//! holds no keys; the KMIP front end of `kms-server` reads frames with [`ttlv::message_len`],
//! decodes them with [`ttlv::decode`] and answers with [`message::Response`].
//!
//! No maintained Rust crate under an open licence decodes KMIP on the server side, so this one
//! is written for Kluis: small, strict, bounded, and fuzzed (`fuzz/fuzz_targets/kmip.rs`).
#![forbid(unsafe_code)]

pub mod message;
pub mod tag;
pub mod ttlv;

#[cfg(test)]
mod tests;
