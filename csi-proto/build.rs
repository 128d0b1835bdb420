//! Compiles `proto/csi.proto` with protox (pure Rust, no system `protoc`, no network) and hands the
//! descriptor set to tonic-prost-build for the message, client and server code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/csi.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
