//! What `seal` and `unseal` leave behind: an existing `-o` file is never silently
//! replaced (refused unless `--force`, and the refusal holds even against a file that
//! appears while the stream runs); `seal` names its key id on stderr (and with `--json`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use kluis_tests::*;

/// The key id in a sealed file's Kluis stanza (`-> kluis KEYRING KEYID`).
fn key_id_of(sealed: &[u8]) -> String {
    let h = header(sealed);
    let line = h.lines().find(|l| l.starts_with("-> kluis ")).expect("a kluis stanza");
    line.split_whitespace().nth(3).unwrap().to_owned()
}

fn issued_keys(server: &Server) -> u64 {
    let out = server.kmsctl("officer", &["keyring", "show", "default", "--json"]);
    ok(&out, "keyring show");
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["issued_keys"].as_u64().unwrap()
}

/// The entries of `dir` other than `keep`, e.g. temporary files left behind.
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn seal_refuses_an_existing_output_unless_forced() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("nightly.age");
    let first = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", "n1", "-o", s(&dest)], b"monday");
    ok(&first, "first seal");
    let before = std::fs::read(&dest).unwrap();
    let issued = issued_keys(&server);

    // Again to the same file: refused before a data key is issued, the old file intact.
    let out = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", "n2", "-o", s(&dest)], b"tuesday");
    refused_one_line(&out, 1, &["nightly.age already exists; it was not replaced", "--force"]);
    assert_eq!(std::fs::read(&dest).unwrap(), before);
    assert_eq!(issued_keys(&server), issued, "a data key was issued for a refused seal");
    assert_eq!(others(dir.path(), &["nightly.age"]), Vec::<String>::new(), "left behind");

    // A symbolic link at the name (even dangling) is an existing entry too; nothing is
    // created where it points.
    let link = dir.path().join("link.age");
    let target = dir.path().join("elsewhere.age");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", "n3", "-o", s(&link)], b"x");
    refused_one_line(&out, 1, &["link.age already exists"]);
    assert!(!target.exists() && std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());

    // With --force: replaced atomically, and the new file opens.
    let out = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", "n2", "--force", "-o", s(&dest)], b"tuesday");
    ok(&out, "seal --force");
    let after = std::fs::read(&dest).unwrap();
    assert_ne!(after, before);
    assert_eq!(stdout(&unseal(&server, "restorer", &after)), "tuesday");
    assert_eq!(others(dir.path(), &["nightly.age", "link.age"]), Vec::<String>::new(), "left behind");

    // --force without -o is a usage error.
    let out = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", "n4", "--force"], b"x");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn unseal_refuses_an_existing_output_unless_forced() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let sealed = dir.path().join("b.age");
    std::fs::write(&sealed, seal(&server, "sealer", "default", "b", b"the backup")).unwrap();
    let restored = dir.path().join("restored.sql");
    std::fs::write(&restored, b"the live database, not to be clobbered").unwrap();
    let out = server.backup_hook("restorer", &["unseal", "-i", s(&sealed), "-o", s(&restored)], b"");
    refused_one_line(&out, 1, &["restored.sql already exists; it was not replaced", "--force"]);
    assert_eq!(std::fs::read(&restored).unwrap(), b"the live database, not to be clobbered");
    let out = server.backup_hook("restorer", &["unseal", "-i", s(&sealed), "-o", s(&restored), "--force"], b"");
    ok(&out, "unseal --force");
    assert_eq!(std::fs::read(&restored).unwrap(), b"the backup");
    assert_eq!(others(dir.path(), &["b.age", "restored.sql"]), Vec::<String>::new(), "left behind");
}

/// The check before sealing is not the only guard: a file that appears at the name while
/// the stream runs is not replaced either (the final rename refuses an existing name).
/// The input is a FIFO, so the seal is held after its check without any sleeping: the
/// test's open of the FIFO for writing returns only once backup-hook opened it for reading,
/// which it does after checking the output.
#[test]
fn a_file_that_appears_while_sealing_is_not_replaced() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("input.fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    let dest = dir.path().join("race.age");
    let child = Command::new(bin("backup-hook"))
        .args(["--client-config", s(&server.client("sealer")), "seal", "--keyring", "default", "--backup-id", "race"])
        .args(["-i", s(&fifo), "-o", s(&dest)])
        .env_remove("KLUIS_CLIENT_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Should backup-hook exit without opening the FIFO, its exit opens it here (read and
    // write never blocks), so the open below returns and the test fails instead of hanging.
    let (fifo2, (tx, rx)) = (fifo.clone(), std::sync::mpsc::channel());
    std::thread::spawn(move || {
        let out = child.wait_with_output().unwrap();
        let keep = std::fs::OpenOptions::new().read(true).write(true).open(&fifo2).unwrap();
        tx.send((out, keep)).unwrap();
    });
    let mut writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    std::fs::write(&dest, b"appeared meanwhile").unwrap();
    writer.write_all(b"the backup").unwrap();
    drop(writer);
    let (out, _keep) = rx.recv().unwrap();
    refused_one_line(&out, 1, &["race.age already exists; it was not replaced"]);
    assert_eq!(std::fs::read(&dest).unwrap(), b"appeared meanwhile");
    assert_eq!(others(dir.path(), &["race.age", "input.fifo"]), Vec::<String>::new(), "left behind");
}

#[test]
fn seal_names_its_key_id_on_stderr_and_in_json() {
    let server = Server::start();
    // To stdout: the sealed stream alone on stdout, the key id on stderr.
    let out = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", "db/2026-12-07"], b"dump");
    ok(&out, "seal");
    let id = key_id_of(&out.stdout);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    for words in [&format!("key id {id}") as &str, "keyring default version 1", "sealed backup db/2026-12-07 (4 bytes)", "escrow copy: NO"] {
        assert!(err.contains(words), "{words:?} in {err}");
    }
    // The id printed is the one the server knows the backup by.
    let show = server.kmsctl("officer", &["key", "show", &id, "--json"]);
    ok(&show, "key show");
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["backup_id"], "db/2026-12-07");

    // --json: one JSON object on stderr.
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("j.age");
    let out = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", "j1", "--json", "-o", s(&dest)], b"hello");
    ok(&out, "seal --json");
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(&err).unwrap();
    assert_eq!(v["key_id"], key_id_of(&std::fs::read(&dest).unwrap()));
    assert_eq!(v["keyring"], "default");
    assert_eq!(v["keyring_version"], 1);
    assert_eq!(v["backup_id"], "j1");
    assert_eq!(v["escrowed"], false);
    assert_eq!(v["plaintext_bytes"], 5);
}

/// `kmsctl audit export -o` follows the same rule: an earlier export is not replaced
/// without --force.
#[test]
fn an_audit_export_is_not_written_over_an_earlier_one_unless_forced() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    std::fs::write(&file, b"last month's export\n").unwrap();
    let out = server.kmsctl("auditor", &["audit", "export", "-o", s(&file)]);
    refused_one_line(&out, 1, &["audit.jsonl already exists; it was not replaced", "--force"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"last month's export\n");
    let out = server.kmsctl("auditor", &["audit", "export", "-o", s(&file), "--force"]);
    ok(&out, "audit export --force");
    assert!(std::fs::read_to_string(&file).unwrap().starts_with('{'));
    assert_eq!(others(dir.path(), &["audit.jsonl"]), Vec::<String>::new(), "left behind");
}
