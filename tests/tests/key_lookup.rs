//! Officers and auditors find data keys by backup id (`kmsctl key find`, FindDataKeys):
//! newest first, filtered to the keyrings the caller's grants cover, at most 100.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use kluis_proto::v1 as pb;
use kluis_tests::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A dev server on a clock file (so the seals get distinct times), with keyring `pacs`
/// and an auditor `pacs-auditor` granted on `pacs` only.
struct World {
    server: Server,
    clock: PathBuf,
    t0: i64,
    pacs_auditor: PathBuf,
}

impl World {
    fn new() -> Self {
        let mut server = Server::start();
        let clock = server.dir.path().join("clock");
        let t0 = time::OffsetDateTime::now_utc().unix_timestamp();
        std::fs::write(&clock, t0.to_string()).unwrap();
        server.env.push(("KLUIS_TEST_CLOCK_FILE".into(), s(&clock).into()));
        ok(&server.kmsctl("officer", &["keyring", "create", "pacs"]), "keyring create pacs");
        let pki = server.data_dir().join("pki");
        let out_dir = server.dir.path().join("issued");
        ok(&kmsctl_offline(&["cert", "issue", "--ca-dir", s(&pki), "--name", "pacs-auditor", "--out", s(&out_dir)]), "cert issue");
        let cfg = server.data_dir().join("server.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, text + "\n[[grant]]\nprincipal = \"pacs-auditor\"\nroles = [\"auditor\"]\nkeyrings = [\"pacs\"]\n").unwrap();
        server.restart();
        let pacs_auditor = client_config(&server, "pacs-auditor", &out_dir.join("pacs-auditor.pem"), &out_dir.join("pacs-auditor.key"));
        World { server, clock, t0, pacs_auditor }
    }

    fn set_time(&self, t: i64) {
        std::fs::write(&self.clock, t.to_string()).unwrap();
    }

    /// Seals a backup at time `t` (as `sealer` on `default`, as `dev` elsewhere); returns
    /// the key id `seal` printed.
    fn seal_at(&self, t: i64, keyring: &str, backup_id: &str) -> String {
        self.set_time(t);
        let who = if keyring == "default" { "sealer" } else { "dev" };
        let out = self.server.backup_hook(who, &["seal", "--keyring", keyring, "--backup-id", backup_id], b"backup");
        ok(&out, "seal");
        let err = stderr(&out);
        let id = err.split("key id ").nth(1).and_then(|r| r.split(',').next()).unwrap_or_else(|| panic!("no key id in {err}"));
        assert_eq!(id.len(), 32, "{err}");
        id.to_owned()
    }
}

/// The officer's client config with another certificate and key.
fn client_config(server: &Server, name: &str, cert: &Path, key: &Path) -> PathBuf {
    let text = std::fs::read_to_string(server.client("officer")).unwrap();
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("cert =") {
                format!("cert = {:?}", s(cert))
            } else if l.starts_with("key =") {
                format!("key = {:?}", s(key))
            } else {
                l.to_owned()
            }
        })
        .collect();
    let p = server.dir.path().join(format!("{name}.toml"));
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// `kmsctl key find ... --json` as `cfg`: the key ids found, newest first, and `truncated`.
fn find_json(cfg: &Path, args: &[&str]) -> (Vec<String>, bool) {
    let mut all = vec!["key", "find", "--json"];
    all.extend_from_slice(args);
    let out = kmsctl(cfg, &all);
    ok(&out, "key find --json");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys = v["keys"].as_array().unwrap();
    let ids = keys.iter().map(|k| k["key_id"].as_str().unwrap().to_owned()).collect();
    (ids, v["truncated"].as_bool().unwrap())
}

#[test]
fn officers_and_auditors_find_the_keys_of_a_backup_id_newest_first_within_their_grants() {
    let w = World::new();
    let t0 = w.t0;
    let first = w.seal_at(t0, "default", "nightly");
    let on_pacs = w.seal_at(t0 + 60, "pacs", "nightly");
    let other = w.seal_at(t0 + 120, "default", "weekly");
    let second = w.seal_at(t0 + 180, "default", "nightly");
    let officer = w.server.client("officer");
    let auditor = w.server.client("auditor");

    // Officer and auditor: every keyring, newest first, the other backup id left out.
    for cfg in [&officer, &auditor] {
        let (ids, truncated) = find_json(cfg, &["--backup-id", "nightly"]);
        assert_eq!(ids, [second.clone(), on_pacs.clone(), first.clone()]);
        assert!(!truncated);
    }
    let (ids, _) = find_json(&officer, &["--backup-id", "weekly"]);
    assert_eq!(ids, std::slice::from_ref(&other));

    // The text form: `key show`'s block per key, in the same order.
    let out = kmsctl(&auditor, &["key", "find", "--backup-id", "nightly"]);
    ok(&out, "key find");
    let text = stdout(&out);
    let at = |id: &str| text.find(&format!("key id:     {id}\n")).unwrap_or_else(|| panic!("{id} in {text}"));
    assert!(at(&second) < at(&on_pacs) && at(&on_pacs) < at(&first), "{text}");
    assert_eq!(text.matches("backup id:  nightly\n").count(), 3, "{text}");
    assert!(text.contains("keyring:    pacs (version 1)") && text.contains("issued:     ") && text.contains("to sealer"), "{text}");
    assert!(!text.contains(&other), "{text}");
    let show = stdout(&w.server.kmsctl("officer", &["key", "show", &second]));
    assert!(text.starts_with(&show), "the same block as key show:\n{show}\n---\n{text}");

    // A keyring filter.
    let (ids, _) = find_json(&officer, &["--backup-id", "nightly", "--keyring", "default"]);
    assert_eq!(ids, [second.clone(), first.clone()]);
    let (ids, _) = find_json(&auditor, &["--backup-id", "nightly", "--keyring", "pacs"]);
    assert_eq!(ids, std::slice::from_ref(&on_pacs));

    // An auditor of `pacs` only sees `pacs`' keys, and is refused on `default`.
    let (ids, _) = find_json(&w.pacs_auditor, &["--backup-id", "nightly"]);
    assert_eq!(ids, std::slice::from_ref(&on_pacs));
    let (ids, _) = find_json(&w.pacs_auditor, &["--backup-id", "weekly"]);
    assert!(ids.is_empty());
    let out = kmsctl(&w.pacs_auditor, &["key", "find", "--backup-id", "nightly", "--keyring", "default"]);
    refused_one_line(&out, 4, &["\"pacs-auditor\" may not FindDataKeys on keyring \"default\""]);

    // Nothing found is an answer, not an error.
    let out = kmsctl(&officer, &["key", "find", "--backup-id", "never-sealed"]);
    ok(&out, "key find never-sealed");
    assert_eq!(stdout(&out), "no data key found for backup id never-sealed in the keyrings you may see\n");

    // Sealer and restorer may not look keys up.
    for who in ["sealer", "restorer"] {
        let out = w.server.kmsctl(who, &["key", "find", "--backup-id", "nightly"]);
        refused_one_line(&out, 4, &[&format!("principal {who:?} may not FindDataKeys")]);
        let out = w.server.kmsctl(who, &["key", "find", "--backup-id", "nightly", "--keyring", "default"]);
        refused_one_line(&out, 4, &[&format!("principal {who:?} may not FindDataKeys on keyring \"default\"")]);
    }

    // A bad backup id or keyring is refused naming the field, before any lookup.
    let long = "b".repeat(257);
    for (args, needle) in [
        (vec!["--backup-id", ""], "invalid backup_id: must not be empty"),
        (vec!["--backup-id", &long], "invalid backup_id: is 257 bytes, at most 256 are allowed"),
        (vec!["--backup-id", "night\u{1b}[2Jly"], "invalid backup_id: must not contain control characters"),
        (vec!["--backup-id", "nightly", "--keyring", "bad name"], "invalid keyring: may contain only"),
    ] {
        let mut all = vec!["key", "find"];
        all.extend_from_slice(&args);
        let out = w.server.kmsctl("officer", &all);
        let err = refused_one_line(&out, 1, &[needle]);
        assert!(!err.contains('\u{1b}'), "{err:?}");
    }

    // Each lookup is audited with its backup id and what it found; a refusal too.
    let out = w.server.kmsctl("auditor", &["audit", "export"]);
    ok(&out, "audit export");
    let audit = stdout(&out);
    let finds: Vec<&str> = audit.lines().filter(|l| l.contains("\"action\":\"FindDataKeys\"")).collect();
    assert!(
        finds.iter().any(|l| l.contains("\"principal\":\"officer\"") && l.contains("\"backup_id\":\"nightly\"") && l.contains("3 keys found")),
        "{audit}"
    );
    assert!(finds.iter().any(|l| l.contains("\"principal\":\"sealer\"") && l.contains("\"backup_id\":\"nightly\"") && l.contains("denied")), "{audit}");
    assert!(finds.iter().any(|l| l.contains("\"principal\":\"officer\"") && l.contains("invalid backup_id")), "{audit}");
}

async fn channel(server: &Server, who: &str) -> Channel {
    let pki = server.data_dir().join("pki");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.join("ca.pem")).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(pki.join(format!("clients/{who}.pem"))).unwrap(),
            std::fs::read(pki.join(format!("clients/{who}.key"))).unwrap(),
        ))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_the_newest_hundred_keys_are_returned_and_the_answer_says_more_matched() {
    let w = World::new();
    // `dev` seals on every keyring.
    let mut sealer = pb::key_service_client::KeyServiceClient::new(channel(&w.server, "dev").await);
    let mut issue = async |keyring: &str| {
        let req = pb::GenerateDataKeyRequest { keyring: keyring.into(), backup_id: "hourly".into(), labels: Default::default() };
        sealer.generate_data_key(req).await.unwrap().into_inner().key_id
    };
    // The oldest key first; the 100 after it are newer: the cut drops the oldest.
    let oldest = issue("default").await;
    w.set_time(w.t0 + 10);
    let mut newer = Vec::new();
    for _ in 0..100 {
        newer.push(issue("default").await);
    }
    let on_pacs = issue("pacs").await;

    let officer = w.server.client("officer");
    let (ids, truncated) = find_json(&officer, &["--backup-id", "hourly", "--keyring", "default"]);
    assert_eq!(ids.len(), 100);
    assert!(truncated);
    assert!(!ids.contains(&oldest), "the oldest key is the one left out");
    let mut want = newer.clone();
    want.sort();
    let mut got = ids.clone();
    got.sort();
    assert_eq!(got, want);
    // On `pacs` one key matches: not truncated.
    let (ids, truncated) = find_json(&officer, &["--backup-id", "hourly", "--keyring", "pacs"]);
    assert_eq!((ids, truncated), (vec![on_pacs.clone()], false));
    // The pacs auditor sees only its one key, however many match elsewhere.
    let (ids, truncated) = find_json(&w.pacs_auditor, &["--backup-id", "hourly"]);
    assert_eq!((ids, truncated), (vec![on_pacs], false));

    let out = kmsctl(&officer, &["key", "find", "--backup-id", "hourly"]);
    ok(&out, "key find");
    let text = stdout(&out);
    assert_eq!(text.matches("key id:     ").count(), 100, "{text}");
    assert!(text.ends_with("\nmore keys matched: only the newest 100 are shown (narrow it with --keyring)\n"), "{text}");
}
