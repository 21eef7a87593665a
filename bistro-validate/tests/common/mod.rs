//! Helpers shared by the tests that run the real binaries.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The `miner` binary, built next to the `validator` by `cargo test --workspace`.
pub(crate) fn miner_binary() -> PathBuf {
    let validator = PathBuf::from(env!("CARGO_BIN_EXE_validator"));
    let miner = validator.with_file_name(format!("miner{}", std::env::consts::EXE_SUFFIX));
    assert!(miner.exists(), "the miner binary is not built next to the validator: run `cargo test --workspace`");
    miner
}

/// The `validator` binary under test.
pub(crate) fn validator_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_validator"))
}

/// Start `bin` in `dir` on the devnet there (1 s blocks, `hparams.toml`, CPU) with `args`,
/// its log (RUST_LOG=info) in `dir/log`.
pub(crate) fn spawn(bin: &Path, dir: &Path, args: &[&str], log: &str) -> Child {
    Command::new(bin)
        .current_dir(dir)
        .args(["--devnet.dir", "devnet", "--devnet.block-ms", "1000", "--hparams", "hparams.toml", "--device", "cpu"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).expect("the log file can be created"))
        .spawn()
        .expect("the binary starts")
}
