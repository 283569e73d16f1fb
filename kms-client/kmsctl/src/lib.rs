//! What the `kmsctl` binary is made of besides its command dispatch: the compliance
//! report renderers ([`report`]), client certificate issuing ([`cert`]) and the offline
//! escrow commands ([`escrow`], over the `kluis-escrow` crate), and the lines of human
//! output that carry server text, escaped ([`output`]). A library so that the
//! end-to-end tests can render reports without the binary.
#![forbid(unsafe_code)]

pub mod cert;
pub mod escrow;
pub mod kmip;
pub mod output;
pub mod report;
