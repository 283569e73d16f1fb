//! Durability proven at the syscall level: every reply that acknowledges a write leaves the
//! server only after the fsync that made the write durable.
//!
//! The real `kms-server` runs under `strace -f` (every thread, `-yy` so each fd names its file
//! or its TCP endpoints, `-xx -s` so written bytes are in the trace), while concurrent
//! `backup-hook seal -o` calls and a sequence of officer writes (create a keyring, raise its
//! retention, request a grant, a retire and the escrow install, each dual control, and
//! approve them) run against it, each client under its own `strace`. Then, from the traces:
//!
//! - **The write**: the first write to the store file (`kluis.redb`) after the client's
//!   connection opened that contains the request's marker: the 16 key-id bytes of an issued
//!   data key (its `data_keys` row and audit record), the keyring's name for an officer write,
//!   the ceremony id for the escrow install.
//! - **Its fsync**: the first successful `fdatasync`/`fsync` of the store file that *starts
//!   after that write returned* and after the header write of its transaction. redb commits a
//!   transaction by writing the file header (offset 0) and the pages, then `fdatasync` (with
//!   two-phase commit: pages, sync, header, sync); the server's one writer thread commits one
//!   transaction at a time, so that sync is the commit of the write's transaction. (The test
//!   also checks that every write to the store is followed by a sync.)
//! - **The reply**: the last write of at least [`MIN_REPLY`] bytes by the server on the TCP
//!   connection from the client's port (read from the client's own trace). After the TLS
//!   handshake and the HTTP/2 settings (written before the request is handled), the only
//!   server writes of that size are responses; the client closes after the response, so the
//!   last large write is the response that acknowledged the write (a later write could only make
//!   the check stricter, never hide an early reply: the early reply would still be a large write,
//!   and a later large write is taken only if it comes after the sync too).
//!
//! Check: the sync's *exit* comes before the reply's *entry* in the trace. strace handles one
//! stop at a time and writes in that order; a reply caused by the commit (the writer thread
//! hands the result to the handler after `fdatasync` returned) can only enter `writev` after
//! strace resumed the writer from that exit, so a correct server can never fail this, whatever
//! the timing, and a server that answers before its fsync fails it (no clock is read).
//!
//! For `backup-hook -o`, from the hook's own trace: every write to the temporary file, then
//! `fsync` of it, then the rename over the destination, then `fsync` of the directory.
//!
//! The test also shows the check failing: on the same traces with the store's syncs removed,
//! with one reply moved before its sync, and with the hook's fsyncs removed or moved.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use kluis_tests::*;

/// The smallest server write counted as a response (see the module doc): TLS 1.3 adds 22
/// bytes to a record; HTTP/2 control frames (SETTINGS ack 9, WINDOW_UPDATE 13, PING 17,
/// RST_STREAM 13, GOAWAY 17 bytes) stay below it; a gRPC response (HEADERS, DATA, trailers)
/// is well above it.
const MIN_REPLY: i64 = 64;

const SEAL_THREADS: usize = 4;
const SEALS_PER_THREAD: usize = 8;

const SERVER_SYSCALLS: &str = "trace=write,writev,pwrite64,pwritev,pwritev2,sendto,sendmsg,sendmmsg,fsync,fdatasync,sync_file_range";
const CLIENT_SYSCALLS: &str = "trace=openat,write,writev,pwrite64,sendto,sendmsg,fsync,fdatasync,rename,renameat,renameat2,close";

// ---------------------------------------------------------------------------------------
// strace
// ---------------------------------------------------------------------------------------

/// Fails with a clear message when strace is missing or may not trace (ptrace refused).
fn require_strace() {
    let out = match Command::new("strace").args(["-f", "-qq", "-o", "/dev/null", "--", "true"]).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("strace is not installed: this test traces the server's system calls (apt-get install strace; scripts/test-all installs it)")
        }
        Err(e) => panic!("strace could not be run: {e}"),
    };
    assert!(
        out.status.success(),
        "strace cannot trace a process here (ptrace not permitted?): {}\n\
         In a container, allow ptrace (e.g. --cap-add SYS_PTRACE, or a seccomp profile that allows it), \
         or lower kernel.yama.ptrace_scope.",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `kms-server dev` under `strace -f`, writing the trace to `trace`.
struct TracedServer {
    strace: Child,
    dir: tempfile::TempDir,
    trace: PathBuf,
    port: u16,
}

impl TracedServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("server.trace");
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut strace = Command::new("strace")
            .args(["-f", "-qq", "-ttt", "-yy", "-xx", "-s", "1048576", "-e", SERVER_SYSCALLS, "-e", "signal=none", "-o"])
            .arg(&trace)
            .arg("--")
            .arg(bin("kms-server"))
            .args(["dev", "--data-dir"])
            .arg(dir.path().join("kluis"))
            .args(["--listen", "127.0.0.1:0"])
            .env("KLUIS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("strace could not be started");
        let mut lines = BufReader::new(strace.stdout.take().unwrap()).lines();
        // Blocks until the server announces itself or exits; no sleeping.
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(a) = line.strip_prefix("kms-server listening on ") {
                        break a.to_owned();
                    }
                }
                _ => {
                    let _ = strace.wait();
                    panic!("kms-server exited under strace before listening:\n{}", std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default());
                }
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        Self { strace, dir, trace, port }
    }

    fn client(&self, who: &str) -> PathBuf {
        self.dir.path().join("kluis/clients").join(format!("{who}.toml"))
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("kluis/data/kluis.redb")
    }

    /// Kills the server (strace's child) and waits for strace to finish the trace.
    fn stop(mut self) -> (Vec<String>, tempfile::TempDir) {
        let pid = self.strace.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        for child in children.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", child]).status();
        }
        self.strace.wait().unwrap();
        let text = std::fs::read(&self.trace).unwrap();
        (String::from_utf8(text).expect("strace -xx writes ASCII").lines().map(str::to_owned).collect(), self.dir)
    }
}

/// Runs a client binary under `strace -f -yy`; returns its output and its trace.
fn traced_client(work: &Path, tag: &str, name: &str, args: &[&str], stdin: &[u8]) -> (Output, Vec<String>) {
    let trace = work.join(format!("{tag}.trace"));
    let mut child = Command::new("strace")
        .args(["-f", "-qq", "-yy", "-xx", "-s", "64", "-e", CLIENT_SYSCALLS, "-e", "signal=none", "-o"])
        .arg(&trace)
        .arg("--")
        .arg(bin(name))
        .args(args)
        .env_remove("KLUIS_CLIENT_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sin = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = sin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let text = String::from_utf8(std::fs::read(&trace).unwrap()).unwrap();
    (out, text.lines().map(str::to_owned).collect())
}

// ---------------------------------------------------------------------------------------
// the trace parser
// ---------------------------------------------------------------------------------------

/// One system call: where its entry and its exit are in the trace (the same line unless
/// strace split it into `<unfinished ...>` and `<... resumed>`), its fd's description, the
/// bytes of its string arguments, and its result.
#[derive(Clone, Debug)]
struct Call {
    entry: usize,
    exit: usize,
    name: String,
    /// The first argument's fd description (`-yy`): a path, or `TCP:[local->remote]`.
    fd: Option<String>,
    /// Every quoted string argument, decoded (`-xx`).
    strings: Vec<Vec<u8>>,
    truncated: bool,
    ret: Option<i64>,
    /// The file offset of a `pwrite64` (its last argument).
    offset: Option<u64>,
    /// The description of a returned fd (`openat`): its path.
    ret_fd: Option<String>,
    /// The timestamp (`-ttt`) of the entry line, for messages only.
    time: String,
}

/// Decodes a run of `\xHH` escapes starting at `s[i]`; returns the bytes and the index after.
fn hex_run(s: &[u8], mut i: usize) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    while i + 3 < s.len() && s[i] == b'\\' && s[i + 1] == b'x' {
        let h = std::str::from_utf8(&s[i + 2..i + 4]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
        match h {
            Some(b) => out.push(b),
            None => break,
        }
        i += 4;
    }
    (out, i)
}

/// An fd description after `<`: hex-escaped path, or `TCP:[...]`, up to its `>`.
fn fd_desc(s: &[u8], i: usize) -> (String, usize) {
    if s[i..].starts_with(b"\\x") {
        let (b, j) = hex_run(s, i);
        return (String::from_utf8_lossy(&b).into_owned(), j + 1);
    }
    let rest = &s[i..];
    let end = if rest.contains(&b'[') {
        rest.windows(2).position(|w| w == b"]>").map(|p| p + 1)
    } else {
        rest.iter().position(|&c| c == b'>')
    }
    .unwrap_or(rest.len());
    (String::from_utf8_lossy(&rest[..end]).into_owned(), i + end + 1)
}

fn parse_call(text: &str, entry: usize, exit: usize, time: &str) -> Call {
    let b = text.as_bytes();
    let open = text.find('(').unwrap_or(text.len());
    let name = text[..open].to_owned();
    // The first argument: `N<desc>`.
    let mut fd = None;
    let mut i = open + 1;
    let digits = b[i.min(b.len())..].iter().take_while(|c| c.is_ascii_digit()).count();
    if digits > 0 && b.get(i + digits) == Some(&b'<') {
        let (d, j) = fd_desc(b, i + digits + 1);
        fd = Some(d);
        i = j;
    }
    // Quoted strings (with -xx only `\xHH` inside), and whether strace cut one short.
    let mut strings = Vec::new();
    let mut truncated = false;
    let ret_at = text.rfind(") = ").map(|p| p + 4);
    let args_end = ret_at.unwrap_or(b.len());
    while i < args_end {
        if b[i] == b'"' {
            let (s, j) = hex_run(b, i + 1);
            strings.push(s);
            i = j + 1;
            if b[i.min(b.len())..].starts_with(b"...") {
                truncated = true;
            }
        } else if b[i] == b'<' {
            // An fd description among the arguments (renameat's AT_FDCWD<dir>): skip it.
            let (_, j) = fd_desc(b, i + 1);
            i = j;
        } else {
            i += 1;
        }
    }
    let (mut ret, mut ret_fd) = (None, None);
    if let Some(r) = ret_at {
        let t = &text[r..];
        let n: String = t.chars().take_while(|c| *c == '-' || c.is_ascii_digit()).collect();
        ret = n.parse().ok();
        if t[n.len()..].starts_with('<') {
            ret_fd = Some(fd_desc(t.as_bytes(), n.len() + 1).0);
        }
    }
    let offset = (name == "pwrite64")
        .then(|| text[..ret_at.map_or(text.len(), |r| r - 4)].rsplit(", ").next().and_then(|o| o.trim_end_matches(')').parse().ok()))
        .flatten();
    Call { entry, exit, name, fd, strings, truncated, ret, offset, ret_fd, time: time.to_owned() }
}

/// Every system call of a `strace -f [-ttt] -yy -xx` trace, in the order of their entries.
fn parse(lines: &[String]) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut pending: HashMap<String, (usize, String, String)> = HashMap::new();
    for (idx, line) in lines.iter().enumerate() {
        let (tid, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let tid = tid.to_owned();
        let mut rest = rest.trim_start();
        let mut time = "";
        if rest.as_bytes().first().is_some_and(u8::is_ascii_digit) {
            let (t, r) = rest.split_once(' ').unwrap_or((rest, ""));
            time = t;
            rest = r;
        }
        if rest.starts_with("+++") || rest.starts_with("---") || rest.is_empty() {
            continue;
        }
        if let Some(r) = rest.strip_prefix("<... ") {
            let after = r.split_once("resumed>").map_or("", |(_, a)| a);
            let (entry, head, t) = pending.remove(&tid).unwrap_or_else(|| panic!("line {idx}: resumed call without its start: {line}"));
            calls.push(parse_call(&format!("{head}{after}"), entry, idx, &t));
        } else if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(tid, (idx, head.to_owned(), time.to_owned()));
        } else {
            calls.push(parse_call(rest, idx, idx, time));
        }
    }
    // Calls still unfinished when the process was killed never returned: not counted.
    calls.sort_by_key(|c| c.entry);
    calls
}

fn is_write(name: &str) -> bool {
    matches!(name, "write" | "writev" | "pwrite64" | "pwritev" | "pwritev2" | "sendto" | "sendmsg" | "sendmmsg")
}

fn is_sync(name: &str) -> bool {
    matches!(name, "fsync" | "fdatasync")
}

/// `TCP:[127.0.0.1:LP->127.0.0.1:RP]` -> (LP, RP).
fn tcp_ports(desc: &str) -> Option<(u16, u16)> {
    let inner = desc.strip_prefix("TCP:[")?.strip_suffix(']')?;
    let (l, r) = inner.split_once("->")?;
    Some((l.rsplit(':').next()?.parse().ok()?, r.rsplit(':').next()?.parse().ok()?))
}

// ---------------------------------------------------------------------------------------
// the checks
// ---------------------------------------------------------------------------------------

/// What a client was acknowledged for, and how to find its write in the server's trace.
#[derive(Clone, Debug)]
struct Ack {
    what: String,
    /// Bytes that the acknowledged write put in the store for the first time: its audit
    /// entry's hash (store format 2 keeps it raw), and for a data key its 16 key-id bytes.
    markers: Vec<Vec<u8>>,
    client_port: u16,
}

/// Where an acknowledged write, its sync and its reply are in the server trace.
#[derive(Debug)]
struct Proof {
    write: usize,
    sync_exit: usize,
    reply: usize,
}

/// The server trace, parsed once.
struct ServerTrace {
    calls: Vec<Call>,
    store: String,
    port: u16,
}

impl ServerTrace {
    fn new(lines: &[String], store: &Path, port: u16) -> Self {
        Self { calls: parse(lines), store: store.display().to_string(), port }
    }

    fn on_store(&self, c: &Call) -> bool {
        c.fd.as_deref() == Some(self.store.as_str())
    }

    /// Every write to the store is followed by a successful sync of it (redb's commit model,
    /// which the matching of a write to its sync relies on).
    fn every_store_write_is_synced(&self) -> Result<usize, String> {
        let last_sync = self.calls.iter().filter(|c| self.on_store(c) && is_sync(&c.name) && c.ret == Some(0)).map(|c| c.entry).max();
        let writes: Vec<&Call> = self.calls.iter().filter(|c| self.on_store(c) && is_write(&c.name)).collect();
        if writes.is_empty() {
            return Err("no write to the store file in the trace".into());
        }
        for w in &writes {
            if w.truncated {
                return Err(format!("trace line {}: a store write was cut short by strace (raise -s)", w.entry + 1));
            }
            if last_sync.is_none_or(|s| s < w.exit) {
                return Err(format!("trace line {} ({}): a write to the store that no fsync/fdatasync followed", w.entry + 1, w.time));
            }
        }
        Ok(writes.len())
    }

    fn check(&self, ack: &Ack) -> Result<Proof, String> {
        let conn: Vec<&Call> = self
            .calls
            .iter()
            .filter(|c| is_write(&c.name) && c.fd.as_deref().and_then(tcp_ports) == Some((self.port, ack.client_port)))
            .collect();
        let opened = conn.first().ok_or_else(|| format!("{}: no server write on the connection from port {}", ack.what, ack.client_port))?.entry;
        let reply = conn
            .iter()
            .rev()
            .find(|c| c.ret.unwrap_or(0) >= MIN_REPLY)
            .ok_or_else(|| format!("{}: no reply-sized server write on the connection from port {}", ack.what, ack.client_port))?;
        // The store write that made it durable: the last of its markers' first appearances.
        let mut write: Option<&Call> = None;
        for m in &ack.markers {
            let first = self
                .calls
                .iter()
                .find(|c| self.on_store(c) && is_write(&c.name) && c.strings.iter().any(|s| contains(s, m)))
                .ok_or_else(|| format!("{}: its write is not in the store file (no store write holds {})", ack.what, hex::encode(m)))?;
            if first.entry < opened {
                return Err(format!("{}: its marker {} was in the store (line {}) before the request's connection", ack.what, hex::encode(m), first.entry + 1));
            }
            if write.is_none_or(|w| w.entry < first.entry) {
                write = Some(first);
            }
        }
        let write = write.ok_or_else(|| format!("{}: no marker", ack.what))?;
        // The sync that commits the write's transaction: redb writes a commit's header (at
        // offset 0) and its pages, in either order, then syncs (a two-phase commit syncs the
        // pages, writes the header, syncs again). So: the first sync after both the write and
        // the first header write since the sync before the write.
        let since = self.calls.iter().filter(|c| c.exit < write.entry && self.on_store(c) && is_sync(&c.name)).map(|c| c.exit).max().unwrap_or(0);
        let header = self
            .calls
            .iter()
            .find(|c| c.entry > since && self.on_store(c) && is_write(&c.name) && c.offset == Some(0))
            .ok_or_else(|| format!("{}: no commit header written to the store after line {}", ack.what, since + 1))?;
        let after = write.exit.max(header.exit);
        let sync = self
            .calls
            .iter()
            .find(|c| c.entry > after && self.on_store(c) && is_sync(&c.name) && c.ret == Some(0))
            .ok_or_else(|| format!("{}: no fsync/fdatasync of the store after its write (line {})", ack.what, write.entry + 1))?;
        if sync.exit >= reply.entry {
            return Err(format!(
                "{}: the reply (line {}, {}) was written before the fsync that covers its write returned \
                 (write line {}, {}; {} returned at line {})",
                ack.what,
                reply.entry + 1,
                reply.time,
                write.entry + 1,
                write.time,
                sync.name,
                sync.exit + 1
            ));
        }
        Ok(Proof { write: write.entry, sync_exit: sync.exit, reply: reply.entry })
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The client's local port of its one connection to the server.
fn client_port(lines: &[String], server_port: u16) -> Result<u16, String> {
    let mut ports: Vec<u16> = parse(lines)
        .iter()
        .filter_map(|c| c.fd.as_deref().and_then(tcp_ports))
        .filter(|(_, r)| *r == server_port)
        .map(|(l, _)| l)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    match ports.as_slice() {
        [p] => Ok(*p),
        other => Err(format!("expected one connection to port {server_port} in the client trace, found {other:?}")),
    }
}

/// `backup-hook -o DEST`: all writes to the temporary file, its fsync, the rename over DEST,
/// then the fsync of DEST's directory, in that order, each successful.
fn check_output_file(lines: &[String], dest: &Path) -> Result<(), String> {
    let calls = parse(lines);
    let dest_s = dest.display().to_string();
    let dir = dest.parent().unwrap().display().to_string();
    let tmp = calls
        .iter()
        .filter(|c| c.name == "openat" && c.ret.unwrap_or(-1) >= 0)
        .filter_map(|c| c.ret_fd.clone())
        .find(|p| p.starts_with(&dir) && p.ends_with(".partial"))
        .ok_or("no temporary file opened next to the output")?;
    let on = |c: &Call, p: &str| c.fd.as_deref() == Some(p);
    let last_write = calls.iter().filter(|c| is_write(&c.name) && on(c, &tmp)).map(|c| c.exit).max().ok_or("nothing written to the temporary file")?;
    let fsync = calls
        .iter()
        .find(|c| is_sync(&c.name) && on(c, &tmp) && c.ret == Some(0) && c.entry > last_write)
        .ok_or("no fsync of the temporary file after its last write")?;
    let rename = calls
        .iter()
        .find(|c| {
            c.name.starts_with("rename")
                && c.ret == Some(0)
                && c.strings.len() == 2
                && c.strings[0] == tmp.as_bytes()
                && c.strings[1] == dest_s.as_bytes()
        })
        .ok_or("no rename of the temporary file over the output")?;
    if rename.entry <= fsync.exit {
        return Err(format!("the rename (line {}) came before the file's fsync returned (line {})", rename.entry + 1, fsync.exit + 1));
    }
    calls
        .iter()
        .find(|c| is_sync(&c.name) && on(c, &dir) && c.ret == Some(0) && c.entry > rename.exit)
        .ok_or_else(|| format!("no fsync of the directory {dir} after the rename (line {})", rename.exit + 1))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// the test
// ---------------------------------------------------------------------------------------

/// The key id of a sealed file (`-> kluis KEYRING KEYID` in its header), as its 16 bytes.
fn key_id(sealed: &[u8]) -> Vec<u8> {
    let h = header(sealed);
    let line = h.lines().find(|l| l.starts_with("-> kluis ")).expect("a kluis stanza");
    hex::decode(line.split_whitespace().nth(3).unwrap()).unwrap()
}

/// The (field, value) pairs that pick one audit entry.
type AuditMatch = [(&'static str, &'static str); 3];

struct Sealed {
    ack: Ack,
    dest: PathBuf,
    client_trace: Vec<String>,
}

/// The audit export's entries (not the head line).
fn audit_entries(server: &TracedServer) -> Vec<serde_json::Value> {
    let o = kmsctl(&server.client("auditor"), &["audit", "export"]);
    ok(&o, "kmsctl audit export");
    stdout(&o).lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|v| v.get("seq").is_some()).collect()
}

/// The raw hash of the one audit entry matching every (field, value).
fn audit_hash(entries: &[serde_json::Value], want: &[(&str, &str)]) -> Vec<u8> {
    let found: Vec<&serde_json::Value> = entries.iter().filter(|e| want.iter().all(|(k, v)| e[*k] == *v)).collect();
    assert_eq!(found.len(), 1, "one audit entry with {want:?}: {found:?}");
    hex::decode(found[0]["hash"].as_str().unwrap()).unwrap()
}

/// The trace without the lines of the calls `drop` picks (both lines of a split call).
fn without(lines: &[String], drop: impl Fn(&Call) -> bool) -> Vec<String> {
    let gone: std::collections::HashSet<usize> = parse(lines).iter().filter(|c| drop(c)).flat_map(|c| [c.entry, c.exit]).collect();
    lines.iter().enumerate().filter(|(i, _)| !gone.contains(i)).map(|(_, l)| l.clone()).collect()
}

/// The trace with the call that starts on line `from` moved, whole, to just before the earlier
/// line `to`. A call that strace split (`<unfinished ...>`, then `<... resumed>`) is joined into
/// one line first, as strace writes a call that no other thread's line interrupted: moving only
/// its start could put it before an earlier split call of the same thread, which no real trace
/// has (one thread is in one call at a time).
fn moved(lines: &[String], from: usize, to: usize) -> Vec<String> {
    assert!(to < from, "a call is moved earlier");
    let call = parse(lines).into_iter().find(|c| c.entry == from).expect("a call starts on that line");
    let mut out = lines.to_vec();
    if call.exit != from {
        let head = out[from].strip_suffix(" <unfinished ...>").expect("a split call's start");
        let result = out[call.exit].split_once(" resumed>").expect("a split call's end").1;
        out[from] = format!("{head}{result}");
        out.remove(call.exit);
    }
    let line = out.remove(from);
    out.insert(to, line);
    out
}

#[test]
fn every_acknowledged_write_is_fsynced_before_its_reply() {
    require_strace();
    let work = tempfile::tempdir().unwrap();
    let w = work.path().to_owned();

    // The escrow ceremony, offline, before the server starts.
    let custodians: Vec<(String, String)> = ["a", "b"]
        .iter()
        .map(|n| {
            let key = w.join(format!("{n}.key"));
            let o = Command::new("age-keygen").arg("-o").arg(&key).output().expect("age-keygen (Debian package age) is required");
            ok(&o, "age-keygen");
            let y = Command::new("age-keygen").arg("-y").arg(&key).output().unwrap();
            ((*n).to_owned(), stdout(&y).trim().to_owned())
        })
        .collect();
    let cer = w.join("ceremony");
    let mut args = vec!["escrow".to_owned(), "ceremony".into(), "--threshold".into(), "2".into(), "--out".into(), s(&cer).into()];
    for (n, r) in &custodians {
        args.extend(["--custodian".to_owned(), format!("{n}={r}")]);
    }
    ok(&kmsctl_offline(&args.iter().map(String::as_str).collect::<Vec<_>>()), "escrow ceremony");
    let manifest = cer.join("manifest.json");

    let server = TracedServer::start();
    let port = server.port;
    let out_dir = w.join("sealed");
    std::fs::create_dir(&out_dir).unwrap();

    // Concurrent issuance...
    let mut sealers = Vec::new();
    for t in 0..SEAL_THREADS {
        let (cfg, w, out_dir) = (server.client("sealer"), w.clone(), out_dir.clone());
        sealers.push(std::thread::spawn(move || {
            let mut done = Vec::new();
            for i in 0..SEALS_PER_THREAD {
                let id = format!("t{t}-{i}");
                let dest = out_dir.join(format!("{id}.age"));
                let (o, trace) = traced_client(
                    &w,
                    &format!("seal-{id}"),
                    "backup-hook",
                    &["--client-config", s(&cfg), "seal", "--keyring", "default", "--backup-id", &id, "-o", s(&dest)],
                    format!("backup {id}").as_bytes(),
                );
                ok(&o, "backup-hook seal -o");
                let key = key_id(&std::fs::read(&dest).unwrap());
                let ack = Ack { what: format!("GenerateDataKey for {id}"), markers: vec![key], client_port: client_port(&trace, port).unwrap() };
                done.push(Sealed { ack, dest, client_trace: trace });
            }
            done
        }));
    }
    // ...while an officer writes (and a second officer approves). Each: the client's port and
    // the audit entry (principal, action, keyring) that identifies its write.
    let kr = "krdurable1";
    let mut officer: Vec<(String, u16, AuditMatch)> = Vec::new();
    {
        let (off, dev) = (server.client("officer"), server.client("dev"));
        let mut step = |who: &Path, tag: &str, args: &[&str], audit: AuditMatch| -> Output {
            let mut all = vec!["--client-config", s(who)];
            all.extend_from_slice(args);
            let (o, trace) = traced_client(&w, tag, "kmsctl", &all, b"");
            ok(&o, tag);
            officer.push((format!("kmsctl {}", args.join(" ")), client_port(&trace, port).unwrap(), audit));
            o
        };
        let by = |p: &'static str, a: &'static str| [("principal", p), ("action", a), ("keyring", "krdurable1")];
        // Retention raised (10 -> 30 days: one officer; lowering would be a request).
        step(&off, "create", &["keyring", "create", kr, "--retention-days", "10"], by("officer", "CreateKeyring"));
        step(&off, "retention", &["keyring", "policy", kr, "--retention-days", "30"], by("officer", "SetKeyringPolicy"));
        // Dual control: each request, then its approval by the second officer (told apart
        // by the outcome, which names the request).
        let approved = |id: &str, what: &str| -> AuditMatch {
            let outcome: &'static str = Box::leak(format!("ok: approved and carried out request {id} of officer: {what}").into_boxed_str());
            [("principal", "dev"), ("action", "Approve"), ("outcome", outcome)]
        };
        let o = step(&off, "grant", &["keyring", "grant", kr, "--principal", "restorer", "--role", "restorer"], by("officer", "ChangeGrant"));
        let id = approval_id(&o);
        step(&dev, "approve-grant", &["approve", &id], approved(&id, "grant restorer on keyring krdurable1 to restorer"));
        step(&off, "rotate", &["keyring", "rotate", kr], by("officer", "RotateKeyring"));
        let o = step(&off, "retire", &["keyring", "retire", kr, "--below-version", "2"], by("officer", "RetireKeyringVersions"));
        let id = approval_id(&o);
        step(&dev, "approve", &["approve", &id], approved(&id, "retire keyring krdurable1 versions below 2"));
        let o = step(&off, "escrow-install", &["escrow", "install", s(&manifest)], [("principal", "officer"), ("action", "InstallEscrow"), ("principal", "officer")]);
        let id = approval_id(&o);
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        let what = format!(
            "install escrow ceremony {}: recovery recipient {} (none in force)",
            m["ceremony_id"].as_str().unwrap(),
            m["recovery_recipient"].as_str().unwrap()
        );
        step(&dev, "approve-escrow", &["approve", &id], approved(&id, &what));
    }
    let sealed: Vec<Sealed> = sealers.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let entries = audit_entries(&server);
    let sealed: Vec<Sealed> = sealed
        .into_iter()
        .map(|mut x| {
            let key = hex::encode(&x.ack.markers[0]);
            x.ack.markers.push(audit_hash(&entries, &[("action", "GenerateDataKey"), ("key_id", &key)]));
            x
        })
        .collect();
    let officer_acks: Vec<Ack> =
        officer.iter().map(|(what, p, audit)| Ack { what: what.clone(), markers: vec![audit_hash(&entries, audit)], client_port: *p }).collect();
    let store = server.store();
    let (lines, _dir) = server.stop();
    let trace = ServerTrace::new(&lines, &store, port);
    let all_acks: Vec<&Ack> = sealed.iter().map(|x| &x.ack).chain(&officer_acks).collect();

    // The store's commit model, then every acknowledged write.
    let store_writes = trace.every_store_write_is_synced().unwrap();
    let proofs: Vec<Proof> = all_acks.iter().map(|a| trace.check(a).unwrap_or_else(|e| panic!("{e}"))).collect();
    assert_eq!(proofs.len(), SEAL_THREADS * SEALS_PER_THREAD + 9);
    let commits: std::collections::BTreeSet<usize> = proofs.iter().map(|p| p.sync_exit).collect();
    // Concurrency was real: some reply went out after other requests' store writes had begun.
    let overlapped = proofs.iter().filter(|p| trace.calls.iter().any(|c| trace.on_store(c) && is_write(&c.name) && c.entry > p.sync_exit && c.entry < p.reply)).count();
    eprintln!(
        "durability: {} acknowledged writes ({} seals, {} officer writes) each fsynced before its reply; \
         {} store writes, {} commits; {} replies left while a later commit was being written",
        proofs.len(),
        sealed.len(),
        officer_acks.len(),
        store_writes,
        commits.len(),
        overlapped
    );
    for x in &sealed {
        check_output_file(&x.client_trace, &x.dest).unwrap_or_else(|e| panic!("backup-hook -o {}: {e}", x.dest.display()));
    }

    // The check fails where durability fails: the same traces, made wrong on purpose.
    // 1. Without the store's syncs, no acknowledged write is covered.
    let no_sync = without(&lines, |c| is_sync(&c.name) && c.fd.as_deref() == Some(trace.store.as_str()));
    let t = ServerTrace::new(&no_sync, &store, port);
    assert!(t.every_store_write_is_synced().is_err());
    for a in &all_acks {
        let e = t.check(a).expect_err("a write with no fsync must fail");
        assert!(e.contains("no fsync/fdatasync of the store"), "{e}");
    }
    // 2. One reply moved to just before the sync that covers its write (a seal's, an
    //    officer's): that one fails, naming the reply's line.
    for victim in [all_acks[all_acks.len() / 3], all_acks[all_acks.len() - 2]] {
        let p = trace.check(victim).unwrap();
        assert!(p.write < p.sync_exit && p.sync_exit < p.reply, "{p:?}");
        let sync_entry = trace.calls.iter().find(|c| c.exit == p.sync_exit).unwrap().entry;
        let t = ServerTrace::new(&moved(&lines, p.reply, sync_entry), &store, port);
        let e = t.check(victim).expect_err("a reply before its fsync must fail");
        assert!(e.contains("was written before the fsync that covers its write returned"), "{e}");
    }
    // 3. backup-hook -o without the file's fsync; with the directory's fsync before the rename.
    let x = &sealed[0];
    let calls = parse(&x.client_trace);
    let tmp_sync = calls.iter().find(|c| is_sync(&c.name) && c.fd.as_deref().is_some_and(|f| f.ends_with(".partial"))).unwrap();
    let no_fsync = without(&x.client_trace, |c| c.entry == tmp_sync.entry);
    let e = check_output_file(&no_fsync, &x.dest).unwrap_err();
    assert!(e.contains("no fsync of the temporary file"), "{e}");
    let dir = x.dest.parent().unwrap().display().to_string();
    let dir_sync = calls.iter().find(|c| is_sync(&c.name) && c.fd.as_deref() == Some(dir.as_str())).unwrap();
    let rename = calls.iter().find(|c| c.name.starts_with("rename")).unwrap();
    let e = check_output_file(&moved(&x.client_trace, dir_sync.entry, rename.entry), &x.dest).unwrap_err();
    assert!(e.contains("no fsync of the directory"), "{e}");
}
