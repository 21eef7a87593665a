//! `doctor`, the preflight, through the real binaries on a devnet: every check passes for a
//! miner and a validator that joined, and each kind of fault fails its own check with its
//! own message (exit 78), without touching the chain.

mod common;
#[path = "../../bistro-train/tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;

use common::{miner_binary, validator_binary};

/// Run `bin doctor` in `dir` on its devnet with `args`: (exit code, report).
fn doctor(bin: &Path, dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin)
        .current_dir(dir)
        .arg("doctor")
        .args(["--devnet.dir", "devnet", "--devnet.block-ms", "1000", "--device", "cpu"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// The report's line for `check`.
fn line<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.len() > 7 && l[7..].starts_with(&format!("{check} ")))
        .unwrap_or_else(|| panic!("no `{check}` line in:\n{report}"))
}

fn failed(report: &str, check: &str) -> bool {
    line(report, check).starts_with("[FAIL]")
}

fn join(bin: &Path, dir: &Path, args: &[&str]) {
    let out = Command::new(bin)
        .current_dir(dir)
        .args(["--devnet.dir", "devnet", "--devnet.block-ms", "1000", "--hparams", "hparams.toml", "--device", "cpu"])
        .args(["--max-windows", "0"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn every_check_passes_on_a_joined_devnet_and_each_fault_fails_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    bistro_train::hparams::write_test_network(dir, |_| {}).unwrap();
    let config = Some(bistro_train::cli::EXIT_CONFIG);
    let (miner, validator) = (miner_binary(), validator_binary());
    let h = ["--hparams", "hparams.toml"];

    // Before anyone joined: the miner is not registered (the devnet registers a node when
    // it starts), and there is no lead to compare with.
    let (code, report) = doctor(&miner, dir, &h);
    assert_eq!(code, config, "{report}");
    assert!(failed(&report, "registered") && line(&report, "registered").contains("not registered"), "{report}");
    assert!(line(&report, "lead hparams").starts_with("[skip]"), "{report}");

    // A validator and a miner join (and exit at once); now every check passes for both.
    join(&validator, dir, &[]);
    join(&miner, dir, &[]);
    let (code, report) = doctor(&miner, dir, &h);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report.matches("[FAIL]").count() + report.matches("[skip]").count(), 0, "{report}");
    assert!(line(&report, "lead hparams").contains("same hash as the lead default-validator"), "{report}");
    // With exactly the validator's command line, its own options included.
    let (code, report) = doctor(&validator, dir, &[&h[..], &["--max-miners", "8", "--heldout-pages", "0"]].concat());
    assert_eq!(code, Some(0), "{report}");
    assert!(line(&report, "permit").contains("validator permit, stake 1000"), "{report}");
    assert!(line(&report, "lead hparams").contains("this node is the lead candidate"), "{report}");

    // Another miner, registered but without a permit, checked as a validator.
    join(&miner, dir, &["--wallet.hotkey", "m2"]);
    let (code, report) = doctor(&validator, dir, &[&h[..], &["--wallet.hotkey", "m2"]].concat());
    assert_eq!(code, config);
    assert!(failed(&report, "permit") && line(&report, "permit").contains("no validator permit"), "{report}");

    // An unregistered hotkey.
    let (code, report) = doctor(&miner, dir, &[&h[..], &["--wallet.hotkey", "stranger"]].concat());
    assert_eq!(code, config);
    assert!(line(&report, "registered").contains("hotkey default-stranger is not registered on netuid 1"), "{report}");
    assert_eq!(report.matches("[FAIL]").count(), 1, "{report}");

    // A bucket nobody can reach (nothing listens on the discard port).
    let (code, report) = doctor(
        &miner,
        dir,
        &[&h[..], &["--bucket", "s3://b/p?endpoint=http://127.0.0.1:9", "--s3.access-key", "k"]].concat(),
    );
    assert_eq!(code, config);
    assert!(failed(&report, "bucket"), "{report}");
    assert!(line(&report, "peer read").starts_with("[skip]"), "{report}");

    // A bucket on a real S3 server (s3s-fs, SigV4 checked) that its owner can write but
    // peers cannot read: its URL carries no read key, and the server refuses unsigned
    // requests. With the read key in the URL, peers read it.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    std::fs::create_dir_all(dir.join("s3/own")).unwrap();
    let s3 = rt.block_on(support::start_s3s_fs(&dir.join("s3")));
    let owner = [
        "--s3.access-key",
        support::ACCESS_KEY,
        "--s3.secret-key-file",
        dir.join("secret").to_str().unwrap().to_string().leak(),
    ];
    std::fs::write(dir.join("secret"), support::SECRET_KEY).unwrap();
    let closed = format!("s3://own?endpoint=http://{s3}&region=us-east-1");
    let (code, report) = doctor(&miner, dir, &[&h[..], &owner[..], &["--bucket", &closed]].concat());
    assert_eq!(code, config, "{report}");
    assert!(line(&report, "bucket").starts_with("[ok  ]"), "the owner writes: {report}");
    assert!(failed(&report, "peer read") && report.contains("read_key"), "{report}");
    let open = format!("{closed}{}", support::read_params());
    let (code, report) = doctor(&miner, dir, &[&h[..], &owner[..], &["--bucket", &open]].concat());
    assert!(line(&report, "peer read").starts_with("[ok  ]"), "{report}");
    assert_eq!(code, Some(0), "{report}");
    drop(rt);

    // A bucket URL longer than the chain's commitment limit.
    let long = format!("s3://b/{}?endpoint=http://127.0.0.1:9", "p".repeat(600));
    let (code, report) = doctor(&miner, dir, &[&h[..], &["--bucket", &long, "--s3.access-key", "k"]].concat());
    assert_eq!(code, config);
    assert!(line(&report, "commitment").contains("over the chain's 512-byte limit"), "{report}");

    // Settings that differ from the lead's: the differing field is named.
    let text = std::fs::read_to_string(dir.join("hparams.toml")).unwrap();
    std::fs::write(dir.join("other.toml"), text.replace("compression = 24", "compression = 12")).unwrap();
    let (code, report) = doctor(&miner, dir, &["--hparams", "other.toml"]);
    assert_eq!(code, config);
    assert!(failed(&report, "lead hparams"), "{report}");
    assert!(line(&report, "lead hparams").contains("compression: 12 vs 24"), "{report}");
    assert_eq!(report.matches("[FAIL]").count(), 1, "{report}");

    // A hotkey file that its group can read.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let wallets = dir.join("wallets");
        let path = wallets.join("default/hotkeys/miner");
        bistro_chain::wallet::create_hotkey_file(&path, [7u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let (code, report) = doctor(&miner, dir, &[&h[..], &["--wallet.path", wallets.to_str().unwrap()]].concat());
        assert_eq!(code, config);
        assert!(failed(&report, "wallet") && line(&report, "wallet").contains("chmod 600"), "{report}");
    }

    // The validator stops on its settings with 78 too (here before any network access).
    let out = Command::new(&validator)
        .current_dir(dir)
        .args(["--subtensor.network", "test", "--netuid", "3", "--model", "tiny", "--max-miners", "8"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), config, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model tiny contradicts"));
}
