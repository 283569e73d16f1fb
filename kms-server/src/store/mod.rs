//! Persistence: the [`Store`] trait and its embedded implementation ([`redb`]).
//!
//! The store persists bytes. It knows its tables and how their keys sort, not what a
//! keyring or a data key is for: the layers above encode their records (see
//! `keys::registry`) and the audit layer links its entries (see [`Chain`]).
//!
//! The contract every implementation keeps:
//! - [`Store::commit`] applies one [`WriteGroup`] atomically (all of it or none of it) and
//!   returns only once the group is durable (fsynced, or committed by a database that
//!   promises as much). How it gets there (one transaction per call, or concurrent calls
//!   sharing one commit) is the implementation's business.
//! - [`Op::Append`] entries are numbered 1, 2, 3, ... without gaps in commit order, and
//!   each is linked by the [`Chain`] given at open, inside the same transaction, to the
//!   entry before it; the chain head advances only when the group commits.
//! - Reads see committed data only, and never wait for a commit in progress.
//! - Keys sort as bytes; every table's key layout is given on [`Table`].

use std::future::Future;
use zeroize::Zeroizing;
use std::ops::Bound;
use std::pin::Pin;

pub mod postgres;
pub mod redb;

/// The tables, with the layout of their keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// Named singletons (master check, audit key, escrow, grants, ...); key: UTF-8 name.
    Meta,
    /// Key: keyring name (UTF-8).
    Keyrings,
    /// The registry of issued data keys; key: the 16-byte key id.
    DataKeys,
    /// Counters per keyring; key: keyring name (UTF-8); value: u64 big-endian.
    Issued,
    /// The linked log ([`Op::Append`]); key: sequence number, u64 big-endian.
    Audit,
    /// Side records of the log (signed checkpoints); key: sequence number, u64 big-endian.
    Checkpoints,
    /// Key: id, u64 big-endian ([`Op::Insert`] numbers them).
    RestoreTests,
    /// Key: id, u64 big-endian.
    Approvals,
    /// Key: id, u64 big-endian.
    Destructions,
    /// An index; key: [`expiry_key`] (time, then key id); value: empty.
    Expiry,
    /// Per-key secrets the data keys are derived with; key: the 16-byte key id; value:
    /// 32 bytes, written only with [`Op::PutSecret`]. Deleting a row is what destroys a
    /// key; [`Store::scrub`] then removes its bytes from the medium.
    KeySecrets,
    /// KMIP managed objects (their attributes and their key material sealed under a
    /// per-object key; the KMIP layer encodes the value); key: the 16-byte object id;
    /// value: at most [`KMIP_OBJECT_MAX`] bytes. Holds sealed key material, so
    /// [`Store::scrub`] removes the bytes of deleted and overwritten rows too.
    KmipObjects,
}

/// The largest value of a [`Table::KmipObjects`] row, in bytes (64 KiB).
pub const KMIP_OBJECT_MAX: usize = 64 << 10;

impl Table {
    /// The largest value a row of this table may hold, if the table bounds it.
    pub fn max_value(self) -> Option<usize> {
        match self {
            Table::KmipObjects => Some(KMIP_OBJECT_MAX),
            _ => None,
        }
    }
}

/// One write of a group. No `Debug`: a group may carry secret bytes.
pub enum Op {
    Put { table: Table, key: Vec<u8>, value: Vec<u8> },
    /// A put of secret bytes: zeroized when the group is dropped.
    PutSecret { table: Table, key: Vec<u8>, value: Zeroizing<Vec<u8>> },
    Delete { table: Table, key: Vec<u8> },
    /// Adds `by` to the u64 counter under `key` (absent counts as 0).
    Increment { table: Table, key: Vec<u8>, by: u64 },
    /// Puts `value` under the next id of `table` (one more than its largest; 1 if empty).
    Insert { table: Table, value: Vec<u8> },
    /// Appends one entry to the linked log (see [`Chain`]).
    Append { entry: Vec<u8> },
    /// The row under `key` holds `value` (None: there is none) when the group commits, or
    /// the group fails with [`StoreError::Conflict`] and writes nothing: a compare-and-set
    /// across every process that writes the store. Checked in the order of the ops, after
    /// the group's earlier writes; every group with an `Expect` is serialised with every
    /// other such group (PostgreSQL: a transaction-level advisory lock taken first).
    Expect { table: Table, key: Vec<u8>, value: Option<Vec<u8>> },
    /// A row copied as it is from another store (`kms-server migrate-store`), into any
    /// table: the log's entries and checkpoints keep their numbers and bytes, counters their
    /// value (u64 big-endian), secrets their 32 bytes. Entries of [`Table::Audit`] must come
    /// in order, each numbered one more than the log's last (else [`StoreError::ImportOrder`]);
    /// the log head then follows them ([`Chain::head_of`]), so appends continue the chain.
    /// Zeroizes its value when dropped (it may be a secret).
    Import { table: Table, key: Vec<u8>, value: Zeroizing<Vec<u8>> },
}

/// Every table, in the order `migrate-store` copies them.
pub const ALL_TABLES: [Table; 12] = [
    Table::Meta,
    Table::Keyrings,
    Table::DataKeys,
    Table::Issued,
    Table::Audit,
    Table::Checkpoints,
    Table::RestoreTests,
    Table::Approvals,
    Table::Destructions,
    Table::Expiry,
    Table::KeySecrets,
    Table::KmipObjects,
];

/// Writes that land together or not at all.
#[derive(Default)]
pub struct WriteGroup {
    pub ops: Vec<Op>,
}

impl WriteGroup {
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Whether the group appends to the log.
    pub fn appends(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::Append { .. }))
    }

    /// Whether the group has an [`Op::Expect`].
    pub fn expects(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::Expect { .. }))
    }

    /// Refuses the group if it writes a value larger than its table takes
    /// ([`Table::max_value`]): every store checks this before it writes anything of the group.
    pub fn check_sizes(&self) -> Result<(), StoreError> {
        for op in &self.ops {
            let (table, len) = match op {
                Op::Put { table, value, .. } | Op::Insert { table, value } => (*table, value.len()),
                Op::PutSecret { table, value, .. } | Op::Import { table, value, .. } => (*table, value.len()),
                Op::Delete { .. } | Op::Increment { .. } | Op::Append { .. } | Op::Expect { .. } => continue,
            };
            if let Some(max) = table.max_value()
                && len > max
            {
                return Err(StoreError::ValueTooLarge { table, len, max });
            }
        }
        Ok(())
    }
}

/// The value that links a log entry to the next one (a hash, for the audit chain).
pub type ChainHead = String;

/// An entry as the chain links it.
pub struct Linked {
    /// What is stored under the entry's sequence number in [`Table::Audit`].
    pub stored: Vec<u8>,
    /// The head after this entry.
    pub head: ChainHead,
    /// A side record stored under the same number in [`Table::Checkpoints`].
    pub checkpoint: Option<Vec<u8>>,
    /// Given to [`Chain::committed`] once the transaction that holds the entry commits
    /// (never if it does not).
    pub on_commit: Option<String>,
}

/// Error of a [`Chain`]: the group that needed it is not committed.
pub type ChainError = Box<dyn std::error::Error + Send + Sync>;

/// Links log entries; implemented by the audit layer, called by the store inside the
/// transaction that appends, in sequence order.
///
/// The chain keeps no state of its own about the log: several processes may append to
/// one store (replicas on one database), each linking the entries its transactions
/// number. What a link needs besides its predecessor's head, the store reads in the same
/// transaction ([`Chain::base_of`]).
pub trait Chain: Send + Sync {
    /// The head before the first entry.
    fn genesis(&self) -> ChainHead;
    /// The head after the stored entry `seq` (to resume after a restart).
    fn head_of(&self, seq: u64, stored: &[u8]) -> Result<ChainHead, ChainError>;
    /// The earlier entry whose head linking entry `seq` also needs (for the audit chain:
    /// the previous checkpoint's, at a checkpoint), if any; 0 means the genesis head.
    fn base_of(&self, _seq: u64) -> Option<u64> {
        None
    }
    /// Links `entry` as number `seq` after `prev`; `base` is the head after entry
    /// [`base_of(seq)`](Self::base_of) as the store holds it (None: asked for, not found).
    fn link(&self, seq: u64, prev: &ChainHead, entry: &[u8], base: Option<&ChainHead>) -> Result<Linked, ChainError>;
    /// The transaction that linked entries committed: their [`Linked::on_commit`], in order.
    fn committed(&self, _on_commit: Vec<String>) {}
}

/// The head after entry `seq`, for [`Chain::base_of`]: the genesis head for 0, one linked
/// earlier in the same transaction (`linked`, in order), else the stored entry as `read`
/// gives it (None if it is not there).
pub fn base_head(
    chain: &dyn Chain,
    seq: u64,
    linked: &[(u64, ChainHead)],
    read: impl FnOnce(u64) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<Option<ChainHead>, StoreError> {
    if seq == 0 {
        return Ok(Some(chain.genesis()));
    }
    if let Some((_, h)) = linked.iter().rev().find(|(s, _)| *s == seq) {
        return Ok(Some(h.clone()));
    }
    match read(seq)? {
        Some(stored) => chain.head_of(seq, &stored).map(Some).map_err(|source| StoreError::Resume { seq, source }),
        None => Ok(None),
    }
}

/// A future returned by the store (boxed, so the trait stays object safe).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A key range of one table, as bounds on the key bytes.
pub type KeyRange<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// A row: its key and its value.
pub type Row = (Vec<u8>, Vec<u8>);

/// What a scan's visitor says after each row.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError> + 'a;

/// Persistence: atomic, durable write groups; reads by key and by range.
pub trait Store: Send + Sync {
    /// What this store is, for messages (e.g. the file's path).
    fn describe(&self) -> String;

    /// Whether no other process can write the store while this one has it open (redb:
    /// the file is locked by the process that opened it). The maintenance lease
    /// (`keys::lease`) is then this process's at once, whoever held it before.
    fn exclusive(&self) -> bool;

    /// Commits `group` atomically and durably (see the module docs).
    fn commit(&self, group: WriteGroup) -> StoreFuture<'_, ()>;

    /// [`commit`](Self::commit) for synchronous callers (start-up, offline commands);
    /// safe to call from inside an async runtime's blocking context.
    fn commit_blocking(&self, group: WriteGroup) -> Result<(), StoreError>;

    /// The value under `key`.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Visits the rows of `range` in key order, in one consistent read, until `visit`
    /// returns false.
    fn scan(&self, table: Table, range: KeyRange<'_>, visit: &mut Visit<'_>) -> Result<(), StoreError>;

    /// The row with the largest key.
    fn last(&self, table: Table) -> Result<Option<Row>, StoreError>;

    /// Removes the bytes of deleted and overwritten rows from the medium, so that a copy
    /// of the store taken afterwards holds only live rows (destroyed key secrets, erased
    /// keyring keys). Ordered after every commit acknowledged before the call; commits
    /// wait while it runs. What "the medium" means is the implementation's: the live
    /// file (redb), the table's heap (a database).
    fn scrub(&self) -> StoreFuture<'_, ScrubReport>;

    /// Whether the store answers now (for the health service): an embedded store that
    /// opened does; a database is asked, within a bounded time.
    fn health(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// What a [`Store::scrub`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// The store's size before and after, in bytes.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// How long commits waited, in milliseconds.
    pub millis: u64,
}

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("store {store} already exists; refusing to initialise over it")]
    AlreadyExists { store: String },
    #[error("the store {store} is in use by another process (Database already open): stop kms-server first")]
    Locked { store: String },
    #[error("store {store} does not exist; run `kms-server init` first")]
    NotInitialised { store: String },
    #[error("store record {what} could not be encoded: {source}")]
    Encode { what: &'static str, source: postcard::Error },
    #[error("store record {what} is corrupt: {source}")]
    Decode { what: &'static str, source: postcard::Error },
    #[error("store key of table {table:?} is malformed")]
    BadKey { table: Table },
    #[error("the store writer has stopped; the server is shutting down or failed")]
    WriterGone,
    #[error("a write in the same group commit failed; nothing of the group was committed")]
    GroupFailed,
    #[error("the audit chain could not link entry {seq}: {source}")]
    Link { seq: u64, source: ChainError },
    #[error("the audit chain could not resume after entry {seq}: {source}")]
    Resume { seq: u64, source: ChainError },
    #[error("{table:?} cannot take this operation")]
    WrongTable { table: Table },
    #[error("a value of {len} bytes is too large for {table:?} (at most {max} bytes); nothing of the group was written")]
    ValueTooLarge { table: Table, len: usize, max: usize },
    #[error("store {store} has format {found}, newer than this kms-server reads (format {supported}); run the newer version")]
    NewerFormat { store: String, found: u32, supported: u32 },
    #[error("store {store} has an unreadable format marker")]
    BadFormat { store: String },
    #[error(
        "store {store}: upgrading its schema from format {found} to {supported} failed (the role must be allowed \
         to create tables in the schema, as the one that ran `kms-server init` is): {reason}",
        reason = postgres::pg_reason(.source)
    )]
    SchemaUpgrade { store: String, found: u32, supported: u32, source: tokio_postgres::Error },
    #[error("store url is not a libpq connection string or URL: {reason}", reason = postgres::pg_reason(.source))]
    BadUrl { source: tokio_postgres::Error },
    #[error("store url carries a password; put it in [store] password_file instead")]
    UrlPassword,
    #[error("store {store}: PostgreSQL cannot be reached: {reason}", reason = postgres::pg_reason(.source))]
    Unreachable { store: String, source: tokio_postgres::Error },
    #[error("store {store}: PostgreSQL refused the login of user {user}: {reason}", reason = postgres::pg_reason(.source))]
    AuthFailed { store: String, user: String, source: tokio_postgres::Error },
    #[error("store {store}: {reason}", reason = postgres::pg_reason(.source))]
    Pg { store: String, source: tokio_postgres::Error },
    #[error("store {store}: the connection to PostgreSQL was lost during the commit; retry (the writes of this request were not acknowledged)")]
    ConnectionLost { store: String },
    #[error("store {store}: PostgreSQL did not answer within {secs} s")]
    TimedOut { store: String, secs: u64 },
    #[error("another replica changed {what} at the same moment; nothing was done: run it again")]
    Conflict { what: String },
    #[error("imported audit entry {seq} does not follow the log's last entry (the next is {next})")]
    ImportOrder { seq: u64, next: u64 },
    #[error("store CA file {path}: {source}")]
    CaFile { path: String, source: std::io::Error },
    #[error("[store] url says sslmode=disable, but [store] ca_file asks for TLS; remove one of them")]
    TlsDisabled,
    #[error("cannot start the store's runtime: {source}")]
    Runtime { source: std::io::Error },
    #[error("scrubbing store {store} failed at {step} ({path}); the store is unchanged: {source}")]
    Scrub { store: String, step: &'static str, path: String, source: std::io::Error },
    #[error("scrubbing store {store} refused: it holds table {table:?}, which this kms-server does not know; nothing was changed")]
    ScrubUnknownTable { store: String, table: String },
    #[error("scrubbing store {store} refused: the copy of table {table} has {copied} rows, the store {found}; nothing was changed")]
    ScrubMismatch { store: String, table: String, copied: u64, found: u64 },
}

impl StoreError {
    /// Whether the store cannot be reached now, so that the same request may succeed
    /// later or on another replica (the database down, restarting or failing over, a
    /// connection lost, the writer stopped), as opposed to a write refused or a record
    /// that does not read.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unreachable { .. } | StoreError::WriterGone | StoreError::ConnectionLost { .. } | StoreError::TimedOut { .. } => true,
            StoreError::Pg { source, .. } | StoreError::SchemaUpgrade { source, .. } => postgres::connection_lost(source),
            _ => false,
        }
    }
}

/// What an [`Op::Expect`] that failed was about, for [`StoreError::Conflict`].
pub fn expect_what(table: Table, key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(k) if matches!(table, Table::Meta | Table::Keyrings) => format!("{table:?} {k:?}"),
        _ => format!("{table:?} {}", key.iter().map(|b| format!("{b:02x}")).collect::<String>()),
    }
}

/// The key of an id-keyed table.
pub fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// The id of an id-keyed table's key.
pub fn key_id(table: Table, key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key).map(u64::from_be_bytes).map_err(|_| StoreError::BadKey { table })
}

/// An expiry index key: the time (i64, sign bit flipped, big-endian: sorts as a number)
/// and the 16-byte key id.
pub fn expiry_key(at: i64, id: &[u8; 16]) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&((at as u64) ^ (1 << 63)).to_be_bytes());
    k[8..].copy_from_slice(id);
    k
}

/// The (time, key id) of an expiry index key.
pub fn parse_expiry_key(key: &[u8]) -> Result<(i64, [u8; 16]), StoreError> {
    let bad = || StoreError::BadKey { table: Table::Expiry };
    if key.len() != 24 {
        return Err(bad());
    }
    let t = u64::from_be_bytes(key[..8].try_into().map_err(|_| bad())?) ^ (1 << 63);
    Ok((t as i64, key[8..].try_into().map_err(|_| bad())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_keys_sort_as_times() {
        let id = [7u8; 16];
        let times = [i64::MIN, -86_400, -1, 0, 1, 1_700_000_000, i64::MAX];
        for w in times.windows(2) {
            assert!(expiry_key(w[0], &id) < expiry_key(w[1], &id), "{} < {}", w[0], w[1]);
        }
        for t in times {
            assert_eq!(parse_expiry_key(&expiry_key(t, &id)).unwrap(), (t, id));
        }
        assert!(parse_expiry_key(&[0; 23]).is_err());
    }
}
