//! libFuzzer wrapper of `kluis_fuzz_targets::stanza` (see that function; run with `scripts/fuzz stanza`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kluis_fuzz_targets::stanza(data));
