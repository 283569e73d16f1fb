//! `kms-server-testkit`: the `kms-server` command line with test seams, driven by
//! environment variables that only this binary reads:
//!
//! - `KLUIS_TEST_CLOCK_FILE`: a file holding a Unix time (seconds); every time-based
//!   decision and audit timestamp reads it, so tests move time by writing the file.
//! - `KLUIS_TEST_FAIL_AUDIT=1`: every store commit that appends to the audit trail fails,
//!   to prove that requests then fail closed.
//! - `KLUIS_TEST_ABORT_MIGRATION=before-commit|after-commit`: `migrate-master` aborts the
//!   process at that step, to prove crash safety with real processes.
//!
//! The shipped `kms-server` binary is built from the same library with the default
//! environment and contains none of this (a test checks its bytes).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use kms_server::clock::{Clock, SystemClock};
use kms_server::startup::migrate::Step;
use kms_server::startup::Environment;
use kms_server::store::{KeyRange, Row, Store, StoreError, StoreFuture, Table, Visit, WriteGroup};

/// The time in a file (Unix seconds); the system clock if the file cannot be read.
struct FileClock(PathBuf);

impl Clock for FileClock {
    fn now_millis(&self) -> i64 {
        match std::fs::read_to_string(&self.0).ok().and_then(|s| s.trim().parse::<i64>().ok()) {
            Some(t) => t.saturating_mul(1000),
            None => {
                eprintln!("kms-server-testkit: clock file {} unreadable; using the system clock", self.0.display());
                SystemClock.now_millis()
            }
        }
    }
}

/// A store whose commits fail when they append to the audit trail.
struct FailingAudit(Arc<dyn Store>);

#[derive(Debug)]
struct Injected;

impl std::fmt::Display for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the audit trail cannot be written (fault injected for a test)")
    }
}

impl std::error::Error for Injected {}

impl Store for FailingAudit {
    fn describe(&self) -> String {
        self.0.describe()
    }

    fn exclusive(&self) -> bool {
        self.0.exclusive()
    }

    fn commit(&self, group: WriteGroup) -> StoreFuture<'_, ()> {
        if group.appends() {
            return Box::pin(async { Err(StoreError::Backend(Box::new(Injected))) });
        }
        self.0.commit(group)
    }

    fn commit_blocking(&self, group: WriteGroup) -> Result<(), StoreError> {
        if group.appends() {
            return Err(StoreError::Backend(Box::new(Injected)));
        }
        self.0.commit_blocking(group)
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(table, key)
    }

    fn scan(&self, table: Table, range: KeyRange<'_>, visit: &mut Visit<'_>) -> Result<(), StoreError> {
        self.0.scan(table, range, visit)
    }

    fn last(&self, table: Table) -> Result<Option<Row>, StoreError> {
        self.0.last(table)
    }

    fn scrub(&self) -> StoreFuture<'_, kms_server::store::ScrubReport> {
        self.0.scrub()
    }
}

fn main() -> std::process::ExitCode {
    let mut env = Environment::default();
    if let Some(f) = std::env::var_os("KLUIS_TEST_CLOCK_FILE") {
        env.clock = Arc::new(FileClock(PathBuf::from(f)));
    }
    if std::env::var("KLUIS_TEST_FAIL_AUDIT").is_ok_and(|v| v == "1") {
        env.wrap_store = Some(Arc::new(|s| Arc::new(FailingAudit(s)) as Arc<dyn Store>));
    }
    if let Ok(point) = std::env::var("KLUIS_TEST_ABORT_MIGRATION") {
        env.on_migration_step = Some(Arc::new(move |step| {
            let name = match step {
                Step::BeforeCommit => "before-commit",
                Step::AfterCommit => "after-commit",
            };
            if name == point {
                eprintln!("kms-server migrate-master: KLUIS_TEST_ABORT_MIGRATION={point}: aborting (test fault injection)");
                std::process::abort();
            }
        }));
    }
    kms_server::cli::main_with(env)
}
