//! The Kluis key service.
//!
//! A request flows `api -> auth -> keys -> master -> store`. See `shared/design.md`.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod config;
pub mod dev;
pub mod keys;
pub mod master;
pub mod pki;
pub mod secret;
pub mod server;
pub mod store;
