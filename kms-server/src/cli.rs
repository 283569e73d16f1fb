//! The `kms-server` command line: `dev`, `init`, `serve`, `migrate-master`, `migrate-store`.
//!
//! [`main_with`] runs it with an [`Environment`]; the `kms-server` binary passes the
//! default one (system clock, store as it is). Tests build the same command line with
//! their own environment in a separate binary, so no test seam is in `kms-server`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use crate::config::{ConfigError, ServerConfig, StoreBackend, StoreConfig};
use crate::keys::KeyError;
use crate::server::{self, ServerError};
use crate::startup::dev::{self, DEFAULT_KEYRING};
use crate::startup::migrate::MigrateError;
use crate::startup::{self, Environment, StartupError};

/// Why a `kms-server` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Migrate(#[from] Box<MigrateError>),
    #[error(transparent)]
    MigrateStore(#[from] Box<crate::startup::migrate_store::MigrateStoreError>),
    #[error("{path}: {source}")]
    Path { path: std::path::PathBuf, source: std::io::Error },
}

#[derive(Parser)]
#[command(name = "kms-server", version, about = "Kluis key service for backup encryption keys")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Quick start: everything in one directory (software master key, dev CA and
    /// certificates, client configs in DIR/clients, keyring `default`).
    Dev {
        #[arg(long, default_value = "./kluis-dev")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Keep the master key on a PKCS#11 token instead of a key file (first run only):
        /// path of the module, e.g. /usr/lib/softhsm/libsofthsm2.so.
        #[arg(long, requires_all = ["pkcs11_token_label", "pkcs11_pin_file"])]
        pkcs11_module: Option<PathBuf>,
        /// Label of the token holding the master key.
        #[arg(long)]
        pkcs11_token_label: Option<String>,
        /// Label of the master key on the token (created on first run if absent).
        #[arg(long, default_value = "kluis-master")]
        pkcs11_key_label: String,
        /// File holding the token's user PIN.
        #[arg(long)]
        pkcs11_pin_file: Option<PathBuf>,
        /// Another server (a replica) for the client configs, after this one (repeatable):
        /// they then list `endpoints = ["https://THIS", URL, ...]` and move on to the next
        /// when one is unavailable. https://HOST:PORT; at most 15.
        #[arg(long = "client-endpoint", value_name = "URL", value_parser = dev::parse_client_endpoint)]
        client_endpoints: Vec<String>,
        /// Keep the store in this PostgreSQL database instead of the redb file (first run
        /// only): a libpq URL without a password, e.g. postgresql://kluis@%2Frun%2Fpostgresql/kluis.
        #[arg(long)]
        store_url: Option<String>,
        /// Also serve KMIP (TTLV over mutual TLS, for backup appliances, NAS and tape
        /// libraries) here; without a value on 127.0.0.1:5696, KMIP's port.
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:5696")]
        kmip_listen: Option<SocketAddr>,
        /// Write the escrow bundle of KMIP objects into this directory (the config's
        /// `kmip_escrow_dir`; docs/kmip-escrow.md).
        #[arg(long, value_name = "DIR")]
        kmip_escrow_dir: Option<PathBuf>,
    },
    /// Create the master key and the store for a config (once).
    Init {
        #[arg(long, env = "KLUIS_SERVER_CONFIG")]
        config: PathBuf,
    },
    /// Serve with a config file.
    Serve {
        #[arg(long, env = "KLUIS_SERVER_CONFIG")]
        config: PathBuf,
        /// Listen here instead of the config's `listen` (several replicas, one config).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Rewrap every keyring key from one master key to another, in one atomic commit
    /// (software -> PKCS#11, PKCS#11 -> another token key, software -> another key file).
    /// Both configs must name the same store; stop kms-server first. The `--to` key is
    /// created if it does not exist yet; the old key is never deleted.
    MigrateMaster {
        /// Config whose [master] opens the store now.
        #[arg(long)]
        from: PathBuf,
        /// Config whose [master] should open the store afterwards (serve with it).
        #[arg(long)]
        to: PathBuf,
    },
    /// Copy the whole store (keyrings, issued keys and their secrets, the audit chain with
    /// its checkpoints, approvals, destructions, restore tests) into a new, empty store of
    /// another config, e.g. redb to PostgreSQL or back, and check the copy. Stop every
    /// kms-server on the source first; the source is not changed. Both configs must name
    /// the same master key.
    MigrateStore {
        /// Config of the store to copy.
        #[arg(long)]
        from: PathBuf,
        /// Config of the new store (its [store] and [master]); the store must not exist yet
        /// (redb) or the database must be empty (PostgreSQL).
        #[arg(long)]
        to: PathBuf,
    },
}

/// Parses the command line and runs it with `env`.
pub fn main_with(env: Environment) -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KLUIS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal; a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kms-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd, env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the cause chain.
            eprintln!("kms-server: {}", crate::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            return;
        }
    }
    let _ = ctrl_c.await;
}

async fn metrics_listener(cfg: &ServerConfig) -> Result<Option<tokio::net::TcpListener>, ServerError> {
    let l = server::bind_metrics(cfg).await?;
    if let Some(addr) = l.as_ref().and_then(|l| l.local_addr().ok()) {
        println!("kms-server metrics on http://{addr}/metrics");
    }
    Ok(l)
}

async fn kmip_listener(cfg: &ServerConfig) -> Result<Option<tokio::net::TcpListener>, ServerError> {
    let l = server::bind_kmip(cfg).await?;
    if let Some(addr) = l.as_ref().and_then(|l| l.local_addr().ok()) {
        // Tests and scripts wait for this line too.
        println!("kmip listening on {addr}");
    }
    Ok(l)
}

fn announce(addr: SocketAddr) {
    // Tests and scripts wait for this exact line on stdout.
    println!("kms-server listening on {addr}");
    let _ = std::io::stdout().flush();
}

async fn run(cmd: Cmd, env: Environment) -> Result<(), CliError> {
    match cmd {
        Cmd::Dev { data_dir, listen, pkcs11_module, pkcs11_token_label, pkcs11_key_label, pkcs11_pin_file, client_endpoints, store_url, kmip_listen, kmip_escrow_dir } => {
            let data_dir = std::path::absolute(&data_dir)
                .map_err(|e| CliError::Path { path: data_dir.clone(), source: e })?;
            let master = match (pkcs11_module, pkcs11_token_label, pkcs11_pin_file) {
                (Some(module), Some(token_label), Some(pin_file)) => {
                    let pin_file = std::path::absolute(&pin_file).map_err(|e| CliError::Path { path: pin_file.clone(), source: e })?;
                    dev::DevMaster::Pkcs11 { module, token_label, key_label: pkcs11_key_label, pin_file }
                }
                _ => dev::DevMaster::Software,
            };
            let store = match store_url {
                None => StoreConfig::default(),
                Some(url) => {
                    let store = StoreConfig { backend: StoreBackend::Postgres, url: Some(url), password_file: None, ca_file: None };
                    store.check(std::path::Path::new("--store-url"))?;
                    store
                }
            };
            let (mut cfg, created) = dev::prepare(&data_dir, listen, master, &store)?;
            cfg.kmip_listen = kmip_listen;
            if let Some(d) = kmip_escrow_dir {
                cfg.kmip_escrow_dir = Some(std::path::absolute(&d).map_err(|e| CliError::Path { path: d.clone(), source: e })?);
            }
            cfg.check_files()?;
            let prepared = server::prepare(&cfg)?;
            let keys = startup::open_keys(&cfg, &env)?;
            match dev::bootstrap_keyring(&keys, DEFAULT_KEYRING).await {
                Ok(_) | Err(KeyError::KeyringExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let listener = server::bind(&cfg).await?;
            let addr = listener.local_addr().map_err(|e| ServerError::Bind { addr: cfg.listen, source: e })?;
            let endpoints = dev::client_endpoints(addr, &client_endpoints).map_err(StartupError::from)?;
            let clients = dev::write_client_configs(&data_dir, &endpoints)?;
            eprintln!(
                "kms-server dev: {} {}\n  client configs: {}/{{sealer,restorer,officer,auditor,dev}}.toml\n  e.g. export KLUIS_CLIENT_CONFIG={}/dev.toml",
                if created { "created" } else { "reusing" },
                data_dir.display(),
                clients.display(),
                clients.display()
            );
            let metrics = metrics_listener(&cfg).await?;
            let kmip = kmip_listener(&cfg).await?;
            announce(addr);
            let listeners = server::Listeners { grpc: listener, metrics, kmip };
            Ok(server::serve(&cfg, keys, listeners, prepared, shutdown_signal()).await?)
        }
        Cmd::Init { config } => {
            let cfg = ServerConfig::load(&config)?;
            startup::init(&cfg)?;
            eprintln!("kms-server: initialised store {}", cfg.store_describe());
            Ok(())
        }
        Cmd::Serve { config, listen } => {
            let mut cfg = ServerConfig::load(&config)?;
            if let Some(listen) = listen {
                cfg.listen = listen;
            }
            cfg.check_files()?;
            let prepared = server::prepare(&cfg)?;
            let keys = startup::open_keys(&cfg, &env)?;
            let listener = server::bind(&cfg).await?;
            let addr = listener.local_addr().map_err(|e| ServerError::Bind { addr: cfg.listen, source: e })?;
            let metrics = metrics_listener(&cfg).await?;
            let kmip = kmip_listener(&cfg).await?;
            announce(addr);
            let listeners = server::Listeners { grpc: listener, metrics, kmip };
            Ok(server::serve(&cfg, keys, listeners, prepared, shutdown_signal()).await?)
        }
        Cmd::MigrateMaster { from, to } => {
            let report = startup::migrate::migrate_master(&from, &to, &env).map_err(Box::new)?;
            eprint!("{report}");
            Ok(())
        }
        Cmd::MigrateStore { from, to } => {
            let report = startup::migrate_store::migrate_store(&from, &to, &env).map_err(Box::new)?;
            eprint!("{report}");
            Ok(())
        }
    }
}
