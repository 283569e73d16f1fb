//! The server refuses to start, and says why, when its master key or store is wrong.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use kluis_tests::*;

/// Runs `kms-server serve --config` (which must fail here) and returns its stderr.
fn serve_fails(config: &std::path::Path, env: &[(&str, &std::path::Path)]) -> String {
    let mut cmd = Command::new(bin("kms-server"));
    cmd.args(["serve", "--config"]).arg(config).env("KLUIS_LOG", "error");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "kms-server serve should have refused to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A dev server, stopped, so that its config can be served or spoiled.
fn stopped(p: Provider) -> Server {
    let mut s = Server::start_with(p);
    s.kill9();
    s
}

fn config(s: &Server) -> std::path::PathBuf {
    s.data_dir().join("server.toml")
}

fn edit(path: &std::path::Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {text}");
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn software_master_key_problems_are_named() {
    let s = stopped(Provider::Software);
    let key = s.data_dir().join("master.key");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = serve_fails(&config(&s), &[]);
    assert!(err.contains("readable by group or others") && err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Another server's master key: refused before anything is served.
    let other = stopped(Provider::Software);
    std::fs::copy(other.data_dir().join("master.key"), &key).unwrap();
    let err = serve_fails(&config(&s), &[]);
    assert!(err.contains("does not open this store"), "{err}");

    std::fs::remove_file(&key).unwrap();
    let err = serve_fails(&config(&s), &[]);
    assert!(err.contains("master key file") && err.contains("could not be read"), "{err}");
}

#[test]
fn a_missing_tls_file_is_named_by_its_role_not_as_the_master_key() {
    let s = stopped(Provider::Software);
    let pki = s.data_dir().join("pki");
    for (file, role) in [("server.key", "TLS key"), ("server.pem", "TLS certificate"), ("ca.pem", "CA file")] {
        let path = pki.join(file);
        let kept = pki.join(format!("{file}.kept"));
        std::fs::rename(&path, &kept).unwrap();
        let err = serve_fails(&config(&s), &[]);
        assert!(err.contains(role) && err.contains(&path.display().to_string()) && err.contains("could not be read"), "{file}: {err}");
        assert!(!err.contains("master key"), "{file}: {err}");
        std::fs::rename(&kept, &path).unwrap();
    }
}

#[test]
fn missing_store_and_bad_config_are_named() {
    let s = stopped(Provider::Software);
    std::fs::remove_file(s.data_dir().join("data/kluis.redb")).unwrap();
    let err = serve_fails(&config(&s), &[]);
    assert!(err.contains("run `kms-server init` first"), "{err}");

    let s = stopped(Provider::Software);
    edit(&config(&s), "version = 1", "version = 1\ncolour = \"blue\"");
    let err = serve_fails(&config(&s), &[]);
    assert!(err.contains("unknown field `colour`"), "{err}");

    let s = stopped(Provider::Software);
    edit(&config(&s), "version = 1", "version = 7");
    let err = serve_fails(&config(&s), &[]);
    assert!(err.contains("version 7"), "{err}");

    // init refuses to overwrite an existing master key and store.
    let out = Command::new(bin("kms-server")).args(["init", "--config"]).arg(config(&stopped(Provider::Software))).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"), "{}", String::from_utf8_lossy(&out.stderr));
}

fn hsm_env(s: &Server) -> std::path::PathBuf {
    s.token.as_ref().unwrap().conf.clone()
}

#[test]
fn hsm_wrong_module_token_pin_and_key_are_named() {
    let s = stopped(Provider::SoftHsm);
    let conf = hsm_env(&s);
    let env = [("SOFTHSM2_CONF", conf.as_path())];

    edit(&config(&s), "/usr/lib/softhsm/libsofthsm2.so", "/nonexistent/libpkcs11.so");
    let err = serve_fails(&config(&s), &env);
    assert!(err.contains("/nonexistent/libpkcs11.so"), "{err}");
    edit(&config(&s), "/nonexistent/libpkcs11.so", "/usr/lib/softhsm/libsofthsm2.so");

    edit(&config(&s), "token_label = \"kluis-test\"", "token_label = \"no-such-token\"");
    let err = serve_fails(&config(&s), &env);
    assert!(err.contains("no-such-token"), "{err}");
    edit(&config(&s), "token_label = \"no-such-token\"", "token_label = \"kluis-test\"");

    let pin = &s.token.as_ref().unwrap().pin_file;
    std::fs::write(pin, "9999\n").unwrap();
    let err = serve_fails(&config(&s), &env);
    assert!(err.to_lowercase().contains("pin"), "{err}");
    assert!(!err.contains("9999"), "the PIN must never be printed: {err}");
    std::fs::write(pin, "1234\n").unwrap();

    edit(&config(&s), "key_label = \"kluis-master\"", "key_label = \"no-such-key\"");
    let err = serve_fails(&config(&s), &env);
    assert!(err.contains("no-such-key"), "{err}");
}

#[test]
fn hsm_extractable_key_is_not_accepted_as_master_key() {
    let s = stopped(Provider::SoftHsm);
    let conf = hsm_env(&s);
    let out = Command::new("pkcs11-tool")
        .args(["--module", SOFTHSM_MODULE, "--token-label", "kluis-test", "--login", "--pin", "1234"])
        .args(["--keygen", "--key-type", "AES:32", "--label", "weak-key", "--extractable"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("pkcs11-tool (Debian package opensc) is required");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    edit(&config(&s), "key_label = \"kluis-master\"", "key_label = \"weak-key\"");
    let err = serve_fails(&config(&s), &[("SOFTHSM2_CONF", conf.as_path())]);
    assert!(err.contains("weak-key") && err.to_lowercase().contains("extractable"), "{err}");
}

#[test]
fn hsm_init_refuses_to_overwrite_an_existing_token_key() {
    let s = stopped(Provider::SoftHsm);
    let conf = hsm_env(&s);
    // A fresh store, but the token already holds `kluis-master`.
    std::fs::remove_file(s.data_dir().join("data/kluis.redb")).unwrap();
    let out = Command::new(bin("kms-server"))
        .args(["init", "--config"])
        .arg(config(&s))
        .env("SOFTHSM2_CONF", &conf)
        .env("KLUIS_LOG", "error")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("kluis-master") && err.contains("exists"), "{err}");
    assert!(!s.data_dir().join("data/kluis.redb").exists(), "no store may be created when init refuses");
}

/// The shipped binary has no test seams: none of the variables that move the clock or
/// inject faults is in it. (They live in `kms-server-testkit`, whose bytes do hold them,
/// which shows the check can fail.)
#[test]
fn the_server_binary_contains_no_test_seam() {
    let needle = b"KLUIS_TEST_";
    let has = |name: &str| std::fs::read(bin(name)).unwrap().windows(needle.len()).any(|w| w == needle);
    assert!(!has("kms-server"), "kms-server contains a KLUIS_TEST_ string");
    assert!(has("kms-server-testkit"), "the testkit should hold the seams this test looks for");
}
