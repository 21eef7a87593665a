//! The real `miner` binary on a temporary devnet: it trains a few windows, its slices land
//! in its bucket with valid metadata, and its saved state resumes after a kill.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bistro_chain::Chain;
use bistro_chain::devnet::Devnet;
use bistro_model::{ModelConfig, Params};
use bistro_train::hparams::HParams;
use bistro_train::slices::{self, SliceIndices, SliceMeta};
use candle_core::Device;

/// A fast network for tests: 1 s blocks, 2-block windows, a 1-layer model.
fn write_config(dir: &Path) -> (HParams, ModelConfig) {
    bistro_train::hparams::write_test_network(dir, |h| h.compression = 4).unwrap()
}

fn miner(dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_miner"));
    c.current_dir(dir)
        .args(["--devnet.dir", "devnet", "--devnet.block-ms", "1000", "--hparams", "hparams.toml"])
        .args(["--bucket", "bucket", "--state-dir", "state", "--device", "cpu"])
        .args(extra)
        .env("RUST_LOG", "info");
    c
}

#[test]
fn miner_trains_uploads_valid_slices_and_resumes_after_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (h, model) = write_config(dir);

    let out = miner(dir, &["--max-windows", "2"]).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "miner failed:\n{log}");
    assert!(log.contains("slice uploaded"), "{log}");
    assert!(log.contains("stopped: 2 window(s) trained"), "{log}");

    // The slices are in the bucket and pass the same validation peers apply.
    let chain = Devnet::open(&dir.join("devnet"), Duration::from_secs(1)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let keys: Vec<String> = std::fs::read_dir(dir.join("bucket"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|k| k.starts_with("slice-"))
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let params = Params::genesis(&model, h.genesis_seed, &Device::Cpu).unwrap();
    // No validator ran: the miner trained on genesis both times, and its slices say so.
    let adam = bistro_train::public_adam::PublicAdam::zeros(params.specs());
    let parent = bistro_train::accepted::state_hash(&params, &adam).unwrap();
    for key in &keys {
        let w: u64 = key.trim_start_matches("slice-").split('-').next().unwrap().parse().unwrap();
        let seed = rt.block_on(chain.block_hash(h.first_block(w + 1))).unwrap();
        let idx = SliceIndices::select(params.specs(), &seed, h.compression);
        let meta =
            SliceMeta::new(w, "default-miner", &parent, h.compression, &h.hash().unwrap(), &model.hash().unwrap());
        let bytes = std::fs::read(dir.join("bucket").join(key)).unwrap();
        let exp = slices::expectation(&params, &idx, meta, h.max_slice_bytes, h.codec());
        let slice = slices::decode(&bytes, &exp).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(slice.codes.len(), params.len());
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state/state.json")).unwrap()).unwrap();
    let saved_window = state["window"].as_u64().unwrap();
    assert!(saved_window >= 2);

    // Start again and kill it hard in the middle of its work.
    let mut child = miner(dir, &[]).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    child.kill().unwrap();
    let _ = child.wait();
    // The state is still readable and the next run resumes from it.
    let out = miner(dir, &["--max-windows", "1"]).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "miner failed after a kill:\n{log}");
    assert!(log.contains("from local state"), "did not resume:\n{log}");
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_config(dir);
    // Configuration errors exit with 78 (EX_CONFIG): a service manager must not restart
    // the node in a loop, and a script can tell them from failures at run time.
    let config = bistro_train::cli::EXIT_CONFIG;
    let out = miner(dir, &["--max-windows", "1", "--model", "huge"]).output().unwrap();
    assert_eq!(out.status.code(), Some(config), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown model preset `huge`"), "{err}");

    let out = miner(dir, &["--subtensor.network", "nowhere"]).output().unwrap();
    assert_eq!(out.status.code(), Some(config));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown network"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A real network needs its shared settings: no silent devnet defaults.
    let out = Command::new(env!("CARGO_BIN_EXE_miner"))
        .current_dir(dir)
        .args(["--subtensor.network", "ws://127.0.0.1:9", "--device", "cpu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(config));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--hparams FILE is required"), "{err}");

    std::fs::write(dir.join("hparams.toml"), "compression = \"lots\"").unwrap();
    let start = Instant::now();
    let out = miner(dir, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(config));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hparams.toml") && err.contains("compression"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(20));
    // A missing file is a configuration error too.
    let out = Command::new(env!("CARGO_BIN_EXE_miner"))
        .current_dir(dir)
        .args(["--devnet.dir", "devnet", "--hparams", "no-such-file.toml", "--device", "cpu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(config), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn secrets_never_logged() {
    // The miner's bucket is on a real S3 server that knows another secret: every upload
    // fails with an authentication error, logged at debug level. Neither the secret from
    // the environment nor one given as a flag may appear anywhere in the output.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_config(dir);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    std::fs::create_dir_all(dir.join("s3/bucket-secret")).unwrap();
    let addr = rt.block_on(support::start_s3s_fs(&dir.join("s3")));
    let bucket = format!("s3://bucket-secret?endpoint=http://{addr}");
    let env_secret = "env-secret-7f3a9c-NEVER-SHOWN";
    let flag_secret = "flag-secret-2b8e1d-NEVER-SHOWN";
    for (via_flag, secret) in [(false, env_secret), (true, flag_secret)] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_miner"));
        c.current_dir(dir)
            .args(["--devnet.dir", "devnet", "--devnet.block-ms", "1000", "--hparams", "hparams.toml"])
            .args(["--bucket", &bucket, "--state-dir", "state-secret", "--device", "cpu", "--max-windows", "1"])
            .env("RUST_LOG", "debug")
            .env("BISTRO_S3_ACCESS_KEY_ID", support::ACCESS_KEY);
        if via_flag {
            c.args(["--s3.secret-key", secret]);
        } else {
            c.env("BISTRO_S3_SECRET_ACCESS_KEY", secret);
        }
        let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        std::thread::sleep(Duration::from_secs(8));
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("access denied") || text.contains("not uploaded"), "no upload was attempted:\n{text}");
        assert!(!text.contains(secret), "the secret appears in the output:\n{text}");
        if via_flag {
            assert!(text.contains("process lists show it"), "no warning for a secret on the command line:\n{text}");
        }
    }
    drop(rt);
}

/// SIGTERM (what `docker stop`, systemd and Kubernetes send) is handled like Ctrl-C: the
/// miner finishes its step, saves its state and exits 0.
#[cfg(unix)]
#[test]
fn sigterm_saves_state_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_config(dir);
    let log_path = dir.join("miner.log");
    let mut child = miner(dir, &[]).stderr(std::fs::File::create(&log_path).unwrap()).spawn().unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(&log_path).unwrap_or_default().contains("slice uploaded") {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no slice uploaded:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the miner did not stop after SIGTERM:\n{}", std::fs::read_to_string(&log_path).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "exit {status:?} after SIGTERM:\n{log}");
    assert!(log.contains("SIGTERM: finishing the current step"), "{log}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state/state.json")).unwrap()).unwrap();
    assert!(state["window"].as_u64().is_some(), "{state}");
}

fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_miner"));
    c.current_dir(dir).args(args).env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--version`, `hparams init|show|hash`, and the settings rules off the devnet.
#[test]
fn version_and_hparams_tools() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = Some(bistro_train::cli::EXIT_CONFIG);
    let (code, out, _) = run(dir, &["--version"], &[]);
    assert_eq!(code, Some(0));
    let protocol = format!(", protocol {}, cuda off)", bistro_train::PROTOCOL_VERSION);
    assert!(out.contains("(git ") && out.contains(&protocol), "{out}");

    // The shipped testnet file, written out, hashes as the settings `test` loads by itself.
    let (code, _, err) = run(dir, &["hparams", "init", "--network", "test", "--out", "net.toml"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read_to_string(dir.join("net.toml")).unwrap().contains("network = \"bistro-test\""));
    let (_, shipped, _) = run(dir, &["hparams", "hash", "--subtensor.network", "test"], &[]);
    let (_, from_file, _) = run(dir, &["hparams", "hash", "--subtensor.network", "test", "--hparams", "net.toml"], &[]);
    assert_eq!(shipped.trim(), bistro_train::hparams::shipped("test").unwrap().unwrap().hash().unwrap());
    assert_eq!(shipped, from_file);
    let (code, _, err) = run(dir, &["hparams", "init", "--network", "test", "--out", "net.toml"], &[]);
    assert_eq!(code, config, "never overwrites: {err}");
    let (code, _, err) = run(dir, &["hparams", "init", "--network", "mars"], &[]);
    assert_eq!(code, config);
    assert!(err.contains("no shipped settings for `mars`"), "{err}");
    let (code, out, _) = run(dir, &["hparams", "show"], &[]);
    assert_eq!(code, Some(0));
    assert!(out.contains("# hparams hash ") && out.contains("network = \"devnet\""), "{out}");

    // Off the devnet --model and --data are the network's, and devnet settings are refused
    // rather than renamed.
    let (code, _, err) = run(dir, &["--subtensor.network", "test", "--model", "tiny"], &[]);
    assert_eq!(code, config);
    assert!(err.contains("--model tiny contradicts the network's hparams (small)"), "{err}");
    let (_, devnet, _) = run(dir, &["hparams", "init", "--network", "devnet"], &[]);
    std::fs::write(dir.join("devnet.toml"), devnet).unwrap();
    let (code, _, err) = run(dir, &["--subtensor.network", "test", "--hparams", "devnet.toml"], &[]);
    assert_eq!(code, config);
    assert!(err.contains("the hparams name the network `devnet`"), "{err}");
}

/// Every flag reads the environment; the wallet and network ones by the Bittensor SDK's
/// names, with `~` in BT_WALLET_PATH expanded.
#[test]
fn flags_fall_back_to_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let home = dir.display().to_string();
    let env = [
        ("HOME", home.as_str()),
        ("BT_SUBTENSOR_NETWORK", "test"),
        ("BT_NETUID", "3"),
        ("BT_WALLET_PATH", "~/wallets"),
        ("BT_WALLET_NAME", "cold"),
        ("BT_WALLET_HOTKEY", "hot"),
    ];
    let (code, _, err) = run(dir, &[], &env);
    assert_eq!(code, Some(bistro_train::cli::EXIT_CONFIG), "{err}");
    let want = dir.join("wallets/cold/hotkeys/hot");
    assert!(err.contains(&want.display().to_string()), "the hotkey path from BT_* variables: {err}");
    // Off the devnet the subnet must be named: no silent netuid 1.
    let (code, _, err) = run(dir, &[], &env[..2]);
    assert_eq!(code, Some(bistro_train::cli::EXIT_CONFIG));
    assert!(err.contains("--netuid (or BT_NETUID) is required on test"), "{err}");
    // The flag wins over the variable.
    let (_, _, err) = run(dir, &["--wallet.hotkey", "other"], &env);
    assert!(err.contains("wallets/cold/hotkeys/other"), "{err}");
    // BISTRO_* for BISTRO's own flags.
    let (code, _, err) = run(dir, &["hparams", "hash"], &[("BISTRO_HPARAMS", "missing.toml")]);
    assert_eq!(code, Some(bistro_train::cli::EXIT_CONFIG));
    assert!(err.contains("missing.toml"), "{err}");
    let (code, _, err) = run(dir, &[], &[("BISTRO_DEVICE", "tpu"), ("BISTRO_DEVNET_DIR", "d")]);
    assert_eq!(code, Some(bistro_train::cli::EXIT_CONFIG));
    assert!(err.contains("--device"), "{err}");
}
