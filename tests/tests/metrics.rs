//! The Prometheus endpoint counts issuances, unwraps and refusals, and reports the master key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};

use kluis_tests::*;

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

fn value(text: &str, series: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("{series} missing:\n{text}"))
}

#[test]
fn issuances_unwraps_and_refusals_are_counted() {
    let mut server = Server::start();
    let cfg = server.data_dir().join("server.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replacen("version = 1\n", "version = 1\nmetrics_listen = \"127.0.0.1:0\"\n", 1)).unwrap();
    server.restart();
    let addr = server.metrics_addr.clone().expect("metrics endpoint announced");
    let before = scrape(&addr);
    assert_eq!(value(&before, "kluis_data_keys_issued_total "), 0);

    let sealed = seal(&server, "sealer", "default", "m1", b"x");
    assert_eq!(unseal(&server, "sealer", &sealed).status.code(), Some(4));
    assert_eq!(unseal(&server, "sealer", &sealed).status.code(), Some(4));
    assert!(unseal(&server, "restorer", &sealed).status.success());
    let t = scrape(&addr);
    assert_eq!(value(&t, "kluis_data_keys_issued_total "), 1);
    assert_eq!(value(&t, "kluis_data_keys_unwrapped_total "), 1);
    assert_eq!(value(&t, "kluis_refusals_total{action=\"UnwrapDataKey\",reason=\"permission\"} "), 2);
    assert_eq!(value(&t, "kluis_master_key_up "), 1);
    assert_eq!(value(&t, "kluis_store_up "), 1);
    assert_eq!(value(&t, "kluis_audit_write_failures_total "), 0);
    assert_eq!(value(&t, "kluis_request_duration_seconds_count{action=\"GenerateDataKey\"} "), 1);
    assert_eq!(value(&t, "kluis_request_duration_seconds_count{action=\"UnwrapDataKey\"} "), 3);
    assert!(!t.contains("sealer") && !t.contains("restorer"), "no principal names in metrics");
    // Anything but /metrics is 404.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
}
