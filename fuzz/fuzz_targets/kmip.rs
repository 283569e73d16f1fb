//! libFuzzer wrapper of `kluis_fuzz_targets::kmip` (see that function; run with `scripts/fuzz kmip`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kluis_fuzz_targets::kmip(data));
