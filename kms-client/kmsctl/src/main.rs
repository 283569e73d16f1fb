//! `kmsctl`: for the security officer, the auditor and the custodians.
//! Exit codes (the table of `kms_client::class`, shared with backup-hook): 0 success,
//! 1 failure, 2 usage, 3 server unavailable (retry later), 4 refused by the server (do
//! not retry), 5 integrity (an audit export that does not verify, a wrapped key that
//! does not authenticate).
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kluis_escrow::Manifest;
use kms_client::class::ErrorClass;
use kms_client::client::{
    ApprovalInfo, ClientError, DataKeyInfo, DataKeyState, DestroyOutcome, DestructionInfo, DestructionState, KeyringInfo, KmsClient, Requested,
};
use kms_client::config::ClientConfig;
use kmsctl::cert;
use kmsctl::output::Esc;
use kmsctl::escrow::{OfflineEscrowCommand, run_offline};

#[derive(Parser)]
#[command(name = "kmsctl", version, about = "Kluis administration: keyrings, keys, escrow, audit, reports")]
struct Cli {
    /// Client config (endpoint, CA, certificate, key).
    #[arg(long, global = true, env = "KLUIS_CLIENT_CONFIG")]
    client_config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Keyrings: one per backup job or policy.
    #[command(subcommand)]
    Keyring(KeyringCmd),
    /// Escrow of the recovery key among custodians.
    #[command(subcommand)]
    Escrow(EscrowCmd),
    /// The tamper-evident audit trail.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Approve another officer's destructive request (dual control); it runs at once.
    Approve { id: u64 },
    /// Destructive requests: pending, approved, expired.
    Approvals {
        #[arg(long)]
        json: bool,
    },
    /// Certificates for sites without a CA of their own: a CA, the server certificate,
    /// client certificates (docs/certificates.md; sites with a CA use it instead).
    #[command(subcommand)]
    Cert(CertCmd),
    /// Data keys: registry facts, lookup by backup id, destruction.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Scheduled destructions: list, cancel.
    #[command(subcommand)]
    Destruction(DestructionCmd),
    /// The master key.
    #[command(subcommand)]
    Master(MasterCmd),
    /// KMIP objects: their escrow bundle.
    #[command(subcommand)]
    Kmip(KmipCmd),
    /// The compliance report per keyring (officer, auditor).
    Report {
        /// Only events at or after this time (RFC 3339, e.g. 2026-01-01T00:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// text, json or html (a single self-contained page).
        #[arg(long, default_value = "text")]
        format: String,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Registry facts of a data key (no key material).
    Show {
        key_id: String,
        #[arg(long)]
        json: bool,
    },
    /// The data keys issued for a backup id, newest first (at most 100; officer, auditor).
    /// It reads the server's whole registry.
    Find {
        /// The backup id given at seal (exact match).
        #[arg(long)]
        backup_id: String,
        /// Only this keyring (default: every keyring your grants cover).
        #[arg(long)]
        keyring: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Schedule destruction of a data key after the waiting period (before its
    /// expiry this needs a second officer's `kmsctl approve`).
    Destroy { key_id: String },
}

#[derive(Subcommand)]
enum DestructionCmd {
    /// Scheduled and past destructions.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Cancel a scheduled destruction.
    Cancel { id: u64 },
}

#[derive(Subcommand)]
enum MasterCmd {
    /// Create a new master key (file or token key) and rewrap every keyring key under it.
    Rotate,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// The last N entries, one per line.
    Tail {
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u64,
    },
    /// The trail as JSON lines with signed checkpoints and head: `kmsctl audit export -o audit.jsonl`.
    Export {
        /// Only entries at or after this time (RFC 3339, e.g. 2026-11-01T00:00:00Z). A partial
        /// export: verify says which entries it proves.
        #[arg(long)]
        since: Option<String>,
        /// Write here (written as it arrives to a temporary file, synced, then renamed; nothing
        /// is left if the export fails) instead of standard output.
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace the -o file if it exists (without it an existing file is never replaced).
        #[arg(long, requires = "out")]
        force: bool,
    },
    /// The server's audit public key: `kmsctl audit public-key > audit.pub`.
    PublicKey,
    /// Check an export offline; names the first changed, removed, reordered or inserted entry.
    Verify {
        /// The export (JSON lines).
        file: PathBuf,
        /// The audit public key file (from `kmsctl audit public-key`); without it the key is fetched from the server.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// An earlier export (verified too): this one must continue it (contain its head's
        /// entry, unchanged).
        #[arg(long, value_name = "FILE")]
        since_head: Option<PathBuf>,
        /// Checkpoints and heads the server anchored outside itself (its anchor file, or
        /// syslog/journal lines): each one within the export must match it, none beyond its end.
        #[arg(long, value_name = "FILE")]
        anchors: Option<PathBuf>,
    },
}

/// When a new certificate is valid, and whether existing files may be replaced.
#[derive(clap::Args)]
struct CertValidity {
    /// Validity in days from now (default: ca 3650, server 825, issue 365; ignored with --not-after).
    #[arg(long)]
    days: Option<i64>,
    /// Start of validity, RFC 3339 (default: one hour ago).
    #[arg(long)]
    not_before: Option<String>,
    /// End of validity, RFC 3339.
    #[arg(long)]
    not_after: Option<String>,
    /// Replace existing files of the same name (otherwise they are refused and nothing is written).
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum CertCmd {
    /// Create a CA for a site without one: writes DIR/ca.pem and DIR/ca.key (0600; keep it off the server).
    Ca {
        /// Directory to create the CA in.
        #[arg(long)]
        dir: PathBuf,
        /// Subject common name of the CA.
        #[arg(long, default_value = "Kluis CA")]
        name: String,
        #[command(flatten)]
        validity: CertValidity,
    },
    /// Issue the server certificate: writes OUT/NAME.pem and OUT/NAME.key (0600), with a
    /// subject alternative name for every --dns and --ip (clients check the name they connect to).
    Server {
        /// Directory with ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// A DNS name clients connect to (repeatable): the endpoint's host, or their server_name.
        #[arg(long)]
        dns: Vec<String>,
        /// An IP address clients connect to (repeatable).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// File name of the certificate and key.
        #[arg(long, default_value = "server")]
        name: String,
        /// Where to write the files (default: CA_DIR).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        validity: CertValidity,
    },
    /// Issue a client certificate: writes OUT/NAME.pem and OUT/NAME.key (0600).
    Issue {
        /// Directory with ca.pem and ca.key (for `kms-server dev`: DATA_DIR/pki).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Subject common name: the principal the server sees.
        #[arg(long)]
        name: String,
        /// Where to write the files (default: CA_DIR/clients).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A URI subject alternative name (repeatable), for servers that map SANs.
        #[arg(long)]
        san_uri: Vec<String>,
        /// A DNS subject alternative name (repeatable).
        #[arg(long)]
        san_dns: Vec<String>,
        #[command(flatten)]
        validity: CertValidity,
    },
}

#[derive(Subcommand)]
enum KeyringCmd {
    /// Create a keyring (officer).
    Create {
        name: String,
        /// Retention of issued data keys in days (0: until destroyed).
        #[arg(long, default_value_t = 0)]
        retention_days: u32,
        /// Rotate automatically this many days after each version (0: only by hand).
        #[arg(long, default_value_t = 0)]
        rotation_period_days: u32,
    },
    /// Change retention (for keys issued from now on) and/or the rotation period (officer;
    /// lowering the retention needs a second officer's `kmsctl approve`).
    Policy {
        name: String,
        #[arg(long)]
        retention_days: Option<u32>,
        #[arg(long)]
        rotation_period_days: Option<u32>,
    },
    /// Place a legal hold: nothing of the keyring is destroyed until it is released (officer).
    Hold {
        name: String,
        /// Why (case number, request).
        #[arg(long)]
        reason: String,
    },
    /// Release a legal hold (officer; needs a second officer's `kmsctl approve`).
    Release { name: String },
    /// Schedule destruction of the keyring and every key in it (needs a second officer's `kmsctl approve`).
    Destroy { name: String },
    /// List keyrings.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a version: new data keys use it; older versions keep unsealing (officer).
    Rotate { name: String },
    /// Stop unwraps under versions below N (destructive: needs a second officer's `kmsctl approve`).
    /// Refused while active keys are still wrapped under them (it names how many: rewrap
    /// their backups first) or while the keyring is under a legal hold.
    Retire {
        name: String,
        #[arg(long)]
        below_version: u32,
        /// Retire although keys are still wrapped under those versions: their backups then
        /// open only with the escrow recovery key. The count goes into the request and the audit.
        #[arg(long)]
        force: bool,
    },
    /// Grant a role on a keyring to a principal (officer; needs a second officer's `kmsctl approve`).
    Grant {
        name: String,
        #[arg(long)]
        principal: String,
        /// sealer, restorer, officer or auditor
        #[arg(long)]
        role: String,
    },
    /// Revoke a role granted with `keyring grant` (officer).
    Revoke {
        name: String,
        #[arg(long)]
        principal: String,
        #[arg(long)]
        role: String,
    },
    /// Who holds which role on a keyring.
    Grants {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Show one keyring.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KmipCmd {
    /// Load an escrow bundle of KMIP objects (a server's kmip_escrow_dir) into this server
    /// (officer), with the same identifiers: every file is opened with the recovery
    /// identity first, then each object is recreated. One line per object and a summary;
    /// exit 1 if any failed. Objects that exist already are left as they are.
    Import {
        /// The recovery identity the custodians rebuilt (`kmsctl escrow combine -o FILE`).
        #[arg(long, value_name = "FILE")]
        recovery_identity: PathBuf,
        /// The bundle directory.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// `kmsctl kmip import`: the bundle read and checked offline first, then imported.
async fn kmip_import(client: &KmsClient, entries: Vec<(String, kmsctl::kmip::Entry)>, out: &mut dyn Write) -> Result<(), Failure> {
    use kmsctl::kmip::{Entry, Summary, request};
    let io = |e: std::io::Error| fail(format!("writing output failed: {e}"));
    let mut sum = Summary::default();
    let mut last_code = ErrorClass::Other.exit_code();
    let mut bad_file = false;
    for (uid, entry) in entries {
        let line = match entry {
            Entry::Skipped(why) => {
                sum.skipped += 1;
                format!("{uid} skipped: {why}")
            }
            Entry::Bad(e) => {
                sum.failed += 1;
                bad_file = true;
                format!("{uid} FAILED: {}", Esc(&e.to_string()))
            }
            Entry::Ready(ready) => {
                let (key, st) = &*ready;
                match client.import_kmip_object(request(key, st)).await {
                    Ok(_) => {
                        sum.imported += 1;
                        format!("{uid} imported: {} in keyring {}", kluis_escrow::kmip_bundle::state_name(st.state), Esc(&key.keyring))
                    }
                    Err(e) if e.reason() == Some(kluis_proto::error::Reason::KmipObjectExists) => {
                        sum.existing += 1;
                        format!("{uid} already exists on this server: left as it is")
                    }
                    Err(e) => {
                        sum.failed += 1;
                        last_code = e.class().exit_code();
                        let hint = if e.reason() == Some(kluis_proto::error::Reason::KeyringNotFound) {
                            format!("; create it first (`kmsctl keyring create {}`, with the retention it had), then import again", Esc(&key.keyring))
                        } else {
                            String::new()
                        };
                        format!("{uid} FAILED: {}{hint}", Esc(&e.to_string()))
                    }
                }
            }
        };
        writeln!(out, "{line}").map_err(io)?;
    }
    writeln!(out, "{sum}").map_err(io)?;
    if sum.failed > 0 {
        // A damaged or altered file is an integrity failure, whatever the server said of others.
        let code = if bad_file { ErrorClass::Integrity.exit_code() } else { last_code };
        return Err(Failure { code, message: format!("{} of the bundle's objects failed; see the lines above", sum.failed) });
    }
    Ok(())
}

#[derive(Subcommand)]
enum EscrowCmd {
    /// Install a ceremony's manifest at the server (officer): its recovery
    /// recipient goes out with every data key from then on. A recipient other than the
    /// one in force (or the first) needs a second officer's `kmsctl approve`.
    Install {
        /// manifest.json, or the ceremony directory holding it.
        manifest: PathBuf,
        /// Allow switching to a recovery recipient different from the one in force.
        #[arg(long)]
        new_recipient: bool,
    },
    /// Show the manifest in force and how many live keys predate it.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Remove the manifest in force (needs a second officer's `kmsctl approve`); keys
    /// issued afterwards carry no recovery stanza.
    Remove,
    #[command(flatten)]
    Offline(OfflineEscrowCommand),
}

struct Failure {
    code: u8,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure { code: e.class().exit_code(), message: e.to_string() }
    }
}

fn fail(message: impl Into<String>) -> Failure {
    Failure { code: ErrorClass::Other.exit_code(), message: message.into() }
}

/// The refusal of an existing `-o` file (as backup-hook's and `escrow combine`'s).
fn exists(path: &std::path::Path) -> Failure {
    fail(format!("{} already exists; it was not replaced (pass --force to replace it)", path.display()))
}

/// Writes `value` as pretty JSON and a newline.
fn print_json<T: serde::Serialize + ?Sized>(out: &mut dyn Write, value: &T) -> Result<(), Failure> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(|e| fail(e.to_string()))?;
    writeln!(out).map_err(|e| fail(format!("writing output failed: {e}")))
}

fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// Registry facts of one data key (`key show`, `key find`), escaped.
fn print_data_key(out: &mut dyn Write, k: &DataKeyInfo) -> std::io::Result<()> {
    writeln!(out, "key id:     {}", Esc(&k.key_id))?;
    writeln!(out, "keyring:    {} (version {})", Esc(&k.keyring), k.keyring_version)?;
    writeln!(out, "backup id:  {}", Esc(&k.backup_id))?;
    writeln!(out, "issued:     {} to {}", date(k.created_unix), Esc(&k.issued_to))?;
    let expires = if k.expires_unix == 0 { "never".to_owned() } else { date(k.expires_unix) };
    writeln!(out, "expires:    {expires}")?;
    writeln!(out, "escrowed:   {}", if k.escrowed { "yes" } else { "no" })?;
    if k.state == DataKeyState::Destroyed {
        writeln!(out, "state:      destroyed on {}", date(k.destroyed_unix))?;
    } else {
        writeln!(out, "state:      {}", k.state)?;
    }
    if k.destruction_id != 0 {
        writeln!(out, "scheduled:  destruction {}", k.destruction_id)?;
    }
    Ok(())
}

fn print_keyring(out: &mut dyn Write, k: &KeyringInfo) -> std::io::Result<()> {
    writeln!(out, "keyring:         {}", Esc(&k.name))?;
    writeln!(out, "current version: {}", k.current_version)?;
    writeln!(out, "created:         {}", date(k.created_unix))?;
    let retention = if k.retention_days == 0 { "until destroyed".to_owned() } else { format!("{} days", k.retention_days) };
    writeln!(out, "retention:       {retention}")?;
    writeln!(out, "issued keys:     {}", k.issued_keys)?;
    if k.rotation_period_days > 0 {
        writeln!(out, "rotation:        every {} days; next {}", k.rotation_period_days, date(k.next_rotation_unix))?;
    }
    if k.held {
        writeln!(out, "legal hold:      since {} by {}: {}", date(k.hold_since_unix), Esc(&k.hold_by), Esc(&k.hold_reason))?;
    }
    if k.destroyed_unix != 0 {
        writeln!(out, "DESTROYED:       {}", date(k.destroyed_unix))?;
    }
    for v in &k.versions {
        writeln!(out, "  v{:<4} {:<8} created {}", v.version, v.state, date(v.created_unix))?;
    }
    Ok(())
}

fn print_destruction(out: &mut dyn Write, d: &DestructionInfo) -> std::io::Result<()> {
    let when = match d.state {
        DestructionState::Destroyed => format!("destroyed on {}", date(d.done_unix)),
        DestructionState::Cancelled => format!("cancelled by {} on {}", Esc(&d.cancelled_by), date(d.done_unix)),
        DestructionState::Held => format!("due {} but blocked by a legal hold", date(d.due_unix)),
        _ => format!("due {}", date(d.due_unix)),
    };
    writeln!(out, "{:>4} {:<9} {} {} ({}; requested by {}): {when}", d.id, d.state, d.target_kind, Esc(&d.target), d.reason, Esc(&d.requested_by))
}

/// A dual-control request: what it is and how a second officer approves it.
fn print_pending(out: &mut dyn Write, a: &ApprovalInfo, then: &str) -> std::io::Result<()> {
    writeln!(
        out,
        "request {} is pending: {}\nA second officer approves it with: kmsctl approve {} (before {}){then}",
        a.id,
        Esc(&a.action),
        a.id,
        date(a.expires_unix)
    )
}

fn print_destroy(out: &mut dyn Write, o: &DestroyOutcome) -> std::io::Result<()> {
    match o {
        DestroyOutcome::PendingApproval(a) => print_pending(out, a, "; it is then scheduled after the waiting period"),
        DestroyOutcome::Scheduled(d) => writeln!(
            out,
            "destruction {} scheduled for {}; cancel with: kmsctl destruction cancel {}",
            d.id,
            date(d.due_unix),
            d.id
        ),
    }
}

impl CertValidity {
    fn options(&self, default_days: i64) -> Result<cert::Options, Failure> {
        let parse = |s: &str| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|e| fail(format!("{s:?} is not an RFC 3339 time: {e}")))
        };
        let now = time::OffsetDateTime::now_utc();
        let days = self.days.unwrap_or(default_days);
        let not_before = match &self.not_before { Some(s) => parse(s)?, None => now - time::Duration::hours(1) };
        let not_after = match &self.not_after { Some(s) => parse(s)?, None => now + time::Duration::days(days) };
        Ok(cert::Options { not_before, not_after, force: self.force })
    }
}

/// `kmsctl cert ...`: offline, no client config.
fn run_cert(cmd: CertCmd, out: &mut dyn Write) -> Result<(), Failure> {
    let io = |e: std::io::Error| fail(format!("writing output failed: {e}"));
    let err = |e: cert::CertError| fail(e.to_string());
    let issued = match cmd {
        CertCmd::Ca { dir, name, validity } => {
            let ca = cert::create_ca(&dir, &name, &validity.options(3650)?).map_err(err)?;
            writeln!(out, "CA certificate: {}\nCA key:         {}", ca.display(), dir.join("ca.key").display()).map_err(io)?;
            return Ok(());
        }
        CertCmd::Server { ca_dir, dns, ip, name, out: out_dir, validity } => {
            let out_dir = out_dir.unwrap_or_else(|| ca_dir.clone());
            let req = cert::ServerRequest { name, dns, ips: ip, options: validity.options(825)? };
            cert::issue_server(&ca_dir, &out_dir, &req).map_err(err)?
        }
        CertCmd::Issue { ca_dir, name, out: out_dir, san_uri, san_dns, validity } => {
            let out_dir = out_dir.unwrap_or_else(|| ca_dir.join("clients"));
            let req = cert::CertRequest { name, san_uris: san_uri, san_dns, options: validity.options(365)? };
            cert::issue(&ca_dir, &out_dir, &req).map_err(err)?
        }
    };
    writeln!(out, "certificate: {}\nkey:         {}", issued.cert.display(), issued.key.display()).map_err(io)
}

fn run(cli: Cli) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| fail(format!("writing output failed: {e}"));
    if let Cmd::Escrow(EscrowCmd::Offline(cmd)) = cli.cmd {
        return run_offline(cmd, &mut out).map_err(|e| fail(e.to_string()));
    }
    if let Cmd::Cert(c) = cli.cmd {
        return run_cert(c, &mut out);
    }
    if let Cmd::Audit(AuditCmd::Verify { file, public_key: Some(key_file), since_head, anchors }) = &cli.cmd {
        let key = read_public_key(key_file)?;
        return verify_audit(&mut out, file, &key, since_head.as_deref(), anchors.as_deref());
    }
    // An existing export file is refused before the server is asked for anything.
    if let Cmd::Audit(AuditCmd::Export { out: Some(path), force: false, .. }) = &cli.cmd
        && std::fs::symlink_metadata(path).is_ok()
    {
        return Err(exists(path));
    }
    // The bundle is read and checked before the server is asked for anything.
    let kmip_entries = match &cli.cmd {
        Cmd::Kmip(KmipCmd::Import { recovery_identity, dir }) => {
            let refused = |e: kmsctl::kmip::ImportError| Failure { code: ErrorClass::Integrity.exit_code(), message: e.to_string() };
            let identity = kmsctl::kmip::read_identity(recovery_identity).map_err(|e| fail(e.to_string()))?;
            Some(kmsctl::kmip::load(dir, identity.as_ref(), recovery_identity).map_err(refused)?)
        }
        _ => None,
    };
    let cfg = ClientConfig::from_arg_or_env(cli.client_config.as_deref()).map_err(|e| fail(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async {
        let client = KmsClient::connect(&cfg).await?;
        match cli.cmd {
            Cmd::Keyring(KeyringCmd::Create { name, retention_days, rotation_period_days }) => {
                let k = client.create_keyring_with(&name, retention_days, rotation_period_days).await?;
                print_keyring(&mut out, &k).map_err(io)?;
            }
            Cmd::Keyring(KeyringCmd::Policy { name, retention_days, rotation_period_days }) => {
                match client.set_keyring_policy(&name, retention_days, rotation_period_days).await? {
                    Requested::Done(k) => print_keyring(&mut out, &k).map_err(io)?,
                    Requested::PendingApproval(a) => print_pending(&mut out, &a, "; until then the retention in force stays").map_err(io)?,
                }
            }
            Cmd::Keyring(KeyringCmd::Hold { name, reason }) => {
                match client.set_legal_hold(&name, true, &reason).await? {
                    Requested::Done(_) => writeln!(
                        out,
                        "legal hold placed on keyring {name}: nothing of it is destroyed until `kmsctl keyring release {name}` (and a second officer's approval)"
                    )
                    .map_err(io)?,
                    // Placing a hold is never dual control; shown should a server say otherwise.
                    Requested::PendingApproval(a) => print_pending(&mut out, &a, "").map_err(io)?,
                }
            }
            Cmd::Keyring(KeyringCmd::Release { name }) => {
                match client.set_legal_hold(&name, false, "").await? {
                    Requested::Done(_) => {
                        writeln!(out, "legal hold on keyring {name} released; due destructions now go ahead").map_err(io)?
                    }
                    Requested::PendingApproval(a) => print_pending(&mut out, &a, "; until then the hold stays").map_err(io)?,
                }
            }
            Cmd::Keyring(KeyringCmd::Destroy { name }) => {
                let o = client.destroy_keyring(&name).await?;
                print_destroy(&mut out, &o).map_err(io)?;
            }
            Cmd::Key(KeyCmd::Destroy { key_id }) => {
                let o = client.destroy_key(&key_id).await?;
                print_destroy(&mut out, &o).map_err(io)?;
            }
            Cmd::Key(KeyCmd::Show { key_id, json }) => {
                let k = client.get_data_key(&key_id).await?;
                if json {
                    print_json(&mut out, &k)?;
                } else {
                    print_data_key(&mut out, &k).map_err(io)?;
                }
            }
            Cmd::Key(KeyCmd::Find { backup_id, keyring, json }) => {
                let found = client.find_data_keys(&backup_id, keyring.as_deref()).await?;
                if json {
                    print_json(&mut out, &found)?;
                } else {
                    if found.keys.is_empty() {
                        writeln!(out, "no data key found for backup id {} in the keyrings you may see", Esc(&backup_id)).map_err(io)?;
                    }
                    for (i, k) in found.keys.iter().enumerate() {
                        if i > 0 {
                            writeln!(out).map_err(io)?;
                        }
                        print_data_key(&mut out, k).map_err(io)?;
                    }
                    if found.truncated {
                        writeln!(out, "\nmore keys matched: only the newest {} are shown (narrow it with --keyring)", found.keys.len()).map_err(io)?;
                    }
                }
            }
            Cmd::Destruction(DestructionCmd::List { json }) => {
                let list = client.destructions().await?;
                if json {
                    print_json(&mut out, &list)?;
                } else {
                    for d in &list {
                        print_destruction(&mut out, d).map_err(io)?;
                    }
                }
            }
            Cmd::Destruction(DestructionCmd::Cancel { id }) => {
                let d = client.cancel_destruction(id).await?;
                print_destruction(&mut out, &d).map_err(io)?;
            }
            Cmd::Escrow(EscrowCmd::Remove) => {
                let a = client.remove_escrow().await?;
                print_pending(&mut out, &a, "").map_err(io)?;
            }
            Cmd::Master(MasterCmd::Rotate) => {
                let m = client.rotate_master().await?;
                writeln!(
                    out,
                    "master key generation {} in force: {}\nrewrapped {} versions of {} keyrings (no data key needed rewrapping); the previous key is kept: remove it once no copy of the store from before today is needed",
                    m.generation, Esc(&m.description), m.versions_rewrapped, m.keyrings_rewrapped
                )
                .map_err(io)?;
            }
            Cmd::Kmip(KmipCmd::Import { .. }) => {
                kmip_import(&client, kmip_entries.unwrap_or_default(), &mut out).await?;
            }
            Cmd::Report { since, format } => {
                let format: kmsctl::report::ReportFormat = format.parse().map_err(|e: kmsctl::report::ReportFormatError| Failure { code: ErrorClass::Usage.exit_code(), message: e.to_string() })?;
                let report = client.report(since.as_deref()).await?;
                out.write_all(kmsctl::report::render(&report, format).as_bytes()).map_err(io)?;
            }
            Cmd::Keyring(KeyringCmd::Retire { name, below_version, force }) => {
                let a = client.retire_versions(&name, below_version, force).await?;
                print_pending(&mut out, &a, "").map_err(io)?;
            }
            Cmd::Approve { id } => {
                let a = client.approve(id).await?;
                writeln!(out, "approved and carried out request {}: {} (requested by {})", a.id, Esc(&a.action), Esc(&a.requested_by)).map_err(io)?;
            }
            Cmd::Approvals { json } => {
                let list = client.approvals().await?;
                if json {
                    print_json(&mut out, &list)?;
                } else {
                    for a in list {
                        writeln!(
                            out,
                            "{:>4} {:<9} {} (by {}, expires {}{})",
                            a.id,
                            a.state,
                            Esc(&a.action),
                            Esc(&a.requested_by),
                            date(a.expires_unix),
                            if a.approved_by.is_empty() { String::new() } else { format!(", approved by {}", a.approved_by) }
                        )
                        .map_err(io)?;
                    }
                }
            }
            Cmd::Keyring(KeyringCmd::Grant { name, principal, role }) => {
                match client.change_grant(&name, &principal, &role, true).await? {
                    Requested::Done(_) => writeln!(out, "granted {role} on keyring {name} to {principal}").map_err(io)?,
                    Requested::PendingApproval(a) => print_pending(&mut out, &a, "; until then the grant does not apply").map_err(io)?,
                }
            }
            Cmd::Keyring(KeyringCmd::Revoke { name, principal, role }) => {
                client.change_grant(&name, &principal, &role, false).await?;
                writeln!(out, "revoked {role} on keyring {name} from {principal}").map_err(io)?;
            }
            Cmd::Keyring(KeyringCmd::Grants { name, json }) => {
                let list = client.list_grants(&name).await?;
                if json {
                    print_json(&mut out, &list)?;
                } else {
                    writeln!(out, "{:<32} {:<9} {:<20} SOURCE", "PRINCIPAL", "ROLE", "KEYRINGS").map_err(io)?;
                    for g in list {
                        writeln!(out, "{:<32} {:<9} {:<20} {}", Esc(&g.principal), Esc(&g.role), Esc(&g.keyring), Esc(&g.source)).map_err(io)?;
                    }
                }
            }
            Cmd::Keyring(KeyringCmd::Rotate { name }) => {
                let k = client.rotate_keyring(&name).await?;
                print_keyring(&mut out, &k).map_err(io)?;
            }
            Cmd::Keyring(KeyringCmd::List { json }) => {
                let list = client.list_keyrings().await?;
                if json {
                    print_json(&mut out, &list)?;
                } else {
                    writeln!(out, "{:<24} {:>7} {:>12}  created", "KEYRING", "VERSION", "ISSUED KEYS").map_err(io)?;
                    for k in list {
                        writeln!(out, "{:<24} {:>7} {:>12}  {}", Esc(&k.name), k.current_version, k.issued_keys, date(k.created_unix))
                            .map_err(io)?;
                    }
                }
            }
            Cmd::Keyring(KeyringCmd::Show { name, json }) => {
                let k = client.get_keyring(&name).await?;
                if json {
                    print_json(&mut out, &k)?;
                } else {
                    print_keyring(&mut out, &k).map_err(io)?;
                }
            }
            Cmd::Escrow(EscrowCmd::Install { manifest, new_recipient }) => {
                // Full validation here (format, commitments, recipients) before the server sees it.
                let m = Manifest::load(&manifest).map_err(|e| fail(e.to_string()))?;
                let text = m.to_json().map_err(|e| fail(e.to_string()))?;
                match client.install_escrow(&text, new_recipient).await? {
                    Requested::Done(s) => writeln!(
                        out,
                        "installed escrow ceremony {} ({} of {}); recovery recipient {}",
                        Esc(&s.ceremony_id), s.threshold, s.shares, Esc(&s.recovery_recipient)
                    )
                    .map_err(io)?,
                    Requested::PendingApproval(a) => {
                        print_pending(&mut out, &a, "; until then the recovery recipient in force stays").map_err(io)?
                    }
                }
            }
            Cmd::Escrow(EscrowCmd::Status { json }) => {
                let s = client.escrow_status().await?;
                if json {
                    print_json(&mut out, &s)?;
                } else {
                    if s.installed {
                        writeln!(out, "ceremony:            {}", Esc(&s.ceremony_id)).map_err(io)?;
                        writeln!(out, "recovery recipient:  {}", Esc(&s.recovery_recipient)).map_err(io)?;
                        writeln!(out, "threshold:           {} of {}", s.threshold, s.shares).map_err(io)?;
                        writeln!(out, "custodians:          {}", Esc(&s.custodians.join(", "))).map_err(io)?;
                        writeln!(out, "installed:           {}", date(s.installed_unix)).map_err(io)?;
                    } else {
                        writeln!(out, "no escrow manifest installed").map_err(io)?;
                    }
                    writeln!(out, "keys without escrow: {}", s.keys_without_escrow).map_err(io)?;
                    for r in &s.previous_recipients {
                        writeln!(out, "earlier recipient:   {} (backups sealed while it was in force need its ceremony's shares)", Esc(r))
                            .map_err(io)?;
                    }
                }
            }
            Cmd::Audit(AuditCmd::Tail { lines }) => {
                for l in client.export_audit(None, lines).await? {
                    // For display: a newer server's extra fields are ignored, an unreadable
                    // line is said, never dropped silently.
                    let r = match kluis_proto::audit::view_line(&l) {
                        kluis_proto::audit::LineView::Record(r) => r,
                        kluis_proto::audit::LineView::Signature => continue,
                        kluis_proto::audit::LineView::Unreadable(why) => {
                            writeln!(out, "{}", kmsctl::output::audit_unreadable_line(&why)).map_err(io)?;
                            continue;
                        }
                    };
                    writeln!(out, "{}", kmsctl::output::audit_tail_line(&r)).map_err(io)?;
                }
            }
            Cmd::Audit(AuditCmd::Export { since, out: Some(path), force }) => {
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                let what = |e: std::io::Error| fail(format!("cannot write {}: {e}", path.display()));
                let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(what)?;
                {
                    let mut w = std::io::BufWriter::new(tmp.as_file());
                    client
                        .export_audit_each(since.as_deref(), 0, |l| writeln!(w, "{l}").map_err(what))
                        .await?;
                    w.flush().map_err(what)?;
                }
                tmp.as_file().sync_all().map_err(what)?;
                // Without --force the rename itself refuses a file that appeared meanwhile
                // (RENAME_NOREPLACE, or link + unlink): no window after the check above.
                let persisted = if force { tmp.persist(&path) } else { tmp.persist_noclobber(&path) };
                persisted.map_err(|e| match e.error.kind() {
                    std::io::ErrorKind::AlreadyExists => exists(&path),
                    _ => what(e.error),
                })?;
                if let Ok(d) = std::fs::File::open(&dir) {
                    d.sync_all().map_err(what)?;
                }
            }
            Cmd::Audit(AuditCmd::Export { since, out: None, .. }) => {
                client.export_audit_each(since.as_deref(), 0, |l| writeln!(out, "{l}").map_err(io)).await?;
            }
            Cmd::Audit(AuditCmd::PublicKey) => {
                let key = client.audit_public_key().await?;
                writeln!(out, "# Kluis audit public key (Ed25519), for kmsctl audit verify --public-key\n{}", hex::encode(key))
                    .map_err(io)?;
            }
            Cmd::Audit(AuditCmd::Verify { file, public_key: _, since_head, anchors }) => {
                let key = client.audit_public_key().await?;
                verify_audit(&mut out, &file, &key, since_head.as_deref(), anchors.as_deref())?;
            }
            Cmd::Escrow(EscrowCmd::Offline(_)) | Cmd::Cert(_) => {}
        }
        Ok(())
    })
}

fn read_public_key(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
    match hex::decode(line) {
        Ok(k) if k.len() == 32 => Ok(k),
        _ => Err(fail(format!("{} is not a Kluis audit public key (64 hex digits)", path.display()))),
    }
}

fn verify_audit(
    out: &mut dyn Write,
    file: &std::path::Path,
    key: &[u8],
    since_head: Option<&std::path::Path>,
    anchors: Option<&std::path::Path>,
) -> Result<(), Failure> {
    use kluis_proto::audit::{Anchors, Verifier};
    let open = |p: &std::path::Path| {
        std::fs::File::open(p).map(std::io::BufReader::new).map_err(|e| fail(format!("cannot read {}: {e}", p.display())))
    };
    let broken = |what: String| Failure { code: ErrorClass::Integrity.exit_code(), message: format!("audit trail NOT intact: {what}") };
    let mut verifier = Verifier::new(key);
    let mut earlier = None;
    if let Some(p) = since_head {
        let v = Verifier::new(key).read(open(p)?).map_err(|e| broken(format!("the earlier export {}: {e}", p.display())))?;
        verifier = verifier.since_head(v.head.clone());
        earlier = Some(v);
    }
    if let Some(p) = anchors {
        let a = Anchors::read(open(p)?, key).map_err(|e| broken(format!("{}: {e}", p.display())))?;
        if a.is_empty() {
            return Err(fail(format!("{} holds no anchored checkpoint or head", p.display())));
        }
        verifier = verifier.with_anchors(a);
    }
    let v = verifier.read(open(file)?).map_err(|e| broken(e.to_string()))?;
    let io = |e: std::io::Error| fail(e.to_string());
    match (&earlier, v.continues) {
        (Some(e), Some(seq)) if e.whole() => writeln!(
            out,
            "audit trail intact: entries 1..{last} (entries 1..{seq} by the earlier export, {first}..{last} by this one, which continues it: {} entries, {} signed checkpoints, signed head)",
            v.records,
            v.checkpoints,
            last = v.last_seq,
            first = v.first_seq,
        )
        .map_err(io)?,
        (Some(e), Some(seq)) => writeln!(
            out,
            "{v}; continues the earlier export at entry {seq} (which itself proves only entries {}..{seq})",
            e.first_seq
        )
        .map_err(io)?,
        _ => writeln!(out, "{v}").map_err(io)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("kmsctl: error: {}", kmsctl::output::Esc(&f.message));
            ExitCode::from(f.code)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Server text is shown escaped: the server refuses control characters in names and
    /// reasons, and kmsctl does not rely on it (an older or a hostile server).
    #[test]
    fn server_text_in_a_keyring_is_shown_escaped() {
        let evil = "x\u{1b}[2J\nFORGED: all keys destroyed\u{7}";
        let k = KeyringInfo {
            name: evil.into(),
            current_version: 1,
            created_unix: 0,
            retention_days: 0,
            issued_keys: 0,
            versions: Vec::new(),
            rotation_period_days: 0,
            next_rotation_unix: 0,
            held: true,
            hold_reason: evil.into(),
            hold_by: evil.into(),
            hold_since_unix: 0,
            destroyed_unix: 0,
        };
        let mut out = Vec::new();
        print_keyring(&mut out, &k).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains('\u{1b}') && !text.contains('\u{7}'), "{text:?}");
        assert!(!text.lines().any(|l| l.starts_with("FORGED")), "{text}");
        assert_eq!(text.lines().filter(|l| l.contains("x\\u{1b}[2J\\u{a}FORGED")).count(), 2, "{text}");
    }
}
