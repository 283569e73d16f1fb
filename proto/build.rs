//! Compiles the .proto files with protox (pure Rust), so no system `protoc` is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/kluis/v1/kluis.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Serialised descriptor for gRPC server reflection (grpcurl).
    std::fs::write(
        out.join("kluis_v1_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Key-bearing messages get a hand-written redacting Debug (src/lib.rs).
        .skip_debug([
            "kluis.v1.GenerateDataKeyResponse",
            "kluis.v1.UnwrapDataKeyResponse",
            "kluis.v1.ImportKmipObjectRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
