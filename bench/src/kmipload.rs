//! `kluis-kmipload`: a closed-loop KMIP load generator (loopback only).
//!
//! Opens C mutual-TLS connections to a Kluis KMIP listener (a KMIP connection carries one
//! request at a time, so C is the concurrency), warms up for W seconds, measures for T
//! seconds, and prints one JSON line: operations per second, errors by result reason, and
//! latency percentiles. `create` makes AES-256 keys (durable: each is committed with its
//! registry record and audit entry before the answer); `get` first creates N keys, then
//! reads their material round-robin.
#![forbid(unsafe_code)]

#[allow(dead_code)] // shared with kluis-loadgen, which uses other parts of it
mod hist;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use kluis_kmip::message::{ContinuationOption, Operation, ProtocolVersion, Request, RequestHeader, RequestItem, Response};
use kluis_kmip::tag;
use kluis_kmip::ttlv::{HEADER_LEN, Item, Limits, decode, encode, message_len};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::hist::Histogram;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    Create,
    Get,
}

#[derive(Parser, Debug)]
#[command(name = "kluis-kmipload", version, about = "Closed-loop KMIP load generator for Kluis (loopback only)")]
struct Cli {
    /// The KMIP listener, e.g. 127.0.0.1:5696 (loopback only).
    #[arg(long)]
    addr: SocketAddr,
    /// CA certificate (PEM) the server's certificate is checked against.
    #[arg(long)]
    ca: PathBuf,
    /// Client certificate and key (PEM); the identity needs sealer (create) and restorer (get).
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// The server certificate's name.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    #[arg(long, value_enum)]
    op: Op,
    /// Connections, each with one request in flight.
    #[arg(long, short = 'c', default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    connections: u32,
    #[arg(long, short = 't', default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    #[arg(long, short = 'w', default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup: u64,
    /// Keys a `get` run creates first and reads round-robin.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
}

#[derive(Serialize)]
struct Report {
    op: Op,
    connections: u32,
    seconds: f64,
    ok: u64,
    per_second: f64,
    errors: BTreeMap<String, u64>,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn request(op: Operation, payload: Vec<Item>) -> Vec<u8> {
    let r = Request {
        header: RequestHeader {
            version: ProtocolVersion::new(1, 2),
            max_response_size: None,
            continuation: ContinuationOption::Stop,
            batch_order: true,
            batch_count: 1,
        },
        items: vec![RequestItem { operation: op, unique_id: None, payload: Item::structure(tag::REQUEST_PAYLOAD, payload) }],
    };
    match encode(&r.to_item()) {
        Ok(b) => b.to_vec(),
        Err(e) => panic!("a fixed request does not encode: {e}"),
    }
}

fn create_request() -> Vec<u8> {
    let attr = |name: &str, value: Item| Item::structure(tag::ATTRIBUTE, vec![Item::text(tag::ATTRIBUTE_NAME, name), value]);
    request(
        Operation::Create,
        vec![
            Item::enumeration(tag::OBJECT_TYPE, 2),
            Item::structure(
                tag::TEMPLATE_ATTRIBUTE,
                vec![
                    attr("Cryptographic Algorithm", Item::enumeration(tag::ATTRIBUTE_VALUE, 3)),
                    attr("Cryptographic Length", Item::integer(tag::ATTRIBUTE_VALUE, 256)),
                    attr("Cryptographic Usage Mask", Item::integer(tag::ATTRIBUTE_VALUE, 12)),
                ],
            ),
        ],
    )
}

fn get_request(uid: &str) -> Vec<u8> {
    request(Operation::Get, vec![Item::text(tag::UNIQUE_IDENTIFIER, uid)])
}

struct Conn(TlsStream<TcpStream>);

impl Conn {
    async fn open(cli: &Cli, tls: &TlsConnector) -> Result<Conn, String> {
        let tcp = TcpStream::connect(cli.addr).await.map_err(|e| format!("connect {}: {e}", cli.addr))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(cli.server_name.clone()).map_err(|e| e.to_string())?;
        Ok(Conn(tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?))
    }

    /// One request and its response; Err(reason) for a failed batch item.
    async fn call(&mut self, bytes: &[u8]) -> Result<Result<Option<Item>, String>, String> {
        self.0.write_all(bytes).await.map_err(|e| e.to_string())?;
        let mut header = [0u8; HEADER_LEN];
        self.0.read_exact(&mut header).await.map_err(|e| e.to_string())?;
        let len = message_len(&header, &Limits::default()).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; len];
        buf[..HEADER_LEN].copy_from_slice(&header);
        self.0.read_exact(&mut buf[HEADER_LEN..]).await.map_err(|e| e.to_string())?;
        let item = decode(&buf, &Limits::default()).map_err(|e| e.to_string())?;
        let resp = Response::from_item(&item).map_err(|e| e.to_string())?;
        let first = resp.items.into_iter().next().ok_or("no batch item")?;
        Ok(first.result.map_err(|f| format!("{:?}", f.reason)))
    }
}

fn tls(cli: &Cli) -> Result<TlsConnector, String> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &read(&cli.ca)?[..]) {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let certs = rustls_pemfile::certs(&mut &read(&cli.cert)?[..]).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    let key = rustls_pemfile::private_key(&mut &read(&cli.key)?[..]).map_err(|e| e.to_string())?.ok_or("no private key")?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(TlsConnector::from(Arc::new(config)))
}

async fn run(cli: Cli) -> Result<Report, String> {
    if !cli.addr.ip().is_loopback() {
        return Err(format!("{} is not a loopback address: this is a benchmark tool", cli.addr));
    }
    let tls = tls(&cli)?;
    let cli = Arc::new(cli);
    // The keys a get run reads, made first (not measured).
    let mut uids = Vec::new();
    if cli.op == Op::Get {
        let mut c = Conn::open(&cli, &tls).await?;
        for _ in 0..cli.keys {
            let p = c.call(&create_request()).await?.map_err(|r| format!("create failed: {r}"))?.ok_or("no payload")?;
            match p.child(tag::UNIQUE_IDENTIFIER).map(|u| &u.value) {
                Some(kluis_kmip::ttlv::Value::TextString(u)) => uids.push(u.clone()),
                _ => return Err("create answered no Unique Identifier".into()),
            }
        }
    }
    let uids = Arc::new(uids);
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + Duration::from_secs(cli.warmup);
    let end = measure_from + Duration::from_secs(cli.seconds);
    let mut tasks = Vec::new();
    for i in 0..cli.connections {
        let (cli, tls, uids) = (cli.clone(), tls.clone(), uids.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(&cli, &tls).await?;
            let mut hist = Histogram::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = i as usize;
            tokio::time::sleep_until(start.into()).await;
            while Instant::now() < end {
                let bytes = match cli.op {
                    Op::Create => create_request(),
                    Op::Get => {
                        n = (n + cli.connections as usize) % uids.len().max(1);
                        get_request(&uids[n])
                    }
                };
                let t = Instant::now();
                let r = c.call(&bytes).await?;
                if t >= measure_from && Instant::now() <= end {
                    match r {
                        Ok(_) => hist.record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)),
                        Err(reason) => *errors.entry(reason).or_default() += 1,
                    }
                }
            }
            Ok::<_, String>((hist, errors))
        }));
    }
    let mut hist = Histogram::new();
    let mut errors = BTreeMap::new();
    for t in tasks {
        let (h, e) = t.await.map_err(|e| e.to_string())??;
        hist.merge(&h);
        for (k, v) in e {
            *errors.entry(k).or_insert(0) += v;
        }
    }
    let secs = cli.seconds as f64;
    Ok(Report {
        op: cli.op,
        connections: cli.connections,
        seconds: secs,
        ok: hist.count(),
        per_second: hist.count() as f64 / secs,
        errors,
        p50_ms: hist.quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kluis-kmipload: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(r) => match serde_json::to_string(&r) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kluis-kmipload: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("kluis-kmipload: {e}");
            ExitCode::FAILURE
        }
    }
}
