//! Every data key a client received survives a kill -9 of the server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::mpsc;

use kluis_tests::*;

per_provider!(kill9_mid_load_loses_no_issued_key);

const CLIENTS: usize = 4;
/// Each client stops by itself after this many seals, or at its first failure.
const MAX_PER_CLIENT: usize = 150;
/// The server is killed once this many seals have succeeded.
const KILL_AFTER: usize = 40;

fn kill9_mid_load_loses_no_issued_key(p: Setup) {
    let mut server = Server::start_with(p);
    // Clients stop at their first failure, so they must not ride the kill out.
    let sealer = server.client_with("sealer", "sealer-no-retry.toml", "[retry]\ndeadline_secs = 0\n");
    let (tx, rx) = mpsc::channel::<()>();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let tx = tx.clone();
        let cfg = sealer.clone();
        clients.push(std::thread::spawn(move || {
            let mut received = Vec::new();
            let mut saw_failure = false;
            for i in 0..MAX_PER_CLIENT {
                let data = format!("client {c} backup {i}").into_bytes();
                let id = format!("c{c}-{i}");
                let out = run(
                    "backup-hook",
                    &["--client-config", cfg.to_str().unwrap(), "seal", "--keyring", "default", "--backup-id", &id],
                    &data,
                );
                if !out.status.success() {
                    saw_failure = true;
                    break;
                }
                received.push((data, out.stdout));
                let _ = tx.send(());
            }
            (received, saw_failure)
        }));
    }
    drop(tx);
    // Kill as soon as KILL_AFTER seals have been answered: no clock involved.
    for _ in 0..KILL_AFTER {
        rx.recv().expect("clients stopped before the kill point");
    }
    server.kill9();
    let mut all = Vec::new();
    let mut failures = 0;
    for c in clients {
        let (received, saw_failure) = c.join().unwrap();
        all.extend(received);
        failures += usize::from(saw_failure);
    }
    assert!(failures > 0, "the kill should have interrupted the load");
    assert!(all.len() >= KILL_AFTER);

    server.restart();
    for (data, sealed) in &all {
        let out = unseal(&server, "restorer", sealed);
        assert!(out.status.success(), "a key the client received was lost: {}", stderr(&out));
        assert_eq!(&out.stdout, data);
    }
}
