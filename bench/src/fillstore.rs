//! `kluis-fillstore --data-dir D --keys N`: fills the registry of a stopped `kms-server dev`
//! data directory with N more issued data keys, in process, through the server's own
//! `KeyManager::generate_data_key` (the same code path as the GenerateDataKey handler after
//! authentication): every key is a real registry record wrapped under the keyring, with its
//! expiry entry, issue counter and a chained, checkpointed audit entry, committed durably by
//! the real redb store with its group commit. Only TLS and gRPC are skipped, so a registry of
//! 10 million keys takes minutes instead of an hour. The file is the server's real format:
//! the server opens it as it is.
//!
//! Prints progress to stderr and one JSON line to stdout (keys, seconds, rate).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use clap::Parser;
use kms_server::auth::{Action, Policy, Principal};
use kms_server::config::ServerConfig;
use kms_server::model::Outcome;
use kms_server::startup::{Environment, open_keys};

#[derive(Parser)]
#[command(about = "Fill a stopped kms-server dev registry with issued data keys (benchmarks)")]
struct Args {
    /// The `kms-server dev --data-dir` directory (server.toml, pki/); the server must be stopped.
    #[arg(long)]
    data_dir: PathBuf,
    /// How many keys to issue.
    #[arg(long)]
    keys: u64,
    /// Issuing tasks in flight (the store commits them in groups).
    #[arg(long, default_value_t = 512)]
    in_flight: u64,
    /// The keyring and the dev identity that issues.
    #[arg(long, default_value = "default")]
    keyring: String,
    #[arg(long, default_value = "sealer")]
    identity: String,
    /// After filling, scrub the store (rewrite the file) and report how long commits waited.
    #[arg(long)]
    scrub: bool,
}

fn pem_der(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let b64: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))
}

async fn run(a: Args) -> Result<serde_json::Value, String> {
    let cfg = ServerConfig::load(&a.data_dir.join("server.toml")).map_err(|e| e.to_string())?;
    let keys = open_keys(&cfg, &Environment::default()).map_err(|e| e.to_string())?;
    let der = pem_der(&a.data_dir.join("pki/clients").join(format!("{}.pem", a.identity)))?;
    let principal = Principal::from_certificate(&der, cfg.auth.identity).map_err(|e| e.to_string())?;
    let policy = Policy::new(cfg.grants.clone());
    let next = Arc::new(AtomicU64::new(0));
    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.in_flight {
        let (keys, next, principal, keyring) = (keys.clone(), next.clone(), principal.clone(), a.keyring.clone());
        let auth = policy.authorize(&principal, Action::GenerateDataKey, Some(&keyring)).map_err(|e| e.to_string())?;
        let total = a.keys;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), String>(());
                }
                let backup_id = format!("fill-{i}");
                let ev = keys.event(principal.name(), Action::GenerateDataKey.name(), Some(&keyring), Some(&backup_id), Outcome::ok());
                let labels = [("tool".to_owned(), "kluis-fillstore".to_owned()), ("n".to_owned(), i.to_string())];
                keys.generate_data_key(&auth, &keyring, &backup_id, labels, ev).await.map_err(|e| e.to_string())?;
                if (i + 1) % 1_000_000 == 0 {
                    eprintln!("kluis-fillstore: {} keys in {:.0} s", i + 1, t0.elapsed().as_secs_f64());
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut out = serde_json::json!({ "keys": a.keys, "seconds": secs, "rate_per_second": a.keys as f64 / secs });
    if a.scrub {
        let r = keys.scrub_now().await.map_err(|e| e.to_string())?;
        out["scrub"] = serde_json::json!({ "bytes_before": r.bytes_before, "bytes_after": r.bytes_after, "seconds": r.millis as f64 / 1000.0 });
    }
    drop(keys);
    Ok(out)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kluis-fillstore: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kluis-fillstore: {e}");
            ExitCode::FAILURE
        }
    }
}
