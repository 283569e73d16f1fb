//! libFuzzer wrapper of `kluis_fuzz_targets::unseal_target` (see that function; run with `scripts/fuzz unseal`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kluis_fuzz_targets::unseal_target(data));
