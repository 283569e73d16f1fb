//! libFuzzer wrapper of `kluis_fuzz_targets::manifest` (see that function; run with `scripts/fuzz manifest`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kluis_fuzz_targets::manifest(data));
