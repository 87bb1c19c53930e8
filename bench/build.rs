fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The node's vendored protoc: a fresh machine needs only the Rust toolchain.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    // `bytes` fields as `Bytes`: a value read is handed on without copying.
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".")
        .compile_protos(&["proto/etcd_kv.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
