//! libFuzzer wrapper of `kluis_fuzz_targets::header` (see that function; run with `scripts/fuzz header`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kluis_fuzz_targets::header(data));
