fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    // `bytes` fields as `Bytes`: payloads are handed on without copying.
    tonic_prost_build::configure().bytes(".").compile_protos(
        &[
            "proto/paxos.proto",
            "proto/shardmaster.proto",
            "proto/shardkv.proto",
        ],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
