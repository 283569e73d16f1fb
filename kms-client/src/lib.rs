//! Kluis client side: the typed gRPC client ([`client`], [`config`]) and the hook
//! operations that need the server ([`hook`], [`rewrap`], [`passphrase`]); [`retry`] rides
//! out a server restart. The sealed-file format (a standard age v1 file) is the `kluis-age`
//! crate; the offline escrow is `kluis-escrow`; the `kmsctl` binary is the `kmsctl` crate.
//! [`class`] says what a failure means for the caller and gives the exit codes both CLIs use.
#![forbid(unsafe_code)]

pub mod class;
pub mod client;
pub mod config;
pub mod escape;
pub mod hook;
pub mod passphrase;
pub mod retry;
pub mod rewrap;
pub mod tls;
