//! `backup-hook rewrap` brings backups sealed before the escrow ceremony under escrow
//! (issue 19, point 4): it adds an X25519 stanza to the recovery recipient in force, and
//! the server (MarkDataKeyEscrowed) then counts the key as escrowed in the report.
//! The real `kms-server`, `kmsctl` and `backup-hook` binaries, and the stock `age` and
//! `age-keygen` commands.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kluis_proto::v1 as pb;
use kluis_tests::*;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Runs a stock system command (`age`, `age-keygen`).
fn stock(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("`{cmd}` could not be run ({e}); install it with `apt-get install age`"))
}

/// A ceremony of `k` of the custodians `names` (their keys made by the stock
/// `age-keygen`); returns the manifest, the recovery recipient and the custodian keys.
fn ceremony(dir: &Path, k: u8, names: &[&str]) -> (PathBuf, String, Vec<PathBuf>) {
    let mut args: Vec<String> = vec!["escrow".into(), "ceremony".into(), "--threshold".into(), k.to_string()];
    let mut keys = Vec::new();
    for n in names {
        let key = dir.join(format!("{n}.key"));
        ok(&stock("age-keygen", &["-o", s(&key)]), "age-keygen -o");
        let y = stock("age-keygen", &["-y", s(&key)]);
        ok(&y, "age-keygen -y");
        args.extend(["--custodian".into(), format!("{n}={}", stdout(&y).trim())]);
        keys.push(key);
    }
    let out_dir = dir.join("ceremony");
    args.extend(["--out".into(), s(&out_dir).to_owned()]);
    let o = kmsctl_offline(&args.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&o, "escrow ceremony");
    let manifest = out_dir.join("manifest.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    (manifest, json["recovery_recipient"].as_str().unwrap().to_owned(), keys)
}

/// `kmsctl escrow install` as the officer, approved by a second officer (`dev`) when the
/// install needs dual control.
fn install(server: &Server, manifest: &Path) {
    install_with(server, &[], manifest);
}

fn install_with(server: &Server, flags: &[&str], manifest: &Path) {
    let mut args = vec!["escrow", "install"];
    args.extend_from_slice(flags);
    args.push(s(manifest));
    let o = server.kmsctl("officer", &args);
    ok(&o, "escrow install");
    if stdout(&o).contains("kmsctl approve ") {
        ok(&server.kmsctl("dev", &["approve", &approval_id(&o)]), "approve the install");
    }
}

/// The keys without escrow of keyring `default`, as the officer's report counts them
/// (and `escrow status`, which must agree).
fn without_escrow(server: &Server) -> u64 {
    let o = server.kmsctl("auditor", &["report", "--format", "json"]);
    ok(&o, "report --format json");
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ring = rep["keyrings"].as_array().unwrap().iter().find(|k| k["name"] == "default").unwrap();
    let n = ring["keys_without_escrow"].as_u64().unwrap();
    let o = server.kmsctl("officer", &["escrow", "status", "--json"]);
    ok(&o, "escrow status --json");
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["keys_without_escrow"].as_u64(), Some(n), "report and escrow status disagree: {st}");
    n
}

fn seal_to(server: &Server, path: &Path, backup_id: &str, data: &[u8]) {
    let out = server.backup_hook("sealer", &["seal", "--keyring", "default", "--backup-id", backup_id, "-o", s(path)], data);
    ok(&out, "seal");
}

fn header_len(b: &[u8]) -> usize {
    let at = b.windows(5).position(|w| w == b"\n--- ").expect("an age header") + 1;
    at + b[at..].iter().position(|&c| c == b'\n').unwrap() + 1
}

fn x25519_stanzas(b: &[u8]) -> usize {
    header(b).matches("\n-> X25519 ").count()
}

/// The text of the stanza that starts with `-> TAG`, through its body (the testkit's
/// `header` ends before the `---` line).
fn stanza(b: &[u8], tag: &str) -> String {
    let h = header(b);
    let start = h.find(&format!("-> {tag} ")).unwrap();
    let rest = &h[start + 3..];
    let end = rest.find("\n-> ").map_or(h.len(), |p| start + 3 + p);
    h[start..end].to_owned()
}

/// The MarkDataKeyEscrowed audit entries.
fn mark_entries(server: &Server) -> Vec<String> {
    let o = server.kmsctl("auditor", &["audit", "export"]);
    ok(&o, "audit export");
    stdout(&o).lines().filter(|l| l.contains("\"action\":\"MarkDataKeyEscrowed\"")).map(str::to_owned).collect()
}

async fn channel(server: &Server, who: &str) -> Channel {
    let pki = server.data_dir().join("pki");
    let ca = std::fs::read(pki.join("ca.pem")).unwrap();
    let (cert, key) = (pki.join(format!("clients/{who}.pem")), pki.join(format!("clients/{who}.key")));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap()
}

/// The key id and wrapped key of a sealed file's Kluis stanza (`-> kluis KEYRING KEY_ID`,
/// body: the wrapped data key, then the encrypted file key).
fn kluis_stanza(b: &[u8]) -> (String, Vec<u8>) {
    use base64::Engine;
    let text = stanza(b, "kluis");
    let mut lines = text.lines();
    let args: Vec<&str> = lines.next().unwrap().split(' ').collect();
    let body: String = lines.collect();
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD.decode(body).unwrap();
    (args[3].to_owned(), bytes[..bytes.len() - 32].to_vec())
}

/// A backup sealed before the ceremony: 1 key without escrow; `rewrap` adds the stanza
/// (payload untouched) and the report counts 0; two of three custodians rebuild the
/// recovery key and the stock `age` opens the file; a second rewrap changes nothing.
#[test]
fn rewrap_brings_a_backup_sealed_before_the_escrow_under_it() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let server = Server::start();
    let backups = w.join("backups");
    std::fs::create_dir(&backups).unwrap();
    let old = backups.join("old.age");
    let data = sample(7, 200_003);
    seal_to(&server, &old, "ehr-db/2026-01-01/full", &data);
    let before = std::fs::read(&old).unwrap();
    assert_eq!(x25519_stanzas(&before), 0, "sealed before any escrow: {}", header(&before));

    // Before the ceremony: rewrap has nothing to add.
    let o = server.backup_hook("restorer", &["rewrap", s(&old)], b"");
    ok(&o, "rewrap without escrow");
    assert!(stdout(&o).contains("already current (keyring default version 1); not written"), "{}", stdout(&o));
    assert_eq!(std::fs::read(&old).unwrap(), before);

    let (manifest, recipient, keys) = ceremony(w, 2, &["ann", "bob", "cas"]);
    install(&server, &manifest);
    assert_eq!(without_escrow(&server), 1, "the old key has no escrow yet");

    let mode_before = mode(&old);
    let o = server.backup_hook("restorer", &["rewrap", s(&old)], b"");
    ok(&o, "rewrap");
    let said = stdout(&o);
    assert!(
        said.contains(&format!("keyring default version 1 (unchanged); escrow stanza added (recovery recipient {recipient})")),
        "{said}"
    );
    let after = std::fs::read(&old).unwrap();
    assert_eq!(x25519_stanzas(&after), 1, "{}", header(&after));
    assert_eq!(after[header_len(&after)..], before[header_len(&before)..], "the payload bytes after the header are unchanged");
    assert_eq!(stanza(&after, "kluis"), stanza(&before, "kluis"), "the Kluis stanza is kept byte for byte");
    assert_eq!(mode(&old), mode_before, "the mode is kept");
    assert_eq!(without_escrow(&server), 0, "the report now counts the key as escrowed");
    let marks = mark_entries(&server);
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert!(marks[0].contains(&recipient) && marks[0].contains("\"principal\":\"restorer\""), "{}", marks[0]);
    // Through the server it still opens.
    let o = unseal(&server, "restorer", &after);
    ok(&o, "unseal after rewrap");
    assert_eq!(o.stdout, data);

    // Twice: nothing changes, no new escrow audit entry; --json says so per file.
    let o = server.backup_hook("restorer", &["rewrap", "--json", s(&old)], b"");
    ok(&o, "rewrap --json again");
    let line: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(line["escrow"], "present", "{line}");
    assert_eq!(line["recovery_recipient"], recipient.as_str());
    assert!(line["written"].is_null(), "{line}");
    assert_eq!((line["from_version"].as_u64(), line["to_version"].as_u64()), (Some(1), Some(1)));
    assert_eq!(std::fs::read(&old).unwrap(), after, "the second rewrap wrote nothing");
    assert_eq!(mark_entries(&server).len(), 1);
    let o = server.backup_hook("restorer", &["rewrap", s(&old)], b"");
    ok(&o, "rewrap a third time");
    assert!(
        stdout(&o).contains(&format!("already current (keyring default version 1); escrow stanza present (recovery recipient {recipient}); not written")),
        "{}",
        stdout(&o)
    );
    assert_eq!(std::fs::read(&old).unwrap(), after);
    assert_eq!(mark_entries(&server).len(), 1);

    // The disaster: no server. Two of three custodians decrypt their shares with the stock
    // age, combine them, and the stock age opens the old backup with the rebuilt key.
    let cer = w.join("ceremony");
    let mut texts = Vec::new();
    for (name, key) in [("ann", &keys[0]), ("cas", &keys[2])] {
        let txt = w.join(format!("share-{name}.txt"));
        let o = stock("age", &["-d", "-i", s(key), "-o", s(&txt), s(&cer.join(format!("share-{name}.age")))]);
        ok(&o, "age -d of a share");
        texts.push(txt);
    }
    let recovery = w.join("recovery.key");
    let o = kmsctl_offline(&["escrow", "combine", "--manifest", s(&manifest), "-o", s(&recovery), s(&texts[0]), s(&texts[1])]);
    ok(&o, "escrow combine");
    let plain = w.join("old.plain");
    let o = stock("age", &["-d", "-i", s(&recovery), "-o", s(&plain), s(&old)]);
    ok(&o, "age -d of the rewrapped backup with the recovery key");
    assert_eq!(std::fs::read(&plain).unwrap(), data);
    // And before the rewrap it could not: the recovery key does not open the old bytes.
    let before_copy = w.join("before.age");
    std::fs::write(&before_copy, &before).unwrap();
    let o = stock("age", &["-d", "-i", s(&recovery), "-o", s(&w.join("no.plain")), s(&before_copy)]);
    assert!(!o.status.success(), "the recovery key opened a file without its stanza");
}

/// A sealer-only identity is refused and the file untouched; a tampered header is refused
/// and untouched; neither is counted as escrowed.
#[test]
fn rewrap_for_escrow_refuses_a_sealer_and_a_tampered_header() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let server = Server::start();
    let f = w.join("old.age");
    seal_to(&server, &f, "old", b"an old backup");
    let (manifest, _, _) = ceremony(w, 2, &["ann", "bob"]);
    install(&server, &manifest);
    let before = std::fs::read(&f).unwrap();

    let o = server.backup_hook("sealer", &["rewrap", s(&f)], b"");
    let msg = refused(&o, 4, &["restorer role"]);
    assert!(msg.contains("the file was not changed"), "{msg}");
    assert_eq!(std::fs::read(&f).unwrap(), before);

    let mut bad = before.clone();
    let m = header_len(&bad) - 10;
    bad[m] = if bad[m] == b'A' { b'B' } else { b'A' };
    std::fs::write(&f, &bad).unwrap();
    let o = server.backup_hook("restorer", &["rewrap", s(&f)], b"");
    refused(&o, 5, &["the file was not changed"]);
    assert_eq!(std::fs::read(&f).unwrap(), bad, "a tampered file is left as it is");
    assert_eq!(x25519_stanzas(&bad), 0);
    assert_eq!(without_escrow(&server), 1);
    assert!(mark_entries(&server).iter().all(|l| !l.contains("\"outcome\":\"ok")), "nothing marked");

    // The refusals were refusals, not a rewrap with nothing to do: the intact file, by a
    // restorer, gets its stanza and the key is counted.
    std::fs::write(&f, &before).unwrap();
    let o = server.backup_hook("restorer", &["rewrap", s(&f)], b"");
    ok(&o, "rewrap of the intact file");
    assert_eq!(x25519_stanzas(&std::fs::read(&f).unwrap()), 1);
    assert_eq!(without_escrow(&server), 0);
}

/// The server marks a key escrowed only for the recipient in force, and only for a
/// restorer: a sealer-only identity and another recipient are refused with a reason,
/// audited, and the count does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_marks_escrowed_only_the_recipient_in_force_for_a_restorer() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let server = Server::start();
    let f = w.join("old.age");
    seal_to(&server, &f, "old", b"an old backup");
    let (key_id, wrapped) = kluis_stanza(&std::fs::read(&f).unwrap());
    let req = |recipient: &str| pb::MarkDataKeyEscrowedRequest {
        key_id: key_id.clone(),
        wrapped_key: wrapped.clone(),
        keyring: "default".into(),
        recovery_recipient: recipient.to_owned(),
    };
    let restorer = pb::key_service_client::KeyServiceClient::new(channel(&server, "restorer").await);
    let other = age::x25519::Identity::generate().to_public().to_string();

    // No escrow at all.
    let st = restorer.clone().mark_data_key_escrowed(req(&other)).await.unwrap_err();
    assert_eq!((st.code(), kluis_proto::error::reason_of(&st)), (Code::FailedPrecondition, Some(kluis_proto::error::Reason::NoEscrow)));

    let (manifest, recipient, _) = ceremony(w, 2, &["ann", "bob"]);
    install(&server, &manifest);
    assert_eq!(without_escrow(&server), 1);

    // A recipient that is not the one in force (the escrow was replaced in between).
    let st = restorer.clone().mark_data_key_escrowed(req(&other)).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert_eq!(kluis_proto::error::reason_of(&st), Some(kluis_proto::error::Reason::EscrowRecipientNotInForce));
    assert!(st.message().contains(&other) && st.message().contains(&recipient), "{}", st.message());
    // Not a recipient at all: the field is named.
    let st = restorer.clone().mark_data_key_escrowed(req("ssh-ed25519")).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("recovery_recipient"), "{}", st.message());
    // A sealer-only identity, with the right recipient.
    let sealer = pb::key_service_client::KeyServiceClient::new(channel(&server, "sealer").await);
    let st = sealer.clone().mark_data_key_escrowed(req(&recipient)).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    // A wrapped key that does not authenticate.
    let mut forged = req(&recipient);
    forged.wrapped_key[20] ^= 1;
    let st = restorer.clone().mark_data_key_escrowed(forged).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert_eq!(without_escrow(&server), 1, "no refusal moved the count");
    let marks = mark_entries(&server);
    assert_eq!(marks.len(), 5, "every refusal is audited: {marks:?}");
    assert!(marks.iter().all(|l| !l.contains("\"outcome\":\"ok")), "{marks:?}");

    // The restorer, with the recipient in force: counted (the audit entry commits with it).
    let r = restorer.clone().mark_data_key_escrowed(req(&recipient)).await.unwrap().into_inner();
    assert!(r.newly_escrowed);
    assert_eq!(without_escrow(&server), 0);
    let r = restorer.clone().mark_data_key_escrowed(req(&recipient)).await.unwrap().into_inner();
    assert!(!r.newly_escrowed, "already counted");
    assert_eq!(mark_entries(&server).iter().filter(|l| l.contains("\"outcome\":\"ok")).count(), 2);
}

/// Rebuilds a ceremony's recovery key from the first two custodians' shares (the stock
/// `age` decrypts each share, `kmsctl escrow combine` joins them) and opens `file` with it
/// through the stock `age`.
fn open_offline(w: &Path, ceremony_dir: &Path, manifest: &Path, names: [&str; 2], keys: [&Path; 2], file: &Path) -> Vec<u8> {
    let mut texts = Vec::new();
    for (name, key) in names.iter().zip(keys) {
        let txt = w.join(format!("{}-share-{name}.txt", ceremony_dir.file_name().unwrap().to_str().unwrap()));
        let o = stock("age", &["-d", "-i", s(key), "-o", s(&txt), s(&ceremony_dir.join(format!("share-{name}.age")))]);
        ok(&o, "age -d of a share");
        texts.push(txt);
    }
    let recovery = w.join("recovery-offline.key");
    let _ = std::fs::remove_file(&recovery);
    let o = kmsctl_offline(&["escrow", "combine", "--manifest", s(manifest), "-o", s(&recovery), s(&texts[0]), s(&texts[1])]);
    ok(&o, "escrow combine");
    let plain = w.join("offline.plain");
    let _ = std::fs::remove_file(&plain);
    let o = stock("age", &["-d", "-i", s(&recovery), "-o", s(&plain), s(file)]);
    ok(&o, "age -d with the rebuilt recovery key");
    std::fs::read(&plain).unwrap()
}

/// A backup sealed under an earlier recovery recipient (the escrow was replaced since):
/// rewrap keeps that stanza byte for byte and adds one to the recipient in force; both
/// ceremonies' custodians open it; the key was counted as escrowed already.
#[test]
fn rewrap_keeps_the_stanza_of_an_earlier_recipient_and_adds_the_one_in_force() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let server = Server::start();
    let first_dir = w.join("first");
    std::fs::create_dir(&first_dir).unwrap();
    let (first, r1, k1) = ceremony(&first_dir, 2, &["ann", "bob"]);
    install(&server, &first);
    let f = w.join("b.age");
    let data = sample(3, 70_001);
    seal_to(&server, &f, "b", &data);
    let before = std::fs::read(&f).unwrap();
    assert_eq!(x25519_stanzas(&before), 1);
    assert_eq!(without_escrow(&server), 0);

    let second_dir = w.join("second");
    std::fs::create_dir(&second_dir).unwrap();
    let (second, r2, k2) = ceremony(&second_dir, 2, &["cas", "dan"]);
    assert_ne!(r1, r2);
    install_with(&server, &["--new-recipient"], &second);

    let o = server.backup_hook("restorer", &["rewrap", s(&f)], b"");
    ok(&o, "rewrap");
    assert!(
        stdout(&o).contains(&format!(
            "escrow stanza added (recovery recipient {r2}); kept 1 X25519 stanza(s) to an earlier recovery recipient"
        )),
        "{}",
        stdout(&o)
    );
    let after = std::fs::read(&f).unwrap();
    assert_eq!(x25519_stanzas(&after), 2);
    assert_eq!(stanza(&after, "X25519"), stanza(&before, "X25519"), "the earlier stanza is kept byte for byte");
    assert_eq!(after[header_len(&after)..], before[header_len(&before)..]);
    assert_eq!(without_escrow(&server), 0);
    let marks = mark_entries(&server);
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert!(marks[0].contains(&r2) && marks[0].contains("counted the key as escrowed already"), "{}", marks[0]);

    assert_eq!(open_offline(w, &second_dir.join("ceremony"), &second, ["cas", "dan"], [&k2[0], &k2[1]], &f), data);
    assert_eq!(open_offline(w, &first_dir.join("ceremony"), &first, ["ann", "bob"], [&k1[0], &k1[1]], &f), data);

    // Again: nothing written.
    ok(&server.backup_hook("restorer", &["rewrap", s(&f)], b""), "rewrap again");
    assert_eq!(std::fs::read(&f).unwrap(), after);
    assert_eq!(mark_entries(&server).len(), 1);
}

/// A keyring rotated since the backup and an escrow installed since: one rewrap moves the
/// file to the newest version and adds the escrow stanza (one copy), and the server
/// accepts the report made with the re-wrapped key.
#[test]
fn one_rewrap_moves_the_version_and_adds_the_escrow_stanza() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let server = Server::start();
    let f = w.join("old.age");
    let data = sample(11, 130_000);
    seal_to(&server, &f, "old", &data);
    let before = std::fs::read(&f).unwrap();
    ok(&server.kmsctl("officer", &["keyring", "rotate", "default"]), "keyring rotate");
    let (manifest, recipient, _) = ceremony(w, 2, &["ann", "bob"]);
    install(&server, &manifest);
    assert_eq!(without_escrow(&server), 1);

    let o = server.backup_hook("restorer", &["rewrap", s(&f)], b"");
    ok(&o, "rewrap");
    let said = stdout(&o);
    assert!(
        said.contains(&format!("keyring default version 1 -> 2; escrow stanza added (recovery recipient {recipient}) (the header's length changed")),
        "{said}"
    );
    let after = std::fs::read(&f).unwrap();
    assert_eq!(x25519_stanzas(&after), 1);
    assert_ne!(stanza(&after, "kluis"), stanza(&before, "kluis"), "the Kluis stanza names version 2 now");
    assert_eq!(after[header_len(&after)..], before[header_len(&before)..]);
    assert_eq!(without_escrow(&server), 0);
    assert_eq!(mark_entries(&server).iter().filter(|l| l.contains("\"outcome\":\"ok")).count(), 1);
    let o = unseal(&server, "restorer", &after);
    ok(&o, "unseal");
    assert_eq!(o.stdout, data);
}
