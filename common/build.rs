//! Compiles `proto/` with protox (no system `protoc` needed) and generates the tonic code,
//! writing the file descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = ["types.proto", "broker.proto", "agent.proto", "plugin.proto"]
        .map(|name| proto_root.join("tsbroker/v1").join(name));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let file_descriptors = protox::compile(&files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tsbroker_descriptor.bin"),
        prost::Message::encode_to_vec(&file_descriptors),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // The agent RPC is named `Connect`; the generated `connect()` helper would clash with it.
        .build_transport(false)
        // prost's encoding with smaller per-call buffers (src/codec.rs).
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(file_descriptors)?;
    Ok(())
}
