//! libFuzzer wrapper of `kluis_fuzz_targets::share` (see that function; run with `scripts/fuzz share`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kluis_fuzz_targets::share(data));
