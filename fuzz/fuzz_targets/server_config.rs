//! libFuzzer wrapper of `kluis_fuzz_targets::server_config` (see that function; run with `scripts/fuzz server_config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kluis_fuzz_targets::server_config(data));
