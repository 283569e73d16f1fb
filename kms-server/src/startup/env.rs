//! What the process gives the server from outside.

use std::sync::Arc;

use crate::clock::{Clock, SystemClock};
use crate::store::Store;

/// A layer around the opened store.
pub type StoreLayer = Arc<dyn Fn(Arc<dyn Store>) -> Arc<dyn Store> + Send + Sync>;

/// What the process gives the server from outside: the clock, and layers around the
/// store. `kms-server` uses [`Environment::default`] (the system clock, the store as it
/// is); tests build their own (a clock they move, a store that fails on purpose).
#[derive(Clone)]
pub struct Environment {
    pub clock: Arc<dyn Clock>,
    /// Wraps the opened store (e.g. a test's fault injection); `None` uses it as it is.
    pub wrap_store: Option<StoreLayer>,
    /// Called at each step of `migrate-master` (tests stop the process there).
    pub on_migration_step: Option<Arc<dyn Fn(MigrationStep) + Send + Sync>>,
}

impl Default for Environment {
    fn default() -> Self {
        Self { clock: Arc::new(SystemClock), wrap_store: None, on_migration_step: None }
    }
}

impl Environment {
    pub(super) fn store(&self, store: Arc<dyn Store>) -> Arc<dyn Store> {
        match &self.wrap_store {
            Some(wrap) => wrap(store),
            None => store,
        }
    }
}

/// The points of a migration at which [`Environment::on_migration_step`]
/// is called (tests stop the process there to prove crash safety).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationStep {
    /// Everything is rewrapped and checked in memory; the store is not written yet.
    BeforeCommit,
    /// The one atomic write is committed; the read-back has not run yet.
    AfterCommit,
}
