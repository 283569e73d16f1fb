//! `kluis-loadgen`: a closed-loop load generator for the Kluis key service.
//!
//! Opens C mTLS connections (each its own tonic `Channel`, built the way
//! `kms_client::client::KmsClient::connect` builds one), keeps S requests in
//! flight on each, warms up for W seconds, measures for T seconds, stops by
//! itself and reports throughput, errors by gRPC code and latency percentiles.
//!
//! Only loopback endpoints are accepted: this is a benchmark tool, not a way
//! to load somebody's production server.
#![forbid(unsafe_code)]

mod hist;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use kluis_proto::v1 as pb;
use kluis_proto::v1::key_service_client::KeyServiceClient;
use kms_client::client::{ClientError, EndpointFailure};
use kms_client::config::ClientConfig;
use kms_client::retry::{self, FailoverNotice, Rpc};
use serde::Serialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::HealthCheckRequest;

use crate::hist::Histogram;

/// How long in-flight requests may run past the end of the measurement
/// before the tasks are aborted.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Linux reports process CPU times in USER_HZ ticks, which is 100 on every
/// architecture's user ABI.
const USER_HZ: f64 = 100.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    /// kluis.v1.KeyService/GenerateDataKey (durable issuance).
    Generate,
    /// kluis.v1.KeyService/UnwrapDataKey over keys issued before the run.
    Unwrap,
    /// grpc.health.v1.Health/Check (the no-op floor).
    Health,
}

#[derive(Parser, Debug)]
#[command(name = "kluis-loadgen", version, about = "Closed-loop load generator for the Kluis key service (loopback only)")]
struct Cli {
    /// Client config (TOML) used for `generate` and `health`, and to issue the keys an
    /// `unwrap` run unwraps (needs the sealer role).
    #[arg(long, env = "KLUIS_CLIENT_CONFIG")]
    client_config: PathBuf,
    /// Client config used for the UnwrapDataKey calls (needs the restorer role);
    /// defaults to --client-config (e.g. the dev identity, which has every role).
    #[arg(long)]
    unwrap_client_config: Option<PathBuf>,
    #[arg(long, value_enum)]
    op: Op,
    /// Connections (each its own HTTP/2 + TLS connection).
    #[arg(long, short = 'c', default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    connections: u32,
    /// Concurrent in-flight requests per connection.
    #[arg(long, short = 's', default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    streams: u32,
    /// Measured duration, seconds.
    #[arg(long, short = 't', default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Warm-up before the measurement, seconds (requests run but are not counted).
    #[arg(long, short = 'w', default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup: u64,
    /// Keyring for generate (and for the keys an unwrap run issues first).
    #[arg(long, default_value = "default")]
    keyring: String,
    /// Number of keys to issue before an unwrap run (unwrapped round-robin).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    unwrap_keys: u32,
    /// PID of the server on this machine: report its CPU use during the measurement.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Free-form tag copied into the report (e.g. the master-key provider).
    #[arg(long)]
    tag: Option<String>,
    /// Print the report as one JSON object on stdout (the human line goes to stderr).
    #[arg(long)]
    json: bool,
    /// Open the connections round-robin over every endpoint of the config (the load spread
    /// over several replicas) instead of all to the first endpoint that takes them.
    #[arg(long)]
    spread: bool,
}

#[derive(Serialize, Debug)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

#[derive(Serialize, Debug)]
struct Report {
    op: Op,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
    endpoint: String,
    connections: u32,
    streams_per_connection: u32,
    in_flight: u32,
    warmup_seconds: u64,
    seconds: f64,
    requests_ok: u64,
    errors_total: u64,
    errors: BTreeMap<String, u64>,
    rate_per_second: f64,
    /// Latency of successful requests in the measured window, microseconds.
    latency_us: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    unwrap_keys: Option<u32>,
    /// CPU used by this load generator during the measurement, in cores (1.0 = one core busy).
    #[serde(skip_serializing_if = "Option::is_none")]
    client_cpu_cores: Option<f64>,
    /// CPU used by the server (--server-pid) during the measurement, in cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_cpu_cores: Option<f64>,
    /// CPU used by everything else on the machine during the measurement (needs --server-pid), in cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    other_cpu_cores: Option<f64>,
    /// CPU time the hypervisor gave to other guests during the measurement (steal), in cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    steal_cpu_cores: Option<f64>,
    /// Cores this process may use.
    machine_cores: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kluis-loadgen: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(report) => {
            if report.requests_ok == 0 {
                eprintln!("kluis-loadgen: no request succeeded");
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kluis-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the endpoint `url` of `cfg` as `KmsClient::connect` does (mTLS with the config's
/// CA and client certificate, the server name checked per endpoint, connect timeout and
/// per-request timeout from the config).
fn endpoint(cfg: &ClientConfig, url: &str, tls: &ClientTlsConfig) -> Result<Endpoint, String> {
    let mut tls = tls.clone();
    if let Some(name) = &cfg.server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(Endpoint::from_shared(url.to_owned())
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| format!("invalid server endpoint {url:?}: {e}"))?
        .connect_timeout(cfg.connect_timeout())
        .timeout(cfg.timeout()))
}

/// Refuses any endpoint that does not resolve to loopback addresses only.
async fn require_loopback(ep: &Endpoint) -> Result<(), String> {
    let uri = ep.uri();
    let host = uri.host().ok_or_else(|| format!("endpoint {uri} has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .map(|a| a.ip())
            .collect(),
    };
    if addrs.is_empty() || addrs.iter().any(|a| !a.is_loopback()) {
        return Err(format!("endpoint {uri} is not a loopback address; kluis-loadgen only loads a local server"));
    }
    Ok(())
}

/// Opens `n` separate connections (one `Channel` each) to the first endpoint of the config
/// that takes them all; returns that endpoint too. An endpoint that is unavailable (as
/// `kms_client::retry::next_step` decides, the same decision as `KmsClient`'s) is passed
/// over with one line on stderr; any other failure (a server certificate of another CA, ...)
/// is final. Once connected the run stays on that endpoint: errors during the measurement
/// are counted, not failed over (they are what a load test reports).
async fn connect_all(path: &Path, n: u32, spread: bool) -> Result<(Vec<Channel>, ClientConfig, String), String> {
    let cfg = ClientConfig::load(path).map_err(|e| e.to_string())?;
    cfg.check_key_permissions().map_err(|e| e.to_string())?;
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("could not read {}: {e}", p.display()));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&cfg.ca)?))
        .identity(Identity::from_pem(read(&cfg.cert)?, read(&cfg.key)?));
    let mut eps = Vec::with_capacity(cfg.endpoints.len());
    for url in &cfg.endpoints {
        let ep = endpoint(&cfg, url, &tls)?;
        require_loopback(&ep).await?;
        eps.push(ep);
    }
    if spread {
        let mut channels = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            let (url, ep) = (&cfg.endpoints[i % eps.len()], &eps[i % eps.len()]);
            channels.push(ep.connect().await.map_err(|e| ClientError::from_connect(url, e).to_string())?);
        }
        return Ok((channels, cfg.clone(), cfg.endpoints.join(" + ")));
    }
    let mut failures = Vec::new();
    for (i, (url, ep)) in cfg.endpoints.iter().zip(&eps).enumerate() {
        let e = match connect_n(ep, n).await {
            Ok(channels) => return Ok((channels, cfg.clone(), url.clone())),
            Err(e) => ClientError::from_connect(url, e),
        };
        let Some(cause) = retry::next_step(Rpc::Connect, &e) else { return Err(e.to_string()) };
        if let Some(to) = cfg.endpoints.get(i + 1) {
            eprintln!("{}", FailoverNotice { rpc: Rpc::Connect, from: url.clone(), cause, to: to.clone() });
        }
        failures.push(EndpointFailure { endpoint: url.clone(), error: e });
    }
    Err(match failures.pop() {
        Some(only) if failures.is_empty() => only.error.to_string(),
        last => {
            failures.extend(last);
            ClientError::NoEndpointAvailable { failures }.to_string()
        }
    })
}

/// `n` connections to one endpoint.
async fn connect_n(ep: &Endpoint, n: u32) -> Result<Vec<Channel>, tonic::transport::Error> {
    let mut channels = Vec::with_capacity(n as usize);
    for _ in 0..n {
        channels.push(ep.connect().await?);
    }
    Ok(channels)
}

/// A key issued before an unwrap run. Throwaway bench keys on a dev server.
struct Issued {
    key_id: String,
    wrapped: Vec<u8>,
    plaintext: Vec<u8>,
}

fn labels() -> HashMap<String, String> {
    HashMap::from([("host".to_owned(), "loadgen".to_owned()), ("tool".to_owned(), "kluis-loadgen".to_owned())])
}

fn run_id() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}-{}", nanos, std::process::id())
}

/// Issues `n` keys with `conc` requests in flight spread over `channels`.
async fn issue_keys(channels: &[Channel], keyring: &str, n: usize, conc: usize, timeout: Duration) -> Result<Vec<Issued>, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let prefix = format!("loadgen/{}/prep", run_id());
    let mut set = tokio::task::JoinSet::new();
    for t in 0..conc.min(n) {
        let mut client = KeyServiceClient::new(channels[t % channels.len()].clone());
        let next = next.clone();
        let keyring = keyring.to_owned();
        let prefix = prefix.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, String>(out);
                }
                let req = pb::GenerateDataKeyRequest { keyring: keyring.clone(), backup_id: format!("{prefix}/{i}"), labels: labels() };
                let r = tokio::time::timeout(timeout, client.generate_data_key(req))
                    .await
                    .map_err(|_| "issuing the keys to unwrap timed out".to_owned())?
                    .map_err(|s| format!("issuing the keys to unwrap failed: {:?}: {}", s.code(), s.message()))?
                    .into_inner();
                out.push(Issued { key_id: r.key_id, wrapped: r.wrapped_key, plaintext: r.plaintext_key });
            }
        });
    }
    let mut keys = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        keys.extend(r.map_err(|e| format!("issuing task failed: {e}"))??);
    }
    Ok(keys)
}

/// What one task calls.
enum Call {
    Health(HealthClient<Channel>),
    Generate { client: KeyServiceClient<Channel>, keyring: String, prefix: String, n: u64 },
    Unwrap { client: KeyServiceClient<Channel>, keyring: String, keys: Arc<Vec<Issued>>, next: usize, step: usize },
}

/// One request; `Err` carries the error class (gRPC code name or a local cause).
impl Call {
    async fn once(&mut self) -> Result<(), String> {
        let code = |s: tonic::Status| format!("{:?}", s.code());
        match self {
            Call::Health(c) => {
                let r = c.check(HealthCheckRequest { service: String::new() }).await.map_err(code)?.into_inner();
                if r.status == ServingStatus::Serving as i32 { Ok(()) } else { Err("NotServing".to_owned()) }
            }
            Call::Generate { client, keyring, prefix, n } => {
                *n += 1;
                let req = pb::GenerateDataKeyRequest { keyring: keyring.clone(), backup_id: format!("{prefix}/{n}"), labels: labels() };
                let r = client.generate_data_key(req).await.map_err(code)?.into_inner();
                if r.plaintext_key.len() == 32 && !r.wrapped_key.is_empty() { Ok(()) } else { Err("BadResponse".to_owned()) }
            }
            Call::Unwrap { client, keyring, keys, next, step } => {
                let k = &keys[*next % keys.len()];
                *next = next.wrapping_add(*step);
                let req = pb::UnwrapDataKeyRequest { key_id: k.key_id.clone(), wrapped_key: k.wrapped.clone(), keyring: keyring.clone() };
                let r = client.unwrap_data_key(req).await.map_err(code)?.into_inner();
                if r.plaintext_key == k.plaintext { Ok(()) } else { Err("WrongKey".to_owned()) }
            }
        }
    }
}

#[derive(Default)]
struct TaskStats {
    hist: Histogram,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

/// Closed loop: issue, wait, record; only completions inside [measure_from, end] count.
async fn worker(mut call: Call, measure_from: Instant, end: Instant, timeout: Duration) -> TaskStats {
    let mut st = TaskStats::default();
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            return st;
        }
        let r = match tokio::time::timeout(timeout, call.once()).await {
            Ok(r) => r,
            Err(_) => Err("Timeout".to_owned()),
        };
        let t1 = Instant::now();
        if t1 < measure_from {
            continue;
        }
        if t1 > end {
            return st;
        }
        match r {
            Ok(()) => {
                st.ok += 1;
                st.hist.record(u64::try_from((t1 - t0).as_micros()).unwrap_or(u64::MAX));
            }
            Err(e) => *st.errors.entry(e).or_default() += 1,
        }
    }
}

/// Machine-wide CPU time from /proc/stat, seconds: (busy, steal). Busy counts
/// every non-idle state except steal (time the hypervisor gave to others).
fn machine_cpu_seconds() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = *v.get(..8)? else { return None };
    Some(((user + nice + system + irq + softirq) / USER_HZ, steal / USER_HZ))
}

/// CPU counters at one moment.
#[derive(Clone, Copy)]
struct CpuSample {
    client: Option<f64>,
    server: Option<f64>,
    machine: Option<(f64, f64)>,
}

impl CpuSample {
    fn now(server_pid: Option<u32>) -> Self {
        Self { client: cpu_seconds(None), server: server_pid.and_then(|p| cpu_seconds(Some(p))), machine: machine_cpu_seconds() }
    }
}

/// (utime + stime) of a process in seconds, from /proc.
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after "pid (comm)": state is field 3, utime 14, stime 15.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

async fn run(cli: Cli) -> Result<Report, String> {
    let c = cli.connections;
    let s = cli.streams;
    let tasks = (c * s) as usize;

    let (gen_channels, gen_cfg, gen_endpoint) = connect_all(&cli.client_config, c, cli.spread).await?;
    let timeout = gen_cfg.timeout();
    let mut calls = Vec::with_capacity(tasks);
    let (endpoint, unwrap_keys) = match cli.op {
        Op::Health | Op::Generate => {
            let prefix = format!("loadgen/{}", run_id());
            for t in 0..tasks {
                let ch = gen_channels[t % c as usize].clone();
                calls.push(match cli.op {
                    Op::Health => Call::Health(HealthClient::new(ch)),
                    _ => Call::Generate {
                        client: KeyServiceClient::new(ch),
                        keyring: cli.keyring.clone(),
                        prefix: format!("{prefix}/{t}"),
                        n: 0,
                    },
                });
            }
            (gen_endpoint, None)
        }
        Op::Unwrap => {
            let n = cli.unwrap_keys as usize;
            eprintln!("kluis-loadgen: issuing {n} keys to unwrap");
            let keys = Arc::new(issue_keys(&gen_channels, &cli.keyring, n, tasks, timeout).await?);
            drop(gen_channels);
            let path = cli.unwrap_client_config.as_deref().unwrap_or(&cli.client_config);
            let (channels, _, endpoint) = connect_all(path, c, cli.spread).await?;
            for t in 0..tasks {
                calls.push(Call::Unwrap {
                    client: KeyServiceClient::new(channels[t % c as usize].clone()),
                    keyring: cli.keyring.clone(),
                    keys: keys.clone(),
                    next: t,
                    step: tasks,
                });
            }
            (endpoint, Some(cli.unwrap_keys))
        }
    };

    let start = Instant::now();
    let measure_from = start + Duration::from_secs(cli.warmup);
    let end = measure_from + Duration::from_secs(cli.seconds);
    let mut set = tokio::task::JoinSet::new();
    for call in calls {
        set.spawn(worker(call, measure_from, end, timeout));
    }

    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = CpuSample::now(cli.server_pid);
    let m0 = Instant::now();
    tokio::time::sleep_until(end.into()).await;
    let cpu1 = CpuSample::now(cli.server_pid);
    let measured = (Instant::now() - m0).as_secs_f64();

    let mut hist = Histogram::new();
    let mut ok = 0u64;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let drain = tokio::time::sleep(DRAIN_GRACE);
    tokio::pin!(drain);
    loop {
        tokio::select! {
            r = set.join_next() => match r {
                Some(Ok(st)) => {
                    hist.merge(&st.hist);
                    ok += st.ok;
                    for (k, v) in st.errors {
                        *errors.entry(k).or_default() += v;
                    }
                }
                Some(Err(e)) => *errors.entry(format!("TaskFailed({e})")).or_default() += 1,
                None => break,
            },
            _ = &mut drain => {
                // In-flight requests that outlive the grace are dropped (and not counted).
                set.abort_all();
                eprintln!("kluis-loadgen: {} tasks still in flight {DRAIN_GRACE:?} after the end; aborted", set.len());
                break;
            }
        }
    }

    let delta = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if measured > 0.0 => Some((b - a) / measured),
        _ => None,
    };
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let client_cores = delta(cpu0.client, cpu1.client);
    let server_cores = delta(cpu0.server, cpu1.server);
    let busy_cores = delta(cpu0.machine.map(|m| m.0), cpu1.machine.map(|m| m.0));
    let steal_cores = delta(cpu0.machine.map(|m| m.1), cpu1.machine.map(|m| m.1));
    // Everything else the machine ran meanwhile (other builds, tests), only when the server is known.
    let other_cores = match (busy_cores, client_cores, server_cores) {
        (Some(b), Some(c), Some(s)) => Some((b - c - s).max(0.0)),
        _ => None,
    };
    let errors_total = errors.values().sum();
    let report = Report {
        op: cli.op,
        tag: cli.tag.clone(),
        endpoint,
        connections: c,
        streams_per_connection: s,
        in_flight: c * s,
        warmup_seconds: cli.warmup,
        seconds: (measured * 1000.0).round() / 1000.0,
        requests_ok: ok,
        errors_total,
        errors,
        rate_per_second: ((ok as f64 / measured) * 10.0).round() / 10.0,
        latency_us: Latency {
            p50: hist.quantile(0.50),
            p90: hist.quantile(0.90),
            p99: hist.quantile(0.99),
            p999: hist.quantile(0.999),
            max: hist.max(),
            mean: (hist.mean() * 10.0).round() / 10.0,
        },
        unwrap_keys,
        client_cpu_cores: client_cores.map(round2),
        server_cpu_cores: server_cores.map(round2),
        other_cpu_cores: other_cores.map(round2),
        steal_cpu_cores: steal_cores.map(round2),
        machine_cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    };
    let line = human(&report);
    if cli.json {
        eprintln!("{line}");
        println!("{}", serde_json::to_string(&report).map_err(|e| format!("cannot encode the report: {e}"))?);
    } else {
        println!("{line}");
    }
    Ok(report)
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn human(r: &Report) -> String {
    let op = match r.op {
        Op::Generate => "generate",
        Op::Unwrap => "unwrap",
        Op::Health => "health",
    };
    let mut line = format!(
        "{op}{tag}: {c}x{s} in flight, {secs:.1} s: {ok} ok, {err} errors, {rate:.0}/s; latency p50 {p50}, p99 {p99}, p99.9 {p999}, max {max}",
        tag = r.tag.as_deref().map(|t| format!(" [{t}]")).unwrap_or_default(),
        c = r.connections,
        s = r.streams_per_connection,
        secs = r.seconds,
        ok = r.requests_ok,
        err = r.errors_total,
        rate = r.rate_per_second,
        p50 = ms(r.latency_us.p50),
        p99 = ms(r.latency_us.p99),
        p999 = ms(r.latency_us.p999),
        max = ms(r.latency_us.max),
    );
    if !r.errors.is_empty() {
        let e: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line.push_str(&format!(" (errors: {})", e.join(", ")));
    }
    if let Some(cpu) = r.client_cpu_cores {
        line.push_str(&format!("; cpu: loadgen {cpu:.2}"));
        if let Some(s) = r.server_cpu_cores {
            line.push_str(&format!(", server {s:.2}"));
        }
        if let Some(o) = r.other_cpu_cores {
            line.push_str(&format!(", others {o:.2}"));
        }
        if let Some(st) = r.steal_cpu_cores {
            line.push_str(&format!(", steal {st:.2}"));
        }
        line.push_str(&format!(" of {} cores", r.machine_cores));
    }
    line
}
