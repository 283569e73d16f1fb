//! `kms-server`: the Kluis key service.
#![forbid(unsafe_code)]

/// jemalloc: with glibc's malloc the server's resident memory grew with the size of the
/// audit trail that concurrent exports stream through the store's bounded page cache (the
/// live heap did not); with jemalloc it stays flat. Measured in docs/benchmarks.md,
/// "Audit export memory".
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    kms_server::cli::main_with(kms_server::startup::Environment::default())
}
