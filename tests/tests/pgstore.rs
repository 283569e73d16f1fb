//! The PostgreSQL store end to end: `kms-server dev --store-url` on a real PostgreSQL that
//! the test starts (tests/src/pg.rs), seal and unseal with backup-hook across a restart,
//! the audit export verifies; a store that cannot be reached, a wrong password and a newer
//! schema each refuse the start in one line that names it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kluis_tests::pg::Postgres;
use kluis_tests::*;

fn config(s: &Server) -> PathBuf {
    s.data_dir().join("server.toml")
}

/// `kms-server serve --config CFG` (which must refuse to start here).
fn serve(config: &Path) -> Output {
    Command::new(bin("kms-server")).args(["serve", "--config"]).arg(config).env("KLUIS_LOG", "error").output().unwrap()
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {text}");
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn export_verifies(server: &Server) -> String {
    export_verifies_through(&server.client("auditor"))
}

/// The audit export taken with the auditor config `auditor` verifies offline.
fn export_verifies_through(auditor: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = kmsctl(auditor, &["audit", "export"]);
    ok(&out, "audit export");
    let file = dir.path().join("audit.jsonl");
    std::fs::write(&file, &out.stdout).unwrap();
    let out = kmsctl(auditor, &["audit", "public-key"]);
    ok(&out, "audit public-key");
    let key = dir.path().join("audit.pub");
    std::fs::write(&key, &out.stdout).unwrap();
    let out = kmsctl_offline(&["audit", "verify", s(&file), "--public-key", s(&key)]);
    ok(&out, "audit verify");
    assert!(stdout(&out).contains("audit trail intact"), "{}", stdout(&out));
    std::fs::read_to_string(&file).unwrap()
}

#[test]
fn seal_and_unseal_on_postgres_across_a_restart_and_the_audit_export_verifies() {
    let pg = Postgres::start();
    pg.create_db("kluis");
    let mut server = Server::start_on_postgres(&pg.url("kluis"));
    // The store is the database, not a redb file next to the config.
    assert!(!server.data_dir().join("data/kluis.redb").exists());
    assert!(std::fs::read_to_string(config(&server)).unwrap().contains("backend = \"postgres\""));

    let data = sample(16, 300_000);
    let sealed = seal(&server, "sealer", "default", "ehr/2026-12-07/full", &data);
    let out = unseal(&server, "restorer", &sealed);
    ok(&out, "unseal");
    assert_eq!(out.stdout, data);
    assert_eq!(pg.psql("kluis", "SELECT count(*) FROM kluis_data_keys"), "1");

    server.restart();
    let out = unseal(&server, "restorer", &sealed);
    ok(&out, "unseal after restart");
    assert_eq!(out.stdout, data);
    let sealed2 = seal(&server, "sealer", "default", "ehr/2026-12-08/full", b"second");
    assert_eq!(unseal(&server, "restorer", &sealed2).stdout, b"second");

    // One chain over both runs, numbered by the database's chain head.
    let export = export_verifies(&server);
    assert!(export.contains("ehr/2026-12-07/full") && export.contains("ehr/2026-12-08/full"));
    let gapless = pg.psql(
        "kluis",
        "SELECT (SELECT count(*) FROM kluis_audit) = next_seq - 1 \
           AND (SELECT k FROM kluis_audit ORDER BY k LIMIT 1) = int8send(1) \
           AND (SELECT k FROM kluis_audit ORDER BY k DESC LIMIT 1) = int8send(next_seq - 1) \
         FROM kluis_audit_head",
    );
    assert_eq!(gapless, "t", "audit rows 1 ..= next_seq - 1, no gap");
}

#[test]
fn an_unreachable_store_is_named_in_one_line() {
    let pg = Postgres::start();
    pg.create_db("kluis");
    let mut server = Server::start_on_postgres(&pg.url("kluis"));
    server.kill9();
    let url = pg.url("kluis");
    let bad = url.replace("%2Fsock", "%2Fno-such-socket-dir");
    assert_ne!(url, bad);
    edit(&config(&server), &url, &bad);
    refused_one_line(&serve(&config(&server)), 1, &["PostgreSQL cannot be reached", &bad]);

    // kms-server dev names it too, and leaves no directory behind.
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("kluis");
    let out = Command::new(bin("kms-server"))
        .args(["dev", "--data-dir", s(&data_dir), "--listen", "127.0.0.1:0", "--store-url", &bad])
        .env("KLUIS_LOG", "error")
        .output()
        .unwrap();
    refused_one_line(&out, 1, &["PostgreSQL cannot be reached", &bad]);
    assert!(!data_dir.exists(), "nothing half-made: a second run would refuse the dev CA it left");
}

#[test]
fn a_url_with_a_password_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("kms-server"))
        .args(["dev", "--data-dir", s(&dir.path().join("kluis")), "--listen", "127.0.0.1:0"])
        .args(["--store-url", "postgresql://kluis:hunter2@%2Ftmp/kluis"])
        .env("KLUIS_LOG", "error")
        .output()
        .unwrap();
    let err = refused_one_line(&out, 1, &["[store] url carries a password"]);
    assert!(!err.contains("hunter2"), "{err}");
    assert!(!dir.path().join("kluis").exists(), "nothing made");
}

#[test]
fn a_missing_or_wrong_password_is_refused_and_the_right_password_file_serves() {
    let mut pg = Postgres::start();
    pg.create_db("kluis");
    let mut server = Server::start_on_postgres(&pg.url("kluis"));
    let sealed = seal(&server, "sealer", "default", "ehr/1", b"kept");
    server.kill9();
    pg.require_password("right horse battery");

    // No password where PostgreSQL asks for one.
    refused_one_line(&serve(&config(&server)), 1, &["PostgreSQL refused the login of user kluis", &pg.url("kluis")]);

    let wrong = server.dir.path().join("wrong.pw");
    std::fs::write(&wrong, "wrong staple\n").unwrap();
    edit(&config(&server), "[store]", &format!("[store]\npassword_file = \"{}\"", wrong.display()));
    let err = refused_one_line(&serve(&config(&server)), 1, &["PostgreSQL refused the login of user kluis", "password"]);
    assert!(!err.contains("wrong staple") && !err.contains("right horse"), "no password in the message: {err}");

    // The right one: the server starts (kms-server dev keeps the config's password_file).
    let right = server.dir.path().join("right.pw");
    std::fs::write(&right, "right horse battery\n").unwrap();
    edit(&config(&server), &wrong.display().to_string(), &right.display().to_string());
    server.start_again();
    assert_eq!(unseal(&server, "restorer", &sealed).stdout, b"kept");
}

#[test]
fn a_newer_schema_and_a_database_never_initialised_are_refused() {
    let pg = Postgres::start();
    pg.create_db("kluis");
    let mut server = Server::start_on_postgres(&pg.url("kluis"));
    server.kill9();
    pg.psql("kluis", "UPDATE kluis_schema SET format = 9");
    refused_one_line(&serve(&config(&server)), 1, &["has format 9, newer than this kms-server reads (format 2)", &pg.url("kluis")]);

    pg.create_db("empty");
    edit(&config(&server), &pg.url("kluis"), &pg.url("empty"));
    refused_one_line(&serve(&config(&server)), 1, &["does not exist; run `kms-server init` first", &pg.url("empty")]);
}

#[test]
fn two_replicas_on_one_database_serve_one_audit_chain() {
    let pg = Postgres::start();
    pg.create_db("kluis");
    let server = Server::start_on_postgres(&pg.url("kluis"));
    // The same config, another address: `serve --listen` overrides the config's `listen`.
    let replica = Replica::start(&config(&server));
    assert_ne!(replica.addr, server.addr);

    let a = seal(&server, "sealer", "default", "ehr/a", b"sealed on the first");
    let out = backup_hook(&replica.client(&server, "sealer"), &["seal", "--keyring", "default", "--backup-id", "ehr/b"], b"sealed on the second");
    ok(&out, "seal on the replica");
    let b = out.stdout;
    // Each unseals what the other sealed: one registry.
    let out = backup_hook(&replica.client(&server, "restorer"), &["unseal"], &a);
    ok(&out, "unseal on the replica");
    assert_eq!(out.stdout, b"sealed on the first");
    assert_eq!(unseal(&server, "restorer", &b).stdout, b"sealed on the second");

    // The entries of both replicas are one chain, numbered by the database: it verifies.
    let export = export_verifies(&server);
    assert!(export.contains("ehr/a") && export.contains("ehr/b"), "{export}");
}

/// What the sealing threads saw: each acknowledged file with its plaintext, each failure.
#[derive(Default)]
struct Load {
    acked: Vec<(Vec<u8>, Vec<u8>)>,
    failed: Vec<Output>,
}

/// Calls `done` on `load` until it holds, checking every few milliseconds; panics after
/// `cap` (generous: the condition depends on work, not on time).
fn wait_until(load: &std::sync::Mutex<Load>, cap: std::time::Duration, what: &str, done: impl Fn(&Load) -> bool) {
    let start = std::time::Instant::now();
    while !done(&load.lock().unwrap()) {
        assert!(start.elapsed() < cap, "waited {cap:?} for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The dev `sealer` config of `server` with `endpoints` (in that order) instead of its one endpoint.
fn sealer_with_endpoints(server: &Server, endpoints: [&str; 2]) -> PathBuf {
    let text = std::fs::read_to_string(server.client("sealer")).unwrap();
    let own = format!("endpoint = \"https://{}\"\n", server.addr);
    assert!(text.contains(&own), "{text}");
    let list = format!("endpoints = [\"https://{}\", \"https://{}\"]\n", endpoints[0], endpoints[1]);
    let p = server.dir.path().join("sealer-both.toml");
    std::fs::write(&p, text.replace(&own, &list)).unwrap();
    p
}

/// What [`seal_load`] returns: the record, the stop flag, the threads.
type SealLoad = (std::sync::Arc<std::sync::Mutex<Load>>, std::sync::Arc<std::sync::atomic::AtomicBool>, Vec<std::thread::JoinHandle<()>>);

/// `threads` closed-loop `backup-hook seal` loops through `sealer` (keyring `default`) until
/// the flag is set, recording each acknowledged seal (data, file) and each failure.
fn seal_load(sealer: &Path, threads: usize) -> SealLoad {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let load = Arc::new(Mutex::new(Load::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let handles = (0..threads)
        .map(|t| {
            let (load, stop, sealer) = (load.clone(), stop.clone(), sealer.to_owned());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let data = format!("thread {t} backup {i}").into_bytes();
                    let out = backup_hook(&sealer, &["seal", "--keyring", "default", "--backup-id", &format!("ehr/{t}/{i}")], &data);
                    let mut l = load.lock().unwrap();
                    if out.status.success() {
                        l.acked.push((data, out.stdout));
                    } else {
                        l.failed.push(out);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    (load, stop, handles)
}

#[test]
fn the_database_stopped_and_started_again_under_load() {
    use std::sync::atomic::Ordering;
    let mut pg = Postgres::start();
    pg.create_db("kluis");
    let server = Server::start_on_postgres(&pg.url("kluis"));
    assert_eq!(health_now(&server), SERVING);
    // No client-side retry: each failure during the outage is seen, not waited out.
    let sealer = server.client_with("sealer", "sealer-once.toml", "\n[retry]\ndeadline_secs = 0\n");
    let (load, stop, threads) = seal_load(&sealer, 4);
    let cap = std::time::Duration::from_secs(120);
    wait_until(&load, cap, "5 seals before the outage", |l| l.acked.len() >= 5);
    assert!(load.lock().unwrap().failed.is_empty(), "a seal failed with the database up");

    pg.stop();
    assert_eq!(health_now(&server), NOT_SERVING, "the database is down: the replica must not be chosen");
    let acked_before = load.lock().unwrap().acked.len();
    wait_until(&load, cap, "3 failed seals during the outage", |l| l.failed.len() >= 3);
    let failed: Vec<Output> = load.lock().unwrap().failed.clone();
    for out in &failed {
        // Unavailable (exit 3): the job may retry, or go to another replica; the store named.
        refused(out, 3, &["is unavailable", "the store cannot be reached, so nothing was done", "store postgresql://"]);
    }

    pg.start_again();
    // The same process serves again, without a restart.
    assert_eq!(health_now(&server), SERVING);
    wait_until(&load, cap, "5 seals after the outage", |l| l.acked.len() >= acked_before + 5);
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }

    // Every acknowledged file unseals, whenever it was sealed.
    let load = load.lock().unwrap();
    for (data, sealed) in load.acked.iter() {
        let out = unseal(&server, "restorer", sealed);
        ok(&out, "unseal of an acknowledged seal");
        assert_eq!(&out.stdout, data);
    }
    // The failed requests left the chain whole: it verifies, numbered without gaps.
    export_verifies(&server);
    let gapless = pg.psql(
        "kluis",
        "SELECT (SELECT count(*) FROM kluis_audit) = next_seq - 1 \
           AND (SELECT k FROM kluis_audit ORDER BY k DESC LIMIT 1) = int8send(next_seq - 1) \
         FROM kluis_audit_head",
    );
    assert_eq!(gapless, "t", "audit rows 1 ..= next_seq - 1, no gap");
}

/// The state epoch stored now, in hex (as the replicas log it).
fn stored_epoch(pg: &Postgres) -> String {
    pg.psql("kluis", "SELECT encode(v, 'hex') FROM kluis_meta WHERE k = convert_to('state_epoch', 'UTF8')")
}

#[test]
fn a_change_on_one_replica_is_enforced_by_the_other() {
    let pg = Postgres::start();
    pg.create_db("kluis");
    let mut server = Server::start_on_postgres(&pg.url("kluis"));
    let officer2 = server.add_officer("officer2");
    let officer = server.client("officer");
    let mut b = Replica::start(&config(&server));
    let restorer_b = b.client(&server, "restorer");
    let sealer_b = b.client(&server, "sealer");
    let old = seal(&server, "sealer", "default", "ehr/v1", b"under version 1");

    // A version made on A unwraps on B at once (B checks the epoch before each unwrap).
    ok(&kmsctl(&officer, &["keyring", "rotate", "default"]), "rotate on A");
    let new = seal(&server, "sealer", "default", "ehr/v2", b"under version 2");
    let out = backup_hook(&restorer_b, &["unseal"], &new);
    ok(&out, "unseal on B of a file sealed on A under the version A just made");
    assert_eq!(out.stdout, b"under version 2");

    // A retirement approved on A is refused by B at once.
    assert_eq!(backup_hook(&restorer_b, &["unseal"], &old).stdout, b"under version 1");
    let out = kmsctl(&officer, &["keyring", "retire", "default", "--below-version", "2", "--force"]);
    ok(&out, "retire request on A");
    ok(&kmsctl(&officer2, &["approve", &approval_id(&out)]), "approve on A");
    refused(&backup_hook(&restorer_b, &["unseal"], &old), 4, &["version 1 is retired"]);

    // A grant approved on A applies on B once B has polled; revoked on A, B refuses again.
    refused(&backup_hook(&sealer_b, &["unseal"], &new), 4, &["may not UnwrapDataKey"]);
    let out = kmsctl(&officer, &["keyring", "grant", "default", "--principal", "sealer", "--role", "restorer"]);
    ok(&out, "grant request on A");
    ok(&kmsctl(&officer2, &["approve", &approval_id(&out)]), "approve on A");
    let epoch = stored_epoch(&pg);
    b.wait_for_line(&["runtime grants in force", &epoch]);
    let out = backup_hook(&sealer_b, &["unseal"], &new);
    ok(&out, "the grant made on A works on B");
    ok(&kmsctl(&officer, &["keyring", "revoke", "default", "--principal", "sealer", "--role", "restorer"]), "revoke on A");
    let epoch = stored_epoch(&pg);
    b.wait_for_line(&["runtime grants in force", &epoch]);
    refused(&backup_hook(&sealer_b, &["unseal"], &new), 4, &["may not UnwrapDataKey"]);

    // B did not restart, and what both did is one chain.
    assert!(b.log().contains("state reloaded"), "{}", b.log());
    export_verifies(&server);
}

#[test]
fn a_replica_killed_during_concurrent_seals_fails_no_seal() {
    use std::sync::atomic::Ordering;
    let pg = Postgres::start();
    pg.create_db("kluis");
    let server = Server::start_on_postgres(&pg.url("kluis"));
    let mut b = Replica::start(&config(&server));
    // Both replicas, the one to be killed first; the default retry policy.
    let sealer = sealer_with_endpoints(&server, [&b.addr, &server.addr]);

    let (load, stop, threads) = seal_load(&sealer, 4);
    let cap = std::time::Duration::from_secs(120);
    wait_until(&load, cap, "10 seals through the first replica", |l| l.acked.len() >= 10 || !l.failed.is_empty());
    b.kill9();
    let acked_before = load.lock().unwrap().acked.len();
    wait_until(&load, cap, "10 seals after the kill", |l| l.acked.len() >= acked_before + 10 || !l.failed.is_empty());
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let load = load.lock().unwrap();
    if let Some(out) = load.failed.first() {
        panic!("{} seal(s) failed although one replica was up; the first: exit {:?}: {}", load.failed.len(), out.status.code(), stderr(out));
    }
    // Every acknowledged file unseals through the survivor; one chain, intact.
    for (data, sealed) in load.acked.iter() {
        let out = unseal(&server, "restorer", sealed);
        ok(&out, "unseal through the survivor");
        assert_eq!(&out.stdout, data);
    }
    assert!(load.acked.len() >= acked_before + 10);
    export_verifies(&server);
}

#[test]
fn officers_rotating_on_both_replicas_at_once_lose_no_version() {
    let pg = Postgres::start();
    pg.create_db("kluis");
    let server = Server::start_on_postgres(&pg.url("kluis"));
    let b = Replica::start(&config(&server));
    let configs = [server.client("officer"), b.client(&server, "officer")];
    // Eight rotations at once, four through each replica. Each either is made (on the state
    // the others left) or is refused whole as a concurrent change (exit 3, run it again).
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let cfg = configs[i % 2].clone();
            std::thread::spawn(move || kmsctl(&cfg, &["keyring", "rotate", "default"]))
        })
        .collect();
    let mut made = 0;
    for t in threads {
        let out = t.join().unwrap();
        if out.status.success() {
            made += 1;
        } else {
            refused(&out, 3, &["another replica changed", "nothing was done: run it again"]);
        }
    }
    assert!(made >= 1);
    // Every rotation made is a version; none overwrote another.
    let out = server.kmsctl("auditor", &["keyring", "show", "default", "--json"]);
    ok(&out, "keyring show");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["versions"].as_array().unwrap().len(), 1 + made, "{v}");
    assert_eq!(v["current_version"].as_u64().unwrap(), 1 + made as u64, "{v}");
    // Both replicas seal under the newest version and unwrap each other's files.
    let a = seal(&server, "sealer", "default", "ehr/a", b"on A");
    let out = backup_hook(&b.client(&server, "sealer"), &["seal", "--keyring", "default", "--backup-id", "ehr/b"], b"on B");
    ok(&out, "seal on B");
    assert_eq!(backup_hook(&b.client(&server, "restorer"), &["unseal"], &a).stdout, b"on A");
    assert_eq!(unseal(&server, "restorer", &out.stdout).stdout, b"on B");
    export_verifies(&server);
}

/// The key id named in a sealed file's Kluis stanza.
fn key_id(sealed: &[u8]) -> String {
    let head = header(sealed);
    let line = head.lines().find(|l| l.starts_with("-> kluis ")).expect("kluis stanza");
    line.split_whitespace().nth(3).unwrap().to_owned()
}

/// The key ids the audit export (through `auditor`'s config) says were destroyed at the
/// end of their retention, one per entry (a key destroyed twice would be there twice).
fn expired_in_audit(auditor: &Path) -> Vec<String> {
    let out = kmsctl(auditor, &["audit", "export"]);
    ok(&out, "audit export");
    let mut ids: Vec<String> = stdout(&out)
        .lines()
        .filter(|l| l.contains("\"DestroyKey\"") && l.contains("end of its retention"))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["key_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// The scheduled work (here the expiry sweep) runs on the one replica holding the
/// maintenance lease: the other, ticking every second, leaves due work alone while the
/// holder lives; kill -9 the holder and the survivor takes the lease over and does the
/// work, each key destroyed exactly once; the restarted replica then follows the
/// survivor. Expiry time moves through the test clock file; the lease runs on the
/// replicas' monotonic clocks (3 s lease).
#[test]
fn scheduled_work_runs_on_one_replica_and_moves_to_the_survivor_when_its_holder_is_killed() {
    let pg = Postgres::start();
    pg.create_db("kluis");
    let mut a = Server::start_on_postgres(&pg.url("kluis"));
    let clock = a.dir.path().join("clock");
    let t0 = time::OffsetDateTime::now_utc().unix_timestamp();
    std::fs::write(&clock, t0.to_string()).unwrap();
    a.env.push(("KLUIS_TEST_CLOCK_FILE".into(), s(&clock).into()));
    a.env.push(("KLUIS_LOG".into(), "info".into()));
    // A does its scheduled work at start and hourly; B, from a copy of the config, every second.
    a.set_top_level("maintenance_interval_secs = 3600\nmaintenance_lease_secs = 3\n");
    let b_config = a.dir.path().join("server-b.toml");
    let text = std::fs::read_to_string(config(&a)).unwrap();
    std::fs::write(&b_config, text.replacen("maintenance_interval_secs = 3600", "maintenance_interval_secs = 1", 1)).unwrap();
    // add_officer restarts A: the first start's process was killed holding the lease, so
    // the restarted one takes it over a lease time later.
    let officer2 = a.add_officer("officer2");
    a.wait_for_line(&["maintenance lease taken"]);
    let env = [("KLUIS_TEST_CLOCK_FILE", s(&clock)), ("KLUIS_LOG", "info,kms_server::server=debug")];
    let mut b = Replica::start_with_env(&b_config, &env);
    b.wait_for_line(&["scheduled work runs on the replica holding the maintenance lease", &a.addr]);
    let (sealer_b, auditor_b) = (b.client(&a, "sealer"), b.client(&a, "auditor"));
    ok(&a.kmsctl("officer", &["keyring", "create", "short", "--retention-days", "1"]), "create keyring");
    let out = a.kmsctl("officer", &["keyring", "grant", "short", "--principal", "sealer", "--role", "sealer"]);
    ok(&kmsctl(&officer2, &["approve", &approval_id(&out)]), "approve the grant");
    b.wait_for_line(&["runtime grants in force", &stored_epoch(&pg)]);

    // Keys issued on both replicas expire. B's ticks after that leave them to A.
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(key_id(&seal(&a, "sealer", "short", &format!("a/{i}"), b"on A")));
        let out = backup_hook(&sealer_b, &["seal", "--keyring", "short", "--backup-id", &format!("b/{i}")], b"on B");
        ok(&out, "seal on B");
        ids.push(key_id(&out.stdout));
    }
    let left = "scheduled work left to the holder of the maintenance lease";
    let ticks = |r: &Replica| r.log().lines().filter(|l| l.contains(left)).count();
    let before = ticks(&b);
    std::fs::write(&clock, (t0 + 2 * 86_400).to_string()).unwrap();
    // Two more ticks: at least one began after the clock moved.
    while ticks(&b) < before + 2 {
        b.wait_for_line(&[left]);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(expired_in_audit(&auditor_b), Vec::<String>::new(), "B swept while A held the lease:\n{}", b.log());
    assert!(!b.log().contains("maintenance done"), "{}", b.log());

    // A dies without releasing the lease: B takes it over and does the work.
    a.kill9();
    b.wait_for_line(&["maintenance lease taken over", &a.addr]);
    b.wait_for_line(&["scheduled maintenance done", "actions=6"]);
    ids.sort();
    assert_eq!(expired_in_audit(&auditor_b), ids, "each expired key destroyed once");

    // A comes back and follows B; B's further work is B's alone.
    a.start_again();
    a.wait_for_line(&["scheduled work runs on the replica holding the maintenance lease", &b.addr]);
    let mut later = Vec::new();
    for i in 0..3 {
        let out = backup_hook(&sealer_b, &["seal", "--keyring", "short", "--backup-id", &format!("b/later/{i}")], b"on B");
        ok(&out, "seal on B");
        later.push(key_id(&out.stdout));
    }
    std::fs::write(&clock, (t0 + 4 * 86_400).to_string()).unwrap();
    b.wait_for_line(&["scheduled maintenance done", "actions=3"]);
    ids.extend(later);
    ids.sort();
    assert_eq!(expired_in_audit(&auditor_b), ids, "each expired key destroyed once, by the replica holding the lease");
    assert!(!a.log().contains("maintenance done"), "A worked while B held the lease:\n{}", a.log());
    // The chain both replicas wrote verifies.
    export_verifies_through(&auditor_b);
}

/// `kms-server migrate-store` (stderr on failure; exit code and stderr returned).
fn migrate_store(from: &Path, to: &Path) -> Output {
    Command::new(bin("kms-server")).args(["migrate-store", "--from"]).arg(from).arg("--to").arg(to).env("KLUIS_LOG", "error").output().unwrap()
}

/// The entry lines of an audit export (each with its hash), without the signed head.
fn entry_lines(export: &str) -> Vec<String> {
    export.lines().filter(|l| l.starts_with("{\"seq\":")).map(str::to_owned).collect()
}

/// A dev server's store moves to PostgreSQL and back with `migrate-store`: every file
/// sealed before unseals after each move, the audit chain is the same entries and still
/// verifies end to end, the counters, the pending destruction and the KMIP objects come
/// along; a target that is not empty is refused in one line naming it, and nothing is
/// written to it.
#[test]
fn a_store_moves_from_redb_to_postgres_and_back_and_everything_still_opens_and_verifies() {
    let mut server = Server::start();
    let officer = server.client("officer");
    ok(&kmsctl(&officer, &["keyring", "create", "ehr", "--retention-days", "30"]), "create keyring");
    let sealed: Vec<(Vec<u8>, Vec<u8>)> = (0..3)
        .map(|i| {
            let data = format!("backup {i} before any move").into_bytes();
            (data.clone(), seal(&server, "sealer", "default", &format!("before/{i}"), &data))
        })
        .collect();
    ok(&kmsctl(&officer, &["keyring", "rotate", "default"]), "rotate");
    let destroy = kmsctl(&officer, &["key", "destroy", &key_id(&sealed[2].1)]);
    ok(&destroy, "request a destruction (dual control: pending)");
    let before = entry_lines(&export_verifies(&server));
    let destructions = stdout(&server.kmsctl("auditor", &["destruction", "list", "--json"]));
    server.kill9();
    // A KMIP object, put into the stopped server's store as the KMIP layer will.
    let (object_id, object) = ([0x4b_u8; 16], b"attributes and sealed key material ".repeat(40));
    {
        let path = kms_server::config::ServerConfig::load(&config(&server)).unwrap().store_path();
        let store = kms_server::store::redb::RedbStore::open(&path, kms_server::audit::AuditChain::new()).unwrap();
        let mut g = kms_server::store::WriteGroup::default();
        g.push(kms_server::store::Op::Put { table: kms_server::store::Table::KmipObjects, key: object_id.to_vec(), value: object.clone() });
        kms_server::store::Store::commit_blocking(&store, g).unwrap();
    }

    // redb -> PostgreSQL.
    let pg = Postgres::start();
    pg.create_db("kluis");
    let redb_cfg = config(&server);
    let text = std::fs::read_to_string(&redb_cfg).unwrap();
    assert!(!text.contains("[store]"), "{text}");
    let pg_cfg = server.data_dir().join("pg.toml");
    std::fs::write(&pg_cfg, format!("{text}\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\n", pg.url("kluis"))).unwrap();
    let out = migrate_store(&redb_cfg, &pg_cfg);
    ok(&out, "migrate-store redb -> postgres");
    let report = stderr(&out);
    assert!(report.contains("matches the source row for row"), "{report}");
    assert!(report.lines().any(|l| l.trim_start().starts_with("DataKeys") && l.contains(" 3 rows")), "{report}");
    assert!(report.lines().any(|l| l.trim_start().starts_with("KeySecrets") && l.contains(" 3 rows")), "{report}");
    assert!(report.lines().any(|l| l.trim_start().starts_with("KmipObjects") && l.contains(" 1 rows")), "{report}");
    let in_pg = pg.psql("kluis", "SELECT encode(k, 'hex') || ' ' || encode(v, 'hex') FROM kluis_kmip_objects");
    assert_eq!(in_pg, format!("{} {}", hex::encode(object_id), hex::encode(&object)));
    // Again into the same database: refused, in one line, and the copy is untouched.
    let rows = pg.psql("kluis", "SELECT count(*) FROM kluis_audit");
    refused_one_line(&migrate_store(&redb_cfg, &pg_cfg), 1, &["target store", "empty store only"]);
    assert_eq!(pg.psql("kluis", "SELECT count(*) FROM kluis_audit"), rows);

    // Served from PostgreSQL: everything opens, the history is the same and goes on.
    let mut on_pg = Replica::start(&pg_cfg);
    let restorer = on_pg.client(&server, "restorer");
    for (data, file) in &sealed {
        let out = backup_hook(&restorer, &["unseal"], file);
        ok(&out, "unseal after the move to PostgreSQL");
        assert_eq!(&out.stdout, data);
    }
    assert_eq!(stdout(&kmsctl(&on_pg.client(&server, "auditor"), &["destruction", "list", "--json"])), destructions);
    let data = b"sealed on PostgreSQL".to_vec();
    let out = backup_hook(&on_pg.client(&server, "sealer"), &["seal", "--keyring", "default", "--backup-id", "on-pg"], &data);
    ok(&out, "seal on PostgreSQL");
    let on_pg_file = out.stdout;
    let after = entry_lines(&export_verifies_through(&on_pg.client(&server, "auditor")));
    assert!(after.len() > before.len());
    assert_eq!(&after[..before.len()], &before[..], "the moved chain holds the same entries");
    on_pg.kill9();

    // PostgreSQL -> a new redb file.
    let back_dir = server.dir.path().join("back");
    let back_cfg = server.data_dir().join("back.toml");
    let back_text: String = text
        .lines()
        .map(|l| if l.starts_with("data_dir = ") { format!("data_dir = \"{}\"", back_dir.display()) } else { l.to_owned() })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&back_cfg, back_text + "\n").unwrap();
    std::fs::create_dir_all(&back_dir).unwrap();
    ok(&migrate_store(&pg_cfg, &back_cfg), "migrate-store postgres -> redb");
    refused_one_line(&migrate_store(&pg_cfg, &back_cfg), 1, &["target store", "already exists"]);
    let mut back = Replica::start(&back_cfg);
    let restorer = back.client(&server, "restorer");
    for (data, file) in sealed.iter().chain([(data, on_pg_file)].iter()) {
        let out = backup_hook(&restorer, &["unseal"], file);
        ok(&out, "unseal after the move back to redb");
        assert_eq!(&out.stdout, data);
    }
    let back_entries = entry_lines(&export_verifies_through(&back.client(&server, "auditor")));
    assert_eq!(&back_entries[..after.len()], &after[..], "the chain moved back holds the same entries");
    back.kill9();
    let path = kms_server::config::ServerConfig::load(&back_cfg).unwrap().store_path();
    let store = kms_server::store::redb::RedbStore::open(&path, kms_server::audit::AuditChain::new()).unwrap();
    let moved_back = kms_server::store::Store::get(&store, kms_server::store::Table::KmipObjects, &object_id).unwrap();
    assert_eq!(moved_back, Some(object), "the KMIP object moved back");
}

/// PostgreSQL's own failover: a primary and a synchronous streaming standby, two Kluis
/// replicas on the multi-host URL (`target_session_attrs=read-write`). kill -9 the primary
/// under issuance load, promote the standby: the replicas reconnect to it without a
/// restart, seals succeed again, and every key a client was given (every acknowledged
/// seal, before and after the loss) unwraps from the promoted standby. Seals that failed
/// during the gap failed cleanly (UNAVAILABLE), they were not acknowledged.
#[test]
fn the_primary_killed_under_load_and_the_standby_promoted_loses_no_acknowledged_key() {
    use std::sync::atomic::Ordering;
    let mut primary = Postgres::start();
    primary.create_db("kluis");
    let standby = Postgres::standby_of(&primary);
    primary.make_standby_synchronous();
    let server = Server::start_on_postgres(&primary.url_with(&[&standby], "kluis"));
    let b = Replica::start(&config(&server));
    let sealer = sealer_with_endpoints(&server, [&server.addr, &b.addr]);

    let (load, stop, threads) = seal_load(&sealer, 4);
    let cap = std::time::Duration::from_secs(180);
    let started = std::time::Instant::now();
    wait_until(&load, cap, "20 seals on the primary", |l| l.acked.len() >= 20);
    eprintln!("failover: 20 seals after {:?}", started.elapsed());
    let killed = std::time::Instant::now();
    primary.kill9();
    standby.promote();
    let promoted = killed.elapsed();
    let acked_at_promotion = load.lock().unwrap().acked.len();
    wait_until(&load, cap, "a seal after the promotion", |l| l.acked.len() > acked_at_promotion);
    let first = killed.elapsed();
    wait_until(&load, cap, "20 seals after the promotion", |l| l.acked.len() >= acked_at_promotion + 20);
    eprintln!(
        "failover: promoted {promoted:?} after the kill, first seal acknowledged {first:?} after it, {} failed meanwhile",
        load.lock().unwrap().failed.len()
    );
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let load = load.lock().unwrap();
    eprintln!("failover: {} seals acknowledged, {:?} since the start of the load", load.acked.len(), started.elapsed());
    for out in &load.failed {
        // A failure while no primary took writes says so and names no other cause.
        assert_eq!(out.status.code(), Some(3), "a seal failed otherwise than unavailable: {}", stderr(out));
    }
    // Every acknowledged seal unwraps from the promoted standby, through either replica.
    let restorer_b = b.client(&server, "restorer");
    for (n, (data, sealed)) in load.acked.iter().enumerate() {
        let out = if n % 2 == 0 { unseal(&server, "restorer", sealed) } else { backup_hook(&restorer_b, &["unseal"], sealed) };
        ok(&out, "unseal of an acknowledged seal after the failover");
        assert_eq!(&out.stdout, data);
    }
    assert_eq!(standby.psql("kluis", "SELECT pg_is_in_recovery()"), "f");
    export_verifies(&server);
}

/// A CA (`NAME-ca.pem`) and, signed by it, a server certificate for 127.0.0.1
/// (`NAME-server.pem`, `NAME-server.key`), made with the real `openssl`.
fn openssl_ca_and_server(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (Debian package openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (ca, ca_key, crt, key, csr, ext) = (p("ca.pem"), p("ca.key"), p("server.pem"), p("server.key"), p("server.csr"), p("ext.cnf"));
    run(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", &format!("/CN={name} test CA"), "-keyout", s(&ca_key), "-out", s(&ca)]);
    run(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", s(&key), "-out", s(&csr)]);
    std::fs::write(&ext, "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n").unwrap();
    run(&["x509", "-req", "-in", s(&csr), "-CA", s(&ca), "-CAkey", s(&ca_key), "-CAcreateserial", "-days", "2", "-extfile", s(&ext), "-out", s(&crt)]);
    (ca, crt, key)
}

/// `kms-server serve --config CFG`, which must refuse to start: its output once it exits.
/// If it starts listening instead, it is killed and the test fails (rather than waiting
/// on a server that serves).
fn refused_start(config: &Path) -> Output {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(bin("kms-server"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", "127.0.0.1:0"])
        .env("KLUIS_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.contains("listening on") {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("kms-server started with {} although it should have refused: {}", config.display(), stderr(&out));
        }
    }
    child.wait_with_output().unwrap()
}

/// `[store] ca_file`: Kluis reaches PostgreSQL over TLS (the cluster takes TCP connections
/// over TLS only) and checks the server's certificate against the file: the right CA
/// serves, another CA's certificate refuses the start in one line, and a server that
/// offers no TLS at all is refused too, never used in plain text.
#[test]
fn a_store_over_tls_checks_the_servers_certificate_and_never_falls_back_to_plain() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, crt, key) = openssl_ca_and_server(dir.path(), "db");
    let (other_ca, _, _) = openssl_ca_and_server(dir.path(), "other");
    let mut pg = Postgres::start_tcp_tls(&crt, &key);
    pg.create_db("kluis");
    // A dev server's store, moved to the database over TLS.
    let mut server = Server::start();
    let sealed = seal(&server, "sealer", "default", "before", b"sealed before the move");
    server.kill9();
    let text = std::fs::read_to_string(config(&server)).unwrap();
    let with_ca = |file: &str, ca: &Path| {
        let p = server.data_dir().join(file);
        std::fs::write(&p, format!("{text}\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\nca_file = \"{}\"\n", pg.tcp_url("kluis"), ca.display())).unwrap();
        p
    };
    let tls_cfg = with_ca("tls.toml", &ca);
    ok(&migrate_store(&config(&server), &tls_cfg), "migrate-store over TLS");
    let replica = Replica::start(&tls_cfg);
    let out = backup_hook(&replica.client(&server, "restorer"), &["unseal"], &sealed);
    ok(&out, "unseal through a replica on the store over TLS");
    assert_eq!(out.stdout, b"sealed before the move");
    assert!(pg.psql("postgres", "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND application_name = 'kluis'") != "0");
    drop(replica);

    // Another CA: the server's certificate is refused, the start with it.
    let wrong = with_ca("wrong-ca.toml", &other_ca);
    let out = refused_start(&wrong);
    refused_one_line(&out, 1, &["127.0.0.1"]);
    assert!(stderr(&out).to_lowercase().contains("certificate"), "{}", stderr(&out));

    // A server that offers no TLS: refused, not used in plain text.
    pg.without_tls();
    let out = refused_start(&tls_cfg);
    refused_one_line(&out, 1, &["127.0.0.1"]);
    assert!(stderr(&out).contains("TLS") || stderr(&out).to_lowercase().contains("ssl"), "{}", stderr(&out));
    // The same URL without a CA file connects in plain text: the refusal above was the CA file's.
    let plain = server.data_dir().join("plain.toml");
    std::fs::write(&plain, format!("{text}\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\n", pg.tcp_url("kluis"))).unwrap();
    let replica = Replica::start(&plain);
    ok(&backup_hook(&replica.client(&server, "restorer"), &["unseal"], &sealed), "unseal in plain text without a CA file");
    // sslmode=disable with a CA file is a contradiction, named.
    std::fs::write(&wrong, format!("{text}\n[store]\nbackend = \"postgres\"\nurl = \"{}?sslmode=disable\"\nca_file = \"{}\"\n", pg.tcp_url("kluis"), ca.display())).unwrap();
    refused_one_line(&refused_start(&wrong), 1, &["sslmode=disable", "ca_file"]);
}

/// A database that belongs to another Kluis (made with another master key) refuses the
/// start in one line that says the master key does not open it, and is left as it was.
#[test]
fn a_database_of_another_kluis_is_refused_naming_the_master_key() {
    let pg = Postgres::start();
    pg.create_db("kluis");
    let mut theirs = Server::start_on_postgres(&pg.url("kluis"));
    seal(&theirs, "sealer", "default", "theirs", b"their backup");
    theirs.kill9();
    let before = pg.psql("kluis", "SELECT count(*) FROM kluis_audit");
    let mut ours = Server::start();
    ours.kill9();
    let text = std::fs::read_to_string(config(&ours)).unwrap();
    let cfg = ours.data_dir().join("theirs.toml");
    std::fs::write(&cfg, format!("{text}\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\n", pg.url("kluis"))).unwrap();
    refused_one_line(&refused_start(&cfg), 1, &["the master key does not open this store"]);
    assert_eq!(pg.psql("kluis", "SELECT count(*) FROM kluis_audit"), before, "nothing written to their database");
}

/// Dual control across replicas: a request made on one replica is approved on the other
/// by a second officer (the requester's own approval refused there too), carried out once,
/// and enforced by both.
#[test]
fn dual_control_spans_replicas_request_on_one_approve_on_the_other() {
    let pg = Postgres::start();
    pg.create_db("kluis");
    let mut server = Server::start_on_postgres(&pg.url("kluis"));
    let officer2 = server.add_officer("officer2");
    let b = Replica::start(&config(&server));
    let on_b = |cfg: &Path, name: &str| {
        let p = server.dir.path().join(format!("{name}-on-b.toml"));
        std::fs::write(&p, std::fs::read_to_string(cfg).unwrap().replace(&server.addr, &b.addr)).unwrap();
        p
    };
    let (officer_b, officer2_b) = (on_b(&server.client("officer"), "officer"), on_b(&officer2, "officer2"));
    let sealed = seal(&server, "sealer", "default", "ehr/1", b"a backup");
    let sealer_b = b.client(&server, "sealer");
    refused(&backup_hook(&sealer_b, &["unseal"], &sealed), 4, &["may not UnwrapDataKey"]);

    // Requested on A; the requester cannot approve it on B; officer2 approves it on B.
    let out = server.kmsctl("officer", &["keyring", "grant", "default", "--principal", "sealer", "--role", "restorer"]);
    ok(&out, "grant request on A");
    let id = approval_id(&out);
    refused(&kmsctl(&officer_b, &["approve", &id]), 4, &["a second, different officer must approve it"]);
    let out = kmsctl(&officer2_b, &["approve", &id]);
    ok(&out, "approve on B");
    assert!(stdout(&out).contains("approved and carried out"), "{}", stdout(&out));
    // Once: approving it again, on A, is refused.
    let again = kmsctl(&officer2, &["approve", &id]);
    assert!(!again.status.success(), "approved twice: {}", stdout(&again));

    // B carried it out and applies it at once (A at its next state poll, within 0.5 s).
    let out = backup_hook(&sealer_b, &["unseal"], &sealed);
    ok(&out, "the grant approved on B works on B");
    assert_eq!(out.stdout, b"a backup");
    export_verifies(&server);
}
