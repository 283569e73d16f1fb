//! The Kluis key service.
//!
//! A request flows `api -> auth -> keys -> master -> store`. See `shared/design.md`.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod health;
pub mod keys;
pub mod kmip;
pub mod master;
pub mod metrics;
pub mod model;
pub mod secret;
pub mod server;
pub mod startup;
pub mod store;
pub mod tls;

/// One line for an error and its causes (each cause added unless already in the text).
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !line.contains(&t) {
            line.push_str(": ");
            line.push_str(&t);
        }
        src = s.source();
    }
    line.replace('\n', " ")
}
