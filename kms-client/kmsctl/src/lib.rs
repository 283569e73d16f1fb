//! What the `kmsctl` binary is made of besides its command dispatch: the compliance
//! report renderers ([`report`]) and client certificate issuing ([`cert`]). A library so
//! that the end-to-end tests can render reports without the binary.
#![forbid(unsafe_code)]

pub mod cert;
pub mod report;
