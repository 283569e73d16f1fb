//! `[limits]`: a connection that does not finish TLS in time is closed, connections over
//! `max_connections` are closed at accept, and an idle connection is closed; each counted
//! in the metrics. Waiting is on the server's close of a socket or on a metric, never a sleep.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kluis_tests::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A bound for waits on the server, so a broken server fails the test instead of hanging it.
const BOUND: Duration = Duration::from_secs(60);

/// Restarts `server` with a metrics endpoint and `limits` (the body of a `[limits]` table).
fn with_limits(server: &mut Server, limits: &str) -> String {
    server.set_top_level("metrics_listen = \"127.0.0.1:0\"\n");
    let cfg = server.data_dir().join("server.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\n[limits]\n{limits}\n")).unwrap();
    server.restart();
    server.metrics_addr.clone().expect("metrics endpoint announced")
}

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

fn value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
}

/// Scrapes until `series` has `want` (the server updates it when a socket closes).
fn until_metric(addr: &str, series: &str, want: u64) {
    let start = Instant::now();
    loop {
        let text = scrape(addr);
        if value(&text, series) == want {
            return;
        }
        assert!(start.elapsed() < BOUND, "{series} never became {want}:\n{text}");
        std::thread::yield_now();
    }
}

/// Blocks until the server closes `s` (end of stream or reset); returns how long that took.
fn until_closed(s: &mut TcpStream) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(BOUND)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
    start.elapsed()
}

#[test]
fn a_connection_that_does_not_finish_tls_in_time_is_closed_and_counted() {
    let mut server = Server::start();
    let metrics = with_limits(&mut server, "handshake_timeout_secs = 1");
    // Connects and says nothing, as a connection-exhaustion attacker does.
    let mut idle = TcpStream::connect(&server.addr).unwrap();
    let took = until_closed(&mut idle);
    // Not before the deadline (the client's clock started before the server's).
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    let t = scrape(&metrics);
    assert_eq!(value(&t, "kluis_connections_handshake_timeout_total "), 1);
    assert_eq!(value(&t, "kluis_connections_refused_over_cap_total "), 0);
    // Real clients are served as before.
    ok(&server.kmsctl("auditor", &["keyring", "list"]), "keyring list");
}

#[test]
fn connections_over_the_cap_are_closed_at_accept_and_real_clients_work_after_others_close() {
    let mut server = Server::start();
    let metrics = with_limits(&mut server, "max_connections = 2\nhandshake_timeout_secs = 600");
    let first = TcpStream::connect(&server.addr).unwrap();
    let second = TcpStream::connect(&server.addr).unwrap();
    // The listener accepts in order: the first two hold both slots, the third is closed.
    let mut third = TcpStream::connect(&server.addr).unwrap();
    until_closed(&mut third);
    let t = scrape(&metrics);
    assert_eq!(value(&t, "kluis_connections_refused_over_cap_total "), 1);
    assert_eq!(value(&t, "kluis_connections_open "), 2);
    // A real client is refused too while the slots are held (closed connection: retry later).
    let out = server.kmsctl("auditor", &["keyring", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(value(&scrape(&metrics), "kluis_connections_refused_over_cap_total ") >= 2);

    drop(first);
    drop(second);
    until_metric(&metrics, "kluis_connections_open ", 0);
    ok(&server.kmsctl("auditor", &["keyring", "list"]), "keyring list after the others closed");
    // The connection of that call is gone again once kmsctl exits.
    until_metric(&metrics, "kluis_connections_open ", 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_connection_is_closed_and_counted() {
    let mut server = Server::start();
    let metrics = with_limits(&mut server, "idle_timeout_secs = 1");
    let ca = std::fs::read(server.data_dir().join("pki/ca.pem")).unwrap();
    let d = server.data_dir().join("pki/clients");
    let id = Identity::from_pem(std::fs::read(d.join("auditor.pem")).unwrap(), std::fs::read(d.join("auditor.key")).unwrap());
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost").identity(id);
    let ch = Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    HealthClient::new(ch.clone()).check(HealthCheckRequest { service: String::new() }).await.unwrap();
    // The channel is kept but sends nothing: the server closes it after the idle timeout.
    let m = metrics.clone();
    tokio::task::spawn_blocking(move || {
        until_metric(&m, "kluis_connections_idle_closed_total ", 1);
        until_metric(&m, "kluis_connections_open ", 0);
    })
    .await
    .unwrap();
    // The client reconnects for its next call.
    HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await.unwrap();
}
