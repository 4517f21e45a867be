//! Compiles `proto/` with protox (pure Rust: no system protoc) into `OUT_DIR`,
//! and writes the descriptor set (with comments, for `grpcurl describe`) that
//! the reflection service serves.

use std::{env, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &["proto/embedder/v1/embedder.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(out.join("embedder_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
