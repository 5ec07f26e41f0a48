//! Generates the gRPC code and the file descriptor set (for server reflection)
//! with a vendored `protoc`, so no system protobuf compiler is needed.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    #[allow(unsafe_code)]
    // SAFETY: build scripts run single-threaded; nothing reads the
    // environment concurrently. The generator takes protoc's path from PROTOC.
    unsafe {
        env::set_var("PROTOC", protoc)
    };
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("saga_descriptor.bin"))
        .compile_protos(
            &[PathBuf::from("saga/v1/saga.proto")],
            &[PathBuf::from("."), well_known],
        )?;
    Ok(())
}
