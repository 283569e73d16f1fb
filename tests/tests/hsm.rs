//! The master key on a real SoftHSM2 token: protected, and a token that goes
//! away and comes back is survived without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use kluis_tests::*;

fn pkcs11_tool(token: &SoftHsmToken, args: &[&str]) -> std::process::Output {
    Command::new("pkcs11-tool")
        .args(["--module", SOFTHSM_MODULE, "--token-label", &token.label, "--login", "--pin", "1234"])
        .args(args)
        .env("SOFTHSM2_CONF", &token.conf)
        .output()
        .expect("pkcs11-tool (Debian package opensc) is required")
}

#[test]
fn master_key_on_the_token_is_sensitive_and_not_extractable() {
    let server = Server::start_with(Provider::SoftHsm);
    let token = server.token.as_ref().unwrap();
    let list = pkcs11_tool(token, &["--list-objects", "--type", "secrkey"]);
    let text = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    assert!(text.contains("label:      kluis-master") || text.contains("label: kluis-master") || text.contains("kluis-master"), "{text}");
    assert!(text.contains("AES length 32"), "{text}");
    assert!(text.contains("sensitive"), "{text}");
    assert!(text.contains("never extractable"), "{text}");
    // Least privilege: encrypt and decrypt only (no wrap, unwrap, sign, verify).
    assert!(text.contains("Usage:      encrypt, decrypt\n"), "{text}");
    // Reading the key value (CKA_VALUE) must fail.
    let read = pkcs11_tool(token, &["--read-object", "--type", "secrkey", "--label", "kluis-master"]);
    assert!(!read.status.success(), "the master key value was readable: {:?}", read.stdout);
}

fn create_keyring(server: &Server, name: &str) -> std::process::Output {
    let officer = server.client("officer");
    run("kmsctl", &["--client-config", officer.to_str().unwrap(), "keyring", "create", name], b"")
}

#[tokio::test]
async fn token_removed_while_running_then_back_without_restart() {
    let mut server = Server::start_with(Provider::SoftHsm);
    // Reconnect on every request, so the test needs no clock.
    let cfg = server.data_dir().join("server.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("key_label = \"kluis-master\"", "key_label = \"kluis-master\"\nreconnect_backoff_ms = 0")).unwrap();
    server.restart();
    let before = seal(&server, "sealer", "default", "before-unplug", b"sealed while the token was in");
    assert_eq!(health_status(&server).await, SERVING);

    // Unplug: move the token's directory out of the token dir.
    let token = server.token.as_ref().unwrap();
    let tokens = token.conf.parent().unwrap().join("tokens");
    let slot = std::fs::read_dir(&tokens).unwrap().next().unwrap().unwrap().path();
    let parked = token.conf.parent().unwrap().join("unplugged");
    std::fs::rename(&slot, &parked).unwrap();

    let out = create_keyring(&server, "while-unplugged");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("unavailable"), "{}", stderr(&out));
    assert_eq!(health_status(&server).await, NOT_SERVING);
    // Data keys never touch the token: sealing and unsealing go on.
    let during = seal(&server, "sealer", "default", "while-unplugged", b"sealed while the token was out");
    let out = unseal(&server, "restorer", &before);
    assert!(out.status.success(), "{}", stderr(&out));

    // Plug back in: the same server process serves again.
    std::fs::rename(&parked, &slot).unwrap();
    let out = create_keyring(&server, "after-replug");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(health_status(&server).await, SERVING);
    let out = unseal(&server, "restorer", &during);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"sealed while the token was out");
}
