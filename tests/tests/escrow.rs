//! Escrow end to end: the real `kms-server`, `kmsctl` and `backup-hook` binaries, the stock
//! `age` and `age-keygen` commands (Debian package `age`) and the `age` crate.
//!
//! docs/disaster-recovery.md quotes the commands run here, with the same flags: change one,
//! change the other.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::str::FromStr;

use kluis_tests::*;

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

/// Runs a stock system command (`age`, `age-keygen`).
fn stock(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("`{cmd}` could not be run ({e}); install it with `apt-get install age`"))
}

/// One custodian: a name, their own age identity file (made by the stock `age-keygen`) and
/// its public recipient.
struct Custodian {
    name: String,
    key: PathBuf,
    recipient: String,
}

fn keygen(dir: &Path, name: &str) -> Custodian {
    let key = dir.join(format!("{name}.key"));
    ok(&stock("age-keygen", &["-o", s(&key)]), "age-keygen -o");
    let y = stock("age-keygen", &["-y", s(&key)]);
    ok(&y, "age-keygen -y");
    let recipient = stdout(&y).trim().to_owned();
    assert!(recipient.starts_with("age1"), "{recipient}");
    Custodian { name: name.to_owned(), key, recipient }
}

fn custodians(dir: &Path, names: &[&str]) -> Vec<Custodian> {
    names.iter().map(|n| keygen(dir, n)).collect()
}

fn custodian_args(cs: &[Custodian]) -> Vec<String> {
    cs.iter().flat_map(|c| ["--custodian".to_owned(), format!("{}={}", c.name, c.recipient)]).collect()
}

/// `kmsctl escrow ceremony --threshold K --custodian NAME=RECIPIENT ... --out DIR`;
/// returns the manifest path and its JSON.
fn ceremony(out_dir: &Path, threshold: u8, cs: &[Custodian]) -> (PathBuf, serde_json::Value) {
    let k = threshold.to_string();
    let extra = custodian_args(cs);
    let mut args = vec!["escrow", "ceremony", "--threshold", &k];
    args.extend(extra.iter().map(String::as_str));
    args.extend(["--out", s(out_dir)]);
    let o = kmsctl_offline(&args);
    ok(&o, "escrow ceremony");
    assert!(stdout(&o).contains("The recovery private key was not written anywhere."), "{}", stdout(&o));
    let manifest = out_dir.join("manifest.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(json["threshold"], u64::from(threshold));
    assert_eq!(json["shares"], cs.len() as u64);
    for c in cs {
        let share = out_dir.join(format!("share-{}.age", c.name));
        let bytes = std::fs::read(&share).unwrap();
        assert!(bytes.starts_with(b"age-encryption.org/v1\n"), "{} is not an age file", share.display());
        // No share text is ever written in clear.
        assert!(!String::from_utf8_lossy(&bytes).contains("kluis-escrow-share"));
    }
    // No identity file in the ceremony directory: the private key is not on disk.
    for e in std::fs::read_dir(out_dir).unwrap() {
        let text = std::fs::read(e.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains("AGE-SECRET-KEY-"));
    }
    (manifest, json)
}

/// The custodian decrypts their own share file with the stock command, as the guide says:
/// `(umask 077; age -d -i me.key share-NAME.age > share-NAME.txt)`; the text is theirs alone.
fn decrypt_share(ceremony_dir: &Path, c: &Custodian, into: &Path) -> PathBuf {
    let share = ceremony_dir.join(format!("share-{}.age", c.name));
    let txt = into.join(format!("share-{}.txt", c.name));
    let o = Command::new("sh")
        .arg("-c")
        .arg(r#"(umask 077; age -d -i "$1" "$2" > "$3")"#)
        .args(["sh", s(&c.key), s(&share), s(&txt)])
        .output()
        .unwrap();
    ok(&o, "age -d of a share file");
    assert_eq!(mode(&txt), 0o600, "the decrypted share is readable by its custodian only");
    txt
}

/// `kmsctl escrow combine --manifest M [--identity ID ...] -o OUT SHARE...`
fn combine(manifest: &Path, identities: &[&Path], out: &Path, shares: &[&Path]) -> Output {
    let mut args = vec!["escrow", "combine", "--manifest", s(manifest)];
    for i in identities {
        args.extend(["--identity", s(i)]);
    }
    args.extend(["-o", s(out)]);
    args.extend(shares.iter().map(|p| s(p)));
    kmsctl_offline(&args)
}

fn verify_share(manifest: &Path, share: &Path) -> Output {
    kmsctl_offline(&["escrow", "verify-share", "--manifest", s(manifest), s(share)])
}

/// The public recipient of an identity file, as `age-keygen -y` prints it.
fn recipient_of(identity_file: &Path) -> String {
    let o = stock("age-keygen", &["-y", s(identity_file)]);
    ok(&o, "age-keygen -y");
    stdout(&o).trim().to_owned()
}

/// The age crate: open `sealed` with an identity file, as any third-party tool would.
fn age_crate_decrypt(identity_file: &Path, sealed: &[u8]) -> Result<Vec<u8>, String> {
    let ids = age::IdentityFile::from_file(s(identity_file).to_owned())
        .map_err(|e| e.to_string())?
        .into_identities()
        .map_err(|e| e.to_string())?;
    let dec = age::Decryptor::new(sealed).map_err(|e| e.to_string())?;
    let mut r = dec.decrypt(ids.iter().map(|i| i.as_ref() as &dyn age::Identity)).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    r.read_to_end(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

fn has_recovery_stanza(sealed: &[u8]) -> bool {
    header(sealed).contains("\n-> X25519 ")
}

/// `kmsctl escrow install` as `identity`. An install that needs dual control (the first
/// recipient, or another one) is approved by a second officer (`dev`; `officer` when
/// `identity` is `dev`); returns the approval's output then, else the install's.
fn install(server: &Server, identity: &str, manifest: &Path) -> Output {
    approve_if_pending(server, identity, server.kmsctl(identity, &["escrow", "install", s(manifest)]))
}

fn approve_if_pending(server: &Server, identity: &str, o: Output) -> Output {
    if !o.status.success() || !stdout(&o).contains("kmsctl approve ") {
        return o;
    }
    let id = approval_id(&o);
    server.kmsctl(if identity == "dev" { "officer" } else { "dev" }, &["approve", &id])
}

fn status_json(server: &Server, identity: &str) -> serde_json::Value {
    let o = server.kmsctl(identity, &["escrow", "status", "--json"]);
    ok(&o, "escrow status --json");
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Every share file of a ceremony decrypted with the age crate (for the tests that are not
/// about the stock command); returns the share text paths in custodian order.
fn decrypt_all_with_crate(ceremony_dir: &Path, cs: &[Custodian], into: &Path) -> Vec<PathBuf> {
    cs.iter()
        .map(|c| {
            let sealed = std::fs::read(ceremony_dir.join(format!("share-{}.age", c.name))).unwrap();
            let text = age_crate_decrypt(&c.key, &sealed).unwrap();
            let p = into.join(format!("share-{}.txt", c.name));
            std::fs::write(&p, text).unwrap();
            p
        })
        .collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard padded base64 (the test crate has no base64 dependency).
fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(text: &str) -> Vec<u8> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for ch in text.trim_end_matches('=').bytes() {
        bits = (bits << 6) | B64.iter().position(|&b| b == ch).unwrap() as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

/// Replaces the `share:` value of a share text via `f` on the decoded bytes.
fn edit_share_text(text: &str, f: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut f = Some(f);
    text.lines()
        .map(|l| match l.strip_prefix("share: ") {
            Some(v) => {
                let mut bytes = b64_decode(v);
                assert_eq!(b64_encode(&bytes), v, "base64 helper");
                assert_eq!(bytes.len(), 33);
                (f.take().unwrap())(&mut bytes);
                format!("share: {}", b64_encode(&bytes))
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

// ---------------------------------------------------------------------------------------
// 1. the full disaster
// ---------------------------------------------------------------------------------------

/// Server, disk and data directory are gone; only the sealed files, the manifest and three
/// of five custodians (with their own age keys) remain. Every backup comes back, byte for
/// byte, three ways: backup-hook, the stock `age` command, and the age crate.
#[test]
fn disaster_three_of_five_custodians_recover_every_backup_with_no_server() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let keys = w.join("custodian-keys");
    std::fs::create_dir(&keys).unwrap();
    let cs = custodians(&keys, &["alice", "bob", "carol", "dave", "erin"]);
    let cer = w.join("ceremony");
    let (manifest, mjson) = ceremony(&cer, 3, &cs);
    let recovery_recipient = mjson["recovery_recipient"].as_str().unwrap().to_owned();

    let mut server = Server::start();
    ok(&install(&server, "officer", &manifest), "escrow install");
    let officer = server.client("officer");
    ok(&kmsctl(&officer, &["keyring", "create", "pacs-images"]), "keyring create");

    // Several backups through the server: empty, tiny, exactly one chunk, > 64 KiB, two
    // keyrings. Kept outside the server's directory (they are on the backup storage).
    let backups_dir = w.join("backups");
    std::fs::create_dir(&backups_dir).unwrap();
    let plan: [(&str, &str, &str, usize); 5] = [
        ("sealer", "default", "empty", 0),
        ("sealer", "default", "tiny", 1),
        ("sealer", "default", "one-chunk", 65_536),
        ("sealer", "default", "ehr-db-full", 200_003),
        ("dev", "pacs-images", "pacs-full", 3 * 65_536 + 5),
    ];
    let mut backups = Vec::new();
    for (i, (who, keyring, id, len)) in plan.iter().enumerate() {
        let data = sample(i as u64 + 11, *len);
        let sealed = seal(&server, who, keyring, id, &data);
        let h = header(&sealed);
        assert!(h.contains(&format!("\n-> kluis {keyring} ")), "{h}");
        assert!(has_recovery_stanza(&sealed), "{id}: no recovery stanza: {h}");
        let path = backups_dir.join(format!("{id}.age"));
        std::fs::write(&path, &sealed).unwrap();
        backups.push((path, data));
    }

    // The yearly rehearsal: every custodian checks their still-encrypted share file with
    // their own key, writing nothing in clear.
    for c in &cs {
        let share = cer.join(format!("share-{}.age", c.name));
        let o = kmsctl_offline(&["escrow", "verify-share", "--manifest", s(&manifest), "--identity", s(&c.key), s(&share)]);
        ok(&o, "verify-share --identity");
        assert!(stdout(&o).contains(&format!("(custodian {}) is intact", c.name)), "{}", stdout(&o));
    }

    // The disaster: the server dies and its disk (keys, master key, store, client configs) is gone.
    server.kill9();
    std::fs::remove_dir_all(server.data_dir()).unwrap();
    assert!(!server.data_dir().exists());

    // Three custodians, each on their own, decrypt their share with the stock `age` command
    // and check it against the manifest.
    let rec = w.join("recovery");
    std::fs::create_dir(&rec).unwrap();
    let chosen = [&cs[1], &cs[2], &cs[4]];
    let mut texts = Vec::new();
    for c in chosen {
        let txt = decrypt_share(&cer, c, &rec);
        let text = std::fs::read_to_string(&txt).unwrap();
        assert!(text.starts_with("kluis-escrow-share v1\n"), "{text}");
        let v = verify_share(&manifest, &txt);
        ok(&v, "verify-share");
        assert!(
            stdout(&v).contains(&format!("(custodian {}) is intact and belongs to this ceremony; 3 of 5 shares are needed", c.name)),
            "{}",
            stdout(&v)
        );
        texts.push(txt);
    }

    // Combine three decrypted texts into recovery.key.
    let key = rec.join("recovery.key");
    let o = combine(&manifest, &[], &key, &[&texts[0], &texts[1], &texts[2]]);
    ok(&o, "escrow combine");
    assert!(
        stdout(&o)
            .contains(&format!("rebuilt the recovery identity from 3 shares; its recipient {recovery_recipient} matches the manifest")),
        "{}",
        stdout(&o)
    );
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600, "recovery.key must be private");
    assert_eq!(recipient_of(&key), recovery_recipient);
    // combine never writes over an existing file.
    let again = combine(&manifest, &[], &key, &[&texts[0], &texts[1], &texts[2]]);
    refused(&again, 1, &["already exists; the recovery identity is never written over an existing file"]);

    // Every backup, three independent ways, with no server, no disk and no HSM.
    for (path, data) in &backups {
        let name = path.file_stem().unwrap().to_str().unwrap();
        let restored = rec.join(format!("{name}.hook.out"));
        let o = run("backup-hook", &["unseal", "--recovery-identity", s(&key), "-i", s(path), "-o", s(&restored)], b"");
        ok(&o, "backup-hook unseal --recovery-identity");
        assert!(std::fs::read(&restored).unwrap() == *data, "{name}: backup-hook output differs");

        let restored = rec.join(format!("{name}.age.out"));
        let o = stock("age", &["-d", "-i", s(&key), "-o", s(&restored), s(path)]);
        ok(&o, "age -d -i recovery.key -o");
        // The stock age 1.1 opens its -o file on the first write: an empty backup leaves no
        // file at all (the doc says so).
        let got = match std::fs::read(&restored) {
            Err(e) if data.is_empty() && e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            r => r.unwrap(),
        };
        assert!(got == *data, "{name}: age -o output differs");
        let o = stock("age", &["-d", "-i", s(&key), s(path)]);
        ok(&o, "age -d -i recovery.key");
        assert!(o.stdout == *data, "{name}: age output differs");

        let sealed = std::fs::read(path).unwrap();
        assert!(age_crate_decrypt(&key, &sealed).unwrap() == *data, "{name}: age crate output differs");
    }

    // The loop of docs/disaster-recovery.md, verbatim, in a shell with the binaries on PATH.
    let loop_dir = w.join("restore-loop");
    std::fs::create_dir(&loop_dir).unwrap();
    for (path, _) in &backups {
        std::fs::copy(path, loop_dir.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::copy(&key, loop_dir.join("recovery.key")).unwrap();
    let bin_dir = bin("backup-hook").parent().unwrap().to_owned();
    let path_env = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let o = Command::new("sh")
        .arg("-c")
        .arg(r#"for f in *.age; do backup-hook unseal --recovery-identity recovery.key -i "$f" -o "${f%.age}.restored" || echo "FAILED: $f"; done"#)
        .current_dir(&loop_dir)
        .env("PATH", path_env)
        .output()
        .unwrap();
    ok(&o, "the restore loop");
    assert!(!stdout(&o).contains("FAILED"), "{}{}", stdout(&o), stderr(&o));
    for (path, data) in &backups {
        let restored = loop_dir.join(format!("{}.restored", path.file_stem().unwrap().to_str().unwrap()));
        assert!(std::fs::read(&restored).unwrap() == *data, "{}: loop output differs", restored.display());
    }

    // The recovery key opens nothing it should not: a file encrypted to someone else fails.
    let other = age::x25519::Identity::generate();
    let foreign = age::encrypt(&other.to_public(), b"not yours").unwrap();
    let fpath = rec.join("foreign.age");
    std::fs::write(&fpath, foreign).unwrap();
    let o = run("backup-hook", &["unseal", "--recovery-identity", s(&key), "-i", s(&fpath)], b"");
    assert!(!o.status.success());
    assert!(o.stdout.is_empty());
}

// ---------------------------------------------------------------------------------------
// 2. every subset
// ---------------------------------------------------------------------------------------

fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
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

/// All 10 three-of-five subsets rebuild the manifest's recovery key (and it opens a file
/// sealed to it); all 10 two-share subsets are refused with "not enough shares".
#[test]
fn every_three_of_five_subset_combines_and_every_pair_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let cs = custodians(w, &["c1", "c2", "c3", "c4", "c5"]);
    let cer = w.join("ceremony");
    let (manifest, mjson) = ceremony(&cer, 3, &cs);
    let recipient = mjson["recovery_recipient"].as_str().unwrap().to_owned();
    let texts = decrypt_all_with_crate(&cer, &cs, w);

    // A file encrypted to the recovery recipient, as a sealed backup's X25519 stanza is.
    let secret = sample(5, 70_000);
    let to_recovery = age::x25519::Recipient::from_str(&recipient).unwrap();
    let encrypted = age::encrypt(&to_recovery, &secret).unwrap();

    let triples = subsets(5, 3);
    assert_eq!(triples.len(), 10);
    for (n, t) in triples.iter().enumerate() {
        let key = w.join(format!("recovery-3-{n}.key"));
        let o = if n == 0 {
            // Mixed: two decrypted texts and one encrypted file opened with --identity.
            let enc = cer.join(format!("share-{}.age", cs[t[2]].name));
            combine(&manifest, &[&cs[t[2]].key], &key, &[&texts[t[0]], &texts[t[1]], &enc])
        } else {
            let shares: Vec<&Path> = t.iter().map(|&i| texts[i].as_path()).collect();
            combine(&manifest, &[], &key, &shares)
        };
        ok(&o, &format!("combine {t:?}"));
        assert_eq!(recipient_of(&key), recipient, "subset {t:?}");
        assert!(age_crate_decrypt(&key, &encrypted).unwrap() == secret, "subset {t:?}");
    }

    let pairs = subsets(5, 2);
    assert_eq!(pairs.len(), 10);
    for (n, p) in pairs.iter().enumerate() {
        let key = w.join(format!("recovery-2-{n}.key"));
        // Half the pairs as decrypted texts, half as still-encrypted files opened with --identity.
        let o = if n % 2 == 0 {
            combine(&manifest, &[], &key, &[&texts[p[0]], &texts[p[1]]])
        } else {
            let files: Vec<PathBuf> = p.iter().map(|&i| cer.join(format!("share-{}.age", cs[i].name))).collect();
            combine(&manifest, &[&cs[p[0]].key, &cs[p[1]].key], &key, &[&files[0], &files[1]])
        };
        refused(&o, 1, &["kmsctl: error: not enough shares: 2 valid, 3 needed to rebuild the recovery key; find more custodians"]);
        assert!(!key.exists(), "no recovery key may be written for {p:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 3. bad shares
// ---------------------------------------------------------------------------------------

/// Damaged, duplicated, foreign and index-0 shares are each refused with their own message,
/// naming the share file (and the custodian where known) before anything is combined; no
/// recovery key is ever written on failure.
#[test]
fn bad_shares_are_named_and_refused_before_combining() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let cs = custodians(w, &["alice", "bob", "carol", "dave", "erin"]);
    let cer = w.join("ceremony");
    let (manifest, mjson) = ceremony(&cer, 3, &cs);
    let ceremony_id = mjson["ceremony_id"].as_str().unwrap().to_owned();
    let texts = decrypt_all_with_crate(&cer, &cs, w);
    let key = w.join("recovery.key");
    let mut messages: Vec<(&str, String)> = Vec::new();

    // (a) One flipped byte in bob's share value (not the index byte).
    let bob = std::fs::read_to_string(&texts[1]).unwrap();
    let bad = w.join("bad-bob.txt");
    std::fs::write(&bad, edit_share_text(&bob, |b| b[7] ^= 0x01)).unwrap();
    let needle = "share 2 of custodian \"bob\" is damaged or altered: it does not match the commitment in the manifest";
    let e = refused(&verify_share(&manifest, &bad), 1, &[needle, "bad-bob.txt"]);
    assert!(!e.contains(&bob.lines().find(|l| l.starts_with("share: ")).unwrap()[7..]), "secret in message: {e}");
    // In combine the good shares come first: bob's is still named, and nothing is written.
    let o = combine(&manifest, &[], &key, &[&texts[0], &texts[2], &bad]);
    let e = refused(&o, 1, &[needle, "bad-bob.txt"]);
    assert!(stdout(&o).contains("share 1 (custodian alice) is intact"), "{}", stdout(&o));
    assert!(!key.exists());
    messages.push(("flipped share byte", e));

    // (a') One flipped byte in the payload of bob's encrypted share file.
    let mut enc = std::fs::read(cer.join("share-bob.age")).unwrap();
    let n = enc.len();
    enc[n - 5] ^= 0x01;
    let bad_enc = w.join("share-bob-damaged.age");
    std::fs::write(&bad_enc, enc).unwrap();
    let o = kmsctl_offline(&["escrow", "verify-share", "--manifest", s(&manifest), "--identity", s(&cs[1].key), s(&bad_enc)]);
    refused(&o, 1, &["share-bob-damaged.age", "could not decrypt the share file; it is damaged or truncated"]);
    let o = combine(&manifest, &[&cs[1].key], &key, &[&texts[0], &texts[2], &bad_enc]);
    let e = refused(&o, 1, &["share-bob-damaged.age", "could not decrypt the share file; it is damaged or truncated"]);
    assert!(!key.exists());
    messages.push(("damaged share file", e));

    // (b) The same share twice (also under another file name): refused, even with a third share.
    let copy = w.join("copy-of-alice.txt");
    std::fs::copy(&texts[0], &copy).unwrap();
    let dup = "the share of custodian \"alice\" (index 1) was given twice; give each share once";
    let e = refused(&combine(&manifest, &[], &key, &[&texts[0], &texts[1], &copy]), 1, &[dup, "copy-of-alice.txt"]);
    assert!(!key.exists());
    refused(&combine(&manifest, &[], &key, &[&texts[0], &texts[0], &texts[1]]), 1, &[dup]);
    assert!(!key.exists());
    messages.push(("duplicate", e));

    // (c) A share of another ceremony (same custodians and keys, new ceremony).
    let cer2 = w.join("ceremony-2");
    let (_, m2) = ceremony(&cer2, 3, &cs);
    let other_id = m2["ceremony_id"].as_str().unwrap().to_owned();
    let other_dir = w.join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let foreign = decrypt_share(&cer2, &cs[3], &other_dir);
    let fneedle = format!(
        "this share (custodian \"dave\") belongs to ceremony {other_id}, not to ceremony {ceremony_id} of this manifest: wrong manifest, or a share of a ceremony that was replaced by a re-share"
    );
    refused(&verify_share(&manifest, &foreign), 1, &[&fneedle]);
    let e = refused(&combine(&manifest, &[], &key, &[&texts[0], &texts[1], &foreign]), 1, &[&fneedle]);
    assert!(!key.exists());
    messages.push(("foreign ceremony", e));
    // The encrypted foreign file with its owner's identity: the same refusal.
    let o = combine(&manifest, &[&cs[3].key], &key, &[&texts[0], &texts[1], &cer2.join("share-dave.age")]);
    refused(&o, 1, &[&fneedle]);

    // (d) A share edited to index 0: the index line alone, and the line plus the share byte.
    let carol = std::fs::read_to_string(&texts[2]).unwrap();
    let zero_line = w.join("carol-index0.txt");
    std::fs::write(&zero_line, carol.replace("\nindex: 3\n", "\nindex: 0\n")).unwrap();
    let zero_both = w.join("carol-index0-both.txt");
    std::fs::write(&zero_both, edit_share_text(&carol.replace("\nindex: 3\n", "\nindex: 0\n"), |b| b[0] = 0)).unwrap();
    let zneedle = "the share has index 0, which no valid share has; it was altered";
    for z in [&zero_line, &zero_both] {
        refused(&verify_share(&manifest, z), 1, &[zneedle]);
        let e = refused(&combine(&manifest, &[], &key, &[&texts[0], &texts[1], z]), 1, &[zneedle]);
        assert!(!key.exists());
        if z == &zero_line {
            messages.push(("index 0", e));
        }
    }

    // (e) An encrypted share with somebody else's identity.
    let o = combine(&manifest, &[&cs[0].key], &key, &[&texts[0], &texts[1], &cer.join("share-carol.age")]);
    let e = refused(&o, 1, &["none of the given identities can open this share file"]);
    assert!(!key.exists());
    messages.push(("wrong identity", e));

    // (f) A still-encrypted share without --identity.
    let o = verify_share(&manifest, &cer.join("share-carol.age"));
    let e = refused(&o, 1, &["share file is still age-encrypted; decrypt it with `age -d -i YOUR_KEY` or pass --identity"]);
    messages.push(("still encrypted", e));

    // (g) Not a share at all, and a truncated copy of one.
    let not_share = w.join("notes.txt");
    std::fs::write(&not_share, "shopping list\n").unwrap();
    let e = refused(
        &verify_share(&manifest, &not_share),
        1,
        &["this is not a Kluis escrow share (it does not start with \"kluis-escrow-share v1\")"],
    );
    messages.push(("not a share", e));
    let cut = w.join("share-dave-cut.txt");
    let dave = std::fs::read_to_string(&texts[3]).unwrap();
    std::fs::write(&cut, dave.lines().take(5).collect::<Vec<_>>().join("\n")).unwrap();
    let e = refused(&verify_share(&manifest, &cut), 1, &["the share has no \"shares\" line; it is incomplete or was edited"]);
    messages.push(("truncated", e));

    // Every case has its own message.
    for (i, (a, ma)) in messages.iter().enumerate() {
        assert_eq!(ma.lines().count(), 1, "{a}: one line expected: {ma}");
        for (b, mb) in &messages[i + 1..] {
            assert_ne!(ma, mb, "{a} and {b} give the same message");
        }
    }
    // After all that, three good shares still combine.
    ok(&combine(&manifest, &[], &key, &[&texts[0], &texts[1], &texts[2]]), "combine after the refusals");
}

// ---------------------------------------------------------------------------------------
// 4. re-share
// ---------------------------------------------------------------------------------------

/// 3-of-5 re-shared to a new 2-of-3 set: same recovery recipient, old backups open with two
/// new shares, the leaving custodian's old share does not mix with the new set, and the new
/// manifest installs with the recipient unchanged.
#[test]
fn reshare_to_new_custodians_keeps_old_backups_recoverable() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let old = custodians(w, &["alice", "bob", "carol", "dave", "erin"]);
    let new = custodians(w, &["frank", "grace", "heidi"]);
    let cer = w.join("ceremony-2025");
    let (old_manifest, old_json) = ceremony(&cer, 3, &old);
    let old_id = old_json["ceremony_id"].as_str().unwrap().to_owned();
    let recipient = old_json["recovery_recipient"].as_str().unwrap().to_owned();

    let server = Server::start();
    ok(&install(&server, "officer", &old_manifest), "install the old ceremony");
    let data = sample(9, 100_000);
    let sealed_old = seal(&server, "sealer", "default", "before-reshare", &data);
    let old_backup = w.join("before-reshare.age");
    std::fs::write(&old_backup, &sealed_old).unwrap();

    // alice and bob bring decrypted share texts, carol her still-encrypted share file and
    // her key (--identity); erin leaves.
    let rs = w.join("reshare");
    std::fs::create_dir(&rs).unwrap();
    let alice_txt = decrypt_share(&cer, &old[0], &rs);
    let bob_txt = decrypt_share(&cer, &old[1], &rs);
    let carol_age = cer.join("share-carol.age");
    let cer2 = w.join("ceremony-2026");
    let extra = custodian_args(&new);
    let mut args = vec!["escrow", "reshare", "--manifest", s(&old_manifest), "--threshold", "2"];
    args.extend(extra.iter().map(String::as_str));
    args.extend(["--out", s(&cer2), "--identity", s(&old[2].key)]);
    args.extend([s(&alice_txt), s(&bob_txt), s(&carol_age)]);
    let o = kmsctl_offline(&args);
    ok(&o, "escrow reshare");
    assert!(
        stdout(&o).contains(&format!("This ceremony replaces ceremony {old_id}; the recovery recipient is unchanged")),
        "{}",
        stdout(&o)
    );

    let new_manifest = cer2.join("manifest.json");
    let new_json: serde_json::Value = serde_json::from_slice(&std::fs::read(&new_manifest).unwrap()).unwrap();
    let new_id = new_json["ceremony_id"].as_str().unwrap().to_owned();
    assert_eq!(new_json["replaces"], old_id.as_str());
    assert_ne!(new_id, old_id);
    assert_eq!(new_json["recovery_recipient"], recipient.as_str());
    assert_eq!(new_json["threshold"], 2);
    assert_eq!(new_json["shares"], 3);
    let names: Vec<&str> = new_json["custodians"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["frank", "grace", "heidi"]);

    // Two new custodians rebuild the key; the backup sealed before the re-share opens.
    let rec = w.join("recovery");
    std::fs::create_dir(&rec).unwrap();
    let grace = decrypt_share(&cer2, &new[1], &rec);
    let heidi = decrypt_share(&cer2, &new[2], &rec);
    let key = rec.join("recovery.key");
    ok(&combine(&new_manifest, &[], &key, &[&grace, &heidi]), "combine two new shares");
    assert_eq!(recipient_of(&key), recipient);
    let restored = rec.join("before-reshare.tar");
    ok(
        &run("backup-hook", &["unseal", "--recovery-identity", s(&key), "-i", s(&old_backup), "-o", s(&restored)], b""),
        "unseal an old backup with the re-shared key",
    );
    assert!(std::fs::read(&restored).unwrap() == data);

    // The leaving custodian's old share does not combine with a new share...
    let erin_old = decrypt_share(&cer, &old[4], &rec);
    let key2 = rec.join("erin.key");
    let o = combine(&new_manifest, &[], &key2, &[&erin_old, &grace]);
    refused(
        &o,
        1,
        &[&format!("this share (custodian \"erin\") belongs to ceremony {old_id}, not to ceremony {new_id}"), "replaced by a re-share"],
    );
    assert!(!key2.exists());
    // ...nor with the old manifest and a new share (the new share is foreign there)...
    let o = combine(&old_manifest, &[], &key2, &[&erin_old, &grace]);
    refused(&o, 1, &[&format!("this share (custodian \"grace\") belongs to ceremony {new_id}, not to ceremony {old_id}")]);
    assert!(!key2.exists());
    // ...and alone it is not enough.
    let o = combine(&old_manifest, &[], &key2, &[&erin_old]);
    refused(&o, 1, &["not enough shares: 1 valid, 3 needed to rebuild the recovery key"]);
    assert!(!key2.exists());

    // Installing the new manifest: new ceremony, same recovery recipient, new custodians.
    let before = status_json(&server, "officer");
    assert_eq!(before["ceremony_id"], old_id.as_str());
    ok(&install(&server, "officer", &new_manifest), "install the new ceremony");
    let after = status_json(&server, "auditor");
    assert_eq!(after["installed"], true);
    assert_eq!(after["ceremony_id"], new_id.as_str());
    assert_eq!(after["recovery_recipient"], recipient.as_str());
    assert_eq!(after["recovery_recipient"], before["recovery_recipient"]);
    assert_eq!(after["threshold"], 2);
    assert_eq!(after["shares"], 3);
    assert_eq!(after["custodians"], serde_json::json!(["frank", "grace", "heidi"]));
    // Backups sealed after the switch open with the new shares too.
    let data2 = sample(10, 1234);
    let sealed_new = seal(&server, "sealer", "default", "after-reshare", &data2);
    assert!(age_crate_decrypt(&key, &sealed_new).unwrap() == data2);

    // Documented limit: the secret is the same, so three OLD shares with the OLD manifest
    // still rebuild it. Old custodians must destroy their old share files.
    let old_texts: Vec<PathBuf> = old[2..].iter().map(|c| decrypt_share(&cer, c, &rec)).collect();
    let key3 = rec.join("old-set.key");
    ok(&combine(&old_manifest, &[], &key3, &[&old_texts[0], &old_texts[1], &old_texts[2]]), "old set");
    assert_eq!(recipient_of(&key3), recipient);
}

// ---------------------------------------------------------------------------------------
// 5. status and keys without escrow
// ---------------------------------------------------------------------------------------

/// Keys issued before any escrow install are counted in keys_without_escrow, and their
/// files are exactly those without a recovery stanza; after the install every seal carries
/// the stanza and the count stays.
#[test]
fn status_counts_exactly_the_keys_sealed_before_the_install() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let cs = custodians(w, &["a", "b", "c"]);
    let cer = w.join("ceremony");
    let (manifest, mjson) = ceremony(&cer, 2, &cs);
    let ceremony_id = mjson["ceremony_id"].as_str().unwrap().to_owned();
    let recipient = mjson["recovery_recipient"].as_str().unwrap().to_owned();

    let server = Server::start();
    let st = status_json(&server, "officer");
    assert_eq!(st["installed"], false);
    assert_eq!(st["keys_without_escrow"], 0);
    let officer = server.client("officer");
    let o = kmsctl(&officer, &["escrow", "status"]);
    ok(&o, "escrow status");
    assert!(stdout(&o).contains("no escrow manifest installed\nkeys without escrow: 0"), "{}", stdout(&o));

    let mut files: Vec<(Vec<u8>, Vec<u8>, bool)> = Vec::new(); // (sealed, data, sealed after install)
    for i in 0..3 {
        let data = sample(20 + i, 1000 + i as usize);
        files.push((seal(&server, "sealer", "default", &format!("pre-{i}"), &data), data, false));
    }
    let st = status_json(&server, "auditor");
    assert_eq!(st["keys_without_escrow"], 3, "{st}");

    let o = install(&server, "officer", &manifest);
    ok(&o, "escrow install");
    // The first install is approved by a second officer; the approval names it.
    assert!(
        stdout(&o).contains(&format!("install escrow ceremony {ceremony_id}: recovery recipient {recipient} (none in force)")),
        "{}",
        stdout(&o)
    );
    // The same manifest again (the recipient in force) is installed at once.
    let o = server.kmsctl("officer", &["escrow", "install", s(&manifest)]);
    ok(&o, "escrow install again");
    assert!(
        stdout(&o).contains(&format!("installed escrow ceremony {ceremony_id} (2 of 3); recovery recipient {recipient}")),
        "{}",
        stdout(&o)
    );
    let st = status_json(&server, "officer");
    assert_eq!(st["installed"], true);
    assert_eq!(st["ceremony_id"], ceremony_id.as_str());
    assert_eq!(st["recovery_recipient"], recipient.as_str());
    assert_eq!(st["threshold"], 2);
    assert_eq!(st["shares"], 3);
    assert_eq!(st["custodians"], serde_json::json!(["a", "b", "c"]));
    assert_eq!(st["keys_without_escrow"], 3, "installing does not change old files: {st}");

    for i in 0..4 {
        let data = sample(30 + i, 70_000 + i as usize);
        files.push((seal(&server, "sealer", "default", &format!("post-{i}"), &data), data, true));
    }
    let st = status_json(&server, "auditor");
    assert_eq!(st["keys_without_escrow"], 3, "seals after the install carry escrow: {st}");
    let o = kmsctl(&officer, &["escrow", "status"]);
    ok(&o, "escrow status");
    let text = stdout(&o);
    for want in [
        format!("ceremony:            {ceremony_id}"),
        format!("recovery recipient:  {recipient}"),
        "threshold:           2 of 3".to_owned(),
        "custodians:          a, b, c".to_owned(),
        "keys without escrow: 3".to_owned(),
    ] {
        assert!(text.contains(&want), "{want:?} missing in:\n{text}");
    }

    // The files without a recovery stanza are exactly the ones sealed before the install,
    // and the recovery key opens exactly the others.
    let texts = decrypt_all_with_crate(&cer, &cs, w);
    let key = w.join("recovery.key");
    ok(&combine(&manifest, &[], &key, &[&texts[0], &texts[2]]), "combine");
    let without = files.iter().filter(|(sealed, _, _)| !has_recovery_stanza(sealed)).count() as u64;
    assert_eq!(st["keys_without_escrow"], without);
    for (sealed, data, after) in &files {
        assert_eq!(has_recovery_stanza(sealed), *after, "{}", header(sealed));
        match age_crate_decrypt(&key, sealed) {
            Ok(d) => assert!(*after && d == *data, "a pre-install file opened with the recovery key"),
            Err(e) => assert!(!*after, "a post-install file did not open: {e}"),
        }
    }
    // backup-hook and the stock tool agree on a pre-install file: the recovery key cannot
    // open it, nothing is written.
    let pre = w.join("pre-0.age");
    std::fs::write(&pre, &files[0].0).unwrap();
    let restored = w.join("pre-0.tar");
    let o = run("backup-hook", &["unseal", "--recovery-identity", s(&key), "-i", s(&pre), "-o", s(&restored)], b"");
    refused(&o, 5, &["backup-hook: error: this backup has no escrow copy of its key (it was sealed before an escrow was installed); the file is not damaged"]);
    assert!(!restored.exists());
    let o = stock("age", &["-d", "-i", s(&key), "-o", s(&restored), s(&pre)]);
    assert!(!o.status.success(), "age opened a pre-install file");
    assert!(stderr(&o).contains("no identity matched any of the recipients"), "{}", stderr(&o));
    assert!(!restored.exists());
}

// ---------------------------------------------------------------------------------------
// 6. roles
// ---------------------------------------------------------------------------------------

/// Only an officer installs the escrow: a sealer, a restorer and an auditor are refused
/// with exit code 4 and a message naming them, and nothing changes.
#[test]
fn only_an_officer_installs_the_escrow() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let cs = custodians(w, &["a", "b"]);
    let (manifest, _) = ceremony(&w.join("ceremony"), 2, &cs);
    let server = Server::start();
    for who in ["sealer", "restorer", "auditor"] {
        let o = install(&server, who, &manifest);
        refused(&o, 4, &[&format!("principal \"{who}\" may not InstallEscrow")]);
        assert!(o.stdout.is_empty());
    }
    // A sealer may not read the status either.
    let sealer = server.client("sealer");
    let o = kmsctl(&sealer, &["escrow", "status", "--json"]);
    refused(&o, 4, &["principal \"sealer\" may not GetEscrowStatus"]);
    let st = status_json(&server, "auditor");
    assert_eq!(st["installed"], false, "{st}");
    ok(&install(&server, "officer", &manifest), "officer install");
    assert_eq!(status_json(&server, "auditor")["installed"], true);
}

#[test]
fn removing_the_escrow_needs_a_second_officer() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let cs = custodians(w, &["a", "b"]);
    let (manifest, m) = ceremony(&w.join("ceremony"), 2, &cs);
    let server = Server::start();
    ok(&install(&server, "officer", &manifest), "officer install");
    let before = seal(&server, "sealer", "default", "with-escrow", b"x");
    assert!(has_recovery_stanza(&before));
    refused(&server.kmsctl("auditor", &["escrow", "remove"]), 4, &["principal \"auditor\" may not RemoveEscrow"]);
    let o = server.kmsctl("officer", &["escrow", "remove"]);
    ok(&o, "escrow remove");
    // (Request 1 was the install.)
    assert!(stdout(&o).contains("kmsctl approve 2"), "{}", stdout(&o));
    // Pending: the recipient still goes out with new keys; the requester cannot approve.
    refused(&server.kmsctl("officer", &["approve", "2"]), 4, &["a second, different officer must approve it"]);
    assert!(has_recovery_stanza(&seal(&server, "sealer", "default", "still-escrowed", b"y")));
    ok(&server.kmsctl("dev", &["approve", "2"]), "second officer approves");
    let st = status_json(&server, "auditor");
    assert_eq!(st["installed"], false, "{st}");
    assert_eq!(st["previous_recipients"][0], m["recovery_recipient"], "{st}");
    assert!(!has_recovery_stanza(&seal(&server, "sealer", "default", "no-escrow", b"z")), "no recipient after removal");
    refused(&server.kmsctl("officer", &["escrow", "remove"]), 4, &["no escrow manifest is in force"]);
    // Backups sealed while it was in force still open with the recovery key.
    let texts = decrypt_all_with_crate(&w.join("ceremony"), &cs, w);
    let key = w.join("recovery.key");
    ok(&combine(&manifest, &[], &key, &[&texts[0], &texts[1]]), "combine");
    assert_eq!(age_crate_decrypt(&key, &before).unwrap(), b"x");
    ok(&install(&server, "officer", &manifest), "re-install after removal");
    assert_eq!(status_json(&server, "auditor")["installed"], true);
}

#[test]
fn forged_manifests_and_silent_recipient_switches_are_refused() {
    let server = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let cs = custodians(tmp.path(), &["ann", "bob", "cas"]);
    let (manifest, json) = ceremony(&tmp.path().join("first"), 2, &cs);

    // A manifest with fields missing or edited is refused before it reaches the server.
    let forged = tmp.path().join("forged.json");
    std::fs::write(&forged, r#"{"format":"nonsense","ceremony_id":"x","recovery_recipient":"age1x","threshold":2,"shares":2,"custodians":[]}"#).unwrap();
    let o = install(&server, "officer", &forged);
    refused(&o, 1, &["kmsctl: error:", "forged.json"]);
    let mut edited = json.clone();
    edited["custodians"][0]["commitment"] = serde_json::Value::String("00".repeat(31));
    std::fs::write(&forged, serde_json::to_string(&edited).unwrap()).unwrap();
    refused(&install(&server, "officer", &forged), 1, &["kmsctl: error:"]);
    assert_eq!(status_json(&server, "officer")["installed"], false);

    // The ceremony directory works as well as the manifest path.
    ok(&install(&server, "officer", manifest.parent().unwrap()), "install from the ceremony directory");

    // An unrelated ceremony (another recipient) is not installed silently over it.
    let (other, other_json) = ceremony(&tmp.path().join("second"), 2, &cs);
    let o = install(&server, "officer", &other);
    refused(&o, 4, &["differs from the one in force", "--new-recipient"]);
    assert_eq!(status_json(&server, "officer")["recovery_recipient"], json["recovery_recipient"]);
    let cfg = server.client("officer");
    let o = approve_if_pending(&server, "officer", kmsctl(&cfg, &["escrow", "install", "--new-recipient", s(&other)]));
    ok(&o, "install --new-recipient, approved by a second officer");
    let st = status_json(&server, "officer");
    assert_eq!(st["recovery_recipient"], other_json["recovery_recipient"]);
    assert_eq!(st["previous_recipients"], serde_json::json!([json["recovery_recipient"]]));
}

/// The issue's finding: one officer swapped the recovery recipient, and every later
/// backup opened only with the new key (a ransom path). Installing a recipient other
/// than the one in force, and the first one, is now a request a second officer approves;
/// the same recipient again is installed at once.
#[test]
fn a_new_recovery_recipient_needs_a_second_officer() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let cs = custodians(w, &["a", "b"]);
    let (first, fj) = ceremony(&w.join("first"), 2, &cs);
    let (second, sj) = ceremony(&w.join("second"), 2, &cs);
    let (r1, r2) = (fj["recovery_recipient"].as_str().unwrap(), sj["recovery_recipient"].as_str().unwrap());
    let (c1, c2) = (fj["ceremony_id"].as_str().unwrap(), sj["ceremony_id"].as_str().unwrap());
    let server = Server::start();
    let again = server.another_certificate("officer");
    let approvals = || -> serde_json::Value {
        let o = server.kmsctl("auditor", &["approvals", "--json"]);
        ok(&o, "approvals --json");
        serde_json::from_slice(&o.stdout).unwrap()
    };

    // The first install: pending, nothing goes out until a second officer approves.
    let o = server.kmsctl("officer", &["escrow", "install", s(&first)]);
    ok(&o, "first install request");
    assert!(stdout(&o).contains("until then the recovery recipient in force stays"), "{}", stdout(&o));
    let id = approval_id(&o);
    let nothing_yet = || {
        assert_eq!(status_json(&server, "auditor")["installed"], false);
        assert!(!has_recovery_stanza(&seal(&server, "sealer", "default", "pending", b"x")));
    };
    nothing_yet();
    refused(&server.kmsctl("officer", &["approve", &id]), 4, &["a second, different officer must approve it"]);
    refused(&kmsctl(&again, &["approve", &id]), 4, &["a second, different officer must approve it"]);
    nothing_yet();
    let listed = approvals();
    assert_eq!(listed[0]["state"], "pending", "{listed}");
    assert_eq!(listed[0]["action"], format!("install escrow ceremony {c1}: recovery recipient {r1} (none in force)"), "{listed}");
    ok(&server.kmsctl("dev", &["approve", &id]), "second officer approves the first install");
    assert_eq!(status_json(&server, "auditor")["recovery_recipient"], r1);
    assert!(has_recovery_stanza(&seal(&server, "sealer", "default", "escrowed", b"y")));

    // A switch: without --new-recipient refused outright; with it, pending.
    refused(&server.kmsctl("officer", &["escrow", "install", s(&second)]), 4, &["differs from the one in force"]);
    let o = server.kmsctl("officer", &["escrow", "install", "--new-recipient", s(&second)]);
    ok(&o, "switch request");
    let id = approval_id(&o);
    refused(&server.kmsctl("officer", &["approve", &id]), 4, &["a second, different officer must approve it"]);
    refused(&kmsctl(&again, &["approve", &id]), 4, &["a second, different officer must approve it"]);
    let st = status_json(&server, "auditor");
    assert_eq!((st["recovery_recipient"].as_str(), st["ceremony_id"].as_str()), (Some(r1), Some(c1)), "unchanged while pending: {st}");
    let want = format!("install escrow ceremony {c2}: recovery recipient {r2} replaces {r1}");
    assert!(approvals()[1]["action"].as_str().unwrap().starts_with(&want), "{}", approvals());
    ok(&server.kmsctl("dev", &["approve", &id]), "second officer approves the switch");
    let st = status_json(&server, "auditor");
    assert_eq!(st["recovery_recipient"], r2);
    assert_eq!(st["previous_recipients"], serde_json::json!([r1]));

    // Re-installing the manifest in force is immediate (no new recipient).
    let o = server.kmsctl("officer", &["escrow", "install", s(&second)]);
    ok(&o, "same recipient again");
    assert!(stdout(&o).contains("installed escrow ceremony"), "{}", stdout(&o));

    // An approval made against a recipient that changed since is not carried out.
    let stale = approval_id(&server.kmsctl("officer", &["escrow", "install", "--new-recipient", s(&first)]));
    let newer = approval_id(&server.kmsctl("dev", &["escrow", "install", "--new-recipient", s(&first)]));
    ok(&server.kmsctl("officer", &["approve", &newer]), "the other officer approves the newer request");
    refused(&server.kmsctl("dev", &["approve", &stale]), 4, &["no longer applies", "recovery recipient in force changed"]);

    let o = server.kmsctl("auditor", &["audit", "export"]);
    let audit = stdout(&o);
    assert!(audit.lines().any(|l| l.contains("\"action\":\"InstallEscrow\"") && l.contains("pending approval 1: install escrow ceremony")));
    assert!(audit.lines().any(|l| l.contains("\"action\":\"Approve\"") && l.contains("approved and carried out request 2 of officer: install escrow")));
}

/// The 32-byte secret the registry holds for `key_id` (hex), read from a copy of the
/// store file (the server holds the file's lock; nothing is written meanwhile).
fn registry_secret(server: &Server, key_id: &str, scratch: &Path) -> Option<[u8; 32]> {
    use redb::ReadableDatabase;
    let copy = scratch.join("store-copy.redb");
    std::fs::copy(server.data_dir().join("data/kluis.redb"), &copy).unwrap();
    let db = redb::Database::open(&copy).unwrap();
    let secrets: redb::TableDefinition<[u8; 16], [u8; 32]> = redb::TableDefinition::new("key_secrets");
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(secrets).unwrap();
    let id: [u8; 16] = hex::decode(key_id).unwrap().try_into().unwrap();
    let found = t.get(id).unwrap().map(|v| v.value());
    drop((t, txn, db));
    std::fs::remove_file(&copy).unwrap();
    found
}

fn file_contains(path: &Path, needle: &[u8]) -> bool {
    std::fs::read(path).unwrap().windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_destroyed_key_is_gone_from_the_server_and_its_store_file_while_the_escrow_shares_still_open_the_backup() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let keys = w.join("custodian-keys");
    std::fs::create_dir(&keys).unwrap();
    let cs = custodians(&keys, &["alice", "bob", "carol"]);
    let cer = w.join("ceremony");
    let (manifest, _) = ceremony(&cer, 2, &cs);

    // A server on a test clock that scrubs the store whenever something was destroyed.
    let mut server = Server::start();
    let clock = server.dir.path().join("clock");
    let t0 = time::OffsetDateTime::now_utc().unix_timestamp();
    std::fs::write(&clock, t0.to_string()).unwrap();
    server.env.push(("KLUIS_TEST_CLOCK_FILE".into(), clock.to_str().unwrap().into()));
    server.set_top_level("maintenance_interval_secs = 1\nscrub_interval_secs = 0\n");
    server.restart();
    ok(&install(&server, "officer", &manifest), "escrow install");
    ok(&server.kmsctl("officer", &["keyring", "create", "short", "--retention-days", "1"]), "keyring create");
    let data = sample(41, 100_000);
    let sealed = seal(&server, "dev", "short", "short/ehr-full", &data);
    assert!(has_recovery_stanza(&sealed));
    assert_eq!(unseal(&server, "dev", &sealed).stdout, data);
    let key_id = header(&sealed).lines().find(|l| l.starts_with("-> kluis ")).unwrap().split_whitespace().nth(3).unwrap().to_owned();
    let store_file = server.data_dir().join("data/kluis.redb");
    let secret = registry_secret(&server, &key_id, w).expect("a format 2 key has a secret in the registry");
    assert!(file_contains(&store_file, &secret), "the secret is in the live store file while the key lives");

    // Past its retention: the start-up sweep destroys the key; the scheduled run after it
    // (every second here) scrubs the store.
    std::fs::write(&clock, (t0 + 2 * 86_400).to_string()).unwrap();
    server.restart();
    let shown = stdout(&server.kmsctl("auditor", &["key", "show", &key_id]));
    assert!(shown.contains("state:      destroyed on"), "{shown}");
    refused(&unseal(&server, "dev", &sealed), 4, &["was destroyed on"]);
    assert_eq!(registry_secret(&server, &key_id, w), None, "the registry no longer holds the secret");
    // Waits for the scrub's effect itself, the bytes leaving the file (at most a minute).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while file_contains(&store_file, &secret) {
        assert!(std::time::Instant::now() < deadline, "the secret is still in the live store file after a minute");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!server.data_dir().join("data/kluis.redb.scrub").exists());

    // The custodians' escrow still opens the backup, with no server.
    let texts_dir = w.join("texts");
    std::fs::create_dir(&texts_dir).unwrap();
    let texts = decrypt_all_with_crate(&cer, &cs, &texts_dir);
    let key = w.join("recovery.key");
    ok(&combine(&manifest, &[], &key, &[&texts[0], &texts[2]]), "escrow combine");
    assert_eq!(age_crate_decrypt(&key, &sealed).unwrap(), data);
}
