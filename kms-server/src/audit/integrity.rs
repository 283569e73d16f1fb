//! The server checks the history it holds before it signs anything over it.
//!
//! At start, [`check_at_start`] reads every stored checkpoint (one per
//! [`CHECKPOINT_EVERY`] entries): each must be there, be signed by the audit key, sign
//! the hash the store holds for its entry, and (format 2) name the checkpoint before it;
//! then it recomputes the chain from the last checkpoint to the newest entry. Before an
//! export signs its head, the export re-checks every entry and checkpoint it reads
//! (see [`ExportCheck`]). Either failing is an alarm ([`AuditChain::alarm`]): an error in
//! the log, `kluis_audit_integrity_alarms_total`, no further checkpoint signed and every
//! export refused (`AUDIT_TAMPERED`), until the store is repaired or restored.

use kluis_proto::audit::{
    AuditRecord, CHECKPOINT_EVERY, Checkpoint, GENESIS, SigKind, SignatureProblem, Verifier, VerifyError, check_signature,
};

use super::{AuditError, record};
use crate::store::{Store, Table, id_key, key_id};

/// What is wrong with the stored audit history. Names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    #[error("the signed checkpoint at entry {seq} is missing from the store (checkpoints were removed)")]
    MissingCheckpoint { seq: u64 },
    #[error("a stored checkpoint at entry {seq}, where none is made")]
    UnexpectedCheckpoint { seq: u64 },
    #[error("the stored checkpoint at entry {seq} signs another hash than the stored entry has (history was rewritten)")]
    CheckpointMismatch { seq: u64 },
    #[error("the stored checkpoint at entry {seq} is not signed by this server's audit key")]
    BadSignature { seq: u64 },
    #[error("the stored checkpoint at entry {seq} has a format 1 signature after format 2 ones")]
    OldFormat { seq: u64 },
    #[error("the stored checkpoint at entry {seq} names another previous checkpoint than the store holds")]
    PrevMismatch { seq: u64 },
    #[error("entry {seq}, signed by a checkpoint, is missing from the store (entries were removed)")]
    EntryMissing { seq: u64 },
    #[error("entry {seq} in the store was changed: its hash does not match its contents")]
    Changed { seq: u64 },
    #[error("entry {found} in the store follows entry {previous} (entries were removed or inserted)")]
    Sequence { previous: u64, found: u64 },
    #[error("entry {seq} in the store does not chain to the entry before it")]
    Chain { seq: u64 },
    #[error("the stored checkpoint at entry {seq} could not be read")]
    CheckpointCorrupt { seq: u64 },
    #[error("the stored audit history could not be checked: {0}")]
    Unchecked(VerifyError),
}

impl IntegrityError {
    /// The store-side reading of a [`VerifyError`] from checking stored records with the
    /// export [`Verifier`] (fed parsed records, so its line numbers mean nothing here).
    fn from_verify(e: VerifyError) -> Self {
        match e {
            VerifyError::Changed { seq, .. } => Self::Changed { seq },
            VerifyError::Sequence { previous, found, .. } => Self::Sequence { previous, found },
            VerifyError::Chain { seq, .. } | VerifyError::Start { seq, .. } => Self::Chain { seq },
            VerifyError::CheckpointMismatch { seq, .. } => Self::CheckpointMismatch { seq },
            VerifyError::BadSignature { seq, .. } => Self::BadSignature { seq },
            VerifyError::OldFormat { seq, .. } => Self::OldFormat { seq },
            VerifyError::PrevMismatch { seq, .. } => Self::PrevMismatch { seq },
            VerifyError::MissingCheckpoint { seq, .. } => Self::MissingCheckpoint { seq },
            VerifyError::UnexpectedCheckpoint { seq, .. } => Self::UnexpectedCheckpoint { seq },
            VerifyError::HeadMismatch { head, .. } => Self::EntryMissing { seq: head },
            e @ (VerifyError::Malformed { .. }
            | VerifyError::LineTooLong { .. }
            | VerifyError::Read { .. }
            | VerifyError::Empty
            | VerifyError::NoHead
            | VerifyError::AnchorMalformed { .. }
            | VerifyError::AnchorBadSignature { .. }
            | VerifyError::AnchorConflict { .. }
            | VerifyError::AnchorMismatch { .. }
            | VerifyError::AnchorBeyond { .. }
            | VerifyError::EarlierHeadNotCovered { .. }
            | VerifyError::EarlierHeadBeyond { .. }
            | VerifyError::EarlierHeadMismatch { .. }) => Self::Unchecked(e),
        }
    }
}

/// The hashes a healthy store showed at start: to link the next checkpoint.
#[derive(Debug, Default)]
pub struct Checked {
    /// The newest entry's seq (0: none).
    pub head_seq: u64,
    /// (seq, entry hash) at the newest checkpoint position at or before the head.
    pub checkpoint_hashes: Vec<(u64, String)>,
}

fn stored_hash(store: &dyn Store, seq: u64) -> Result<Option<String>, AuditError> {
    match store.get(Table::Audit, &id_key(seq))? {
        Some(v) => Ok(Some(record::hash_of(seq, &v)?)),
        None => Ok(None),
    }
}

/// Checkpoints read per store scan at start (a few in unit tests, so that their trails
/// cross pages).
const CHECKPOINT_PAGE: usize = if cfg!(test) { 2 } else { 1024 };

/// The check at start (see the module docs). `Ok(Err(_))`: the history was tampered with.
pub fn check_at_start(store: &dyn Store, public_key: &[u8]) -> Result<Result<Checked, IntegrityError>, AuditError> {
    use std::ops::Bound;
    let head_seq = match store.last(Table::Audit)? {
        Some((k, _)) => key_id(Table::Audit, &k)?,
        None => 0,
    };
    let mut expected = CHECKPOINT_EVERY;
    let mut last: (u64, String) = (0, GENESIS.to_owned());
    let mut v2_seen = false;
    let mut hashes = vec![last.clone()];
    // A page of checkpoints at a time: the start's memory does not grow with the trail.
    let mut next = 0u64;
    loop {
        let mut rows = Vec::with_capacity(CHECKPOINT_PAGE);
        let start = id_key(next);
        store.scan(Table::Checkpoints, (Bound::Included(&start), Bound::Unbounded), &mut |k, v| {
            rows.push((key_id(Table::Checkpoints, k)?, v.to_vec()));
            Ok(rows.len() < CHECKPOINT_PAGE)
        })?;
        let Some(&(page_last, _)) = rows.last() else { break };
        next = page_last + 1;
        for (seq, bytes) in rows {
            let c: Checkpoint = match serde_json::from_slice(&bytes) {
                Ok(c) => c,
                Err(_) => return Ok(Err(IntegrityError::CheckpointCorrupt { seq })),
            };
            if !seq.is_multiple_of(CHECKPOINT_EVERY) {
                return Ok(Err(IntegrityError::UnexpectedCheckpoint { seq }));
            }
            if seq != expected {
                return Ok(Err(IntegrityError::MissingCheckpoint { seq: expected }));
            }
            let Some(hash) = stored_hash(store, seq)? else { return Ok(Err(IntegrityError::EntryMissing { seq })) };
            if c.seq != seq || c.hash != hash {
                return Ok(Err(IntegrityError::CheckpointMismatch { seq }));
            }
            if c.prev.as_ref().is_some_and(|p| *p != last.1) {
                return Ok(Err(IntegrityError::PrevMismatch { seq }));
            }
            match check_signature(public_key, SigKind::Checkpoint, &c, !v2_seen) {
                Ok(()) => {}
                Err(SignatureProblem::Invalid) => return Ok(Err(IntegrityError::BadSignature { seq })),
                Err(SignatureProblem::OldFormat) => return Ok(Err(IntegrityError::OldFormat { seq })),
            }
            v2_seen |= c.prev.is_some();
            last = (seq, hash);
            hashes.push(last.clone());
            if hashes.len() > 2 {
                hashes.remove(0);
            }
            expected += CHECKPOINT_EVERY;
        }
    }
    if expected <= head_seq {
        return Ok(Err(IntegrityError::MissingCheckpoint { seq: expected }));
    }
    // The entries after the last checkpoint: recomputed, chained to it.
    let (mut prev_seq, mut prev_hash) = last;
    let mut bad = None;
    super::for_each(store, prev_seq + 1, |r, _| {
        bad = if r.seq != prev_seq + 1 {
            Some(IntegrityError::Sequence { previous: prev_seq, found: r.seq })
        } else if r.prev != prev_hash {
            Some(IntegrityError::Chain { seq: r.seq })
        } else if r.compute_hash() != r.hash {
            Some(IntegrityError::Changed { seq: r.seq })
        } else {
            None
        };
        prev_seq = r.seq;
        prev_hash = r.hash;
        bad.is_none()
    })?;
    if let Some(e) = bad {
        return Ok(Err(e));
    }
    Ok(Ok(Checked { head_seq, checkpoint_hashes: hashes }))
}

/// The server's own check of every record and checkpoint an export reads, from entry 1,
/// before it signs the head.
pub struct ExportCheck {
    verifier: Verifier,
}

impl ExportCheck {
    pub fn new(public_key: &[u8]) -> Self {
        Self { verifier: Verifier::new(public_key) }
    }

    pub fn record(&mut self, r: &AuditRecord) -> Result<(), IntegrityError> {
        self.verifier.record(r).map_err(IntegrityError::from_verify)
    }

    pub fn checkpoint(&mut self, c: &Checkpoint) -> Result<(), IntegrityError> {
        self.verifier.signature(c.clone(), SigKind::Checkpoint).map_err(IntegrityError::from_verify)
    }

    /// `(seq, hash, prev)` for the head, once everything read checked out.
    pub fn head(&self) -> Result<Option<(u64, String, String)>, IntegrityError> {
        self.verifier.head_fields().map_err(IntegrityError::from_verify)
    }
}
