//! `backup-hook`: what backup tools pipe data through to seal and unseal with Kluis.
//!
//! Parses arguments, moves bytes, maps errors to exit codes; the logic lives in
//! `kms-client`. Exit codes:
//! 0 success, 1 other failure, 2 usage, 3 server unreachable or too slow,
//! 4 refused by the server (role, unknown or destroyed key),
//! 5 integrity (not a sealed file, damaged, truncated, altered),
//! 6 input/output failure (including a closed pipe).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kms_client::client::ClientError;
use kms_client::config::ClientConfig;
use kms_client::hook::{Hook, HookError, unseal_offline};
use kms_client::output::{Output, OutputError};
use kms_client::sealed::{IO_BUF, SealError, UnsealError};

#[derive(Parser)]
#[command(name = "backup-hook", version, about = "Seal and unseal backups with Kluis (age v1 files)")]
struct Cli {
    /// Client config (endpoint, CA, certificate, key).
    #[arg(long, global = true, env = "KLUIS_CLIENT_CONFIG")]
    client_config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Io {
    /// Input file (default: stdin).
    #[arg(short = 'i', long = "input")]
    input: Option<PathBuf>,
    /// Output file, written atomically (default: stdout).
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Encrypt a backup stream under a fresh data key from the server.
    Seal {
        /// Keyring to draw the data key from.
        #[arg(long)]
        keyring: String,
        /// Identifier of this backup object (recorded at the server).
        #[arg(long)]
        backup_id: String,
        /// A label KEY=VALUE bound to the data key (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        io: Io,
    },
    /// Decrypt a sealed backup (needs the restorer role, or a recovery identity).
    Unseal {
        /// An age identity file of the escrow recovery key: unseal with no server.
        #[arg(long)]
        recovery_identity: Option<PathBuf>,
        #[command(flatten)]
        io: Io,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} is not KEY=VALUE")),
    }
}

/// A failure with its exit code and one-line message.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

const EXIT_OTHER: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_REFUSED: u8 = 4;
const EXIT_INTEGRITY: u8 = 5;
const EXIT_IO: u8 = 6;

fn io_failure(what: &str, e: &io::Error) -> Failure {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Failure::new(EXIT_IO, format!("{what}: the reader closed the pipe early (broken pipe); the output is incomplete"))
    } else {
        Failure::new(EXIT_IO, format!("{what}: {e}"))
    }
}

fn client_failure(e: &ClientError) -> Failure {
    let code = if e.is_unreachable() {
        EXIT_UNREACHABLE
    } else if e.is_refusal() || matches!(e, ClientError::NotFound { .. } | ClientError::FailedPrecondition { .. }) {
        EXIT_REFUSED
    } else if matches!(e, ClientError::InvalidArgument { .. }) && e.to_string().contains("wrapped") {
        EXIT_INTEGRITY
    } else {
        EXIT_OTHER
    };
    Failure::new(code, e.to_string())
}

impl From<HookError> for Failure {
    fn from(e: HookError) -> Self {
        match e {
            HookError::Config(e) => Failure::new(EXIT_OTHER, e.to_string()),
            HookError::Client(e) => client_failure(&e),
            HookError::Runtime(e) => Failure::new(EXIT_OTHER, e.to_string()),
            HookError::Seal(SealError::ReadInput(e)) => io_failure("reading the input failed", &e),
            HookError::Seal(SealError::WriteOutput(e)) => io_failure("writing the sealed output failed", &e),
            HookError::Seal(e) => Failure::new(EXIT_OTHER, e.to_string()),
            HookError::Unseal(UnsealError::Server(e)) => client_failure(&e),
            HookError::Unseal(UnsealError::ReadInput(e)) => io_failure("reading the sealed input failed", &e),
            HookError::Unseal(UnsealError::WriteOutput(e)) => io_failure("writing the plaintext failed", &e),
            HookError::Unseal(e) => Failure::new(EXIT_INTEGRITY, e.to_string()),
        }
    }
}

impl From<OutputError> for Failure {
    fn from(e: OutputError) -> Self {
        Failure::new(EXIT_IO, e.to_string())
    }
}

fn open_input(path: Option<&Path>) -> Result<Box<dyn Read>, Failure> {
    match path {
        None => Ok(Box::new(io::stdin().lock())),
        Some(p) if p == Path::new("-") => Ok(Box::new(io::stdin().lock())),
        Some(p) => File::open(p)
            .map(|f| Box::new(BufReader::with_capacity(IO_BUF, f)) as Box<dyn Read>)
            .map_err(|e| Failure::new(EXIT_IO, format!("cannot open input {}: {e}", p.display()))),
    }
}

fn load_recovery(path: &Path) -> Result<Vec<Box<dyn age::Identity + Send + Sync>>, Failure> {
    let file = age::IdentityFile::from_file(path.to_string_lossy().into_owned())
        .map_err(|e| Failure::new(EXIT_OTHER, format!("cannot read recovery identity {}: {e}", path.display())))?;
    file.into_identities()
        .map_err(|e| Failure::new(EXIT_OTHER, format!("recovery identity {} is not usable: {e}", path.display())))
}

fn run(cli: Cli) -> Result<(), Failure> {
    let config = || ClientConfig::from_arg_or_env(cli.client_config.as_deref()).map_err(|e| Failure::new(EXIT_OTHER, e.to_string()));
    match &cli.cmd {
        Cmd::Seal { keyring, backup_id, labels, io } => {
            let labels: BTreeMap<String, String> = labels.iter().cloned().collect();
            let hook = Hook::connect(&config()?)?;
            let input = open_input(io.input.as_deref())?;
            let output = Output::create(io.output.as_deref())?;
            let (output, _report) = hook.seal(keyring, backup_id, &labels, input, output)?;
            output.commit()?;
            Ok(())
        }
        Cmd::Unseal { recovery_identity, io } => {
            let input = open_input(io.input.as_deref())?;
            let output = Output::create(io.output.as_deref())?;
            let output = match recovery_identity {
                Some(path) => {
                    let ids = load_recovery(path)?;
                    let refs: Vec<&dyn age::Identity> = ids.iter().map(|b| b.as_ref() as &dyn age::Identity).collect();
                    unseal_offline(input, &refs, output)?.0
                }
                None => {
                    let hook = Hook::connect(&config()?)?;
                    hook.unseal(input, &[], output)?.0
                }
            };
            output.commit()?;
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("backup-hook: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
