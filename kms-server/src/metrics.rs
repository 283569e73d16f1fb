//! Prometheus metrics on a separate plain-HTTP listener (`metrics_listen`), for
//! operations: issuances, unwraps, refusals by action and reason, audit write
//! failures, master-key (HSM) health, request latency. No secrets and no
//! principal names appear in metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::{Mutex, OnceLock};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};


/// The audit chain's (integrity alarms, anchor failures) counters.
pub type AuditCounters = (Arc<AtomicU64>, Arc<AtomicU64>);

/// Latency bucket upper bounds, seconds.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
}

/// Counters and histograms, shared by the handlers.
#[derive(Default)]
pub struct Metrics {
    issued: AtomicU64,
    unwrapped: AtomicU64,
    audit_failures: AtomicU64,
    /// Shared with the revocation list, which counts its refused reloads (auth is below metrics).
    reload_failures: Arc<AtomicU64>,
    connections_open: AtomicU64,
    handshake_timeouts: AtomicU64,
    over_cap: AtomicU64,
    idle_closed: AtomicU64,
    /// The audit chain's integrity alarms and anchor failures: counters the chain owns, attached
    /// once the key manager is open (the listener's metrics are made before it).
    audit: OnceLock<AuditCounters>,
    refusals: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    errors: Mutex<BTreeMap<(&'static str, String), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    kmip: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Metrics {
    /// Reports the audit chain's integrity alarms and anchor failures from now on (the first
    /// call counts; both read 0 before it).
    pub fn attach_audit_counters(&self, counters: AuditCounters) {
        let _ = self.audit.set(counters);
    }
    pub fn issued(&self) {
        self.issued.fetch_add(1, Ordering::Relaxed);
    }
    pub fn unwrapped(&self) {
        self.unwrapped.fetch_add(1, Ordering::Relaxed);
    }
    pub fn audit_failure(&self) {
        self.audit_failures.fetch_add(1, Ordering::Relaxed);
    }
    /// A changed revocation list or CRL that could not be read or parsed (the previous one stays).
    pub fn reload_failed(&self) {
        self.reload_failures.fetch_add(1, Ordering::Relaxed);
    }
    /// The counter behind `kluis_reload_failures_total`, for the revocation list.
    pub fn reload_failure_counter(&self) -> Arc<AtomicU64> {
        self.reload_failures.clone()
    }
    /// A TCP connection accepted (handshake included); [`Metrics::connection_closed`] when it ends.
    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
    }
    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
    /// A connection closed because its TLS handshake did not finish in time.
    pub fn handshake_timed_out(&self) {
        self.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
    }
    /// A connection closed at accept because `max_connections` were open.
    pub fn refused_over_cap(&self) {
        self.over_cap.fetch_add(1, Ordering::Relaxed);
    }
    /// A connection closed after `idle_timeout_secs` without traffic.
    pub fn idle_closed(&self) {
        self.idle_closed.fetch_add(1, Ordering::Relaxed);
    }
    /// A refused request (`reason`: permission, unauthenticated, revoked).
    pub fn refused(&self, action: &'static str, reason: &'static str) {
        if let Ok(mut m) = self.refusals.lock() {
            *m.entry((action, reason)).or_default() += 1;
        }
    }
    /// A request that failed after authorization, by gRPC code.
    pub fn failed(&self, action: &'static str, code: tonic::Code) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry((action, format!("{code:?}"))).or_default() += 1;
        }
    }
    /// A KMIP batch item answered: its operation and result (`success` or the result reason).
    pub fn kmip(&self, operation: &'static str, result: &'static str) {
        if let Ok(mut m) = self.kmip.lock() {
            *m.entry((operation, result)).or_default() += 1;
        }
    }
    pub fn observe(&self, action: &'static str, took: Duration) {
        let secs = took.as_secs_f64();
        if let Ok(mut m) = self.latency.lock() {
            let h = m.entry(action).or_default();
            let i = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
            h.counts[i] += 1;
            h.sum += secs;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, found: crate::health::Found) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# HELP kluis_data_keys_issued_total Data keys issued (durably recorded).");
        let _ = writeln!(o, "# TYPE kluis_data_keys_issued_total counter");
        let _ = writeln!(o, "kluis_data_keys_issued_total {}", self.issued.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP kluis_data_keys_unwrapped_total Data keys unwrapped.");
        let _ = writeln!(o, "# TYPE kluis_data_keys_unwrapped_total counter");
        let _ = writeln!(o, "kluis_data_keys_unwrapped_total {}", self.unwrapped.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP kluis_audit_write_failures_total Requests refused because the audit trail could not be written.");
        let _ = writeln!(o, "# TYPE kluis_audit_write_failures_total counter");
        let _ = writeln!(o, "kluis_audit_write_failures_total {}", self.audit_failures.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP kluis_reload_failures_total Changed revocation lists or CRLs that were refused (the previous one is kept).");
        let _ = writeln!(o, "# TYPE kluis_reload_failures_total counter");
        let _ = writeln!(o, "kluis_reload_failures_total {}", self.reload_failures.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP kluis_connections_open TCP connections open on the gRPC and KMIP listeners, handshakes included.");
        let _ = writeln!(o, "# TYPE kluis_connections_open gauge");
        let _ = writeln!(o, "kluis_connections_open {}", self.connections_open.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP kluis_connections_handshake_timeout_total Connections closed because the TLS handshake did not finish in time.");
        let _ = writeln!(o, "# TYPE kluis_connections_handshake_timeout_total counter");
        let _ = writeln!(o, "kluis_connections_handshake_timeout_total {}", self.handshake_timeouts.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP kluis_connections_refused_over_cap_total Connections closed at accept because max_connections were open.");
        let _ = writeln!(o, "# TYPE kluis_connections_refused_over_cap_total counter");
        let _ = writeln!(o, "kluis_connections_refused_over_cap_total {}", self.over_cap.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP kluis_connections_idle_closed_total Connections closed after the idle timeout.");
        let _ = writeln!(o, "# TYPE kluis_connections_idle_closed_total counter");
        let _ = writeln!(o, "kluis_connections_idle_closed_total {}", self.idle_closed.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP kluis_audit_integrity_alarms_total Times the stored audit trail did not verify (nothing was signed over it).");
        let _ = writeln!(o, "# TYPE kluis_audit_integrity_alarms_total counter");
        let _ = writeln!(o, "kluis_audit_integrity_alarms_total {}", self.audit.get().map_or(0, |(alarms, _)| alarms.load(Ordering::Relaxed)));
        let _ = writeln!(o, "# HELP kluis_audit_anchor_failures_total Checkpoints or heads that could not be written to an anchor.");
        let _ = writeln!(o, "# TYPE kluis_audit_anchor_failures_total counter");
        let _ = writeln!(o, "kluis_audit_anchor_failures_total {}", self.audit.get().map_or(0, |(_, failures)| failures.load(Ordering::Relaxed)));
        let _ = writeln!(o, "# HELP kluis_master_key_up Whether the master-key provider (HSM token) answers.");
        let _ = writeln!(o, "# TYPE kluis_master_key_up gauge");
        let _ = writeln!(o, "kluis_master_key_up {}", u8::from(found.master_up));
        let _ = writeln!(o, "# HELP kluis_store_up Whether the store (for PostgreSQL: the database) answers.");
        let _ = writeln!(o, "# TYPE kluis_store_up gauge");
        let _ = writeln!(o, "kluis_store_up {}", u8::from(found.store_up));
        let _ = writeln!(o, "# HELP kluis_refusals_total Refused requests by action and reason.");
        let _ = writeln!(o, "# TYPE kluis_refusals_total counter");
        if let Ok(m) = self.refusals.lock() {
            for ((action, reason), n) in m.iter() {
                let _ = writeln!(o, "kluis_refusals_total{{action=\"{action}\",reason=\"{reason}\"}} {n}");
            }
        }
        let _ = writeln!(o, "# HELP kluis_request_errors_total Requests that failed after authorization, by gRPC code.");
        let _ = writeln!(o, "# TYPE kluis_request_errors_total counter");
        if let Ok(m) = self.errors.lock() {
            for ((action, code), n) in m.iter() {
                let _ = writeln!(o, "kluis_request_errors_total{{action=\"{action}\",code=\"{code}\"}} {n}");
            }
        }
        let _ = writeln!(o, "# HELP kluis_kmip_operations_total KMIP batch items answered, by operation and result.");
        let _ = writeln!(o, "# TYPE kluis_kmip_operations_total counter");
        if let Ok(m) = self.kmip.lock() {
            for ((operation, result), n) in m.iter() {
                let _ = writeln!(o, "kluis_kmip_operations_total{{operation=\"{operation}\",result=\"{result}\"}} {n}");
            }
        }
        let _ = writeln!(o, "# HELP kluis_request_duration_seconds Request latency by action, including the durable audit write.");
        let _ = writeln!(o, "# TYPE kluis_request_duration_seconds histogram");
        if let Ok(m) = self.latency.lock() {
            for (action, h) in m.iter() {
                let mut cum = 0;
                for (i, b) in BUCKETS.iter().enumerate() {
                    cum += h.counts[i];
                    let _ = writeln!(o, "kluis_request_duration_seconds_bucket{{action=\"{action}\",le=\"{b}\"}} {cum}");
                }
                cum += h.counts[BUCKETS.len()];
                let _ = writeln!(o, "kluis_request_duration_seconds_bucket{{action=\"{action}\",le=\"+Inf\"}} {cum}");
                let _ = writeln!(o, "kluis_request_duration_seconds_sum{{action=\"{action}\"}} {}", h.sum);
                let _ = writeln!(o, "kluis_request_duration_seconds_count{{action=\"{action}\"}} {cum}");
            }
        }
        o
    }
}

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, probe: crate::health::Probe) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        let probe = probe.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let response = if req.starts_with("GET /metrics ") || req.starts_with("GET /metrics\r") {
                let body = metrics.render(probe.check().await);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
            };
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
