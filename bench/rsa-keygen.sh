#!/usr/bin/env bash
# RSA key generation time of the two candidate crates for KMIP Create Key Pair (RustCrypto
# `rsa`, `aws-lc-rs`), in three profiles: the workspace's dev profile (its own code at
# opt-level 1, dependencies at 3: what the test binaries run), a plain dev profile
# (everything at opt-level 0) and release. Builds a throwaway crate in a temp dir (nothing
# of it enters the workspace or its Cargo.lock) and prints one line per crate, profile and
# size: min / median / max of N generations (RSA generation time varies with how soon a
# prime is found, so medians of several).
#
#   bench/rsa-keygen.sh            # N2048=5 N3072=3 N4096=3, PROFILES="dev plain release" by default
#
# The plain profile is slow (RSA-4096 with rsa takes minutes there): PROFILES="dev release" skips it,
# and a size with N0000=0 is skipped.
set -euo pipefail
N2048=${N2048:-5}; N3072=${N3072:-3}; N4096=${N4096:-3}; PROFILES=${PROFILES:-dev plain release}
W=${RSA_BENCH_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/kluis-rsa-bench.XXXXXX")}
mkdir -p "$W/src"
cat >"$W/Cargo.toml" <<'TOML'
[package]
name = "rsa-keygen-bench"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
rsa = "0.9"
rand = "0.8"
aws-lc-rs = "1"

[profile.dev.package."*"]
opt-level = 3
debug = false

[profile.dev]
opt-level = 1

[profile.plain]
inherits = "dev"
opt-level = 0

[profile.plain.package."*"]
opt-level = 0

[profile.release]
lto = "thin"
codegen-units = 4
TOML
cat >"$W/src/main.rs" <<'RS'
use std::time::Instant;

fn stats(mut t: Vec<f64>) -> String {
    t.sort_by(f64::total_cmp);
    format!("min {:.2}s median {:.2}s max {:.2}s (n={})", t[0], t[t.len() / 2], t[t.len() - 1], t.len())
}

fn main() {
    let profile = std::env::args().nth(1).unwrap_or_default();
    let n = |bits: usize| std::env::var(format!("N{bits}")).ok().and_then(|v| v.parse().ok()).unwrap_or(3usize);
    for bits in [2048usize, 3072, 4096] {
        if n(bits) == 0 {
            continue;
        }
        let mut t = Vec::new();
        for _ in 0..n(bits) {
            let s = Instant::now();
            let k = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits).unwrap();
            t.push(s.elapsed().as_secs_f64());
            std::hint::black_box(k);
        }
        println!("rsa 0.9     {profile:8} RSA-{bits}: {}", stats(t));
        let size = match bits {
            2048 => aws_lc_rs::rsa::KeySize::Rsa2048,
            3072 => aws_lc_rs::rsa::KeySize::Rsa3072,
            _ => aws_lc_rs::rsa::KeySize::Rsa4096,
        };
        let mut t = Vec::new();
        for _ in 0..n(bits) {
            let s = Instant::now();
            let k = aws_lc_rs::rsa::KeyPair::generate(size).unwrap();
            t.push(s.elapsed().as_secs_f64());
            std::hint::black_box(k);
        }
        println!("aws-lc-rs 1 {profile:8} RSA-{bits}: {}", stats(t));
    }
}
RS
cd "$W"
for p in $PROFILES; do
    cargo build --quiet --profile "$p" >&2
done
grep -A1 -E '^name = "(rsa|aws-lc-rs|aws-lc-sys)"$' Cargo.lock | grep -v '^--' | paste - - >&2
for p in $PROFILES; do
    d=$p; [[ $p == dev ]] && d=debug
    N2048=$N2048 N3072=$N3072 N4096=$N4096 "target/$d/rsa-keygen-bench" "$p"
done
