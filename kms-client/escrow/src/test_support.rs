//! Fixtures for tests of the escrow and of the CLIs built on it (feature `test-support`,
//! enabled only by dev-dependencies; never in a shipped binary).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};

use crate::{Custodian, ShareText, share_file_name};

/// A custodian with a fresh X25519 key, as a custodian would make with `age-keygen`.
pub struct Holder {
    pub custodian: Custodian,
    pub identity: age::x25519::Identity,
}

pub fn holders(names: &[&str]) -> Vec<Holder> {
    names
        .iter()
        .map(|n| {
            let identity = age::x25519::Identity::generate();
            Holder { custodian: Custodian::new(*n, identity.to_public().to_string()), identity }
        })
        .collect()
}

pub fn share_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(share_file_name(name))
}

/// Decrypts a share file with the age crate alone, as `age -d -i KEY` would.
pub fn decrypt_with_age(path: &Path, identity: &age::x25519::Identity) -> String {
    let ct = std::fs::read(path).unwrap();
    assert!(ct.starts_with(b"age-encryption.org/v1\n"), "not an age v1 file");
    let pt = age::decrypt(identity, &ct).unwrap();
    String::from_utf8(pt).unwrap()
}

pub fn share_texts(dir: &Path, h: &[Holder]) -> Vec<String> {
    h.iter().map(|h| decrypt_with_age(&share_path(dir, &h.custodian.name), &h.identity)).collect()
}

pub fn parse(text: &str) -> ShareText {
    ShareText::parse(text).unwrap()
}

pub fn parse_all(texts: &[String]) -> Vec<ShareText> {
    texts.iter().map(|t| parse(t)).collect()
}
