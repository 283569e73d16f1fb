//! Kluis client side: the typed gRPC client ([`client`]), the sealed-file format
//! ([`sealed`], a standard age v1 file), the hook operations ([`hook`]) and the
//! escrow ceremony and recovery ([`escrow`]).
#![forbid(unsafe_code)]

pub mod cert;
pub mod client;
pub mod config;
pub mod escrow;
mod fsutil;
pub mod hook;
pub mod output;
pub mod passphrase;
pub mod report;
pub mod rewrap;
pub mod sealed;
pub mod secret;
pub mod stream;
