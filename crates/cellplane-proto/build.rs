//! Generates the gRPC code from `proto/` at the workspace root.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files: Vec<PathBuf> = [
        "etcd/mvccpb/kv.proto",
        "etcd/etcdserverpb/rpc.proto",
        "cellplane/raft/v1/raft.proto",
        "cellplane/cell/v1/ownership.proto",
        "cellplane/router/v1/admin.proto",
        "cellplane/discovery/v1/discovery.proto",
        "cellplane/discovery/v1/health.proto",
    ]
    .iter()
    .map(|f| root.join(f))
    .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let mut config = prost_build::Config::new();
    // A protoc named by PROTOC (e.g. Debian's protobuf-compiler) wins; otherwise the
    // vendored binary, so a fresh machine needs no apt package for it.
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    // Raft payloads and KV values are passed along without copying.
    config.bytes([".cellplane.raft.v1"]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &files,
        &[root.join("etcd"), root],
    )?;
    Ok(())
}
