//! Compiles `proto/herald/v1/push.proto` with protox (a pure-Rust protobuf
//! compiler), so building Herald needs no `protoc` on the machine. The
//! encoded descriptor set is also written to OUT_DIR for gRPC reflection.
use prost::Message;
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["herald/v1/push.proto"], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("herald_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
