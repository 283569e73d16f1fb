//! Test harness: every SoftHSM2 test runs in a child process of its test binary.
//!
//! Why: SoftHSM2 reads `SOFTHSM2_CONF` and scans its token directory once, at `C_Initialize`,
//! which is per process; setting the variable from a test would need `unsafe`
//! (`std::env::set_var`, forbidden here) and would race with parallel tests. So the parent test
//! creates a temp dir with its own `softhsm2.conf` and tokens (made with `softhsm2-util`), then
//! re-runs this same binary filtered to the one test, with `SOFTHSM2_CONF` set for the child. The
//! child sees `KLUIS_HSM_CHILD` and runs the body. Each test thus gets a private token directory
//! and its own PKCS#11 initialization, and may simulate token removal without disturbing others.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

/// User PIN of every test token.
pub const USER_PIN: &str = "1234";
const SO_PIN: &str = "5678";
const CHILD_VAR: &str = "KLUIS_HSM_CHILD";
const DIR_VAR: &str = "KLUIS_HSM_TEST_DIR";

/// Path of the SoftHSM2 module (override with `KLUIS_TEST_PKCS11_MODULE`).
pub fn module_path() -> PathBuf {
    std::env::var_os("KLUIS_TEST_PKCS11_MODULE").map_or_else(
        || PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
        PathBuf::from,
    )
}

/// What a child test sees.
pub struct Env {
    /// The temp dir (conf, `tokens/`, scratch space).
    pub dir: PathBuf,
}

impl Env {
    /// The directory of the token labelled `label` (found by its `token.object` content).
    pub fn token_dir(&self, label: &str) -> PathBuf {
        let map: BTreeMap<String, PathBuf> = read_token_dirs(&self.dir.join("token-dirs.txt"));
        map.get(label)
            .unwrap_or_else(|| panic!("no token dir recorded for {label}"))
            .clone()
    }
}

fn read_token_dirs(path: &Path) -> BTreeMap<String, PathBuf> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(label, dir)| (label.to_owned(), PathBuf::from(dir)))
        .collect()
}

/// Runs `body` in a child process with a fresh SoftHSM2 token directory holding `tokens`
/// (each initialized with [`USER_PIN`]). `name` must be the test function's name.
pub fn in_softhsm(name: &str, tokens: &[&str], body: impl FnOnce(&Env)) {
    if let Some(child) = std::env::var_os(CHILD_VAR) {
        assert_eq!(child.to_str(), Some(name), "child ran the wrong test");
        let dir = PathBuf::from(std::env::var_os(DIR_VAR).expect("test dir var"));
        body(&Env { dir });
        return;
    }

    let module = module_path();
    assert!(
        module.exists(),
        "SoftHSM2 module {} not found: apt-get install softhsm2",
        module.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let tokens_dir = dir.join("tokens");
    std::fs::create_dir(&tokens_dir).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens_dir.display()
        ),
    )
    .unwrap();

    let mut token_dirs = String::new();
    for label in tokens {
        let before = list_dirs(&tokens_dir);
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", USER_PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util not runnable: apt-get install softhsm2");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let new: Vec<PathBuf> = list_dirs(&tokens_dir)
            .into_iter()
            .filter(|d| !before.contains(d))
            .collect();
        assert_eq!(new.len(), 1, "expected one new token directory");
        token_dirs.push_str(&format!("{label}\t{}\n", new[0].display()));
    }
    std::fs::write(dir.join("token-dirs.txt"), token_dirs).unwrap();

    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD_VAR, name)
        .env(DIR_VAR, &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("---- child stdout ----\n{stdout}\n---- child stderr ----\n{stderr}");
    assert!(out.status.success(), "child test {name} failed");
    assert!(
        stdout.contains("1 passed"),
        "child did not run test {name} (name typo?)"
    );
}

fn list_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect()
}

/// A raw cryptoki R/W session on the token labelled `label`, logged in as user, for tests that
/// need to go around `Hsm` (e.g. to make a bad key or read attributes directly). Shares the
/// process-wide module initialization with any `Hsm` in this process.
pub fn raw_session(label: &str) -> (Pkcs11, Session) {
    let ctx = Pkcs11::new(module_path()).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == label)
        .expect("token slot");
    let session = ctx.open_rw_session(slot).unwrap();
    match session.login(UserType::User, Some(&AuthPin::from(USER_PIN))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
    (ctx, session)
}
