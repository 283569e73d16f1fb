//! KMIP end to end: PyKMIP, the real client, with its own encoding, against a real
//! `kms-server`. `scripts/test-all` installs PyKMIP into a virtualenv
//! (`target/test-tools/pykmip`, or the Python named by `KLUIS_TEST_PYKMIP`); the steps run
//! through `tests/kmip/driver.py`, which prints one JSON result per step.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Server;

/// The Python that has PyKMIP.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KLUIS_TEST_PYKMIP") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools/pykmip/bin/python");
    assert!(
        p.exists(),
        "PyKMIP is not installed at {}: run ./scripts/test-all (it makes that virtualenv), or set KLUIS_TEST_PYKMIP to a Python that has `pykmip`",
        p.display()
    );
    p
}

/// Runs `steps` (JSON) as the dev identity `who` against the server's KMIP listener;
/// one result per step.
pub fn run(server: &Server, who: &str, steps: serde_json::Value) -> Vec<serde_json::Value> {
    let addr = server.kmip_addr.as_deref().expect("the server was started without --kmip-listen");
    let (host, port) = addr.rsplit_once(':').unwrap();
    let pki = server.data_dir().join("pki");
    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("kmip/driver.py");
    let mut child = Command::new(python())
        .arg(driver)
        .args([host, port])
        .arg(pki.join("ca.pem"))
        .arg(pki.join("clients").join(format!("{who}.pem")))
        .arg(pki.join("clients").join(format!("{who}.key")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(steps.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "the PyKMIP driver failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let results: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), steps.as_array().map_or(0, Vec::len), "one result per step:\n{stdout}");
    results
}
