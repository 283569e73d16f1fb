//! Issue 8, end to end with the REAL backup tools: restic, borg, tar + zstd, PostgreSQL
//! (pg_dump, psql, pg_restore), the stock `age`, against the real `kms-server`, real mTLS,
//! the real `backup-hook` and `kmsctl`.
//!
//! The recipes of docs/integrations.md are the constants below, run verbatim by `bash` with
//! `set -euo pipefail` and the workspace binaries first on PATH; the test
//! `docs_quote_the_tested_recipes` checks that the document quotes every one of them
//! character for character. Change one, change the other.
//!
//! Every tool is looked up on PATH first; a missing one fails the test and names the
//! Debian package (`scripts/test-all` installs them when run as root).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use age::secrecy::ExposeSecret;
use kluis_tests::*;

// ---------------------------------------------------------------------------------------
// The recipes (quoted verbatim in docs/integrations.md)
// ---------------------------------------------------------------------------------------

/// restic, once per repository: make the key file.
const RESTIC_CREATE: &str = r#"backup-hook --client-config "$CFG" passphrase --create --keyring restic-ehr --name restic-ehr --key-file "$KEY_FILE""#;

/// restic, every night (init only the first time).
const RESTIC_BACKUP: &str = r#"PW="backup-hook --client-config $CFG passphrase --key-file $KEY_FILE"
restic -r "$REPO" --password-command "$PW" init
restic -r "$REPO" --password-command "$PW" backup "$DATA"
restic -r "$REPO" --password-command "$PW" check"#;

/// restic, restore.
const RESTIC_RESTORE: &str = r#"PW="backup-hook --client-config $CFG passphrase --key-file $KEY_FILE"
restic -r "$REPO" --password-command "$PW" restore latest --target "$RESTORE""#;

/// restic in a disaster: no server; the custodians' recovery.key and the stock `age`.
const RESTIC_DISASTER_AGE: &str = r#"PW="age -d -i $RECOVERY_KEY $KEY_FILE"
restic -r "$REPO" --password-command "$PW" restore latest --target "$RESTORE""#;

/// restic in a disaster, the same with backup-hook.
const RESTIC_DISASTER_HOOK: &str = r#"PW="backup-hook passphrase --recovery-identity $RECOVERY_KEY --key-file $KEY_FILE"
restic -r "$REPO" --password-command "$PW" restore latest --target "$RESTORE""#;

/// borg, once per repository.
const BORG_CREATE: &str = r#"backup-hook --client-config "$CFG" passphrase --create --keyring borg-ehr --name borg-ehr --key-file "$KEY_FILE""#;

/// borg, every night (init only the first time).
const BORG_BACKUP: &str = r#"export BORG_PASSCOMMAND="backup-hook --client-config $CFG passphrase --key-file $KEY_FILE"
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=no
borg init -e repokey "$REPO"
(cd "$DATA" && borg create "$REPO::{hostname}-{now:%Y-%m-%dT%H:%M:%S}" .)
borg check "$REPO""#;

/// borg, restore the latest archive.
const BORG_RESTORE: &str = r#"export BORG_PASSCOMMAND="backup-hook --client-config $CFG passphrase --key-file $KEY_FILE"
ARCHIVE=$(borg list --last 1 --short "$REPO")
(cd "$RESTORE" && borg extract "$REPO::$ARCHIVE")"#;

/// tar + zstd through the pipe, on a write-only (sealer) host.
const TAR_BACKUP: &str = r#"tar -C "$DATA" -cf - . | zstd -q | backup-hook --client-config "$CFG" seal --keyring "$KEYRING" --backup-id "ehr-files/$(date +%Y-%m-%d)" --label tool=tar+zstd -o "$SEALED""#;

/// tar + zstd, restore (restorer identity).
const TAR_RESTORE: &str = r#"backup-hook --client-config "$RESTORE_CFG" unseal -i "$SEALED" | zstd -d -q | tar -C "$RESTORE" -xf -"#;

/// pg_dump custom format through the pipe (write-only host).
const PG_DUMP_CUSTOM: &str = r#"pg_dump -Fc "$DB" | backup-hook --client-config "$CFG" seal --keyring "$KEYRING" --backup-id "$DB/pg_dump/$(date +%Y-%m-%d)" --label tool=pg_dump --label format=custom -o "$SEALED""#;

/// pg_restore of the custom format into a fresh database.
const PG_RESTORE_CUSTOM: &str = r#"createdb "$RESTORE_DB"
backup-hook --client-config "$RESTORE_CFG" unseal -i "$SEALED" | pg_restore --exit-on-error --single-transaction --no-owner -d "$RESTORE_DB""#;

/// pg_dump plain SQL through the pipe.
const PG_DUMP_SQL: &str = r#"pg_dump "$DB" | backup-hook --client-config "$CFG" seal --keyring "$KEYRING" --backup-id "$DB/pg_dump-sql/$(date +%Y-%m-%d)" --label tool=pg_dump --label format=plain -o "$SEALED_SQL""#;

/// psql of the plain SQL into a fresh database.
const PG_RESTORE_SQL: &str = r#"createdb "$RESTORE_DB"
backup-hook --client-config "$RESTORE_CFG" unseal -i "$SEALED_SQL" | psql -X -q -v ON_ERROR_STOP=1 --single-transaction -d "$RESTORE_DB""#;

const RECIPES: &[(&str, &str)] = &[
    ("RESTIC_CREATE", RESTIC_CREATE),
    ("RESTIC_BACKUP", RESTIC_BACKUP),
    ("RESTIC_RESTORE", RESTIC_RESTORE),
    ("RESTIC_DISASTER_AGE", RESTIC_DISASTER_AGE),
    ("RESTIC_DISASTER_HOOK", RESTIC_DISASTER_HOOK),
    ("BORG_CREATE", BORG_CREATE),
    ("BORG_BACKUP", BORG_BACKUP),
    ("BORG_RESTORE", BORG_RESTORE),
    ("TAR_BACKUP", TAR_BACKUP),
    ("TAR_RESTORE", TAR_RESTORE),
    ("PG_DUMP_CUSTOM", PG_DUMP_CUSTOM),
    ("PG_RESTORE_CUSTOM", PG_RESTORE_CUSTOM),
    ("PG_DUMP_SQL", PG_DUMP_SQL),
    ("PG_RESTORE_SQL", PG_RESTORE_SQL),
];

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

/// Fails the test with the Debian package to install when `tool` is not on PATH.
fn need(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{tool}` is not on PATH: this test runs the real tool. Install the Debian package `{package}` \
         (`apt-get install {package}`; scripts/test-all does it when run as root)"
    );
}

/// PATH with the workspace binaries first.
fn path_with_bins() -> OsString {
    let bin_dir = bin("backup-hook").parent().unwrap().to_owned();
    let mut dirs = vec![bin_dir];
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    std::env::join_paths(dirs).unwrap()
}

/// Runs a recipe with bash (`set -euo pipefail`), the binaries on PATH, in `dir`.
fn script(dir: &Path, body: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("set -euo pipefail\n{body}"))
        .current_dir(dir)
        .env("PATH", path_with_bins())
        .env_remove("KLUIS_CLIENT_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn create_keyring(server: &Server, name: &str) {
    ok(&server.kmsctl("officer", &["keyring", "create", name]), "kmsctl keyring create");
}

/// `backup-hook passphrase --key-file F` as `identity`; asserts it printed one base64 line
/// of a 256-bit secret and nothing else; returns the line (with its newline).
fn passphrase_line(server: &Server, identity: &str, key_file: &Path) -> String {
    let o = server.backup_hook(identity, &["passphrase", "--key-file", s(key_file)], b"");
    ok(&o, "backup-hook passphrase");
    assert!(o.stderr.is_empty(), "stderr: {}", stderr(&o));
    let line = stdout(&o);
    assert_one_base64_line(&line);
    line
}

fn assert_one_base64_line(line: &str) {
    assert_eq!(line.len(), 45, "{line:?}");
    assert!(line.ends_with('\n'));
    let body = &line[..44];
    assert!(body.ends_with('=') && !body.ends_with("=="), "{line:?}");
    assert!(body[..43].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'), "{line:?}");
}

/// A small directory tree with the awkward cases: empty file, spaces and non-ASCII in
/// names, a file across several 64 KiB chunks, nesting, a symlink, an empty directory,
/// different modes.
fn make_tree(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let w = |rel: &str, data: &[u8], m: u32| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
    };
    std::fs::create_dir_all(root).unwrap();
    w("notes.txt", b"patient record export\n", 0o644);
    w("empty", b"", 0o600);
    w("dir with space/\u{e9}l\u{e8}ve-\u{df}.bin", &sample(1, 300_001), 0o640);
    w("nested/deep/chunk.bin", &sample(2, 65_536), 0o644);
    w("bin/run.sh", b"#!/bin/sh\necho hi\n", 0o755);
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::os::unix::fs::symlink("notes.txt", root.join("link-to-notes")).unwrap();
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir(u32),
    File(u32, Vec<u8>),
    Link(PathBuf),
}

/// Every entry under `root` (not `root` itself): kind, mode, content or link target.
fn tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.insert(rel, Entry::Link(std::fs::read_link(&p).unwrap()));
            } else if m.is_dir() {
                out.insert(rel, Entry::Dir(mode));
                walk(root, &p, out);
            } else {
                out.insert(rel, Entry::File(mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_same_tree(original: &Path, restored: &Path) {
    let a = tree(original);
    let b = tree(restored);
    let names = |t: &BTreeMap<PathBuf, Entry>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "file lists differ: {} vs {}", original.display(), restored.display());
    for (k, v) in &a {
        assert!(b[k] == *v, "{} differs after the restore", k.display());
    }
    assert!(a.len() >= 9, "the sample tree is incomplete: {:?}", names(&a));
}

/// Where restic puts an absolute path under `--target`.
fn under(target: &Path, abs: &Path) -> PathBuf {
    target.join(abs.strip_prefix("/").unwrap())
}

// ---------------------------------------------------------------------------------------
// restic
// ---------------------------------------------------------------------------------------

/// restic gets its repository password from `backup-hook passphrase` (--password-command):
/// init, backup, check, restore; the restored tree is identical. The key file is an age
/// file with a Kluis stanza, mode 0600; the passphrase is one base64 line; the write-only
/// sealer identity is refused (exit 4), which is why a restic host needs the restorer role
/// on its passphrase keyring (here: the dev identity, every role).
#[test]
fn restic_backs_up_and_restores_with_the_passphrase_from_kluis() {
    need("restic", "restic");
    let server = Server::start();
    create_keyring(&server, "restic-ehr");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let data = w.join("ehr-data");
    make_tree(&data);
    let key_file = w.join("restic-ehr.passphrase");
    let repo = w.join("repo");
    let restore = w.join("restore");
    std::fs::create_dir(&restore).unwrap();
    let cfg = server.client("dev");
    let cache = w.join("restic-cache");
    let env = [
        ("CFG", s(&cfg)),
        ("KEY_FILE", s(&key_file)),
        ("REPO", s(&repo)),
        ("DATA", s(&data)),
        ("RESTORE", s(&restore)),
        ("RESTIC_CACHE_DIR", s(&cache)),
    ];

    let o = script(w, RESTIC_CREATE, &env);
    ok(&o, "passphrase --create");
    assert!(stdout(&o).contains("sealed under keyring restic-ehr"), "{}", stdout(&o));
    assert!(stdout(&o).contains("backup id passphrase/restic-ehr"), "{}", stdout(&o));
    assert_eq!(mode(&key_file), 0o600);
    let sealed = std::fs::read(&key_file).unwrap();
    assert!(sealed.starts_with(b"age-encryption.org/v1\n"));
    assert!(header(&sealed).contains("\n-> kluis restic-ehr "), "{}", header(&sealed));

    let line = passphrase_line(&server, "dev", &key_file);
    // The passphrase is never in the key file in clear, nor in anything create printed.
    assert!(!String::from_utf8_lossy(&sealed).contains(line.trim_end()));
    assert!(!stdout(&o).contains(line.trim_end()) && !stderr(&o).contains(line.trim_end()));
    // Each read gives the same passphrase.
    assert_eq!(passphrase_line(&server, "dev", &key_file), line);

    ok(&script(w, RESTIC_BACKUP, &env), "restic init/backup/check");
    ok(&script(w, RESTIC_RESTORE, &env), "restic restore");
    assert_same_tree(&data, &under(&restore, &data));

    // The repository is really encrypted with that passphrase: a wrong one is refused.
    let o = Command::new("restic")
        .args(["-r", s(&repo), "--password-command", "echo wrong-passphrase", "snapshots"])
        .env("RESTIC_CACHE_DIR", &cache)
        .output()
        .unwrap();
    assert!(!o.status.success(), "restic opened the repository with a wrong passphrase");

    // A write-only sealer cannot read the passphrase: a restic host needs the restorer role.
    let sealer = server.client("sealer");
    let o = backup_hook(&sealer, &["passphrase", "--key-file", s(&key_file)], b"");
    refused_one_line(&o, 4, &["restic-ehr.passphrase", "refused"]);
    let e = stderr(&o);
    assert!(!e.contains(line.trim_end()));
}

// ---------------------------------------------------------------------------------------
// borg
// ---------------------------------------------------------------------------------------

/// borg gets its repokey passphrase from BORG_PASSCOMMAND: init -e repokey, create, check,
/// extract; the restored tree is identical.
#[test]
fn borg_backs_up_and_restores_with_the_passphrase_from_kluis() {
    need("borg", "borgbackup");
    let server = Server::start();
    create_keyring(&server, "borg-ehr");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let data = w.join("ehr-data");
    make_tree(&data);
    let key_file = w.join("borg-ehr.passphrase");
    let repo = w.join("repo");
    let restore = w.join("restore");
    std::fs::create_dir(&restore).unwrap();
    let base = w.join("borg-base");
    let cache = base.join("cache");
    let config = base.join("config");
    let cfg = server.client("dev");
    let env = [
        ("CFG", s(&cfg)),
        ("KEY_FILE", s(&key_file)),
        ("REPO", s(&repo)),
        ("DATA", s(&data)),
        ("RESTORE", s(&restore)),
        ("BORG_BASE_DIR", s(&base)),
        ("BORG_CACHE_DIR", s(&cache)),
        ("BORG_CONFIG_DIR", s(&config)),
        ("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "no"),
        ("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes"),
    ];
    ok(&script(w, BORG_CREATE, &env), "passphrase --create");
    assert_eq!(mode(&key_file), 0o600);
    ok(&script(w, BORG_BACKUP, &env), "borg init/create/check");
    ok(&script(w, BORG_RESTORE, &env), "borg extract");
    assert_same_tree(&data, &restore);

    // The repository needs that passphrase: a wrong one is refused.
    let o = Command::new("borg")
        .args(["list", s(&repo)])
        .envs(env.iter().copied().filter(|(k, _)| k.starts_with("BORG_")))
        .env("BORG_PASSCOMMAND", "echo wrong-passphrase")
        .output()
        .unwrap();
    assert!(!o.status.success(), "borg opened the repository with a wrong passphrase");
}

// ---------------------------------------------------------------------------------------
// tar + zstd
// ---------------------------------------------------------------------------------------

/// `tar | zstd | backup-hook seal` on a write-only host and `backup-hook unseal | zstd -d |
/// tar -x` as the restore operator: file lists and contents identical; the sealer cannot
/// read its own backup.
#[test]
fn tar_zstd_pipe_round_trip_from_a_write_only_host() {
    need("tar", "tar");
    need("zstd", "zstd");
    let server = Server::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let data = w.join("ehr-files");
    make_tree(&data);
    let sealed = w.join("ehr-files.tar.zst.age");
    let restore = w.join("restore");
    std::fs::create_dir(&restore).unwrap();
    let (sealer, restorer) = (server.client("sealer"), server.client("restorer"));
    let env = [
        ("CFG", s(&sealer)),
        ("RESTORE_CFG", s(&restorer)),
        ("KEYRING", "default"),
        ("DATA", s(&data)),
        ("SEALED", s(&sealed)),
        ("RESTORE", s(&restore)),
    ];
    ok(&script(w, TAR_BACKUP, &env), "tar | zstd | backup-hook seal");
    let bytes = std::fs::read(&sealed).unwrap();
    assert!(header(&bytes).contains("\n-> kluis default "));
    ok(&script(w, TAR_RESTORE, &env), "backup-hook unseal | zstd -d | tar -x");
    assert_same_tree(&data, &restore);

    // Write-only: the sealer's restore is refused and the pipeline fails (pipefail).
    let env_sealer = [("RESTORE_CFG", s(&sealer)), ("SEALED", s(&sealed)), ("RESTORE", s(&restore))];
    let o = script(w, TAR_RESTORE, &env_sealer);
    assert!(!o.status.success(), "the sealer read its own backup");
    assert!(stderr(&o).contains("refused"), "{}", stderr(&o));

    // A failed producer fails the job (pipefail), even though backup-hook itself sealed
    // whatever it was given: docs/integrations.md and deploy/ say to check the pipeline's
    // status, not backup-hook's alone.
    let missing = w.join("no-such-dir");
    let sealed2 = w.join("failed.age");
    let env_fail = [("CFG", s(&sealer)), ("KEYRING", "default"), ("DATA", s(&missing)), ("SEALED", s(&sealed2))];
    let o = script(w, TAR_BACKUP, &env_fail);
    assert!(!o.status.success(), "a failed tar did not fail the pipeline");
}

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

const PG_PORT: &str = "54329";

/// The newest `/usr/lib/postgresql/*/bin/DIR` (pg_ctl and initdb are not on PATH in Debian).
fn pg_bin(tool: &str) -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let p = e.path().join("bin").join(tool);
            p.is_file().then_some((v, p))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).unwrap_or_else(|| {
        panic!("/usr/lib/postgresql/*/bin/{tool} not found: install the Debian package `postgresql` (scripts/test-all does it when run as root)")
    })
}

fn is_root() -> bool {
    let o = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim() == "0"
}

/// Runs a server-side PostgreSQL program as `postgres` when we are root (initdb refuses root).
fn as_pg_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A temporary PostgreSQL cluster on a unix socket only; stopped on drop (also on failure).
struct PgCluster {
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
}

impl PgCluster {
    fn start(dir: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let pg = dir.join("pg");
        std::fs::create_dir(&pg).unwrap();
        if is_root() {
            // The cluster runs as postgres: it must reach and own its directory.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let o = Command::new("chown").args(["postgres:postgres", s(&pg)]).output().unwrap();
            ok(&o, "chown postgres (is the Debian package postgresql installed?)");
        }
        let cluster = PgCluster { data: pg.join("data"), sock: pg.clone(), log: pg.join("server.log") };
        let o = as_pg_owner(&pg_bin("initdb"))
            .args(["-D", s(&cluster.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"])
            .output()
            .unwrap();
        ok(&o, "initdb");
        let opts = format!("-p {PG_PORT} -k {} -c listen_addresses=''", s(&cluster.sock));
        let o = as_pg_owner(&pg_bin("pg_ctl"))
            .args(["-D", s(&cluster.data), "-l", s(&cluster.log), "-w", "-t", "60", "-o", &opts, "start"])
            .output()
            .unwrap();
        if !o.status.success() {
            panic!("pg_ctl start failed: {}{}\n{}", stdout(&o), stderr(&o), std::fs::read_to_string(&cluster.log).unwrap_or_default());
        }
        cluster
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("PGHOST", s(&self.sock).to_owned()), ("PGPORT", PG_PORT.to_owned()), ("PGUSER", "postgres".to_owned())]
    }

    fn psql(&self, db: &str, sql: &str) -> String {
        let o = Command::new("psql")
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql])
            .envs(self.env())
            .output()
            .unwrap();
        ok(&o, &format!("psql {sql}"));
        stdout(&o).trim().to_owned()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_pg_owner(&pg_bin("pg_ctl")).args(["-D", s(&self.data), "-m", "immediate", "-w", "stop"]).output();
    }
}

/// A temporary cluster (initdb, pg_ctl on a unix socket in a temp dir), a table with rows;
/// `pg_dump -Fc | backup-hook seal` restored with `backup-hook unseal | pg_restore` and
/// `pg_dump | backup-hook seal` restored with `backup-hook unseal | psql`, each into a
/// fresh database: row counts and an md5 over every row match.
#[test]
fn postgres_dump_through_the_pipe_restores_identical_rows() {
    for (tool, pkg) in [("psql", "postgresql"), ("pg_dump", "postgresql"), ("pg_restore", "postgresql"), ("createdb", "postgresql")] {
        need(tool, pkg);
    }
    pg_bin("pg_ctl");
    let server = Server::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let pg = PgCluster::start(w);
    let (sealer, restorer) = (server.client("sealer"), server.client("restorer"));

    ok(
        &Command::new("createdb").arg("ehr").envs(pg.env()).output().unwrap(),
        "createdb ehr",
    );
    pg.psql(
        "ehr",
        "CREATE TABLE t (id integer PRIMARY KEY, name text, amount numeric(12,2), note text, blob bytea);
         INSERT INTO t SELECT g, 'patient ' || g || ' é ß 漢', g * 1.25, CASE WHEN g % 7 = 0 THEN NULL ELSE md5(g::text) END,
                              decode(md5(g::text), 'hex') FROM generate_series(1, 5000) g;",
    );
    let check = "SELECT count(*) || ' ' || md5(string_agg(t::text, ',' ORDER BY id)) FROM t";
    let want = pg.psql("ehr", check);
    assert!(want.starts_with("5000 "), "{want}");

    let sealed = w.join("ehr.pgdump.age");
    let sealed_sql = w.join("ehr.sql.age");
    let mut env: Vec<(&str, String)> = pg.env();
    env.extend([
        ("CFG", s(&sealer).to_owned()),
        ("RESTORE_CFG", s(&restorer).to_owned()),
        ("KEYRING", "default".to_owned()),
        ("DB", "ehr".to_owned()),
        ("SEALED", s(&sealed).to_owned()),
        ("SEALED_SQL", s(&sealed_sql).to_owned()),
    ]);
    // Runs a recipe with `env` plus (or overridden by) `extra`.
    let run_with = |body: &str, extra: &[(&'static str, &str)]| {
        let mut pairs: Vec<(&str, &str)> =
            env.iter().filter(|(k, _)| !extra.iter().any(|(x, _)| x == k)).map(|(k, v)| (*k, v.as_str())).collect();
        pairs.extend_from_slice(extra);
        script(w, body, &pairs)
    };

    // Custom format through the pipe, pg_restore into a fresh database.
    ok(&run_with(PG_DUMP_CUSTOM, &[]), "pg_dump -Fc | backup-hook seal");
    assert!(std::fs::read(&sealed).unwrap().starts_with(b"age-encryption.org/v1\n"));
    ok(&run_with(PG_RESTORE_CUSTOM, &[("RESTORE_DB", "ehr_restored")]), "backup-hook unseal | pg_restore");
    assert_eq!(pg.psql("ehr_restored", check), want, "pg_restore: rows differ");

    // Plain SQL through the pipe, psql into another fresh database.
    ok(&run_with(PG_DUMP_SQL, &[]), "pg_dump | backup-hook seal");
    ok(&run_with(PG_RESTORE_SQL, &[("RESTORE_DB", "ehr_restored_sql")]), "backup-hook unseal | psql");
    assert_eq!(pg.psql("ehr_restored_sql", check), want, "psql: rows differ");

    // The write-only host cannot restore: refused, and the pipeline fails.
    let o = run_with(PG_RESTORE_CUSTOM, &[("RESTORE_DB", "ehr_by_sealer"), ("RESTORE_CFG", s(&sealer))]);
    assert!(!o.status.success(), "the sealer restored its own dump");
    assert!(stderr(&o).contains("refused"), "{}", stderr(&o));
    assert_eq!(pg.psql("ehr_by_sealer", "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"), "0");
    drop(pg);
}

// ---------------------------------------------------------------------------------------
// disaster
// ---------------------------------------------------------------------------------------

/// With a real escrow (kmsctl escrow ceremony, escrow install), a restic repository whose
/// passphrase is in a Kluis key file; then the server is killed and its data directory
/// deleted. Two of three custodians combine their shares (kmsctl escrow combine) into
/// recovery.key; the stock `age -d -i recovery.key F` prints exactly the passphrase the
/// server path printed, and restic restores with it (through `age` and through
/// `backup-hook passphrase --recovery-identity`): identical trees.
#[test]
fn restic_disaster_custodians_recover_the_passphrase_with_no_server() {
    need("restic", "restic");
    need("age", "age");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // Custodians and the ceremony, offline.
    let keys = w.join("custodian-keys");
    std::fs::create_dir(&keys).unwrap();
    let mut args: Vec<String> = ["escrow", "ceremony", "--threshold", "2"].map(String::from).to_vec();
    let mut ids = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let id = age::x25519::Identity::generate();
        let path = keys.join(format!("{name}.key"));
        std::fs::write(&path, format!("{}\n", id.to_string().expose_secret())).unwrap();
        args.extend(["--custodian".into(), format!("{name}={}", id.to_public())]);
        ids.push(path);
    }
    let ceremony = w.join("ceremony");
    args.extend(["--out".into(), s(&ceremony).into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&kmsctl_offline(&argv), "escrow ceremony");
    let manifest = ceremony.join("manifest.json");

    let mut server = Server::start();
    let o = server.kmsctl("officer", &["escrow", "install", s(&manifest)]);
    ok(&o, "escrow install request");
    ok(&server.kmsctl("dev", &["approve", &approval_id(&o)]), "escrow install approved by a second officer");
    create_keyring(&server, "restic-ehr");

    // Backup storage, outside the server's directory.
    let storage = w.join("backup-storage");
    std::fs::create_dir(&storage).unwrap();
    let data = w.join("ehr-data");
    make_tree(&data);
    let key_file = storage.join("restic-ehr.passphrase");
    let repo = storage.join("repo");
    let cache = w.join("restic-cache");
    let cfg = server.client("dev");
    let env = [
        ("CFG", s(&cfg)),
        ("KEY_FILE", s(&key_file)),
        ("REPO", s(&repo)),
        ("DATA", s(&data)),
        ("RESTIC_CACHE_DIR", s(&cache)),
    ];
    let o = script(w, RESTIC_CREATE, &env);
    ok(&o, "passphrase --create");
    assert!(stdout(&o).contains("escrow copy: yes"), "{}", stdout(&o));
    assert!(header(&std::fs::read(&key_file).unwrap()).contains("\n-> X25519 "), "no escrow stanza in the key file");
    let line = passphrase_line(&server, "dev", &key_file);
    ok(&script(w, RESTIC_BACKUP, &env), "restic init/backup/check");

    // The disaster: server, keys, store, client configs gone.
    server.kill9();
    std::fs::remove_dir_all(server.data_dir()).unwrap();

    // Two custodians combine their (still encrypted) share files with their own keys.
    let rec = w.join("recovery");
    std::fs::create_dir(&rec).unwrap();
    let recovery_key = rec.join("recovery.key");
    let o = kmsctl_offline(&[
        "escrow", "combine", "--manifest", s(&manifest),
        "--identity", s(&ids[0]), "--identity", s(&ids[2]),
        "-o", s(&recovery_key),
        s(&ceremony.join("share-alice.age")), s(&ceremony.join("share-carol.age")),
    ]);
    ok(&o, "escrow combine");

    // The stock age prints exactly what the server path printed.
    let o = Command::new("age").args(["-d", "-i", s(&recovery_key), s(&key_file)]).output().unwrap();
    ok(&o, "age -d -i recovery.key KEY_FILE");
    assert_eq!(stdout(&o), line, "age and backup-hook disagree on the passphrase");
    // And so does backup-hook with the recovery identity, with no server and no config.
    let o = run("backup-hook", &["passphrase", "--recovery-identity", s(&recovery_key), "--key-file", s(&key_file)], b"");
    ok(&o, "backup-hook passphrase --recovery-identity");
    assert_eq!(stdout(&o), line);

    for (name, recipe) in [("age", RESTIC_DISASTER_AGE), ("backup-hook", RESTIC_DISASTER_HOOK)] {
        let restore = rec.join(format!("restore-{name}"));
        std::fs::create_dir(&restore).unwrap();
        let env = [
            ("RECOVERY_KEY", s(&recovery_key)),
            ("KEY_FILE", s(&key_file)),
            ("REPO", s(&repo)),
            ("RESTORE", s(&restore)),
            ("RESTIC_CACHE_DIR", s(&cache)),
        ];
        ok(&script(w, recipe, &env), &format!("restic restore in the disaster ({name})"));
        assert_same_tree(&data, &under(&restore, &data));
    }
}

// ---------------------------------------------------------------------------------------
// deadlines, refusals
// ---------------------------------------------------------------------------------------

/// A server that accepts TCP but never answers TLS (a listener nobody accepts from):
/// `backup-hook passphrase --timeout 2` exits 3 within its deadline with one line on
/// stderr, both with short client deadlines (1 s) and with long ones (60 s, so only the
/// command's own deadline can end it); `--create` also gives up and leaves no file.
#[test]
fn passphrase_gives_up_on_a_hung_server_within_its_deadline() {
    let server = Server::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let key_file = w.join("k.passphrase");
    let o = server.backup_hook("sealer", &[
        "passphrase", "--create", "--keyring", "default", "--name", "hung-test", "--key-file", s(&key_file),
    ], b"");
    ok(&o, "passphrase --create");

    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hung.local_addr().unwrap();
    let text = std::fs::read_to_string(server.client("restorer")).unwrap().replace(&server.addr, &addr.to_string());
    assert!(text.contains(&addr.to_string()));
    let short = w.join("hung-short.toml");
    std::fs::write(&short, format!("{text}connect_timeout_secs = 1\ntimeout_secs = 1\n")).unwrap();
    let long = w.join("hung-long.toml");
    std::fs::write(&long, format!("{text}connect_timeout_secs = 60\ntimeout_secs = 60\n")).unwrap();

    // With the long client deadlines only the command's own can end it, and it says so.
    let addr_text = addr.to_string();
    let long_needles = ["within the 2 s deadline (--timeout)", addr_text.as_str()];
    for (cfg, needles) in [(&short, &[][..]), (&long, &long_needles[..])] {
        let t = Instant::now();
        let o = backup_hook(cfg, &["passphrase", "--key-file", s(&key_file), "--timeout", "2"], b"");
        let took = t.elapsed();
        refused_one_line(&o, 3, needles);
        assert!(took < Duration::from_secs(30), "took {took:?} with {}", cfg.display());
        assert!(took >= Duration::from_millis(900), "ended before any deadline ({took:?}): {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains("deadline") || e.contains("cannot reach") || e.contains("did not answer in time"), "{e}");
    }

    // --create against the hung server: gives up, no key file, no temp file.
    let dir = w.join("new");
    std::fs::create_dir(&dir).unwrap();
    let new_key = dir.join("new.passphrase");
    let sealer_long = w.join("hung-sealer.toml");
    let stext = std::fs::read_to_string(server.client("sealer")).unwrap().replace(&server.addr, &addr.to_string());
    std::fs::write(&sealer_long, format!("{stext}connect_timeout_secs = 60\ntimeout_secs = 60\n")).unwrap();
    let t = Instant::now();
    let o = backup_hook(&sealer_long, &[
        "passphrase", "--create", "--keyring", "default", "--name", "n", "--key-file", s(&new_key), "--timeout", "2",
    ], b"");
    refused_one_line(&o, 3, &["deadline"]);
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "something was written");
    drop(hung);
}

/// `--create` never writes over an existing key file (exit 1, file unchanged, refused before
/// any server round trip); a sealed backup that is not a passphrase, a file that is not
/// sealed and a missing file are each refused with their own one-line message and print
/// nothing; bad names and a missing --keyring are usage errors.
#[test]
fn passphrase_refuses_existing_key_files_and_files_that_are_not_passphrases() {
    let server = Server::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let sealer = server.client("sealer");
    let restorer = server.client("restorer");
    let key_file = w.join("k.passphrase");
    let create = |cfg: &Path, name: &str, key: &Path| {
        backup_hook(cfg, &[
            "passphrase", "--create", "--keyring", "default", "--name", name, "--key-file", s(key),
        ], b"")
    };
    ok(&create(&sealer, "one", &key_file), "passphrase --create");
    let before = std::fs::read(&key_file).unwrap();
    let line = passphrase_line(&server, "restorer", &key_file);

    // Refused, unchanged; also with a config pointing nowhere (no server round trip).
    refused_one_line(&create(&sealer, "two", &key_file), 1, &["already exists", "never written over"]);
    let nowhere = w.join("nowhere.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(&nowhere, std::fs::read_to_string(&sealer).unwrap().replace(&server.addr, &format!("127.0.0.1:{port}"))).unwrap();
    refused_one_line(&create(&nowhere, "two", &key_file), 1, &["already exists"]);
    // A dangling symlink in its place is refused too.
    let link = w.join("link.passphrase");
    std::os::unix::fs::symlink(w.join("does-not-exist"), &link).unwrap();
    refused_one_line(&create(&sealer, "three", &link), 1, &["already exists"]);
    assert_eq!(std::fs::read(&key_file).unwrap(), before);
    assert_eq!(passphrase_line(&server, "restorer", &key_file), line);

    // A sealed backup is not a passphrase: refused, its content neither printed nor named.
    let secret_backup = b"SECRET-PATIENT-DATA 1234567890 this is not a passphrase\n";
    let backup = w.join("backup.age");
    std::fs::write(&backup, seal(&server, "sealer", "default", "b1", secret_backup)).unwrap();
    let o = backup_hook(&restorer, &["passphrase", "--key-file", s(&backup)], b"");
    let e = refused_one_line(&o, 5, &["backup.age", "not a passphrase key file"]);
    assert!(!e.contains("SECRET"), "{e}");
    // Same for one that is exactly passphrase-sized but not base64 of 32 bytes.
    let almost = w.join("almost.age");
    std::fs::write(&almost, seal(&server, "sealer", "default", "b2", &[b'!'; 45])).unwrap();
    refused_one_line(&backup_hook(&restorer, &["passphrase", "--key-file", s(&almost)], b""), 5, &["not a passphrase key file"]);
    // Not sealed at all; missing; too large.
    let plain = w.join("plain.txt");
    std::fs::write(&plain, &line).unwrap();
    let e = refused_one_line(&backup_hook(&restorer, &["passphrase", "--key-file", s(&plain)], b""), 5, &["not a sealed backup"]);
    assert!(!e.contains(line.trim_end()), "{e}");
    refused_one_line(&backup_hook(&restorer, &["passphrase", "--key-file", s(&w.join("missing"))], b""), 6, &["missing"]);
    let big = w.join("big.age");
    std::fs::write(&big, sample(3, 100_000)).unwrap();
    refused_one_line(&backup_hook(&restorer, &["passphrase", "--key-file", s(&big)], b""), 5, &["larger than"]);

    // Usage errors: bad name, --create without --keyring, --recovery-identity with --create.
    refused_one_line(&create(&sealer, "bad name", &w.join("x")), 2, &["passphrase name \"bad name\""]);
    assert!(!w.join("x").exists());
    let o = backup_hook(&sealer, &["passphrase", "--create", "--name", "n", "--key-file", s(&w.join("y"))], b"");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = run("backup-hook", &["passphrase", "--key-file", s(&key_file), "--timeout", "0"], b"");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

// ---------------------------------------------------------------------------------------
// the document
// ---------------------------------------------------------------------------------------

/// docs/integrations.md quotes every tested recipe verbatim.
#[test]
fn docs_quote_the_tested_recipes() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/integrations.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap_or_else(|e| panic!("{}: {e}", doc_path.display()));
    for (name, recipe) in RECIPES {
        assert!(doc.contains(recipe), "docs/integrations.md does not quote the tested recipe {name} verbatim:\n{recipe}");
    }
}
