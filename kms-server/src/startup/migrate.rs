//! `kms-server migrate-master`: rewraps every keyring key from one master-key
//! provider to another (software -> PKCS#11, PKCS#11 -> another token key,
//! software -> another key file).
//!
//! Both configs must name the same store. The `from` master must open the
//! store's master check; the `to` master is opened, or created if its key does
//! not exist yet. Every keyring version is unwrapped with `from` and wrapped with
//! `to` under the same AAD, and the new keyring records and a new master check
//! are written in ONE store transaction (`WriteOp::Atomic`): after a crash at any
//! point exactly one of the two masters opens the whole store, never a mix.
//! The old key is never deleted; the operator retires it after checking.
//!
//! After `kmsctl master rotate` the store is wrapped by generation N of the
//! configured key (META `master_generation`, see
//! [`MasterKeyProvider::generation`]); the `from` side opens that generation.
//! After migration the store is wrapped by the `to` config's key itself, so the
//! same transaction records generation 1.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;


use crate::config::{ConfigError, MasterConfig, ServerConfig};
use crate::keys::{
    AUDIT_KEY_AAD, AUDIT_KEY_META, MASTER_CHECK_AAD, MASTER_CHECK_META, MASTER_GENERATION_META, krk_aad,
};
use crate::master::pkcs11::generation_label;
use crate::master::software::generation_path;
use crate::master::{MasterError, MasterKeyProvider, decode_generation};
use crate::keys::master_rewrap::{self, RewrapError};
use crate::keys::registry::{Registry, RegistryError, WriteOp};
use crate::model::KeyringRecord;
use crate::store::StoreError;
use crate::store::redb::RedbStore;

pub use super::env::MigrationStep as Step;

/// Why a migration was refused or failed. Nothing is written unless the whole
/// migration is written.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("--{which} config: {err}")]
    Config { which: &'static str, #[source] err: ConfigError },
    #[error(
        "--from and --to name different stores ({from} and {to}); both configs must have the same data_dir"
    )]
    DifferentStores { from: PathBuf, to: PathBuf },
    #[error("the store {path} is in use by another process (Database already open): stop kms-server first")]
    StoreLocked { path: PathBuf },
    #[error("the store {path} could not be opened: {err}")]
    Store { path: PathBuf, #[source] err: StoreError },
    #[error("the --from master key could not be opened: {err}")]
    FromMaster { #[source] err: MasterError },
    #[error("the store's master-key generation record could not be read: {err}")]
    GenerationRecord { #[source] err: MasterError },
    #[error(
        "the store is wrapped by generation {generation} of the --from master key (after `kmsctl master rotate`), which could not be opened: {err}"
    )]
    FromGeneration { generation: u32, #[source] err: MasterError },
    #[error(
        "the --to master key is generation {retired} of the --from master key, which this store was rotated away from (it is at generation {current}); name a new key in --to"
    )]
    RetiredGeneration { retired: u32, current: u32 },
    #[error(
        "the --from master key does not open this store ({master}); if a migration already completed, serve with its --to config"
    )]
    FromMismatch { master: String },
    #[error("keyring {keyring:?} version {version} could not be unwrapped by the --from master key: {err}")]
    Unwrap { keyring: String, version: u32, #[source] err: MasterError },
    #[error("the --to master key could not be opened or created: {err}")]
    ToMaster { #[source] err: MasterError },
    #[error("the --to [master] PKCS#11 config needs pin_file or pin_env")]
    ToPinSourceMissing,
    #[error("the --to master key already opens this store ({master}): it is the --from key, nothing to migrate")]
    SameKey { master: String },
    #[error("wrapping with the --to master key failed ({what}): {err}")]
    Wrap { what: String, #[source] err: MasterError },
    #[error("writing the rewrapped keyrings failed; nothing was changed, the --from key still opens the store: {err}")]
    Write { #[source] err: RegistryError },
    #[error(
        "the migration was committed but reading it back with the --to key failed ({what}): {err}; do not retire the --from key"
    )]
    Verify { what: String, err: String },
}

/// What a successful migration did.
#[derive(Debug, Clone)]
pub struct MigrationReport {
    /// The store file.
    pub store: PathBuf,
    /// Description of the old master key.
    pub from: String,
    /// Description of the new master key.
    pub to: String,
    /// Whether the new key was created by this migration.
    pub to_created: bool,
    /// Keyrings rewrapped, with their versions.
    pub keyrings: Vec<(String, Vec<u32>)>,
    /// The `--to` config file, when known (to name it in the report).
    pub to_config: Option<PathBuf>,
}

impl MigrationReport {
    /// Number of keyring versions rewrapped.
    pub fn versions(&self) -> usize {
        self.keyrings.iter().map(|(_, v)| v.len()).sum()
    }
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kms-server migrate-master: store {}", self.store.display())?;
        writeln!(f, "  from: {}", self.from)?;
        writeln!(f, "  to:   {}{}", self.to, if self.to_created { " (created now)" } else { "" })?;
        writeln!(
            f,
            "  rewrapped {} keyring(s), {} version(s); master check rewrapped; one atomic commit",
            self.keyrings.len(),
            self.versions()
        )?;
        for (name, versions) in &self.keyrings {
            let vs: Vec<String> = versions.iter().map(|v| format!("v{v}")).collect();
            writeln!(f, "    {name}: {}", vs.join(", "))?;
        }
        writeln!(f, "  verified: the new master key opens the store and every keyring version")?;
        let to = self.to_config.as_ref().map_or_else(|| "<TO>".to_owned(), |p| p.display().to_string());
        writeln!(f, "Next: serve with the --to config (`kms-server serve --config {to}`); the --from config is now refused.")?;
        writeln!(
            f,
            "The old master key was NOT deleted: retire it yourself once the new one serves and restores."
        )
    }
}


/// `kms-server migrate-master --from FROM --to TO` on config files.
pub fn migrate_master(from: &Path, to: &Path, env: &super::env::Environment) -> Result<MigrationReport, MigrateError> {
    let from_cfg = ServerConfig::load(from).map_err(|err| MigrateError::Config { which: "from", err })?;
    let to_cfg = ServerConfig::load(to).map_err(|err| MigrateError::Config { which: "to", err })?;
    let mut report = migrate_master_configs(&from_cfg, &to_cfg, env)?;
    report.to_config = Some(to.to_owned());
    Ok(report)
}

fn rewrap_error(e: RewrapError) -> MigrateError {
    match e {
        RewrapError::Unwrap { keyring, version, source } => MigrateError::Unwrap { keyring, version, err: source },
        RewrapError::Wrap { what, source } => MigrateError::Wrap { what, err: source },
        RewrapError::ReadBack { keyring, version, source } => {
            MigrateError::Verify { what: format!("keyring {keyring:?} version {version}"), err: source.to_string() }
        }
        RewrapError::Check(err) => MigrateError::FromMaster { err },
        RewrapError::AuditKey(err) => MigrateError::Unwrap { keyring: "(audit signing key)".into(), version: 0, err },
    }
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| std::path::absolute(p).unwrap_or_else(|_| p.to_owned()))
}

/// The migration on loaded configs.
pub fn migrate_master_configs(
    from: &ServerConfig,
    to: &ServerConfig,
    env: &super::env::Environment,
) -> Result<MigrationReport, MigrateError> {
    let step = |s: Step| {
        if let Some(f) = &env.on_migration_step {
            f(s);
        }
    };
    let store_path = from.store_path();
    if canonical(&from.data_dir) != canonical(&to.data_dir) {
        return Err(MigrateError::DifferentStores { from: from.data_dir.clone(), to: to.data_dir.clone() });
    }
    let opened = RedbStore::open(&store_path, crate::audit::AuditChain::new()).map_err(|err| match err {
        StoreError::Locked { .. } => MigrateError::StoreLocked { path: store_path.clone() },
        err => MigrateError::Store { path: store_path.clone(), err },
    })?;
    let store = Registry::new(std::sync::Arc::new(opened));
    let store_err = |err| MigrateError::Store { path: store_path.clone(), err };

    // 1. The old master must open the store: the generation of the --from key the store records
    //    (`kmsctl master rotate` moves it to `<key>.g<N>` siblings of the configured key).
    let generation = decode_generation(store.get_meta(MASTER_GENERATION_META).map_err(store_err)?.as_deref())
        .map_err(|err| MigrateError::GenerationRecord { err })?;
    let base = crate::master::open_configured(&from.master, 1).map_err(|err| MigrateError::FromMaster { err })?;
    let old = if generation == 1 {
        base
    } else {
        base.generation(generation, false).map_err(|err| MigrateError::FromGeneration { generation, err })?
    };
    old.health().map_err(|err| MigrateError::FromMaster { err })?;
    refuse_retired_generation(&from.master, &to.master, generation)?;
    let check = store
        .get_meta(MASTER_CHECK_META)
        .map_err(store_err)?
        .ok_or_else(|| store_err(StoreError::NotInitialised { store: store_path.display().to_string() }))?;

    // 2. Open everything the old key wraps before touching the new key, so a store the
    //    old key cannot fully open is refused without creating anything.
    let records = store.keyrings().map_err(store_err)?;
    let audit_blob = store.get_meta(AUDIT_KEY_META).map_err(store_err)?;
    let opened = master_rewrap::open_all(old.as_ref(), records.clone(), &check, audit_blob.as_deref()).map_err(|e| match e {
        RewrapError::Check(MasterError::UnwrapFailed) => MigrateError::FromMismatch { master: old.describe() },
        RewrapError::Check(err) => MigrateError::FromMaster { err },
        RewrapError::AuditKey(err) => MigrateError::Unwrap { keyring: "(audit signing key)".into(), version: 0, err },
        other => rewrap_error(other),
    })?;

    // 3. Open or create the new master; it must not be the old key.
    let (new, to_created) = open_or_create(&to.master)?;
    new.health().map_err(|err| MigrateError::ToMaster { err })?;
    if new.unwrap(MASTER_CHECK_AAD, &check).is_ok() {
        return Err(MigrateError::SameKey { master: new.describe() });
    }

    // 4. Rewrap everything under the same AAD; the store is then wrapped by the --to
    //    config's key itself: generation 1 of that config.
    let rewrapped = master_rewrap::wrap_all(opened, new.as_ref(), 1).map_err(rewrap_error)?;
    let ops = rewrapped.ops;

    // 5. One transaction: all keyrings and the master check, or nothing.
    step(Step::BeforeCommit);
    store.write_blocking(WriteOp::Atomic(ops)).map_err(|err| MigrateError::Write { err })?;
    step(Step::AfterCommit);

    // 6. Read back what was committed and check the new key opens all of it.
    verify(&store, new.as_ref(), &rewrapped.records)?;
    drop(store);

    Ok(MigrationReport {
        store: store_path,
        from: old.describe(),
        to: new.describe(),
        to_created,
        keyrings: records
            .iter()
            .filter(|r| r.destroyed.is_none())
            .map(|r| (r.name.clone(), r.versions.iter().map(|v| v.version).collect()))
            .collect(),
        to_config: None,
    })
}

/// Reads back what was committed: the master check, the generation, the audit key and
/// every keyring version open with the new key, and the stored keyrings are the ones
/// that were written.
fn verify(store: &Registry, new: &dyn MasterKeyProvider, written: &[KeyringRecord]) -> Result<(), MigrateError> {
    let fail = |what: String, err: String| MigrateError::Verify { what, err };
    let check = store
        .get_meta(MASTER_CHECK_META)
        .map_err(|e| fail("master check".into(), e.to_string()))?
        .ok_or_else(|| fail("master check".into(), "missing".into()))?;
    new.unwrap(MASTER_CHECK_AAD, &check).map_err(|e| fail("master check".into(), e.to_string()))?;
    let generation = store
        .get_meta(MASTER_GENERATION_META)
        .map_err(|e| fail("master generation".into(), e.to_string()))
        .and_then(|v| decode_generation(v.as_deref()).map_err(|e| fail("master generation".into(), e.to_string())))?;
    if generation != 1 {
        return Err(fail("master generation".into(), format!("generation {generation} recorded, not 1")));
    }
    if let Some(blob) = store.get_meta(AUDIT_KEY_META).map_err(|e| fail("audit key".into(), e.to_string()))? {
        new.unwrap(AUDIT_KEY_AAD, &blob).map_err(|e| fail("audit signing key".into(), e.to_string()))?;
    }
    let stored = store.keyrings().map_err(|e| fail("keyrings".into(), e.to_string()))?;
    for rec in written.iter().filter(|r| r.destroyed.is_none()) {
        for v in &rec.versions {
            let what = format!("keyring {:?} version {}", rec.name, v.version);
            let back = stored
                .iter()
                .find(|r| r.name == rec.name)
                .and_then(|r| r.versions.iter().find(|s| s.version == v.version))
                .ok_or_else(|| fail(what.clone(), "missing after commit".into()))?;
            if back.wrapped_key != v.wrapped_key {
                return Err(fail(what, "a different key came back".into()));
            }
            new.unwrap(&krk_aad(&rec.name, v.version), &back.wrapped_key).map_err(|e| fail(what.clone(), e.to_string()))?;
        }
    }
    Ok(())
}

/// Refuses a --to key that is an earlier generation of the --from key than the store's current
/// one (for example --to = --from after a rotation): that key was rotated away from and must not
/// become the master key again.
fn refuse_retired_generation(from: &MasterConfig, to: &MasterConfig, current: u32) -> Result<(), MigrateError> {
    for retired in 1..current {
        let same = match (from, to) {
            (MasterConfig::Software { key_file: f, .. }, MasterConfig::Software { key_file: t, .. }) => {
                generation_path(f, retired).is_ok_and(|p| canonical(&p) == canonical(t))
            }
            (
                MasterConfig::Pkcs11 { token_label: ft, key_label: fk, .. },
                MasterConfig::Pkcs11 { token_label: tt, key_label: tk, .. },
            ) => ft == tt && generation_label(fk, retired).is_ok_and(|l| &l == tk),
            _ => false,
        };
        if same {
            return Err(MigrateError::RetiredGeneration { retired, current });
        }
    }
    Ok(())
}

/// Opens the `to` master key, creating it if it does not exist yet. Returns whether it was created.
fn open_or_create(cfg: &MasterConfig) -> Result<(Arc<dyn MasterKeyProvider>, bool), MigrateError> {
    crate::master::open_or_create_configured(cfg).map_err(|err| match err {
        MasterError::PinSourceMissing => MigrateError::ToPinSourceMissing,
        err => MigrateError::ToMaster { err },
    })
}
