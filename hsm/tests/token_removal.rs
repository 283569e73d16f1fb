//! Token loss and recovery against SoftHSM2.
//!
//! "Removing the token" = renaming the token's directory out of SoftHSM2's `tokendir` while the
//! process runs; "re-inserting" = renaming it back. What SoftHSM2 2.6 does meanwhile (see the
//! crate docs): key searches come back empty, `C_GetTokenInfo` fails with `CKR_GENERAL_ERROR`,
//! and the token stays dead even once the directory is back until the module is finalized and
//! initialized again, which `Hsm` does on its own when it reconnects.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{USER_PIN, in_softhsm, module_path};
use kluis_hsm::{Hsm, HsmConfig, HsmError, Pin};

const MK: &str = "kluis-master";
const BACKOFF: Duration = Duration::from_millis(200);

fn open(token: &str, pool: usize) -> Hsm {
    let mut config = HsmConfig::new(module_path(), token, pool);
    config.reconnect_backoff = BACKOFF;
    Hsm::open_with(&config, &Pin::new(USER_PIN.to_owned())).unwrap()
}

fn assert_unavailable<T: std::fmt::Debug>(what: &str, result: Result<T, HsmError>) {
    match result {
        Err(HsmError::Unavailable { .. }) => {}
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
}

/// Moves the token directory out of SoftHSM2's tokendir (a renamed directory left *inside* the
/// tokendir would simply be found again at the next `C_Initialize`).
fn unplug(token_dir: &Path) -> PathBuf {
    let tokendir = token_dir.parent().unwrap();
    let away = tokendir.with_file_name(format!(
        "unplugged-{}",
        token_dir.file_name().unwrap().to_string_lossy()
    ));
    std::fs::rename(token_dir, &away).unwrap();
    away
}

/// Polls `health()` until it succeeds (the back-off delays reconnects), at most 10 s.
fn wait_healthy(hsm: &Hsm) {
    let start = Instant::now();
    loop {
        match hsm.health() {
            Ok(()) => return,
            Err(e) if e.is_unavailable() && start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("token did not come back: {e:?}"),
        }
    }
}

/// The token vanishes under an open `Hsm`: every operation and `health()` fails with
/// `Unavailable` (a missing token never reads as a missing key, and nothing gets generated).
/// When it is back, the same `Hsm` value works again, including on data encrypted before.
#[test]
fn token_disappears_and_comes_back() {
    in_softhsm("token_disappears_and_comes_back", &["removable"], |env| {
        let hsm = open("removable", 2);
        hsm.generate_aes256_key(MK).unwrap();
        let before = hsm.encrypt_aes_gcm(MK, b"aad", b"secret").unwrap();
        hsm.health().unwrap();

        let token_dir = env.token_dir("removable");
        let away = unplug(&token_dir);

        assert_unavailable("encrypt", hsm.encrypt_aes_gcm(MK, b"aad", b"secret"));
        assert_unavailable("decrypt", hsm.decrypt_aes_gcm(MK, b"aad", &before));
        assert_unavailable("health", hsm.health());
        assert_unavailable("find_key", hsm.find_key(MK));
        assert_unavailable("check_master_key", hsm.check_master_key(MK));
        assert_unavailable("generate", hsm.generate_aes256_key("new-key"));
        // Past the back-off: a real reconnect attempt (module re-initialized, token not found).
        std::thread::sleep(BACKOFF * 2);
        assert_unavailable("health after back-off", hsm.health());
        assert_unavailable(
            "encrypt after back-off",
            hsm.encrypt_aes_gcm(MK, b"aad", b"x"),
        );

        std::fs::rename(&away, &token_dir).unwrap();
        wait_healthy(&hsm);

        assert_eq!(
            hsm.decrypt_aes_gcm(MK, b"aad", &before).unwrap().as_slice(),
            b"secret"
        );
        let after = hsm.encrypt_aes_gcm(MK, b"aad", b"again").unwrap();
        assert_eq!(
            hsm.decrypt_aes_gcm(MK, b"aad", &after).unwrap().as_slice(),
            b"again"
        );
        hsm.check_master_key(MK).unwrap();
        // Nothing was generated while the token was away.
        assert!(matches!(
            hsm.find_key("new-key"),
            Err(HsmError::KeyMissing { .. })
        ));

        // And it survives a second unplug / replug cycle.
        let away = unplug(&token_dir);
        assert_unavailable(
            "encrypt (2nd unplug)",
            hsm.encrypt_aes_gcm(MK, b"aad", b"x"),
        );
        std::fs::rename(&away, &token_dir).unwrap();
        wait_healthy(&hsm);
        hsm.encrypt_aes_gcm(MK, b"aad", b"x").unwrap();
    });
}

/// Unplugging under load: 4 threads hammer a pool of 3 sessions; while the token is away they
/// see only `Unavailable` (no other error kind, no panic, no hang); afterwards all succeed.
#[test]
fn token_removal_under_concurrent_load() {
    in_softhsm("token_removal_under_concurrent_load", &["loaded"], |env| {
        let hsm = Arc::new(open("loaded", 3));
        hsm.generate_aes256_key(MK).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let unavailable = Arc::new(AtomicUsize::new(0));

        let workers: Vec<_> = (0..4)
            .map(|t| {
                let (hsm, stop, ok, unavailable) =
                    (hsm.clone(), stop.clone(), ok.clone(), unavailable.clone());
                std::thread::spawn(move || {
                    let aad = format!("worker {t}");
                    while !stop.load(Ordering::Relaxed) {
                        let result = hsm
                            .encrypt_aes_gcm(MK, aad.as_bytes(), b"payload")
                            .and_then(|blob| hsm.decrypt_aes_gcm(MK, aad.as_bytes(), &blob));
                        match result {
                            Ok(plain) => {
                                assert_eq!(plain.as_slice(), b"payload");
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(HsmError::Unavailable { .. }) => {
                                unavailable.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            Err(other) => panic!("worker {t}: unexpected {other:?}"),
                        }
                    }
                })
            })
            .collect();

        std::thread::sleep(Duration::from_millis(300));
        let token_dir = env.token_dir("loaded");
        let away = unplug(&token_dir);
        std::thread::sleep(Duration::from_millis(700));
        let during = ok.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            ok.load(Ordering::Relaxed),
            during,
            "operations succeeded while unplugged"
        );
        std::fs::rename(&away, &token_dir).unwrap();
        wait_healthy(&hsm);
        let back = ok.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let (ok, unavailable) = (
            ok.load(Ordering::Relaxed),
            unavailable.load(Ordering::Relaxed),
        );
        println!("ok={ok} unavailable={unavailable} ok-before-replug={during}");
        assert!(unavailable > 0, "no Unavailable seen");
        assert!(ok > back, "no successes after the token came back");
    });
}

/// Two `Hsm` values on two tokens of the same module: unplugging one makes its `Hsm` re-initialize
/// the (process-wide) module; the other `Hsm` keeps working without ever seeing an error, because
/// its stale sessions are detected and replaced before use.
#[test]
fn other_token_survives_module_reinit() {
    in_softhsm(
        "other_token_survives_module_reinit",
        &["first", "second"],
        |env| {
            let a = open("first", 2);
            let b = open("second", 2);
            a.generate_aes256_key(MK).unwrap();
            b.generate_aes256_key(MK).unwrap();
            let blob_b = b.encrypt_aes_gcm(MK, b"", b"b-data").unwrap();

            let token_dir = env.token_dir("first");
            let away = unplug(&token_dir);
            assert_unavailable("a.encrypt", a.encrypt_aes_gcm(MK, b"", b"x"));
            assert_unavailable("a.health", a.health()); // reconnect: module re-initialized
            assert_eq!(
                b.decrypt_aes_gcm(MK, b"", &blob_b).unwrap().as_slice(),
                b"b-data"
            );
            b.health().unwrap();
            std::thread::sleep(BACKOFF * 2);
            assert_unavailable("a.health after back-off", a.health()); // re-initialized again
            b.encrypt_aes_gcm(MK, b"", b"still fine").unwrap();

            std::fs::rename(&away, &token_dir).unwrap();
            wait_healthy(&a);
            a.encrypt_aes_gcm(MK, b"", b"x").unwrap();
            assert_eq!(
                b.decrypt_aes_gcm(MK, b"", &blob_b).unwrap().as_slice(),
                b"b-data"
            );
        },
    );
}
