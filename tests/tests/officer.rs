//! The security officer's rotation and the restore operator's restore tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use kluis_tests::*;

per_provider!(rotation_adds_a_version_and_old_backups_still_unseal, master_rotation_rewraps_keyring_keys_only);

/// The keyring version inside a sealed file's Kluis stanza (wrapped key byte 1..5).
fn stanza_version(sealed: &[u8]) -> u32 {
    let text = String::from_utf8_lossy(&sealed[..sealed.windows(4).position(|w| w == b"\n---").unwrap() + 1]).into_owned();
    let mut lines = text.lines().skip_while(|l| !l.starts_with("-> kluis ")).skip(1);
    let mut b64 = String::new();
    for l in lines.by_ref() {
        b64.push_str(l);
        if l.len() < 64 {
            break;
        }
    }
    let body = base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64).unwrap();
    u32::from_be_bytes(body[1..5].try_into().unwrap())
}

fn rotation_adds_a_version_and_old_backups_still_unseal(p: Setup) {
    let server = Server::start_with(p);
    let before = seal(&server, "sealer", "default", "before-rotation", b"old backup");
    assert_eq!(stanza_version(&before), 1);
    let out = server.kmsctl("sealer", &["keyring", "rotate", "default"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let out = server.kmsctl("officer", &["keyring", "rotate", "default"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("current version: 2"), "{}", String::from_utf8_lossy(&out.stdout));
    let after = seal(&server, "sealer", "default", "after-rotation", b"new backup");
    assert_eq!(stanza_version(&after), 2, "new seals use the new version");
    for (sealed, plain) in [(&before, &b"old backup"[..]), (&after, &b"new backup"[..])] {
        let out = unseal(&server, "restorer", sealed);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(out.stdout, plain);
    }
    let out = server.kmsctl("auditor", &["keyring", "show", "default", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["current_version"], 2);
    assert_eq!(v["versions"].as_array().unwrap().len(), 2);
}

fn master_rotation_rewraps_keyring_keys_only(p: Setup) {
    let mut server = Server::start_with(p);
    let before = seal(&server, "sealer", "default", "before-master-rotation", b"old backup");
    let out = server.kmsctl("auditor", &["master", "rotate"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("may not RotateMaster"), "{}", stderr(&out));
    let out = server.kmsctl("officer", &["master", "rotate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("master key generation 2 in force") && text.contains(".g2"), "{text}");
    assert!(text.contains("rewrapped 1 versions of 1 keyrings"), "{text}");
    let after = seal(&server, "sealer", "default", "after-master-rotation", b"new backup");
    for (sealed, plain) in [(&before, &b"old backup"[..]), (&after, &b"new backup"[..])] {
        assert_eq!(unseal(&server, "restorer", sealed).stdout, plain);
    }
    // A second rotation, then a restart: the server opens the store's generation.
    assert!(server.kmsctl("officer", &["master", "rotate"]).status.success());
    if p.provider == Provider::Software {
        // The software key files of generations 1 and 2 are no longer needed by this store.
        let key = server.data_dir().join("master.key");
        assert!(server.data_dir().join("master.key.g3").exists());
        std::fs::rename(&key, server.dir.path().join("master.key.retired")).unwrap();
        std::fs::rename(server.data_dir().join("master.key.g2"), server.dir.path().join("master.key.g2.retired")).unwrap();
    } else {
        // The token keys of generations 1 and 2 are deleted: the store no longer needs them.
        let token = server.token.as_ref().unwrap();
        for label in ["kluis-master", "kluis-master.g2"] {
            let out = std::process::Command::new("pkcs11-tool")
                .args(["--module", SOFTHSM_MODULE, "--token-label", &token.label, "--login", "--pin", "1234"])
                .args(["--delete-object", "--type", "secrkey", "--label", label])
                .env("SOFTHSM2_CONF", &token.conf)
                .output()
                .expect("pkcs11-tool (Debian package opensc) is required");
            assert!(out.status.success(), "deleting {label}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    server.restart();
    for (sealed, plain) in [(&before, &b"old backup"[..]), (&after, &b"new backup"[..])] {
        let out = unseal(&server, "restorer", sealed);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(out.stdout, plain);
    }
    let report = server.kmsctl("auditor", &["report", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(v["master"]["generation"], 3, "{v}");
    let out = server.kmsctl("auditor", &["audit", "tail", "-n", "100"]);
    let trail = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(trail.lines().filter(|l| l.contains("RotateMaster") && l.contains("ok: master key generation")).count(), 2, "{trail}");
}

#[test]
fn verify_is_a_recorded_restore_test_that_writes_no_plaintext() {
    let server = Server::start();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let sealed = seal(&server, "sealer", "default", "ehr/weekly/2026-W47", &data);
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.age");
    std::fs::write(&good, &sealed).unwrap();

    let out = server.backup_hook("restorer", &["verify", "-i", s(&good), "--host", "restore01"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "verify writes no plaintext");
    assert!(stderr(&out).contains("verified 200000 bytes") && stderr(&out).contains("restore test recorded"), "{}", stderr(&out));

    let mut bad = sealed.clone();
    let n = bad.len();
    bad[n - 500] ^= 1;
    let badf = dir.path().join("bad.age");
    std::fs::write(&badf, &bad).unwrap();
    let out = server.backup_hook("restorer", &["verify", "-i", s(&badf), "--host", "restore01"], b"");
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("payload is damaged") && stderr(&out).contains("failed restore test recorded"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());

    // A sealer cannot run restore tests (it cannot unwrap).
    let out = server.backup_hook("sealer", &["verify", "-i", s(&good)], b"");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    // Both tests are in the audit trail with the backup id from the registry.
    let out = server.kmsctl("auditor", &["audit", "export"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let tests: Vec<&str> =
        text.lines().filter(|l| l.contains("\"action\":\"RecordRestoreTest\"") && l.contains("\"outcome\":\"ok: ")).collect();
    assert_eq!(tests.len(), 2, "{text}");
    assert!(tests.iter().all(|t| t.contains("\"backup_id\":\"ehr/weekly/2026-W47\"")), "{tests:?}");
    // The sealer's attempt is in the trail as a refusal.
    assert!(text.lines().any(|l| l.contains("\"principal\":\"sealer\"") && l.contains("RecordRestoreTest") && l.contains("denied")));
    assert!(tests[0].contains("restore test passed") && tests[0].contains("\"principal\":\"restorer\""), "{}", tests[0]);
    assert!(tests[1].contains("restore test FAILED") && tests[1].contains("payload is damaged"), "{}", tests[1]);
}
