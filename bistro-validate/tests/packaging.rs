//! The deployment files (`deploy/`) against the binaries they start: every variable the
//! env file and the compose file set is one a node reads, the units and images run
//! binaries that exist, and stopping is SIGTERM with time to finish a step. (The images
//! themselves are not built here: no container runtime in CI.)

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The variables the `--help` of `bin` (and of its tools) names as `[env: NAME=...]`.
fn variables(bin: &std::path::Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for args in [&["--help"][..], &["doctor", "--help"]] {
        let o = Command::new(bin).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        for part in text.split("[env: ").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_ascii_uppercase() || *c == '_').collect();
            out.insert(name);
        }
    }
    out
}

#[test]
fn deployment_files_match_the_binaries() {
    let mut known = variables(&common::miner_binary());
    known.extend(variables(&common::validator_binary()));
    // Read where the bucket is opened (so that only a secret on the command line warns).
    known.insert("BISTRO_S3_SECRET_ACCESS_KEY".into());
    for v in ["BT_WALLET_NAME", "BT_WALLET_HOTKEY", "BT_WALLET_PATH", "BT_SUBTENSOR_NETWORK", "BISTRO_BUCKET"] {
        assert!(known.contains(v), "{v} is not read by the binaries: {known:?}");
    }
    // Compose-only names: interpolated into the compose file, not read by a node.
    let compose_only = ["MINER_HOTKEY", "VALIDATOR_HOTKEY", "WALLETS_DIR", "MINER_BUCKET", "VALIDATOR_BUCKET"];
    let env = read("deploy/env.example");
    for line in env.lines() {
        let line = line.trim_start_matches('#');
        let Some((name, _)) = line.split_once('=') else { continue };
        if !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') || name.is_empty() {
            continue;
        }
        if compose_only.contains(&name) || name == "GRAFANA_ADMIN_PASSWORD" {
            continue;
        }
        assert!(known.contains(name), "deploy/env.example sets {name}, which no node reads");
    }
    let compose = read("deploy/compose.yaml");
    for line in compose.lines().map(str::trim) {
        let Some((name, _)) = line.split_once(": ") else { continue };
        if (name.starts_with("BT_") || name.starts_with("BISTRO_")) && !known.contains(name) {
            panic!("deploy/compose.yaml sets {name}, which no node reads");
        }
    }
    for name in compose_only {
        assert!(compose.contains(&format!("${{{name}")), "{name} is not used in compose.yaml");
    }
    // Images build both binaries and keep the commit; units run them and stop them well.
    for f in ["deploy/Dockerfile", "deploy/Dockerfile.cuda"] {
        let d = read(f);
        assert!(d.contains("-p bistro-train -p bistro-validate --bins"), "{f}");
        assert!(d.contains("target/release/miner target/release/validator"), "{f}");
        assert!(d.contains("ARG BISTRO_GIT_HASH") && d.contains("STOPSIGNAL SIGTERM"), "{f}");
    }
    assert!(
        read("deploy/Dockerfile.cuda").contains("scripts/cuda-build.sh cargo build --release --locked --features cuda")
    );
    for (unit, bin) in [("bistro-miner", "miner"), ("bistro-validator", "validator")] {
        let u = read(&format!("deploy/systemd/{unit}.service"));
        assert!(u.contains(&format!("ExecStart=/usr/local/bin/{bin}\n")), "{unit}");
        assert!(u.contains("KillSignal=SIGTERM") && u.contains("RestartPreventExitStatus=78"), "{unit}");
        assert_eq!(bistro_train::cli::EXIT_CONFIG, 78);
    }
    // Prometheus scrapes the port the compose file gives the nodes' metrics.
    assert!(compose.contains("BISTRO_METRICS_ADDR: 0.0.0.0:9616"));
    assert!(read("deploy/prometheus.yml").contains("\"miner:9616\", \"validator:9616\""));
    // The dashboard the compose file provisions exists.
    assert!(repo().join("docs/grafana/bistro.json").exists());
    // Every series an alert uses is one the nodes export.
    let alerts = read("deploy/alerts.yml");
    let telemetry = read("bistro-train/src/telemetry.rs");
    for series in alerts.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("bistro_"))
    {
        assert!(telemetry.contains(&format!("\"{series}\"")), "alerts.yml uses {series}, which nodes do not export");
    }
}
