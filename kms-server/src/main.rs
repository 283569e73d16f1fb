//! `kms-server`: the Kluis key service.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    kms_server::cli::main_with(kms_server::startup::Environment::default())
}
