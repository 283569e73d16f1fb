//! The audit trail's record format, hash chain and offline verification. Shared
//! by the server (which writes it) and `kmsctl audit verify` (which checks an export).
//!
//! Each record's `hash` is SHA-256 over a domain tag and the record's JSON without
//! its `hash` field (fields in declaration order), and each record carries the
//! previous record's hash in `prev`; the first record's `prev` is 64 zeros.
//! Every [`CHECKPOINT_EVERY`] records, and at the end of every export, the server
//! signs `(seq, hash)` with its Ed25519 audit key.

use serde::{Deserialize, Serialize};

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// A signed checkpoint is stored after every this many records.
pub const CHECKPOINT_EVERY: u64 = 256;
const RECORD_TAG: &[u8] = b"kluis-audit-record-v1\0";
const CHECKPOINT_TAG: &[u8] = b"kluis-audit-checkpoint-v1\0";

/// One audit entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: u64,
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    pub principal: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// `ok`, or `denied: ...`, or `failed: ...`.
    pub outcome: String,
    pub prev: String,
    #[serde(default)]
    pub hash: String,
}

/// A signature over `(seq, hash)` of the record at `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    /// Base64 Ed25519 signature.
    pub signature: String,
}

/// One line of an export (JSON lines).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ExportLine {
    Checkpoint { checkpoint: Checkpoint },
    Head { head: Checkpoint },
    Record(AuditRecord),
}

/// A record read for display only (`kmsctl audit tail`): fields this reader does not
/// know are ignored, so the records of a newer server still show. Verification reads
/// [`AuditRecord`], which is strict: a record is hashed as written, so a field the
/// verifier does not know is data it cannot vouch for.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct RecordView {
    pub seq: u64,
    pub time: String,
    pub principal: String,
    pub action: String,
    #[serde(default)]
    pub keyring: Option<String>,
    #[serde(default)]
    pub key_id: Option<String>,
    pub outcome: String,
}

/// What one export line is, for display.
#[derive(Debug)]
pub enum LineView {
    Record(RecordView),
    /// A signed checkpoint or head.
    Signature,
    /// Not a line of an export this reader understands (kept for the caller to say so).
    Unreadable(String),
}

/// Reads one export line for display, ignoring fields this reader does not know.
pub fn view_line(line: &str) -> LineView {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(v) if v.get("checkpoint").is_some() || v.get("head").is_some() => LineView::Signature,
        Ok(v) => match serde_json::from_value::<RecordView>(v) {
            Ok(r) => LineView::Record(r),
            Err(e) => LineView::Unreadable(e.to_string()),
        },
        Err(e) => LineView::Unreadable(e.to_string()),
    }
}

impl AuditRecord {
    /// The chain hash of this record (ignores the `hash` field itself).
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let json = serde_json::to_vec(&unhashed).unwrap_or_default();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(RECORD_TAG);
        ctx.update(&json);
        hex::encode(ctx.finish().as_ref())
    }
}

/// The bytes a checkpoint signature covers.
pub fn checkpoint_message(seq: u64, hash: &str) -> Vec<u8> {
    let mut m = CHECKPOINT_TAG.to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash.as_bytes());
    m
}

/// Why an export does not verify. Names the first broken entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("line {line}: not an audit record, checkpoint or head ({reason})")]
    Malformed { line: usize, reason: String },
    #[error("the export is empty")]
    Empty,
    #[error("entry seq {seq} (line {line}) was changed: its hash does not match its contents")]
    Changed { seq: u64, line: usize },
    #[error("entry seq {found} (line {line}) follows seq {previous}: entries were removed, reordered or inserted before it")]
    Sequence { previous: u64, found: u64, line: usize },
    #[error("entry seq {seq} (line {line}) does not chain to the entry before it: an entry before it was changed, removed, reordered or inserted")]
    Chain { seq: u64, line: usize },
    #[error("entry seq {seq} (line {line}) should be the first entry but does not start the chain")]
    Start { seq: u64, line: usize },
    #[error("the signed {what} at seq {seq} (line {line}) does not match the entry it covers: the trail was rewritten")]
    CheckpointMismatch { what: &'static str, seq: u64, line: usize },
    #[error("the signature of the {what} at seq {seq} (line {line}) is not valid for this public key")]
    BadSignature { what: &'static str, seq: u64, line: usize },
    #[error("the export has no signed head: it was cut short (entries at the end removed)")]
    NoHead,
    #[error("the signed head covers seq {head} but the last entry is seq {last}: entries at the end were removed or added")]
    HeadMismatch { head: u64, last: u64 },
}

/// What a good export contained.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub checkpoints: u64,
}

/// Verifies an export (JSON lines) with the server's Ed25519 public key (32 bytes).
/// A partial export (`--since`) starts wherever it starts; a full one must start the chain.
pub fn verify_export(text: &str, public_key: &[u8]) -> Result<Verified, VerifyError> {
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key);
    let mut last: Option<(u64, String)> = None;
    let mut first_seq = None;
    let mut records = 0u64;
    let mut checkpoints = 0u64;
    let mut head_seen = false;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if head_seen {
            return Err(VerifyError::Malformed { line, reason: "text after the signed head".into() });
        }
        let parsed: ExportLine =
            serde_json::from_str(raw).map_err(|e| VerifyError::Malformed { line, reason: e.to_string() })?;
        let (c, is_head) = match parsed {
            ExportLine::Record(r) => {
                if r.compute_hash() != r.hash {
                    return Err(VerifyError::Changed { seq: r.seq, line });
                }
                match &last {
                    None => {
                        if r.seq == 1 && r.prev != GENESIS {
                            return Err(VerifyError::Start { seq: r.seq, line });
                        }
                        first_seq = Some(r.seq);
                    }
                    Some((pseq, phash)) => {
                        if r.seq != pseq + 1 {
                            return Err(VerifyError::Sequence { previous: *pseq, found: r.seq, line });
                        }
                        if &r.prev != phash {
                            return Err(VerifyError::Chain { seq: r.seq, line });
                        }
                    }
                }
                records += 1;
                last = Some((r.seq, r.hash));
                continue;
            }
            ExportLine::Checkpoint { checkpoint } => (checkpoint, false),
            ExportLine::Head { head } => (head, true),
        };
        let what = if is_head { "head" } else { "checkpoint" };
        match &last {
            Some((seq, hash)) if *seq == c.seq && *hash == c.hash => {}
            Some((seq, _)) if is_head && *seq != c.seq => {
                return Err(VerifyError::HeadMismatch { head: c.seq, last: *seq });
            }
            _ => return Err(VerifyError::CheckpointMismatch { what, seq: c.seq, line }),
        }
        use base64::Engine;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&c.signature)
            .map_err(|_| VerifyError::BadSignature { what, seq: c.seq, line })?;
        key.verify(&checkpoint_message(c.seq, &c.hash), &sig)
            .map_err(|_| VerifyError::BadSignature { what, seq: c.seq, line })?;
        if is_head {
            head_seen = true;
        } else {
            checkpoints += 1;
        }
    }
    let (last_seq, _) = last.ok_or(VerifyError::Empty)?;
    if !head_seen {
        return Err(VerifyError::NoHead);
    }
    Ok(Verified { first_seq: first_seq.unwrap_or(last_seq), last_seq, records, checkpoints })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn export(n: u64, key: &Ed25519KeyPair) -> Vec<String> {
        let mut lines = Vec::new();
        let mut prev = GENESIS.to_owned();
        for seq in 1..=n {
            let mut r = AuditRecord {
                seq,
                time: format!("2026-11-22T02:00:{seq:02}.000Z"),
                principal: "sealer".into(),
                action: "GenerateDataKey".into(),
                keyring: Some("default".into()),
                key_id: Some(format!("{seq:032x}")),
                backup_id: Some(format!("b{seq}")),
                outcome: "ok".into(),
                prev: prev.clone(),
                hash: String::new(),
            };
            r.hash = r.compute_hash();
            prev = r.hash.clone();
            lines.push(serde_json::to_string(&r).unwrap());
            if seq == 4 {
                let sig = key.sign(&checkpoint_message(seq, &r.hash));
                let c = Checkpoint { seq, hash: r.hash.clone(), signature: base64::engine::general_purpose::STANDARD.encode(sig) };
                lines.push(serde_json::to_string(&ExportLine::Checkpoint { checkpoint: c }).unwrap());
            }
        }
        let sig = key.sign(&checkpoint_message(n, &prev));
        let head = Checkpoint { seq: n, hash: prev, signature: base64::engine::general_purpose::STANDARD.encode(sig) };
        lines.push(serde_json::to_string(&ExportLine::Head { head }).unwrap());
        lines
    }

    fn key() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    #[test]
    fn a_good_export_verifies() {
        let k = key();
        let v = verify_export(&export(8, &k).join("\n"), k.public_key().as_ref()).unwrap();
        assert_eq!(v, Verified { first_seq: 1, last_seq: 8, records: 8, checkpoints: 1 });
    }

    #[test]
    fn each_kind_of_tampering_names_the_entry() {
        let k = key();
        let pk = k.public_key().as_ref().to_vec();
        let lines = export(8, &k);
        let check = |l: Vec<String>| verify_export(&l.join("\n"), &pk).unwrap_err();
        // Changed: outcome edited on seq 3 (line 3).
        let mut l = lines.clone();
        l[2] = l[2].replace("\"outcome\":\"ok\"", "\"outcome\":\"denied\"");
        assert_eq!(check(l), VerifyError::Changed { seq: 3, line: 3 });
        // Changed and re-hashed: the next entry no longer chains.
        let mut l = lines.clone();
        let mut r: AuditRecord = serde_json::from_str(&l[2]).unwrap();
        r.principal = "intruder".into();
        r.hash = r.compute_hash();
        l[2] = serde_json::to_string(&r).unwrap();
        assert_eq!(check(l), VerifyError::Chain { seq: 4, line: 4 });
        // Removed: seq 6 (line 7, after the checkpoint line).
        let mut l = lines.clone();
        l.remove(6);
        assert_eq!(check(l), VerifyError::Sequence { previous: 5, found: 7, line: 7 });
        // Reordered: seq 6 and 7 swapped.
        let mut l = lines.clone();
        l.swap(6, 7);
        assert_eq!(check(l), VerifyError::Sequence { previous: 5, found: 7, line: 7 });
        // Inserted: a copy of seq 2 after seq 2.
        let mut l = lines.clone();
        let dup = l[1].clone();
        l.insert(2, dup);
        assert_eq!(check(l), VerifyError::Sequence { previous: 2, found: 2, line: 3 });
        // Cut short: last entry and head removed.
        let mut l = lines.clone();
        l.truncate(l.len() - 2);
        assert_eq!(check(l), VerifyError::NoHead);
        // Another key.
        let other = key();
        assert!(matches!(verify_export(&lines.join("\n"), other.public_key().as_ref()), Err(VerifyError::BadSignature { what: "checkpoint", seq: 4, .. })));
    }
}

#[cfg(test)]
mod view_tests {
    use super::*;

    #[test]
    fn a_record_with_a_field_this_reader_does_not_know_is_shown() {
        let line = r#"{"seq":7,"time":"2026-12-03T00:00:00.000Z","principal":"host","action":"GenerateDataKey","keyring":"ehr","outcome":"ok","prev":"00","hash":"11","replica":"kms-2"}"#;
        match view_line(line) {
            LineView::Record(r) => assert_eq!((r.seq, r.keyring.as_deref(), r.outcome.as_str()), (7, Some("ehr"), "ok")),
            other => panic!("{other:?}"),
        }
        // The strict reader refuses it: verification cannot vouch for the extra field.
        assert!(serde_json::from_str::<AuditRecord>(line).is_err());
        assert!(matches!(view_line(r#"{"head":{"seq":7,"hash":"11","signature":"x"}}"#), LineView::Signature));
        assert!(matches!(view_line("not json"), LineView::Unreadable(_)));
    }
}
