//! Issue 2, end to end: the real server, real mTLS, the real `backup-hook`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use age::secrecy::ExposeSecret;
use kluis_tests::*;

per_provider!(
    round_trip_at_chunk_boundaries,
    round_trip_200_mib_stream_through_a_pipe,
    sealed_file_is_a_standard_age_file_that_the_recovery_identity_opens,
    tampered_truncated_and_foreign_files_are_refused,
    sealer_cannot_unseal_and_restorer_can,
    unreachable_server_fails_fast_with_a_clear_message,
    broken_pipe_while_sealing_is_a_failure,
    unknown_keyring_and_bad_arguments_are_named,
    kmsctl_keyring_create_list_show,
    dev_restart_reuses_keys_and_data,
    write_is_flushed_to_output_file_atomically,
);

fn sample(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Pattern::new(len as u64 + 7, len as u64).read_exact(&mut v).unwrap();
    v
}

fn round_trip_at_chunk_boundaries(p: Setup) {
    let server = Server::start_with(p);
    for len in [0usize, 1, 65_536, 65_537, 3 * 65_536 + 5] {
        let data = sample(len);
        let sealed = seal(&server, "sealer", "default", &format!("b-{len}"), &data);
        assert!(sealed.starts_with(b"age-encryption.org/v1\n"));
        let out = unseal(&server, "restorer", &sealed);
        assert!(out.status.success(), "{len}: {}", stderr(&out));
        assert_eq!(out.stdout, data, "length {len} did not round-trip");
    }
}

fn round_trip_200_mib_stream_through_a_pipe(p: Setup) {
    const LEN: u64 = 200 << 20;
    let server = Server::start_with(p);
    let sealer = server.client("sealer");
    let restorer = server.client("restorer");
    let mut seal = Command::new(bin("backup-hook"))
        .args(["--client-config", sealer.to_str().unwrap(), "seal", "--keyring", "default", "--backup-id", "big"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut unseal = Command::new(bin("backup-hook"))
        .args(["--client-config", restorer.to_str().unwrap(), "unseal"])
        .stdin(Stdio::from(seal.stdout.take().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sin = seal.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        std::io::copy(&mut Pattern::new(42, LEN), &mut sin).unwrap();
    });
    let got = digest_reader(unseal.stdout.take().unwrap());
    feeder.join().unwrap();
    let s = seal.wait_with_output().unwrap();
    let u = unseal.wait_with_output().unwrap();
    assert!(s.status.success(), "seal: {}", stderr(&s));
    assert!(u.status.success(), "unseal: {}", stderr(&u));
    assert_eq!(got, digest_reader(Pattern::new(42, LEN)));
    assert_eq!(got.1, LEN);
}

/// A real 2-of-2 ceremony, installed at the server; returns the combined recovery identity.
fn install_recovery(server: &Server) -> age::x25519::Identity {
    let dir = server.dir.path().join("escrow");
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = vec!["escrow".to_owned(), "ceremony".into(), "--threshold".into(), "2".into()];
    let mut ids = Vec::new();
    for name in ["ann", "bob"] {
        let id = age::x25519::Identity::generate();
        let path = dir.join(format!("{name}.key"));
        std::fs::write(&path, format!("{}\n", id.to_string().expose_secret())).unwrap();
        args.extend(["--custodian".into(), format!("{name}={}", id.to_public())]);
        ids.push(path);
    }
    let ceremony = dir.join("ceremony");
    args.extend(["--out".into(), ceremony.to_str().unwrap().into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("kmsctl", &argv, b"");
    assert!(out.status.success(), "{}", stderr(&out));
    let officer = server.client("officer");
    let manifest = ceremony.join("manifest.json");
    let out = run("kmsctl", &["--client-config", officer.to_str().unwrap(), "escrow", "install", manifest.to_str().unwrap()], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    // The first recovery recipient is dual control: a second officer approves it.
    let out = server.kmsctl("dev", &["approve", &approval_id(&out)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = dir.join("recovery.key");
    let out = run(
        "kmsctl",
        &[
            "escrow", "combine", "--manifest", manifest.to_str().unwrap(),
            "--identity", ids[0].to_str().unwrap(), "--identity", ids[1].to_str().unwrap(),
            "-o", key.to_str().unwrap(),
            ceremony.join("share-ann.age").to_str().unwrap(), ceremony.join("share-bob.age").to_str().unwrap(),
        ],
        b"",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&key).unwrap();
    let secret = text.lines().find(|l| l.starts_with("AGE-SECRET-KEY-1")).unwrap();
    secret.parse().unwrap()
}

fn sealed_file_is_a_standard_age_file_that_the_recovery_identity_opens(p: Setup) {
    let server = Server::start_with(p);
    // Before any escrow: a Kluis stanza only; the age crate still parses the header.
    let plain = seal(&server, "sealer", "default", "no-escrow", b"before escrow");
    assert!(age::Decryptor::new(plain.as_slice()).is_ok());
    let header = String::from_utf8_lossy(&plain[..plain.windows(4).position(|w| w == b"\n---").unwrap()]).into_owned();
    assert!(header.contains("\n-> kluis default "), "{header}");
    assert!(!header.contains("X25519"), "{header}");

    let identity = install_recovery(&server);
    let data = sample(300_000);
    let sealed = seal(&server, "sealer", "default", "with-escrow", &data);
    let header = String::from_utf8_lossy(&sealed[..sealed.windows(4).position(|w| w == b"\n---").unwrap()]).into_owned();
    assert!(header.contains("\n-> X25519 "), "{header}");

    // The age crate decrypts with the recovery identity alone.
    let dec = age::Decryptor::new(sealed.as_slice()).unwrap();
    let mut r = dec.decrypt(std::iter::once(&identity as &dyn age::Identity)).unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    assert_eq!(out, data);

    // And so does the stock `age` command, with no server involved.
    let key = server.dir.path().join("recovery.key");
    std::fs::write(&key, format!("{}\n", identity.to_string().expose_secret())).unwrap();
    let input = server.dir.path().join("sealed.age");
    std::fs::write(&input, &sealed).unwrap();
    let age_out = Command::new("age").args(["-d", "-i"]).arg(&key).arg(&input).output().expect("the `age` command (Debian package age) is required");
    assert!(age_out.status.success(), "{}", String::from_utf8_lossy(&age_out.stderr));
    assert_eq!(age_out.stdout, data);

    // backup-hook with the recovery identity: no client config, no server.
    let out = run("backup-hook", &["unseal", "--recovery-identity", key.to_str().unwrap(), "-i", input.to_str().unwrap()], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, data);
}

/// Unseals into `-o FILE` and checks: failure, the exit code, the message, and no file left.
fn assert_refused(server: &Server, sealed: &[u8], code: i32, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.age");
    let output = dir.path().join("out.bin");
    std::fs::write(&input, sealed).unwrap();
    let cfg = server.client("restorer");
    let out = run(
        "backup-hook",
        &["--client-config", cfg.to_str().unwrap(), "unseal", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap()],
        b"",
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert_eq!(err.lines().count(), 1, "one-line message expected: {err}");
    assert!(!output.exists(), "no output may be written on failure");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file may be left behind");
}

fn tampered_truncated_and_foreign_files_are_refused(p: Setup) {
    let server = Server::start_with(p);
    let data = sample(200_000);
    let sealed = seal(&server, "sealer", "default", "victim", &data);
    let header_end = sealed.windows(4).position(|w| w == b"\n---").unwrap();

    // A flipped bit in the Kluis stanza's wrapped key (header body).
    let mut bad = sealed.clone();
    let stanza_body = sealed.windows(3).position(|w| w == b"\n->").unwrap();
    let line2 = stanza_body + 1 + sealed[stanza_body + 1..].iter().position(|&b| b == b'\n').unwrap() + 1;
    bad[line2 + 10] = if bad[line2 + 10] == b'A' { b'B' } else { b'A' };
    assert_refused(&server, &bad, 5, "does not authenticate");

    // A flipped bit in the header MAC.
    let mut bad = sealed.clone();
    bad[header_end + 8] = if bad[header_end + 8] == b'A' { b'B' } else { b'A' };
    assert_refused(&server, &bad, 5, "header");

    // A flipped bit in the payload.
    let mut bad = sealed.clone();
    let n = bad.len();
    bad[n - 1000] ^= 0x01;
    assert_refused(&server, &bad, 5, "payload is damaged");

    // Truncated: mid-chunk and at a chunk boundary.
    assert_refused(&server, &sealed[..n - 17], 5, "damaged");
    let payload_start = header_end + 4 + sealed[header_end + 4..].iter().position(|&b| b == b'\n').unwrap() + 1;
    let boundary = payload_start + 16 + 65_536 + 16;
    assert_refused(&server, &sealed[..boundary], 5, "truncated");

    // Not a sealed file at all.
    assert_refused(&server, b"just some plaintext that is not age", 5, "not a sealed backup");

    // A file sealed by another server (another master key, another registry).
    let other = Server::start_with(p);
    let foreign = seal(&other, "sealer", "default", "elsewhere", b"foreign data");
    assert_refused(&server, &foreign, 4, "not known to this server");
}

fn sealer_cannot_unseal_and_restorer_can(p: Setup) {
    let server = Server::start_with(p);
    let sealed = seal(&server, "sealer", "default", "ransomware-story", b"patient records");
    let out = unseal(&server, "sealer", &sealed);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("principal \"sealer\" may not UnwrapDataKey on keyring \"default\""), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let out = unseal(&server, "restorer", &sealed);
    assert!(out.status.success());
    assert_eq!(out.stdout, b"patient records");
}

fn unreachable_server_fails_fast_with_a_clear_message(p: Setup) {
    let server = Server::start_with(p);
    let cfg_text = std::fs::read_to_string(server.client("sealer")).unwrap();
    // Point at a port nothing listens on: bind one, then close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = server.dir.path().join("dead.toml");
    // Fails fast without retrying (retry.rs checks the retrying against the deadline).
    std::fs::write(&cfg, cfg_text.replace(&server.addr, &format!("127.0.0.1:{port}")) + "[retry]\ndeadline_secs = 0\n").unwrap();
    let out = run("backup-hook", &["--client-config", cfg.to_str().unwrap(), "seal", "--keyring", "default", "--backup-id", "x"], b"data");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot reach the Kluis server"), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "no sealed output on failure");
}

fn broken_pipe_while_sealing_is_a_failure(p: Setup) {
    let server = Server::start_with(p);
    let cfg = server.client("sealer");
    let mut child = Command::new(bin("backup-hook"))
        .args(["--client-config", cfg.to_str().unwrap(), "seal", "--keyring", "default", "--backup-id", "pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before reading anything.
    drop(child.stdout.take());
    let mut sin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = std::io::copy(&mut Pattern::new(1, 64 << 20), &mut sin);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("broken pipe"), "{}", stderr(&out));
}

fn unknown_keyring_and_bad_arguments_are_named(p: Setup) {
    let server = Server::start_with(p);
    let cfg = server.client("dev");
    let out = run("backup-hook", &["--client-config", cfg.to_str().unwrap(), "seal", "--keyring", "nope", "--backup-id", "x"], b"d");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("keyring \"nope\" does not exist"), "{}", stderr(&out));
    let out = run("backup-hook", &["--client-config", cfg.to_str().unwrap(), "seal", "--keyring", "bad name", "--backup-id", "x"], b"d");
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("invalid keyring"), "{}", stderr(&out));
    let out = run("backup-hook", &["seal", "--keyring", "default", "--backup-id", "x"], b"d");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("KLUIS_CLIENT_CONFIG"), "{}", stderr(&out));
}

fn kmsctl_keyring_create_list_show(p: Setup) {
    let server = Server::start_with(p);
    let officer = server.client("officer");
    let o = officer.to_str().unwrap();
    let out = run("kmsctl", &["--client-config", o, "keyring", "create", "ehr-db", "--retention-days", "90"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run("kmsctl", &["--client-config", o, "keyring", "create", "ehr-db"], b"");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let _ = seal(&server, "dev", "ehr-db", "ehr/1", b"x");
    let out = run("kmsctl", &["--client-config", o, "keyring", "show", "ehr-db", "--json"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "ehr-db");
    assert_eq!(v["current_version"], 1);
    assert_eq!(v["retention_days"], 90);
    assert_eq!(v["issued_keys"], 1);
    let out = run("kmsctl", &["--client-config", o, "keyring", "list"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("default") && text.contains("ehr-db"), "{text}");
    // A sealer may not create keyrings.
    let sealer = server.client("sealer");
    let out = run("kmsctl", &["--client-config", sealer.to_str().unwrap(), "keyring", "create", "x"], b"");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

fn dev_restart_reuses_keys_and_data(p: Setup) {
    let mut server = Server::start_with(p);
    let sealed = seal(&server, "sealer", "default", "before-restart", b"kept");
    server.restart();
    let out = unseal(&server, "restorer", &sealed);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"kept");
    assert!(server.log().is_empty() || !server.log().contains("ERROR"), "{}", server.log());
}

fn write_is_flushed_to_output_file_atomically(p: Setup) {
    let server = Server::start_with(p);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.bin");
    let sealed = dir.path().join("out.age");
    std::fs::write(&input, sample(100_000)).unwrap();
    let cfg = server.client("sealer");
    let out = run(
        "backup-hook",
        &["--client-config", cfg.to_str().unwrap(), "seal", "--keyring", "default", "--backup-id", "f", "-i", input.to_str().unwrap(), "-o", sealed.to_str().unwrap()],
        b"",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut f = std::fs::File::open(&sealed).unwrap();
    let mut head = [0u8; 22];
    f.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"age-encryption.org/v1\n");
    let _ = std::io::stdout().flush();
}

#[test]
fn a_server_that_never_answers_tls_hits_the_connect_deadline() {
    let server = Server::start();
    // Accepts TCP (the kernel completes the handshake into the backlog) but never speaks TLS.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = std::fs::read_to_string(server.client("sealer")).unwrap();
    let cfg = server.dir.path().join("hung.toml");
    std::fs::write(&cfg, text.replace(&server.addr, &hung.local_addr().unwrap().to_string()) + "connect_timeout_secs = 1\n").unwrap();
    let out = run("backup-hook", &["--client-config", cfg.to_str().unwrap(), "seal", "--keyring", "default", "--backup-id", "x"], b"data");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("did not answer in time"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    drop(hung);
}
