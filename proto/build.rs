//! Compiles `proto/sweep/v1/sweep.proto` with protox (a pure-Rust protobuf compiler, so no
//! system `protoc` is needed) and generates the tonic/prost code into OUT_DIR. The encoded file
//! descriptor set is written next to it for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/sweep/v1/sweep.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("sweep_v1_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
