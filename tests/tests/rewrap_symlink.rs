//! `backup-hook rewrap` never follows a link planted at its journal's name (issue #15,
//! point 3, "Symlink in rewrap"): through the real binary, against the real server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use kluis_tests::*;

fn journal_of(path: &Path) -> PathBuf {
    path.with_file_name(format!(".{}.kluis-rewrap", path.file_name().unwrap().to_str().unwrap()))
}

#[test]
fn a_link_at_the_journal_name_fails_the_rewrap_and_creates_nothing_elsewhere() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let file = dir.path().join("old.age");
    let out = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", "b1", "-o", s(&file)], b"payload");
    assert!(out.status.success(), "seal: {}", stderr(&out));
    let out = server.kmsctl("officer", &["keyring", "rotate", "default"]);
    assert!(out.status.success(), "rotate: {}", stderr(&out));
    let before = std::fs::read(&file).unwrap();

    // A dangling link: a run that follows it creates the victim.
    let victim = elsewhere.path().join("victim");
    let journal = journal_of(&file);
    std::os::unix::fs::symlink(&victim, &journal).unwrap();
    let out = server.backup_hook("restorer", &["rewrap", s(&file)], b"");
    assert!(!out.status.success(), "rewrap through a planted link succeeded: {}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("is a symbolic link, not a rewrap journal this command made"), "{err}");
    assert!(err.contains("the file was not changed"), "{err}");
    assert!(std::fs::symlink_metadata(&victim).is_err(), "a file was created through the link");
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    assert_eq!(std::fs::read(&file).unwrap(), before);

    // Once the operator removes it, the same command rewraps the file.
    std::fs::remove_file(&journal).unwrap();
    let out = server.backup_hook("restorer", &["rewrap", s(&file)], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("version 1 -> 2"), "{}", stdout(&out));
    assert!(std::fs::symlink_metadata(&journal).is_err());
    let out = server.backup_hook("restorer", &["unseal", "-i", s(&file)], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"payload");
}
