//! How audit records are stored.
//!
//! Store format 2 (this version) writes each record as one tag byte [`COMPACT`] and the
//! postcard encoding of [`Stored`]: the time as milliseconds, the key id as 16 bytes, the
//! record's own hash as 32 bytes; neither `seq` (it is the table key) nor `prev` (it is the
//! previous record's hash, which that record stores). About 110 bytes for an issuance,
//! against about 380 for the JSON that format 1 stored.
//!
//! The chain hash is unchanged: [`AuditRecord::compute_hash`] over the JSON form, which a
//! read rebuilds exactly, so exports (and `kmsctl audit verify`) are the same in both
//! formats. A value that would not rebuild byte for byte (a time not in the server's
//! millisecond form, a key id that is not 32 lower-case hex digits) is kept as text.
//!
//! Format 1 records (JSON of the whole [`AuditRecord`], first byte `{`) written before
//! are still read, so a store upgraded in place holds both: older entries as JSON, newer
//! ones compact, one chain across them.

use kluis_proto::audit::{AuditRecord, GENESIS};
use serde::{Deserialize, Serialize};

use super::AuditError;

/// First byte of a format 2 record (a JSON record starts with `{`).
const COMPACT: u8 = 0x02;

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
enum Time {
    /// Unix milliseconds, rebuilt as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    Millis(i64),
    Text(String),
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
enum KeyId {
    /// Rebuilt as 32 lower-case hex digits.
    Raw([u8; 16]),
    Text(String),
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct Stored {
    time: Time,
    principal: String,
    action: String,
    keyring: Option<String>,
    key_id: Option<KeyId>,
    backup_id: Option<String>,
    outcome: String,
    hash: [u8; 32],
}

/// The server's audit time form: RFC 3339 UTC with milliseconds.
pub fn format_millis(ms: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    ))
}

fn compact_time(s: &str) -> Time {
    let parsed = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok());
    match parsed {
        Some(ms) if format_millis(ms).as_deref() == Some(s) => Time::Millis(ms),
        _ => Time::Text(s.to_owned()),
    }
}

fn compact_key_id(s: &str) -> KeyId {
    let mut raw = [0u8; 16];
    match hex::decode_to_slice(s, &mut raw) {
        Ok(()) if hex::encode(raw) == s => KeyId::Raw(raw),
        _ => KeyId::Text(s.to_owned()),
    }
}

/// The stored form of a chained record (its `hash` set). `seq` and `prev` are not stored.
pub fn encode(rec: &AuditRecord) -> Result<Vec<u8>, AuditError> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&rec.hash, &mut hash).map_err(|_| AuditError::Unchained { seq: rec.seq })?;
    let stored = Stored {
        time: compact_time(&rec.time),
        principal: rec.principal.clone(),
        action: rec.action.clone(),
        keyring: rec.keyring.clone(),
        key_id: rec.key_id.as_deref().map(compact_key_id),
        backup_id: rec.backup_id.clone(),
        outcome: rec.outcome.clone(),
        hash,
    };
    postcard::to_extend(&stored, vec![COMPACT]).map_err(AuditError::Encode)
}

/// The record stored under `seq`; `prev` is the hash of the record before it (the stored
/// hash of `seq - 1`, or [`GENESIS`] for the first), used for format 2 records.
pub fn decode(seq: u64, bytes: &[u8], prev: &str) -> Result<AuditRecord, AuditError> {
    let corrupt = || AuditError::Corrupt { seq };
    match bytes.split_first() {
        Some((b'{', _)) => serde_json::from_slice(bytes).map_err(|_| corrupt()),
        Some((&COMPACT, body)) => {
            let s: Stored = postcard::from_bytes(body).map_err(|_| corrupt())?;
            let time = match s.time {
                Time::Millis(ms) => format_millis(ms).ok_or_else(corrupt)?,
                Time::Text(t) => t,
            };
            Ok(AuditRecord {
                seq,
                time,
                principal: s.principal,
                action: s.action,
                keyring: s.keyring,
                key_id: s.key_id.map(|k| match k {
                    KeyId::Raw(raw) => hex::encode(raw),
                    KeyId::Text(t) => t,
                }),
                backup_id: s.backup_id,
                outcome: s.outcome,
                prev: prev.to_owned(),
                hash: hex::encode(s.hash),
            })
        }
        _ => Err(corrupt()),
    }
}

/// The stored hash of the record under `seq` (the `prev` of the record after it).
pub fn hash_of(seq: u64, bytes: &[u8]) -> Result<String, AuditError> {
    Ok(decode(seq, bytes, GENESIS)?.hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, prev: &str) -> AuditRecord {
        let mut r = AuditRecord {
            seq,
            time: "2026-11-23T03:08:05.123Z".into(),
            principal: "backup-host-01.example".into(),
            action: "GenerateDataKey".into(),
            keyring: Some("ehr-db".into()),
            key_id: Some("00112233445566778899aabbccddeeff".into()),
            backup_id: Some("ehr-db/2026-11-23T02:00".into()),
            outcome: "ok".into(),
            prev: prev.into(),
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        r
    }

    #[test]
    fn a_record_comes_back_as_it_was_hashed() {
        let prev = record(6, GENESIS).hash;
        let r = record(7, &prev);
        let bytes = encode(&r).unwrap();
        assert_eq!(bytes[0], COMPACT);
        let back = decode(7, &bytes, &prev).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.compute_hash(), r.hash);
        assert_eq!(hash_of(7, &bytes).unwrap(), r.hash);
        // Format 1 stored this record as 371 bytes of JSON; format 2 stores the values and
        // 11 bytes more (format tag, lengths, option and enum tags).
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(json.len(), 371);
        let values = 6 + 22 + 15 + 6 + 16 + 23 + 2 + 32;
        assert_eq!(bytes.len(), values + 11, "{} vs {}", bytes.len(), json.len());
    }

    #[test]
    fn values_that_would_not_rebuild_exactly_are_kept_as_text() {
        for (time, key_id) in [
            ("2026-11-23T03:08:05Z", "00112233445566778899AABBCCDDEEFF"),
            ("2026-11-23T03:08:05.123+01:00", "not-hex"),
            ("yesterday", "0011"),
        ] {
            let mut r = record(3, GENESIS);
            r.time = time.into();
            r.key_id = Some(key_id.into());
            r.keyring = None;
            r.hash = r.compute_hash();
            let back = decode(3, &encode(&r).unwrap(), GENESIS).unwrap();
            assert_eq!(back, r, "{time} {key_id}");
        }
        assert!(matches!(compact_time("2026-11-23T03:08:05.123Z"), Time::Millis(_)));
        assert!(matches!(compact_key_id("00112233445566778899aabbccddeeff"), KeyId::Raw(_)));
    }

    #[test]
    fn format_1_json_records_are_still_read() {
        let r = record(1, GENESIS);
        let json = serde_json::to_vec(&r).unwrap();
        // The stored prev of a JSON record is used, not the one passed in.
        assert_eq!(decode(1, &json, "ignored").unwrap(), r);
        assert_eq!(hash_of(1, &json).unwrap(), r.hash);
    }

    #[test]
    fn damaged_records_are_named_by_seq() {
        let r = record(9, GENESIS);
        let bytes = encode(&r).unwrap();
        for bad in [&b""[..], &b"\x07junk"[..], &bytes[..bytes.len() - 1], &b"{\"seq\":"[..]] {
            match decode(9, bad, GENESIS) {
                Err(AuditError::Corrupt { seq: 9 }) => {}
                Err(e) => panic!("wrong error: {e}"),
                Ok(_) => panic!("damaged record decoded"),
            }
        }
        let mut unchained = r.clone();
        unchained.hash = String::new();
        assert!(matches!(encode(&unchained), Err(AuditError::Unchained { seq: 9 })));
    }
}
