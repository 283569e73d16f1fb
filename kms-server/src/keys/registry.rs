//! The key layer's records over the byte store: how each record is encoded, which
//! table and key it lives under, and which index entries go with it.

use std::ops::Bound;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::audit::{AuditError, AuditEvent};
use crate::model::{ApprovalRecord, DataKeyRecord, DestructionRecord, KeyState, KeyringRecord, RestoreTestRecord};
use crate::secret::Key256;
use crate::store::{Op, ScrubReport, Store, StoreError, Table, WriteGroup, expiry_key, id_key, key_id, parse_expiry_key};

/// META key set by every write that erases key material (a destroyed data key's secret,
/// a destroyed keyring's keys) and cleared by the scrub that removed its bytes: a scrub
/// cut off by a crash is done again after the restart.
pub const SCRUB_PENDING_META: &str = "scrub_pending";

/// An entry of the expiry index: (expires, key id).
pub type ExpiryEntry = (i64, [u8; 16]);

/// One durable write of the key layer.
pub enum WriteOp {
    PutMeta { key: &'static str, value: Vec<u8> },
    PutKeyring(KeyringRecord),
    /// A newly issued key: its record, its expiry index entry, its keyring's count, and
    /// the secret its data key is derived with (none for a format 1 key).
    IssueDataKey { id: [u8; 16], record: DataKeyRecord, secret: Option<Key256> },
    /// Several writes that must land together or not at all.
    Atomic(Vec<WriteOp>),
    /// An audit entry; the store numbers and the audit chain links it.
    Audit(AuditEvent),
    /// A restore test result; the store numbers it.
    RestoreTest(RestoreTestRecord),
    /// A dual-control approval (new or updated).
    PutApproval(ApprovalRecord),
    /// Replaces the registry record of an issued key (rewrap, destruction); keeps the
    /// expiry index in step (a destroyed key leaves it), and a destroyed key's secret
    /// is deleted with it.
    PutDataKey { id: [u8; 16], record: DataKeyRecord },
    /// A destruction record (new or updated).
    PutDestruction(DestructionRecord),
    /// A new destruction record: fails ([`StoreError::Conflict`]) if its id was taken
    /// meanwhile (by another replica).
    NewDestruction(DestructionRecord),
    /// The meta row `key` holds `value` (None: there is none) when the group commits, or
    /// the group fails ([`StoreError::Conflict`]) and writes nothing: how the scheduled
    /// work's writes are fenced by the maintenance lease (`keys::lease`).
    ExpectMeta { key: &'static str, value: Option<Vec<u8>> },
    /// A KMIP managed object, new (`previous` None) or changed: then `previous` is what the
    /// row must hold when the group commits, or the group fails ([`StoreError::Conflict`]), so
    /// a change made on another replica meanwhile is never overwritten. A new object is not
    /// compared: its id is 16 fresh random bytes, and a group with an `Expect` would not share
    /// a commit with others (a Create would cost one fsync of its own).
    PutKmipObject { id: [u8; 16], object: Box<super::kmip::KmipObject>, previous: Option<Box<super::kmip::KmipObject>> },
    /// No data key and no KMIP object with this id exists when the group commits, or the
    /// group fails ([`StoreError::Conflict`]): a key issued with a given id (a KMIP import)
    /// never replaces one, even made on another replica meanwhile.
    ExpectNoKey { id: [u8; 16] },
}

/// Errors of encoding a write.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("the system random number generator failed (state epoch)")]
    Rng,
}

/// A random value that changes with every write of what a replica keeps in memory
/// (keyrings, the master generation, the escrow, runtime grants, destructions an officer
/// scheduled or cancelled) and of approvals: replicas on one store compare it to the value
/// they loaded and reload when it differs (`KeyManager::sync`), and each such write expects
/// the value its state was loaded at (compare-and-set: `Registry::tracking_epoch`).
pub const STATE_EPOCH_META: &str = "state_epoch";

/// Whether `op` changes what replicas keep in memory (see [`STATE_EPOCH_META`]). Expiry
/// destructions do not: they are per key, read from the store at each unwrap, and a sweep
/// writes them by the thousand.
fn changes_state(op: &WriteOp) -> bool {
    match op {
        WriteOp::PutKeyring(_) => true,
        WriteOp::PutMeta { key, .. } => [super::ESCROW_META, super::GRANTS_META, super::MASTER_GENERATION_META].contains(key),
        WriteOp::PutDestruction(d) | WriteOp::NewDestruction(d) => d.reason == crate::model::DestructionReason::Request,
        // Not in memory, but compared and set with it: two replicas approving one request,
        // or numbering two new ones alike, cannot both succeed.
        WriteOp::PutApproval(_) => true,
        WriteOp::Atomic(ops) => ops.iter().any(changes_state),
        WriteOp::IssueDataKey { .. }
        | WriteOp::Audit(_)
        | WriteOp::RestoreTest(_)
        | WriteOp::PutDataKey { .. }
        | WriteOp::PutKmipObject { .. }
        | WriteOp::ExpectMeta { .. }
        | WriteOp::ExpectNoKey { .. } => false,
    }
}

fn enc<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(v).map_err(|e| StoreError::Encode { what, source: e })
}

fn dec<T: DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| StoreError::Decode { what, source: e })
}

fn lower(op: WriteOp, g: &mut WriteGroup) -> Result<(), RegistryError> {
    match op {
        WriteOp::PutMeta { key, value } => g.push(Op::Put { table: Table::Meta, key: key.as_bytes().to_vec(), value }),
        WriteOp::PutKeyring(rec) => {
            if rec.destroyed.is_some() {
                g.push(scrub_pending());
            }
            g.push(Op::Put { table: Table::Keyrings, key: rec.name.as_bytes().to_vec(), value: enc("keyring", &rec)? })
        }
        WriteOp::IssueDataKey { id, record, secret } => {
            if let Some(secret) = secret {
                let value = zeroize::Zeroizing::new(secret.expose().to_vec());
                g.push(Op::PutSecret { table: Table::KeySecrets, key: id.to_vec(), value });
            }
            if let Some(at) = record.expires {
                g.push(Op::Put { table: Table::Expiry, key: expiry_key(at, &id).to_vec(), value: Vec::new() });
            }
            g.push(Op::Increment { table: Table::Issued, key: record.keyring.as_bytes().to_vec(), by: 1 });
            g.push(Op::Put { table: Table::DataKeys, key: id.to_vec(), value: enc("data key", &record)? });
        }
        WriteOp::PutDataKey { id, record } => {
            if let KeyState::Destroyed { .. } = record.state {
                if let Some(at) = record.expires {
                    g.push(Op::Delete { table: Table::Expiry, key: expiry_key(at, &id).to_vec() });
                }
                g.push(Op::Delete { table: Table::KeySecrets, key: id.to_vec() });
                g.push(scrub_pending());
            }
            g.push(Op::Put { table: Table::DataKeys, key: id.to_vec(), value: enc("data key", &record)? });
        }
        WriteOp::Atomic(inner) => {
            for op in inner {
                lower(op, g)?;
            }
        }
        WriteOp::Audit(ev) => g.push(Op::Append { entry: ev.encode()? }),
        WriteOp::RestoreTest(rec) => g.push(Op::Insert { table: Table::RestoreTests, value: enc("restore test", &rec)? }),
        WriteOp::PutApproval(rec) => {
            g.push(Op::Put { table: Table::Approvals, key: id_key(rec.id).to_vec(), value: enc("approval", &rec)? })
        }
        WriteOp::PutDestruction(rec) => {
            g.push(Op::Put { table: Table::Destructions, key: id_key(rec.id).to_vec(), value: enc("destruction", &rec)? })
        }
        WriteOp::ExpectMeta { key, value } => g.push(Op::Expect { table: Table::Meta, key: key.as_bytes().to_vec(), value }),
        WriteOp::ExpectNoKey { id } => {
            g.push(Op::Expect { table: Table::DataKeys, key: id.to_vec(), value: None });
            g.push(Op::Expect { table: Table::KmipObjects, key: id.to_vec(), value: None });
        }
        WriteOp::PutKmipObject { id, object, previous } => {
            if let Some(p) = previous {
                g.push(Op::Expect { table: Table::KmipObjects, key: id.to_vec(), value: Some(enc("KMIP object", &*p)?) });
            }
            g.push(Op::Put { table: Table::KmipObjects, key: id.to_vec(), value: enc("KMIP object", &*object)? })
        }
        WriteOp::NewDestruction(rec) => {
            g.push(Op::Expect { table: Table::Destructions, key: id_key(rec.id).to_vec(), value: None });
            g.push(Op::Put { table: Table::Destructions, key: id_key(rec.id).to_vec(), value: enc("destruction", &rec)? })
        }
    }
    Ok(())
}

fn scrub_pending() -> Op {
    Op::Put { table: Table::Meta, key: SCRUB_PENDING_META.as_bytes().to_vec(), value: vec![1] }
}

fn group_of(op: Op) -> WriteGroup {
    let mut g = WriteGroup::default();
    g.push(op);
    g
}

/// The state epoch a process loaded its state at, shared by the clones of one [`Registry`].
type Epoch = Arc<std::sync::Mutex<Option<Vec<u8>>>>;

/// Typed reads and writes of the key layer's records.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    /// Set by [`tracking_epoch`](Self::tracking_epoch) (the key manager): a write that
    /// changes the state then expects the epoch the state was loaded at, so a change made
    /// on a stale state fails ([`StoreError::Conflict`]) instead of overwriting another
    /// replica's. Offline commands leave it unset: they write a new epoch, expecting none.
    epoch: Option<Epoch>,
}

impl Registry {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, epoch: None }
    }

    /// This registry's state-changing writes compare and set the state epoch, starting
    /// from `loaded`.
    pub fn tracking_epoch(mut self, loaded: Option<Vec<u8>>) -> Self {
        self.epoch = Some(Arc::new(std::sync::Mutex::new(loaded)));
        self
    }

    /// The state epoch the state in force was loaded at (None when not tracking, or none was stored).
    pub fn loaded_epoch(&self) -> Option<Vec<u8>> {
        self.epoch.as_ref().and_then(|e| e.lock().ok().and_then(|e| e.clone()))
    }

    /// Records that the state in force is the store's at `epoch` (after a reload).
    pub fn set_loaded_epoch(&self, epoch: Option<Vec<u8>>) {
        if let Some(e) = &self.epoch
            && let Ok(mut e) = e.lock()
        {
            *e = epoch;
        }
    }

    /// The group of `op`, and the new state epoch it sets if it changes the state.
    fn group(&self, op: WriteOp) -> Result<(WriteGroup, Option<Vec<u8>>), RegistryError> {
        let mut g = WriteGroup::default();
        let epoch = changes_state(&op);
        if epoch && self.epoch.is_some() {
            // First in the group: checked before anything of it is written.
            g.push(Op::Expect { table: Table::Meta, key: STATE_EPOCH_META.as_bytes().to_vec(), value: self.loaded_epoch() });
        }
        lower(op, &mut g)?;
        if !epoch {
            return Ok((g, None));
        }
        let value: [u8; 16] = ring::rand::generate(&ring::rand::SystemRandom::new()).map_err(|_| RegistryError::Rng)?.expose();
        g.push(Op::Put { table: Table::Meta, key: STATE_EPOCH_META.as_bytes().to_vec(), value: value.to_vec() });
        Ok((g, Some(value.to_vec())))
    }

    /// The store underneath (for the audit reader).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The store underneath, shared (for the health probe).
    pub fn shared(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// Writes durably, sharing the commit with concurrent writers. A write that changes
    /// the state (see [`STATE_EPOCH_META`]) is made with the admin lock held, and the
    /// caller publishes the state it makes: so the state in force is then the store's at
    /// the new epoch.
    pub async fn write(&self, op: WriteOp) -> Result<(), RegistryError> {
        let (g, epoch) = self.group(op)?;
        self.store.commit(g).await?;
        if epoch.is_some() {
            self.set_loaded_epoch(epoch);
        }
        Ok(())
    }

    /// [`write`](Self::write) for synchronous callers.
    pub fn write_blocking(&self, op: WriteOp) -> Result<(), RegistryError> {
        let (g, epoch) = self.group(op)?;
        self.store.commit_blocking(g)?;
        if epoch.is_some() {
            self.set_loaded_epoch(epoch);
        }
        Ok(())
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(Table::Meta, key.as_bytes())
    }

    fn all<T: DeserializeOwned>(&self, table: Table, what: &'static str) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        self.store.scan(table, (Bound::Unbounded, Bound::Unbounded), &mut |_, v| {
            out.push(dec(what, v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    fn one<T: DeserializeOwned>(&self, table: Table, key: &[u8], what: &'static str) -> Result<Option<T>, StoreError> {
        self.store.get(table, key)?.map(|v| dec(what, &v)).transpose()
    }

    /// One more than the largest id in a table keyed by id (1 for an empty table).
    fn next_id(&self, table: Table) -> Result<u64, StoreError> {
        Ok(match self.store.last(table)? {
            Some((k, _)) => key_id(table, &k)? + 1,
            None => 1,
        })
    }

    pub fn keyrings(&self) -> Result<Vec<KeyringRecord>, StoreError> {
        self.all(Table::Keyrings, "keyring")
    }

    pub fn data_key(&self, id: &[u8; 16]) -> Result<Option<DataKeyRecord>, StoreError> {
        self.one(Table::DataKeys, id, "data key")
    }

    /// The secret a format 2 data key is derived with; none once the key is destroyed.
    pub fn key_secret(&self, id: &[u8; 16]) -> Result<Option<Key256>, StoreError> {
        let Some(bytes) = self.store.get(Table::KeySecrets, id)?.map(zeroize::Zeroizing::new) else {
            return Ok(None);
        };
        Key256::from_slice(&bytes).map(Some).ok_or(StoreError::BadKey { table: Table::KeySecrets })
    }

    /// A KMIP managed object.
    pub fn kmip_object(&self, id: &[u8; 16]) -> Result<Option<super::kmip::KmipObject>, StoreError> {
        self.one(Table::KmipObjects, id, "KMIP object")
    }

    /// Visits KMIP objects in id order until `f` returns false.
    pub fn for_each_kmip_object(&self, mut f: impl FnMut(&[u8; 16], super::kmip::KmipObject) -> bool) -> Result<(), StoreError> {
        self.store.scan(Table::KmipObjects, (Bound::Unbounded, Bound::Unbounded), &mut |k, v| {
            let id: [u8; 16] = k.try_into().map_err(|_| StoreError::BadKey { table: Table::KmipObjects })?;
            Ok(f(&id, dec("KMIP object", v)?))
        })
    }

    /// Whether key material was erased since the last scrub.
    pub fn scrub_pending(&self) -> Result<bool, StoreError> {
        Ok(self.get_meta(SCRUB_PENDING_META)?.is_some())
    }

    /// Scrubs the store, then clears the pending mark. The caller keeps erasures out
    /// meanwhile (the admin lock), so the mark is never cleared over a newer one.
    pub async fn scrub(&self) -> Result<ScrubReport, StoreError> {
        let report = self.store.scrub().await?;
        self.store.commit(group_of(Op::Delete { table: Table::Meta, key: SCRUB_PENDING_META.as_bytes().to_vec() })).await?;
        Ok(report)
    }

    /// Number of data keys issued from a keyring.
    pub fn issued_count(&self, keyring: &str) -> Result<u64, StoreError> {
        match self.store.get(Table::Issued, keyring.as_bytes())? {
            Some(v) => <[u8; 8]>::try_from(v.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::BadKey { table: Table::Issued }),
            None => Ok(0),
        }
    }

    /// Visits every data key record (id, record) in key-id order.
    pub fn for_each_data_key(&self, mut f: impl FnMut(&[u8; 16], &DataKeyRecord)) -> Result<(), StoreError> {
        self.store.scan(Table::DataKeys, (Bound::Unbounded, Bound::Unbounded), &mut |k, v| {
            let id: [u8; 16] = k.try_into().map_err(|_| StoreError::BadKey { table: Table::DataKeys })?;
            f(&id, &dec("data key", v)?);
            Ok(true)
        })
    }

    /// Every approval, oldest first.
    pub fn approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError> {
        self.all(Table::Approvals, "approval")
    }

    pub fn approval(&self, id: u64) -> Result<Option<ApprovalRecord>, StoreError> {
        self.one(Table::Approvals, &id_key(id), "approval")
    }

    pub fn next_approval_id(&self) -> Result<u64, StoreError> {
        self.next_id(Table::Approvals)
    }

    /// Every destruction record, oldest first.
    pub fn destructions(&self) -> Result<Vec<DestructionRecord>, StoreError> {
        self.all(Table::Destructions, "destruction")
    }

    pub fn destruction(&self, id: u64) -> Result<Option<DestructionRecord>, StoreError> {
        self.one(Table::Destructions, &id_key(id), "destruction")
    }

    pub fn next_destruction_id(&self) -> Result<u64, StoreError> {
        self.next_id(Table::Destructions)
    }

    /// Every restore test, oldest first, with its id.
    pub fn restore_tests(&self) -> Result<Vec<(u64, RestoreTestRecord)>, StoreError> {
        let mut out = Vec::new();
        self.store.scan(Table::RestoreTests, (Bound::Unbounded, Bound::Unbounded), &mut |k, v| {
            out.push((key_id(Table::RestoreTests, k)?, dec("restore test", v)?));
            Ok(true)
        })?;
        Ok(out)
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
        let start = after.map(|(at, id)| expiry_key(at, &id));
        let end = expiry_key(now, &[0xff; 16]);
        let lo = start.as_ref().map_or(Bound::Unbounded, |k| Bound::Excluded(&k[..]));
        let mut entries = Vec::new();
        self.store.scan(Table::Expiry, (lo, Bound::Included(&end[..])), &mut |k, _| {
            entries.push(parse_expiry_key(k)?);
            Ok(entries.len() < limit)
        })?;
        let mut out = Vec::new();
        for &(_, id) in &entries {
            if let Some(rec) = self.data_key(&id)?
                && matches!(rec.state, KeyState::Active)
                && !skip(&rec.keyring)
            {
                out.push((id, rec));
            }
        }
        Ok((out, entries.last().copied()))
    }
}
