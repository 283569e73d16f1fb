//! libFuzzer wrapper of `kluis_fuzz_targets::audit_export` (see that function; run with `scripts/fuzz audit_export`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kluis_fuzz_targets::audit_export(data));
