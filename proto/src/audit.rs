//! The audit trail's record format, hash chain and offline verification. Shared
//! by the server (which writes it) and `kmsctl audit verify` (which checks an export).
//!
//! Each record's `hash` is SHA-256 over a domain tag and the record's JSON without
//! its `hash` field (fields in declaration order), and each record carries the
//! previous record's hash in `prev`; the first record's `prev` is 64 zeros.
//! Every [`CHECKPOINT_EVERY`] records the server signs a checkpoint, and at the end of
//! every export a head, with its Ed25519 audit key.
//!
//! Format 2 signatures ([`signed_message`]) are domain separated: the message binds
//! `kluis-audit-v2`, the kind (`checkpoint` or `head`), the entry's seq and hash, and the
//! hash of the entry at the checkpoint before it ([`prev_checkpoint_seq`]), so a
//! checkpoint cannot be relabelled as a head and a cut export cannot pass as whole.
//! Checkpoints signed by older servers (format 1: `(seq, hash)` only, no `prev` field)
//! are still verified as format 1, but only before the first format 2 checkpoint and
//! never as a head.
//!
//! [`Verifier`] checks an export line by line (bounded: [`MAX_LINE`]), requires a
//! checkpoint at every [`CHECKPOINT_EVERY`]th entry and a head at the end, and says what
//! it proved: the whole trail from entry 1, or only entries `A..B` of a partial export.

use serde::{Deserialize, Serialize};

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// A signed checkpoint is stored after every this many records.
pub const CHECKPOINT_EVERY: u64 = 256;
const RECORD_TAG: &[u8] = b"kluis-audit-record-v1\0";
const CHECKPOINT_TAG_V1: &[u8] = b"kluis-audit-checkpoint-v1\0";
const SIGNATURE_TAG_V2: &[u8] = b"kluis-audit-v2\0";
/// The longest export line a verifier reads (a record is well under 64 KiB).
pub const MAX_LINE: usize = 4 << 20;

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

/// A signature over the record at `seq` (a checkpoint or a head).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    /// Format 2: the hash of the entry at [`prev_checkpoint_seq`]`(seq)` ([`GENESIS`] if
    /// none). Absent in format 1 checkpoints, which sign `(seq, hash)` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
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

/// What a signature covers: a periodic checkpoint or the head of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigKind {
    Checkpoint,
    Head,
}

impl SigKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            SigKind::Checkpoint => "checkpoint",
            SigKind::Head => "head",
        }
    }
}

/// The seq of the checkpoint before entry `seq` (0: none, the chain's start).
pub const fn prev_checkpoint_seq(seq: u64) -> u64 {
    seq.saturating_sub(1) / CHECKPOINT_EVERY * CHECKPOINT_EVERY
}

/// The bytes a format 2 signature covers: `"kluis-audit-v2\0" || kind || "\0" || seq (u64
/// BE) || entry hash || hash of the entry at the previous checkpoint (or genesis)`.
pub fn signed_message(kind: SigKind, seq: u64, hash: &str, prev: &str) -> Vec<u8> {
    let mut m = SIGNATURE_TAG_V2.to_vec();
    m.extend_from_slice(kind.as_str().as_bytes());
    m.push(0);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash.as_bytes());
    m.extend_from_slice(prev.as_bytes());
    m
}

/// The bytes a format 1 checkpoint signature covers (older stores; verify only).
pub fn checkpoint_message_v1(seq: u64, hash: &str) -> Vec<u8> {
    let mut m = CHECKPOINT_TAG_V1.to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash.as_bytes());
    m
}

/// Signs a format 2 checkpoint or head.
pub fn sign(key: &ring::signature::Ed25519KeyPair, kind: SigKind, seq: u64, hash: &str, prev: &str) -> Checkpoint {
    use base64::Engine;
    let sig = key.sign(&signed_message(kind, seq, hash, prev));
    Checkpoint {
        seq,
        hash: hash.to_owned(),
        prev: Some(prev.to_owned()),
        signature: base64::engine::general_purpose::STANDARD.encode(sig.as_ref()),
    }
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why a signature does not check (see [`check_signature`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureProblem {
    /// Not valid for this key and message.
    Invalid,
    /// A format 1 signature where only format 2 is accepted (a head, or after format 2).
    OldFormat,
}

/// Checks the signature of `c` as a `kind` with `key` (32-byte Ed25519 public key).
/// Format 1 is accepted only for a checkpoint and only when `allow_v1`.
pub fn check_signature(key: &[u8], kind: SigKind, c: &Checkpoint, allow_v1: bool) -> Result<(), SignatureProblem> {
    use base64::Engine;
    let sig = base64::engine::general_purpose::STANDARD.decode(&c.signature).map_err(|_| SignatureProblem::Invalid)?;
    let msg = match &c.prev {
        Some(prev) => signed_message(kind, c.seq, &c.hash, prev),
        None if allow_v1 && kind == SigKind::Checkpoint => checkpoint_message_v1(c.seq, &c.hash),
        None => return Err(SignatureProblem::OldFormat),
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(&msg, &sig)
        .map_err(|_| SignatureProblem::Invalid)
}

/// Why an export does not verify. Names the first broken entry (or the missing one).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("line {line}: not an audit record, checkpoint or head ({reason})")]
    Malformed { line: usize, reason: String },
    #[error("line {line} is longer than {max} bytes: not an export line")]
    LineTooLong { line: usize, max: usize },
    #[error("line {line} could not be read: {reason}")]
    Read { line: usize, reason: String },
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
    #[error("the {what} at seq {seq} (line {line}) has an old format 1 signature, which is not accepted there (a head, or after format 2 checkpoints)")]
    OldFormat { what: &'static str, seq: u64, line: usize },
    #[error("the signed {what} at seq {seq} (line {line}) names a previous checkpoint that is not entry {prev_seq} of this export: the trail was rewritten")]
    PrevMismatch { what: &'static str, seq: u64, prev_seq: u64, line: usize },
    #[error("the signed checkpoint after entry {seq} is missing (line {line}): one is required every {every} entries; checkpoints were removed", every = CHECKPOINT_EVERY)]
    MissingCheckpoint { seq: u64, line: usize },
    #[error("line {line}: a checkpoint at seq {seq}, where none is made (one every {every} entries)", every = CHECKPOINT_EVERY)]
    UnexpectedCheckpoint { seq: u64, line: usize },
    #[error("the export has no signed head: it was cut short (entries at the end removed)")]
    NoHead,
    #[error("the signed head covers seq {head} but the last entry is seq {last}: entries at the end were removed or added")]
    HeadMismatch { head: u64, last: u64 },
    #[error("anchors line {line}: {reason}")]
    AnchorMalformed { line: usize, reason: String },
    #[error("anchors line {line}: the signature of the anchored {what} at seq {seq} is not valid for this public key")]
    AnchorBadSignature { what: &'static str, seq: u64, line: usize },
    #[error("anchors lines {first} and {second} record different hashes for entry {seq}: the trail was rewritten and re-signed")]
    AnchorConflict { seq: u64, first: usize, second: usize },
    #[error("entry seq {seq} (line {line}) differs from the anchored checkpoint or head (anchors line {anchor_line}): the trail was rewritten and re-signed")]
    AnchorMismatch { seq: u64, line: usize, anchor_line: usize },
    #[error("the anchors record entry {seq} (anchors line {anchor_line}), but the export ends at entry {last}: entries at the end were removed (or the export is older than the anchors)")]
    AnchorBeyond { seq: u64, last: u64, anchor_line: usize },
    #[error("the earlier export's head is entry {seq}, but this export starts at entry {first}: it cannot show that it continues the earlier one")]
    EarlierHeadNotCovered { seq: u64, first: u64 },
    #[error("the earlier export's head is entry {seq}, but this export ends at entry {last}: entries were removed")]
    EarlierHeadBeyond { seq: u64, last: u64 },
    #[error("entry seq {seq} (line {line}) differs from the earlier export's signed head: the trail was rewritten since")]
    EarlierHeadMismatch { seq: u64, line: usize },
}

/// What a good export proved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The first entry in the export; 1 for a whole trail.
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub checkpoints: u64,
    /// The signed head (to pass to a later `--since-head`).
    pub head: Checkpoint,
    /// Anchored checkpoints and heads that matched an entry of the export.
    pub anchors_matched: u64,
    /// The earlier head this export was shown to continue (`--since-head`).
    pub continues: Option<u64>,
}

impl Verified {
    /// The export starts at entry 1: it proves the whole trail up to its head.
    pub fn whole(&self) -> bool {
        self.first_seq == 1
    }
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts = format!("{} entries, {} signed checkpoints, signed head", self.records, self.checkpoints);
        if self.whole() {
            write!(f, "audit trail intact: entries 1..{} ({counts})", self.last_seq)?;
        } else {
            write!(
                f,
                "partial export verified: entries {}..{} ({counts}); entries before {} not checked",
                self.first_seq, self.last_seq, self.first_seq
            )?;
        }
        if self.anchors_matched > 0 {
            write!(f, "; {} anchored checkpoints/heads match", self.anchors_matched)?;
        }
        Ok(())
    }
}

/// Anchored checkpoints and heads (from syslog or an append-only file), by seq.
#[derive(Debug, Default)]
pub struct Anchors {
    /// seq -> (hash, anchors line).
    by_seq: std::collections::BTreeMap<u64, (String, usize)>,
}

impl Anchors {
    /// Reads anchor lines: each holds one `{"checkpoint":...}` or `{"head":...}` JSON
    /// object, possibly after a log prefix (syslog, journald); other lines are skipped.
    /// Every anchor's signature is checked with `key`.
    pub fn read(reader: impl std::io::BufRead, key: &[u8]) -> Result<Self, VerifyError> {
        let mut a = Anchors::default();
        let mut lines = BoundedLines::new(reader);
        while let Some((line, raw)) = lines.next_line()? {
            let text = std::str::from_utf8(raw).map_err(|_| VerifyError::AnchorMalformed { line, reason: "not UTF-8".into() })?;
            let Some(at) = text.find("{\"checkpoint\"").or_else(|| text.find("{\"head\"")) else { continue };
            let parsed: ExportLine = serde_json::from_str(text[at..].trim_end())
                .map_err(|e| VerifyError::AnchorMalformed { line, reason: e.to_string() })?;
            let (c, kind) = match parsed {
                ExportLine::Checkpoint { checkpoint } => (checkpoint, SigKind::Checkpoint),
                ExportLine::Head { head } => (head, SigKind::Head),
                ExportLine::Record(_) => continue,
            };
            check_signature(key, kind, &c, true)
                .map_err(|_| VerifyError::AnchorBadSignature { what: kind.as_str(), seq: c.seq, line })?;
            match a.by_seq.get(&c.seq) {
                Some((h, first)) if *h != c.hash => {
                    return Err(VerifyError::AnchorConflict { seq: c.seq, first: *first, second: line });
                }
                Some(_) => {}
                None => {
                    a.by_seq.insert(c.seq, (c.hash, line));
                }
            }
        }
        Ok(a)
    }

    pub fn len(&self) -> usize {
        self.by_seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }
}

/// Reads lines of at most [`MAX_LINE`] bytes, numbering them from 1.
struct BoundedLines<R> {
    reader: R,
    buf: Vec<u8>,
    line: usize,
}

impl<R: std::io::BufRead> BoundedLines<R> {
    fn new(reader: R) -> Self {
        Self { reader, buf: Vec::new(), line: 0 }
    }

    fn next_line(&mut self) -> Result<Option<(usize, &[u8])>, VerifyError> {
        use std::io::{BufRead, Read};
        self.buf.clear();
        self.line += 1;
        let line = self.line;
        let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| VerifyError::Read { line, reason: e.to_string() })?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        } else if self.buf.len() > MAX_LINE {
            return Err(VerifyError::LineTooLong { line, max: MAX_LINE });
        }
        if self.buf.len() > MAX_LINE {
            return Err(VerifyError::LineTooLong { line, max: MAX_LINE });
        }
        Ok(Some((line, &self.buf)))
    }
}

/// Checks an export fed one line at a time; memory stays bounded whatever its length.
pub struct Verifier {
    key: Vec<u8>,
    line: usize,
    first: Option<u64>,
    last: Option<(u64, String)>,
    records: u64,
    checkpoints: u64,
    /// A record at a checkpoint position was read; its checkpoint must come next.
    due: Option<u64>,
    /// Hashes of the last entries at checkpoint positions (and 0 -> genesis).
    at_checkpoints: std::collections::VecDeque<(u64, String)>,
    v2_seen: bool,
    head: Option<Checkpoint>,
    anchors: Anchors,
    anchors_matched: u64,
    earlier_head: Option<Checkpoint>,
    continues: Option<u64>,
}

impl Verifier {
    /// A verifier for the server's Ed25519 public key (32 bytes).
    pub fn new(public_key: &[u8]) -> Self {
        Self {
            key: public_key.to_vec(),
            line: 0,
            first: None,
            last: None,
            records: 0,
            checkpoints: 0,
            due: None,
            at_checkpoints: std::collections::VecDeque::new(),
            v2_seen: false,
            head: None,
            anchors: Anchors::default(),
            anchors_matched: 0,
            earlier_head: None,
            continues: None,
        }
    }

    /// Also requires every anchored checkpoint or head with a seq in the export to match it,
    /// and none to lie beyond its end.
    pub fn with_anchors(mut self, anchors: Anchors) -> Self {
        self.anchors = anchors;
        self
    }

    /// Also requires this export to contain the entry an earlier export's head signed
    /// (already verified by the caller), with the same hash.
    pub fn since_head(mut self, head: Checkpoint) -> Self {
        self.earlier_head = Some(head);
        self
    }

    /// The next line of the export (without its newline).
    pub fn feed(&mut self, raw: &str) -> Result<(), VerifyError> {
        self.line += 1;
        let line = self.line;
        if raw.len() > MAX_LINE {
            return Err(VerifyError::LineTooLong { line, max: MAX_LINE });
        }
        if raw.trim().is_empty() {
            return Ok(());
        }
        if self.head.is_some() {
            return Err(VerifyError::Malformed { line, reason: "text after the signed head".into() });
        }
        let parsed: ExportLine =
            serde_json::from_str(raw).map_err(|e| VerifyError::Malformed { line, reason: e.to_string() })?;
        match parsed {
            ExportLine::Record(r) => self.record(&r),
            ExportLine::Checkpoint { checkpoint } => self.signature(checkpoint, SigKind::Checkpoint),
            ExportLine::Head { head } => self.signature(head, SigKind::Head),
        }
    }

    /// Reads and checks a whole export.
    pub fn read(mut self, reader: impl std::io::BufRead) -> Result<Verified, VerifyError> {
        let mut lines = BoundedLines::new(reader);
        while let Some((line, raw)) = lines.next_line()? {
            let text = std::str::from_utf8(raw).map_err(|_| VerifyError::Malformed { line, reason: "not UTF-8".into() })?;
            self.feed(text)?;
        }
        self.finish()
    }

    /// The hash of the entry at checkpoint position `seq` if this export showed it.
    fn hash_at(&self, seq: u64) -> Option<&str> {
        self.at_checkpoints.iter().find(|(s, _)| *s == seq).map(|(_, h)| h.as_str())
    }

    /// A record, parsed (the server checks its own store with this too).
    pub fn record(&mut self, r: &AuditRecord) -> Result<(), VerifyError> {
        let line = self.line;
        if let Some(seq) = self.due {
            return Err(VerifyError::MissingCheckpoint { seq, line });
        }
        if r.compute_hash() != r.hash {
            return Err(VerifyError::Changed { seq: r.seq, line });
        }
        match &self.last {
            None => {
                if r.seq == 1 {
                    if r.prev != GENESIS {
                        return Err(VerifyError::Start { seq: r.seq, line });
                    }
                    self.at_checkpoints.push_back((0, GENESIS.to_owned()));
                }
                self.first = Some(r.seq);
            }
            Some((pseq, phash)) => {
                if Some(r.seq) != pseq.checked_add(1) {
                    return Err(VerifyError::Sequence { previous: *pseq, found: r.seq, line });
                }
                if &r.prev != phash {
                    return Err(VerifyError::Chain { seq: r.seq, line });
                }
            }
        }
        if let Some((aseq, (ahash, aline))) = self.anchors.by_seq.get_key_value(&r.seq) {
            if *ahash != r.hash {
                return Err(VerifyError::AnchorMismatch { seq: *aseq, line, anchor_line: *aline });
            }
            self.anchors_matched += 1;
        }
        if let Some(h) = &self.earlier_head
            && h.seq == r.seq
        {
            if h.hash != r.hash {
                return Err(VerifyError::EarlierHeadMismatch { seq: r.seq, line });
            }
            self.continues = Some(r.seq);
        }
        if r.seq.is_multiple_of(CHECKPOINT_EVERY) {
            self.due = Some(r.seq);
            self.at_checkpoints.push_back((r.seq, r.hash.clone()));
            while self.at_checkpoints.len() > 3 {
                self.at_checkpoints.pop_front();
            }
        }
        self.records += 1;
        self.last = Some((r.seq, r.hash.clone()));
        Ok(())
    }

    /// A checkpoint or head, parsed.
    pub fn signature(&mut self, c: Checkpoint, kind: SigKind) -> Result<(), VerifyError> {
        let line = self.line;
        let what = kind.as_str();
        let Some((seq, hash)) = &self.last else {
            return Err(VerifyError::CheckpointMismatch { what, seq: c.seq, line });
        };
        if kind == SigKind::Checkpoint && !c.seq.is_multiple_of(CHECKPOINT_EVERY) {
            return Err(VerifyError::UnexpectedCheckpoint { seq: c.seq, line });
        }
        if kind == SigKind::Head {
            if let Some(due) = self.due {
                return Err(VerifyError::MissingCheckpoint { seq: due, line });
            }
            if *seq != c.seq {
                return Err(VerifyError::HeadMismatch { head: c.seq, last: *seq });
            }
        }
        if *seq != c.seq || *hash != c.hash {
            return Err(VerifyError::CheckpointMismatch { what, seq: c.seq, line });
        }
        if kind == SigKind::Checkpoint && self.due != Some(c.seq) {
            return Err(VerifyError::Malformed { line, reason: format!("a second checkpoint at seq {}", c.seq) });
        }
        if let Some(prev) = &c.prev {
            let prev_seq = prev_checkpoint_seq(c.seq);
            if !is_hash(prev) {
                return Err(VerifyError::Malformed { line, reason: format!("the {what}'s prev is not a hash") });
            }
            if let Some(h) = self.hash_at(prev_seq)
                && h != prev
            {
                return Err(VerifyError::PrevMismatch { what, seq: c.seq, prev_seq, line });
            }
        }
        check_signature(&self.key, kind, &c, !self.v2_seen).map_err(|p| match p {
            SignatureProblem::Invalid => VerifyError::BadSignature { what, seq: c.seq, line },
            SignatureProblem::OldFormat => VerifyError::OldFormat { what, seq: c.seq, line },
        })?;
        if c.prev.is_some() {
            self.v2_seen = true;
        }
        match kind {
            SigKind::Checkpoint => {
                self.due = None;
                self.checkpoints += 1;
            }
            SigKind::Head => self.head = Some(c),
        }
        Ok(())
    }

    /// `(seq, hash, prev)` a head over what was read so far would sign (`None`: nothing
    /// read). For the server, which checks its own history (from entry 1) as it exports.
    pub fn head_fields(&self) -> Result<Option<(u64, String, String)>, VerifyError> {
        let Some((seq, hash)) = &self.last else { return Ok(None) };
        if let Some(due) = self.due {
            return Err(VerifyError::MissingCheckpoint { seq: due, line: self.line });
        }
        let prev_seq = prev_checkpoint_seq(*seq);
        let prev = self.hash_at(prev_seq).ok_or(VerifyError::Start { seq: self.first.unwrap_or(*seq), line: 0 })?;
        Ok(Some((*seq, hash.clone(), prev.to_owned())))
    }

    /// The end of the export: what it proved.
    pub fn finish(self) -> Result<Verified, VerifyError> {
        let (last_seq, _) = self.last.ok_or(VerifyError::Empty)?;
        if let Some(seq) = self.due {
            return Err(VerifyError::MissingCheckpoint { seq, line: self.line + 1 });
        }
        let head = self.head.ok_or(VerifyError::NoHead)?;
        let first_seq = self.first.unwrap_or(last_seq);
        if let Some((seq, (_, anchor_line))) = self.anchors.by_seq.range(last_seq.saturating_add(1)..).next() {
            return Err(VerifyError::AnchorBeyond { seq: *seq, last: last_seq, anchor_line: *anchor_line });
        }
        if let Some(h) = &self.earlier_head
            && self.continues.is_none()
        {
            return Err(if h.seq > last_seq {
                VerifyError::EarlierHeadBeyond { seq: h.seq, last: last_seq }
            } else {
                VerifyError::EarlierHeadNotCovered { seq: h.seq, first: first_seq }
            });
        }
        Ok(Verified {
            first_seq,
            last_seq,
            records: self.records,
            checkpoints: self.checkpoints,
            head,
            anchors_matched: self.anchors_matched,
            continues: self.continues,
        })
    }
}

/// Verifies an export (JSON lines) with the server's Ed25519 public key (32 bytes).
pub fn verify_export(text: &str, public_key: &[u8]) -> Result<Verified, VerifyError> {
    Verifier::new(public_key).read(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    /// An export of entries `from..=n` of a trail of `n` (records changed by `tweak`
    /// before hashing), signed by `key` as the server signs.
    fn export_from(from: u64, n: u64, key: &Ed25519KeyPair, tweak: impl Fn(&mut AuditRecord)) -> Vec<String> {
        let mut lines = Vec::new();
        let mut prev = GENESIS.to_owned();
        let mut at_cp = vec![(0u64, GENESIS.to_owned())];
        for seq in 1..=n {
            let mut r = AuditRecord {
                seq,
                time: format!("2026-11-22T02:00:{:02}.000Z", seq % 60),
                principal: "sealer".into(),
                action: "GenerateDataKey".into(),
                keyring: Some("default".into()),
                key_id: Some(format!("{seq:032x}")),
                backup_id: Some(format!("b{seq}")),
                outcome: "ok".into(),
                prev: prev.clone(),
                hash: String::new(),
            };
            tweak(&mut r);
            r.hash = r.compute_hash();
            prev = r.hash.clone();
            if seq >= from {
                lines.push(serde_json::to_string(&r).unwrap());
            }
            if seq % CHECKPOINT_EVERY == 0 {
                let p = &at_cp.iter().find(|(s, _)| *s == prev_checkpoint_seq(seq)).unwrap().1;
                let c = sign(key, SigKind::Checkpoint, seq, &r.hash, p);
                at_cp.push((seq, r.hash.clone()));
                if seq >= from {
                    lines.push(serde_json::to_string(&ExportLine::Checkpoint { checkpoint: c }).unwrap());
                }
            }
        }
        let p = &at_cp.iter().find(|(s, _)| *s == prev_checkpoint_seq(n)).unwrap().1;
        let head = sign(key, SigKind::Head, n, &prev, p);
        lines.push(serde_json::to_string(&ExportLine::Head { head }).unwrap());
        lines
    }

    fn export(n: u64, key: &Ed25519KeyPair) -> Vec<String> {
        export_from(1, n, key, |_| {})
    }

    fn key() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn check(lines: &[String], k: &Ed25519KeyPair) -> Result<Verified, VerifyError> {
        verify_export(&lines.join("\n"), k.public_key().as_ref())
    }

    fn line_of(lines: &[String], prefix: &str) -> usize {
        lines.iter().position(|l| l.starts_with(prefix)).unwrap()
    }

    #[test]
    fn a_good_export_verifies_as_the_whole_trail() {
        let k = key();
        let v = check(&export(600, &k), &k).unwrap();
        assert_eq!((v.first_seq, v.last_seq, v.records, v.checkpoints, v.whole()), (1, 600, 600, 2, true));
        assert_eq!(v.to_string(), "audit trail intact: entries 1..600 (600 entries, 2 signed checkpoints, signed head)");
        // A trail that ends on a checkpoint: record, checkpoint, head.
        let v = check(&export(512, &k), &k).unwrap();
        assert_eq!((v.last_seq, v.checkpoints), (512, 2));
        let v = check(&export(3, &k), &k).unwrap();
        assert_eq!((v.last_seq, v.checkpoints), (3, 0));
    }

    #[test]
    fn each_kind_of_tampering_names_the_entry() {
        let k = key();
        let lines = export(8, &k);
        let bad = |l: Vec<String>| check(&l, &k).unwrap_err();
        // Changed: outcome edited on seq 3 (line 3).
        let mut l = lines.clone();
        l[2] = l[2].replace("\"outcome\":\"ok\"", "\"outcome\":\"denied\"");
        assert_eq!(bad(l), VerifyError::Changed { seq: 3, line: 3 });
        // Changed and re-hashed: the next entry no longer chains.
        let mut l = lines.clone();
        let mut r: AuditRecord = serde_json::from_str(&l[2]).unwrap();
        r.principal = "intruder".into();
        r.hash = r.compute_hash();
        l[2] = serde_json::to_string(&r).unwrap();
        assert_eq!(bad(l), VerifyError::Chain { seq: 4, line: 4 });
        // Removed: seq 6.
        let mut l = lines.clone();
        l.remove(5);
        assert_eq!(bad(l), VerifyError::Sequence { previous: 5, found: 7, line: 6 });
        // Reordered: seq 6 and 7 swapped.
        let mut l = lines.clone();
        l.swap(5, 6);
        assert_eq!(bad(l), VerifyError::Sequence { previous: 5, found: 7, line: 6 });
        // Inserted: a copy of seq 2 after seq 2.
        let mut l = lines.clone();
        let dup = l[1].clone();
        l.insert(2, dup);
        assert_eq!(bad(l), VerifyError::Sequence { previous: 2, found: 2, line: 3 });
        // Cut short: last entry and head removed.
        let mut l = lines.clone();
        l.truncate(l.len() - 2);
        assert_eq!(bad(l), VerifyError::NoHead);
        // Another key.
        let other = key();
        assert!(matches!(check(&lines, &other), Err(VerifyError::BadSignature { what: "head", seq: 8, .. })));
    }

    #[test]
    fn removed_checkpoints_are_named() {
        let k = key();
        let lines = export(600, &k);
        let no_checkpoints: Vec<String> = lines.iter().filter(|l| !l.starts_with("{\"checkpoint\"")).cloned().collect();
        assert_eq!(check(&no_checkpoints, &k).unwrap_err(), VerifyError::MissingCheckpoint { seq: 256, line: 257 });
        // Only the second removed.
        let mut l = lines.clone();
        l.remove(line_of(&l, "{\"checkpoint\":{\"seq\":512"));
        assert_eq!(check(&l, &k).unwrap_err(), VerifyError::MissingCheckpoint { seq: 512, line: 514 });
        // The last entry is at a checkpoint position and its checkpoint is gone.
        let mut l = export(512, &k);
        l.remove(l.len() - 2);
        assert_eq!(check(&l, &k).unwrap_err(), VerifyError::MissingCheckpoint { seq: 512, line: 514 });
    }

    #[test]
    fn a_cut_export_with_a_checkpoint_relabelled_as_head_fails() {
        let k = key();
        let lines = export(600, &k);
        let at = line_of(&lines, "{\"checkpoint\":{\"seq\":256");
        let mut cut: Vec<String> = lines[..=at].to_vec();
        cut[at] = cut[at].replacen("{\"checkpoint\":", "{\"head\":", 1);
        assert_eq!(check(&cut, &k).unwrap_err(), VerifyError::MissingCheckpoint { seq: 256, line: at + 1 });
        // Relabelled after its own checkpoint line too: the signature names its kind.
        let mut cut: Vec<String> = lines[..=at].to_vec();
        cut.push(lines[at].replacen("{\"checkpoint\":", "{\"head\":", 1));
        assert_eq!(check(&cut, &k).unwrap_err(), VerifyError::BadSignature { what: "head", seq: 256, line: at + 2 });
    }

    #[test]
    fn a_partial_export_says_what_it_proves() {
        let k = key();
        let lines = export(600, &k);
        // Cut the first ten entries off a whole export.
        let v = check(&lines[10..], &k).unwrap();
        assert!(!v.whole());
        assert_eq!((v.first_seq, v.last_seq, v.records), (11, 600, 590));
        let s = v.to_string();
        assert!(s.contains("entries 11..600") && s.contains("entries before 11 not checked"), "{s}");
        assert!(!s.contains("intact"), "{s}");
        // The server's own partial export (starting after the first checkpoint) too.
        let v = check(&export_from(300, 600, &k, |_| {}), &k).unwrap();
        assert_eq!((v.first_seq, v.checkpoints), (300, 1));
        // A record at seq 1 that does not start the chain.
        let mut l = lines.clone();
        let mut r: AuditRecord = serde_json::from_str(&l[0]).unwrap();
        r.prev = "11".repeat(32);
        r.hash = r.compute_hash();
        l[0] = serde_json::to_string(&r).unwrap();
        assert_eq!(check(&l, &k).unwrap_err(), VerifyError::Start { seq: 1, line: 1 });
    }

    fn v1(c: &Checkpoint, k: &Ed25519KeyPair) -> Checkpoint {
        use base64::Engine;
        let sig = k.sign(&checkpoint_message_v1(c.seq, &c.hash));
        Checkpoint { seq: c.seq, hash: c.hash.clone(), prev: None, signature: base64::engine::general_purpose::STANDARD.encode(sig) }
    }

    fn to_v1(line: &str, k: &Ed25519KeyPair) -> String {
        let ExportLine::Checkpoint { checkpoint } = serde_json::from_str(line).unwrap() else { panic!("{line}") };
        serde_json::to_string(&ExportLine::Checkpoint { checkpoint: v1(&checkpoint, k) }).unwrap()
    }

    #[test]
    fn format_1_checkpoints_verify_only_before_format_2_and_never_as_a_head() {
        let k = key();
        let lines = export(600, &k);
        let first = line_of(&lines, "{\"checkpoint\":{\"seq\":256");
        let second = line_of(&lines, "{\"checkpoint\":{\"seq\":512");
        // An older store: the first checkpoint is format 1, the rest format 2.
        let mut l = lines.clone();
        l[first] = to_v1(&l[first], &k);
        assert_eq!(check(&l, &k).unwrap().checkpoints, 2);
        // Format 1 after format 2: refused.
        let mut l = lines.clone();
        l[second] = to_v1(&l[second], &k);
        assert_eq!(check(&l, &k).unwrap_err(), VerifyError::OldFormat { what: "checkpoint", seq: 512, line: second + 1 });
        // A format 1 checkpoint relabelled as head (the old attack): refused.
        let mut cut: Vec<String> = lines[..=first].to_vec();
        cut[first] = to_v1(&cut[first], &k);
        cut.push(cut[first].replacen("{\"checkpoint\":", "{\"head\":", 1));
        assert_eq!(check(&cut, &k).unwrap_err(), VerifyError::OldFormat { what: "head", seq: 256, line: first + 2 });
    }

    #[test]
    fn a_checkpoint_bound_to_another_previous_checkpoint_is_refused() {
        let k = key();
        let mut l = export(600, &k);
        let at = line_of(&l, "{\"checkpoint\":{\"seq\":512");
        let ExportLine::Checkpoint { checkpoint } = serde_json::from_str(&l[at]).unwrap() else { panic!() };
        let forged = sign(&k, SigKind::Checkpoint, 512, &checkpoint.hash, GENESIS);
        l[at] = serde_json::to_string(&ExportLine::Checkpoint { checkpoint: forged }).unwrap();
        assert_eq!(check(&l, &k).unwrap_err(), VerifyError::PrevMismatch { what: "checkpoint", seq: 512, prev_seq: 256, line: at + 1 });
    }

    #[test]
    fn since_head_proves_that_a_new_export_continues_an_earlier_one() {
        let k = key();
        let pk = k.public_key().as_ref().to_vec();
        let earlier = check(&export(300, &k), &k).unwrap();
        let later = export(600, &k);
        let v = Verifier::new(&pk).since_head(earlier.head.clone()).read(later.join("\n").as_bytes()).unwrap();
        assert_eq!(v.continues, Some(300));
        // A partial later export that still covers the earlier head.
        let part = export_from(290, 600, &k, |_| {});
        assert_eq!(Verifier::new(&pk).since_head(earlier.head.clone()).read(part.join("\n").as_bytes()).unwrap().continues, Some(300));
        // History rewritten (and re-signed by whoever holds the key) since the earlier export.
        let rewritten = export_from(1, 600, &k, |r| {
            if r.seq == 10 {
                r.outcome = "denied: no".into();
            }
        });
        let e = Verifier::new(&pk).since_head(earlier.head.clone()).read(rewritten.join("\n").as_bytes()).unwrap_err();
        assert_eq!(e, VerifyError::EarlierHeadMismatch { seq: 300, line: 301 });
        // Starts after the earlier head; ends before it.
        let late = export_from(301, 600, &k, |_| {});
        let e = Verifier::new(&pk).since_head(earlier.head.clone()).read(late.join("\n").as_bytes()).unwrap_err();
        assert_eq!(e, VerifyError::EarlierHeadNotCovered { seq: 300, first: 301 });
        let short = export(200, &k);
        let e = Verifier::new(&pk).since_head(earlier.head.clone()).read(short.join("\n").as_bytes()).unwrap_err();
        assert_eq!(e, VerifyError::EarlierHeadBeyond { seq: 300, last: 200 });
    }

    #[test]
    fn anchors_catch_a_re_signed_rewrite_and_a_cut_end() {
        let k = key();
        let pk = k.public_key().as_ref().to_vec();
        let lines = export(600, &k);
        // What the server anchored: its checkpoints and this export's head, as syslog lines.
        let anchored: String = lines
            .iter()
            .filter(|l| !l.starts_with("{\"seq\""))
            .map(|l| format!("<38>1 2026-12-07T01:00:00.000Z kms-1 kms-server 42 audit - {l}\n"))
            .collect();
        let anchors = || Anchors::read(anchored.as_bytes(), &pk).unwrap();
        assert_eq!(anchors().len(), 3);
        let v = Verifier::new(&pk).with_anchors(anchors()).read(lines.join("\n").as_bytes()).unwrap();
        assert_eq!(v.anchors_matched, 3);
        // The key holder rewrites entry 10 and re-signs everything: the export alone verifies...
        let rewritten = export_from(1, 600, &k, |r| {
            if r.seq == 10 {
                r.principal = "someone-else".into();
            }
        });
        assert!(check(&rewritten, &k).unwrap().whole());
        // ...but not against the anchors.
        let e = Verifier::new(&pk).with_anchors(anchors()).read(rewritten.join("\n").as_bytes()).unwrap_err();
        assert_eq!(e, VerifyError::AnchorMismatch { seq: 256, line: 256, anchor_line: 1 });
        // Cut at 400 and re-signed: the anchors name entries beyond the end.
        let cut = export(400, &k);
        let e = Verifier::new(&pk).with_anchors(anchors()).read(cut.join("\n").as_bytes()).unwrap_err();
        assert_eq!(e, VerifyError::AnchorBeyond { seq: 512, last: 400, anchor_line: 2 });
        // An anchor signed by another key is refused, naming its line.
        let other = key();
        let e = Anchors::read(anchored.as_bytes(), other.public_key().as_ref()).unwrap_err();
        assert_eq!(e, VerifyError::AnchorBadSignature { what: "checkpoint", seq: 256, line: 1 });
    }

    #[test]
    fn an_overlong_line_is_named_and_not_read_whole() {
        let k = key();
        let mut text = export(3, &k)[..1].join("\n");
        text.push('\n');
        text.push_str(&"x".repeat(MAX_LINE + 10));
        assert_eq!(check(&[text], &k).unwrap_err(), VerifyError::LineTooLong { line: 2, max: MAX_LINE });
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
