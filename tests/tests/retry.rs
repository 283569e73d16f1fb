//! Clients ride out a server restart (issue 13, point 5): `backup-hook` and `kmsctl`
//! retry a request that failed because the server was unavailable (connection refused,
//! reset, lost mid-request), with backoff, up to the client config's `[retry]` deadline,
//! saying so on stderr; never a refusal, never a status with a Kluis reason, and an
//! officer write never once it may have reached the server.
//!
//! No sleeps: the server is killed and started again on the same port when stderr shows
//! the client retrying, or by a proxy that kills it when the request arrives.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use kluis_tests::*;

/// Short backoffs, the default deadline: a restart is ridden out quickly.
const RIDE_OUT: &str = "[retry]\ndeadline_secs = 60\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\n";

fn seal_args(id: &str) -> [&str; 5] {
    ["seal", "--keyring", "default", "--backup-id", id]
}

/// Twenty seals with `backup-hook`; before some the server is killed (the client finds
/// it down and retries until it is back), during others it is killed with the data-key
/// request in flight (the request is lost and replayed). Every seal succeeds, says that
/// it retried when it had to, and unseals afterwards.
#[test]
fn seals_in_a_loop_all_succeed_while_the_server_is_killed_and_restarted() {
    let mut server = Server::start();
    let cfg = server.client_with("sealer", "sealer-retry.toml", RIDE_OUT);
    let mut sealed = Vec::new();
    let (mut down_before, mut killed_in_flight) = (0, 0);
    for i in 0..20 {
        let id = format!("nightly-{i}");
        let data = sample(i, 100_000 + usize::try_from(i).unwrap());
        let out = match i % 5 {
            // Down before the seal starts: the connection is refused until it is back.
            1 => {
                server.kill9();
                let mut hook = Running::backup_hook(&cfg, &seal_args(&id), &data);
                let line = hook.wait_for_stderr("retrying");
                assert!(line.contains("server unavailable (connection refused), retrying in "), "{line}");
                server.start_again();
                down_before += 1;
                hook.finish()
            }
            // Killed when the request arrives: lost mid-request, replayed.
            3 => {
                let proxy = KillingProxy::start(&server.addr, server.pid(), AfterKill::Relay);
                let via = proxy.client_config(&server, "sealer", &format!("via-proxy-{i}.toml"), RIDE_OUT);
                let mut hook = Running::backup_hook(&via, &seal_args(&id), &data);
                let first = hook.wait_for_stderr("retrying");
                assert!(proxy.killed(), "the proxy did not kill the server: {first}");
                // The request was in flight: the replay is of a request that may have been sent.
                let maybe_sent = ["(connection lost during the request)", "(connection reset)", "(broken pipe)", "(UNAVAILABLE)"];
                assert!(first.starts_with("kluis: server unavailable (") && maybe_sent.iter().any(|c| first.contains(c)), "{first}");
                server.start_again();
                killed_in_flight += 1;
                hook.finish()
            }
            _ => server.backup_hook("sealer", &seal_args(&id), &data),
        };
        ok(&out, &format!("seal {i}"));
        let err = stderr(&out);
        assert_eq!(err.contains("retrying"), i % 5 == 1 || i % 5 == 3, "seal {i}: {err}");
        assert!(!err.contains("error"), "seal {i}: {err}");
        sealed.push((data, out.stdout));
    }
    assert_eq!((down_before, killed_in_flight), (4, 4));
    for (i, (data, file)) in sealed.iter().enumerate() {
        let out = unseal(&server, "restorer", file);
        ok(&out, &format!("unseal {i}"));
        assert!(out.stdout == *data, "seal {i} does not unseal to its data");
    }
}

/// kmsctl's reads ride out a restart the same way.
#[test]
fn kmsctl_reads_ride_out_a_restart() {
    let mut server = Server::start();
    let cfg = server.client_with("officer", "officer-retry.toml", RIDE_OUT);
    server.kill9();
    let mut ctl = Running::start("kmsctl", &["--client-config", s(&cfg), "keyring", "list"], b"");
    ctl.wait_for_stderr("retrying");
    server.start_again();
    let out = ctl.finish();
    ok(&out, "kmsctl keyring list across a restart");
    assert!(stdout(&out).contains("default"), "{}", stdout(&out));
}

/// Down for good: the client gives up at its deadline, with the "unavailable" exit code,
/// a line for each retry and a last line that says it gave up, how often, and why.
#[test]
fn a_server_down_for_good_is_given_up_on_at_the_deadline() {
    let mut server = Server::start();
    let sealer = server.client_with("sealer", "sealer-1s.toml", "[retry]\ndeadline_secs = 1\ninitial_backoff_ms = 50\nmax_backoff_ms = 200\n");
    let officer = server.client_with("officer", "officer-1s.toml", "[retry]\ndeadline_secs = 1\ninitial_backoff_ms = 50\nmax_backoff_ms = 200\n");
    server.kill9();
    let timed = |f: &dyn Fn() -> std::process::Output| {
        let t = Instant::now();
        let o = f();
        (t.elapsed(), o)
    };
    for (what, (took, out)) in [
        ("backup-hook seal", timed(&|| backup_hook(&sealer, &seal_args("gone"), b"data"))),
        ("kmsctl keyring list", timed(&|| kmsctl(&officer, &["keyring", "list"]))),
    ] {
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{what}: {err}");
        assert!(out.stdout.is_empty(), "{what}: {}", stdout(&out));
        let lines: Vec<&str> = err.lines().collect();
        assert!(lines.len() >= 3, "{what}: several retries in a second: {err}");
        let (last, retries) = lines.split_last().unwrap();
        for l in retries {
            assert!(l.starts_with("kluis: server unavailable (connection refused), retrying in ") && l.contains(" s left)"), "{what}: {l}");
        }
        assert!(last.contains(&format!("gave up after {} attempts", retries.len() + 1)), "{what}: {last}");
        assert!(last.contains("(connection refused)") && last.contains("cannot reach the Kluis server"), "{what}: {last}");
        assert!(last.contains("retry.deadline_secs"), "{what}: {last}");
        // The deadline, not an accident, ended it (it counts from the first attempt).
        assert!(took >= Duration::from_millis(950), "{what} gave up after {took:?}");
    }
}

/// A refusal is an answer, not an outage: exactly one attempt, one line, no retrying,
/// even with a long deadline.
#[test]
fn a_refusal_is_never_retried() {
    let server = Server::start();
    let sealed = seal(&server, "sealer", "default", "mine", b"patient records");
    // The sealer may not unwrap (PERMISSION_DENIED); the default deadline (60 s) is in force.
    let out = unseal(&server, "sealer", &sealed);
    let err = refused_one_line(&out, 4, &["may not UnwrapDataKey"]);
    assert!(!err.contains("retrying"), "{err}");
    // kmsctl, an officer write by a non-officer.
    let out = server.kmsctl("sealer", &["keyring", "create", "not-mine"]);
    let err = refused_one_line(&out, 4, &[]);
    assert!(!err.contains("retrying"), "{err}");
    // Exactly one attempt: one refusal each in the audit trail.
    let out = server.kmsctl("auditor", &["audit", "export"]);
    ok(&out, "audit export");
    let entries: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let denied = |action: &str| {
        entries
            .iter()
            .filter(|e| e["action"] == action && e["principal"] == "sealer" && e["outcome"].as_str().is_some_and(|o| o.starts_with("denied")))
            .count()
    };
    assert_eq!((denied("UnwrapDataKey"), denied("CreateKeyring")), (1, 1), "{}", stdout(&out));
}

/// UNAVAILABLE that carries a Kluis reason (here: the audit trail cannot be written) is
/// the server speaking, not a restart: not retried.
#[test]
fn unavailable_with_a_server_reason_is_not_retried() {
    let mut server = Server::start();
    server.env.push(("KLUIS_TEST_FAIL_AUDIT".into(), "1".into()));
    server.restart();
    let out = server.backup_hook("sealer", &seal_args("x"), b"d");
    let err = refused_one_line(&out, 3, &["audit trail"]);
    assert!(!err.contains("retrying"), "{err}");
}

/// An officer write that may have reached the server is never replayed: the request is
/// lost when the server is killed, and kmsctl fails at once (exit 3) though the server is
/// back and the deadline is long. The same write, sent again by hand, works.
#[test]
fn an_officer_write_is_not_replayed_after_it_may_have_been_sent() {
    let mut server = Server::start();
    let proxy = KillingProxy::start(&server.addr, server.pid(), AfterKill::Relay);
    let cfg = proxy.client_config(&server, "officer", "officer-via-proxy.toml", RIDE_OUT);
    let out = kmsctl(&cfg, &["keyring", "create", "once-only"]);
    assert!(proxy.killed(), "the proxy did not see the request: {}", stderr(&out));
    let err = refused_one_line(&out, 3, &["unavailable", "retry later"]);
    assert!(!err.contains("retrying"), "{err}");
    server.start_again();
    // The server never saw it (the proxy kept the request back), and nothing replayed it.
    let out = server.kmsctl("officer", &["keyring", "show", "once-only"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    ok(&kmsctl(&cfg, &["keyring", "create", "once-only"]), "keyring create, sent again by hand");
}

/// The `[retry]` table is checked like the rest of the config: an unknown field, a value
/// out of range, a cap below the first backoff are refused, naming the field (exit 1).
#[test]
fn bad_retry_settings_are_refused_naming_the_field() {
    let server = Server::start();
    for (i, (extra, needle)) in [
        ("[retry]\ndeadline = 5\n", "unknown field `deadline`"),
        ("[retry]\ndeadline_secs = 86401\n", "retry.deadline_secs = 86401 is out of range"),
        ("[retry]\ninitial_backoff_ms = 0\n", "retry.initial_backoff_ms = 0 is out of range"),
        ("[retry]\ninitial_backoff_ms = 400\nmax_backoff_ms = 300\n", "retry.max_backoff_ms = 300 is out of range; allowed: 400 to 300000"),
        ("[retry]\ndeadline_secs = -1\n", "deadline_secs"),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = server.client_with("sealer", &format!("bad-{i}.toml"), extra);
        refused_one_line(&backup_hook(&cfg, &seal_args("x"), b"d"), 1, &[needle]);
        refused_one_line(&kmsctl(&cfg, &["keyring", "list"]), 1, &[needle]);
    }
}
