//! The escrow bundle of KMIP objects, end to end (docs/kmip-escrow.md): PyKMIP (the real
//! client) against the real `kms-server` with `--kmip-escrow-dir`, the custodians'
//! `kmsctl escrow` commands and the stock `age`/`age-keygen` commands, then `kmsctl kmip
//! import` into a new server. The disaster is played whole: the first server and its store
//! are deleted before the second one starts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kluis_tests::*;
use serde_json::{Value, json};

/// Runs a stock system command (`age`, `age-keygen`).
fn stock(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("`{cmd}` could not be run ({e}); install it with `apt-get install age`"))
}

/// A server with KMIP and, if given, the escrow bundle in `escrow`.
fn server(escrow: Option<&Path>) -> Server {
    match escrow {
        Some(d) => Server::start_with_args(&["--kmip-listen", "127.0.0.1:0", "--kmip-escrow-dir", s(d)]),
        None => Server::start_with_args(&["--kmip-listen", "127.0.0.1:0"]),
    }
}

/// The escrow ceremony of two custodians out of three (their own keys made by the stock
/// `age-keygen`), in `dir`; returns the manifest and the custodians' key files.
fn ceremony(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let mut args = vec!["escrow".to_owned(), "ceremony".into(), "--threshold".into(), "2".into()];
    let mut keys = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let key = dir.join(format!("{name}.key"));
        ok(&stock("age-keygen", &["-o", s(&key)]), "age-keygen -o");
        let recipient = stdout(&stock("age-keygen", &["-y", s(&key)])).trim().to_owned();
        args.extend(["--custodian".into(), format!("{name}={recipient}")]);
        keys.push(key);
    }
    let out = dir.join("ceremony");
    args.extend(["--out".into(), s(&out).to_owned()]);
    ok(&kmsctl_offline(&args.iter().map(String::as_str).collect::<Vec<_>>()), "escrow ceremony");
    (out.join("manifest.json"), keys)
}

/// Installs the manifest as `officer`; the first recipient needs a second officer (`dev`).
fn install(server: &Server, manifest: &Path) {
    let o = server.kmsctl("officer", &["escrow", "install", s(manifest)]);
    ok(&o, "escrow install");
    if stdout(&o).contains("kmsctl approve ") {
        ok(&server.kmsctl("dev", &["approve", &approval_id(&o)]), "approve the escrow install");
    }
}

/// Two custodians (alice, carol) decrypt their shares with the stock `age` and combine
/// them: the recovery identity, in a new file.
fn rebuild(dir: &Path, manifest: &Path, keys: &[PathBuf]) -> PathBuf {
    let ceremony = manifest.parent().unwrap();
    let mut texts = Vec::new();
    for (name, key) in [("alice", &keys[0]), ("carol", &keys[2])] {
        let txt = dir.join(format!("share-{name}.txt"));
        let o = stock("age", &["-d", "-i", s(key), "-o", s(&txt), s(&ceremony.join(format!("share-{name}.age")))]);
        ok(&o, "age -d of a share");
        texts.push(txt);
    }
    let identity = dir.join("recovery.key");
    ok(&kmsctl_offline(&["escrow", "combine", "--manifest", s(manifest), "-o", s(&identity), s(&texts[0]), s(&texts[1])]), "escrow combine");
    identity
}

/// One PyKMIP step's result, which must be a success.
fn good(v: &Value) -> &Value {
    assert!(v.get("error").is_none() && v.get("status").is_none_or(|s| s == "SUCCESS"), "step failed: {v}");
    v
}

/// A bundle file decrypted with the stock `age` command, as a custodian would.
fn stock_decrypt(identity: &Path, file: &Path) -> Value {
    let o = stock("age", &["-d", "-i", s(identity), s(file)]);
    ok(&o, &format!("age -d {}", file.display()));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn import(server: &Server, identity: &Path, dir: &Path) -> Output {
    server.kmsctl("officer", &["kmip", "import", "--recovery-identity", s(identity), s(dir)])
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn disaster_custodians_rebuild_the_key_and_a_new_server_gives_the_appliances_their_keys_back() {
    let site = tempfile::tempdir().unwrap();
    // Beside the backups: outside the server's own directory, which the disaster takes.
    let bundle = site.path().join("kmip-escrow");
    let (manifest, custodian_keys) = ceremony(site.path());
    let s1 = server(Some(&bundle));
    install(&s1, &manifest);

    // The appliances make their keys: a vSphere KEK (activated), a tape library's key,
    // and one that is revoked and destroyed.
    let made = kmip::run(
        &s1,
        "dev",
        json!([
            {"op": "create", "algorithm": "AES", "length": 256, "name": "vsphere-kek-1"},
            {"op": "create", "algorithm": "AES", "length": 256, "app_info": ["LIBRARY-LTO", "0123456789ABCDEF"]},
            {"op": "create", "algorithm": "AES", "length": 128, "name": "retired-key"},
        ]),
    );
    let uids: Vec<String> = made.iter().map(|r| good(r)["uid"].as_str().unwrap().to_owned()).collect();
    let (kek, lto, gone) = (&uids[0], &uids[1], &uids[2]);
    let r = kmip::run(
        &s1,
        "dev",
        json!([
            {"op": "activate", "uid": kek},
            {"op": "revoke", "reason": "CESSATION_OF_OPERATION", "uid": gone},
            {"op": "destroy", "uid": gone},
            {"op": "get", "uid": kek},
            {"op": "get", "uid": lto},
        ]),
    );
    r.iter().for_each(|v| {
        good(v);
    });
    let (kek_bytes, lto_bytes) = (r[3]["key"].as_str().unwrap().to_owned(), r[4]["key"].as_str().unwrap().to_owned());
    assert_eq!(kek_bytes.len(), 64, "{}", r[3]);
    // Two files per object, nothing else (no temporary file left), none of them readable
    // by others.
    let mut want: Vec<String> = uids.iter().flat_map(|u| [format!("{u}.key.age"), format!("{u}.state.age")]).collect();
    want.sort();
    assert_eq!(files(&bundle), want);
    for f in &want {
        assert_eq!(mode(&bundle.join(f)), 0o600, "{f}");
        let bytes = std::fs::read(bundle.join(f)).unwrap();
        assert!(bytes.starts_with(b"age-encryption.org/v1\n"), "{f} is not an age file");
        assert!(!hex::encode(&bytes).contains(&kek_bytes), "{f} holds the key in clear");
    }

    // The disaster: the server, its store and its master key are gone.
    drop(s1);

    // The custodians rebuild the recovery key; any of them reads the bundle with the
    // stock `age`: the same key bytes PyKMIP got, the state as the appliance left it.
    let recovery = rebuild(site.path(), &manifest, &custodian_keys);
    let k = stock_decrypt(&recovery, &bundle.join(format!("{kek}.key.age")));
    assert_eq!(k["format"], "kluis-kmip-escrow-key/v1");
    assert_eq!(k["uid"], kek.as_str());
    assert_eq!(k["material_hex"], kek_bytes.as_str());
    assert_eq!((k["keyring"].as_str(), k["algorithm"].as_u64(), k["length"].as_u64()), (Some("default"), Some(3), Some(256)), "{k}");
    let st = stock_decrypt(&recovery, &bundle.join(format!("{kek}.state.age")));
    assert_eq!((st["format"].as_str(), st["state_name"].as_str()), (Some("kluis-kmip-escrow-state/v1"), Some("Active")), "{st}");
    assert_eq!(st["names"], json!(["vsphere-kek-1"]));
    assert!(st["activation_date"].as_str().is_some_and(|d| d.ends_with('Z')), "{st}");
    let st = stock_decrypt(&recovery, &bundle.join(format!("{lto}.state.age")));
    assert_eq!(st["app_info"], json!([{"namespace": "LIBRARY-LTO", "data": "0123456789ABCDEF"}]));
    assert_eq!(st["state_name"], "Pre-Active");
    let st = stock_decrypt(&recovery, &bundle.join(format!("{gone}.state.age")));
    assert_eq!(st["state_name"], "Deactivated");
    assert!(st["destroyed"].is_string(), "a Destroy is in the bundle at once: {st}");

    // A new server, its own bundle directory, the same escrow manifest installed.
    let bundle2 = site.path().join("kmip-escrow-new");
    let s2 = server(Some(&bundle2));
    install(&s2, &manifest);
    let o = import(&s2, &recovery, &bundle);
    ok(&o, "kmip import");
    let out = stdout(&o);
    assert!(out.contains(&format!("{kek} imported: Active in keyring default")), "{out}");
    assert!(out.contains(&format!("{lto} imported: Pre-Active in keyring default")), "{out}");
    assert!(out.contains(&format!("{gone} skipped: destroyed on ")), "{out}");
    assert!(out.contains("2 imported, 0 already present, 1 skipped, 0 failed"), "{out}");

    // The appliances find their keys: the same bytes by the same identifiers, by name
    // and by their tape information; the state as before.
    let r = kmip::run(
        &s2,
        "dev",
        json!([
            {"op": "get", "uid": kek},
            {"op": "get", "uid": lto},
            {"op": "locate", "name": "vsphere-kek-1"},
            {"op": "locate", "app_info": ["LIBRARY-LTO", "0123456789ABCDEF"]},
            {"op": "get_attributes", "uid": kek, "names": ["State"]},
            {"op": "get", "uid": gone},
        ]),
    );
    assert_eq!(good(&r[0])["key"], kek_bytes.as_str());
    assert_eq!(good(&r[1])["key"], lto_bytes.as_str());
    assert_eq!(good(&r[2])["uids"], json!([kek]));
    assert_eq!(good(&r[3])["uids"], json!([lto]));
    assert_eq!(good(&r[4])["attributes"]["State"], json!(["ACTIVE"]), "{}", r[4]);
    assert_eq!(r[5]["reason"], "ITEM_NOT_FOUND", "the destroyed key stays destroyed: {}", r[5]);

    // The import is audited, per object, as the officer's.
    let audit = stdout(&s2.kmsctl("auditor", &["audit", "export"]));
    let lines: Vec<&str> = audit.lines().filter(|l| l.contains("\"KmipImport\"")).collect();
    assert_eq!(lines.len(), 2, "{audit}");
    assert!(lines.iter().all(|l| l.contains("\"officer\"")), "{lines:?}");

    // The new server escrows what it imported, to the recipient in force.
    let k2 = stock_decrypt(&recovery, &bundle2.join(format!("{kek}.key.age")));
    assert_eq!(k2["material_hex"], kek_bytes.as_str());
    assert_eq!(stock_decrypt(&recovery, &bundle2.join(format!("{kek}.state.age")))["state_name"], "Active");

    // Run again: every object is there already, nothing changes.
    let o = import(&s2, &recovery, &bundle);
    ok(&o, "kmip import again");
    let out = stdout(&o);
    assert!(out.contains(&format!("{kek} already exists on this server: left as it is")), "{out}");
    assert!(out.contains("0 imported, 2 already present, 1 skipped, 0 failed"), "{out}");
    let r = kmip::run(&s2, "dev", json!([{"op": "get", "uid": kek}, {"op": "locate", "name": "vsphere-kek-1"}]));
    assert_eq!(good(&r[0])["key"], kek_bytes.as_str());
    assert_eq!(good(&r[1])["uids"], json!([kek]));
}

#[test]
fn import_refuses_a_wrong_identity_and_names_an_altered_file() {
    let site = tempfile::tempdir().unwrap();
    let bundle = site.path().join("kmip-escrow");
    let (manifest, custodian_keys) = ceremony(site.path());
    let s1 = server(Some(&bundle));
    install(&s1, &manifest);
    let made = kmip::run(
        &s1,
        "dev",
        json!([
            {"op": "create", "algorithm": "AES", "length": 256, "name": "first"},
            {"op": "create", "algorithm": "AES", "length": 256, "name": "second"},
        ]),
    );
    let uids: Vec<String> = made.iter().map(|r| good(r)["uid"].as_str().unwrap().to_owned()).collect();
    drop(s1);
    let recovery = rebuild(site.path(), &manifest, &custodian_keys);
    let s2 = server(None);

    // Another identity (the custodians of another ceremony): refused before anything is
    // sent, saying so; nothing is imported.
    let stranger = site.path().join("stranger.key");
    ok(&stock("age-keygen", &["-o", s(&stranger)]), "age-keygen");
    let e = refused(&import(&s2, &stranger, &bundle), 5, &["opens none of the 4 files", "nothing was imported"]);
    assert!(e.contains(s(&stranger)), "{e}");
    // Not an identity file at all.
    refused(&import(&s2, &manifest, &bundle), 1, &["not an age identity file"]);
    let r = kmip::run(&s2, "dev", json!([{"op": "locate", "name": "first"}, {"op": "get", "uid": uids[0]}]));
    assert_eq!(good(&r[0])["uids"], json!([]));
    assert_eq!(r[1]["reason"], "ITEM_NOT_FOUND", "{}", r[1]);

    // Only an officer imports: an auditor's attempt is refused by the server, per object.
    let o = s2.kmsctl("auditor", &["kmip", "import", "--recovery-identity", s(&recovery), s(&bundle)]);
    refused(&o, 4, &["2 of the bundle's objects failed"]);
    assert!(stdout(&o).contains("may not KmipImport"), "{}", stdout(&o));

    // One key file altered (one bit of its payload): named and refused; the other object
    // is imported; the exit code says integrity.
    let altered = bundle.join(format!("{}.key.age", uids[0]));
    let mut bytes = std::fs::read(&altered).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&altered, bytes).unwrap();
    let o = import(&s2, &recovery, &bundle);
    let e = refused(&o, 5, &["1 of the bundle's objects failed"]);
    let out = stdout(&o);
    assert!(out.contains(&format!("{} FAILED: {}: damaged or altered", uids[0], altered.display())), "{out}\n{e}");
    assert!(out.contains(&format!("{} imported", uids[1])), "{out}");
    // A file renamed to another object's name: the name and the content disagree.
    std::fs::rename(bundle.join(format!("{}.state.age", uids[1])), bundle.join(format!("{}.state.age", "f".repeat(32)))).unwrap();
    std::fs::rename(bundle.join(format!("{}.key.age", uids[1])), bundle.join(format!("{}.key.age", "f".repeat(32)))).unwrap();
    let o = import(&s2, &recovery, &bundle);
    refused(&o, 5, &["failed"]);
    assert!(stdout(&o).contains("renamed or swapped"), "{}", stdout(&o));
    let r = kmip::run(&s2, "dev", json!([{"op": "get", "uid": uids[0]}, {"op": "get", "uid": "f".repeat(32)}]));
    assert_eq!(r[0]["reason"], "ITEM_NOT_FOUND", "{}", r[0]);
    assert_eq!(r[1]["reason"], "ITEM_NOT_FOUND", "{}", r[1]);
}

#[test]
fn create_fails_closed_when_the_bundle_cannot_be_written() {
    let site = tempfile::tempdir().unwrap();
    let bundle = site.path().join("kmip-escrow");
    let s1 = server(Some(&bundle));

    // No recovery recipient installed: no object is made, and the answer says what to do.
    let r = kmip::run(&s1, "dev", json!([{"op": "create", "algorithm": "AES", "length": 256, "name": "k"}]));
    assert_eq!(r[0]["status"], "OPERATION_FAILED", "{}", r[0]);
    let msg = r[0]["message"].as_str().unwrap();
    assert!(msg.contains("no escrow manifest is in force") && msg.contains("kmsctl escrow install"), "{msg}");
    assert_eq!(files(&bundle), Vec::<String>::new());

    let (manifest, _) = ceremony(site.path());
    install(&s1, &manifest);
    // The directory cannot be written (here: a file stands where it was): refused, no
    // object, the directory named.
    std::fs::remove_dir(&bundle).unwrap();
    std::fs::write(&bundle, b"not a directory").unwrap();
    let r = kmip::run(&s1, "dev", json!([{"op": "create", "algorithm": "AES", "length": 256, "name": "k"}, {"op": "locate", "name": "k"}]));
    assert_eq!(r[0]["status"], "OPERATION_FAILED", "{}", r[0]);
    let msg = r[0]["message"].as_str().unwrap();
    assert!(msg.contains("could not be written in") && msg.contains(s(&bundle)), "{msg}");
    assert_eq!(good(&r[1])["uids"], json!([]));

    // Writable again: made, and escrowed.
    std::fs::remove_file(&bundle).unwrap();
    std::fs::create_dir(&bundle).unwrap();
    let r = kmip::run(&s1, "dev", json!([{"op": "create", "algorithm": "AES", "length": 256, "name": "k"}]));
    let uid = good(&r[0])["uid"].as_str().unwrap().to_owned();
    assert_eq!(files(&bundle), vec![format!("{uid}.key.age"), format!("{uid}.state.age")]);
}

/// A key pair comes back from the bundle whole: both keys with their bytes and uids, and
/// the Links that tie them (in the key files, readable with the stock `age`, and on the new
/// server after the import).
#[test]
fn an_imported_key_pair_keeps_both_keys_and_their_links() {
    let site = tempfile::tempdir().unwrap();
    let bundle = site.path().join("kmip-escrow");
    let (manifest, custodian_keys) = ceremony(site.path());
    let s1 = server(Some(&bundle));
    install(&s1, &manifest);
    let r = kmip::run(&s1, "dev", json!([{"op": "pie2_create_key_pair", "length": 2048, "private_name": "veeam-rsa-1", "public_name": "veeam-rsa-1-pub"}]));
    let (private, public) = (good(&r[0])["private"].as_str().unwrap().to_owned(), r[0]["public"].as_str().unwrap().to_owned());
    let seed = kmip::run(&s1, "dev", json!([{"op": "pie2_register", "object_type": "SECRET_DATA", "key": hex::encode(b"seed-bytes"), "secret_data_type": "SEED"}]));
    let seed = good(&seed[0])["uid"].as_str().unwrap().to_owned();
    let before = kmip::run(&s1, "dev", json!([{"op": "pie2_get", "uid": private}, {"op": "pie2_get", "uid": public}]));
    let (private_key, public_key) = (good(&before[0])["key"].clone(), good(&before[1])["key"].clone());
    drop(s1);

    let recovery = rebuild(site.path(), &manifest, &custodian_keys);
    let k = stock_decrypt(&recovery, &bundle.join(format!("{private}.key.age")));
    assert_eq!(k["links"], json!([{"link_type": 0x102, "uid": public}]), "{k}");
    let k = stock_decrypt(&recovery, &bundle.join(format!("{public}.key.age")));
    assert_eq!(k["links"], json!([{"link_type": 0x103, "uid": private}]), "{k}");
    let k = stock_decrypt(&recovery, &bundle.join(format!("{seed}.key.age")));
    assert_eq!((k["secret_data_type"].as_u64(), k["material_hex"].as_str()), (Some(2), Some(hex::encode(b"seed-bytes").as_str())), "a registered object is escrowed too: {k}");

    let s2 = server(Some(&site.path().join("kmip-escrow-new")));
    install(&s2, &manifest);
    let o = import(&s2, &recovery, &bundle);
    ok(&o, "kmip import");
    assert!(stdout(&o).contains("3 imported, 0 already present, 0 skipped, 0 failed"), "{}", stdout(&o));
    let after = kmip::run(
        &s2,
        "dev",
        json!([
            {"op": "pie2_get", "uid": private},
            {"op": "pie2_get", "uid": public},
            {"op": "get_attribute_list", "uid": private},
            {"op": "pie_locate", "name": "veeam-rsa-1"},
            {"op": "pie2_get", "uid": seed},
        ]),
    );
    assert_eq!((good(&after[4])["key"].as_str(), after[4]["data_type"].as_str()), (Some(hex::encode(b"seed-bytes").as_str()), Some("SEED")), "{}", after[4]);
    assert_eq!(good(&after[0])["key"], private_key);
    assert_eq!(good(&after[1])["key"], public_key);
    assert!(good(&after[2])["names"].as_array().unwrap().contains(&json!("Link")), "{}", after[2]);
    assert_eq!(good(&after[3])["uids"], json!([private]));
}
