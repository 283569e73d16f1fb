//! The audit trail: events are built by the layers above, linked into one hash chain
//! and signed at checkpoints here, and persisted as bytes by the store.
//!
//! [`AuditChain`] is the store's [`Chain`]: the store calls it inside the transaction
//! that appends, so numbering and linking follow commit order and a group that does not
//! commit leaves no trace in the chain.

pub mod anchor;
pub mod integrity;
mod record;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use kluis_proto::audit::{AuditRecord, CHECKPOINT_EVERY, Checkpoint, GENESIS, SigKind, prev_checkpoint_seq};
use serde::{Deserialize, Serialize};

use crate::model::Outcome;
use crate::store::{Chain, ChainError, ChainHead, Linked, Store, StoreError, Table, id_key, key_id};

pub use record::format_millis;

/// Errors of the audit layer.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit record {seq} in the store is corrupt: it decodes in no known format")]
    Corrupt { seq: u64 },
    #[error("audit record {seq} has no chain hash; it cannot be stored")]
    Unchained { seq: u64 },
    #[error("audit checkpoint {seq} in the store is corrupt")]
    CheckpointCorrupt { seq: u64 },
    #[error("audit record could not be encoded: {0}")]
    Encode(#[source] postcard::Error),
    #[error("audit event could not be decoded: {0}")]
    Event(#[source] postcard::Error),
    #[error("audit checkpoint could not be encoded: {0}")]
    CheckpointEncode(#[source] serde_json::Error),
    #[error("the audit signing key is not available (its lock was poisoned)")]
    SignerPoisoned,
    #[error("the stored audit trail does not verify, so nothing is signed over it: {0}")]
    Tampered(#[from] integrity::IntegrityError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An audit entry before it is chained.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditEvent {
    pub time: String,
    pub principal: String,
    pub action: String,
    pub keyring: Option<String>,
    pub key_id: Option<String>,
    pub backup_id: Option<String>,
    pub outcome: Outcome,
}

impl AuditEvent {
    /// An event at `millis` (Unix milliseconds, as the audit trail writes times).
    pub fn at(millis: i64, principal: &str, action: &str, keyring: Option<&str>, backup_id: Option<&str>, outcome: Outcome) -> Self {
        AuditEvent {
            time: format_millis(millis).unwrap_or_default(),
            principal: principal.to_owned(),
            action: action.to_owned(),
            keyring: keyring.map(str::to_owned),
            key_id: None,
            backup_id: backup_id.map(str::to_owned),
            outcome,
        }
    }

    /// The bytes handed to the store in an `Append` (linked by [`AuditChain`]).
    pub fn encode(&self) -> Result<Vec<u8>, AuditError> {
        postcard::to_allocvec(self).map_err(AuditError::Encode)
    }
}

/// Links audit entries into the hash chain and signs a checkpoint every
/// [`CHECKPOINT_EVERY`] entries, once the signing key is set and the stored history
/// checked ([`integrity`]); never after an integrity alarm.
#[derive(Default)]
pub struct AuditChain {
    signer: RwLock<Option<Arc<ring::signature::Ed25519KeyPair>>>,
    /// The first integrity alarm (what was found), if any.
    alarm: Mutex<Option<integrity::IntegrityError>>,
    alarms: Arc<AtomicU64>,
    anchors: RwLock<Option<Arc<anchor::Anchors>>>,
    anchor_failures: Arc<AtomicU64>,
}

impl AuditChain {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets the key that signs checkpoints (the server's audit key), after the stored
    /// history was checked with it: `checked` is what [`integrity::check_at_start`] found
    /// (an alarm is raised and nothing will be signed if it found tampering).
    pub fn set_signer(
        &self,
        key: Arc<ring::signature::Ed25519KeyPair>,
        checked: Result<integrity::Checked, integrity::IntegrityError>,
    ) -> Result<(), AuditError> {
        if let Err(e) = checked {
            self.alarm(e);
        }
        *self.signer.write().map_err(|_| AuditError::SignerPoisoned)? = Some(key);
        Ok(())
    }

    /// Raises an integrity alarm: logged, counted, and from now on no checkpoint is signed
    /// and no export is given out by this process.
    pub fn alarm(&self, e: integrity::IntegrityError) {
        tracing::error!(problem = %e, "AUDIT INTEGRITY ALARM: the stored audit trail does not verify; no checkpoint or export head will be signed");
        self.alarms.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut a) = self.alarm.lock()
            && a.is_none()
        {
            *a = Some(e);
        }
    }

    /// The integrity alarm raised, if any.
    pub fn alarmed(&self) -> Option<integrity::IntegrityError> {
        self.alarm.lock().ok().and_then(|a| a.clone())
    }

    /// The count behind `kluis_audit_integrity_alarms_total`.
    pub fn alarm_counter(&self) -> Arc<AtomicU64> {
        self.alarms.clone()
    }

    /// The count behind `kluis_audit_anchor_failures_total`.
    pub fn anchor_failure_counter(&self) -> Arc<AtomicU64> {
        self.anchor_failures.clone()
    }

    /// Sends every committed checkpoint, and every export head, to `targets` too.
    pub fn set_anchors(&self, targets: Vec<anchor::AnchorTarget>) -> Result<(), AuditError> {
        let a = (!targets.is_empty()).then(|| Arc::new(anchor::Anchors::new(targets, self.anchor_failures.clone())));
        *self.anchors.write().map_err(|_| AuditError::SignerPoisoned)? = a;
        Ok(())
    }

    /// Anchors one export line (a checkpoint or head), if anchors are configured.
    pub fn anchor(&self, line: &str) {
        let a = self.anchors.read().ok().and_then(|a| a.clone());
        if let Some(a) = a {
            a.anchor(line);
        }
    }

    #[cfg(test)]
    pub(crate) fn signer_lock_for_test(&self) -> &RwLock<Option<Arc<ring::signature::Ed25519KeyPair>>> {
        &self.signer
    }

    fn signer(&self) -> Result<Option<Arc<ring::signature::Ed25519KeyPair>>, AuditError> {
        Ok(self.signer.read().map_err(|_| AuditError::SignerPoisoned)?.clone())
    }
}

impl Chain for AuditChain {
    fn genesis(&self) -> ChainHead {
        GENESIS.to_owned()
    }

    fn committed(&self, on_commit: Vec<String>) {
        // The checkpoints of a committed transaction: only now do they go to the anchors.
        for line in on_commit {
            self.anchor(&line);
        }
    }

    fn base_of(&self, seq: u64) -> Option<u64> {
        // A checkpoint binds the entry hash at the checkpoint before it.
        (seq > 0 && seq.is_multiple_of(CHECKPOINT_EVERY)).then(|| prev_checkpoint_seq(seq))
    }

    fn head_of(&self, seq: u64, stored: &[u8]) -> Result<ChainHead, ChainError> {
        Ok(record::hash_of(seq, stored)?)
    }

    fn link(&self, seq: u64, prev: &ChainHead, entry: &[u8], base: Option<&ChainHead>) -> Result<Linked, ChainError> {
        let ev: AuditEvent = postcard::from_bytes(entry).map_err(AuditError::Event)?;
        let mut rec = AuditRecord {
            seq,
            time: ev.time,
            principal: ev.principal,
            action: ev.action,
            keyring: ev.keyring,
            key_id: ev.key_id,
            backup_id: ev.backup_id,
            outcome: ev.outcome.to_string(),
            prev: prev.clone(),
            hash: String::new(),
        };
        rec.hash = rec.compute_hash();
        let stored = record::encode(&rec)?;
        let (mut checkpoint, mut on_commit) = (None, None);
        if seq.is_multiple_of(CHECKPOINT_EVERY)
            && let Some(key) = self.signer()?.filter(|_| self.alarmed().is_none())
        {
            // `base` is the hash at the checkpoint before, as the store holds it (written by
            // this process or another replica on the same store).
            match base {
                Some(prev) => {
                    let c = kluis_proto::audit::sign(&key, SigKind::Checkpoint, seq, &rec.hash, prev);
                    checkpoint = Some(serde_json::to_vec(&c).map_err(AuditError::CheckpointEncode)?);
                    let line = serde_json::to_string(&kluis_proto::audit::ExportLine::Checkpoint { checkpoint: c })
                        .map_err(AuditError::CheckpointEncode)?;
                    on_commit = Some(line);
                }
                None => self.alarm(integrity::IntegrityError::MissingCheckpoint { seq: prev_checkpoint_seq(seq) }),
            }
        }
        Ok(Linked { stored, head: rec.hash, checkpoint, on_commit })
    }
}

/// Records read per page by [`for_each`].
const PAGE: usize = 4096;

/// Visits the audit records with `seq >= from` in order, each with its checkpoint if
/// one was signed there, until `f` returns false. Reads a page at a time.
pub fn for_each(
    store: &dyn Store,
    from: u64,
    mut f: impl FnMut(AuditRecord, Option<Checkpoint>) -> bool,
) -> Result<(), AuditError> {
    use std::ops::Bound;
    // Format 2 records do not store `prev`: it is the stored hash of the record before.
    let mut prev = match from.checked_sub(1).filter(|&p| p > 0) {
        Some(p) => match store.get(Table::Audit, &id_key(p))? {
            Some(v) => record::hash_of(p, &v)?,
            None => GENESIS.to_owned(),
        },
        None => GENESIS.to_owned(),
    };
    let mut next = from.max(1);
    loop {
        let mut rows: Vec<(u64, Vec<u8>)> = Vec::with_capacity(PAGE);
        let start = id_key(next);
        store.scan(Table::Audit, (Bound::Included(&start), Bound::Unbounded), &mut |k, v| {
            rows.push((key_id(Table::Audit, k)?, v.to_vec()));
            Ok(rows.len() < PAGE)
        })?;
        let (Some(&(first, _)), Some(&(last, _))) = (rows.first(), rows.last()) else { return Ok(()) };
        let mut cps = std::collections::BTreeMap::new();
        let (lo, hi) = (id_key(first), id_key(last));
        store.scan(Table::Checkpoints, (Bound::Included(&lo), Bound::Included(&hi)), &mut |k, v| {
            let seq = key_id(Table::Checkpoints, k)?;
            cps.insert(seq, v.to_vec());
            Ok(true)
        })?;
        for (seq, bytes) in rows {
            let rec = record::decode(seq, &bytes, &prev)?;
            prev.clone_from(&rec.hash);
            let cp = match cps.remove(&seq) {
                Some(c) => Some(serde_json::from_slice(&c).map_err(|_| AuditError::CheckpointCorrupt { seq })?),
                None => None,
            };
            if !f(rec, cp) {
                return Ok(());
            }
        }
        next = last + 1;
    }
}

/// Audit records with `seq >= from`, at most `limit`, in order, with the checkpoints
/// among them.
pub fn page(store: &dyn Store, from: u64, limit: usize) -> Result<Vec<(AuditRecord, Option<Checkpoint>)>, AuditError> {
    let mut out = Vec::new();
    if limit > 0 {
        for_each(store, from, |r, c| {
            out.push((r, c));
            out.len() < limit
        })?;
    }
    Ok(out)
}
