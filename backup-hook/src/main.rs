//! `backup-hook`: what backup tools pipe data through to seal and unseal with Kluis.
//!
//! Parses arguments, moves bytes, maps errors to exit codes; the logic lives in
//! `kms-client`. Exit codes (the table of `kms_client::class`, shared with kmsctl):
//! 0 success, 1 other failure, 2 usage, 3 server unavailable, restarting or too slow,
//! or the connection lost mid-request (after the client config's `[retry]` deadline:
//! kms-client retries a restarting server itself): retry later,
//! 4 refused by the server (role, certificate, unknown or destroyed key): do not retry,
//! 5 integrity (not a sealed file, damaged, truncated, altered, a wrapped key that
//! does not authenticate), 6 input/output failure (including a closed pipe).
//!
//! `passphrase` uses the same codes: 3 also when its own overall deadline (`--timeout`)
//! passes, 5 when the key file is not a passphrase key file, 1 when `--create` finds the
//! key file already there.
//!
//! `seal` and `unseal` with `-o FILE`: 1 when FILE already exists and `--force` was not
//! given (nothing is written, no data key is issued). `seal` prints the key id it used on
//! stderr (`--json`: one JSON object).
//!
//! `rewrap` uses the same codes per file; for a batch, the exit code is the first failed
//! file's (and the message says how many failed).
#![forbid(unsafe_code)]

mod output;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kluis_age::sealed::{SealError, UnsealError};
use kms_client::class::ErrorClass;
use kms_client::client::ClientError;
use kms_client::config::ClientConfig;
use kms_client::hook::{Hook, HookError, SealReport, unseal_offline};
use kms_client::passphrase::{self, KeyFile, Passphrase, PassphraseError};
use kms_client::rewrap::{Action, Escrow, JournalNote, Report, RewrapError, rewrap_file};

use crate::output::{Output, OutputError, Overwrite};

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
    /// Output file, written atomically (default: stdout). An existing file is never
    /// replaced without --force.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Replace the -o file if it exists (atomically: the old one stays until the new one
    /// is complete).
    #[arg(long, requires = "output")]
    force: bool,
}

impl Io {
    fn overwrite(&self) -> Overwrite {
        if self.force { Overwrite::Replace } else { Overwrite::Refuse }
    }
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
        /// Print what was sealed (key id, keyring, version, backup id, escrow, bytes) as one
        /// JSON object on standard error instead of the line of text.
        #[arg(long)]
        json: bool,
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
    /// Restore test: unwrap the key, authenticate every chunk to the end, write no
    /// plaintext, and record the outcome (also a failure) at the server.
    Verify {
        /// Sealed file (default: stdin).
        #[arg(short = 'i', long = "input")]
        input: Option<PathBuf>,
        /// Name of this host in the record (default: the system host name).
        #[arg(long)]
        host: Option<String>,
    },
    /// Print the repository passphrase kept sealed in a key file, as one base64 line
    /// (for restic --password-command, BORG_PASSCOMMAND, KOPIA_PASSWORD, ...); or with
    /// --create make a new key file. Never prompts.
    Passphrase(PassphraseArgs),
    /// Move sealed files to the keyring's newest version by rewriting only their header.
    #[command(long_about = REWRAP_ABOUT)]
    Rewrap(RewrapArgs),
}

const REWRAP_ABOUT: &str = "\
Move sealed files to the keyring's newest version by rewriting only their header.

After `kmsctl keyring rotate`, old backups still name the old keyring version; rewrap them
before that version is retired. The server re-wraps the same data key under the current
version, so the payload is neither read nor re-encrypted and the escrow stanza stays as it
is: the cost does not depend on the file's size. The header is rewritten in place through
a journal (.NAME.kluis-rewrap next to the file), so a crash leaves the old header, the new
one, or a journal that the next rewrap of the file completes. A file already under the
current version is not written at all.

Old backups under escrow: once an escrow is installed (`kmsctl escrow install`), rewrap also
adds an X25519 stanza to the recovery recipient in force to every file that lacks one (a
backup sealed before the escrow, or under an earlier recipient, whose stanza is kept), and
the server then counts the key as escrowed (`kmsctl report`, `kmsctl escrow status`). The
header grows, so such a file is copied with the new header and renamed over the original
(O(file size), fsynced). A file that has the stanza is not written again.

Needs the restorer role on the file's keyring: the age header MAC is keyed from the file
key, which only the unwrapped data key opens, so a sealer-only identity is refused (exit 4).

Files: as arguments, with -i (repeatable), and/or with --files-from LIST (one path a line;
'-' reads the list from stdin); one connection serves them all. One line per file on
stdout; failures on stderr. Exit status: 0 if every file is current, else the first
failure's code (3 unreachable, 4 refused, 5 integrity: not sealed, damaged or altered,
6 I/O, 1 other), with the number of failed files.";

#[derive(Args)]
struct RewrapArgs {
    /// Sealed files to rewrap.
    #[arg(value_name = "FILE")]
    files: Vec<PathBuf>,
    /// A sealed file to rewrap (repeatable).
    #[arg(short = 'i', long = "input", value_name = "FILE")]
    inputs: Vec<PathBuf>,
    /// Read the files to rewrap from LIST, one path a line ('-': standard input).
    #[arg(long, value_name = "LIST")]
    files_from: Option<PathBuf>,
    /// One JSON object a line on stdout per file done (file, keyring, key_id,
    /// from_version, to_version, written, escrow, recovery_recipient, journal).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PassphraseArgs {
    /// Make a new random 256-bit passphrase and seal it into --key-file (a new file, mode
    /// 0600, never written over); prints nothing secret.
    #[arg(long, requires_all = ["keyring", "name"])]
    create: bool,
    /// With --create: the keyring to seal the passphrase under.
    #[arg(long, requires = "create")]
    keyring: Option<String>,
    /// With --create: the passphrase's name; its backup id is passphrase/NAME.
    #[arg(long, requires = "create")]
    name: Option<String>,
    /// With --create: a label KEY=VALUE bound to the data key (repeatable); kind=passphrase
    /// is always added.
    #[arg(long = "label", value_parser = parse_label, requires = "create")]
    labels: Vec<(String, String)>,
    /// The sealed key file holding the passphrase.
    #[arg(long)]
    key_file: PathBuf,
    /// An age identity file of the escrow recovery key: open the key file with no server.
    #[arg(long, conflicts_with = "create")]
    recovery_identity: Option<PathBuf>,
    /// Overall deadline in seconds; after it the command fails (exit 3), whatever it waits for.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
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

// The exit-code table is kms-client's, shared with kmsctl.
const EXIT_OTHER: u8 = ErrorClass::Other.exit_code();
const EXIT_USAGE: u8 = ErrorClass::Usage.exit_code();
const EXIT_UNREACHABLE: u8 = ErrorClass::Unavailable.exit_code();
const EXIT_REFUSED: u8 = ErrorClass::Refused.exit_code();
const EXIT_INTEGRITY: u8 = ErrorClass::Integrity.exit_code();
const EXIT_IO: u8 = ErrorClass::Io.exit_code();

fn io_failure(what: &str, e: &io::Error) -> Failure {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Failure::new(EXIT_IO, format!("{what}: the reader closed the pipe early (broken pipe); the output is incomplete"))
    } else {
        Failure::new(EXIT_IO, format!("{what}: {e}"))
    }
}

fn client_failure(e: &ClientError) -> Failure {
    Failure::new(e.class().exit_code(), e.to_string())
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
        match e {
            // As `passphrase --create` and `kmsctl escrow combine` refuse an existing file.
            OutputError::Exists { .. } => Failure::new(EXIT_OTHER, e.to_string()),
            OutputError::Create { .. } | OutputError::Finish { .. } => Failure::new(EXIT_IO, e.to_string()),
        }
    }
}

/// The line `seal` prints on standard error, so the officer has the key id at hand.
fn seal_summary(r: &SealReport, backup_id: &str, json: bool) -> String {
    if json {
        serde_json::json!({
            "key_id": r.key_id,
            "keyring": r.keyring,
            "keyring_version": r.version,
            "backup_id": backup_id,
            "escrowed": r.escrowed,
            "plaintext_bytes": r.moved.plaintext_bytes,
        })
        .to_string()
    } else {
        let line = format!(
            "backup-hook: sealed backup {backup_id} ({} bytes): key id {}, keyring {} version {}; escrow copy: {}",
            r.moved.plaintext_bytes,
            r.key_id,
            r.keyring,
            r.version,
            if r.escrowed { "yes" } else { "NO" }
        );
        kms_client::escape::Esc(&line).to_string()
    }
}

fn stdin_reader() -> Result<Box<dyn Read>, Failure> {
    kluis_age::stream::stdin_reader().map(|f| Box::new(f) as Box<dyn Read>).map_err(|e| io_failure("standard input", &e))
}

fn open_input(path: Option<&Path>) -> Result<Box<dyn Read>, Failure> {
    match path {
        // fd 0 directly, with big reads and (for a pipe) a 1 MiB pipe buffer.
        None => stdin_reader(),
        Some(p) if p == Path::new("-") => stdin_reader(),
        // The File itself: the header reader and the payload pipeline already read
        // in large steps, so a BufReader would only copy every byte once more.
        Some(p) => File::open(p)
            .map(|f| Box::new(f) as Box<dyn Read>)
            .map_err(|e| Failure::new(EXIT_IO, format!("cannot open input {}: {e}", p.display()))),
    }
}

fn load_recovery(path: &Path) -> Result<Vec<Box<dyn age::Identity + Send + Sync>>, Failure> {
    let file = age::IdentityFile::from_file(path.to_string_lossy().into_owned())
        .map_err(|e| Failure::new(EXIT_OTHER, format!("cannot read recovery identity {}: {e}", path.display())))?;
    file.into_identities()
        .map_err(|e| Failure::new(EXIT_OTHER, format!("recovery identity {} is not usable: {e}", path.display())))
}

impl From<PassphraseError> for Failure {
    fn from(e: PassphraseError) -> Self {
        match e {
            PassphraseError::Hook { path, source } => {
                let f = Failure::from(*source);
                Failure::new(f.code, format!("{}: {}", path.display(), f.message))
            }
            PassphraseError::InvalidName { .. } | PassphraseError::ReservedLabel { .. } => Failure::new(EXIT_USAGE, e.to_string()),
            PassphraseError::Read { .. } | PassphraseError::Write { .. } | PassphraseError::Directory { .. } => {
                Failure::new(EXIT_IO, e.to_string())
            }
            PassphraseError::TooLarge { .. } | PassphraseError::NotPassphrase { .. } => Failure::new(EXIT_INTEGRITY, e.to_string()),
            PassphraseError::Exists { .. } | PassphraseError::Random => Failure::new(EXIT_OTHER, e.to_string()),
        }
    }
}

/// Runs `work` on its own thread and waits at most `secs` for it. On the deadline the
/// command fails with `on_timeout` and the process exits with the work still blocked:
/// a backup tool that calls us (restic, borg) would otherwise wait forever.
fn with_deadline<T: Send + 'static>(
    secs: u64,
    on_timeout: String,
    work: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("passphrase".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|e| Failure::new(EXIT_OTHER, format!("cannot start a worker thread: {e}")))?;
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Failure::new(EXIT_UNREACHABLE, on_timeout)),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(Failure::new(EXIT_OTHER, "the passphrase worker stopped unexpectedly")),
    }
}

fn run_passphrase(client_config: Option<&Path>, args: &PassphraseArgs) -> Result<(), Failure> {
    let secs = args.timeout;
    let key_file = args.key_file.clone();
    if args.create {
        let (Some(keyring), Some(name)) = (args.keyring.clone(), args.name.clone()) else {
            return Err(Failure::new(EXIT_USAGE, "--create needs --keyring and --name"));
        };
        // Refuse before any server round trip.
        passphrase::backup_id(&name)?;
        passphrase::check_new_key_file(&key_file)?;
        let cfg = ClientConfig::from_arg_or_env(client_config).map_err(|e| Failure::new(EXIT_OTHER, e.to_string()))?;
        let labels: BTreeMap<String, String> = args.labels.iter().cloned().collect();
        let on_timeout = format!(
            "no answer from the Kluis server {} within the {secs} s deadline (--timeout); {} was not created, or if it exists it is complete",
            cfg.endpoints_text(),
            key_file.display()
        );
        let report = with_deadline(secs, on_timeout, move || {
            let hook = Hook::connect(&cfg)?;
            Ok(passphrase::create(&hook, &keyring, &name, &labels, &key_file)?)
        })?;
        println!(
            "created {}: a new 256-bit passphrase sealed under keyring {} (key id {}, backup id {}); escrow copy: {}",
            report.key_file.display(),
            report.keyring,
            report.key_id,
            report.backup_id,
            if report.escrowed { "yes" } else { "NO" }
        );
        if !report.escrowed {
            eprintln!(
                "backup-hook: warning: no escrow is installed at the server: without the server this key file, and the repository behind it, cannot be recovered"
            );
        }
        return Ok(());
    }

    let pass: Passphrase = match &args.recovery_identity {
        Some(path) => {
            let path = path.clone();
            let on_timeout = format!("could not open {} within the {secs} s deadline (--timeout)", key_file.display());
            with_deadline(secs, on_timeout, move || {
                let file = KeyFile::read(&key_file)?;
                let ids = load_recovery(&path)?;
                let refs: Vec<&dyn age::Identity> = ids.iter().map(|b| b.as_ref() as &dyn age::Identity).collect();
                Ok(file.open_offline(&refs)?)
            })?
        }
        None => {
            let cfg = ClientConfig::from_arg_or_env(client_config).map_err(|e| Failure::new(EXIT_OTHER, e.to_string()))?;
            let on_timeout = format!(
                "no answer from the Kluis server {} within the {secs} s deadline (--timeout); the server is unreachable or too slow",
                cfg.endpoints_text()
            );
            with_deadline(secs, on_timeout, move || {
                // A missing or wrong file fails before any server round trip.
                let file = KeyFile::read(&key_file)?;
                let hook = Hook::connect(&cfg)?;
                Ok(file.open(&hook)?)
            })?
        }
    };
    let mut out = io::stdout().lock();
    out.write_all(pass.expose_line())
        .and_then(|()| out.flush())
        .map_err(|e| io_failure("writing the passphrase to standard output failed", &e))
}

impl From<RewrapError> for Failure {
    fn from(e: RewrapError) -> Self {
        let code = match &e {
            RewrapError::Integrity(UnsealError::ReadInput(_)) | RewrapError::Io { .. } | RewrapError::JournalNotAFile { .. } => EXIT_IO,
            RewrapError::Integrity(_) | RewrapError::BadJournal { .. } => EXIT_INTEGRITY,
            RewrapError::NeedsRestorer { .. } => EXIT_REFUSED,
            RewrapError::Server { source, .. } | RewrapError::NotRecorded { source, .. } => client_failure(source).code,
            RewrapError::ServerMismatch(_) | RewrapError::Busy | RewrapError::Changed | RewrapError::BadRecoveryRecipient(_) => {
                EXIT_OTHER
            }
        };
        Failure::new(code, e.to_string())
    }
}

/// The files of a `rewrap`: arguments, then -i, then --files-from.
fn rewrap_list(args: &RewrapArgs) -> Result<Vec<PathBuf>, Failure> {
    let mut files: Vec<PathBuf> = args.files.iter().chain(&args.inputs).cloned().collect();
    if let Some(list) = &args.files_from {
        let text = if list == Path::new("-") {
            let mut t = String::new();
            io::stdin().read_to_string(&mut t).map(|_| t)
        } else {
            std::fs::read_to_string(list)
        }
        .map_err(|e| Failure::new(EXIT_IO, format!("cannot read the file list {}: {e}", list.display())))?;
        files.extend(text.lines().filter(|l| !l.trim().is_empty()).map(PathBuf::from));
    }
    if files.is_empty() {
        return Err(Failure::new(EXIT_USAGE, "rewrap: no files given (FILE..., -i FILE or --files-from LIST)"));
    }
    if files.iter().any(|f| f == Path::new("-")) {
        return Err(Failure::new(EXIT_USAGE, "rewrap rewrites files in place; it cannot work on standard input ('-')"));
    }
    Ok(files)
}

/// The human line of one rewrapped file: the version move, the escrow stanza, the journal.
fn rewrap_line(path: &Path, r: &Report) -> String {
    let journal = match r.journal {
        JournalNote::None => String::new(),
        JournalNote::Completed => "; completed an interrupted rewrap from its journal".to_owned(),
        JournalNote::Discarded(why) => format!("; removed a leftover rewrap journal that was never applied ({why})"),
    };
    let escrow = match &r.escrow {
        Escrow::NoneInForce => String::new(),
        Escrow::Added { recipient, kept: 0 } => format!("; escrow stanza added (recovery recipient {recipient})"),
        Escrow::Added { recipient, kept } => format!(
            "; escrow stanza added (recovery recipient {recipient}); kept {kept} X25519 stanza(s) to an earlier recovery recipient"
        ),
        Escrow::Present { recipient, reported: false } => format!("; escrow stanza present (recovery recipient {recipient})"),
        Escrow::Present { recipient, reported: true } => format!(
            "; escrow stanza present (recovery recipient {recipient}), now recorded at the server (an earlier run was interrupted)"
        ),
    };
    let (file, keyring) = (path.display(), &r.keyring);
    let copied = " (the header's length changed, so the whole file was copied and renamed over the original)";
    let moved = r.from_version != r.to_version;
    match (r.action, r.journal) {
        (Action::AlreadyCurrent, JournalNote::Completed) => {
            format!("rewrapped {file}: keyring {keyring} version {}{escrow}{journal}", r.to_version)
        }
        (Action::AlreadyCurrent, _) => {
            format!("{file}: already current (keyring {keyring} version {}){escrow}; not written{journal}", r.to_version)
        }
        (Action::InPlace, _) => format!("rewrapped {file}: keyring {keyring} version {} -> {}{escrow}{journal}", r.from_version, r.to_version),
        // The copy of a file that only gained its escrow stanza: the version is unchanged.
        (Action::Copied, _) if !moved => {
            format!("{file}: keyring {keyring} version {} (unchanged){escrow}{copied}{journal}", r.to_version)
        }
        (Action::Copied, _) => {
            format!("rewrapped {file}: keyring {keyring} version {} -> {}{escrow}{copied}{journal}", r.from_version, r.to_version)
        }
    }
}

/// The JSON line of one rewrapped file (`rewrap --json`).
fn rewrap_json(path: &Path, r: &Report) -> String {
    let written = match r.action {
        Action::AlreadyCurrent => None,
        Action::InPlace => Some("in-place"),
        Action::Copied => Some("copied"),
    };
    let escrow = match &r.escrow {
        Escrow::NoneInForce => "none-in-force",
        Escrow::Added { .. } => "added",
        Escrow::Present { reported: false, .. } => "present",
        Escrow::Present { reported: true, .. } => "present-recorded-now",
    };
    let journal = match r.journal {
        JournalNote::None => None,
        JournalNote::Completed => Some("completed".to_owned()),
        JournalNote::Discarded(why) => Some(format!("discarded: {why}")),
    };
    let kept = match &r.escrow {
        Escrow::Added { kept, .. } => *kept,
        _ => 0,
    };
    serde_json::json!({
        "file": path.display().to_string(),
        "keyring": r.keyring,
        "key_id": r.key_id,
        "from_version": r.from_version,
        "to_version": r.to_version,
        "written": written,
        "escrow": escrow,
        "recovery_recipient": r.escrow.recipient(),
        "earlier_escrow_stanzas_kept": kept,
        "journal": journal,
    })
    .to_string()
}

fn run_rewrap(cfg: &ClientConfig, args: &RewrapArgs) -> Result<(), Failure> {
    let files = rewrap_list(args)?;
    let hook = Hook::connect(cfg)?;
    let mut first: Option<(u8, PathBuf)> = None;
    let mut failed = 0usize;
    let mut out = io::stdout().lock();
    for path in &files {
        match rewrap_file(&hook, path) {
            Ok(r) => {
                let line = if args.json { rewrap_json(path, &r) } else { kms_client::escape::Esc(&rewrap_line(path, &r)).to_string() };
                writeln!(out, "{line}").map_err(|e| io_failure("writing to standard output failed", &e))?;
            }
            Err(e) => {
                let f = Failure::from(e);
                eprintln!("backup-hook: {}", kms_client::escape::Esc(&format!("{}: {}", path.display(), f.message)));
                failed += 1;
                if first.is_none() {
                    first = Some((f.code, path.clone()));
                }
            }
        }
    }
    out.flush().map_err(|e| io_failure("writing to standard output failed", &e))?;
    match first {
        None => Ok(()),
        Some((code, path)) => Err(Failure::new(
            code,
            format!("rewrap: {failed} of {} file(s) failed (first: {}; its exit code is used)", files.len(), path.display()),
        )),
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let config = || ClientConfig::from_arg_or_env(cli.client_config.as_deref()).map_err(|e| Failure::new(EXIT_OTHER, e.to_string()));
    match &cli.cmd {
        Cmd::Passphrase(args) => run_passphrase(cli.client_config.as_deref(), args),
        Cmd::Rewrap(args) => run_rewrap(&config()?, args),
        Cmd::Seal { keyring, backup_id, labels, json, io } => {
            let labels: BTreeMap<String, String> = labels.iter().cloned().collect();
            // An existing -o file is refused before a data key is issued.
            let output = Output::create(io.output.as_deref(), io.overwrite())?;
            let input = open_input(io.input.as_deref())?;
            let hook = Hook::connect(&config()?)?;
            let (output, report) = hook.seal(keyring, backup_id, &labels, input, output)?;
            output.commit()?;
            // The backup is complete: a summary that cannot be shown does not fail it.
            let _ = writeln!(io::stderr(), "{}", seal_summary(&report, backup_id, *json));
            Ok(())
        }
        Cmd::Verify { input, host } => {
            let hook = Hook::connect(&config()?)?;
            let reader = open_input(input.as_deref())?;
            let host = host.clone().unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
            });
            let report = hook.verify(reader, &host);
            if let Some(e) = report.failure {
                let mut f = Failure::from(e);
                if report.keyring.is_some() && report.record_error.is_none() {
                    f.message.push_str(" (failed restore test recorded at the server)");
                }
                return Err(f);
            }
            if let Some(e) = report.record_error {
                let mut f = client_failure(&e);
                f.message = format!("the backup verified, but the restore test could not be recorded: {}", f.message);
                return Err(f);
            }
            eprintln!(
                "backup-hook: verified {} bytes of keyring {} key {} in {:.1} s; restore test recorded",
                report.bytes,
                report.keyring.unwrap_or_default(),
                report.key_id.unwrap_or_default(),
                report.duration.as_secs_f64()
            );
            Ok(())
        }
        Cmd::Unseal { recovery_identity, io } => {
            let input = open_input(io.input.as_deref())?;
            let output = Output::create(io.output.as_deref(), io.overwrite())?;
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
            eprintln!("backup-hook: error: {}", kms_client::escape::Esc(&f.message));
            ExitCode::from(f.code)
        }
    }
}
