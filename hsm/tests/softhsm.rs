//! `kluis-hsm` against a real SoftHSM2 token. Each test runs in its own child process with its
//! own token directory (see `common/mod.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Barrier};

use common::{USER_PIN, in_softhsm, module_path, raw_session};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use kluis_hsm::{GCM_IV_LEN, GCM_TAG_LEN, Hsm, HsmError, Pin};

const MK: &str = "kluis-master";

fn pin() -> Pin {
    Pin::new(USER_PIN.to_owned())
}

fn open(token: &str, pool: usize) -> Hsm {
    Hsm::open(module_path(), token, &pin(), pool).unwrap()
}

#[test]
fn hsm_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Hsm>();
    assert_send_sync::<HsmError>();
}

/// Round trip with AAD; wrong AAD, altered IV / ciphertext / tag, another key and truncation all
/// fail; two encryptions of the same input use different IVs.
#[test]
fn aes_gcm_round_trip_and_tamper() {
    in_softhsm("aes_gcm_round_trip_and_tamper", &["gcm"], |_| {
        let hsm = open("gcm", 2);
        hsm.generate_aes256_key(MK).unwrap();
        hsm.check_master_key(MK).unwrap();
        hsm.health().unwrap();

        let aad = b"keyring=ehr-db;version=3";
        let plaintext = b"a 32-byte keyring key, honestly";
        let blob = hsm.encrypt_aes_gcm(MK, aad, plaintext).unwrap();
        assert_eq!(blob.len(), GCM_IV_LEN + plaintext.len() + GCM_TAG_LEN);
        assert_ne!(&blob[GCM_IV_LEN..GCM_IV_LEN + plaintext.len()], plaintext);
        let back = hsm.decrypt_aes_gcm(MK, aad, &blob).unwrap();
        assert_eq!(back.as_slice(), plaintext);

        // Wrong AAD.
        let err = hsm
            .decrypt_aes_gcm(MK, b"keyring=ehr-db;version=4", &blob)
            .unwrap_err();
        assert!(matches!(err, HsmError::DecryptFailed { .. }), "{err:?}");
        let err = hsm.decrypt_aes_gcm(MK, b"", &blob).unwrap_err();
        assert!(matches!(err, HsmError::DecryptFailed { .. }), "{err:?}");

        // One flipped bit anywhere: IV, ciphertext body, tag.
        for pos in [0, GCM_IV_LEN, GCM_IV_LEN + 7, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[pos] ^= 0x01;
            let err = hsm.decrypt_aes_gcm(MK, aad, &bad).unwrap_err();
            assert!(
                matches!(err, HsmError::DecryptFailed { .. }),
                "bit at {pos}: {err:?}"
            );
        }
        // Truncated.
        let err = hsm
            .decrypt_aes_gcm(MK, aad, &blob[..blob.len() - 1])
            .unwrap_err();
        assert!(matches!(err, HsmError::DecryptFailed { .. }), "{err:?}");
        let err = hsm
            .decrypt_aes_gcm(MK, aad, &blob[..GCM_IV_LEN + GCM_TAG_LEN - 1])
            .unwrap_err();
        assert!(
            matches!(err, HsmError::CiphertextTooShort { .. }),
            "{err:?}"
        );

        // Another key cannot open it.
        hsm.generate_aes256_key("other").unwrap();
        let err = hsm.decrypt_aes_gcm("other", aad, &blob).unwrap_err();
        assert!(matches!(err, HsmError::DecryptFailed { .. }), "{err:?}");

        // Fresh random IV each time.
        let blob2 = hsm.encrypt_aes_gcm(MK, aad, plaintext).unwrap();
        assert_ne!(blob[..GCM_IV_LEN], blob2[..GCM_IV_LEN]);
        assert_ne!(blob, blob2);
        assert_eq!(
            hsm.decrypt_aes_gcm(MK, aad, &blob2).unwrap().as_slice(),
            plaintext
        );

        // Empty plaintext and empty AAD work too.
        let empty = hsm.encrypt_aes_gcm(MK, b"", b"").unwrap();
        assert_eq!(empty.len(), GCM_IV_LEN + GCM_TAG_LEN);
        assert!(hsm.decrypt_aes_gcm(MK, b"", &empty).unwrap().is_empty());
    });
}

/// The generated key really is locked in: CKA_VALUE cannot be read, it cannot be wrapped out,
/// and the attributes read back as sensitive / non-extractable.
#[test]
fn master_key_is_protected() {
    in_softhsm("master_key_is_protected", &["prot"], |_| {
        let hsm = open("prot", 1);
        hsm.generate_aes256_key(MK).unwrap();
        let info = hsm.check_master_key(MK).unwrap();
        assert_eq!(info.key_type, Some(KeyType::AES));
        assert_eq!(info.value_len, Some(32));
        assert!(info.sensitive && info.always_sensitive);
        assert!(!info.extractable && info.never_extractable);
        assert!(info.token && info.encrypt && info.decrypt);

        let (_ctx, session) = raw_session("prot");
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(MK.as_bytes().to_vec()),
            ])
            .unwrap();
        assert_eq!(found.len(), 1);
        let key = found[0];

        // CKA_VALUE: C_GetAttributeValue reports it as sensitive, and get_attributes leaves it out.
        let value_info = session
            .get_attribute_info(key, &[AttributeType::Value])
            .unwrap();
        assert!(
            matches!(value_info[0], AttributeInfo::Sensitive),
            "{value_info:?}"
        );
        let attrs = session
            .get_attributes(
                key,
                &[
                    AttributeType::Value,
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                ],
            )
            .unwrap();
        assert!(
            !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
            "{attrs:?}"
        );
        assert!(
            attrs
                .iter()
                .any(|a| matches!(a, Attribute::Extractable(false))),
            "{attrs:?}"
        );
        assert!(
            attrs
                .iter()
                .any(|a| matches!(a, Attribute::Sensitive(true))),
            "{attrs:?}"
        );

        // Cannot be made extractable again, cannot be wrapped out.
        assert!(
            session
                .update_attributes(key, &[Attribute::Extractable(true)])
                .is_err()
        );
        let wrapping = session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(false),
                    Attribute::ValueLen(32.into()),
                    Attribute::Wrap(true),
                ],
            )
            .unwrap();
        let err = session
            .wrap_key(&Mechanism::AesKeyWrap, wrapping, key)
            .unwrap_err();
        assert!(
            matches!(err, CkError::Pkcs11(RvError::KeyUnextractable, _)),
            "{err:?}"
        );
    });
}

/// Label handling and master-key policy: duplicates refused, missing keys typed, and keys that
/// are extractable / not sensitive / wrong size / session-only are refused by `check_master_key`.
#[test]
fn key_policy() {
    in_softhsm("key_policy", &["policy"], |_| {
        let hsm = open("policy", 1);
        let err = hsm.find_key(MK).unwrap_err();
        assert!(
            matches!(&err, HsmError::KeyMissing { label } if label == MK),
            "{err:?}"
        );
        let err = hsm.check_master_key(MK).unwrap_err();
        assert!(matches!(err, HsmError::KeyMissing { .. }), "{err:?}");
        let err = hsm.encrypt_aes_gcm(MK, b"", b"x").unwrap_err();
        assert!(matches!(err, HsmError::KeyMissing { .. }), "{err:?}");

        hsm.generate_aes256_key(MK).unwrap();
        let err = hsm.generate_aes256_key(MK).unwrap_err();
        assert!(
            matches!(&err, HsmError::KeyExists { label } if label == MK),
            "{err:?}"
        );

        let (_ctx, session) = raw_session("policy");
        let make = |label: &str, extractable: bool, sensitive: bool, len: u64, token: bool| {
            session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(token),
                        Attribute::Private(true),
                        Attribute::Sensitive(sensitive),
                        Attribute::Extractable(extractable),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::ValueLen(len.into()),
                        Attribute::Label(label.as_bytes().to_vec()),
                    ],
                )
                .unwrap();
        };
        make("extractable", true, false, 32, true);
        make("extractable-sensitive", true, true, 32, true);
        make("readable", false, false, 32, true);
        make("aes128", false, true, 16, true);
        make("session-only", false, true, 32, false);

        let err = hsm.check_master_key("extractable").unwrap_err();
        assert!(
            matches!(&err, HsmError::KeyExtractable { label } if label == "extractable"),
            "{err:?}"
        );
        let err = hsm.check_master_key("extractable-sensitive").unwrap_err();
        assert!(matches!(err, HsmError::KeyExtractable { .. }), "{err:?}");
        let err = hsm.check_master_key("readable").unwrap_err();
        assert!(matches!(err, HsmError::KeyNotSensitive { .. }), "{err:?}");
        let err = hsm.check_master_key("aes128").unwrap_err();
        assert!(
            matches!(
                err,
                HsmError::WrongKeyLength {
                    expected: 32,
                    found: Some(16),
                    ..
                }
            ),
            "{err:?}"
        );
        let err = hsm.check_master_key("session-only").unwrap_err();
        assert!(matches!(err, HsmError::KeyNotPersistent { .. }), "{err:?}");

        // A non-AES secret key.
        session
            .generate_key(
                &Mechanism::GenericSecretKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::ValueLen(32.into()),
                    Attribute::Label(b"hmac".to_vec()),
                ],
            )
            .unwrap();
        let err = hsm.check_master_key("hmac").unwrap_err();
        assert!(
            matches!(
                err,
                HsmError::WrongKeyType {
                    found: Some(KeyType::GENERIC_SECRET),
                    ..
                }
            ),
            "{err:?}"
        );

        // A second key with the master key's label makes lookups ambiguous.
        make(MK, false, true, 32, true);
        let err = hsm.find_key(MK).unwrap_err();
        assert!(
            matches!(err, HsmError::KeyAmbiguous { count: 2, .. }),
            "{err:?}"
        );
        let err = hsm.generate_aes256_key(MK).unwrap_err();
        assert!(matches!(err, HsmError::KeyExists { .. }), "{err:?}");
    });
}

/// A module path that does not exist is a load error (no SoftHSM needed).
#[test]
fn wrong_module_path() {
    let err = Hsm::open("/nonexistent/libpkcs11.so", "x", &pin(), 1).unwrap_err();
    assert!(
        matches!(&err, HsmError::ModuleLoad { path, .. } if path.ends_with("libpkcs11.so")),
        "{err:?}"
    );
    let err = Hsm::open(module_path(), "x", &pin(), 0).unwrap_err();
    assert!(matches!(err, HsmError::InvalidPoolSize), "{err:?}");
}

/// Unknown token label and wrong PIN are typed errors, the PIN never shows in messages, and a
/// PIN file with a trailing newline works.
#[test]
fn open_errors_and_pin_file() {
    in_softhsm("open_errors_and_pin_file", &["open"], |env| {
        let err = Hsm::open(module_path(), "no-such-token", &pin(), 1).unwrap_err();
        assert!(
            matches!(&err, HsmError::TokenNotFound { label } if label == "no-such-token"),
            "{err:?}"
        );

        let wrong = Pin::new("999999".to_owned());
        let err = Hsm::open(module_path(), "open", &wrong, 1).unwrap_err();
        assert!(
            matches!(&err, HsmError::PinIncorrect { token } if token == "open"),
            "{err:?}"
        );
        assert!(!format!("{err} {err:?}").contains("999999"));
        assert_eq!(format!("{wrong:?}"), "Pin(<redacted>)");

        let pin_file = env.dir.join("pin");
        std::fs::write(&pin_file, format!("{USER_PIN}\n")).unwrap();
        let hsm = Hsm::open(
            module_path(),
            "open",
            &Pin::from_file(&pin_file).unwrap(),
            1,
        )
        .unwrap();
        hsm.health().unwrap();
        assert_eq!(hsm.token_label(), "open");
        assert!(!format!("{hsm:?}").contains(USER_PIN));
    });
}

/// 8 threads x 200 encrypt/decrypt round trips through a pool of 4 sessions.
#[test]
fn concurrent_round_trips() {
    in_softhsm("concurrent_round_trips", &["conc"], |_| {
        let pool = 4;
        let hsm = Arc::new(open("conc", pool));
        hsm.generate_aes256_key(MK).unwrap();
        let start = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let hsm = Arc::clone(&hsm);
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    for i in 0..200u32 {
                        let aad = format!("thread {t} op {i}");
                        let plaintext = [t.to_le_bytes(), i.to_le_bytes()].concat().repeat(4);
                        let blob = hsm.encrypt_aes_gcm(MK, aad.as_bytes(), &plaintext).unwrap();
                        let back = hsm.decrypt_aes_gcm(MK, aad.as_bytes(), &blob).unwrap();
                        assert_eq!(back.as_slice(), plaintext.as_slice());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // The pool opened more than one session, and never more than `pool`.
        let sessions = hsm.session_count();
        assert!(
            (2..=pool).contains(&sessions),
            "{sessions} sessions in a pool of {pool}"
        );
        hsm.health().unwrap();
    });
}
