//! Harness for the end-to-end tests: starts the real `kms-server` binary on
//! port 0 in a temp dir and runs the real CLIs against it.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which the
//! project's test command does).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod kmip;
pub mod pg;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// `grpc.health.v1` status SERVING.
pub const SERVING: i32 = 1;
/// `grpc.health.v1` status NOT_SERVING.
pub const NOT_SERVING: i32 = 2;

/// The health status the server reports now for `kluis.v1.KeyService` (as the auditor
/// of its dev PKI).
pub async fn health_status(server: &Server) -> i32 {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let pki = server.data_dir().join("pki");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.join("ca.pem")).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(pki.join("clients/auditor.pem")).unwrap(),
            std::fs::read(pki.join("clients/auditor.key")).unwrap(),
        ))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    HealthClient::new(ch).check(HealthCheckRequest { service: "kluis.v1.KeyService".into() }).await.unwrap().into_inner().status
}

/// [`health_status`] for a synchronous test.
pub fn health_now(server: &Server) -> i32 {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(health_status(server))
}

/// Path of a workspace binary next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (the README test command does)",
        p.display()
    );
    p
}

/// Where the server's master key lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// A key file in the data directory.
    Software,
    /// A non-extractable key on a real SoftHSM2 token made for this server.
    SoftHsm,
}

/// The SoftHSM2 PKCS#11 module (Debian package softhsm2).
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 token in its own temp directory (its own softhsm2.conf).
pub struct SoftHsmToken {
    pub conf: PathBuf,
    pub pin_file: PathBuf,
    pub label: String,
}

impl SoftHsmToken {
    /// Creates `dir/softhsm2.conf`, `dir/tokens/` and a token labelled `label` (user PIN 1234).
    pub fn create(dir: &Path, label: &str) -> Self {
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(&conf, format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display())).unwrap();
        let pin_file = dir.join("pin");
        std::fs::write(&pin_file, "1234\n").unwrap();
        std::fs::set_permissions(&pin_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label, "--pin", "1234", "--so-pin", "5678"])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util (Debian package softhsm2) is required");
        assert!(out.status.success(), "softhsm2-util: {}", String::from_utf8_lossy(&out.stderr));
        Self { conf, pin_file, label: label.to_owned() }
    }
}

/// A running `kms-server dev` in its own temp directory.
pub struct Server {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub provider: Provider,
    pub token: Option<SoftHsmToken>,
    /// Extra environment for the server process (applies from the next start).
    pub env: Vec<(String, String)>,
    /// `host:port` of the metrics endpoint, if the config enables it.
    pub metrics_addr: Option<String>,
    /// `host:port` of the KMIP listener, if started with `--kmip-listen`.
    pub kmip_addr: Option<String>,
    /// Extra arguments of `kms-server dev` (e.g. `--client-endpoint URL`).
    pub args: Vec<String>,
    /// The PostgreSQL store (`kms-server dev --store-url`), if not the redb file.
    pub store_url: Option<String>,
    stderr_path: PathBuf,
    /// The PostgreSQL cluster this server's store lives in, if [`Server::start_with`] made
    /// one (dropped after the server: fields drop after `Drop::drop`).
    _pg: Option<pg::Postgres>,
}

/// Where a server keeps its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded redb file in the data directory.
    Redb,
    /// A database on a real PostgreSQL cluster started for the server.
    Postgres,
}

/// What the end-to-end suite runs under: a master-key provider and a store (see
/// [`per_provider!`]). A [`Provider`] alone means its store is redb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setup {
    pub provider: Provider,
    pub store: StoreKind,
}

impl From<Provider> for Setup {
    fn from(provider: Provider) -> Self {
        Setup { provider, store: StoreKind::Redb }
    }
}

impl Server {
    /// Starts `kms-server dev` with a software master key on 127.0.0.1:0 in a fresh temp dir.
    pub fn start() -> Self {
        Self::start_with(Provider::Software)
    }

    /// Starts `kms-server dev` with the given master-key provider (and store: on
    /// PostgreSQL, a cluster of its own that lives as long as the server).
    pub fn start_with(setup: impl Into<Setup>) -> Self {
        let Setup { provider, store } = setup.into();
        let dir = tempfile::tempdir().unwrap();
        let token = (provider == Provider::SoftHsm).then(|| SoftHsmToken::create(&dir.path().join("hsm"), "kluis-test"));
        let pg = (store == StoreKind::Postgres).then(|| {
            let pg = pg::Postgres::start();
            pg.create_db("kluis");
            pg
        });
        let store_url = pg.as_ref().map(|pg| pg.url("kluis"));
        let mut s = Server {
            child: None,
            dir,
            addr: String::new(),
            provider,
            token,
            env: Vec::new(),
            metrics_addr: None,
            kmip_addr: None,
            args: Vec::new(),
            store_url,
            stderr_path: PathBuf::new(),
            _pg: pg,
        };
        s.spawn();
        s
    }

    /// Starts `kms-server dev` (software master key) with extra arguments.
    pub fn start_with_args(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        let mut s = Server { child: None, dir, addr: String::new(), provider: Provider::Software, token: None, env: Vec::new(), metrics_addr: None, kmip_addr: None, args, store_url: None, stderr_path: PathBuf::new(), _pg: None };
        s.spawn();
        s
    }

    /// Starts `kms-server dev --store-url URL` (software master key): the store is that
    /// PostgreSQL database (see [`pg::Postgres`]), which must exist and be empty.
    pub fn start_on_postgres(url: &str) -> Self {
        let mut s = Server {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            addr: String::new(),
            provider: Provider::Software,
            token: None,
            env: Vec::new(),
            metrics_addr: None,
            kmip_addr: None,
            args: Vec::new(),
            store_url: Some(url.to_owned()),
            stderr_path: PathBuf::new(),
            _pg: None,
        };
        s.spawn();
        s
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("kluis")
    }

    fn spawn(&mut self) {
        self.spawn_on("127.0.0.1:0");
    }

    fn spawn_on(&mut self, listen: &str) {
        self.stderr_path = self.dir.path().join(format!("server-{}.log", self.addr.len() + rand_suffix()));
        let log = std::fs::File::create(&self.stderr_path).unwrap();
        // Test seams (a clock file, injected faults) exist only in kms-server-testkit.
        let seams = self.env.iter().any(|(k, _)| k.starts_with("KLUIS_TEST_"));
        let mut cmd = Command::new(bin(if seams { "kms-server-testkit" } else { "kms-server" }));
        cmd.args(["dev", "--data-dir"]).arg(self.data_dir()).args(["--listen", listen]).args(&self.args).env("KLUIS_LOG", "warn");
        if let Some(url) = &self.store_url {
            cmd.args(["--store-url", url]);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(t) = &self.token {
            cmd.args(["--pkcs11-module", SOFTHSM_MODULE, "--pkcs11-token-label", &t.label, "--pkcs11-pin-file"])
                .arg(&t.pin_file)
                .env("SOFTHSM2_CONF", &t.conf);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // Blocks until the server announces itself or exits; no sleeping.
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(a) = line.strip_prefix("kms-server metrics on http://") {
                        self.metrics_addr = a.strip_suffix("/metrics").map(str::to_owned);
                    }
                    if let Some(a) = line.strip_prefix("kmip listening on ") {
                        self.kmip_addr = Some(a.to_owned());
                    }
                    if let Some(a) = line.strip_prefix("kms-server listening on ") {
                        break a.to_owned();
                    }
                }
                _ => {
                    let _ = child.wait();
                    panic!("kms-server exited before listening:\n{}", std::fs::read_to_string(&self.stderr_path).unwrap_or_default());
                }
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.addr = addr;
        self.child = Some(child);
    }

    /// The client config of a dev identity (sealer, restorer, officer, auditor, dev).
    pub fn client(&self, name: &str) -> PathBuf {
        self.data_dir().join("clients").join(format!("{name}.toml"))
    }

    /// The process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts again on the same data directory (new port; client configs are rewritten).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts again on the same data directory and the same address, after [`Server::kill9`]
    /// (a no-op kill if it still runs): clients configured for it reach it again.
    pub fn start_again(&mut self) {
        self.kill9();
        let addr = self.addr.clone();
        self.spawn_on(&addr);
    }

    /// A copy of the dev identity `who`'s client config with `extra` appended (e.g. a
    /// `[retry]` table), as `DIR/file`. `kms-server dev` rewrites its own configs at each
    /// start; this copy stays.
    pub fn client_with(&self, who: &str, file: &str, extra: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.client(who)).unwrap();
        let p = self.dir.path().join(file);
        std::fs::write(&p, format!("{text}{extra}")).unwrap();
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits until the server's log (since its last start) has a line containing every one
    /// of `needles` (checking every 20 ms; panics after two minutes); returns it. The log
    /// level is `warn` unless [`Server::env`] sets `KLUIS_LOG`.
    pub fn wait_for_line(&self, needles: &[&str]) -> String {
        let start = std::time::Instant::now();
        loop {
            if let Some(line) = self.log().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(120), "no line with {needles:?} in:\n{}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// `kmsctl` as the dev identity `who` (no stdin).
    pub fn kmsctl(&self, who: &str, args: &[&str]) -> Output {
        kmsctl(&self.client(who), args)
    }

    /// `backup-hook` as the dev identity `who`, with `stdin`.
    pub fn backup_hook(&self, who: &str, args: &[&str], stdin: &[u8]) -> Output {
        backup_hook(&self.client(who), args, stdin)
    }

    /// Inserts `lines` at the top level of `server.toml` (after `version = 1`); takes
    /// effect at the next restart.
    pub fn set_top_level(&self, lines: &str) {
        let cfg = self.data_dir().join("server.toml");
        let text = std::fs::read_to_string(&cfg).unwrap().replacen("version = 1\n", &format!("version = 1\n{lines}"), 1);
        std::fs::write(&cfg, text).unwrap();
    }

    /// A second officer for dual control: a certificate `name` from the dev CA, granted
    /// officer on all keyrings in `server.toml`, then a restart. Returns its client config
    /// (the officer's, with the new certificate and key).
    pub fn add_officer(&mut self, name: &str) -> PathBuf {
        let pki = self.data_dir().join("pki");
        let out = kmsctl_offline(&["cert", "issue", "--ca-dir", s(&pki), "--name", name]);
        assert!(out.status.success(), "{}", stderr(&out));
        let cfg = self.data_dir().join("server.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, text + &format!("\n[[grant]]\nprincipal = \"{name}\"\nroles = [\"officer\"]\nkeyrings = [\"*\"]\n")).unwrap();
        self.restart();
        let text = std::fs::read_to_string(self.client("officer"))
            .unwrap()
            .replace("officer.pem", &format!("{name}.pem"))
            .replace("officer.key", &format!("{name}.key"));
        let p = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Another certificate of the dev identity `name`: the same common name (so the same
    /// principal), a new key, from the dev CA. Returns a client config that uses it.
    pub fn another_certificate(&self, name: &str) -> PathBuf {
        let pki = self.data_dir().join("pki");
        let out_dir = self.dir.path().join(format!("again-{name}"));
        let out = kmsctl_offline(&["cert", "issue", "--ca-dir", s(&pki), "--name", name, "--out", s(&out_dir)]);
        assert!(out.status.success(), "{}", stderr(&out));
        let (cert, key) = (out_dir.join(format!("{name}.pem")), out_dir.join(format!("{name}.key")));
        let first = self.client(name);
        let text = std::fs::read_to_string(&first).unwrap();
        let mut lines = Vec::new();
        for l in text.lines() {
            if l.starts_with("cert =") {
                let old = l.trim_start_matches("cert =").trim().trim_matches('"');
                assert_ne!(std::fs::read(old).unwrap(), std::fs::read(&cert).unwrap(), "a certificate other than the dev one");
                lines.push(format!("cert = {:?}", s(&cert)));
            } else if l.starts_with("key =") {
                lines.push(format!("key = {:?}", s(&key)));
            } else {
                lines.push(l.to_owned());
            }
        }
        let p = self.dir.path().join(format!("{name}-again.toml"));
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    }
}

fn rand_suffix() -> usize {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    u32::from_le_bytes(b) as usize
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a binary with args and stdin bytes; returns its output.
pub fn run(name: &str, args: &[&str], stdin: &[u8]) -> Output {
    run_env(name, args, stdin, &[])
}

pub fn run_env(name: &str, args: &[&str], stdin: &[u8], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(bin(name));
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).env_remove("KLUIS_CLIENT_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut sin = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = sin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// `kmsctl --client-config CFG ARGS...` (no stdin).
pub fn kmsctl(cfg: &Path, args: &[&str]) -> Output {
    with_config("kmsctl", cfg, args, b"")
}

/// `backup-hook --client-config CFG ARGS...` with `stdin`.
pub fn backup_hook(cfg: &Path, args: &[&str], stdin: &[u8]) -> Output {
    with_config("backup-hook", cfg, args, stdin)
}

/// `kmsctl` with no client config (offline: `cert issue`, `escrow ceremony`, `audit verify --public-key`, ...).
pub fn kmsctl_offline(args: &[&str]) -> Output {
    run("kmsctl", args, b"")
}

fn with_config(name: &str, cfg: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut all = vec!["--client-config", s(cfg)];
    all.extend_from_slice(args);
    run(name, &all, stdin)
}

/// `backup-hook seal` of `data` as `identity`; returns the sealed bytes (asserts success).
pub fn seal(server: &Server, identity: &str, keyring: &str, backup_id: &str, data: &[u8]) -> Vec<u8> {
    let out = server.backup_hook(identity, &["seal", "--keyring", keyring, "--backup-id", backup_id], data);
    assert!(out.status.success(), "seal failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// `backup-hook unseal` of `sealed` as `identity`; returns the output.
pub fn unseal(server: &Server, identity: &str, sealed: &[u8]) -> Output {
    server.backup_hook(identity, &["unseal"], sealed)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A path as `&str` (the temp paths of these tests are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts `what` succeeded; on failure shows its exit code, stdout and stderr.
pub fn ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed ({:?}):\nstdout: {}\nstderr: {}", o.status.code(), stdout(o), stderr(o));
}

/// Asserts a failure with exit code `code` whose stderr contains every needle; returns stderr.
pub fn refused(o: &Output, code: i32, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stdout: {}\nstderr: {err}", stdout(o));
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    err
}

/// Stricter than [`refused`]: also exactly one line on stderr and nothing on stdout.
pub fn refused_one_line(o: &Output, code: i32, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stdout: {}\nstderr: {err}", stdout(o));
    assert!(o.stdout.is_empty(), "stdout on failure: {:?}", stdout(o));
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    err
}

/// The approval request id in what a dual-control request printed ("... kmsctl approve ID ...").
pub fn approval_id(o: &Output) -> String {
    let text = stdout(o);
    let id = text.split("kmsctl approve ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("no approval id in {text:?}"));
    id.trim_end_matches(|c: char| !c.is_ascii_digit()).to_owned()
}

/// The age header of a sealed file (up to the MAC line).
pub fn header(sealed: &[u8]) -> String {
    let end = sealed.windows(4).position(|w| w == b"\n---").unwrap();
    String::from_utf8_lossy(&sealed[..end]).into_owned()
}

/// The permission bits of a file.
pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `len` deterministic pseudo-random bytes (see [`Pattern`]).
pub fn sample(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Pattern::new(seed, len as u64).read_exact(&mut v).unwrap();
    v
}

/// Deterministic pseudo-random bytes (xorshift), for big streams without big buffers.
pub struct Pattern {
    state: u64,
    left: u64,
}

impl Pattern {
    pub fn new(seed: u64, len: u64) -> Self {
        Self { state: seed | 1, left: len }
    }
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let b = self.state.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// SHA-256 and length of everything read from `r`.
pub fn digest_reader(mut r: impl Read) -> (String, u64) {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        ctx.update(&buf[..k]);
        n += k as u64;
    }
    (hex::encode(ctx.finish().as_ref()), n)
}

/// Runs each named test function `fn name(p: Setup)` once per master-key provider on
/// the redb store (`software::name`, `softhsm::name`) and once on a PostgreSQL store
/// (`postgres::name`, software master key), from one test source.
#[macro_export]
macro_rules! per_provider {
    ($($name:ident),* $(,)?) => {
        mod software {
            $( #[test] fn $name() { super::$name($crate::Provider::Software.into()) } )*
        }
        mod softhsm {
            $( #[test] fn $name() { super::$name($crate::Provider::SoftHsm.into()) } )*
        }
        mod postgres {
            $( #[test] fn $name() {
                super::$name($crate::Setup { provider: $crate::Provider::Software, store: $crate::StoreKind::Postgres })
            } )*
        }
    };
}

/// A CLI running in the background whose stderr can be waited on line by line.
pub struct Running {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Running {
    /// Starts `name` with `args` and writes `stdin` to it.
    pub fn start(name: &str, args: &[&str], stdin: &[u8]) -> Self {
        let mut child = Command::new(bin(name))
            .args(args)
            .env_remove("KLUIS_CLIENT_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut sin = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        std::thread::spawn(move || {
            let _ = sin.write_all(&data);
        });
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, seen: Vec::new(), stdout: Some(stdout) }
    }

    /// `backup-hook --client-config CFG ARGS...` with `stdin`, in the background.
    pub fn backup_hook(cfg: &Path, args: &[&str], stdin: &[u8]) -> Self {
        let mut all = vec!["--client-config", s(cfg)];
        all.extend_from_slice(args);
        Self::start("backup-hook", &all, stdin)
    }

    /// Blocks until a line of stderr contains `needle` (returns it); panics, showing
    /// stderr, if the program closes stderr (exits) first.
    pub fn wait_for_stderr(&mut self, needle: &str) -> String {
        for line in self.lines.iter() {
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
        let status = self.child.wait().unwrap();
        panic!("exited ({status}) without {needle:?} on stderr:\n{}", self.seen.join("\n"));
    }

    /// Waits for the exit; the whole stdout and stderr.
    pub fn finish(mut self) -> Output {
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        let stdout = self.stdout.take().unwrap().join().unwrap();
        let mut stderr = self.seen.join("\n").into_bytes();
        if !stderr.is_empty() {
            stderr.push(b'\n');
        }
        Output { status, stdout, stderr }
    }
}

/// What a [`KillingProxy`] does with the connections that come after its kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterKill {
    /// Closes them at once (as if nothing listened any more).
    Close,
    /// Relays them to the server address (refused, hence closed, while the server is down;
    /// through once it is started again on the same address).
    Relay,
}

/// A TCP proxy between a client and the real server. It forwards the TLS handshake
/// both ways and reads the client's TLS records (their 5-byte headers are in the
/// clear). With TLS 1.3 the client's second flight (certificate, verify, finished)
/// is its first application-data record; its next one (the HTTP/2 preface and the
/// request) is only sent once the client is through the handshake. That record is
/// not forwarded: the proxy SIGKILLs the server, waits until the dead server's end
/// of the connection closes, and then closes the client's. So the client has a
/// handshaken connection, sends its request, and the server is gone before anything
/// could answer it; no sleeping, nothing racing the reply. Connections after that
/// are handled as [`AfterKill`] says.
pub struct KillingProxy {
    pub addr: std::net::SocketAddr,
    killed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl KillingProxy {
    /// Kills the process `server_pid` at the first request; later connections as `after`.
    pub fn start(server_addr: &str, server_pid: u32, after: AfterKill) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (k, server_addr) = (killed.clone(), server_addr.to_owned());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let server_addr = server_addr.clone();
                if k.load(Ordering::SeqCst) {
                    match after {
                        AfterKill::Close => {
                            let _ = client.shutdown(std::net::Shutdown::Both);
                        }
                        AfterKill::Relay => {
                            std::thread::spawn(move || pipe(client, &server_addr));
                        }
                    }
                    continue;
                }
                let k = k.clone();
                std::thread::spawn(move || kill_at_request(client, &server_addr, server_pid, &k));
            }
        });
        Self { addr, killed }
    }

    /// Whether the proxy killed the server.
    pub fn killed(&self) -> bool {
        self.killed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The client config of dev identity `who` pointed at this proxy, as `DIR/file`, with
    /// `extra` appended.
    pub fn client_config(&self, server: &Server, who: &str, file: &str, extra: &str) -> PathBuf {
        let text = std::fs::read_to_string(server.client(who)).unwrap();
        let text: Vec<String> = text
            .lines()
            .map(|l| if l.starts_with("endpoint =") { format!("endpoint = \"https://{}\"", self.addr) } else { l.to_owned() })
            .collect();
        let p = server.dir.path().join(file);
        std::fs::write(&p, text.join("\n") + "\n" + extra).unwrap();
        p
    }
}

/// Plain relay both ways; the client is closed at once if the server cannot be reached.
fn pipe(client: std::net::TcpStream, server_addr: &str) {
    use std::net::Shutdown;
    let Ok(server) = std::net::TcpStream::connect(server_addr) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (mut from_server, mut to_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_server, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Write);
    });
    let (mut from_client, mut to_server) = (client, server);
    let _ = std::io::copy(&mut from_client, &mut to_server);
    let _ = to_server.shutdown(Shutdown::Write);
    let _ = back.join();
}

fn kill_at_request(client: std::net::TcpStream, server_addr: &str, server_pid: u32, killed: &std::sync::atomic::AtomicBool) {
    use std::net::Shutdown;
    let Ok(server) = std::net::TcpStream::connect(server_addr) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (mut from_server, mut to_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
    // Server to client until the server's side closes; then the client's side closes too.
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_server, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Both);
    });
    let (mut from_client, mut to_server) = (client, server);
    let mut application_records = 0;
    loop {
        let mut head = [0u8; 5];
        if from_client.read_exact(&mut head).is_err() {
            break;
        }
        let mut body = vec![0u8; usize::from(u16::from_be_bytes([head[3], head[4]]))];
        if from_client.read_exact(&mut body).is_err() {
            break;
        }
        if head[0] == 23 {
            application_records += 1;
            if application_records == 2 {
                killed.store(true, std::sync::atomic::Ordering::SeqCst);
                let st = Command::new("kill").args(["-KILL", &server_pid.to_string()]).status().unwrap();
                assert!(st.success(), "kill -KILL {server_pid}");
                // The kernel closes the dead server's socket; `back` then closes the client's.
                back.join().unwrap();
                return;
            }
        }
        if to_server.write_all(&head).and_then(|()| to_server.write_all(&body)).is_err() {
            break;
        }
    }
    let _ = to_server.shutdown(Shutdown::Both);
    let _ = back.join();
}

/// `kms-server serve --config CFG --listen 127.0.0.1:0`: another replica on the same config
/// and store (PostgreSQL), logging at info to a file; killed when dropped.
pub struct Replica {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Replica {
    pub fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    /// [`start`](Self::start) with extra environment; `KLUIS_TEST_*` seams (a clock file)
    /// run `kms-server-testkit`, as [`Server`] does.
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("replica.log");
        let seams = env.iter().any(|(k, _)| k.starts_with("KLUIS_TEST_"));
        let mut child = Command::new(bin(if seams { "kms-server-testkit" } else { "kms-server" }))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:0"])
            .env("KLUIS_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Waits on the server's own line; an exit closes stdout first.
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(a) = line.strip_prefix("kms-server listening on ") {
                        break a.to_owned();
                    }
                }
                _ => panic!("the replica exited before listening: {:?}\n{}", child.wait(), std::fs::read_to_string(&log).unwrap_or_default()),
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self { child, addr, _dir: dir, log }
    }

    /// The dev identity `who`'s client config of `server`, pointed at this replica.
    pub fn client(&self, server: &Server, who: &str) -> PathBuf {
        let text = std::fs::read_to_string(server.client(who)).unwrap();
        assert!(text.contains(&server.addr), "{text}");
        let p = server.dir.path().join(format!("{who}-{}.toml", self.addr.replace([':', '.'], "_")));
        std::fs::write(&p, text.replace(&server.addr, &self.addr)).unwrap();
        p
    }

    /// What the replica logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the replica's log has a line containing every one of `needles`
    /// (checking every 20 ms; panics after two minutes, or if the replica exits); returns it.
    pub fn wait_for_line(&mut self, needles: &[&str]) -> String {
        let start = std::time::Instant::now();
        loop {
            if let Some(line) = self.log().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the replica exited ({status}) before logging {needles:?}:\n{}", self.log());
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(120), "no line with {needles:?} in:\n{}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}
