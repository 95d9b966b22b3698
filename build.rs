//! Compiles `proto/` into Rust with protox (pure Rust, no system `protoc`) and writes the
//! descriptor set that gRPC reflection serves.

use std::path::PathBuf;

use protox::prost::Message;

const PROTOS: &[&str] = &[
    "gameball/profiles/v1/profiles.proto",
    "gameball/profiles/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    // On the compile_fds path prost-build does not write the descriptor set itself, so
    // reflection's copy (imports and source comments included) is written here.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("profiles_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Prost's, with a request that does not decode answered INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::grpc::codec::MessageCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
