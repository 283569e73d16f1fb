//! `backup-hook rewrap`: moving sealed files to the keyring's newest version by
//! rewriting only their header (issue #6, point 2).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use kluis_tests::*;

/// Seals `data` into the file `path` as the sealer.
fn seal_to(server: &Server, path: &Path, backup_id: &str, data: &[u8]) {
    let out = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", backup_id, "-o", s(path)], data);
    assert!(out.status.success(), "seal: {}", stderr(&out));
}

fn rewrap(server: &Server, identity: &str, files: &[&Path]) -> Output {
    let mut args = vec!["rewrap"];
    args.extend(files.iter().map(|f| s(f)));
    server.backup_hook(identity, &args, b"")
}

fn rotate(server: &Server) {
    let out = server.kmsctl("officer", &["keyring", "rotate", "default"]);
    assert!(out.status.success(), "rotate: {}", stderr(&out));
}

/// Length of the age header at the start of `b` (through the MAC line).
fn header_len(b: &[u8]) -> usize {
    let at = b.windows(5).position(|w| w == b"\n--- ").expect("an age header") + 1;
    at + b[at..].iter().position(|&c| c == b'\n').unwrap() + 1
}

fn journal_of(path: &Path) -> PathBuf {
    path.with_file_name(format!(".{}.kluis-rewrap", path.file_name().unwrap().to_str().unwrap()))
}

/// Flips one character of the header MAC.
fn tamper_mac(bytes: &mut [u8]) {
    let m = header_len(bytes) - 10;
    bytes[m] = if bytes[m] == b'A' { b'B' } else { b'A' };
}

/// Retires the versions below `below` of `default` under dual control, forced: the tests
/// leave a file under the old version on purpose, to see it refused afterwards.
fn retire(server: &Server, officer2: &Path, below: &str) {
    let out = server.kmsctl("officer", &["keyring", "retire", "default", "--below-version", below]);
    assert_eq!(out.status.code(), Some(4), "refused while a key is still under the old version: {}", stderr(&out));
    assert!(stderr(&out).contains("would strand 1 active key(s)"), "{}", stderr(&out));
    let out = server.kmsctl("officer", &["keyring", "retire", "default", "--below-version", below, "--force"]);
    assert!(out.status.success(), "retire: {}", stderr(&out));
    let id = approval_id(&out);
    let out = kmsctl(officer2, &["approve", &id]);
    assert!(out.status.success(), "approve: {}", stderr(&out));
}

const BIG: u64 = 100 << 20;

#[test]
fn rotate_rewrap_a_100_mib_file_then_retire() {
    let mut server = Server::start();
    let officer2 = server.add_officer("officer2");
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.age");
    let big = dir.path().join("big.age");
    let new = dir.path().join("new.age");
    seal_to(&server, &old, "old-backup", b"old backup");
    let mut data = Vec::with_capacity(BIG as usize);
    std::io::Read::read_to_end(&mut Pattern::new(42, BIG), &mut data).unwrap();
    let (plain_digest, _) = digest_reader(data.as_slice());
    seal_to(&server, &big, "big-backup", &data);
    drop(data);

    rotate(&server);

    // New seals use the new version.
    seal_to(&server, &new, "new-backup", b"new backup");
    let out = rewrap(&server, "restorer", &[&new]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("already current (keyring default version 2)"), "{}", stdout(&out));
    // Old seals still unseal.
    let out = server.backup_hook("restorer", &["unseal", "-i", s(&old)], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"old backup");

    // Rewrap the 100 MiB file: same inode, same length, same payload bytes.
    let before = std::fs::read(&big).unwrap();
    let h = header_len(&before);
    let payload_before = digest_reader(&before[h..]);
    let ino = std::fs::metadata(&big).unwrap().ino();
    drop(before);
    let out = rewrap(&server, "restorer", &[&big]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("rewrapped {}: keyring default version 1 -> 2", s(&big)));
    assert!(!journal_of(&big).exists());
    let after = std::fs::read(&big).unwrap();
    assert_eq!(std::fs::metadata(&big).unwrap().ino(), ino, "rewritten in place, not replaced");
    assert_eq!(header_len(&after), h, "same header length");
    assert_eq!(digest_reader(&after[h..]), payload_before, "payload bytes unchanged");
    drop(after);
    // It now is under version 2, and opens.
    let out = rewrap(&server, "restorer", &[&big]);
    assert!(stdout(&out).contains("already current (keyring default version 2)"), "{}", stdout(&out));
    let restored = dir.path().join("big.out");
    let out = server.backup_hook("restorer", &["unseal", "-i", s(&big), "-o", s(&restored)], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(digest_reader(std::fs::File::open(&restored).unwrap()), (plain_digest.clone(), BIG));
    std::fs::remove_file(&restored).unwrap();

    // Retire version 1 (two officers): the un-rewrapped old file is refused, clearly.
    retire(&server, &officer2, "2");
    let out = server.backup_hook("restorer", &["unseal", "-i", s(&old)], b"");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("version 1 is retired"), "{}", stderr(&out));
    let old_bytes = std::fs::read(&old).unwrap();
    let out = rewrap(&server, "restorer", &[&old]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("retired") && stderr(&out).contains("recovery key"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&old).unwrap(), old_bytes);
    // The rewrapped file still opens.
    let out = server.backup_hook("restorer", &["unseal", "-i", s(&big), "-o", s(&restored)], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(digest_reader(std::fs::File::open(&restored).unwrap()), (plain_digest, BIG));
}

#[test]
fn an_already_current_file_is_not_written() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.age");
    seal_to(&server, &f, "a", b"payload");
    let bytes = std::fs::read(&f).unwrap();
    let m = std::fs::metadata(&f).unwrap();
    let out = server.backup_hook("restorer", &["rewrap", "-i", s(&f)], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("already current (keyring default version 1)"), "{}", stdout(&out));
    let m2 = std::fs::metadata(&f).unwrap();
    assert_eq!((m2.mtime(), m2.mtime_nsec(), m2.ctime(), m2.ctime_nsec()), (m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()));
    assert_eq!(std::fs::read(&f).unwrap(), bytes);
    assert!(!journal_of(&f).exists());
}

#[test]
fn a_sealer_and_a_tampered_header_are_refused_and_the_file_is_untouched() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.age");
    seal_to(&server, &f, "a", b"payload");
    rotate(&server);
    let bytes = std::fs::read(&f).unwrap();

    let out = rewrap(&server, "sealer", &[&f]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("restorer role"), "{}", stderr(&out));
    assert!(stderr(&out).contains("header MAC is keyed from the file key"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&f).unwrap(), bytes);

    let mut bad = bytes.clone();
    tamper_mac(&mut bad);
    std::fs::write(&f, &bad).unwrap();
    let out = rewrap(&server, "restorer", &[&f]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("header MAC does not verify"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&f).unwrap(), bad);
    assert!(!journal_of(&f).exists());

    let out = rewrap(&server, "restorer", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn a_journal_left_by_a_crash_is_completed() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.age");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    seal_to(&server, &f, "a", &data);
    rotate(&server);
    // What the interrupted run would have written: the same file rewrapped (a copy
    // has the same file key and payload nonce, so the same new header).
    let twin = dir.path().join("twin.age");
    std::fs::copy(&f, &twin).unwrap();
    let out = rewrap(&server, "restorer", &[&twin]);
    assert!(out.status.success(), "{}", stderr(&out));
    let done = std::fs::read(&twin).unwrap();
    let h = header_len(&done);
    // The crash: the journal is durable, the header in the file half written.
    let mut torn = std::fs::read(&f).unwrap();
    assert_eq!(header_len(&torn), h);
    assert_ne!(torn[..h], done[..h]);
    torn[..h / 2].copy_from_slice(&done[..h / 2]);
    std::fs::write(&f, &torn).unwrap();
    std::fs::write(journal_of(&f), &done[..h]).unwrap();
    // The torn file does not open as it is.
    let out = server.backup_hook("restorer", &["unseal", "-i", s(&f)], b"");
    assert!(!out.status.success());

    let out = rewrap(&server, "restorer", &[&f]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("completed an interrupted rewrap from its journal"), "{}", stdout(&out));
    assert_eq!(std::fs::read(&f).unwrap(), done);
    assert!(!journal_of(&f).exists());
    let out = server.backup_hook("restorer", &["unseal", "-i", s(&f)], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, data);
}

#[test]
fn a_batch_with_one_bad_file_fails_and_does_the_others() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (1..=3).map(|i| dir.path().join(format!("f{i}.age"))).collect();
    for (i, f) in files.iter().enumerate() {
        seal_to(&server, f, &format!("b{i}"), format!("backup {i}").as_bytes());
    }
    rotate(&server);
    let mut bad = std::fs::read(&files[1]).unwrap();
    tamper_mac(&mut bad);
    std::fs::write(&files[1], &bad).unwrap();

    // All three forms: an argument, -i, and --files-from on stdin.
    let list = format!("{}\n", s(&files[2]));
    let out = server.backup_hook("restorer", &["rewrap", s(&files[0]), "-i", s(&files[1]), "--files-from", "-"], list.as_bytes());
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 of 3 file(s) failed"), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("{}: the header of the sealed file was altered", s(&files[1]))), "{}", stderr(&out));
    for i in [0, 2] {
        assert!(stdout(&out).contains(&format!("rewrapped {}: keyring default version 1 -> 2", s(&files[i]))), "{}", stdout(&out));
        let o = server.backup_hook("restorer", &["unseal", "-i", s(&files[i])], b"");
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(o.stdout, format!("backup {i}").as_bytes());
    }
    assert_eq!(std::fs::read(&files[1]).unwrap(), bad);
}
