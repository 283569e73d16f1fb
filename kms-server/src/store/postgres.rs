//! The PostgreSQL store: the same [`Store`] contract as the redb file, on a database that
//! several kms-server replicas can share.
//!
//! - **Schema** (format [`FORMAT`], in `kluis_schema`): one table per [`Table`] (`k bytea`
//!   primary key, `v bytea`; the per-keyring counters keep `v bigint`), and `kluis_audit_head`,
//!   the one row that numbers and links the audit chain. Made by [`PostgresStore::create`]
//!   (`kms-server init`); [`PostgresStore::open`] refuses a newer format and upgrades an
//!   older one in place. Formats: 1, the first; 2 adds `kluis_kmip_objects`
//!   ([`Table::KmipObjects`]). An upgrade is one transaction under an advisory lock that
//!   reads the format again, so replicas that open an old database at once upgrade it once;
//!   it needs a role that may create tables in the schema (the one that ran `init`).
//! - **Writes**: one writer task per store takes the queued [`WriteGroup`]s and commits them
//!   together in one transaction (group commit, like the redb writer). If that transaction
//!   fails, each of its groups is committed again on its own, so one bad group fails alone.
//!   An [`Op::Append`] locks the chain-head row (`SELECT ... FOR UPDATE`), numbers and links
//!   from it and writes it back, inside the same transaction: the database orders the chain,
//!   also between replicas. Every session sets `synchronous_commit = on`, so a commit is
//!   acknowledged only once PostgreSQL says it is durable (on the synchronous standby too, if
//!   the cluster has one).
//! - **Reads** are synchronous in the trait. The store owns a small tokio runtime of its own
//!   (two threads) that drives every connection; a read hands its query to it and waits on a
//!   channel (inside `block_in_place` when the caller is on a multi-thread runtime, so the
//!   caller's other tasks move on). A read never waits for the writer: it uses a pool of its
//!   own connections (at most [`READERS`] at once).
//!
//! The password never appears in the URL (refused) nor in a message: it comes from
//! [`PgOptions::password`] (the config's `password_file`).

use std::ops::Bound;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime, RuntimeFlavor};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};
use zeroize::Zeroizing;

use super::{Chain, ChainHead, KeyRange, Op, Row, ScrubReport, Store, StoreError, StoreFuture, Table, Visit, WriteGroup};

/// The schema format this kms-server writes; a database of a later one is refused.
pub const FORMAT: i32 = 2;

/// Largest number of groups committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Read connections open at once.
pub const READERS: usize = 8;

/// Rows per round trip of a scan.
const SCAN_PAGE: i64 = 1000;

/// How long a connection attempt may take when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The transaction-level advisory lock that serialises groups with an `Op::Expect`.
const EXPECT_LOCK: i64 = 0x6b6c_7569_735f_6578; // "kluis_ex"

/// How long a health probe may wait for the database.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// The transaction-level advisory lock that orders schema changes (create, upgrade).
const SCHEMA_LOCK: i64 = 0x6b6c_7569_735f_7363; // "kluis_sc"

/// The tables the scrub rewrites: the ones that hold secret, wrapped-key or sealed-key bytes.
const SECRET_TABLES: [&str; 4] = ["kluis_key_secrets", "kluis_keyrings", "kluis_meta", "kluis_kmip_objects"];

/// The SQL name of a table.
fn name(table: Table) -> &'static str {
    match table {
        Table::Meta => "kluis_meta",
        Table::Keyrings => "kluis_keyrings",
        Table::DataKeys => "kluis_data_keys",
        Table::Issued => "kluis_issued_per_keyring",
        Table::Audit => "kluis_audit",
        Table::Checkpoints => "kluis_audit_checkpoints",
        Table::RestoreTests => "kluis_restore_tests",
        Table::Approvals => "kluis_approvals",
        Table::Destructions => "kluis_destructions",
        Table::Expiry => "kluis_expiry_index",
        Table::KeySecrets => "kluis_key_secrets",
        Table::KmipObjects => "kluis_kmip_objects",
    }
}

use super::ALL_TABLES;

/// Checks a key against its table's layout (as the redb store's typed keys do).
fn check_key(table: Table, key: &[u8]) -> Result<(), StoreError> {
    let ok = match table {
        Table::Meta | Table::Keyrings | Table::Issued => std::str::from_utf8(key).is_ok(),
        Table::DataKeys | Table::KeySecrets | Table::KmipObjects => key.len() == 16,
        Table::Audit | Table::Checkpoints | Table::RestoreTests | Table::Approvals | Table::Destructions => key.len() == 8,
        Table::Expiry => key.len() == 24,
    };
    if ok { Ok(()) } else { Err(StoreError::BadKey { table }) }
}

/// Checks every op of a group before any of it is sent: the same refusals as the redb store.
fn check_group(group: &WriteGroup) -> Result<(), StoreError> {
    group.check_sizes()?;
    for op in &group.ops {
        match op {
            Op::Put { table, key, .. } => match table {
                Table::Issued | Table::Audit | Table::Checkpoints | Table::KeySecrets => {
                    return Err(StoreError::WrongTable { table: *table });
                }
                _ => check_key(*table, key)?,
            },
            Op::PutSecret { table: Table::KeySecrets, key, value } => {
                check_key(Table::KeySecrets, key)?;
                if value.len() != 32 {
                    return Err(StoreError::WrongTable { table: Table::KeySecrets });
                }
            }
            Op::PutSecret { table, .. } => return Err(StoreError::WrongTable { table: *table }),
            Op::Delete { table: table @ (Table::Expiry | Table::Meta | Table::KeySecrets | Table::KmipObjects), key } => check_key(*table, key)?,
            Op::Delete { table, .. } => return Err(StoreError::WrongTable { table: *table }),
            Op::Increment { table: Table::Issued, key, .. } => check_key(Table::Issued, key)?,
            Op::Increment { table, .. } => return Err(StoreError::WrongTable { table: *table }),
            Op::Insert { table: Table::RestoreTests, .. } | Op::Append { .. } => {}
            Op::Expect { table, key, .. } => check_key(*table, key)?,
            Op::Insert { table, .. } => return Err(StoreError::WrongTable { table: *table }),
            Op::Import { table, key, value } => {
                check_key(*table, key)?;
                let fits = match table {
                    Table::Issued => value.len() == 8,
                    Table::KeySecrets => value.len() == 32,
                    _ => true,
                };
                if !fits {
                    return Err(StoreError::WrongTable { table: *table });
                }
            }
        }
    }
    Ok(())
}

/// How to reach the database.
pub struct PgOptions {
    /// libpq form: `postgresql://user@host1,host2/db?target_session_attrs=read-write` or
    /// `host=... user=...`; never with a password.
    pub url: String,
    /// The password (from the config's `password_file`).
    pub password: Option<Zeroizing<String>>,
    /// CA certificates (PEM) that the server's certificate must chain to; without it the
    /// connection is plain (a unix socket, or a network the site trusts).
    pub ca_file: Option<PathBuf>,
}

/// The TLS side of a connection.
#[derive(Clone)]
enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

/// What a connection is made from.
struct Connector {
    config: tokio_postgres::Config,
    tls: Tls,
    /// The URL as given (it carries no password), for messages.
    store: String,
}

impl Connector {
    fn new(opts: &PgOptions) -> Result<Self, StoreError> {
        let store = opts.url.clone();
        let mut config = tokio_postgres::Config::from_str(&opts.url).map_err(|source| StoreError::BadUrl { source })?;
        if config.get_password().is_some() {
            return Err(StoreError::UrlPassword);
        }
        if let Some(pw) = &opts.password {
            config.password(pw.as_bytes());
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("kluis");
        }
        let tls = match &opts.ca_file {
            None => Tls::Plain,
            Some(path) => {
                // A CA file means TLS, always: libpq's default (`prefer`) would fall back to a
                // plain connection when the server offers none, silently.
                if config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
                    return Err(StoreError::TlsDisabled);
                }
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(path)?))
            }
        };
        Ok(Self { config, tls, store })
    }

    async fn connect(&self) -> Result<Client, StoreError> {
        let client = match &self.tls {
            Tls::Plain => {
                let (client, conn) = self.config.connect(NoTls).await.map_err(|e| self.connect_error(e))?;
                tokio::spawn(drive(conn));
                client
            }
            Tls::Rustls(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await.map_err(|e| self.connect_error(e))?;
                tokio::spawn(drive(conn));
                client
            }
        };
        // Durability is the store's promise: never weaker than the server's `on`, whatever
        // the role or database default says.
        client.batch_execute("SET synchronous_commit = on").await.map_err(|e| self.err(e))?;
        Ok(client)
    }

    fn connect_error(&self, e: tokio_postgres::Error) -> StoreError {
        let store = self.store.clone();
        let user = self.config.get_user().unwrap_or("(default)").to_owned();
        let io = io_caused(&e);
        match e.code() {
            Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
                StoreError::AuthFailed { store, user, source: e }
            }
            Some(_) => StoreError::Pg { store, source: e },
            None if io => StoreError::Unreachable { store, source: e },
            // No password given where the server asks for one, or an authentication
            // exchange that failed.
            None if pg_reason(&e).contains("password") || e.to_string() == "authentication error" => {
                StoreError::AuthFailed { store, user, source: e }
            }
            None => StoreError::Unreachable { store, source: e },
        }
    }

    fn err(&self, e: tokio_postgres::Error) -> StoreError {
        StoreError::Pg { store: self.store.clone(), source: e }
    }
}

async fn drive<S, T>(conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio_postgres::tls::TlsStream + Unpin,
{
    if let Err(e) = conn.await {
        tracing::warn!(error = %pg_reason(&e), "store connection to PostgreSQL closed");
    }
}

/// One line that says what went wrong (the client's own Display gives only the kind).
/// Whether `e` says the connection is gone or the server is not taking work now (shut
/// down, restarting, in recovery), rather than refusing this statement: a closed
/// connection, an I/O error without a server answer, SQLSTATE class 08 (connection
/// exception) or 57P01-57P03 (admin/crash shutdown, cannot connect now).
pub fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(c) => {
            c.code().starts_with("08") || *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CRASH_SHUTDOWN || *c == SqlState::CANNOT_CONNECT_NOW
        }
        None => io_caused(e),
    }
}

fn io_caused(e: &tokio_postgres::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.is::<std::io::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

pub fn pg_reason(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{e}: {}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s.replace('\n', " ")
}

fn tls_config(path: &std::path::Path) -> Result<rustls::ClientConfig, StoreError> {
    let bad = |source: std::io::Error| StoreError::CaFile { path: path.display().to_string(), source };
    let pem = std::fs::read(path).map_err(bad)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.map_err(bad)?).map_err(|e| bad(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    }
    if roots.is_empty() {
        return Err(bad(std::io::Error::new(std::io::ErrorKind::InvalidData, "no certificate in the file")));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| bad(std::io::Error::other(e)))
}

/// Checks a store URL: libpq form, no password in it.
pub fn check_url(url: &str) -> Result<(), StoreError> {
    let config = tokio_postgres::Config::from_str(url).map_err(|source| StoreError::BadUrl { source })?;
    if config.get_password().is_some() {
        return Err(StoreError::UrlPassword);
    }
    Ok(())
}

/// What the writer task is asked to do.
enum Job {
    Write(WriteGroup, oneshot::Sender<Result<(), StoreError>>),
    Scrub(oneshot::Sender<Result<ScrubReport, StoreError>>),
}

/// The PostgreSQL store. Dropping the last handle stops its runtime (and so its connections).
pub struct PostgresStore {
    runtime: Option<Runtime>,
    handle: Handle,
    writer: mpsc::UnboundedSender<Job>,
    readers: Arc<Readers>,
    store: String,
}

struct Readers {
    connector: Arc<Connector>,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Allowed inside an async context too; the connections close with it.
            rt.shutdown_background();
        }
    }
}

impl PostgresStore {
    /// Makes the schema in an empty database; refuses a database that has one.
    pub fn create(opts: &PgOptions, chain: Arc<dyn Chain>) -> Result<Self, StoreError> {
        Self::start(opts, chain, true)
    }

    /// Opens the schema of a database made by [`create`](Self::create); upgrades an older
    /// format in place, refuses a newer one.
    pub fn open(opts: &PgOptions, chain: Arc<dyn Chain>) -> Result<Self, StoreError> {
        Self::start(opts, chain, false)
    }

    fn start(opts: &PgOptions, chain: Arc<dyn Chain>, create: bool) -> Result<Self, StoreError> {
        let connector = Arc::new(Connector::new(opts)?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kluis-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Runtime { source: e })?;
        let handle = runtime.handle().clone();
        let store = connector.store.clone();
        let c = connector.clone();
        let genesis = chain.genesis();
        let client = match wait(&handle, async move {
            let mut client = c.connect().await?;
            if create { create_schema(&mut client, &c.store, &genesis).await? } else { check_schema(&mut client, &c.store).await? }
            Ok(client)
        }) {
            Ok(client) => client,
            Err(e) => {
                // A plain drop would block, which tokio forbids when the caller is async
                // (start-up runs on the server's runtime).
                runtime.shutdown_background();
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        handle.spawn(writer_loop(connector.clone(), client, rx, chain));
        let readers = Arc::new(Readers { connector, idle: Mutex::new(Vec::new()), permits: Arc::new(Semaphore::new(READERS)) });
        Ok(Self { runtime: Some(runtime), handle, writer: tx, readers, store })
    }

    /// Runs `f` with a read connection of the pool; a connection whose query failed is
    /// closed, not returned.
    fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send,
    {
        let readers = self.readers.clone();
        wait(&self.handle, async move {
            let _permit = readers.permits.clone().acquire_owned().await.map_err(|_| StoreError::WriterGone)?;
            let client = readers.checkout().await?;
            let client = Arc::new(client);
            let r = f(client.clone()).await;
            match (r, Arc::try_unwrap(client)) {
                (Ok(v), Ok(client)) => {
                    readers.give_back(client);
                    Ok(v)
                }
                (Ok(v), Err(_)) => Ok(v),
                (Err(e), _) => Err(readers.connector.err(e)),
            }
        })
    }
}

impl Readers {
    async fn checkout(&self) -> Result<Client, StoreError> {
        let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
        match idle {
            Some(c) if !c.is_closed() => Ok(c),
            _ => self.connector.connect().await,
        }
    }

    fn give_back(&self, client: Client) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < READERS
        {
            idle.push(client);
        }
    }
}

/// Runs `fut` on the store's runtime and waits for it on this thread.
fn wait<T: Send + 'static>(
    handle: &Handle,
    fut: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    let recv = move || rx.recv().map_err(|_| StoreError::WriterGone)?;
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(recv),
        _ => recv(),
    }
}

const EXISTS_SQL: &str = "SELECT to_regclass('kluis_schema') IS NOT NULL";

async fn schema_exists(client: &Client, store: &str) -> Result<bool, StoreError> {
    let row = client
        .query_typed_one(EXISTS_SQL, &[])
        .await
        .map_err(|source| StoreError::Pg { store: store.to_owned(), source })?;
    Ok(row.get(0))
}

async fn create_schema(client: &mut Client, store: &str, genesis: &str) -> Result<(), StoreError> {
    let pg = |source| StoreError::Pg { store: store.to_owned(), source };
    let txn = client.transaction().await.map_err(pg)?;
    txn.execute_typed("SELECT pg_advisory_xact_lock($1)", &[(&SCHEMA_LOCK, Type::INT8)]).await.map_err(pg)?;
    let exists: bool = txn.query_typed_one(EXISTS_SQL, &[]).await.map_err(pg)?.get(0);
    if exists {
        return Err(StoreError::AlreadyExists { store: store.to_owned() });
    }
    let mut sql = String::from(
        "CREATE TABLE kluis_schema (id smallint PRIMARY KEY CHECK (id = 1), format integer NOT NULL);
         CREATE TABLE kluis_audit_head (id smallint PRIMARY KEY CHECK (id = 1), next_seq bigint NOT NULL, head text NOT NULL);\n",
    );
    for t in ALL_TABLES {
        let v = if t == Table::Issued { "bigint" } else { "bytea" };
        sql += &format!("CREATE TABLE {} (k bytea PRIMARY KEY, v {v} NOT NULL);\n", name(t));
    }
    txn.batch_execute(&sql).await.map_err(pg)?;
    txn.execute_typed("INSERT INTO kluis_schema (id, format) VALUES (1, $1)", &[(&FORMAT, Type::INT4)]).await.map_err(pg)?;
    txn.execute_typed("INSERT INTO kluis_audit_head (id, next_seq, head) VALUES (1, 1, $1)", &[(&genesis, Type::TEXT)])
        .await
        .map_err(pg)?;
    txn.commit().await.map_err(pg)
}

async fn check_schema(client: &mut Client, store: &str) -> Result<(), StoreError> {
    let pg = |source| StoreError::Pg { store: store.to_owned(), source };
    if !schema_exists(client, store).await? {
        return Err(StoreError::NotInitialised { store: store.to_owned() });
    }
    let row = client.query_typed_opt("SELECT format FROM kluis_schema WHERE id = 1", &[]).await.map_err(pg)?;
    let found: i32 = row.ok_or_else(|| StoreError::BadFormat { store: store.to_owned() })?.get(0);
    if found > FORMAT {
        return Err(StoreError::NewerFormat {
            store: store.to_owned(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
            supported: FORMAT as u32,
        });
    }
    if found < 1 {
        return Err(StoreError::BadFormat { store: store.to_owned() });
    }
    if found < FORMAT {
        upgrade_schema(client, store, found).await?;
    }
    Ok(())
}

/// Moves a schema of format `seen` on to [`FORMAT`] in one transaction: takes SCHEMA_LOCK,
/// reads the format again (READ COMMITTED: a snapshot taken after the lock, so an upgrade
/// another replica committed meanwhile is seen, and found done), and makes each later
/// format's changes in turn.
async fn upgrade_schema(client: &mut Client, store: &str, seen: i32) -> Result<(), StoreError> {
    let failed = |source| StoreError::SchemaUpgrade {
        store: store.to_owned(),
        found: u32::try_from(seen).unwrap_or(0),
        supported: FORMAT as u32,
        source,
    };
    let txn = client.build_transaction().isolation_level(tokio_postgres::IsolationLevel::ReadCommitted).start().await.map_err(failed)?;
    txn.execute_typed("SELECT pg_advisory_xact_lock($1)", &[(&SCHEMA_LOCK, Type::INT8)]).await.map_err(failed)?;
    let row = txn.query_typed_opt("SELECT format FROM kluis_schema WHERE id = 1", &[]).await.map_err(failed)?;
    let found: i32 = row.ok_or_else(|| StoreError::BadFormat { store: store.to_owned() })?.get(0);
    if found > FORMAT {
        let found = u32::try_from(found).unwrap_or(u32::MAX);
        return Err(StoreError::NewerFormat { store: store.to_owned(), found, supported: FORMAT as u32 });
    }
    if found == FORMAT {
        // Another replica upgraded it while this one waited for the lock.
        return Ok(());
    }
    if found < 2 {
        let sql = format!("CREATE TABLE {} (k bytea PRIMARY KEY, v bytea NOT NULL)", name(Table::KmipObjects));
        txn.batch_execute(&sql).await.map_err(failed)?;
    }
    txn.execute_typed("UPDATE kluis_schema SET format = $1 WHERE id = 1", &[(&FORMAT, Type::INT4)]).await.map_err(failed)?;
    txn.commit().await.map_err(failed)?;
    tracing::info!(store, from = found, to = FORMAT, "upgraded the store's schema");
    Ok(())
}

async fn writer_loop(connector: Arc<Connector>, mut client: Client, mut rx: mpsc::UnboundedReceiver<Job>, chain: Arc<dyn Chain>) {
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        if client.is_closed() {
            match connector.connect().await {
                Ok(c) => client = c,
                Err(e) => {
                    tracing::error!(error = %e, "store: cannot reconnect to PostgreSQL");
                    reply_err(first, e);
                    continue;
                }
            }
        }
        let (group, reply) = match first {
            Job::Write(group, reply) => (group, reply),
            Job::Scrub(reply) => {
                // In the writer: ordered after every acknowledged commit, and commits wait.
                let _ = reply.send(scrub(&client, &connector.store).await);
                continue;
            }
        };
        let mut batch = vec![(group, reply)];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Job::Write(g, r)) => batch.push((g, r)),
                Ok(scrub) => {
                    next = Some(scrub);
                    break;
                }
                Err(_) => break,
            }
        }
        // Groups refused before any SQL fail alone.
        let mut ready = Vec::with_capacity(batch.len());
        for (g, r) in batch {
            match check_group(&g) {
                Ok(()) => ready.push((g, r)),
                Err(e) => {
                    let _ = r.send(Err(e));
                }
            }
        }
        if ready.is_empty() {
            continue;
        }
        let groups: Vec<&WriteGroup> = ready.iter().map(|(g, _)| g).collect();
        match commit_groups(&mut client, &connector.store, &groups, chain.as_ref()).await {
            Ok(()) => {
                for (_, r) in ready {
                    let _ = r.send(Ok(()));
                }
            }
            Err(e) if ready.len() == 1 || client.is_closed() => {
                tracing::error!(error = %e, writes = ready.len(), "store commit failed");
                // With the connection gone, the others failed for the same reason: they
                // may succeed once the database is back.
                let lost = client.is_closed();
                let mut first = Some(e);
                for (_, r) in ready {
                    let e = first.take().unwrap_or_else(|| {
                        if lost { StoreError::ConnectionLost { store: connector.store.clone() } } else { StoreError::GroupFailed }
                    });
                    let _ = r.send(Err(e));
                }
            }
            Err(e) => {
                // One group may have failed the others: commit each on its own.
                tracing::warn!(error = %e, writes = ready.len(), "store group commit failed; committing its groups one by one");
                for (g, r) in ready {
                    let res = commit_groups(&mut client, &connector.store, &[&g], chain.as_ref()).await;
                    if let Err(e) = &res {
                        tracing::error!(error = %e, "store commit failed");
                    }
                    let _ = r.send(res);
                }
            }
        }
    }
}

fn reply_err(job: Job, e: StoreError) {
    match job {
        Job::Write(_, r) => drop(r.send(Err(e))),
        Job::Scrub(r) => drop(r.send(Err(e))),
    }
}

/// The chain head as the transaction holds it, once locked.
struct Head {
    next_seq: u64,
    prev: ChainHead,
}

/// Commits `groups` in one transaction.
/// A statement's parameter, owned: statements are queued and sent together.
enum Param {
    Bytes(Vec<u8>),
    Int(i64),
    Text(String),
    BytesArray(Vec<Vec<u8>>),
    /// Secret values: zeroized when the statement is dropped; never printed.
    SecretArray(Vec<Zeroizing<Vec<u8>>>),
    IntArray(Vec<i64>),
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Param::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Param::Int(i) => write!(f, "Int({i})"),
            Param::Text(t) => write!(f, "Text({t:?})"),
            Param::BytesArray(a) => write!(f, "BytesArray({} rows)", a.len()),
            Param::SecretArray(a) => write!(f, "SecretArray({} rows, ..)", a.len()),
            Param::IntArray(a) => write!(f, "IntArray({} rows)", a.len()),
        }
    }
}

impl ToSql for Param {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Param::Bytes(b) => b.as_slice().to_sql(ty, out),
            Param::Int(i) => i.to_sql(ty, out),
            Param::Text(t) => t.to_sql(ty, out),
            Param::BytesArray(a) => a.iter().map(Vec::as_slice).collect::<Vec<&[u8]>>().to_sql(ty, out),
            Param::SecretArray(a) => a.iter().map(|v| v.as_slice()).collect::<Vec<&[u8]>>().to_sql(ty, out),
            Param::IntArray(a) => a.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <&[u8] as ToSql>::accepts(ty)
            || <i64 as ToSql>::accepts(ty)
            || <String as ToSql>::accepts(ty)
            || <Vec<&[u8]> as ToSql>::accepts(ty)
            || <Vec<i64> as ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

/// What a transaction's queued plain writes leave in one row.
enum Net {
    Put(Zeroizing<Vec<u8>>),
    Delete,
    Increment(i64),
}

/// Writes of a transaction whose answers nothing waits for, queued and sent together
/// ([`flush`]) in one statement per table and kind (multi-row, `unnest`), pipelined: the
/// transaction pays a few round trips for them instead of one per op, and PostgreSQL runs
/// a few statements instead of several per issued key.
///
/// Rows (put, delete, increment) keep only their net effect in op order: a later write of
/// a row replaces an earlier one, increments add up; no two writes of one row meet in one
/// statement. The log's entries and checkpoints, imports and the head's update follow.
#[derive(Default)]
struct Queue {
    rows: std::collections::BTreeMap<(&'static str, Vec<u8>), Net>,
    audit: Vec<(Vec<u8>, Vec<u8>)>,
    checkpoints: Vec<(Vec<u8>, Vec<u8>)>,
    stmts: Vec<(String, Vec<(Param, Type)>)>,
}

impl Queue {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) {
        self.rows.insert((name(table), key.to_vec()), Net::Put(Zeroizing::new(value.to_vec())));
    }

    fn delete(&mut self, table: Table, key: &[u8]) {
        self.rows.insert((name(table), key.to_vec()), Net::Delete);
    }

    fn increment(&mut self, table: Table, key: &[u8], by: i64) {
        let e = self.rows.entry((name(table), key.to_vec())).or_insert(Net::Increment(0));
        // Only counters are incremented (check_group), never put or deleted.
        *e = match e {
            Net::Increment(n) => Net::Increment(n.saturating_add(by)),
            _ => Net::Increment(by),
        };
    }

    fn push(&mut self, sql: String, params: Vec<(Param, Type)>) {
        self.stmts.push((sql, params));
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.audit.is_empty() && self.checkpoints.is_empty() && self.stmts.is_empty()
    }

    /// The statements, rows first (one per table and kind), then the log, then the rest.
    fn statements(&mut self) -> Vec<(String, Vec<(Param, Type)>)> {
        let mut out = Vec::new();
        let rows = std::mem::take(&mut self.rows);
        let mut tables: Vec<&'static str> = rows.keys().map(|(t, _)| *t).collect();
        tables.dedup();
        let mut rows = rows.into_iter().peekable();
        for t in tables {
            let (mut put_k, mut put_v, mut del_k, mut inc_k, mut inc_v) = (vec![], vec![], vec![], vec![], vec![]);
            while let Some(((_, k), net)) = rows.next_if(|((tt, _), _)| *tt == t) {
                match net {
                    Net::Put(v) => {
                        put_k.push(k);
                        put_v.push(v);
                    }
                    Net::Delete => del_k.push(k),
                    Net::Increment(n) => {
                        inc_k.push(k);
                        inc_v.push(n);
                    }
                }
            }
            if !del_k.is_empty() {
                out.push((format!("DELETE FROM {t} WHERE k = ANY($1)"), vec![(Param::BytesArray(del_k), Type::BYTEA_ARRAY)]));
            }
            if !put_k.is_empty() {
                out.push((
                    format!("INSERT INTO {t} (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"),
                    vec![(Param::BytesArray(put_k), Type::BYTEA_ARRAY), (Param::SecretArray(put_v), Type::BYTEA_ARRAY)],
                ));
            }
            if !inc_k.is_empty() {
                out.push((
                    format!(
                        "INSERT INTO {t} AS t (k, v) SELECT * FROM unnest($1::bytea[], $2::int8[]) ON CONFLICT (k) DO UPDATE SET v = \
                         CASE WHEN t.v > 9223372036854775807 - EXCLUDED.v THEN 9223372036854775807 ELSE t.v + EXCLUDED.v END"
                    ),
                    vec![(Param::BytesArray(inc_k), Type::BYTEA_ARRAY), (Param::IntArray(inc_v), Type::INT8_ARRAY)],
                ));
            }
        }
        for (table, rows, upsert) in
            [("kluis_audit", std::mem::take(&mut self.audit), ""), ("kluis_audit_checkpoints", std::mem::take(&mut self.checkpoints), " ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v")]
        {
            if rows.is_empty() {
                continue;
            }
            let (k, v): (Vec<Vec<u8>>, Vec<Vec<u8>>) = rows.into_iter().unzip();
            out.push((
                format!("INSERT INTO {table} (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]){upsert}"),
                vec![(Param::BytesArray(k), Type::BYTEA_ARRAY), (Param::BytesArray(v), Type::BYTEA_ARRAY)],
            ));
        }
        out.append(&mut self.stmts);
        out
    }
}

/// Sends every queued statement at once (tokio-postgres pipelines requests that are in
/// flight together; the server runs them in order) and waits for all of them; the first
/// error fails the transaction.
async fn flush(txn: &tokio_postgres::Transaction<'_>, queue: &mut Queue, store: &str) -> Result<(), StoreError> {
    if queue.is_empty() {
        return Ok(());
    }
    let stmts = queue.statements();
    let params: Vec<Vec<(&(dyn ToSql + Sync), Type)>> =
        stmts.iter().map(|(_, ps)| ps.iter().map(|(p, t)| (p as &(dyn ToSql + Sync), t.clone())).collect()).collect();
    let mut pending: Vec<_> = stmts.iter().zip(&params).map(|((sql, _), ps)| Box::pin(txn.execute_typed(sql, ps))).collect();
    let mut results: Vec<Option<Result<u64, tokio_postgres::Error>>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (f, r) in pending.iter_mut().zip(results.iter_mut()) {
            if r.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *r = Some(v),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    for r in results.into_iter().flatten() {
        r.map_err(|source| StoreError::Pg { store: store.to_owned(), source })?;
    }
    Ok(())
}

async fn commit_groups(client: &mut Client, store: &str, groups: &[&WriteGroup], chain: &dyn Chain) -> Result<(), StoreError> {
    let pg = |source| StoreError::Pg { store: store.to_owned(), source };
    let txn = client.transaction().await.map_err(pg)?;
    // First, before any row lock: groups that compare and set are serialised across every
    // replica, and always take this lock before the audit head's (no lock-order cycle).
    if groups.iter().any(|g| g.expects()) {
        txn.execute_typed("SELECT pg_advisory_xact_lock($1)", &[(&EXPECT_LOCK, Type::INT8)]).await.map_err(pg)?;
    }
    let mut head: Option<Head> = None;
    let mut linked_here: Vec<(u64, ChainHead)> = Vec::new();
    let mut on_commit = Vec::new();
    let mut locked_tests = false;
    // Plain writes wait here until a statement whose answer is needed (or the commit).
    let mut q = Queue::default();
    let bytes = |b: &[u8]| (Param::Bytes(b.to_vec()), Type::BYTEA);
    for op in groups.iter().flat_map(|g| g.ops.iter()) {
        match op {
            Op::Put { table, key, value } => q.put(*table, key, value),
            Op::PutSecret { table, key, value } => q.put(*table, key, value),
            Op::Delete { table, key } => q.delete(*table, key),
            Op::Increment { table, key, by } => q.increment(*table, key, i64::try_from(*by).unwrap_or(i64::MAX)),
            Op::Insert { table, value } => {
                flush(&txn, &mut q, store).await?;
                // The next id is one more than the largest: the table lock orders inserters
                // across replicas (restore tests are rare).
                if !locked_tests {
                    txn.batch_execute(&format!("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE", name(*table))).await.map_err(pg)?;
                    locked_tests = true;
                }
                let last = txn
                    .query_typed_opt(&format!("SELECT k FROM {} ORDER BY k DESC LIMIT 1", name(*table)), &[])
                    .await
                    .map_err(pg)?;
                let id = match last {
                    Some(row) => super::key_id(*table, row.get::<_, &[u8]>(0))? + 1,
                    None => 1,
                };
                let key = super::id_key(id).to_vec();
                let sql = format!("INSERT INTO {} (k, v) VALUES ($1, $2)", name(*table));
                txn.execute_typed(&sql, &[(&key, Type::BYTEA), (value, Type::BYTEA)]).await.map_err(pg)?;
            }
            Op::Expect { table, key, value } => {
                // After the group's earlier writes, which must be sent first.
                flush(&txn, &mut q, store).await?;
                // READ COMMITTED after the lock: sees every commit of the other holders.
                let sql = format!("SELECT v FROM {} WHERE k = $1", name(*table));
                let row = txn.query_typed_opt(&sql, &[(key, Type::BYTEA)]).await.map_err(pg)?;
                let found: Option<Vec<u8>> = row.map(|r| r.get(0));
                if found.as_deref() != value.as_deref() {
                    return Err(StoreError::Conflict { what: super::expect_what(*table, key) });
                }
            }
            Op::Import { table: Table::Issued, key, value } => {
                let n = <[u8; 8]>::try_from(value.as_slice()).map_err(|_| StoreError::WrongTable { table: Table::Issued })?;
                let n = i64::try_from(u64::from_be_bytes(n)).unwrap_or(i64::MAX);
                q.push("INSERT INTO kluis_issued_per_keyring (k, v) VALUES ($1, $2)".into(), vec![bytes(key), (Param::Int(n), Type::INT8)]);
            }
            Op::Import { table: Table::Audit, key, value } => {
                if head.is_none() {
                    head = Some(lock_head(&txn, store).await?);
                }
                let h = head.as_mut().ok_or(StoreError::GroupFailed)?;
                let seq = super::key_id(Table::Audit, key)?;
                if seq != h.next_seq {
                    return Err(StoreError::ImportOrder { seq, next: h.next_seq });
                }
                q.audit.push((key.clone(), value.to_vec()));
                h.prev = chain.head_of(seq, value).map_err(|source| StoreError::Resume { seq, source })?;
                h.next_seq += 1;
            }
            Op::Import { table, key, value } => {
                let param = if *table == Table::KeySecrets {
                    Param::SecretArray(vec![Zeroizing::new(value.to_vec())])
                } else {
                    Param::BytesArray(vec![value.to_vec()])
                };
                let sql = format!("INSERT INTO {} (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[])", name(*table));
                q.push(sql, vec![(Param::BytesArray(vec![key.clone()]), Type::BYTEA_ARRAY), (param, Type::BYTEA_ARRAY)]);
            }
            Op::Append { entry } => {
                if head.is_none() {
                    // Taken at the first append; what was queued before goes with it.
                    flush(&txn, &mut q, store).await?;
                    head = Some(lock_head(&txn, store).await?);
                }
                let h = head.as_mut().ok_or(StoreError::GroupFailed)?;
                let seq = h.next_seq;
                // The head lock is held: the stored entries below `seq` are committed, by
                // whichever replica wrote them.
                let base = match chain.base_of(seq) {
                    Some(b) => {
                        let stored = match linked_here.iter().any(|(s, _)| *s == b) || b == 0 {
                            true => None,
                            false => txn
                                .query_typed_opt("SELECT v FROM kluis_audit WHERE k = $1", &[(&super::id_key(b).to_vec(), Type::BYTEA)])
                                .await
                                .map_err(pg)?
                                .map(|r| r.get::<_, Vec<u8>>(0)),
                        };
                        super::base_head(chain, b, &linked_here, |_| Ok(stored))?
                    }
                    None => None,
                };
                let linked = chain.link(seq, &h.prev, entry, base.as_ref()).map_err(|source| StoreError::Link { seq, source })?;
                linked_here.push((seq, linked.head.clone()));
                on_commit.extend(linked.on_commit);
                let key = super::id_key(seq).to_vec();
                if let Some(cp) = linked.checkpoint {
                    q.checkpoints.push((key.clone(), cp));
                }
                q.audit.push((key, linked.stored));
                h.prev = linked.head;
                h.next_seq += 1;
            }
        }
    }
    if let Some(h) = &head {
        let next = i64::try_from(h.next_seq).map_err(|_| StoreError::BadFormat { store: store.to_owned() })?;
        q.push("UPDATE kluis_audit_head SET next_seq = $1, head = $2 WHERE id = 1".into(), vec![(Param::Int(next), Type::INT8), (Param::Text(h.prev.clone()), Type::TEXT)]);
    }
    flush(&txn, &mut q, store).await?;
    txn.commit().await.map_err(pg)?;
    if !on_commit.is_empty() {
        chain.committed(on_commit);
    }
    Ok(())
}

/// The log head, locked for the rest of the transaction.
async fn lock_head(txn: &tokio_postgres::Transaction<'_>, store: &str) -> Result<Head, StoreError> {
    let row = txn
        .query_typed_one("SELECT next_seq, head FROM kluis_audit_head WHERE id = 1 FOR UPDATE", &[])
        .await
        .map_err(|source| StoreError::Pg { store: store.to_owned(), source })?;
    let next: i64 = row.get(0);
    Ok(Head { next_seq: u64::try_from(next).map_err(|_| StoreError::BadFormat { store: store.to_owned() })?, prev: row.get(1) })
}

/// Bytes of every Kluis table (heap, indexes, TOAST).
async fn size(client: &Client, store: &str) -> Result<u64, StoreError> {
    let mut sql = String::from("SELECT (0");
    for t in ALL_TABLES {
        sql += &format!(" + pg_total_relation_size('{}')", name(t));
    }
    sql += ")::bigint";
    let row = client.query_typed_one(&sql, &[]).await.map_err(|source| StoreError::Pg { store: store.to_owned(), source })?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// `VACUUM FULL` of the tables that hold secrets (key secrets, keyrings, meta, KMIP
/// objects): PostgreSQL writes each into new files with only the live rows and removes the
/// old ones, so a copy of the data directory taken afterwards no longer holds a destroyed
/// key's secret (or a deleted KMIP object's sealed key) in a table. It does **not** remove: the WAL that recorded the row (until PostgreSQL recycles
/// the segment) and any WAL archive; a standby's WAL (its heap is rewritten too, when it
/// replays the VACUUM FULL); backups of the database taken before; the blocks the file
/// system freed (as for the redb file's rename). Needs the tables' owner (the role that ran
/// `kms-server init`).
async fn scrub(client: &Client, store: &str) -> Result<ScrubReport, StoreError> {
    let started = std::time::Instant::now();
    let bytes_before = size(client, store).await?;
    client
        .batch_execute(&format!("VACUUM FULL {}", SECRET_TABLES.join(", ")))
        .await
        .map_err(|source| StoreError::Pg { store: store.to_owned(), source })?;
    Ok(ScrubReport {
        bytes_before,
        bytes_after: size(client, store).await?,
        millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// A `WHERE` clause for a key range, its parameters numbered from `first`.
fn range_sql(range: &KeyRange<'_>, first: usize) -> (String, Vec<Vec<u8>>) {
    let mut clauses = Vec::new();
    let mut params = Vec::new();
    for (b, lo) in [(range.0, true), (range.1, false)] {
        let (op, k) = match b {
            Bound::Included(k) => (if lo { ">=" } else { "<=" }, k),
            Bound::Excluded(k) => (if lo { ">" } else { "<" }, k),
            Bound::Unbounded => continue,
        };
        clauses.push(format!("k {op} ${}", first + params.len()));
        params.push(k.to_vec());
    }
    (clauses.join(" AND "), params)
}

impl Store for PostgresStore {
    fn describe(&self) -> String {
        self.store.clone()
    }

    fn exclusive(&self) -> bool {
        false
    }

    fn commit(&self, group: WriteGroup) -> StoreFuture<'_, ()> {
        let (tx, rx) = oneshot::channel();
        let sent = self.writer.send(Job::Write(group, tx)).map_err(|_| StoreError::WriterGone);
        Box::pin(async move {
            sent?;
            rx.await.map_err(|_| StoreError::WriterGone)?
        })
    }

    fn commit_blocking(&self, group: WriteGroup) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send(Job::Write(group, tx)).map_err(|_| StoreError::WriterGone)?;
        wait(&self.handle, async move { rx.await.map_err(|_| StoreError::WriterGone)? })
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        check_key(table, key)?;
        let key = key.to_vec();
        let row = self.read(move |c| async move {
            let sql = format!("SELECT v FROM {} WHERE k = $1", name(table));
            c.query_typed_opt(&sql, &[(&key, Type::BYTEA)]).await
        })?;
        Ok(row.map(|r| if table == Table::Issued { (r.get::<_, i64>(0) as u64).to_be_bytes().to_vec() } else { r.get::<_, Vec<u8>>(0) }))
    }

    fn scan(&self, table: Table, range: KeyRange<'_>, visit: &mut Visit<'_>) -> Result<(), StoreError> {
        if table == Table::KeySecrets {
            // Secrets are read one by one, never listed.
            return Err(StoreError::WrongTable { table });
        }
        for b in [range.0, range.1] {
            if let Bound::Included(k) | Bound::Excluded(k) = b {
                check_key(table, k)?;
            }
        }
        // One REPEATABLE READ transaction over the pages: one consistent read, as the
        // contract says, while the visitor runs between the pages.
        let readers = self.readers.clone();
        let client = wait(&self.handle, {
            let readers = readers.clone();
            async move {
                let permit = readers.permits.clone().acquire_owned().await.map_err(|_| StoreError::WriterGone)?;
                let client = readers.checkout().await?;
                client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await.map_err(|e| readers.connector.err(e))?;
                Ok((Arc::new(client), permit))
            }
        })?;
        let (client, permit) = client;
        let (bounds, bound_params) = range_sql(&range, 2);
        let mut after: Option<Vec<u8>> = None;
        let result = (|| {
            loop {
                let mut clauses = vec![];
                if after.is_some() {
                    clauses.push("k > $1".to_owned());
                } else {
                    clauses.push("$1::bytea IS NULL".to_owned());
                }
                if !bounds.is_empty() {
                    clauses.push(bounds.clone());
                }
                let sql = format!("SELECT k, v FROM {} WHERE {} ORDER BY k LIMIT {SCAN_PAGE}", name(table), clauses.join(" AND "));
                let c = client.clone();
                let params = bound_params.clone();
                let a = after.clone();
                let rows = wait(&self.handle, {
                    let readers = readers.clone();
                    async move {
                        let mut p: Vec<(&(dyn ToSql + Sync), Type)> = vec![(&a, Type::BYTEA)];
                        for v in &params {
                            p.push((v, Type::BYTEA));
                        }
                        c.query_typed(&sql, &p).await.map_err(|e| readers.connector.err(e))
                    }
                })?;
                let full = rows.len() as i64 == SCAN_PAGE;
                for row in &rows {
                    let k: &[u8] = row.get(0);
                    let more = if table == Table::Issued {
                        visit(k, &(row.get::<_, i64>(1) as u64).to_be_bytes())?
                    } else {
                        visit(k, row.get::<_, &[u8]>(1))?
                    };
                    if !more {
                        return Ok(());
                    }
                }
                match rows.last() {
                    Some(row) if full => after = Some(row.get::<_, Vec<u8>>(0)),
                    _ => return Ok(()),
                }
            }
        })();
        let c = client.clone();
        let ended = wait(&self.handle, async move { Ok(c.batch_execute("ROLLBACK").await.is_ok()) }).unwrap_or(false);
        if ended && let Ok(client) = Arc::try_unwrap(client) {
            readers.give_back(client);
        }
        drop(permit);
        result
    }

    fn last(&self, table: Table) -> Result<Option<Row>, StoreError> {
        if !matches!(table, Table::Audit | Table::Checkpoints | Table::RestoreTests | Table::Approvals | Table::Destructions) {
            return Err(StoreError::WrongTable { table });
        }
        let row = self.read(move |c| async move {
            let sql = format!("SELECT k, v FROM {} ORDER BY k DESC LIMIT 1", name(table));
            c.query_typed_opt(&sql, &[]).await
        })?;
        Ok(row.map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1))))
    }

    fn scrub(&self) -> StoreFuture<'_, ScrubReport> {
        let (tx, rx) = oneshot::channel();
        let sent = self.writer.send(Job::Scrub(tx)).map_err(|_| StoreError::WriterGone);
        Box::pin(async move {
            sent?;
            rx.await.map_err(|_| StoreError::WriterGone)?
        })
    }

    fn health(&self) -> StoreFuture<'_, ()> {
        let readers = self.readers.clone();
        let store = self.store.clone();
        let (tx, rx) = oneshot::channel();
        self.handle.spawn(async move {
            let probe = async {
                let _permit = readers.permits.clone().acquire_owned().await.map_err(|_| StoreError::WriterGone)?;
                let client = readers.checkout().await?;
                let client = match client.simple_query("SELECT 1").await {
                    Ok(_) => client,
                    // A pooled connection the database dropped (a restart): one fresh try.
                    Err(e) if connection_lost(&e) => {
                        let fresh = readers.connector.connect().await?;
                        fresh.simple_query("SELECT 1").await.map_err(|e| readers.connector.err(e))?;
                        fresh
                    }
                    Err(e) => return Err(readers.connector.err(e)),
                };
                readers.give_back(client);
                Ok(())
            };
            let r = match tokio::time::timeout(HEALTH_TIMEOUT, probe).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::TimedOut { store, secs: HEALTH_TIMEOUT.as_secs() }),
            };
            let _ = tx.send(r);
        });
        Box::pin(async move { rx.await.map_err(|_| StoreError::WriterGone)? })
    }
}
