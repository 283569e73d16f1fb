//! Persistence in a single redb file.
//!
//! All writes go through one writer thread that commits them in groups: every
//! caller waits until its write is in a committed, fsynced transaction
//! (redb `Durability::Immediate`), but concurrent callers share one commit.
//! Reads use their own read transactions and never wait for the writer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

mod audit;
pub use audit::format_millis as format_audit_time;

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
/// Index of data keys by expiry: (expires, key id) for every active key that expires.
const EXPIRY: TableDefinition<ExpiryEntry, ()> = TableDefinition::new("expiry_index");
/// An entry of the expiry index: (expires, key id).
pub type ExpiryEntry = (i64, [u8; 16]);

/// META key of the store format: absent in format 1; 2 since audit records are stored
/// compactly (see [`audit`]). A store of a later format than this is refused.
const FORMAT_META: &str = "store_format";
const FORMAT: u32 = 2;

/// Test-only fault injection: with this variable set to `1` every audit write
/// fails, to prove that requests then fail closed. It changes nothing otherwise.
pub const FAIL_AUDIT_ENV: &str = "KLUIS_TEST_FAIL_AUDIT";

/// Largest number of writes committed in one transaction.
const MAX_BATCH: usize = 4096;

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database error: {0}")]
    Db(#[from] redb::Error),
    #[error("store {path} already exists; refusing to initialise over it")]
    AlreadyExists { path: PathBuf },
    #[error("store {path} does not exist; run `kms-server init` first")]
    NotInitialised { path: PathBuf },
    #[error("store record {what} could not be encoded: {source}")]
    Encode { what: &'static str, source: postcard::Error },
    #[error("store record {what} is corrupt: {source}")]
    Decode { what: &'static str, source: postcard::Error },
    #[error("the store writer has stopped; the server is shutting down or failed")]
    WriterGone,
    #[error("a write in the same group commit failed; nothing of the group was committed")]
    GroupFailed,
    #[error("the audit trail cannot be written (fault injected for a test)")]
    AuditInjected,
    #[error("audit checkpoint could not be encoded: {0}")]
    AuditEncode(#[source] serde_json::Error),
    #[error("audit record {seq} in the store is corrupt: it decodes in no known format")]
    AuditCorrupt { seq: u64 },
    #[error("audit record {seq} has no chain hash; it cannot be stored")]
    AuditUnchained { seq: u64 },
    #[error("audit checkpoint {seq} in the store is corrupt")]
    CheckpointCorrupt { seq: u64 },
    #[error("store {path} has format {found}, newer than this kms-server reads (format {supported}); run the newer version")]
    NewerFormat { path: PathBuf, found: u32, supported: u32 },
    #[error("store {path} has an unreadable format marker")]
    BadFormat { path: PathBuf },
}

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

/// State of one keyring version.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionState {
    Active,
    Retired,
}

/// One keyring version: its key wrapped by the master key.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct VersionRecord {
    pub version: u32,
    pub created: i64,
    pub state: VersionState,
    /// The keyring key wrapped by the master key (AAD binds keyring and version).
    pub wrapped_key: Vec<u8>,
}

/// A keyring as stored.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct KeyringRecord {
    pub name: String,
    pub created: i64,
    pub retention_days: u32,
    pub versions: Vec<VersionRecord>,
    /// Automatic rotation this many days after the current version was made; 0 = none.
    pub rotation_period_days: u32,
    /// A legal hold: nothing of this keyring is destroyed while it is set.
    pub hold: Option<Hold>,
    /// Set when the keyring was destroyed: its version keys are erased, a tombstone stays.
    pub destroyed: Option<i64>,
}

/// A legal hold on a keyring.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub by: String,
    pub since: i64,
    pub reason: String,
}

/// What a destruction destroys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum DestructionTarget {
    Key { id: [u8; 16], keyring: String },
    Keyring { name: String },
}

impl DestructionTarget {
    pub fn keyring(&self) -> &str {
        match self {
            DestructionTarget::Key { keyring, .. } => keyring,
            DestructionTarget::Keyring { name } => name,
        }
    }
}

impl DestructionRecord {
    /// `("key", key id)` or `("keyring", name)`.
    pub fn kind_and_target(&self) -> (&'static str, String) {
        match &self.target {
            DestructionTarget::Key { id, .. } => ("key", hex::encode(id)),
            DestructionTarget::Keyring { name } => ("keyring", name.clone()),
        }
    }

    /// `scheduled`, `held` (scheduled, its keyring under a legal hold), `cancelled` or `destroyed`.
    pub fn state_name(&self, held: bool) -> &'static str {
        match self.state {
            DestructionState::Scheduled if held => "held",
            DestructionState::Scheduled => "scheduled",
            DestructionState::Cancelled { .. } => "cancelled",
            DestructionState::Done { .. } => "destroyed",
        }
    }

    /// `request` or `expiry`.
    pub fn reason_name(&self) -> &'static str {
        match self.reason {
            DestructionReason::Request => "request",
            DestructionReason::Expiry => "expiry",
        }
    }
}

/// Where a destruction stands.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum DestructionState {
    Scheduled,
    Cancelled { by: String, at: i64 },
    Done { at: i64 },
}

/// Why a destruction happens.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestructionReason {
    /// An officer asked for it.
    Request,
    /// The key reached the end of its keyring's retention period.
    Expiry,
}

/// A scheduled or past destruction: the record stays after the key is gone.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct DestructionRecord {
    pub id: u64,
    pub target: DestructionTarget,
    pub requested_by: String,
    pub requested: i64,
    pub due: i64,
    pub state: DestructionState,
    /// The dual-control approval it came from.
    pub approval: Option<u64>,
    pub reason: DestructionReason,
}

/// State of an issued data key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Destroyed { at: i64 },
}

/// The registry record of one issued data key. It holds no key material.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct DataKeyRecord {
    pub keyring: String,
    pub version: u32,
    pub backup_id: String,
    pub labels: Vec<(String, String)>,
    pub created: i64,
    pub expires: Option<i64>,
    pub state: KeyState,
    pub issued_to: String,
    /// Whether a recovery recipient went out with this key (its file has an escrow stanza).
    pub escrowed: bool,
}

/// One durable write.
pub enum WriteOp {
    PutMeta { key: &'static str, value: Vec<u8> },
    PutKeyring(KeyringRecord),
    IssueDataKey { id: [u8; 16], record: DataKeyRecord },
    /// Several writes that must land together or not at all (e.g. master-key migration).
    Atomic(Vec<WriteOp>),
    /// An audit entry; the writer assigns its sequence number and chain hash.
    Audit(AuditEvent),
    /// A restore test result; the writer assigns its id.
    RestoreTest(RestoreTestRecord),
    /// A dual-control approval (new or updated).
    PutApproval(ApprovalRecord),
    /// Replaces the registry record of an issued key (rewrap, destruction); keeps the
    /// expiry index in step (a destroyed key leaves it).
    PutDataKey { id: [u8; 16], record: DataKeyRecord },
    /// A destruction record (new or updated).
    PutDestruction(DestructionRecord),
}

/// A destructive action waiting for (or given) a second officer's approval.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ApprovalRecord {
    pub id: u64,
    pub action: PendingAction,
    pub requested_by: String,
    pub requested: i64,
    pub expires: i64,
    pub approved_by: Option<String>,
    pub approved: Option<i64>,
}

/// The destructive actions that need dual control.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum PendingAction {
    RetireVersions { keyring: String, below: u32 },
    /// Schedule destruction of one data key before its expiry.
    DestroyKey { id: [u8; 16], keyring: String },
    /// Schedule destruction of a keyring.
    DestroyKeyring { keyring: String },
    /// Remove the escrow manifest in force.
    RemoveEscrow,
}

/// The outcome of one restore test (`backup-hook verify`).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct RestoreTestRecord {
    pub time: i64,
    pub keyring: String,
    pub key_id: String,
    pub backup_id: String,
    pub ok: bool,
    pub detail: String,
    pub bytes: u64,
    pub duration_ms: u64,
    pub host: String,
    pub principal: String,
}

/// An audit entry before it is chained.
#[derive(Clone, Debug)]
pub struct AuditEvent {
    pub time: String,
    pub principal: String,
    pub action: String,
    pub keyring: Option<String>,
    pub key_id: Option<String>,
    pub backup_id: Option<String>,
    pub outcome: String,
}

/// The writer's view of the audit chain head, and the key that signs checkpoints.
struct AuditChain {
    next_seq: u64,
    prev: String,
    signer: Arc<std::sync::RwLock<Option<Arc<ring::signature::Ed25519KeyPair>>>>,
    fail: bool,
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

/// Handle to the redb store. Cheap to clone; the last clone dropped stops the
/// writer thread and waits for it, so the file is closed when it returns.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    writer: Arc<Writer>,
    path: PathBuf,
    signer: Arc<std::sync::RwLock<Option<Arc<ring::signature::Ed25519KeyPair>>>>,
}

struct Writer {
    tx: std::sync::Mutex<Option<mpsc::Sender<(WriteOp, Reply)>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Writer {
    fn send(&self, item: (WriteOp, Reply)) -> Result<(), StoreError> {
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

impl Store {
    /// Creates a new store file; fails if one exists.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        if path.exists() {
            return Err(StoreError::AlreadyExists { path: path.to_owned() });
        }
        let db = redb::Builder::new().set_cache_size(STORE_CACHE_BYTES).create(path).map_err(dberr)?;
        // `start` makes the tables and marks the format of an empty file.
        Self::start(db, path)
    }

    /// Opens an existing store file; fails if there is none.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::NotInitialised { path: path.to_owned() });
        }
        let db = redb::Builder::new().set_cache_size(STORE_CACHE_BYTES).open(path).map_err(dberr)?;
        Self::start(db, path)
    }

    fn start(db: Database, path: &Path) -> Result<Self, StoreError> {
        let db = Arc::new(db);
        let (next_seq, prev) = {
            let txn = db.begin_write().map_err(dberr)?;
            let head = {
                let mut meta = txn.open_table(META).map_err(dberr)?;
                let found = match meta.get(FORMAT_META).map_err(dberr)? {
                    None => 1,
                    Some(v) => <[u8; 4]>::try_from(v.value())
                        .map(u32::from_be_bytes)
                        .map_err(|_| StoreError::BadFormat { path: path.to_owned() })?,
                };
                if found > FORMAT {
                    return Err(StoreError::NewerFormat { path: path.to_owned(), found, supported: FORMAT });
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
                let audit = txn.open_table(AUDIT).map_err(dberr)?;
                match audit.last().map_err(dberr)? {
                    Some((k, v)) => (k.value() + 1, audit::hash_of(k.value(), v.value())?),
                    None => (1, kluis_proto::audit::GENESIS.to_owned()),
                }
            };
            txn.commit().map_err(dberr)?;
            head
        };
        let signer = Arc::new(std::sync::RwLock::new(None));
        let mut chain = AuditChain {
            next_seq,
            prev,
            signer: signer.clone(),
            fail: std::env::var(FAIL_AUDIT_ENV).is_ok_and(|v| v == "1"),
        };
        let (tx, rx) = mpsc::channel::<(WriteOp, Reply)>();
        let wdb = db.clone();
        let thread = std::thread::Builder::new()
            .name("kluis-store-writer".into())
            .spawn(move || writer_loop(&wdb, &rx, &mut chain))
            .map_err(|e| tracing::error!(error = %e, "could not start the store writer"))
            .ok();
        let writer = Writer { tx: std::sync::Mutex::new(Some(tx)), thread: std::sync::Mutex::new(thread) };
        Ok(Self { db, writer: Arc::new(writer), path: path.to_owned(), signer })
    }

    /// Sets the key that signs audit checkpoints (the server's audit key).
    pub fn set_audit_signer(&self, key: Arc<ring::signature::Ed25519KeyPair>) {
        if let Ok(mut s) = self.signer.write() {
            *s = Some(key);
        }
    }

    /// Every record of a table keyed by id, oldest first.
    fn read_all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<u64, &[u8]>,
        what: &'static str,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let t = txn.open_table(table).map_err(dberr)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            out.push((k.value(), postcard::from_bytes(v.value()).map_err(|e| StoreError::Decode { what, source: e })?));
        }
        Ok(out)
    }

    /// The record under `id` in a table keyed by id.
    fn read_one<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<u64, &[u8]>,
        id: u64,
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let t = txn.open_table(table).map_err(dberr)?;
        match t.get(id).map_err(dberr)? {
            None => Ok(None),
            Some(v) => Ok(Some(postcard::from_bytes(v.value()).map_err(|e| StoreError::Decode { what, source: e })?)),
        }
    }

    /// One more than the largest id in a table keyed by id (1 for an empty table).
    fn next_id(&self, table: TableDefinition<u64, &[u8]>) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let t = txn.open_table(table).map_err(dberr)?;
        Ok(t.last().map_err(dberr)?.map_or(1, |(k, _)| k.value() + 1))
    }

    /// Every approval, oldest first.
    pub fn approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError> {
        Ok(self.read_all(APPROVALS, "approval")?.into_iter().map(|(_, r)| r).collect())
    }

    pub fn approval(&self, id: u64) -> Result<Option<ApprovalRecord>, StoreError> {
        self.read_one(APPROVALS, id, "approval")
    }

    pub fn next_approval_id(&self) -> Result<u64, StoreError> {
        self.next_id(APPROVALS)
    }

    /// Every destruction record, oldest first.
    pub fn destructions(&self) -> Result<Vec<DestructionRecord>, StoreError> {
        Ok(self.read_all(DESTRUCTIONS, "destruction")?.into_iter().map(|(_, r)| r).collect())
    }

    pub fn destruction(&self, id: u64) -> Result<Option<DestructionRecord>, StoreError> {
        self.read_one(DESTRUCTIONS, id, "destruction")
    }

    pub fn next_destruction_id(&self) -> Result<u64, StoreError> {
        self.next_id(DESTRUCTIONS)
    }

    /// Up to `limit` active keys whose expiry is at or before `now`, earliest first,
    /// starting after the index entry `after`; with the last index entry looked at
    /// (`None` when there was none left). Keys of keyrings for which `skip` is true
    /// (held, destroyed) are passed over.
    #[allow(clippy::type_complexity)]
    pub fn expired_keys(
        &self,
        now: i64,
        after: Option<ExpiryEntry>,
        limit: usize,
        skip: &dyn Fn(&str) -> bool,
    ) -> Result<(Vec<([u8; 16], DataKeyRecord)>, Option<ExpiryEntry>), StoreError> {
        use std::ops::Bound;
        let txn = self.db.begin_read().map_err(dberr)?;
        let idx = txn.open_table(EXPIRY).map_err(dberr)?;
        let keys = txn.open_table(DATA_KEYS).map_err(dberr)?;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut out = Vec::new();
        let mut last = None;
        for row in idx.range((start, Bound::Included((now, [0xff; 16])))).map_err(dberr)? {
            if out.len() >= limit {
                break;
            }
            let (k, _) = row.map_err(dberr)?;
            let (at, id) = k.value();
            last = Some((at, id));
            if let Some(v) = keys.get(id).map_err(dberr)? {
                let rec: DataKeyRecord =
                    postcard::from_bytes(v.value()).map_err(|e| StoreError::Decode { what: "data key", source: e })?;
                if matches!(rec.state, KeyState::Active) && !skip(&rec.keyring) {
                    out.push((id, rec));
                }
            }
        }
        Ok((out, last))
    }

    /// Every restore test, oldest first.
    pub fn restore_tests(&self) -> Result<Vec<(u64, RestoreTestRecord)>, StoreError> {
        self.read_all(RESTORE_TESTS, "restore test")
    }

    /// Visits the audit records with `seq >= from` in order, each with its checkpoint if
    /// one was signed there, in one read transaction, until `f` returns false.
    pub fn for_each_audit(
        &self,
        from: u64,
        mut f: impl FnMut(kluis_proto::audit::AuditRecord, Option<kluis_proto::audit::Checkpoint>) -> bool,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let audit = txn.open_table(AUDIT).map_err(dberr)?;
        let cps = txn.open_table(CHECKPOINTS).map_err(dberr)?;
        // Format 2 records do not store `prev`: it is the stored hash of the record before.
        let mut prev = match from.checked_sub(1).filter(|&p| p > 0) {
            Some(p) => match audit.get(p).map_err(dberr)? {
                Some(v) => audit::hash_of(p, v.value())?,
                None => kluis_proto::audit::GENESIS.to_owned(),
            },
            None => kluis_proto::audit::GENESIS.to_owned(),
        };
        for row in audit.range(from..).map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let seq = k.value();
            let rec = audit::decode(seq, v.value(), &prev)?;
            prev.clone_from(&rec.hash);
            let cp = match cps.get(seq).map_err(dberr)? {
                Some(c) => Some(serde_json::from_slice(c.value()).map_err(|_| StoreError::CheckpointCorrupt { seq })?),
                None => None,
            };
            if !f(rec, cp) {
                break;
            }
        }
        Ok(())
    }

    /// Audit records with `seq >= from`, at most `limit`, in order, with the
    /// checkpoints among them.
    pub fn audit_page(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(kluis_proto::audit::AuditRecord, Option<kluis_proto::audit::Checkpoint>)>, StoreError> {
        let mut out = Vec::new();
        if limit > 0 {
            self.for_each_audit(from, |r, c| {
                out.push((r, c));
                out.len() < limit
            })?;
        }
        Ok(out)
    }

    /// The store file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one operation durably, sharing the commit with concurrent writers.
    pub async fn write(&self, op: WriteOp) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send((op, Reply::Async(tx)))?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// [`write`](Self::write) for synchronous callers (start-up, CLI commands);
    /// safe to call from inside an async runtime.
    pub fn write_blocking(&self, op: WriteOp) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.writer.send((op, Reply::Blocking(tx)))?;
        rx.recv().map_err(|_| StoreError::WriterGone)?
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let t = txn.open_table(META).map_err(dberr)?;
        Ok(t.get(key).map_err(dberr)?.map(|v| v.value().to_vec()))
    }

    pub fn keyrings(&self) -> Result<Vec<KeyringRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let t = txn.open_table(KEYRINGS).map_err(dberr)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(dberr)? {
            let (_, v) = row.map_err(dberr)?;
            out.push(
                postcard::from_bytes(v.value())
                    .map_err(|e| StoreError::Decode { what: "keyring", source: e })?,
            );
        }
        Ok(out)
    }

    pub fn data_key(&self, id: &[u8; 16]) -> Result<Option<DataKeyRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let t = txn.open_table(DATA_KEYS).map_err(dberr)?;
        match t.get(id).map_err(dberr)? {
            None => Ok(None),
            Some(v) => Ok(Some(
                postcard::from_bytes(v.value())
                    .map_err(|e| StoreError::Decode { what: "data key", source: e })?,
            )),
        }
    }

    /// Number of data keys issued from a keyring.
    pub fn issued_count(&self, keyring: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let t = txn.open_table(ISSUED).map_err(dberr)?;
        Ok(t.get(keyring).map_err(dberr)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Visits every data key record (id, record) in key-id order.
    pub fn for_each_data_key(
        &self,
        mut f: impl FnMut(&[u8; 16], &DataKeyRecord),
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let t = txn.open_table(DATA_KEYS).map_err(dberr)?;
        for row in t.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let rec: DataKeyRecord = postcard::from_bytes(v.value())
                .map_err(|e| StoreError::Decode { what: "data key", source: e })?;
            f(&k.value(), &rec);
        }
        Ok(())
    }
}

fn writer_loop(database: &Database, rx: &mpsc::Receiver<(WriteOp, Reply)>, chain: &mut AuditChain) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let (ops, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        match commit_batch(database, ops, chain) {
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
}

fn flatten(ops: Vec<WriteOp>, out: &mut Vec<WriteOp>) {
    for op in ops {
        match op {
            WriteOp::Atomic(inner) => flatten(inner, out),
            other => out.push(other),
        }
    }
}

fn commit_batch(database: &Database, ops: Vec<WriteOp>, chain: &mut AuditChain) -> Result<(), StoreError> {
    // A group commit is one transaction, so an Atomic group inside it is atomic too.
    let mut flat = Vec::with_capacity(ops.len());
    flatten(ops, &mut flat);
    if chain.fail && flat.iter().any(|op| matches!(op, WriteOp::Audit(_))) {
        return Err(StoreError::AuditInjected);
    }
    // The chain head advances only if the transaction commits.
    let (mut next_seq, mut prev) = (chain.next_seq, chain.prev.clone());
    let signer = chain.signer.read().ok().and_then(|s| s.clone());
    let txn = database.begin_write().map_err(dberr)?;
    {
        let mut audit = txn.open_table(AUDIT).map_err(dberr)?;
        let mut checkpoints = txn.open_table(CHECKPOINTS).map_err(dberr)?;
        let mut tests = txn.open_table(RESTORE_TESTS).map_err(dberr)?;
        let mut approvals = txn.open_table(APPROVALS).map_err(dberr)?;
        let mut meta = txn.open_table(META).map_err(dberr)?;
        let mut keyrings = txn.open_table(KEYRINGS).map_err(dberr)?;
        let mut keys = txn.open_table(DATA_KEYS).map_err(dberr)?;
        let mut issued = txn.open_table(ISSUED).map_err(dberr)?;
        let mut destructions = txn.open_table(DESTRUCTIONS).map_err(dberr)?;
        let mut expiry = txn.open_table(EXPIRY).map_err(dberr)?;
        let mut counts: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for op in flat {
            match op {
                WriteOp::PutMeta { key, value } => {
                    meta.insert(key, value.as_slice()).map_err(dberr)?;
                }
                WriteOp::PutKeyring(rec) => {
                    let bytes = postcard::to_allocvec(&rec)
                        .map_err(|e| StoreError::Encode { what: "keyring", source: e })?;
                    keyrings.insert(rec.name.as_str(), bytes.as_slice()).map_err(dberr)?;
                }
                WriteOp::IssueDataKey { id, record } => {
                    let bytes = postcard::to_allocvec(&record)
                        .map_err(|e| StoreError::Encode { what: "data key", source: e })?;
                    keys.insert(id, bytes.as_slice()).map_err(dberr)?;
                    if let Some(at) = record.expires {
                        expiry.insert((at, id), ()).map_err(dberr)?;
                    }
                    *counts.entry(record.keyring).or_default() += 1;
                }
                WriteOp::PutDataKey { id, record } => {
                    let bytes = postcard::to_allocvec(&record)
                        .map_err(|e| StoreError::Encode { what: "data key", source: e })?;
                    keys.insert(id, bytes.as_slice()).map_err(dberr)?;
                    if let (Some(at), KeyState::Destroyed { .. }) = (record.expires, record.state) {
                        expiry.remove((at, id)).map_err(dberr)?;
                    }
                }
                WriteOp::PutDestruction(rec) => {
                    let bytes = postcard::to_allocvec(&rec).map_err(|e| StoreError::Encode { what: "destruction", source: e })?;
                    destructions.insert(rec.id, bytes.as_slice()).map_err(dberr)?;
                }
                WriteOp::Atomic(_) => {}
                WriteOp::PutApproval(rec) => {
                    let bytes = postcard::to_allocvec(&rec).map_err(|e| StoreError::Encode { what: "approval", source: e })?;
                    approvals.insert(rec.id, bytes.as_slice()).map_err(dberr)?;
                }
                WriteOp::RestoreTest(rec) => {
                    let id = tests.last().map_err(dberr)?.map(|(k, _)| k.value() + 1).unwrap_or(1);
                    let bytes = postcard::to_allocvec(&rec).map_err(|e| StoreError::Encode { what: "restore test", source: e })?;
                    tests.insert(id, bytes.as_slice()).map_err(dberr)?;
                }
                WriteOp::Audit(ev) => {
                    let mut rec = kluis_proto::audit::AuditRecord {
                        seq: next_seq,
                        time: ev.time,
                        principal: ev.principal,
                        action: ev.action,
                        keyring: ev.keyring,
                        key_id: ev.key_id,
                        backup_id: ev.backup_id,
                        outcome: ev.outcome,
                        prev: prev.clone(),
                        hash: String::new(),
                    };
                    rec.hash = rec.compute_hash();
                    let bytes = audit::encode(&rec)?;
                    audit.insert(next_seq, bytes.as_slice()).map_err(dberr)?;
                    if let Some(key) = signer.as_ref().filter(|_| next_seq % kluis_proto::audit::CHECKPOINT_EVERY == 0) {
                        let cp = sign_checkpoint(key, next_seq, &rec.hash);
                        let bytes = serde_json::to_vec(&cp).map_err(StoreError::AuditEncode)?;
                        checkpoints.insert(next_seq, bytes.as_slice()).map_err(dberr)?;
                    }
                    prev = rec.hash;
                    next_seq += 1;
                }
            }
        }
        for (ring, n) in counts {
            let cur = issued.get(ring.as_str()).map_err(dberr)?.map(|v| v.value()).unwrap_or(0);
            issued.insert(ring.as_str(), cur + n).map_err(dberr)?;
        }
    }
    txn.commit().map_err(dberr)?;
    chain.next_seq = next_seq;
    chain.prev = prev;
    Ok(())
}

/// Signs `(seq, hash)` with the audit key.
pub fn sign_checkpoint(key: &ring::signature::Ed25519KeyPair, seq: u64, hash: &str) -> kluis_proto::audit::Checkpoint {
    use base64::Engine;
    let sig = key.sign(&kluis_proto::audit::checkpoint_message(seq, hash));
    kluis_proto::audit::Checkpoint {
        seq,
        hash: hash.to_owned(),
        signature: base64::engine::general_purpose::STANDARD.encode(sig.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ring: &str) -> DataKeyRecord {
        DataKeyRecord {
            keyring: ring.into(),
            version: 1,
            backup_id: "b".into(),
            labels: vec![("host".into(), "h1".into())],
            created: 1,
            expires: None,
            state: KeyState::Active,
            issued_to: "sealer".into(),
            escrowed: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_all_durable_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::create(&path).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u8 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut id = [0u8; 16];
                id[0] = i;
                s.write(WriteOp::IssueDataKey { id, record: rec("r") }).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.issued_count("r").unwrap(), 200);
        let mut id = [0u8; 16];
        id[0] = 199;
        assert_eq!(store.data_key(&id).unwrap().unwrap().backup_id, "b");
        assert!(matches!(Store::create(&path), Err(StoreError::AlreadyExists { .. })));
    }

    fn event(principal: &str) -> AuditEvent {
        AuditEvent {
            time: "2026-11-23T03:08:05.123Z".into(),
            principal: principal.into(),
            action: "GenerateDataKey".into(),
            keyring: Some("default".into()),
            key_id: Some("00112233445566778899aabbccddeeff".into()),
            backup_id: Some("b".into()),
            outcome: "ok".into(),
        }
    }

    /// Makes `path` a format 1 store: no format marker, `n` JSON audit records.
    fn make_format_1(path: &Path, n: u64) -> Vec<kluis_proto::audit::AuditRecord> {
        drop(Store::create(path).unwrap());
        let db = Database::open(path).unwrap();
        let txn = db.begin_write().unwrap();
        let mut recs = Vec::new();
        {
            txn.open_table(META).unwrap().remove(FORMAT_META).unwrap();
            let mut t = txn.open_table(AUDIT).unwrap();
            let mut prev = kluis_proto::audit::GENESIS.to_owned();
            for seq in 1..=n {
                let e = event("old-host");
                let mut r = kluis_proto::audit::AuditRecord {
                    seq,
                    time: e.time,
                    principal: e.principal,
                    action: e.action,
                    keyring: e.keyring,
                    key_id: e.key_id,
                    backup_id: e.backup_id,
                    outcome: e.outcome,
                    prev: prev.clone(),
                    hash: String::new(),
                };
                r.hash = r.compute_hash();
                prev.clone_from(&r.hash);
                t.insert(seq, serde_json::to_vec(&r).unwrap().as_slice()).unwrap();
                recs.push(r);
            }
        }
        txn.commit().unwrap();
        recs
    }

    #[test]
    fn a_format_1_store_keeps_its_json_records_and_the_chain_continues_compactly() {
        use kluis_proto::audit::{ExportLine, verify_export};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let old = make_format_1(&path, 3);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get_meta(FORMAT_META).unwrap(), Some(FORMAT.to_be_bytes().to_vec()));
        for _ in 0..3 {
            store.write_blocking(WriteOp::Audit(event("new-host"))).unwrap();
        }
        let page: Vec<_> = store.audit_page(1, 100).unwrap().into_iter().map(|(r, _)| r).collect();
        assert_eq!(page.len(), 6);
        assert_eq!(page[..3], old[..]);
        assert_eq!(page[3].prev, old[2].hash, "the first compact record chains to the last JSON one");
        // Stored: JSON before, compact after.
        {
            let txn = store.db.begin_read().unwrap();
            let t = txn.open_table(AUDIT).unwrap();
            assert_eq!(t.get(3).unwrap().unwrap().value()[0], b'{');
            assert_eq!(t.get(4).unwrap().unwrap().value()[0], 0x02);
            assert!(t.get(4).unwrap().unwrap().value().len() < 120);
        }
        // Pages that start inside either part rebuild the same records.
        assert_eq!(store.audit_page(4, 100).unwrap()[0].0, page[3]);
        assert_eq!(store.audit_page(5, 1).unwrap()[0].0, page[4]);
        // The whole trail verifies as one export, with a head signed as the server does.
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let mut text = String::new();
        for r in &page {
            text += &serde_json::to_string(&ExportLine::Record(r.clone())).unwrap();
            text.push('\n');
        }
        let head = ExportLine::Head { head: sign_checkpoint(&key, 6, &page[5].hash) };
        text += &serde_json::to_string(&head).unwrap();
        use ring::signature::KeyPair;
        let v = verify_export(&text, key.public_key().as_ref()).unwrap();
        assert_eq!((v.first_seq, v.last_seq, v.records), (1, 6, 6));
        // After a restart the chain head is read from a compact record.
        drop(store);
        let store = Store::open(&path).unwrap();
        store.write_blocking(WriteOp::Audit(event("new-host"))).unwrap();
        let seventh = store.audit_page(7, 1).unwrap().remove(0).0;
        assert_eq!(seventh.prev, page[5].hash);
        assert_eq!(seventh.hash, seventh.compute_hash());
    }

    #[test]
    fn a_store_of_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(Store::create(&path).unwrap());
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(FORMAT_META, 3u32.to_be_bytes().as_slice()).unwrap();
            txn.commit().unwrap();
        }
        match Store::open(&path) {
            Err(e @ StoreError::NewerFormat { found: 3, supported: 2, .. }) => {
                assert!(e.to_string().contains("has format 3, newer than this kms-server reads"), "{e}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a format 3 store was opened"),
        }
    }

    #[test]
    fn registry_record_is_small() {
        let bytes = postcard::to_allocvec(&rec("ehr-db")).unwrap();
        assert!(bytes.len() < 64, "{}", bytes.len());
    }
}
