//! Generates the tonic client and server for `proto/bench.proto` (needs `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // prost-build does not emit these itself; without them any file change reruns protoc.
    println!("cargo:rerun-if-changed=proto/bench.proto");
    println!("cargo:rerun-if-changed=build.rs");
    tonic_prost_build::configure()
        // `bytes` fields as `bytes::Bytes`, so echoing and streaming share buffers
        // instead of copying them into `Vec`s.
        .bytes(".")
        .compile_protos(&["proto/bench.proto"], &["proto"])?;
    Ok(())
}
