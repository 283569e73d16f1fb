//! `kms-server migrate-store --from A.toml --to B.toml`: copies the whole store of one
//! config into a new, empty store of another (redb to PostgreSQL, and back), then checks
//! the copy: every table row for row, the audit history as the server checks it at start,
//! and the target opened with its config's master key.
//!
//! Rows are copied as they are ([`Op::Import`]): the audit entries keep their numbers,
//! bytes and checkpoints, so the chain, its signatures and the exports taken before still
//! verify against the copy. Not copied: the maintenance lease row (it names processes of
//! the source) and the redb file's format marker (each store keeps its own).

use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::env::Environment;
use super::open::{StartupError, open_keys, open_store};
use crate::audit::AuditChain;
use crate::config::{ConfigError, ServerConfig};
use crate::store::{ALL_TABLES, Op, Store, StoreError, Table, WriteGroup};

/// Rows per commit of the copy.
const BATCH: usize = 1000;

/// Why a store could not be copied. Names the store and what was found.
#[derive(Debug, thiserror::Error)]
pub enum MigrateStoreError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("source store: {0}")]
    Source(#[source] Box<StartupError>),
    #[error("target store: {0}; migrate-store copies into a new, empty store only (a new database, or a path with no file)")]
    Target(#[source] Box<StartupError>),
    #[error("copying {table:?}: {source}")]
    Copy { table: Table, source: StoreError },
    #[error(
        "the copy in {target} differs from the source in {table:?} ({source_rows} rows there, {target_rows} here, or other bytes): \
         the source changed during the copy (stop every kms-server on it first) or the target is faulty; \
         drop the target and run again"
    )]
    Differs { target: String, table: Table, source_rows: u64, target_rows: u64 },
    #[error("the copy's audit history does not pass the start-up check: {0}")]
    Audit(#[source] crate::audit::integrity::IntegrityError),
    #[error("the copy does not open with the --to config's master key: {0}")]
    Open(#[source] Box<StartupError>),
}

/// What was copied.
#[derive(Debug)]
pub struct StoreCopyReport {
    pub source: String,
    pub target: String,
    pub to_config: PathBuf,
    /// Rows per table, in [`ALL_TABLES`] order (the secrets counted with their table).
    pub rows: Vec<(Table, u64)>,
}

impl StoreCopyReport {
    pub fn rows_of(&self, table: Table) -> u64 {
        self.rows.iter().find(|(t, _)| *t == table).map_or(0, |(_, n)| *n)
    }
}

impl fmt::Display for StoreCopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kms-server: copied the store {} into {}:", self.source, self.target)?;
        for (t, n) in &self.rows {
            writeln!(f, "  {:<13} {n} rows", format!("{t:?}"))?;
        }
        writeln!(f, "kms-server: the copy matches the source row for row, its audit history passes the start-up check, and it opens with the master key of {}", self.to_config.display())?;
        writeln!(f, "kms-server: serve with --config {}; keep the source until the new store has served (it is not changed)", self.to_config.display())
    }
}

/// Whether a meta row is the store's own, not copied (see the module docs).
fn skipped(table: Table, key: &[u8]) -> bool {
    table == Table::Meta && (key == crate::keys::lease::LEASE_META.as_bytes() || key == crate::store::redb::FORMAT_META.as_bytes())
}

/// Visits the rows of `table` in key order, a page at a time (each page one read), the
/// key secrets through the ids of the data keys (a store never lists its secrets).
/// What [`each_row`] calls with each row's key and value.
type RowVisit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), StoreError> + 'a;

fn each_row(store: &dyn Store, table: Table, visit: &mut RowVisit<'_>) -> Result<(), StoreError> {
    let listed = if table == Table::KeySecrets { Table::DataKeys } else { table };
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut page: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(BATCH);
        let lower = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        store.scan(listed, (lower, Bound::Unbounded), &mut |k, v| {
            page.push((k.to_vec(), v.to_vec()));
            Ok(page.len() < BATCH)
        })?;
        let Some((last, _)) = page.last() else { return Ok(()) };
        after = Some(last.clone());
        let full = page.len() == BATCH;
        for (k, v) in page {
            if skipped(table, &k) {
                continue;
            }
            if table == Table::KeySecrets {
                if let Some(secret) = store.get(Table::KeySecrets, &k)? {
                    let secret = Zeroizing::new(secret);
                    visit(&k, &secret)?;
                }
            } else {
                visit(&k, &v)?;
            }
        }
        if !full {
            return Ok(());
        }
    }
}

/// Count and SHA-256 of a table's rows (length-prefixed keys and values).
fn digest(store: &dyn Store, table: Table) -> Result<(u64, [u8; 32]), StoreError> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut n = 0u64;
    each_row(store, table, &mut |k, v| {
        for part in [k, v] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        n += 1;
        Ok(())
    })?;
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok((n, out))
}

/// Copies the store of `from` into the new store of `to` and checks the copy (see the
/// module docs). Every kms-server on the source must be stopped.
pub fn migrate_store(from: &Path, to: &Path, env: &Environment) -> Result<StoreCopyReport, MigrateStoreError> {
    let src_cfg = ServerConfig::load(from)?;
    let dst_cfg = ServerConfig::load(to)?;
    let src = open_store(&src_cfg, AuditChain::new(), false).map_err(|e| MigrateStoreError::Source(Box::new(e)))?;
    let dst = open_store(&dst_cfg, AuditChain::new(), true).map_err(|e| MigrateStoreError::Target(Box::new(e)))?;
    let mut rows = Vec::new();
    for table in ALL_TABLES {
        let copy = |e| MigrateStoreError::Copy { table, source: e };
        let mut group = WriteGroup::default();
        let mut n = 0u64;
        each_row(src.as_ref(), table, &mut |k, v| {
            group.push(Op::Import { table, key: k.to_vec(), value: Zeroizing::new(v.to_vec()) });
            n += 1;
            if group.ops.len() >= BATCH {
                dst.commit_blocking(std::mem::take(&mut group))?;
            }
            Ok(())
        })
        .map_err(copy)?;
        if !group.ops.is_empty() {
            dst.commit_blocking(group).map_err(copy)?;
        }
        rows.push((table, n));
    }
    // The check: every table as the two stores hold it now.
    for table in ALL_TABLES {
        let (s, t) = (digest(src.as_ref(), table), digest(dst.as_ref(), table));
        let copy = |e| MigrateStoreError::Copy { table, source: e };
        let ((source_rows, a), (target_rows, b)) = (s.map_err(copy)?, t.map_err(copy)?);
        if source_rows != target_rows || a != b {
            return Err(MigrateStoreError::Differs { target: dst.describe(), table, source_rows, target_rows });
        }
    }
    let report = StoreCopyReport { source: src.describe(), target: dst.describe(), to_config: to.to_owned(), rows };
    drop((src, dst));
    // As `serve --config TO` opens it: the master key's check value, the state, the audit key.
    let keys = open_keys(&dst_cfg, env).map_err(|e| MigrateStoreError::Open(Box::new(e)))?;
    if let Some(alarm) = keys.audit_alarm() {
        return Err(MigrateStoreError::Audit(alarm));
    }
    Ok(report)
}
