//! Kluis client side: the typed gRPC client ([`client`]), the hook operations that need
//! the server ([`hook`], [`rewrap`], [`passphrase`]) and the escrow ceremony and recovery
//! ([`escrow`]). The sealed-file format (a standard age v1 file) is the `kluis-age` crate.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod escrow;
pub mod hook;
pub mod passphrase;
pub mod rewrap;
