//! Helpers of the multi-process tests: locate the workspace's binaries and read what the
//! nodes left on disk.
#![allow(dead_code)]

use std::path::Path;

/// A workspace binary (`miner`, `validator`), built next to this test's directory.
pub(crate) fn binary(name: &str) -> std::path::PathBuf {
    // Integration tests run from target/<profile>/deps; the workspace's binaries sit one up.
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "{} is not built: run `cargo test --workspace` (it builds the binaries)", bin.display());
    bin
}

/// The accepted set (JSON) of the aggregate of `window` in `bucket`, from the S3 server's
/// directory on disk.
pub(crate) fn accepted_set(s3_root: &Path, bucket: &str, window: u64) -> Option<serde_json::Value> {
    let bytes = std::fs::read(s3_root.join(bucket).join(format!("aggregate-{window}.safetensors"))).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    serde_json::from_str(meta.metadata().as_ref()?.get("accepted")?).ok()
}

/// A node's saved state as the node loads it (the last full save with its journal
/// replayed, its lineage and any full hash checked): its window and state identity.
pub(crate) fn saved_state(dir: &Path, model: &bistro_model::ModelConfig) -> (u64, String) {
    let info: bistro_train::state::StateInfo =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).expect("state.json")).expect("state.json parses");
    let (info, _, _) = bistro_train::state::load(dir, model, &info.hparams_hash, &candle_core::Device::Cpu)
        .expect("the saved state loads")
        .expect("a saved state");
    (info.window, info.state.expect("an identity"))
}
