//! libFuzzer wrapper of `kluis_fuzz_targets::client_config` (see that function; run with `scripts/fuzz client_config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kluis_fuzz_targets::client_config(data));
