//! Clients with several endpoints (issue 16, point 3): `endpoints = [...]` in the client
//! config; `backup-hook` and `kmsctl` move on to the next endpoint when one is unavailable
//! (nothing listens, a listener that accepts and drops the connection), and stop at a
//! server certificate of another CA (fail closed: an attack or a misconfiguration).
//!
//! Two servers cannot share one redb file, so the other endpoints are a closed port, a TCP
//! listener that accepts and drops, or another `kms-server dev` (its own CA). The retry
//! deadline is 0 in these configs: the move to the next endpoint is part of one attempt,
//! not the retry loop, and nothing here waits on a backoff.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::PathBuf;

use kluis_tests::*;

const NO_RETRY: &str = "[retry]\ndeadline_secs = 0\n";

/// An address where nothing listens: a port bound and released.
fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("https://{addr}")
}

/// A TCP listener that accepts every connection and drops it at once (the TLS handshake
/// is cut); runs until the test process ends.
fn dropping_listener() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    format!("https://{addr}")
}

/// The dev identity `who`'s client config with `endpoints = LIST` instead of its own
/// `endpoint`, and no retry.
fn with_endpoints(server: &Server, who: &str, file: &str, endpoints: &[&str]) -> PathBuf {
    let text = std::fs::read_to_string(server.client(who)).unwrap();
    let own = format!("endpoint = \"https://{}\"\n", server.addr);
    assert!(text.contains(&own), "{text}");
    let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    let text = text.replace(&own, &format!("endpoints = [{}]\n", list.join(", ")));
    let p = server.dir.path().join(file);
    std::fs::write(&p, format!("{text}{NO_RETRY}")).unwrap();
    p
}

fn real(server: &Server) -> String {
    format!("https://{}", server.addr)
}

/// Seals and unseals through `cfg`; returns both stderrs.
fn seal_and_unseal(cfg: &std::path::Path, id: &str) -> (String, String) {
    let data = sample(7, 200_000);
    let out = backup_hook(cfg, &["seal", "--keyring", "default", "--backup-id", id], &data);
    assert!(out.status.success(), "seal: {}", stderr(&out));
    let seal_err = stderr(&out);
    let sealed = out.stdout;
    let out = backup_hook(cfg, &["unseal"], &sealed);
    assert!(out.status.success(), "unseal: {}", stderr(&out));
    assert!(out.stdout == data, "unsealed bytes differ");
    (seal_err, stderr(&out))
}

#[test]
fn a_closed_port_first_is_passed_over_and_the_order_does_not_matter() {
    let server = Server::start();
    let (dead, live) = (closed_port(), real(&server));
    let cfg = with_endpoints(&server, "dev", "dead-first.toml", &[&dead, &live]);
    let (seal_err, unseal_err) = seal_and_unseal(&cfg, "ha-closed-first");
    let line = format!("kluis: server {dead} unavailable (connection refused), trying {live}");
    assert!(seal_err.contains(&line), "{seal_err}");
    assert!(unseal_err.contains(&line), "{unseal_err}");
    // The reversed order: the live server answers first, nothing is said.
    let cfg = with_endpoints(&server, "dev", "live-first.toml", &[&live, &dead]);
    let (seal_err, unseal_err) = seal_and_unseal(&cfg, "ha-live-first");
    assert!(!seal_err.contains("unavailable") && !unseal_err.contains("unavailable"), "{seal_err}{unseal_err}");
    // kmsctl moves on the same way.
    let cfg = with_endpoints(&server, "officer", "officer-dead-first.toml", &[&dead, &live]);
    let out = kmsctl(&cfg, &["keyring", "create", "ha-ring"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&line), "{}", stderr(&out));
    let out = kmsctl(&cfg, &["keyring", "list"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ha-ring"), "{}", stderr(&out));
}

#[test]
fn a_listener_that_accepts_and_drops_is_passed_over() {
    let server = Server::start();
    let (dropper, live) = (dropping_listener(), real(&server));
    let cfg = with_endpoints(&server, "dev", "dropper-first.toml", &[&dropper, &live]);
    let (seal_err, _) = seal_and_unseal(&cfg, "ha-dropper-first");
    assert!(seal_err.contains(&format!("kluis: server {dropper} unavailable (")) && seal_err.contains(&format!("trying {live}")), "{seal_err}");
    let cfg = with_endpoints(&server, "dev", "dropper-last.toml", &[&live, &dropper]);
    let (seal_err, _) = seal_and_unseal(&cfg, "ha-dropper-last");
    assert!(!seal_err.contains("unavailable"), "{seal_err}");
}

#[test]
fn when_every_endpoint_is_down_the_error_names_each_and_exits_unavailable() {
    let server = Server::start();
    let (dead, dropper) = (closed_port(), dropping_listener());
    let cfg = with_endpoints(&server, "dev", "all-dead.toml", &[&dead, &dropper]);
    let out = backup_hook(&cfg, &["seal", "--keyring", "default", "--backup-id", "ha-all-dead"], b"data");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let text = stderr(&out);
    assert!(text.contains("no Kluis server in `endpoints` is available (2 tried)"), "{text}");
    assert!(text.contains(&format!("[1] cannot reach the Kluis server at {dead}")), "{text}");
    assert!(text.contains(&format!("[2] cannot reach the Kluis server at {dropper}")), "{text}");
    let out = kmsctl(&cfg, &["keyring", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(&dead) && stderr(&out).contains(&dropper), "{}", stderr(&out));
    // With the retry loop: it gives up at the deadline, still naming both.
    let cfg = server.dir.path().join("all-dead-retry.toml");
    let text = std::fs::read_to_string(server.dir.path().join("all-dead.toml")).unwrap().replace(NO_RETRY, "[retry]\ndeadline_secs = 1\ninitial_backoff_ms = 20\nmax_backoff_ms = 100\n");
    std::fs::write(&cfg, text).unwrap();
    let out = kmsctl(&cfg, &["keyring", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains("gave up after") && text.contains(&dead) && text.contains(&dropper), "{text}");
}

/// A listener that answers TLS with a certificate of another CA (here another dev
/// server): the client does not move on to the next endpoint; it stops, naming that
/// endpoint and the CA, exit 4 (refused), and nothing reaches the good server.
#[test]
fn a_server_certificate_of_another_ca_fails_closed_without_trying_the_next() {
    let server = Server::start();
    let stranger = Server::start();
    let (other, live) = (real(&stranger), real(&server));
    let cfg = with_endpoints(&server, "dev", "stranger-first.toml", &[&other, &live]);
    let out = backup_hook(&cfg, &["seal", "--keyring", "default", "--backup-id", "ha-stranger"], b"data");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains(&format!("the Kluis server at {other} presented a certificate this client does not trust")), "{text}");
    assert!(!text.contains("trying"), "{text}");
    let out = server.kmsctl("auditor", &["key", "find", "--backup-id", "ha-stranger", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(found["keys"].as_array().map(Vec::len), Some(0), "no key was issued: {found}");
    // Behind a good endpoint it is never reached.
    let cfg = with_endpoints(&server, "dev", "stranger-last.toml", &[&live, &other]);
    seal_and_unseal(&cfg, "ha-stranger-last");
}

/// `kms-server dev --client-endpoint URL` writes `endpoints = [this server, URL]`.
#[test]
fn the_dev_setup_writes_several_endpoints() {
    let dead = closed_port();
    let server = Server::start_with_args(&["--client-endpoint", &dead]);
    let text = std::fs::read_to_string(server.client("dev")).unwrap();
    assert!(text.contains(&format!("endpoints = [\"https://{}\", \"{dead}\"]", server.addr)), "{text}");
    let (seal_err, _) = seal_and_unseal(&server.client("dev"), "ha-dev");
    assert!(!seal_err.contains("unavailable"), "{seal_err}");
    // A plain http:// endpoint is refused before anything starts, naming the option.
    let dir = tempfile::tempdir().unwrap();
    let out = run("kms-server", &["dev", "--data-dir", dir.path().join("d").to_str().unwrap(), "--listen", "127.0.0.1:0", "--client-endpoint", "http://kms-b:8443"], b"");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--client-endpoint") && stderr(&out).contains("is not https://HOST:PORT"), "{}", stderr(&out));
    assert!(!dir.path().join("d").exists(), "nothing was created");
}

/// The load generator connects to the first endpoint that is available, saying so, and
/// reports which one it loaded; a certificate of another CA stops it too.
#[test]
fn the_load_generator_passes_over_an_unavailable_endpoint() {
    let server = Server::start();
    let (dead, dropper, live) = (closed_port(), dropping_listener(), real(&server));
    let cfg = with_endpoints(&server, "dev", "loadgen.toml", &[&dead, &dropper, &live]);
    // One second of health checks on two connections.
    let loadgen = |cfg: &std::path::Path| {
        let args = ["--client-config", cfg.to_str().unwrap(), "--op", "health", "-c", "2", "-s", "1", "-t", "1", "-w", "0", "--json"];
        run("kluis-loadgen", &args, b"")
    };
    let out = loadgen(&cfg);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains(&format!("kluis: server {dead} unavailable (connection refused), trying {dropper}")), "{text}");
    assert!(text.contains(&format!("kluis: server {dropper} unavailable (")) && text.contains(&format!("trying {live}")), "{text}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["endpoint"], live.as_str(), "{report}");
    // Every endpoint down: each is named, non-zero exit.
    let cfg = with_endpoints(&server, "dev", "loadgen-dead.toml", &[&dead, &dropper]);
    let out = loadgen(&cfg);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains("no Kluis server in `endpoints` is available (2 tried)") && text.contains(&dead) && text.contains(&dropper), "{text}");
    // Another CA's certificate first: final, the good server is not tried.
    let stranger = Server::start();
    let cfg = with_endpoints(&server, "dev", "loadgen-stranger.toml", &[&real(&stranger), &live]);
    let out = loadgen(&cfg);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains(&format!("the Kluis server at {} presented a certificate this client does not trust", real(&stranger))), "{text}");
    assert!(!text.contains("trying"), "{text}");
}

/// An address that never answers a TCP connect (a machine that is down, a firewall that
/// drops): a listener with an accept queue of one, filled by a connection nobody accepts;
/// Linux drops the SYNs that follow. Lives as long as the value.
struct BlackHole {
    _rt: tokio::runtime::Runtime,
    _listener: tokio::net::TcpListener,
    _queued: std::net::TcpStream,
    url: String,
}

fn black_hole() -> BlackHole {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    let _in_rt = rt.enter();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let queued = std::net::TcpStream::connect(addr).unwrap();
    drop(_in_rt);
    BlackHole { _rt: rt, _listener: listener, _queued: queued, url: format!("https://{addr}") }
}

/// A server that does not answer the TCP connect at all: when `connect_timeout_secs`
/// runs out the client moves on (the server is not there), for seal, unseal and kmsctl.
#[test]
fn an_endpoint_that_never_answers_the_tcp_connect_is_passed_over() {
    let server = Server::start();
    let (hole, live) = (black_hole(), real(&server));
    let cfg = with_endpoints(&server, "dev", "hole-first.toml", &[&hole.url, &live]);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("connect_timeout_secs = 1\n{text}")).unwrap();
    let (seal_err, _) = seal_and_unseal(&cfg, "ha-hole-first");
    assert!(seal_err.contains(&format!("kluis: server {} unavailable (could not connect), trying {live}", hole.url)), "{seal_err}");
    // Alone it is unavailable (exit 3), naming the connect timeout.
    let cfg = with_endpoints(&server, "dev", "hole-only.toml", &[&hole.url, &closed_port()]);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("connect_timeout_secs = 1\n{text}")).unwrap();
    let out = kmsctl(&cfg, &["keyring", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("[1] cannot reach the Kluis server at {}: TCP connect timed out", hole.url)), "{}", stderr(&out));
}

/// What is final on one server is final for all: a refusal (PERMISSION_DENIED, exit 4) and
/// UNAVAILABLE with a Kluis reason (the audit trail cannot be written, exit 3) end the
/// call at the first endpoint; the next (a closed port) is never tried, and the error is
/// that server's own, not "no server available".
#[test]
fn a_refusal_or_a_server_reason_is_final_and_not_taken_to_the_next_endpoint() {
    let mut server = Server::start();
    let (live, dead) = (real(&server), closed_port());
    let cfg = with_endpoints(&server, "auditor", "auditor.toml", &[&live, &dead]);
    let out = backup_hook(&cfg, &["seal", "--keyring", "default", "--backup-id", "ha-refused"], b"data");
    let err = refused_one_line(&out, 4, &["auditor"]);
    assert!(!err.contains("trying") && !err.contains(&dead), "{err}");
    server.env.push(("KLUIS_TEST_FAIL_AUDIT".into(), "1".into()));
    server.restart();
    let cfg = with_endpoints(&server, "sealer", "sealer.toml", &[&real(&server), &dead]);
    let out = backup_hook(&cfg, &["seal", "--keyring", "default", "--backup-id", "ha-no-audit"], b"data");
    let err = refused_one_line(&out, 3, &["audit trail"]);
    assert!(!err.contains("trying") && !err.contains(&dead) && !err.contains("no Kluis server in"), "{err}");
}
