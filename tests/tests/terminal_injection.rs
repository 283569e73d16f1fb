//! Terminal and log injection through the CLIs (issue #15, point 3): a request whose
//! keyring or backup id holds escape sequences and a newline followed by a forged audit
//! line reaches the auditor through `kmsctl audit tail`, `kmsctl report` and the error
//! messages of both CLIs; every one of them shows it escaped, on one line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Output;

use kluis_tests::*;

/// What an attacker would like the auditor to see: the screen cleared, then an entry
/// that looks like an officer's successful unwrap.
const FORGED: &str = "       9 2026-01-01T00:00:00Z officer          UnwrapDataKey      default        ok";

fn hostile(prefix: &str) -> String {
    format!("{prefix}\u{1b}[2J\u{1b}[H\u{1b}]0;owned\u{7}\n{FORGED}\u{9b}31m\u{202e}")
}

/// Characters that drive a terminal or reorder text: C0 and C1 controls, DEL, line
/// separators, bidi controls (defined here, not taken from the code under test).
fn drives_a_terminal(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// No control character but the line feeds between lines, no bidi override, and no line
/// that is the forged one.
fn assert_clean(what: &str, text: &str) {
    for (i, line) in text.lines().enumerate() {
        assert!(
            !line.chars().any(drives_a_terminal),
            "{what}: line {} holds a raw control character: {line:?}",
            i + 1
        );
        assert!(!line.starts_with(FORGED.trim_start()) && !line.starts_with(FORGED), "{what}: a forged line: {line:?}");
    }
    assert!(!text.contains('\r') && !text.contains('\u{1b}'), "{what}: {text:?}");
}

fn out_text(o: &Output) -> (String, String) {
    (stdout(o), stderr(o))
}

#[test]
fn hostile_request_text_reaches_the_auditor_escaped() {
    let server = Server::start();
    let keyring = hostile("ehr");
    let backup_id = hostile("b1");

    // A sealer asks for a keyring it has no grant on: refused, and audited.
    let o = server.kmsctl("sealer", &["keyring", "show", &keyring]);
    assert!(!o.status.success());
    let (out, err) = out_text(&o);
    assert_clean("kmsctl keyring show (stderr)", &err);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("kmsctl: error: "), "{err}");
    assert_clean("kmsctl keyring show (stdout)", &out);

    // The same through backup-hook, on a keyring that does not exist.
    let o = server.backup_hook("sealer", &["seal", "--keyring", &keyring, "--backup-id", "b0"], b"data");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_clean("backup-hook seal (stderr)", &err);
    assert!(err.lines().all(|l| l.starts_with("backup-hook: ")), "{err}");

    // A backup id of the same kind on the sealer's own keyring (accepted or refused,
    // whichever the server does with it, it is recorded).
    let o = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", &backup_id], b"data");
    let err = stderr(&o);
    assert_clean("backup-hook seal with a hostile backup id (stderr)", &err);

    // The auditor's views.
    let o = server.kmsctl("auditor", &["audit", "tail", "-n", "100"]);
    let (tail, err) = out_text(&o);
    assert!(o.status.success(), "{err}");
    assert_clean("kmsctl audit tail", &tail);
    // Refused at validation (the names are not valid) or at authorization: either way
    // recorded, and shown with the hostile text escaped.
    let refused: Vec<&str> =
        tail.lines().filter(|l| l.contains("sealer") && (l.contains("denied") || l.contains("failed"))).collect();
    assert!(refused.iter().any(|l| l.contains("\\u{1b}")), "the refused requests are shown, escaped:\n{tail}");
    // Every line of the tail is one record: it starts with its sequence number.
    for line in tail.lines() {
        let seq = line.trim_start().split(' ').next().unwrap();
        assert!(seq.parse::<u64>().is_ok() || seq == "?", "not a record line: {line:?}");
    }

    for format in ["text", "html"] {
        let o = server.kmsctl("auditor", &["report", "--format", format]);
        let (report, err) = out_text(&o);
        assert!(o.status.success(), "{err}");
        assert_clean(&format!("kmsctl report --format {format}"), &report);
    }
    // Machine formats stay valid JSON: every control character is a JSON escape.
    let o = server.kmsctl("auditor", &["report", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json = stdout(&o);
    assert!(!json.contains('\u{1b}'));
    serde_json::from_str::<serde_json::Value>(&json).unwrap();
    let o = server.kmsctl("auditor", &["audit", "export"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let export = stdout(&o);
    assert!(!export.contains('\u{1b}'));
    for line in export.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}

#[test]
fn hostile_file_names_are_escaped_in_backup_hook_messages() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    // A file name chosen by whoever could write into the backup directory.
    let name = format!("x\u{1b}[2J\n{FORGED}.age");
    let path = dir.path().join(&name);
    std::fs::write(&path, b"not a sealed file").unwrap();
    let o = server.backup_hook("restorer", &["rewrap", s(&path)], b"");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_clean("backup-hook rewrap (stderr)", &err);
    assert!(err.contains("x\\u{1b}[2J\\u{a}"), "{err}");
}
