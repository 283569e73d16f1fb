//! A real PostgreSQL server for a test: `initdb` in a temp dir, `postgres` on a unix
//! socket only (`listen_addresses=''`), stopped (immediate shutdown) when dropped.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI, a fresh VM), the
//! cluster is made and run as the user `KLUIS_TEST_PG_USER` (default `nobody`, which every
//! Debian system has): its data directory is handed to that user, the socket directory is
//! open to all, and the tests connect as the database superuser `kluis` over the socket.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

/// The database role the tests connect as (the cluster's superuser).
pub const USER: &str = "kluis";

/// The directory of the newest installed PostgreSQL's programs (Debian:
/// /usr/lib/postgresql/N/bin), or none (then they are looked up on PATH).
pub fn bindir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

fn program(name: &str) -> PathBuf {
    bindir().map(|d| d.join(name)).unwrap_or_else(|| PathBuf::from(name))
}

/// The uid and gid to run PostgreSQL as: ours, or `KLUIS_TEST_PG_USER`'s when we are root.
fn run_as() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output().expect("id");
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let user = std::env::var("KLUIS_TEST_PG_USER").unwrap_or_else(|_| "nobody".into());
    let id = |flag: &str| -> u32 {
        let o = Command::new("id").args([flag, &user]).output().expect("id");
        assert!(o.status.success(), "the tests run as root and PostgreSQL refuses root: user {user} (KLUIS_TEST_PG_USER) must exist");
        String::from_utf8_lossy(&o.stdout).trim().parse().expect("numeric id")
    };
    Some((id("-u"), id("-g")))
}

/// A running PostgreSQL cluster in its own temp directory.
pub struct Postgres {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// The data directory.
    pub data: PathBuf,
    /// The directory of the server's unix socket.
    pub socket_dir: PathBuf,
    log: Arc<Mutex<String>>,
    /// Extra `postgres` arguments, after the defaults (a later `-c` wins).
    args: Vec<String>,
    /// The TCP port on 127.0.0.1, if it listens there too ([`Postgres::start_tcp`]).
    tcp_port: Option<u16>,
}

impl Postgres {
    /// A cluster whose local connections are trusted (no password).
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A cluster that asks every connection for `password` (SCRAM) for the user [`USER`].
    pub fn start_with_password(password: &str) -> Self {
        Self::start_with(Some(password))
    }

    fn start_with(password: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let as_user = run_as();
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&data).unwrap();
        std::fs::create_dir(&socket_dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut initdb = Command::new(program("initdb"));
        initdb.args(["-D", s(&data), "-U", USER, "--locale=C", "-E", "UTF8", "--no-sync", "--no-instructions"]);
        if let Some(pw) = password {
            let pwfile = dir.path().join("pwfile");
            std::fs::write(&pwfile, pw).unwrap();
            std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
            initdb.args(["--auth=scram-sha-256", "--pwfile", s(&pwfile)]);
        } else {
            initdb.arg("--auth=trust");
        }
        if let Some((uid, gid)) = as_user {
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.current_dir(dir.path()).output().expect("initdb (Debian package postgresql) is required");
        assert!(out.status.success(), "initdb: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let mut pg = Self { child: None, dir, data, socket_dir, log: Arc::new(Mutex::new(String::new())), args: Vec::new(), tcp_port: None };
        pg.spawn();
        pg
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(program("postgres"));
        cmd.args(["-D", s(&self.data), "-k", s(&self.socket_dir)])
            .args(["-c", "listen_addresses=", "-c", "port=5432", "-c", "unix_socket_permissions=0777"])
            .args(["-c", "shared_buffers=16MB", "-c", "max_connections=60", "-c", "fsync=on"])
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = run_as() {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().expect("postgres");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = log.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
                // "ready to accept connections", or "... read-only connections" for a standby.
                if line.contains("ready to accept")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        // Waits on the server's own line; a server that exits first closes the pipe.
        if rx.recv().is_err() {
            panic!("postgres did not start:\n{}", self.log());
        }
        self.child = Some(child);
    }

    /// A streaming-replication standby of `primary` in its own temp directory (its own
    /// unix socket directory, same port number): `pg_basebackup -R` from the primary, then
    /// started as a hot standby. Make it synchronous with
    /// [`make_standby_synchronous`](Self::make_standby_synchronous) on the primary.
    pub fn standby_of(primary: &Postgres) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut cmd = Command::new(program("pg_basebackup"));
        cmd.args(["-h", s(&primary.socket_dir), "-p", &primary.port().to_string(), "-U", USER, "-D", s(&data), "-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        if let Some((uid, gid)) = run_as() {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.current_dir(dir.path()).output().expect("pg_basebackup (Debian package postgresql)");
        assert!(out.status.success(), "pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
        let mut pg = Self { child: None, dir, data, socket_dir, log: Arc::new(Mutex::new(String::new())), args: Vec::new(), tcp_port: None };
        pg.spawn();
        pg
    }

    /// On the primary: every commit from now on waits for the standby to have it
    /// (`synchronous_standby_names = '*'`, `synchronous_commit = on`); returns once the
    /// standby streams as a synchronous one.
    pub fn make_standby_synchronous(&self) {
        self.psql("postgres", "ALTER SYSTEM SET synchronous_standby_names = '*'");
        self.psql("postgres", "SELECT pg_reload_conf()");
        let start = std::time::Instant::now();
        while self.psql("postgres", "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") != "1" {
            assert!(start.elapsed() < std::time::Duration::from_secs(120), "the standby did not become synchronous:\n{}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Promotes this standby to a primary and waits until it takes writes.
    pub fn promote(&self) {
        assert_eq!(self.psql("postgres", "SELECT pg_promote(true, 120)"), "t", "{}", self.log());
        assert_eq!(self.psql("postgres", "SELECT pg_is_in_recovery()"), "f");
    }

    /// SIGKILL of the postmaster (its backends stay until they notice): a primary lost as
    /// a machine would be.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The host part of a multi-host libpq URL for this server (`%2F`-encoded socket dir and port).
    pub fn host(&self) -> String {
        let host: String = s(&self.socket_dir).bytes().map(|b| if b == b'/' { "%2F".to_owned() } else { (b as char).to_string() }).collect();
        format!("{host}:{}", self.port())
    }

    /// A trusting cluster that also listens on 127.0.0.1 at a free port, with TLS from
    /// `cert` and `key` (PEM): TCP connections must use TLS (`hostssl`), the unix socket
    /// stays plain for the test's own psql.
    pub fn start_tcp_tls(cert: &Path, key: &Path) -> Self {
        let mut pg = Self::start();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
            let dest = pg.data.join(to);
            std::fs::copy(from, &dest).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
            if let Some((uid, gid)) = run_as() {
                std::os::unix::fs::chown(&dest, Some(uid), Some(gid)).unwrap();
            }
        }
        pg.args = ["listen_addresses=127.0.0.1".to_owned(), format!("port={port}"), "ssl=on".into()]
            .into_iter()
            .flat_map(|a| ["-c".to_owned(), a])
            .collect();
        // The unix socket keeps its name (.s.PGSQL.<port>): psql and url() follow the port.
        pg.tcp_port = Some(port);
        std::fs::write(pg.data.join("pg_hba.conf"), "local all all trust\nhostssl all all 127.0.0.1/32 trust\n").unwrap();
        pg.restart();
        pg
    }

    /// Restarts the server with TLS off (`ssl = off`, TCP connections plain: `host` in
    /// pg_hba): a server that offers no TLS.
    pub fn without_tls(&mut self) {
        std::fs::write(self.data.join("pg_hba.conf"), "local all all trust\nhost all all 127.0.0.1/32 trust\n").unwrap();
        for a in &mut self.args {
            if a == "ssl=on" {
                *a = "ssl=off".into();
            }
        }
        self.restart();
        assert_eq!(self.psql("postgres", "SHOW ssl"), "off");
    }

    /// The port: of the unix socket's name, and on 127.0.0.1 if it listens there.
    pub fn port(&self) -> u16 {
        self.tcp_port.unwrap_or(5432)
    }

    /// A libpq URL of database `db` over TCP on 127.0.0.1 ([`start_tcp_tls`](Self::start_tcp_tls)).
    pub fn tcp_url(&self, db: &str) -> String {
        format!("postgresql://{USER}@127.0.0.1:{}/{db}", self.tcp_port.expect("a cluster started with start_tcp_tls"))
    }

    /// Stops the server (immediate shutdown) and starts it again on the same data
    /// directory, waiting for it to accept connections: after a change of `pg_hba.conf`.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts the server again after [`stop`](Self::stop), on the same data directory,
    /// waiting for it to accept connections.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        self.spawn();
    }

    /// From now on every connection must give `password` (SCRAM) for [`USER`]: sets it and
    /// restarts the server with a `pg_hba.conf` that asks for it.
    pub fn require_password(&mut self, password: &str) {
        self.psql("postgres", &format!("SET password_encryption = 'scram-sha-256'; ALTER ROLE {USER} PASSWORD '{password}'"));
        std::fs::write(self.data.join("pg_hba.conf"), "local all all scram-sha-256\n").unwrap();
        self.restart();
    }

    /// Stops the server (immediate shutdown: as a crash would, without a checkpoint).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Immediate shutdown: the postmaster stops its backends and removes its socket.
            let _ = Command::new("kill").args(["-QUIT", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// A libpq URL of database `db` over the unix socket (no password in it).
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://{USER}@{}/{db}", self.host())
    }

    /// A libpq URL that lists this server and then `others`, and takes whichever is writable
    /// (`target_session_attrs=read-write`), as Kluis is pointed at a cluster with a standby.
    pub fn url_with(&self, others: &[&Postgres], db: &str) -> String {
        let hosts: Vec<String> = std::iter::once(self).chain(others.iter().copied()).map(Postgres::host).collect();
        format!("postgresql://{USER}@{}/{db}?target_session_attrs=read-write", hosts.join(","))
    }

    /// Runs `psql` on database `db` with `sql` (as [`USER`], no password: use only on a
    /// trusting cluster, or pass `password`).
    pub fn psql_with(&self, db: &str, sql: &str, password: Option<&str>) -> Output {
        let mut cmd = Command::new(program("psql"));
        cmd.args(["-h", s(&self.socket_dir), "-p", &self.port().to_string(), "-U", USER, "-d", db, "-v", "ON_ERROR_STOP=1", "-XAtqc", sql]);
        if let Some(pw) = password {
            cmd.env("PGPASSWORD", pw);
        }
        cmd.output().expect("psql")
    }

    /// [`psql_with`](Self::psql_with) that must succeed; returns its output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let o = self.psql_with(db, sql, None);
        assert!(o.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// Makes database `name`.
    pub fn create_db(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
