//! The crate's layers, checked: every module uses only modules below it (a request
//! flows front end -> auth -> keys -> audit/master -> store, never back), so there is no
//! cycle anywhere in the crate. The order is the one docs/architecture.md draws.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

/// Lowest first. A module may use any module before it in this list.
const LAYERS: &[&str] = &[
    "secret", "clock", "model", "store", "audit", "auth", "config", "master", "keys", "health", "metrics", "api",
    "tls", "kmip", "server", "startup", "cli",
];

fn rank(m: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == m)
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_uses_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut seen = 0;
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        let top = rel.split(['/', '.']).next().unwrap().to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let own = rank(&top).unwrap_or_else(|| panic!("module {top} ({rel}) is in no layer: add it to LAYERS"));
        let text = std::fs::read_to_string(f).unwrap();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if name.is_empty() || name == "one_line" {
                continue;
            }
            seen += 1;
            match rank(&name) {
                Some(r) if r <= own => {}
                Some(_) => wrong.push(format!("{rel} uses crate::{name}, a layer above {top}")),
                None => wrong.push(format!("{rel} uses crate::{name}, which is in no layer")),
            }
        }
    }
    assert!(seen > 100, "only {seen} crate:: paths found; is the scan reading the sources?");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
