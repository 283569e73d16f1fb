//! libFuzzer wrapper of `kluis_fuzz_targets::rpc::rpc` (see that function; run with `scripts/fuzz rpc`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kluis_fuzz_targets::rpc::rpc(data));
