//! The embedded store: one redb file.
//!
//! All writes go through one writer thread that commits them in groups: every caller
//! waits until its group is in a committed, fsynced transaction (redb
//! `Durability::Immediate`), but concurrent callers share one commit. Every commit saves
//! redb's allocator state too (quick repair), so opening after a crash does not rebuild it
//! from the whole file. Reads use their own read transactions and never wait for the writer.
//!
//! The tables keep the typed keys of earlier versions of this file (a store made by an
//! older kms-server opens as it is); [`Table`] key bytes are converted at this boundary.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use arc_swap::ArcSwap;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use tokio::sync::oneshot;

use super::{Chain, ChainHead, KeyRange, Op, ScrubReport, Store, StoreError, StoreFuture, Table, Visit, WriteGroup};

/// redb's page cache (its default is 1 GiB): bounds the server's memory at any registry size.
const STORE_CACHE_BYTES: usize = 64 << 20;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEYRINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("keyrings");
const DATA_KEYS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("data_keys");
const ISSUED: TableDefinition<&str, u64> = TableDefinition::new("issued_per_keyring");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_checkpoints");
const RESTORE_TESTS: TableDefinition<u64, &[u8]> = TableDefinition::new("restore_tests");
const APPROVALS: TableDefinition<u64, &[u8]> = TableDefinition::new("approvals");
const DESTRUCTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("destructions");
const EXPIRY: TableDefinition<(i64, [u8; 16]), ()> = TableDefinition::new("expiry_index");
const KEY_SECRETS: TableDefinition<[u8; 16], [u8; 32]> = TableDefinition::new("key_secrets");
const KMIP_OBJECTS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("kmip_objects");

/// Every table of the file, by name: a scrub copies exactly these and refuses a file
/// that holds any other.
const TABLE_NAMES: [&str; 12] = [
    "meta",
    "keyrings",
    "data_keys",
    "issued_per_keyring",
    "audit",
    "audit_checkpoints",
    "restore_tests",
    "approvals",
    "destructions",
    "expiry_index",
    "key_secrets",
    "kmip_objects",
];

/// META key of the store format: absent in format 1; 2 since audit records are stored
/// compactly. A store of a later format than this is refused.
pub const FORMAT_META: &str = "store_format";
pub const FORMAT: u32 = 2;

/// Largest number of groups committed in one transaction.
const MAX_BATCH: usize = 4096;

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Backend(Box::new(e.into()))
}

fn str_key(table: Table, key: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(key).map_err(|_| StoreError::BadKey { table })
}

fn id16(table: Table, key: &[u8]) -> Result<[u8; 16], StoreError> {
    key.try_into().map_err(|_| StoreError::BadKey { table })
}

fn u64_table(table: Table) -> Option<TableDefinition<'static, u64, &'static [u8]>> {
    match table {
        Table::Audit => Some(AUDIT),
        Table::Checkpoints => Some(CHECKPOINTS),
        Table::RestoreTests => Some(RESTORE_TESTS),
        Table::Approvals => Some(APPROVALS),
        Table::Destructions => Some(DESTRUCTIONS),
        _ => None,
    }
}

fn id16_table(table: Table) -> Option<TableDefinition<'static, [u8; 16], &'static [u8]>> {
    match table {
        Table::DataKeys => Some(DATA_KEYS),
        Table::KmipObjects => Some(KMIP_OBJECTS),
        _ => None,
    }
}

fn str_table(table: Table) -> Option<TableDefinition<'static, &'static str, &'static [u8]>> {
    match table {
        Table::Meta => Some(META),
        Table::Keyrings => Some(KEYRINGS),
        _ => None,
    }
}

/// What the writer thread is asked to do.
enum Job {
    Write(WriteGroup, Reply),
    Scrub(oneshot::Sender<Result<ScrubReport, StoreError>>),
}

/// How the writer answers: to an async waiter or to a blocked thread.
enum Reply {
    Async(oneshot::Sender<Result<(), StoreError>>),
    Blocking(mpsc::SyncSender<Result<(), StoreError>>),
}

impl Reply {
    fn send(self, r: Result<(), StoreError>) {
        let _ = match self {
            Reply::Async(tx) => tx.send(r).map_err(|_| ()),
            Reply::Blocking(tx) => tx.send(r).map_err(|_| ()),
        };
    }
}

/// The writer's view of the log: the next number and the head to link to.
struct LogHead {
    next_seq: u64,
    prev: ChainHead,
}

/// The redb store. The last handle dropped stops the writer thread and waits for it,
/// so the file is closed when it returns.
pub struct RedbStore {
    /// The open file; a scrub replaces it with its rewritten copy.
    db: Arc<ArcSwap<Database>>,
    writer: Writer,
    path: PathBuf,
}

struct Writer {
    tx: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Writer {
    fn send(&self, item: Job) -> Result<(), StoreError> {
        let guard = self.tx.lock().map_err(|_| StoreError::WriterGone)?;
        guard.as_ref().ok_or(StoreError::WriterGone)?.send(item).map_err(|_| StoreError::WriterGone)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(handle) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = handle.join();
        }
    }
}

impl RedbStore {
    /// Creates a new store file; fails if one exists.
    pub fn create(path: &Path, chain: Arc<dyn Chain>) -> Result<Self, StoreError> {
        if path.exists() {
            return Err(StoreError::AlreadyExists { store: path.display().to_string() });
        }
        remove_stale_scrub(path)?;
        let db = redb::Builder::new().set_cache_size(STORE_CACHE_BYTES).create(path).map_err(dberr)?;
        // `start` makes the tables and marks the format of an empty file.
        Self::start(db, path, chain)
    }

    /// Opens an existing store file; fails if there is none.
    pub fn open(path: &Path, chain: Arc<dyn Chain>) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::NotInitialised { store: path.display().to_string() });
        }
        let db = redb::Builder::new().set_cache_size(STORE_CACHE_BYTES).open(path).map_err(|e| match e.into() {
            redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
                StoreError::Locked { store: path.display().to_string() }
            }
            e => StoreError::Backend(Box::new(e)),
        })?;
        // Only now that this process holds the store's lock: a copy left by a scrub that
        // was cut off is not the store (the rename is what makes it one).
        remove_stale_scrub(path)?;
        Self::start(db, path, chain)
    }

    fn start(db: Database, path: &Path, chain: Arc<dyn Chain>) -> Result<Self, StoreError> {
        let store = path.display().to_string();
        let head = {
            let txn = begin_write(&db)?;
            let head = {
                let mut meta = txn.open_table(META).map_err(dberr)?;
                let found = match meta.get(FORMAT_META).map_err(dberr)? {
                    None => 1,
                    Some(v) => <[u8; 4]>::try_from(v.value())
                        .map(u32::from_be_bytes)
                        .map_err(|_| StoreError::BadFormat { store: store.clone() })?,
                };
                if found > FORMAT {
                    return Err(StoreError::NewerFormat { store, found, supported: FORMAT });
                }
                if found < FORMAT {
                    // Format 1 records stay as they are (they are still read); new ones are compact.
                    meta.insert(FORMAT_META, FORMAT.to_be_bytes().as_slice()).map_err(dberr)?;
                }
                // Opening creates what is missing: every table of a new file, the tables
                // added since an older file was made.
                txn.open_table(KEYRINGS).map_err(dberr)?;
                txn.open_table(DATA_KEYS).map_err(dberr)?;
                txn.open_table(ISSUED).map_err(dberr)?;
                txn.open_table(CHECKPOINTS).map_err(dberr)?;
                txn.open_table(RESTORE_TESTS).map_err(dberr)?;
                txn.open_table(APPROVALS).map_err(dberr)?;
                txn.open_table(DESTRUCTIONS).map_err(dberr)?;
                txn.open_table(EXPIRY).map_err(dberr)?;
                txn.open_table(KEY_SECRETS).map_err(dberr)?;
                txn.open_table(KMIP_OBJECTS).map_err(dberr)?;
                let audit = txn.open_table(AUDIT).map_err(dberr)?;
                match audit.last().map_err(dberr)? {
                    Some((k, v)) => {
                        let seq = k.value();
                        let prev = chain.head_of(seq, v.value()).map_err(|source| StoreError::Resume { seq, source })?;
                        LogHead { next_seq: seq + 1, prev }
                    }
                    None => LogHead { next_seq: 1, prev: chain.genesis() },
                }
            };
            txn.commit().map_err(dberr)?;
            head
        };
        let db = Arc::new(ArcSwap::from_pointee(db));
        let (tx, rx) = mpsc::channel::<Job>();
        let wdb = db.clone();
        let wpath = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("kluis-store-writer".into())
            .spawn(move || writer_loop(&wdb, &wpath, &rx, chain.as_ref(), head))
            .map_err(|e| tracing::error!(error = %e, "could not start the store writer"))
            .ok();
        let writer = Writer { tx: std::sync::Mutex::new(Some(tx)), thread: std::sync::Mutex::new(thread) };
        Ok(Self { db, writer, path: path.to_owned() })
    }

    /// The store file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Store for RedbStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn exclusive(&self) -> bool {
        true
    }

    fn commit(&self, group: WriteGroup) -> StoreFuture<'_, ()> {
        let (tx, rx) = oneshot::channel();
        // Refused here, it fails alone: never in a transaction shared with other groups.
        let sent = group.check_sizes().and_then(|()| self.writer.send(Job::Write(group, Reply::Async(tx))));
        Box::pin(async move {
            sent?;
            rx.await.map_err(|_| StoreError::WriterGone)?
        })
    }

    fn commit_blocking(&self, group: WriteGroup) -> Result<(), StoreError> {
        group.check_sizes()?;
        let (tx, rx) = mpsc::sync_channel(1);
        self.writer.send(Job::Write(group, Reply::Blocking(tx)))?;
        rx.recv().map_err(|_| StoreError::WriterGone)?
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.load().begin_read().map_err(dberr)?;
        if let Some(def) = str_table(table) {
            let t = txn.open_table(def).map_err(dberr)?;
            return Ok(t.get(str_key(table, key)?).map_err(dberr)?.map(|v| v.value().to_vec()));
        }
        if let Some(def) = u64_table(table) {
            let t = txn.open_table(def).map_err(dberr)?;
            return Ok(t.get(super::key_id(table, key)?).map_err(dberr)?.map(|v| v.value().to_vec()));
        }
        if let Some(def) = id16_table(table) {
            let t = txn.open_table(def).map_err(dberr)?;
            return Ok(t.get(id16(table, key)?).map_err(dberr)?.map(|v| v.value().to_vec()));
        }
        match table {
            Table::Issued => {
                let t = txn.open_table(ISSUED).map_err(dberr)?;
                Ok(t.get(str_key(table, key)?).map_err(dberr)?.map(|v| v.value().to_be_bytes().to_vec()))
            }
            Table::Expiry => {
                let t = txn.open_table(EXPIRY).map_err(dberr)?;
                Ok(t.get(super::parse_expiry_key(key)?).map_err(dberr)?.map(|_| Vec::new()))
            }
            Table::KeySecrets => {
                let t = txn.open_table(KEY_SECRETS).map_err(dberr)?;
                Ok(t.get(id16(table, key)?).map_err(dberr)?.map(|v| v.value().to_vec()))
            }
            _ => Err(StoreError::WrongTable { table }),
        }
    }

    fn scan(&self, table: Table, range: KeyRange<'_>, visit: &mut Visit<'_>) -> Result<(), StoreError> {
        let txn = self.db.load().begin_read().map_err(dberr)?;
        macro_rules! walk {
            ($def:expr, $kt:ty, $from:expr, $kb:expr, $vb:expr) => {{
                let t = txn.open_table($def).map_err(dberr)?;
                let lo: Bound<$kt> = map_bound(range.0, $from)?;
                let hi: Bound<$kt> = map_bound(range.1, $from)?;
                for row in t.range::<$kt>((lo, hi)).map_err(dberr)? {
                    let (k, v) = row.map_err(dberr)?;
                    let (k, v) = (k.value(), v.value());
                    if !visit(&$kb(&k), &$vb(&v))? {
                        break;
                    }
                }
                Ok(())
            }};
        }
        if let Some(def) = str_table(table) {
            return walk!(def, &str, |b| str_key(table, b), |k: &&str| k.as_bytes().to_vec(), |v: &&[u8]| v.to_vec());
        }
        if let Some(def) = u64_table(table) {
            return walk!(def, u64, |b: &[u8]| super::key_id(table, b), |k: &u64| k.to_be_bytes().to_vec(), |v: &&[u8]| v.to_vec());
        }
        if let Some(def) = id16_table(table) {
            return walk!(def, [u8; 16], |b: &[u8]| id16(table, b), |k: &[u8; 16]| k.to_vec(), |v: &&[u8]| v.to_vec());
        }
        match table {
            Table::Issued => {
                walk!(ISSUED, &str, |b| str_key(table, b), |k: &&str| k.as_bytes().to_vec(), |v: &u64| v.to_be_bytes().to_vec())
            }
            Table::Expiry => walk!(
                EXPIRY,
                (i64, [u8; 16]),
                super::parse_expiry_key,
                |k: &(i64, [u8; 16])| super::expiry_key(k.0, &k.1).to_vec(),
                |_v: &()| Vec::new()
            ),
            // Secrets are read one by one, never listed.
            _ => Err(StoreError::WrongTable { table }),
        }
    }

    fn last(&self, table: Table) -> Result<Option<super::Row>, StoreError> {
        let txn = self.db.load().begin_read().map_err(dberr)?;
        let def = u64_table(table).ok_or(StoreError::WrongTable { table })?;
        let t = txn.open_table(def).map_err(dberr)?;
        Ok(t.last().map_err(dberr)?.map(|(k, v)| (k.value().to_be_bytes().to_vec(), v.value().to_vec())))
    }

    fn scrub(&self) -> StoreFuture<'_, ScrubReport> {
        let (tx, rx) = oneshot::channel();
        let sent = self.writer.send(Job::Scrub(tx));
        Box::pin(async move {
            sent?;
            rx.await.map_err(|_| StoreError::WriterGone)?
        })
    }
}

/// A bound on key bytes as a bound on the table's typed key.
fn map_bound<'a, K>(b: Bound<&'a [u8]>, f: impl Fn(&'a [u8]) -> Result<K, StoreError>) -> Result<Bound<K>, StoreError> {
    Ok(match b {
        Bound::Included(k) => Bound::Included(f(k)?),
        Bound::Excluded(k) => Bound::Excluded(f(k)?),
        Bound::Unbounded => Bound::Unbounded,
    })
}

fn writer_loop(shared: &ArcSwap<Database>, path: &Path, rx: &mpsc::Receiver<Job>, chain: &dyn Chain, mut head: LogHead) {
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let (group, reply) = match first {
            Job::Write(group, reply) => (group, reply),
            Job::Scrub(reply) => {
                // In the writer thread: every write acknowledged before is in the copy,
                // and writes sent meanwhile wait for the copy to be the store.
                let _ = reply.send(scrub(shared, path));
                continue;
            }
        };
        let mut batch = vec![(group, reply)];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Job::Write(g, r)) => batch.push((g, r)),
                Ok(scrub) => {
                    next = Some(scrub);
                    break;
                }
                Err(_) => break,
            }
        }
        // A group that compares and sets commits in a transaction of its own, so that a
        // conflict fails it alone; the others share one, in their order.
        let mut run = Vec::new();
        for (g, r) in batch {
            if g.expects() {
                commit_run(&shared.load(), std::mem::take(&mut run), chain, &mut head);
                commit_run(&shared.load(), vec![(g, r)], chain, &mut head);
            } else {
                run.push((g, r));
            }
        }
        commit_run(&shared.load(), run, chain, &mut head);
    }
}

/// Commits `run` in one transaction and answers each writer.
fn commit_run(database: &Database, run: Vec<(WriteGroup, Reply)>, chain: &dyn Chain, head: &mut LogHead) {
    if run.is_empty() {
        return;
    }
    let (groups, replies): (Vec<_>, Vec<_>) = run.into_iter().unzip();
    match commit_batch(database, groups, chain, head) {
        Ok(()) => {
            for r in replies {
                r.send(Ok(()));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, writes = replies.len(), "store commit failed");
            let mut first = Some(e);
            for r in replies {
                r.send(Err(first.take().unwrap_or(StoreError::GroupFailed)));
            }
        }
    }
}

/// A write transaction whose commit also saves redb's allocator state ("quick repair"): after a
/// crash, the next open loads that state instead of walking every tree of the file to rebuild
/// it, so the restart after kill -9 or a power cut no longer grows with the registry
/// (docs/benchmarks.md, "Restart after a crash at scale").
fn begin_write(database: &Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut txn = database.begin_write().map_err(dberr)?;
    txn.set_quick_repair(true);
    Ok(txn)
}

fn commit_batch(database: &Database, groups: Vec<WriteGroup>, chain: &dyn Chain, head: &mut LogHead) -> Result<(), StoreError> {
    // A group commit is one transaction, so every group inside it is atomic too.
    // The log head advances only if the transaction commits.
    let (mut next_seq, mut prev) = (head.next_seq, head.prev.clone());
    let mut linked_here: Vec<(u64, ChainHead)> = Vec::new();
    let mut on_commit = Vec::new();
    let txn = begin_write(database)?;
    {
        let mut audit = txn.open_table(AUDIT).map_err(dberr)?;
        let mut checkpoints = txn.open_table(CHECKPOINTS).map_err(dberr)?;
        let mut meta = txn.open_table(META).map_err(dberr)?;
        let mut keyrings = txn.open_table(KEYRINGS).map_err(dberr)?;
        let mut keys = txn.open_table(DATA_KEYS).map_err(dberr)?;
        let mut issued = txn.open_table(ISSUED).map_err(dberr)?;
        let mut tests = txn.open_table(RESTORE_TESTS).map_err(dberr)?;
        let mut approvals = txn.open_table(APPROVALS).map_err(dberr)?;
        let mut destructions = txn.open_table(DESTRUCTIONS).map_err(dberr)?;
        let mut expiry = txn.open_table(EXPIRY).map_err(dberr)?;
        let mut secrets = txn.open_table(KEY_SECRETS).map_err(dberr)?;
        let mut kmip = txn.open_table(KMIP_OBJECTS).map_err(dberr)?;
        for op in groups.into_iter().flat_map(|g| g.ops) {
            match op {
                Op::Put { table, key, value } => match table {
                    Table::Meta => drop(meta.insert(str_key(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::Keyrings => drop(keyrings.insert(str_key(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::DataKeys => drop(keys.insert(id16(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::Approvals => drop(approvals.insert(super::key_id(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::Destructions => {
                        drop(destructions.insert(super::key_id(table, &key)?, value.as_slice()).map_err(dberr)?)
                    }
                    Table::RestoreTests => drop(tests.insert(super::key_id(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::Expiry => drop(expiry.insert(super::parse_expiry_key(&key)?, ()).map_err(dberr)?),
                    Table::KmipObjects => drop(kmip.insert(id16(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::Issued | Table::Audit | Table::Checkpoints | Table::KeySecrets => {
                        return Err(StoreError::WrongTable { table });
                    }
                },
                Op::PutSecret { table: Table::KeySecrets, key, value } => {
                    let v: &[u8; 32] = value.as_slice().try_into().map_err(|_| StoreError::WrongTable { table: Table::KeySecrets })?;
                    secrets.insert(id16(Table::KeySecrets, &key)?, v).map_err(dberr)?;
                }
                Op::PutSecret { table, .. } => return Err(StoreError::WrongTable { table }),
                Op::Delete { table, key } => match table {
                    Table::Expiry => drop(expiry.remove(super::parse_expiry_key(&key)?).map_err(dberr)?),
                    Table::Meta => drop(meta.remove(str_key(table, &key)?).map_err(dberr)?),
                    Table::KeySecrets => drop(secrets.remove(id16(table, &key)?).map_err(dberr)?),
                    Table::KmipObjects => drop(kmip.remove(id16(table, &key)?).map_err(dberr)?),
                    _ => return Err(StoreError::WrongTable { table }),
                },
                Op::Increment { table: Table::Issued, key, by } => {
                    let name = str_key(Table::Issued, &key)?;
                    let cur = issued.get(name).map_err(dberr)?.map(|v| v.value()).unwrap_or(0);
                    issued.insert(name, cur.saturating_add(by)).map_err(dberr)?;
                }
                Op::Increment { table, .. } => return Err(StoreError::WrongTable { table }),
                Op::Insert { table: Table::RestoreTests, value } => {
                    let id = tests.last().map_err(dberr)?.map_or(1, |(k, _)| k.value() + 1);
                    tests.insert(id, value.as_slice()).map_err(dberr)?;
                }
                Op::Insert { table, .. } => return Err(StoreError::WrongTable { table }),
                Op::Expect { table, key, value } => {
                    let found: Option<Vec<u8>> = match table {
                        Table::Meta => meta.get(str_key(table, &key)?).map_err(dberr)?.map(|v| v.value().to_vec()),
                        Table::Keyrings => keyrings.get(str_key(table, &key)?).map_err(dberr)?.map(|v| v.value().to_vec()),
                        Table::Approvals => approvals.get(super::key_id(table, &key)?).map_err(dberr)?.map(|v| v.value().to_vec()),
                        Table::Destructions => destructions.get(super::key_id(table, &key)?).map_err(dberr)?.map(|v| v.value().to_vec()),
                        Table::KmipObjects => kmip.get(id16(table, &key)?).map_err(dberr)?.map(|v| v.value().to_vec()),
                        Table::DataKeys => keys.get(id16(table, &key)?).map_err(dberr)?.map(|v| v.value().to_vec()),
                        _ => return Err(StoreError::WrongTable { table }),
                    };
                    if found != value {
                        return Err(StoreError::Conflict { what: super::expect_what(table, &key) });
                    }
                }
                Op::Import { table, key, value } => match table {
                    Table::Audit => {
                        let seq = super::key_id(table, &key)?;
                        if seq != next_seq {
                            return Err(StoreError::ImportOrder { seq, next: next_seq });
                        }
                        audit.insert(seq, value.as_slice()).map_err(dberr)?;
                        prev = chain.head_of(seq, &value).map_err(|source| StoreError::Resume { seq, source })?;
                        next_seq += 1;
                    }
                    Table::Checkpoints => drop(checkpoints.insert(super::key_id(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::Issued => {
                        let n = <[u8; 8]>::try_from(value.as_slice()).map_err(|_| StoreError::WrongTable { table })?;
                        issued.insert(str_key(table, &key)?, u64::from_be_bytes(n)).map_err(dberr)?;
                    }
                    Table::KeySecrets => {
                        let v: &[u8; 32] = value.as_slice().try_into().map_err(|_| StoreError::WrongTable { table })?;
                        secrets.insert(id16(table, &key)?, v).map_err(dberr)?;
                    }
                    Table::Meta => drop(meta.insert(str_key(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::Keyrings => drop(keyrings.insert(str_key(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::DataKeys => drop(keys.insert(id16(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::Approvals => drop(approvals.insert(super::key_id(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::Destructions => drop(destructions.insert(super::key_id(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::RestoreTests => drop(tests.insert(super::key_id(table, &key)?, value.as_slice()).map_err(dberr)?),
                    Table::Expiry => drop(expiry.insert(super::parse_expiry_key(&key)?, ()).map_err(dberr)?),
                    Table::KmipObjects => drop(kmip.insert(id16(table, &key)?, value.as_slice()).map_err(dberr)?),
                },
                Op::Append { entry } => {
                    let seq = next_seq;
                    let base = match chain.base_of(seq) {
                        Some(b) => super::base_head(chain, b, &linked_here, |b| {
                            Ok(audit.get(b).map_err(dberr)?.map(|v| v.value().to_vec()))
                        })?,
                        None => None,
                    };
                    let linked = chain.link(seq, &prev, &entry, base.as_ref()).map_err(|source| StoreError::Link { seq, source })?;
                    linked_here.push((seq, linked.head.clone()));
                    on_commit.extend(linked.on_commit);
                    audit.insert(seq, linked.stored.as_slice()).map_err(dberr)?;
                    if let Some(cp) = linked.checkpoint {
                        checkpoints.insert(seq, cp.as_slice()).map_err(dberr)?;
                    }
                    prev = linked.head;
                    next_seq += 1;
                }
            }
        }
    }
    txn.commit().map_err(dberr)?;
    head.next_seq = next_seq;
    head.prev = prev;
    if !on_commit.is_empty() {
        chain.committed(on_commit);
    }
    Ok(())
}

/// Where a scrub writes its copy: beside the store, same directory (so the rename is atomic).
fn scrub_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".scrub");
    path.with_file_name(name)
}

fn remove_stale_scrub(path: &Path) -> Result<(), StoreError> {
    let tmp = scrub_path(path);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {
            tracing::warn!(copy = %tmp.display(), "removed the copy of a store scrub that was cut off");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(scrub_io(path, "removing a stale copy", &tmp, e)),
    }
}

fn scrub_io(store: &Path, step: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Scrub { store: store.display().to_string(), step, path: path.display().to_string(), source }
}

/// Rows per copy transaction: bounds the memory of a scrub at any store size.
const SCRUB_ROWS_PER_TXN: usize = 50_000;

/// Rewrites the store: every live row into a new file beside it, which then replaces
/// it by rename. redb reuses freed pages but never clears them, so a deleted row's bytes
/// stay in the file until then; the copy holds live rows only. Runs in the writer thread.
fn scrub(shared: &ArcSwap<Database>, path: &Path) -> Result<ScrubReport, StoreError> {
    let started = std::time::Instant::now();
    let tmp = scrub_path(path);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).map_err(|e| scrub_io(path, "reading the size", p, e));
    let bytes_before = size(path)?;
    remove_stale_scrub(path)?;
    let old = shared.load_full();
    let copy = redb::Builder::new().set_cache_size(STORE_CACHE_BYTES).create(&tmp).map_err(dberr)?;
    if let Err(e) = copy_tables(&old, &copy, path) {
        drop(copy);
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let mode = std::fs::metadata(path).map_err(|e| scrub_io(path, "reading the permissions", path, e))?.permissions();
    let renamed = std::fs::set_permissions(&tmp, mode)
        .map_err(|e| scrub_io(path, "setting the permissions", &tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| scrub_io(path, "renaming the copy over the store", &tmp, e)));
    if let Err(e) = renamed {
        drop(copy);
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // From here the copy is the store (its every commit was durable): later writes go to it.
    shared.store(Arc::new(copy));
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| scrub_io(path, "syncing the directory after the rename", dir, e))?;
    Ok(ScrubReport { bytes_before, bytes_after: size(path)?, millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX) })
}

/// Copies every table of `from` into the empty `to`, in transactions of at most
/// [`SCRUB_ROWS_PER_TXN`] rows (the last one durable), and checks the row counts.
fn copy_tables(from: &Database, to: &Database, store: &Path) -> Result<(), StoreError> {
    let read = from.begin_read().map_err(dberr)?;
    for t in read.list_tables().map_err(dberr)? {
        if !TABLE_NAMES.contains(&t.name()) {
            return Err(StoreError::ScrubUnknownTable { store: store.display().to_string(), table: t.name().to_owned() });
        }
    }
    if read.list_multimap_tables().map_err(dberr)?.next().is_some() {
        return Err(StoreError::ScrubUnknownTable { store: store.display().to_string(), table: "(a multimap table)".into() });
    }
    macro_rules! copy {
        ($def:expr) => {{
            let src = read.open_table($def).map_err(dberr)?;
            let mut rows = src.iter().map_err(dberr)?.peekable();
            let mut copied = 0u64;
            loop {
                let mut txn = to.begin_write().map_err(dberr)?;
                txn.set_durability(redb::Durability::None).map_err(dberr)?;
                {
                    let mut dst = txn.open_table($def).map_err(dberr)?;
                    for row in rows.by_ref().take(SCRUB_ROWS_PER_TXN) {
                        let (k, v) = row.map_err(dberr)?;
                        dst.insert(k.value(), v.value()).map_err(dberr)?;
                        copied += 1;
                    }
                }
                txn.commit().map_err(dberr)?;
                if rows.peek().is_none() {
                    break;
                }
            }
            let found = src.len().map_err(dberr)?;
            if copied != found {
                return Err(StoreError::ScrubMismatch { store: store.display().to_string(), table: $def.name().to_owned(), copied, found });
            }
        }};
    }
    copy!(META);
    copy!(KEYRINGS);
    copy!(DATA_KEYS);
    copy!(ISSUED);
    copy!(AUDIT);
    copy!(CHECKPOINTS);
    copy!(RESTORE_TESTS);
    copy!(APPROVALS);
    copy!(DESTRUCTIONS);
    copy!(EXPIRY);
    copy!(KEY_SECRETS);
    copy!(KMIP_OBJECTS);
    // One durable commit makes every commit before it durable, with the allocator state
    // saved (quick repair) as every commit of the store does.
    begin_write(to)?.commit().map_err(dberr)?;
    Ok(())
}
