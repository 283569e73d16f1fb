//! Lines of `kmsctl`'s human-readable output that carry text from the server, built in
//! one place so that every such value goes through the one escaping function
//! ([`kms_client::escape`]): a refused request's keyring, backup id or key id is chosen by
//! whoever sent it, and reaches the auditor's screen through `kmsctl audit tail`.

use kluis_proto::audit::RecordView;

pub use kms_client::escape::{Esc, escape};

/// One record of `kmsctl audit tail`: `seq time principal action keyring outcome [key id]`,
/// every text field escaped, so a record is always exactly one line on the screen.
pub fn audit_tail_line(r: &RecordView) -> String {
    let key = match &r.key_id {
        Some(k) => format!(" key {}", Esc(k)),
        None => String::new(),
    };
    format!(
        "{:>8} {} {:<16} {:<18} {:<14} {}{key}",
        r.seq,
        Esc(&r.time),
        Esc(&r.principal),
        Esc(&r.action),
        Esc(r.keyring.as_deref().unwrap_or("-")),
        Esc(&r.outcome),
    )
}

/// The line `kmsctl audit tail` shows for an export line it cannot read; `why` (a parser's
/// message, which may quote the line) escaped.
pub fn audit_unreadable_line(why: &str) -> String {
    format!("{:>8} (a line this kmsctl cannot read: {})", "?", Esc(why))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(keyring: &str, key_id: Option<&str>, outcome: &str) -> RecordView {
        serde_json::from_value(serde_json::json!({
            "seq": 7,
            "time": "2026-01-01T00:00:00Z",
            "principal": "nobody",
            "action": "generate_data_key",
            "keyring": keyring,
            "key_id": key_id,
            "outcome": outcome,
        }))
        .unwrap()
    }

    #[test]
    fn a_forged_line_and_escape_sequences_stay_on_one_escaped_line() {
        let hostile = "ehr\u{1b}[2J\u{1b}[H\n       8 2026-01-01T00:00:01Z officer1         unwrap_data_key    ehr            ok";
        let r = record(hostile, Some("k\u{9b}31m"), "denied: no grant\r\u{202e}");
        let line = audit_tail_line(&r);
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(!line.chars().any(|c| c.is_control() || c == '\u{202e}'), "{line:?}");
        assert!(line.contains("ehr\\u{1b}[2J\\u{1b}[H\\u{a}       8 2026-01-01T00:00:01Z officer1"), "{line}");
        assert!(line.ends_with("denied: no grant\\u{d}\\u{202e} key k\\u{9b}31m"), "{line}");
        assert!(line.starts_with("       7 2026-01-01T00:00:00Z nobody           generate_data_key  ehr\\u{1b}"), "{line}");
    }

    #[test]
    fn an_ordinary_record_is_shown_as_before() {
        let r = record("ehr-db", None, "ok");
        assert_eq!(
            audit_tail_line(&r),
            "       7 2026-01-01T00:00:00Z nobody           generate_data_key  ehr-db         ok"
        );
        let r = record("ehr-db", Some("0123"), "ok");
        assert!(audit_tail_line(&r).ends_with("ok key 0123"));
    }

    #[test]
    fn an_unreadable_line_is_escaped_too() {
        let line = audit_unreadable_line("expected value at line 1 column 1: \u{1b}[2J\nforged");
        assert_eq!(line.lines().count(), 1);
        assert!(line.contains("\\u{1b}[2J\\u{a}forged"), "{line}");
    }
}
