//! README's "Running a real server" is the script of this test: its `sh` blocks run as
//! written, in order, each in its own `bash -euo pipefail`, in one working directory, with the
//! real binaries first on PATH; the server config block is written where its first line says
//! (`# kms-server config: PATH`); the block that is only `kms-server serve ...` is started in
//! the background and waited for on its "kms-server listening on" line. The only changes to
//! the text: `/etc/kluis` and `/var/lib/kluis` move into a temporary directory, `HOME` is one
//! there too (for `~/kluis-ca`), and the server's port 8443 becomes a free local port
//! (`0.0.0.0:8443` and `kms.example:8443` become `127.0.0.1:PORT`; the clients keep
//! `server_name = "kms.example"`, which the certificate must carry). If the docs are wrong,
//! this fails.
//!
//! The certificates come from `kmsctl cert` as the README shows, and, in a second run, from
//! the openssl recipe in docs/certificates.md instead.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod markdown;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use kluis_tests::bin;
use markdown::Block;

const SECTION: &str = "Running a real server";

/// The temporary machine the walk runs on.
struct Machine {
    root: tempfile::TempDir,
    port: u16,
    server: Option<Child>,
    server_log: PathBuf,
    /// Everything the blocks printed, in order (stdout and stderr of each).
    transcript: String,
    /// Directories made immutable (`chattr +i`), made mutable again on drop.
    immutable: Vec<PathBuf>,
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.immutable {
            let _ = Command::new("chattr").arg("-i").arg(d).status();
        }
    }
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("`id -u` runs");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// A port nothing listens on now (the server binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Machine {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("home")).unwrap();
        let server_log = root.path().join("kms-server.log");
        Machine { root, port: free_port(), server: None, server_log, transcript: String::new(), immutable: Vec::new() }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }

    /// The documented text with this machine's directories and port.
    fn substitute(&self, text: &str) -> String {
        let root = self.root.path().display().to_string();
        let local = format!("127.0.0.1:{}", self.port);
        text.replace("/etc/kluis", &format!("{root}/etc/kluis"))
            .replace("/var/lib/kluis", &format!("{root}/var/lib/kluis"))
            .replace("0.0.0.0:8443", &local)
            .replace("kms.example:8443", &local)
    }

    fn bash(&self, script: &str) -> Command {
        let bin_dir = bin("kms-server").parent().unwrap().to_owned();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let mut cmd = Command::new("bash");
        cmd.args(["-euo", "pipefail", "-c", script])
            .current_dir(self.root.path())
            .env("HOME", self.path("home"))
            .env("PATH", path)
            .env("KLUIS_LOG", "warn")
            .env_remove("KLUIS_CLIENT_CONFIG")
            .env_remove("KLUIS_SERVER_CONFIG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs one block as the document says to.
    fn run(&mut self, block: &Block) {
        let body = self.substitute(&block.body);
        match block.lang.as_str() {
            "toml" => {
                let first = block.first_line();
                let target = first
                    .strip_prefix("# kms-server config: ")
                    .or_else(|| first.strip_prefix("# client config: "))
                    .unwrap_or_else(|| panic!("{}: a config in the walk must say where it goes (`# kms-server config: PATH`)", block.at()));
                let target = self.substitute(target);
                std::fs::write(&target, &body).unwrap_or_else(|e| panic!("{}: writing {target}: {e}", block.at()));
            }
            "sh" if is_serve(&body) => self.serve(block, &body),
            "sh" => {
                let out = self.bash(&body).output().unwrap();
                self.record(block, &out);
                assert!(
                    out.status.success(),
                    "{} failed ({}):\n{body}\n--- stdout\n{}\n--- stderr\n{}\n--- server log\n{}",
                    block.at(),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(&self.server_log).unwrap_or_default()
                );
            }
            "text" => {}
            other => panic!("{}: a ```{other} block in the walk: the test does not know how to run it", block.at()),
        }
    }

    fn record(&mut self, block: &Block, out: &Output) {
        self.transcript.push_str(&format!(
            "== {}\n{}{}",
            block.at(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }

    /// Starts the server block in the background; returns when it listens. No sleeping:
    /// it blocks on the server's stdout until the line comes (or the server exits).
    fn serve(&mut self, block: &Block, body: &str) {
        assert!(self.server.is_none(), "{}: a second server", block.at());
        self.config_read_only();
        let log = std::fs::File::create(&self.server_log).unwrap();
        let mut child = self.bash(&format!("exec {}", body.trim())).stdout(Stdio::piped()).stderr(Stdio::from(log)).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let announced = loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("kms-server listening on ") => break line,
                Some(Ok(_)) => {}
                _ => {
                    let status = child.wait().unwrap();
                    panic!(
                        "{}: kms-server exited ({status}) before listening:\n{}",
                        block.at(),
                        std::fs::read_to_string(&self.server_log).unwrap_or_default()
                    );
                }
            }
        };
        assert_eq!(announced, format!("kms-server listening on 127.0.0.1:{}", self.port));
        std::thread::spawn(move || for _ in lines {});
        self.transcript.push_str(&format!("== {}\n{announced}\n", block.at()));
        self.server = Some(child);
    }
}

impl Machine {
    /// Makes `/etc/kluis` read-only for the server, as the shipped unit does
    /// (`ProtectSystem=strict`): immutable for root (`chattr +i`: root ignores modes), mode
    /// 0555 for anyone else; then checks that nothing can be created in it.
    fn config_read_only(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let etc = self.path("etc/kluis");
        if is_root() {
            let st = Command::new("chattr").arg("+i").arg(&etc).status().expect("chattr runs (package e2fsprogs)");
            assert!(st.success(), "chattr +i {}: the walk needs a file system with attributes (ext4, xfs, btrfs)", etc.display());
            self.immutable.push(etc.clone());
        } else {
            std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        assert!(std::fs::write(etc.join("probe"), b"x").is_err(), "{} is still writable", etc.display());
    }
}

/// A block whose only command is `kms-server serve ...` (comments aside).
fn is_serve(body: &str) -> bool {
    let commands: Vec<&str> = body.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    commands.len() == 1 && commands[0].starts_with("kms-server serve ")
}

/// The walk's blocks; `certificates` replaces its certificate block (the one running
/// `kmsctl cert ca`) if given.
fn walk(certificates: Option<Vec<Block>>) -> Vec<Block> {
    let blocks = markdown::section_blocks("README.md", SECTION);
    let Some(replacement) = certificates else { return blocks };
    let at = blocks.iter().position(|b| b.body.contains("kmsctl cert ca")).expect("the walk's certificate block");
    let mut out = blocks[..at].to_vec();
    out.extend(replacement);
    out.extend_from_slice(&blocks[at + 1..]);
    out
}

fn openssl_recipe() -> Vec<Block> {
    let blocks = markdown::section_blocks("docs/certificates.md", "Sites with their own CA: openssl");
    assert!(blocks.len() >= 3, "the openssl recipe: {blocks:?}");
    assert!(blocks.iter().all(|b| b.lang == "sh"), "the openssl recipe is shell commands");
    blocks
}

/// Runs the whole walk and checks what it says happens, happened.
fn run_walk(blocks: &[Block]) -> Machine {
    assert!(blocks.iter().filter(|b| b.lang == "sh" && is_serve(&b.body)).count() == 1, "the walk starts one server");
    let mut m = Machine::new();
    for b in blocks {
        m.run(b);
    }
    let t = &m.transcript;
    // Step 5: the run-time grant waited for the second officer, who carried it out.
    assert!(t.contains("kmsctl approve 1"), "{t}");
    assert!(t.contains("approved and carried out request 1"), "{t}");
    assert!(t.lines().any(|l| l.starts_with("backup02.ehr.example") && l.contains("runtime")), "{t}");
    // Step 6: the restore is identical, the write-only host is refused (exit 4, not a failure to connect).
    assert!(t.contains("\nidentical\n"), "{t}");
    assert!(t.contains("refused: exit 4"), "{t}");
    assert!(t.contains("principal \"backup01.ehr.example\" may not UnwrapDataKey"), "{t}");
    assert!(!m.path("nope.bin").exists(), "a refused unseal leaves no output file");
    // Step 7: the master key rotated with /etc/kluis read-only; its generation is beside the key.
    assert!(m.path("var/lib/kluis-keys/master.key.g2").exists(), "{t}");
    assert!(t.contains("identical after the rotation"), "{t}");
    assert!(!m.path("etc/kluis/master.key.g2").exists());
    // Step 8: the auditor verified the whole trail.
    assert!(t.contains("audit trail intact: entries 1.."), "{t}");
    // The files the walk says it makes, with the modes it says.
    for key in ["etc/kluis/server.key", "var/lib/kluis-keys/master.key", "home/kluis-ca/clients/backup01.ehr.example.key"] {
        assert_eq!(kluis_tests::mode(&m.path(key)) & 0o077, 0, "{key} is readable by others");
    }
    assert!(m.path("var/lib/kluis/kluis.redb").exists());
    m
}

#[test]
fn the_readme_walk_runs_as_written_with_kmsctl_certificates() {
    let blocks = walk(None);
    let m = run_walk(&blocks);
    // The CA key stayed with the CA, not on the server.
    assert!(m.path("home/kluis-ca/ca.key").exists());
    assert!(!m.path("etc/kluis/ca.key").exists());
}

#[test]
fn the_walk_runs_with_certificates_from_the_openssl_recipe() {
    let blocks = walk(Some(openssl_recipe()));
    assert!(!blocks.iter().any(|b| b.body.contains("kmsctl cert")), "this run makes no certificate with kmsctl");
    run_walk(&blocks);
}

/// The walk (with openssl certificates) up to `kms-server init`, then the server's key is
/// encrypted (PKCS#8 or the legacy OpenSSL form): `serve` refuses to start and says the key
/// is encrypted.
#[test]
fn an_encrypted_server_key_is_refused_saying_so() {
    let blocks = walk(Some(openssl_recipe()));
    let serve_at = blocks.iter().position(|b| b.lang == "sh" && is_serve(&b.body)).unwrap();
    let mut m = Machine::new();
    for b in &blocks[..serve_at] {
        m.run(b);
    }
    let key = m.path("etc/kluis/server.key");
    let serve = m.substitute(blocks[serve_at].body.trim());
    for (how, cmd) in [
        ("PKCS#8", "openssl pkey -in etc/kluis/server.key.plain -aes256 -passout pass:secret -out etc/kluis/server.key"),
        ("legacy", "openssl ec -in etc/kluis/server.key.plain -aes256 -passout pass:secret -out etc/kluis/server.key"),
    ] {
        let prep = format!("[ -e etc/kluis/server.key.plain ] || cp -p etc/kluis/server.key etc/kluis/server.key.plain; rm -f etc/kluis/server.key; {cmd} && chmod 600 etc/kluis/server.key");
        let out = m.bash(&prep).output().unwrap();
        assert!(out.status.success(), "{how}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(std::fs::read_to_string(&key).unwrap().contains("ENCRYPTED"), "{how}");
        let out = m.bash(&serve).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{how}: {err}");
        assert!(err.contains("encrypted private keys are not supported"), "{how}: {err}");
        assert!(err.contains(&key.display().to_string()), "{how}: {err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"), "{how}");
    }
    // And with the key decrypted again, it serves.
    std::fs::rename(m.path("etc/kluis/server.key.plain"), &key).unwrap();
    m.run(&blocks[serve_at]);
}

#[test]
fn the_walk_section_is_only_what_the_test_can_run() {
    // Every block of the section is run or written by the walk: a shell block, or a config
    // that says where it goes; nothing the test would skip.
    for b in walk(None) {
        match b.lang.as_str() {
            "sh" => {}
            "toml" => assert!(b.first_line().starts_with("# kms-server config: /"), "{}: {}", b.at(), b.first_line()),
            other => panic!("{}: ```{other} in the walk", b.at()),
        }
    }
    assert!(Path::new(&markdown::workspace_root().join("docs/certificates.md")).exists());
}
