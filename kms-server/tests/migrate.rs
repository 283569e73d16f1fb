//! Issue 3, point 5: `kms-server migrate-master`, with real processes, a real
//! SoftHSM2 token in a temp dir, and the real `backup-hook` and `kmsctl`.
//!
//! The binaries must be built first: `cargo build --workspace --bins`.
//! SOFTHSM2_CONF is given to child processes only (never set in this process).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use kluis_tests::{SOFTHSM_MODULE, SoftHsmToken as Token, bin};

const MISMATCH: &str = "the master key does not open this store";

/// A `[master]` table for a key labelled `key_label` on `token`.
fn master(token: &Token, key_label: &str) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("provider".into(), "pkcs11".into());
    t.insert("module".into(), SOFTHSM_MODULE.into());
    t.insert("token_label".into(), token.label.clone().into());
    t.insert("key_label".into(), key_label.into());
    t.insert("pin_file".into(), token.pin_file.to_str().unwrap().into());
    t
}

/// One test's world: a temp dir, the dev data dir, an optional token.
struct World {
    tmp: tempfile::TempDir,
    token: Option<Token>,
    child: Option<Child>,
    addr: String,
    logs: u32,
}

impl World {
    fn new(with_token: bool) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let token = with_token.then(|| Token::create(&tmp.path().join("hsm"), "kluis-mig"));
        Self { tmp, token, child: None, addr: String::new(), logs: 0 }
    }

    fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("kluis")
    }

    /// The config `kms-server dev` wrote (the FROM config of a migration).
    fn server_toml(&self) -> PathBuf {
        self.data_dir().join("server.toml")
    }

    fn cmd(&self, name: &str) -> Command {
        let mut c = Command::new(bin(name));
        c.current_dir(self.tmp.path()).env("KLUIS_LOG", "warn").env_remove("KLUIS_CLIENT_CONFIG");
        if let Some(t) = &self.token {
            c.env("SOFTHSM2_CONF", &t.conf);
        }
        c
    }

    /// Spawns a server command; returns Ok once it listens, Err(stderr) if it exits first.
    fn spawn(&mut self, mut cmd: Command) -> Result<(), String> {
        assert!(self.child.is_none(), "a server is already running");
        self.logs += 1;
        let log_path = self.tmp.path().join(format!("server-{}.log", self.logs));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(log)).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(a) = line.strip_prefix("kms-server listening on ") {
                        break a.to_owned();
                    }
                }
                _ => {
                    child.wait().unwrap();
                    return Err(std::fs::read_to_string(&log_path).unwrap_or_default());
                }
            }
        };
        std::thread::spawn(move || for _ in lines {});
        self.addr = addr;
        self.child = Some(child);
        Ok(())
    }

    /// `kms-server dev` on port 0 (master key on the token if `pkcs11_key` is given).
    fn start_dev(&mut self, pkcs11_key: Option<&str>) {
        let mut cmd = self.cmd("kms-server");
        cmd.args(["dev", "--data-dir"]).arg(self.data_dir()).args(["--listen", "127.0.0.1:0"]);
        if let Some(key) = pkcs11_key {
            let t = self.token.as_ref().unwrap();
            cmd.args(["--pkcs11-module", SOFTHSM_MODULE, "--pkcs11-token-label", &t.label, "--pkcs11-key-label", key])
                .arg("--pkcs11-pin-file")
                .arg(&t.pin_file);
        }
        self.spawn(cmd).unwrap_or_else(|log| panic!("kms-server dev did not start:\n{log}"));
    }

    /// `kms-server serve --config CONFIG`: Ok once listening, Err(stderr) if refused.
    fn serve(&mut self, config: &Path) -> Result<(), String> {
        let mut cmd = self.cmd("kms-server");
        cmd.arg("serve").arg("--config").arg(config);
        self.spawn(cmd)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// A client config of a dev identity, pointing at the running server's address
    /// (the dev-written ones hold the port of the dev run).
    fn client(&self, identity: &str) -> PathBuf {
        let orig = self.data_dir().join("clients").join(format!("{identity}.toml"));
        let text = std::fs::read_to_string(&orig).unwrap();
        let text: String = text
            .lines()
            .map(|l| if l.starts_with("endpoint") { format!("endpoint = \"https://{}\"\n", self.addr) } else { format!("{l}\n") })
            .collect();
        let dir = self.tmp.path().join("clients-now");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{identity}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn run(&self, name: &str, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self.cmd(name)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut sin = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = sin.write_all(&data);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }

    fn seal(&self, identity: &str, keyring: &str, backup_id: &str, data: &[u8]) -> Vec<u8> {
        let cfg = self.client(identity);
        let out = self.run(
            "backup-hook",
            &["--client-config", cfg.to_str().unwrap(), "seal", "--keyring", keyring, "--backup-id", backup_id],
            data,
        );
        assert!(out.status.success(), "seal failed: {}", stderr(&out));
        out.stdout
    }

    fn create_keyring(&self, name: &str) {
        let cfg = self.client("officer");
        let out = self.run("kmsctl", &["--client-config", cfg.to_str().unwrap(), "keyring", "create", name], b"");
        assert!(out.status.success(), "keyring create: {}", stderr(&out));
    }

    /// Unseals every backup against the running server and checks the bytes.
    fn unseal_all(&self, backups: &[Backup]) {
        for b in backups {
            let cfg = self.client(b.restorer);
            let out = self.run("backup-hook", &["--client-config", cfg.to_str().unwrap(), "unseal"], &b.sealed);
            assert!(out.status.success(), "unseal of {} failed: {}", b.id, stderr(&out));
            assert!(out.stdout == b.plain, "backup {} did not unseal byte-identically", b.id);
        }
    }

    /// Writes `name` = the dev server.toml with `[master]` replaced.
    fn config_with_master(&self, name: &str, master: toml::Table) -> PathBuf {
        let mut cfg: toml::Table = std::fs::read_to_string(self.server_toml()).unwrap().parse().unwrap();
        cfg.insert("master".into(), master.into());
        let p = self.tmp.path().join(name);
        std::fs::write(&p, toml::to_string(&cfg).unwrap()).unwrap();
        p
    }

    fn software_master(&self, key_file: &Path) -> toml::Table {
        let mut t = toml::Table::new();
        t.insert("provider".into(), "software".into());
        t.insert("key_file".into(), key_file.to_str().unwrap().into());
        t
    }

    fn migrate(&self, from: &Path, to: &Path, abort: Option<&str>) -> Output {
        // The abort seam exists only in kms-server-testkit.
        let mut cmd = self.cmd(if abort.is_some() { "kms-server-testkit" } else { "kms-server" });
        cmd.arg("migrate-master").arg("--from").arg(from).arg("--to").arg(to);
        if let Some(point) = abort {
            cmd.env("KLUIS_TEST_ABORT_MIGRATION", point);
        }
        cmd.output().unwrap()
    }

    /// Seals 3 backups in `default` (as sealer) and 1 in a new keyring `ehr-db` (as dev).
    fn seal_sample(&self) -> Vec<Backup> {
        let mut out = Vec::new();
        for (i, len) in [0usize, 1000, 70_000].into_iter().enumerate() {
            let plain: Vec<u8> = (0..len).map(|j| (j * 31 + i * 7) as u8).collect();
            let id = format!("default-{i}");
            let sealed = self.seal("sealer", "default", &id, &plain);
            out.push(Backup { id, plain, sealed, restorer: "restorer" });
        }
        self.create_keyring("ehr-db");
        let plain = b"ehr database dump".repeat(500);
        let sealed = self.seal("dev", "ehr-db", "ehr-0", &plain);
        out.push(Backup { id: "ehr-0".into(), plain, sealed, restorer: "dev" });
        out
    }

    /// The store opens fully with `ok` (serves, unseals all) and is refused with `refused`.
    fn exactly_one_opens(&mut self, ok: &Path, refused: &Path, backups: &[Backup]) {
        let err = self.serve(refused).err().unwrap_or_else(|| panic!("{} should be refused", refused.display()));
        assert!(err.contains(MISMATCH), "{err}");
        self.serve(ok).unwrap_or_else(|log| panic!("{} should serve:\n{log}", ok.display()));
        self.unseal_all(backups);
        self.stop();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Backup {
    id: String,
    plain: Vec<u8>,
    sealed: Vec<u8>,
    restorer: &'static str,
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A refusal: exit code 1, exactly one line on stderr, containing `needle`.
fn assert_refused(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("kms-server: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// Software -> SoftHSM2: everything sealed before unseals after, through a server
/// started with the new config; the old config is refused.
#[test]
fn software_to_softhsm_rewraps_every_keyring() {
    let mut w = World::new(true);
    w.start_dev(None);
    let backups = w.seal_sample();
    w.stop();
    let from = w.server_toml();
    let to = w.config_with_master("to.toml", master(w.token.as_ref().unwrap(), "kluis-master-new"));

    let out = w.migrate(&from, &to, None);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("rewrapped 2 keyring(s), 2 version(s)"), "{err}");
    assert!(err.contains("from: software master key"), "{err}");
    assert!(err.contains("to:   PKCS#11 key \"kluis-master-new\" on token \"kluis-mig\" (created now)"), "{err}");
    assert!(err.contains("serve with the --to config"), "{err}");
    assert!(err.contains("NOT deleted"), "{err}");
    assert!(w.data_dir().join("master.key").exists(), "the old key file must be kept");

    w.exactly_one_opens(&to, &from, &backups);
    // And the new master keeps working for new backups.
    w.serve(&to).unwrap();
    let more = vec![Backup {
        id: "after".into(),
        plain: b"after migration".to_vec(),
        sealed: w.seal("sealer", "default", "after", b"after migration"),
        restorer: "restorer",
    }];
    w.unseal_all(&more);
}

/// A crash right before the commit leaves the store under the old key (and the
/// migration can simply be run again).
#[test]
fn crash_before_commit_keeps_the_old_master() {
    let mut w = World::new(true);
    w.start_dev(None);
    let backups = w.seal_sample();
    w.stop();
    let from = w.server_toml();
    let to = w.config_with_master("to.toml", master(w.token.as_ref().unwrap(), "kluis-master-new"));

    let out = w.migrate(&from, &to, Some("before-commit"));
    assert!(!out.status.success(), "the process should have aborted: {}", stderr(&out));
    assert_eq!(out.status.code(), None, "killed by a signal: {}", stderr(&out));
    w.exactly_one_opens(&from, &to, &backups);

    // Running it again completes it; the token key made by the crashed run is reused.
    let out = w.migrate(&from, &to, None);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("created now") && err.contains("rewrapped 2 keyring(s)"), "{err}");
    w.exactly_one_opens(&to, &from, &backups);
}

/// A crash right after the commit leaves the store under the new key. Here the
/// old master is itself a SoftHSM2 key: PKCS#11 -> another token key.
#[test]
fn crash_after_commit_has_the_new_master() {
    let mut w = World::new(true);
    w.start_dev(Some("kluis-master"));
    let backups = w.seal_sample();
    w.stop();
    let from = w.server_toml();
    let to = w.config_with_master("to.toml", master(w.token.as_ref().unwrap(), "kluis-master-2"));

    let out = w.migrate(&from, &to, Some("after-commit"));
    assert!(!out.status.success(), "the process should have aborted: {}", stderr(&out));
    assert_eq!(out.status.code(), None, "killed by a signal: {}", stderr(&out));
    w.exactly_one_opens(&to, &from, &backups);
}

/// Refusals change nothing and say why in one line; then a valid software ->
/// software migration succeeds.
#[test]
fn refusals_and_software_to_software() {
    let mut w = World::new(false);
    w.start_dev(None);
    let backups = w.seal_sample();
    let from = w.server_toml();
    let new_key = w.tmp.path().join("master-2.key");
    let to = w.config_with_master("to.toml", w.software_master(&new_key));

    // The server holds the store.
    let out = w.migrate(&from, &to, None);
    assert_refused(&out, "stop kms-server first");
    w.stop();
    assert!(!new_key.exists(), "a refused migration must not create the new key");

    // The --to config names another store.
    let mut other: toml::Table = std::fs::read_to_string(&to).unwrap().parse().unwrap();
    other.insert("data_dir".into(), w.tmp.path().join("elsewhere").to_str().unwrap().into());
    let other_path = w.tmp.path().join("other-store.toml");
    std::fs::write(&other_path, toml::to_string(&other).unwrap()).unwrap();
    assert_refused(&w.migrate(&from, &other_path, None), "same data_dir");

    // The --from master does not open the store.
    let stranger = w.tmp.path().join("stranger.key");
    kms_server::master::software::SoftwareMasterKey::create(
        &stranger,
        &kms_server::master::software::PassphraseSource::None,
    )
    .unwrap();
    let wrong_from = w.config_with_master("wrong-from.toml", w.software_master(&stranger));
    assert_refused(&w.migrate(&wrong_from, &to, None), "the --from master key does not open this store");

    // --to is the same key as --from.
    assert_refused(&w.migrate(&from, &from, None), "nothing to migrate");
    assert!(!new_key.exists(), "a refused migration must not create the new key");

    // Nothing changed: the old config still serves everything.
    w.serve(&from).unwrap();
    w.unseal_all(&backups);
    w.stop();

    // Software -> another key file.
    let out = w.migrate(&from, &to, None);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("(created now)") && err.contains("rewrapped 2 keyring(s), 2 version(s)"), "{err}");
    assert!(new_key.exists());
    w.exactly_one_opens(&to, &from, &backups);
}

// ---- Master-key generations (`kmsctl master rotate`, issue #6 point 3) ----

/// Store META key of the master-key generation (see `kms_server::keys`).
const GENERATION_META: &str = "master_generation";

/// The (stopped) server's store, with the key layer's typed records.
fn open_registry(path: &Path) -> Result<kms_server::keys::registry::Registry, kms_server::store::StoreError> {
    let store = kms_server::store::redb::RedbStore::open(path, kms_server::audit::AuditChain::new())?;
    Ok(kms_server::keys::registry::Registry::new(std::sync::Arc::new(store)))
}

impl World {
    fn store_path(&self) -> PathBuf {
        kms_server::config::ServerConfig::load(&self.server_toml()).unwrap().store_path()
    }

    /// The generation the store records (absent = 1).
    fn store_generation(&self) -> u32 {
        let store = open_registry(&self.store_path()).unwrap();
        let value = store.get_meta(GENERATION_META).unwrap();
        kms_server::master::decode_generation(value.as_deref()).unwrap()
    }

    /// Puts the (stopped) dev store at generation 2 of its configured master key, as
    /// `kmsctl master rotate` does: every keyring is rewrapped under the `.g2` sibling of the
    /// configured key (created by a migration to a config naming that sibling, which also records
    /// generation 1), then generation 2 is recorded. `g2_master` is a `[master]` naming the sibling.
    fn rotate_to_generation_two(&self, g2_master: toml::Table) {
        let g2 = self.config_with_master("g2.toml", g2_master);
        let out = self.migrate(&self.server_toml(), &g2, None);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("(created now)"), "{}", stderr(&out));
        assert_eq!(self.store_generation(), 1);
        let store = open_registry(&self.store_path()).unwrap();
        store
            .write_blocking(kms_server::keys::registry::WriteOp::PutMeta {
                key: GENERATION_META,
                value: kms_server::master::encode_generation(2),
            })
            .unwrap();
        drop(store);
        assert_eq!(self.store_generation(), 2);
    }
}

/// The store is at generation 2 of the software --from key (`master.key.g2`): migration opens
/// that generation, records generation 1 for the --to key in the same commit, and refuses to
/// go back to the retired generation 1 or to a --from config that cannot reach generation 2.
#[test]
fn software_store_at_generation_two_migrates() {
    let mut w = World::new(false);
    w.start_dev(None);
    let backups = w.seal_sample();
    w.stop();
    let from = w.server_toml();
    let base_key = w.data_dir().join("master.key");
    let g2_key = w.data_dir().join("master.key.g2");
    w.rotate_to_generation_two(w.software_master(&g2_key));
    let new_key = w.tmp.path().join("master-new.key");
    let to = w.config_with_master("to.toml", w.software_master(&new_key));

    // --to = the configured key itself: generation 1, which the store was rotated away from.
    assert_refused(&w.migrate(&from, &from, None), "rotated away from (it is at generation 2)");
    // A --from config whose generation 2 does not exist (master.key.g2.g2).
    let g2_cfg = w.tmp.path().join("g2.toml");
    assert_refused(&w.migrate(&g2_cfg, &to, None), "generation 2 of the --from master key");
    assert!(!new_key.exists(), "a refused migration must not create the new key");
    assert_eq!(w.store_generation(), 2);

    let out = w.migrate(&from, &to, None);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("from: software master key {}", g2_key.display())), "{err}");
    assert!(err.contains("(created now)") && err.contains("rewrapped 2 keyring(s), 2 version(s)"), "{err}");
    assert_eq!(w.store_generation(), 1, "the --to key itself wraps the store now");
    assert!(base_key.exists() && g2_key.exists(), "old keys are never deleted");
    w.exactly_one_opens(&to, &from, &backups);
}

/// A destroyed keyring has no wrapped keys left; the migration moves the others and keeps
/// its tombstone.
#[test]
fn a_store_with_a_destroyed_keyring_migrates() {
    let mut w = World::new(false);
    w.start_dev(None);
    let backups = w.seal_sample();
    w.create_keyring("gone");
    w.stop();
    // What a carried-out keyring destruction leaves in the store: the tombstone, no keys.
    let store_path = w.data_dir().join("data/kluis.redb");
    {
        let store = open_registry(&store_path).unwrap();
        let mut gone = store.keyrings().unwrap().into_iter().find(|r| r.name == "gone").unwrap();
        gone.destroyed = Some(1_700_000_000);
        for v in &mut gone.versions {
            v.wrapped_key.clear();
        }
        store.write_blocking(kms_server::keys::registry::WriteOp::PutKeyring(gone)).unwrap();
    }
    let from = w.server_toml();
    let to = w.config_with_master("to.toml", w.software_master(&w.tmp.path().join("master-new.key")));
    let out = w.migrate(&from, &to, None);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("rewrapped 2 keyring(s), 2 version(s)"), "{err}");
    let store = open_registry(&store_path).unwrap();
    let gone = store.keyrings().unwrap().into_iter().find(|r| r.name == "gone").unwrap();
    assert!(gone.destroyed.is_some() && gone.versions.iter().all(|v| v.wrapped_key.is_empty()));
    drop(store);
    w.exactly_one_opens(&to, &from, &backups);
}

/// The same on a SoftHSM2 token: the store is at generation 2 of the token key
/// (`kluis-master.g2`), migrated to another token key.
#[test]
fn softhsm_store_at_generation_two_migrates() {
    let mut w = World::new(true);
    w.start_dev(Some("kluis-master"));
    let backups = w.seal_sample();
    w.stop();
    let from = w.server_toml();
    let token = w.token.as_ref().unwrap();
    w.rotate_to_generation_two(master(token, "kluis-master.g2"));
    let to = w.config_with_master("to.toml", master(token, "kluis-master-new"));

    assert_refused(&w.migrate(&from, &from, None), "rotated away from (it is at generation 2)");
    let out = w.migrate(&from, &to, None);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("from: PKCS#11 key \"kluis-master.g2\" on token \"kluis-mig\""), "{err}");
    assert!(err.contains("to:   PKCS#11 key \"kluis-master-new\" on token \"kluis-mig\" (created now)"), "{err}");
    assert_eq!(w.store_generation(), 1);
    w.exactly_one_opens(&to, &from, &backups);
}

/// Runs `body` in a child process of this test binary with `SOFTHSM2_CONF` set for it (this
/// process never sets it: `set_var` is unsafe here and would race with parallel tests).
fn in_softhsm_child(name: &str, body: impl FnOnce(&Token)) {
    const CHILD: &str = "KLUIS_MIGRATE_TEST_CHILD";
    const DIR: &str = "KLUIS_MIGRATE_TEST_DIR";
    if std::env::var_os(CHILD).is_some_and(|v| v == name) {
        let dir = PathBuf::from(std::env::var_os(DIR).unwrap());
        let token = Token {
            conf: dir.join("softhsm2.conf"),
            pin_file: dir.join("pin"),
            label: std::fs::read_to_string(dir.join("label")).unwrap(),
        };
        body(&token);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let token = Token::create(tmp.path(), "kluis-gen");
    std::fs::write(tmp.path().join("label"), &token.label).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &token.conf)
        .env(CHILD, name)
        .env(DIR, tmp.path())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(out.status.success(), "child test failed:\n{text}");
    assert!(text.contains("1 passed"), "the child did not run the test:\n{text}");
}

/// `generation` on a real token: `<label>.g2` is a new, sensitive, non-extractable AES-256 key
/// on the same token, refuses to be created twice, opens again, and stays relative to the
/// configured label.
#[test]
fn pkcs11_generation_on_softhsm() {
    use kms_server::master::pkcs11::{Pkcs11MasterKey, Pkcs11Settings, PinSource};
    use kms_server::master::{MasterError, MasterKeyProvider};

    in_softhsm_child("pkcs11_generation_on_softhsm", |token| {
        let settings = Pkcs11Settings {
            module: SOFTHSM_MODULE.into(),
            token_label: token.label.clone(),
            key_label: "kluis-master".into(),
            pin: PinSource::File(token.pin_file.clone()),
            reconnect_backoff: std::time::Duration::from_millis(100),
        };
        let g1 = Pkcs11MasterKey::create(&settings).unwrap();
        let blob1 = g1.wrap(b"aad", b"keyring key").unwrap();

        let g2 = g1.generation_key(2, true).unwrap();
        assert_eq!(g2.key_label(), "kluis-master.g2");
        assert_eq!(g2.describe(), "PKCS#11 key \"kluis-master.g2\" on token \"kluis-gen\"");
        let info = g2.key_info().unwrap();
        assert!(!info.extractable && info.never_extractable, "{info:?}");
        assert!(info.sensitive && info.always_sensitive && info.token, "{info:?}");
        assert!(info.encrypt && info.decrypt, "{info:?}");
        assert_eq!(info.value_len, Some(32));

        // A different key than generation 1.
        let blob2 = g2.wrap(b"aad", b"keyring key").unwrap();
        assert!(matches!(g2.unwrap(b"aad", &blob1), Err(MasterError::UnwrapFailed)));
        assert!(matches!(g1.unwrap(b"aad", &blob2), Err(MasterError::UnwrapFailed)));

        // Refuses to create an existing generation, from either provider.
        for err in [g1.generation(2, true).err().unwrap(), g2.generation(2, true).err().unwrap(), g2.generation(1, true).err().unwrap()] {
            assert!(
                matches!(&err, MasterError::Hsm(e) if matches!(**e, kluis_hsm::HsmError::KeyExists { .. })),
                "{err:?}"
            );
        }
        // Opens again, through the trait object and from a fresh login.
        assert_eq!(g1.generation(2, false).unwrap().unwrap(b"aad", &blob2).unwrap().as_slice(), b"keyring key");
        let fresh = Pkcs11MasterKey::open(&settings).unwrap();
        assert_eq!(fresh.generation(2, false).unwrap().unwrap(b"aad", &blob2).unwrap().as_slice(), b"keyring key");

        // Relative to the configured label, not kluis-master.g2.g3.
        let g3 = g2.generation_key(3, true).unwrap();
        assert_eq!(g3.key_label(), "kluis-master.g3");
        assert_eq!(g3.generation(1, false).unwrap().unwrap(b"aad", &blob1).unwrap().as_slice(), b"keyring key");

        // A missing generation is KeyMissing; generation 0 is refused.
        let err = g1.generation(4, false).err().unwrap();
        assert!(matches!(&err, MasterError::Hsm(e) if matches!(**e, kluis_hsm::HsmError::KeyMissing { .. })), "{err:?}");
        assert!(matches!(g1.generation(0, true), Err(MasterError::InvalidGeneration { generation: 0 })));
    });
}
