//! Kluis client side: the typed gRPC client ([`client`], [`config`]) and the hook
//! operations that need the server ([`hook`], [`rewrap`], [`passphrase`]). The sealed-file
//! format (a standard age v1 file) is the `kluis-age` crate; the offline escrow is
//! `kluis-escrow`; the `kmsctl` binary is the `kmsctl` crate.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod hook;
pub mod passphrase;
pub mod rewrap;
