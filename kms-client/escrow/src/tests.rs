//! Unit tests of the offline escrow: real age encryption, real Shamir, real files.

use std::io::Read;
use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret;
use base64::Engine as _;

use super::*;
use crate::test_support::*;

const NAMES5: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];

fn custodians(h: &[Holder]) -> Vec<Custodian> {
    h.iter().map(|h| h.custodian.clone()).collect()
}


/// Replaces the value of one `name: value` line.
fn set_field(text: &str, field: &str, value: &str) -> String {
    let prefix = format!("{field}:");
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                found = true;
                format!("{field}: {value}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert!(found, "no {field} line");
    out.join("\n") + "\n"
}

fn remove_field(text: &str, field: &str) -> String {
    let prefix = format!("{field}:");
    text.lines()
        .filter(|l| !l.starts_with(&prefix))
        .collect::<Vec<_>>()
        .join("\n")
}

fn share_value(text: &str) -> Vec<u8> {
    let line = text.lines().find(|l| l.starts_with("share:")).unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(line["share:".len()..].trim())
        .unwrap()
}

/// The text with its share bytes changed by `f`.
fn with_share_bytes(text: &str, f: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut bytes = share_value(text);
    f(&mut bytes);
    set_field(
        text,
        "share",
        &base64::engine::general_purpose::STANDARD.encode(&bytes),
    )
}

fn combos(n: usize, k: usize) -> Vec<Vec<usize>> {
    fn go(start: usize, n: usize, k: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == k {
            out.push(cur.clone());
            return;
        }
        for i in start..n {
            cur.push(i);
            go(i + 1, n, k, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    go(0, n, k, &mut Vec::new(), &mut out);
    out
}

fn pick(texts: &[String], idx: &[usize]) -> Vec<ShareText> {
    idx.iter().map(|&i| parse(&texts[i])).collect()
}

fn setup_3_of_5() -> (
    tempfile::TempDir,
    PathBuf,
    Vec<Holder>,
    Manifest,
    Vec<String>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ceremony");
    let h = holders(&NAMES5);
    let m = ceremony(3, &custodians(&h), &dir).unwrap();
    let texts = share_texts(&dir, &h);
    (tmp, dir, h, m, texts)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn ceremony_3_of_5_every_3_subset_rebuilds_and_every_2_subset_fails() {
    let (_tmp, dir, h, m, texts) = setup_3_of_5();

    // The manifest on disk is the one returned, and is consistent.
    assert_eq!(Manifest::load(&dir.join(MANIFEST_FILE_NAME)).unwrap(), m);
    assert_eq!(Manifest::load(&dir).unwrap(), m);
    assert_eq!(m.format, MANIFEST_FORMAT);
    assert_eq!((m.threshold, m.shares, m.custodians.len()), (3, 5, 5));
    assert_eq!(m.replaces, None);
    assert_eq!(m.ceremony_id.len(), 32);
    assert!(m.recovery_recipient.starts_with("age1"));
    // Exactly the manifest and one share file per custodian; no temporary files left.
    let mut expected: Vec<String> = NAMES5.iter().map(|n| share_file_name(n)).collect();
    expected.push(MANIFEST_FILE_NAME.to_owned());
    expected.sort();
    assert_eq!(files_in(&dir), expected);

    for (i, holder) in h.iter().enumerate() {
        let name = &holder.custodian.name;
        // Another custodian's key does not open this share file.
        let other = &h[(i + 1) % h.len()].identity;
        let ct = std::fs::read(share_path(&dir, name)).unwrap();
        assert!(matches!(
            age::decrypt(other, &ct),
            Err(age::DecryptError::NoMatchingKeys)
        ));
        // Its own key does (decrypted above with the age crate alone).
        let text = &texts[i];
        assert!(text.starts_with("kluis-escrow-share v1\n"), "{name}");
        let s = parse(text);
        let entry = &m.custodians[i];
        assert_eq!(entry.name, *name);
        assert_eq!(entry.recipient, holder.custodian.recipient);
        assert_eq!((s.custodian(), s.index()), (name.as_str(), entry.index));
        assert_eq!(s.ceremony_id(), m.ceremony_id);
        assert_eq!((s.threshold(), s.shares()), (3, 5));
        assert_eq!(s.recovery_recipient(), m.recovery_recipient);
        let v = verify_share(&m, &s).unwrap();
        assert_eq!(
            (v.custodian.as_str(), v.index),
            (name.as_str(), entry.index)
        );
    }

    let mut rebuilt = None;
    let triples = combos(5, 3);
    assert_eq!(triples.len(), 10);
    for idx in &triples {
        let id = combine(&m, &pick(&texts, idx)).unwrap();
        assert_eq!(id.recipient().to_string(), m.recovery_recipient, "{idx:?}");
        rebuilt = Some(id);
    }
    // All five together work as well.
    assert_eq!(
        combine(&m, &parse_all(&texts))
            .unwrap()
            .recipient()
            .to_string(),
        m.recovery_recipient
    );

    let pairs = combos(5, 2);
    assert_eq!(pairs.len(), 10);
    for idx in &pairs {
        match combine(&m, &pick(&texts, idx)) {
            Err(EscrowError::NotEnoughShares { have: 2, need: 3 }) => {}
            other => panic!("{idx:?}: {other:?}"),
        }
    }
    assert!(matches!(
        combine(&m, &[]),
        Err(EscrowError::NotEnoughShares { have: 0, need: 3 })
    ));

    // A backup encrypted to the manifest's recipient with the age crate opens with the
    // rebuilt identity.
    let id = rebuilt.unwrap();
    let recipient: age::x25519::Recipient = m.recovery_recipient.parse().unwrap();
    let ct = age::encrypt(&recipient, b"patient records 2026-01-01").unwrap();
    assert_eq!(
        age::decrypt(id.as_identity(), &ct).unwrap(),
        b"patient records 2026-01-01"
    );
    assert_eq!(
        age::decrypt(&id, &ct).unwrap(),
        b"patient records 2026-01-01"
    );

    // The recovery private key is nowhere on disk in clear.
    let secret = id.as_identity().to_string();
    for f in files_in(&dir) {
        let bytes = std::fs::read(dir.join(&f)).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(secret.expose_secret()), "{f}");
        assert!(!text.to_ascii_uppercase().contains("AGE-SECRET-KEY"), "{f}");
    }
}

#[test]
fn flipped_share_byte_is_named_as_commitment_mismatch_before_combining() {
    let (_tmp, _dir, _h, m, texts) = setup_3_of_5();
    let carol = &texts[2];
    let carol_index = parse(carol).index();
    // Every y byte, every bit position in turn.
    for pos in 1..33 {
        let bad = with_share_bytes(carol, |b| b[pos] ^= 1 << (pos % 8));
        let s = parse(&bad);
        match verify_share(&m, &s) {
            Err(EscrowError::CommitmentMismatch { custodian, index }) => {
                assert_eq!((custodian.as_str(), index), ("carol", carol_index));
            }
            other => panic!("byte {pos}: {other:?}"),
        }
    }
    let bad = with_share_bytes(carol, |b| b[7] ^= 0x80);
    // Named even though three good shares are also given, and whatever its position: it
    // is checked on its own before anything is combined.
    for order in [[0, 1, 3, 2], [2, 0, 1, 3], [0, 2, 1, 3]] {
        let shares: Vec<ShareText> = order
            .iter()
            .map(|&i| {
                if i == 2 {
                    parse(&bad)
                } else {
                    parse(&texts[i])
                }
            })
            .collect();
        match combine(&m, &shares) {
            Err(EscrowError::CommitmentMismatch { custodian, .. }) => {
                assert_eq!(custodian, "carol")
            }
            other => panic!("{order:?}: {other:?}"),
        }
    }
    let msg = verify_share(&m, &parse(&bad)).unwrap_err().to_string();
    assert!(
        msg.contains("\"carol\"") && msg.contains("damaged or altered"),
        "{msg}"
    );

    // The index byte flipped: the share text contradicts itself.
    let bad0 = with_share_bytes(carol, |b| b[0] ^= 0x40);
    assert!(matches!(
        ShareText::parse(&bad0),
        Err(EscrowError::ShareIndexMismatch { .. })
    ));
}

#[test]
fn duplicate_share_is_refused() {
    let (_tmp, _dir, _h, m, texts) = setup_3_of_5();
    let shares = vec![parse(&texts[0]), parse(&texts[1]), parse(&texts[0])];
    match combine(&m, &shares) {
        Err(EscrowError::Duplicate { custodian, index }) => {
            assert_eq!(custodian, "alice");
            assert_eq!(index, m.custodians[0].index);
        }
        other => panic!("{other:?}"),
    }
    // Even with enough distinct shares besides.
    let shares = vec![
        parse(&texts[0]),
        parse(&texts[1]),
        parse(&texts[2]),
        parse(&texts[1]),
    ];
    assert!(matches!(
        combine(&m, &shares),
        Err(EscrowError::Duplicate { custodian, .. }) if custodian == "bob"
    ));
}

#[test]
fn share_of_another_ceremony_is_foreign() {
    let tmp = tempfile::tempdir().unwrap();
    let h = holders(&NAMES5);
    let m1 = ceremony(3, &custodians(&h), &tmp.path().join("one")).unwrap();
    let m2 = ceremony(3, &custodians(&h), &tmp.path().join("two")).unwrap();
    assert_ne!(m1.ceremony_id, m2.ceremony_id);
    assert_ne!(m1.recovery_recipient, m2.recovery_recipient);
    let t1 = share_texts(&tmp.path().join("one"), &h);
    let t2 = share_texts(&tmp.path().join("two"), &h);

    match verify_share(&m1, &parse(&t2[0])) {
        Err(EscrowError::ForeignCeremony {
            custodian,
            expected,
            found,
        }) => {
            assert_eq!(custodian, "alice");
            assert_eq!(expected, m1.ceremony_id);
            assert_eq!(found, m2.ceremony_id);
        }
        other => panic!("{other:?}"),
    }
    let mixed = vec![parse(&t1[0]), parse(&t1[1]), parse(&t2[2])];
    assert!(matches!(
        combine(&m1, &mixed),
        Err(EscrowError::ForeignCeremony { custodian, .. }) if custodian == "carol"
    ));
    // A foreign share whose ceremony line was rewritten disagrees on the recipient...
    let forged = set_field(&t2[2], "ceremony", &m1.ceremony_id);
    assert!(matches!(
        verify_share(&m1, &parse(&forged)),
        Err(EscrowError::ShareFieldMismatch {
            field: "recovery-recipient",
            ..
        })
    ));
    // ...and with that rewritten too, it still fails on its commitment.
    let forged = set_field(&forged, "recovery-recipient", &m1.recovery_recipient);
    assert!(matches!(
        verify_share(&m1, &parse(&forged)),
        Err(EscrowError::CommitmentMismatch { custodian, .. }) if custodian == "carol"
    ));
}

#[test]
fn share_with_index_zero_is_refused() {
    let (_tmp, _dir, _h, m, texts) = setup_3_of_5();
    // Index line and share bytes both say 0 (a forged share for x = 0, the secret).
    let zero = with_share_bytes(&set_field(&texts[0], "index", "0"), |b| b[0] = 0);
    assert!(matches!(
        ShareText::parse(&zero),
        Err(EscrowError::IndexZero)
    ));
    // Only the index line says 0.
    let zero_line = set_field(&texts[0], "index", "0");
    assert!(matches!(
        ShareText::parse(&zero_line),
        Err(EscrowError::IndexZero)
    ));
    // An index beyond the number of shares.
    let nine = with_share_bytes(&set_field(&texts[0], "index", "9"), |b| b[0] = 9);
    assert!(matches!(
        verify_share(&m, &parse(&nine)),
        Err(EscrowError::IndexOutOfRange {
            index: 9,
            shares: 5
        })
    ));
}

#[test]
fn garbage_and_malformed_share_texts_get_named_errors() {
    let (_tmp, dir, h, m, texts) = setup_3_of_5();
    let good = &texts[0];
    let err = |t: &str| match ShareText::parse(t) {
        Err(e) => e,
        Ok(s) => panic!("parsed: {s:?}"),
    };

    assert!(matches!(err("hello world\n"), EscrowError::NotAShare));
    assert!(matches!(err(""), EscrowError::NotAShare));
    assert!(matches!(err("{\"format\": \"x\"}"), EscrowError::NotAShare));
    assert!(matches!(
        decode_share(&[0xff, 0xfe, 0x00, 0x41], &ShareIdentities::none()),
        Err(EscrowError::NotAShare)
    ));
    assert!(matches!(
        err(&good.replace("kluis-escrow-share v1", "kluis-escrow-share v2")),
        EscrowError::UnsupportedShareVersion { found } if found == "kluis-escrow-share v2"
    ));
    for field in [
        "ceremony",
        "custodian",
        "index",
        "threshold",
        "shares",
        "recovery-recipient",
        "share",
    ] {
        match err(&remove_field(good, field)) {
            EscrowError::MissingField { field: f } => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert!(matches!(
        err(&set_field(good, "share", "not base64 at all!")),
        EscrowError::BadShareEncoding { .. }
    ));
    assert!(matches!(
        err(&with_share_bytes(good, |b| b.truncate(20))),
        EscrowError::BadShareLength { len: 20, .. }
    ));
    assert!(matches!(
        err(&with_share_bytes(good, |b| b.extend_from_slice(&[0; 200]))),
        EscrowError::BadShareLength { .. }
    ));
    assert!(matches!(
        err(&format!("{good}color: blue\n")),
        EscrowError::UnknownField { field, .. } if field == "color"
    ));
    assert!(matches!(
        err(&format!("{good}index: 1\n")),
        EscrowError::DuplicateField { field: "index", .. }
    ));
    assert!(matches!(
        err(&format!("{good}a line without a colon\n")),
        EscrowError::MalformedLine { .. }
    ));
    assert!(matches!(
        err(&set_field(good, "threshold", "three")),
        EscrowError::BadField {
            field: "threshold",
            ..
        }
    ));
    // Index line and share bytes disagree.
    let idx = parse(good).index();
    let other = if idx == 1 { 2 } else { 1 };
    assert!(matches!(
        err(&set_field(good, "index", &other.to_string())),
        EscrowError::ShareIndexMismatch { field, embedded } if field == other && embedded == idx
    ));
    // CRLF line endings, a BOM and missing base64 padding are accepted.
    let crlf = format!("\u{feff}{}", good.replace('\n', "\r\n"));
    verify_share(&m, &parse(&crlf)).unwrap();
    let unpadded = set_field(
        good,
        "share",
        &base64::engine::general_purpose::STANDARD_NO_PAD.encode(share_value(good)),
    );
    verify_share(&m, &parse(&unpadded)).unwrap();

    // A still-encrypted share file without an identity.
    let enc = share_path(&dir, "alice");
    let e = read_share(&enc, None).unwrap_err();
    assert!(matches!(e, EscrowError::StillEncrypted));
    assert_eq!(
        e.to_string(),
        "share file is still age-encrypted; decrypt it with `age -d -i YOUR_KEY` or pass --identity"
    );
    let ct = std::fs::read(&enc).unwrap();
    assert!(matches!(
        ShareText::parse(&String::from_utf8_lossy(&ct)),
        Err(EscrowError::StillEncrypted)
    ));
    // With the wrong custodian's key.
    let tmp = tempfile::tempdir().unwrap();
    let bob_key = tmp.path().join("bob.key");
    std::fs::write(&bob_key, h[1].identity.to_string().expose_secret()).unwrap();
    assert!(matches!(
        read_share(&enc, Some(&bob_key)),
        Err(EscrowError::NoMatchingIdentity)
    ));
    // With a file that is not an identity file.
    assert!(matches!(
        read_share(&enc, Some(&dir.join(MANIFEST_FILE_NAME))),
        Err(EscrowError::IdentityFile { .. })
    ));
    // With the right key.
    let alice_key = tmp.path().join("alice.key");
    std::fs::write(&alice_key, h[0].identity.to_string().expose_secret()).unwrap();
    let s = read_share(&enc, Some(&alice_key)).unwrap();
    assert_eq!(s.custodian(), "alice");
    // A truncated share file.
    let cut = tmp.path().join("cut.age");
    std::fs::write(&cut, &ct[..ct.len() - 10]).unwrap();
    assert!(matches!(
        read_share(&cut, Some(&alice_key)),
        Err(EscrowError::ShareDecrypt { .. })
    ));
}

#[test]
fn altered_descriptive_lines_are_refused() {
    let (_tmp, _dir, _h, m, texts) = setup_3_of_5();
    let alice = &texts[0];
    assert!(matches!(
        verify_share(&m, &parse(&set_field(alice, "custodian", "mallory"))),
        Err(EscrowError::CustodianMismatch { expected, found, .. })
            if expected == "alice" && found == "mallory"
    ));
    assert!(matches!(
        verify_share(&m, &parse(&set_field(alice, "threshold", "2"))),
        Err(EscrowError::ShareFieldMismatch {
            field: "threshold",
            ..
        })
    ));
    let other = age::x25519::Identity::generate().to_public().to_string();
    assert!(matches!(
        verify_share(&m, &parse(&set_field(alice, "recovery-recipient", &other))),
        Err(EscrowError::ShareFieldMismatch {
            field: "recovery-recipient",
            ..
        })
    ));
    // A manifest whose commitment was altered no longer accepts the share.
    let mut bad = m.clone();
    bad.custodians[0].commitment = "0".repeat(64);
    assert!(matches!(
        verify_share(&bad, &parse(alice)),
        Err(EscrowError::CommitmentMismatch { custodian, .. }) if custodian == "alice"
    ));
    // A manifest whose recovery recipient was swapped: the shares are fine, but the rebuilt
    // key does not match, and nothing is returned.
    let mut swapped = m.clone();
    swapped.recovery_recipient = other.clone();
    let idx = [0, 1, 2];
    // The share text's recipient line disagrees first...
    assert!(matches!(
        combine(&swapped, &pick(&texts, &idx)),
        Err(EscrowError::ShareFieldMismatch { .. })
    ));
    // ...and with the lines also rewritten, the final recipient check catches it.
    let rewritten: Vec<ShareText> = idx
        .iter()
        .map(|&i| parse(&set_field(&texts[i], "recovery-recipient", &other)))
        .collect();
    match combine(&swapped, &rewritten) {
        Err(EscrowError::RecipientMismatch { expected, found }) => {
            assert_eq!(expected, other);
            assert_eq!(found, m.recovery_recipient);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn reshare_3_of_5_to_2_of_3_keeps_the_recipient() {
    let (tmp, _dir, _h, old, old_texts) = setup_3_of_5();
    let new_h = holders(&["frank", "grace", "heidi"]);
    let new_dir = tmp.path().join("reshared");

    // Too few old shares: refused, nothing written.
    assert!(matches!(
        reshare(
            &old,
            &pick(&old_texts, &[0, 1]),
            2,
            &custodians(&new_h),
            &new_dir
        ),
        Err(EscrowError::NotEnoughShares { have: 2, need: 3 })
    ));
    assert!(!new_dir.exists());

    let new = reshare(
        &old,
        &pick(&old_texts, &[0, 1, 2]),
        2,
        &custodians(&new_h),
        &new_dir,
    )
    .unwrap();
    assert_eq!(new.replaces.as_deref(), Some(old.ceremony_id.as_str()));
    assert_ne!(new.ceremony_id, old.ceremony_id);
    assert_eq!(new.recovery_recipient, old.recovery_recipient);
    assert_eq!((new.threshold, new.shares), (2, 3));
    assert_eq!(Manifest::load(&new_dir).unwrap(), new);

    let new_texts = share_texts(&new_dir, &new_h);
    for idx in combos(3, 2) {
        let id = combine(&new, &pick(&new_texts, &idx)).unwrap();
        assert_eq!(id.recipient().to_string(), old.recovery_recipient);
    }
    for i in 0..3 {
        assert!(matches!(
            combine(&new, &pick(&new_texts, &[i])),
            Err(EscrowError::NotEnoughShares { have: 1, need: 2 })
        ));
    }
    // An old share is refused by the new manifest, alone and mixed with new ones.
    match verify_share(&new, &parse(&old_texts[0])) {
        Err(EscrowError::ForeignCeremony {
            expected, found, ..
        }) => {
            assert_eq!(expected, new.ceremony_id);
            assert_eq!(found, old.ceremony_id);
        }
        other => panic!("{other:?}"),
    }
    let mixed = vec![parse(&new_texts[0]), parse(&old_texts[4])];
    assert!(matches!(
        combine(&new, &mixed),
        Err(EscrowError::ForeignCeremony { .. })
    ));
    // The leaving custodian (erin) with only her old share cannot rebuild anything.
    assert!(matches!(
        combine(&old, &pick(&old_texts, &[4])),
        Err(EscrowError::NotEnoughShares { have: 1, need: 3 })
    ));
    // Re-sharing into the same directory again is refused: never overwrite a ceremony.
    assert!(matches!(
        reshare(
            &old,
            &pick(&old_texts, &[2, 3, 4]),
            2,
            &custodians(&new_h),
            &new_dir
        ),
        Err(EscrowError::ManifestExists { .. })
    ));
    assert_eq!(Manifest::load(&new_dir).unwrap(), new);
}

#[cfg(unix)]
#[test]
fn identity_file_is_0600_parses_with_age_and_is_never_overwritten() {
    use std::os::unix::fs::PermissionsExt;

    let (tmp, _dir, _h, m, texts) = setup_3_of_5();
    let id = combine(&m, &pick(&texts, &[1, 3, 4])).unwrap();
    let path = tmp.path().join("recovery.key");
    id.write_identity_file(&path).unwrap();

    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let content = std::fs::read_to_string(&path).unwrap();
    assert!(content.starts_with("# created: "), "{content}");
    assert!(content.contains(&format!("# recipient: {}\n", m.recovery_recipient)));
    assert!(content.contains(&format!("# kluis-escrow-ceremony: {}\n", m.ceremony_id)));
    assert!(
        content
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("AGE-SECRET-KEY-1")
    );

    // The age crate reads it as a standard identity file and decrypts with it.
    let idf = age::IdentityFile::from_file(path.to_string_lossy().into_owned()).unwrap();
    let mut recipients_file = Vec::new();
    idf.write_recipients_file(&mut recipients_file).unwrap();
    assert_eq!(
        String::from_utf8(recipients_file).unwrap().trim(),
        m.recovery_recipient
    );
    let identities = idf.into_identities().unwrap();
    let recipient: age::x25519::Recipient = m.recovery_recipient.parse().unwrap();
    let ct = age::encrypt(&recipient, b"backup").unwrap();
    let mut pt = Vec::new();
    age::Decryptor::new(&ct[..])
        .unwrap()
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .unwrap()
        .read_to_end(&mut pt)
        .unwrap();
    assert_eq!(pt, b"backup");

    // Never overwritten: neither its own file nor any other existing file.
    assert!(matches!(
        id.write_identity_file(&path),
        Err(EscrowError::IdentityFileExists { .. })
    ));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
    let other = tmp.path().join("notes.txt");
    std::fs::write(&other, "keep me").unwrap();
    assert!(matches!(
        id.write_identity_file(&other),
        Err(EscrowError::IdentityFileExists { .. })
    ));
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "keep me");
}

#[test]
fn ceremony_refusals_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let h = holders(&NAMES5);
    let c = custodians(&h);
    let out = tmp.path().join("out");
    let refused = |r: Result<Manifest, EscrowError>| -> EscrowError {
        let e = r.unwrap_err();
        assert!(!out.exists(), "output directory made after {e}");
        e
    };

    assert!(matches!(
        refused(ceremony(1, &c, &out)),
        EscrowError::ThresholdTooSmall { threshold: 1 }
    ));
    assert!(matches!(
        refused(ceremony(0, &c, &out)),
        EscrowError::ThresholdTooSmall { threshold: 0 }
    ));
    assert!(matches!(
        refused(ceremony(6, &c, &out)),
        EscrowError::ThresholdAboveCustodians {
            threshold: 6,
            custodians: 5
        }
    ));
    assert!(matches!(
        refused(ceremony(2, &[], &out)),
        EscrowError::ThresholdAboveCustodians { .. }
    ));

    let mut dup = c.clone();
    dup[3].name = "Alice".into();
    assert!(matches!(
        refused(ceremony(3, &dup, &out)),
        EscrowError::DuplicateCustodian { name } if name == "Alice"
    ));
    for bad_name in ["../evil", "a b", "", "x/y", "caf\u{e9}", &"n".repeat(65)] {
        let mut bad = c.clone();
        bad[1].name = bad_name.to_owned();
        assert!(
            matches!(
                refused(ceremony(3, &bad, &out)),
                EscrowError::BadCustodianName { name } if name == bad_name
            ),
            "{bad_name:?}"
        );
    }

    let mut same_key = c.clone();
    same_key[4].recipient = same_key[0].recipient.clone();
    assert!(matches!(
        refused(ceremony(3, &same_key, &out)),
        EscrowError::DuplicateRecipient { first, second } if first == "alice" && second == "erin"
    ));

    let mut same_key_upper = c.clone();
    same_key_upper[1].recipient = same_key_upper[0].recipient.to_ascii_uppercase();
    assert!(matches!(
        refused(ceremony(3, &same_key_upper, &out)),
        EscrowError::DuplicateRecipient { first, second } if first == "alice" && second == "bob"
    ));

    for bad_recipient in [
        "age1notavalidkey",
        "AGE-SECRET-KEY-1QQQQQQQQQQ",
        "",
        "hello",
    ] {
        let mut bad = c.clone();
        bad[2].recipient = bad_recipient.to_owned();
        let e = refused(ceremony(3, &bad, &out));
        assert!(
            matches!(&e, EscrowError::BadRecipient { custodian, .. } if custodian == "carol"),
            "{bad_recipient:?}: {e:?}"
        );
        assert!(e.to_string().contains("\"carol\""), "{e}");
    }
    // A damaged X25519 recipient (one character changed: bad checksum).
    let mut bad = c.clone();
    let mut chars: Vec<char> = bad[2].recipient.chars().collect();
    chars[10] = if chars[10] == 'q' { 'p' } else { 'q' };
    bad[2].recipient = chars.into_iter().collect();
    assert!(matches!(
        refused(ceremony(3, &bad, &out)),
        EscrowError::BadRecipient { custodian, .. } if custodian == "carol"
    ));
    let mut ssh = c.clone();
    ssh[0].recipient = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsKLqeplhpW+uObz5dvMgjz1OxfM/XXUB+VHtZ6isGN alice@host".into();
    assert!(matches!(
        refused(ceremony(3, &ssh, &out)),
        EscrowError::SshRecipientUnsupported { custodian } if custodian == "alice"
    ));

    let many: Vec<Custodian> = (0..256)
        .map(|i| Custodian::new(format!("c{i}"), c[0].recipient.clone()))
        .collect();
    assert!(matches!(
        refused(ceremony(3, &many, &out)),
        EscrowError::TooManyCustodians { count: 256 }
    ));

    // An existing ceremony is never overwritten, nor is a stray share file.
    let m = ceremony(3, &c, &out).unwrap();
    let before = std::fs::read(out.join(MANIFEST_FILE_NAME)).unwrap();
    let alice_before = std::fs::read(share_path(&out, "alice")).unwrap();
    assert!(matches!(
        ceremony(2, &c[..3], &out),
        Err(EscrowError::ManifestExists { path }) if path == out.join(MANIFEST_FILE_NAME)
    ));
    assert_eq!(std::fs::read(out.join(MANIFEST_FILE_NAME)).unwrap(), before);
    assert_eq!(
        std::fs::read(share_path(&out, "alice")).unwrap(),
        alice_before
    );
    assert_eq!(Manifest::load(&out).unwrap(), m);

    let stray = tmp.path().join("stray");
    std::fs::create_dir(&stray).unwrap();
    std::fs::write(share_path(&stray, "bob"), "old").unwrap();
    assert!(matches!(
        ceremony(3, &c, &stray),
        Err(EscrowError::ShareFileExists { .. })
    ));
    assert_eq!(files_in(&stray), vec![share_file_name("bob")]);
}

#[test]
fn plugin_recipient_is_accepted_and_a_missing_plugin_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let h = holders(&["alice", "bob"]);
    let mut c = custodians(&h);
    // A well-formed plugin recipient for a plugin that is not installed.
    let hrp = bech32::Hrp::parse("age1kluisnosuchplugin").unwrap();
    let plugin_recipient = bech32::encode::<bech32::Bech32>(hrp, &[7u8; 33]).unwrap();
    assert!(plugin_recipient.starts_with("age1kluisnosuchplugin1"));
    c.push(Custodian::new("yubi", plugin_recipient));
    match ceremony(2, &c, &out) {
        Err(EscrowError::PluginMissing { custodian, binary }) => {
            assert_eq!(custodian, "yubi");
            assert_eq!(binary, "age-plugin-kluisnosuchplugin");
        }
        other => panic!("{other:?}"),
    }
    let msg = ceremony(2, &c, &out).unwrap_err().to_string();
    assert!(
        msg.contains("\"yubi\"")
            && msg.contains("age-plugin-kluisnosuchplugin")
            && msg.contains("PATH"),
        "{msg}"
    );
    assert!(!out.exists());
}

#[test]
fn manifest_errors_are_clear() {
    let (tmp, dir, _h, m, _texts) = setup_3_of_5();
    let json = m.to_json().unwrap();
    assert_eq!(Manifest::from_json(&json).unwrap(), m);

    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Value)| -> String {
        let mut v = value.clone();
        f(&mut v);
        serde_json::to_string(&v).unwrap()
    };
    let e = Manifest::from_json(&with(&|v| v["extra"] = 1.into())).unwrap_err();
    assert!(matches!(e, EscrowError::ManifestParse { .. }));
    assert!(e.to_string().contains("unknown field `extra`"), "{e}");
    let e = Manifest::from_json(&with(&|v| v["format"] = "kluis-escrow-manifest/v9".into()))
        .unwrap_err();
    assert!(matches!(
        e,
        EscrowError::ManifestInvalid {
            problem: ManifestProblem::UnsupportedFormat { .. }
        }
    ));
    let e = Manifest::from_json(&with(&|v| v["threshold"] = 7.into())).unwrap_err();
    assert!(matches!(
        e,
        EscrowError::ManifestInvalid {
            problem: ManifestProblem::ThresholdAboveShares { .. }
        }
    ));
    let e = Manifest::from_json(&with(&|v| v["custodians"][1]["index"] = 1.into())).unwrap_err();
    assert!(matches!(
        e,
        EscrowError::ManifestInvalid {
            problem: ManifestProblem::DuplicateIndex { index: 1, .. }
        }
    ));
    let e = Manifest::from_json(&with(&|v| v["custodians"][0]["commitment"] = "xyz".into()))
        .unwrap_err();
    assert!(matches!(
        e,
        EscrowError::ManifestInvalid {
            problem: ManifestProblem::BadCommitment { .. }
        }
    ));
    let e = Manifest::from_json(&with(&|v| v["custodians"][0]["recipient"] = "nope".into()))
        .unwrap_err();
    assert!(matches!(
        e,
        EscrowError::ManifestInvalid {
            problem: ManifestProblem::BadCustodianRecipient { .. }
        }
    ));
    // A share encrypted to the recovery recipient itself (the server refused this before
    // the server and kmsctl shared one validator; now both do).
    let e = Manifest::from_json(&with(&|v| {
        let r = v["recovery_recipient"].clone();
        v["custodians"][0]["recipient"] = r;
    }))
    .unwrap_err();
    assert!(matches!(
        e,
        EscrowError::ManifestInvalid {
            problem: ManifestProblem::CustodianIsRecoveryRecipient { .. }
        }
    ));
    // Missing file, not JSON, a share file given as manifest.
    assert!(matches!(
        Manifest::load(&tmp.path().join("missing.json")),
        Err(EscrowError::Io { .. })
    ));
    let e = Manifest::load(&share_path(&dir, "alice")).unwrap_err();
    assert!(matches!(e, EscrowError::ManifestParse { .. }), "{e}");
    assert!(e.to_string().contains("share-alice.age"), "{e}");
}

#[test]
fn commitment_binds_ceremony_index_and_bytes() {
    let id = "00112233445566778899aabbccddeeff";
    let bytes = [3u8; 33];
    let c = share_commitment(id, 3, &bytes);
    assert_eq!(c.len(), 64);
    assert!(
        c.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(c, share_commitment(id, 3, &bytes));
    assert_ne!(
        c,
        share_commitment("00112233445566778899aabbccddeef0", 3, &bytes)
    );
    assert_ne!(c, share_commitment(id, 4, &bytes));
    let mut other = bytes;
    other[32] ^= 1;
    assert_ne!(c, share_commitment(id, 3, &other));
    // Not a plain hash of the share.
    let plain = ring::digest::digest(&ring::digest::SHA256, &bytes);
    assert_ne!(c, hex::encode(plain));
}

#[test]
fn debug_and_error_output_never_show_secrets() {
    let (_tmp, _dir, _h, m, texts) = setup_3_of_5();
    let s = parse(&texts[0]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(share_value(&texts[0]));
    let dbg = format!("{s:?}");
    assert!(!dbg.contains(&b64) && dbg.contains("<redacted>"), "{dbg}");
    let id = combine(&m, &parse_all(&texts)).unwrap();
    let dbg = format!("{id:?}");
    assert!(
        dbg.contains(&m.recovery_recipient) && dbg.contains("<redacted>"),
        "{dbg}"
    );
    assert!(
        !dbg.to_ascii_uppercase().contains("AGE-SECRET-KEY"),
        "{dbg}"
    );
    let bad = with_share_bytes(&texts[0], |b| b[5] ^= 1);
    let e = verify_share(&m, &parse(&bad)).unwrap_err();
    let text = format!("{e} {e:?}");
    let bad_b64 = base64::engine::general_purpose::STANDARD.encode(share_value(&bad));
    assert!(!text.contains(&b64) && !text.contains(&bad_b64), "{text}");
    assert!(text.contains("alice"), "{text}");
}

#[test]
fn armored_share_file_opens_with_identity() {
    let (tmp, _dir, h, m, texts) = setup_3_of_5();
    let recipient = h[1].identity.to_public();
    let armored = age::encrypt_and_armor(&recipient, texts[1].as_bytes()).unwrap();
    assert!(armored.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
    let path = tmp.path().join("bob.age.txt");
    std::fs::write(&path, &armored).unwrap();
    assert!(matches!(
        read_share(&path, None),
        Err(EscrowError::StillEncrypted)
    ));
    let key = tmp.path().join("bob.key");
    std::fs::write(&key, h[1].identity.to_string().expose_secret()).unwrap();
    let s = read_share(&path, Some(&key)).unwrap();
    assert_eq!(verify_share(&m, &s).unwrap().custodian, "bob");
}

#[test]
fn manifest_parses_from_text_alone_with_typed_errors() {
    let (_tmp, _dir, _h, m, _texts) = setup_3_of_5();
    let json = m.to_json().unwrap();
    assert_eq!(Manifest::parse(json.as_bytes()).unwrap(), m);

    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["extra"] = 1.into();
    let e = Manifest::parse(value.to_string().as_bytes()).unwrap_err();
    assert!(matches!(e, ManifestError::Json { .. }), "{e}");
    assert!(e.to_string().contains("unknown field `extra`"), "{e}");

    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["threshold"] = 7.into();
    let e = Manifest::parse(value.to_string().as_bytes()).unwrap_err();
    assert!(matches!(
        e,
        ManifestError::Invalid {
            problem: ManifestProblem::ThresholdAboveShares { .. }
        }
    ));
    assert_eq!(
        e.to_string(),
        "the escrow manifest is not valid: threshold 7 is above the number of shares 5"
    );
}

#[cfg(unix)]
#[test]
fn identity_file_is_never_written_through_a_symlink() {
    let (tmp, _dir, _h, m, texts) = setup_3_of_5();
    let id = combine(&m, &parse_all(&texts[..3])).unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let target = elsewhere.join("stolen.key");
    let out = tmp.path().join("recovery.key");
    std::os::unix::fs::symlink(&target, &out).unwrap();
    assert!(matches!(id.write_identity_file(&out), Err(EscrowError::IdentityFileExists { .. })));
    assert!(std::fs::symlink_metadata(&target).is_err(), "written through the link");
    assert!(std::fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
}
