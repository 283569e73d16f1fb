//! libFuzzer wrapper of `kluis_fuzz_targets::revocation_list` (see that function; run with `scripts/fuzz revocation_list`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kluis_fuzz_targets::revocation_list(data));
