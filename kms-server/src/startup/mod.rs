//! Start-up: what runs before the server serves, over the core: `init` and opening a
//! config's key manager ([`open`]), the quick start ([`dev`]), moving the store to
//! another master key ([`migrate`]), copying the store to another backend
//! ([`migrate_store`]), and what the process passes in ([`env`]).

pub mod dev;
pub mod env;
pub mod migrate;
pub mod migrate_store;
pub mod open;
pub mod pki;

pub use env::{Environment, StoreLayer};
pub use open::{StartupError, init, open_keys};
