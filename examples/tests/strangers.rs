//! Strangers, not lockstep: the real `validator` and `miner` binaries, each in its own
//! process, on one devnet, with buckets on a real S3 server (`s3s-fs`, SigV4 checked), and
//! two hostile peers whose harm depends on how *their* server answers:
//!
//! * a `split-view` miner (a real miner process) whose committed endpoint serves each slice
//!   to its first reader only, so the two validators see different bucket contents;
//! * a `stall` peer whose endpoint accepts connections and never answers.
//!
//! Under protocol v2 neither can fork the network: every honest node ends on the state the
//! lead's aggregates name, no node reports a fork, the stall costs one bounded budget per
//! window, and the honest miners train in every window.

mod nodes;
#[path = "../../bistro-train/tests/support/mod.rs"]
mod support;

use nodes::{accepted_set, binary, saved_state};

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bistro_chain::Chain;
use bistro_chain::devnet::Devnet;
use bistro_examples::hostile::Endpoint;

struct Net {
    dir: PathBuf,
    s3: String,
}

impl Net {
    fn spawn(&self, bin: &str, hotkey: &str, bucket: Option<&str>, extra: &[&str]) -> Child {
        let mut c = Command::new(binary(bin));
        c.current_dir(&self.dir)
            .args(["--devnet.dir", "devnet", "--devnet.block-ms", "1000", "--hparams", "hparams.toml"])
            .args(["--device", "cpu", "--wallet.hotkey", hotkey])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("BISTRO_S3_ACCESS_KEY_ID", support::ACCESS_KEY)
            .env("BISTRO_S3_SECRET_ACCESS_KEY", support::SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("{hotkey}.log"))).expect("log file"));
        if let Some(b) = bucket {
            let b = format!("bucket-{b}");
            std::fs::create_dir_all(self.dir.join("s3").join(&b)).expect("bucket dir");
            c.args(["--bucket", &format!("s3://{b}?endpoint={}{}", self.s3, support::read_params())]);
        }
        c.spawn().expect("spawn")
    }

    fn log(&self, hotkey: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{hotkey}.log"))).unwrap_or_default()
    }

    /// Wait for the two validators (the first two children) to finish their windows, stop
    /// the rest, and return the honest nodes' logs (`v0`, `v1`, `m1`, `m2`) and all of them
    /// as one text for failure messages.
    async fn finish(&self, children: &mut [Child], within: Duration) -> (Vec<(&'static str, String)>, String) {
        let deadline = Instant::now() + within;
        for (i, child) in children.iter_mut().enumerate().take(2) {
            loop {
                if let Some(s) = child.try_wait().unwrap() {
                    assert!(s.success(), "validator v{i} failed:\n{}", self.log(&format!("v{i}")));
                    break;
                }
                assert!(Instant::now() < deadline, "validators did not finish:\n{}", self.log("v0"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        for c in children.iter_mut().skip(2) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let logs: Vec<(&'static str, String)> = ["v0", "v1", "m1", "m2"].iter().map(|h| (*h, self.log(h))).collect();
        let all = logs.iter().map(|(h, l)| format!("===== {h}\n{l}")).collect::<Vec<_>>().join("\n");
        (logs, all)
    }
}

/// The test network in `dir` (weights every window, `tune` on top), a real S3 server for
/// its buckets and the devnet the binaries share.
async fn network(
    dir: &std::path::Path,
    tune: impl FnOnce(&mut bistro_train::hparams::HParams),
) -> (Net, Arc<Devnet>, bistro_model::ModelConfig) {
    let (_, model) = bistro_train::hparams::write_test_network(dir, |h| {
        h.windows_per_weights = 1;
        tune(h);
    })
    .unwrap();
    std::fs::create_dir_all(dir.join("s3")).unwrap();
    let addr = support::start_s3s_fs(&dir.join("s3")).await;
    let net = Net { dir: dir.to_path_buf(), s3: format!("http://{addr}") };
    let chain = Arc::new(Devnet::open(&dir.join("devnet"), Duration::from_millis(1000)).unwrap());
    (net, chain, model)
}

/// One real network at a time: each test runs a chain, an S3 server and five or six node
/// processes with budgets of half a second; two of them at once on a 2-core machine starve
/// each other's S3 server, which the tests would read as stalling peers.
static ONE_NETWORK_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Windows long enough for a hostile validator's wait and an honest fallback.
fn hostile_validator_windows(h: &mut bistro_train::hparams::HParams) {
    h.blocks_per_window = 6;
    h.fallback_wait_ms = 1_500;
}

/// Once `hotkey` has committed its own bucket (it joined), point its commitment at `url`.
async fn redirect_once_joined(chain: &Devnet, hotkey: &str, url: &str) {
    let start = Instant::now();
    while chain.commitment(1, hotkey).await.unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(60), "{hotkey} did not join");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    chain.set_commitment(1, hotkey, url).await.unwrap();
}

/// Every honest node's saved state is exactly what v0's published history names.
fn assert_on_the_chain_of_v0(dir: &std::path::Path, model: &bistro_model::ModelConfig, all: &str) {
    for (role, hk) in [("validator", "v0"), ("validator", "v1"), ("miner", "m1"), ("miner", "m2")] {
        let (w, hash) = saved_state(&dir.join(format!(".bistro/{role}s/default-{hk}")), model);
        let named =
            (0..w).rev().find_map(|x| accepted_set(&dir.join("s3"), "bucket-v0", x)).map(|s| s["state"].clone());
        assert_eq!(named.as_ref().and_then(|v| v.as_str()), Some(hash.as_str()), "{hk} at window {w}:\n{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_view_and_stall_cannot_fork_real_processes_on_real_s3() {
    let _serial = ONE_NETWORK_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (net, chain, model) = network(&dir, |h| h.blocks_per_window = 4).await;

    // The stall peer: registered, committed, never answers.
    let stall = Endpoint::stall().await.unwrap();
    chain.ensure_registered(1, "stall-peer", 0).await.unwrap();
    chain.set_commitment(1, "stall-peer", &stall.bucket_url("bucket-stall")).await.unwrap();

    let mut children = [
        net.spawn("validator", "v0", Some("v0"), &["--devnet.stake", "2000", "--max-windows", "5"]),
        net.spawn("validator", "v1", Some("v1"), &["--devnet.stake", "1000", "--max-windows", "5"]),
        net.spawn("miner", "m1", Some("m1"), &["--max-windows", "7"]),
        net.spawn("miner", "m2", Some("m2"), &["--max-windows", "7"]),
        net.spawn("miner", "sv", None, &["--bucket", "sv-bucket", "--max-windows", "7"]),
    ];
    // Once the split-view miner has joined, point its commitment at its hostile endpoint,
    // which serves its (honest) slices from its local bucket to the first reader only.
    let split = Endpoint::split_view(dir.join("sv-bucket")).await.unwrap();
    redirect_once_joined(&chain, "default-sv", &split.bucket_url("bucket-sv")).await;
    let (logs, all) = net.finish(&mut children, Duration::from_secs(240)).await;

    // No honest node ever saw a fork.
    for (h, l) in &logs {
        assert!(!l.contains("fork detected") && !l.contains("FORKED"), "{h} forked:\n{all}");
    }
    // The lead published every window's accepted set; the stall cost a bounded timeout and
    // the split-view miner's honest slice reached the lead (it reads first).
    let v0 = &logs[0].1;
    let published = v0.matches("published the accepted set").count();
    assert!(published >= 4, "the lead published {published} accepted sets:\n{all}");
    let mut windows = Vec::new();
    for w in 0..100 {
        if let Some(set) = accepted_set(&dir.join("s3"), "bucket-v0", w) {
            windows.push((w, set));
        }
    }
    let stalled =
        windows.iter().filter(|(_, s)| s.to_string().contains("\"stall-peer\",\"reason\":\"timeout\"")).count();
    assert!(stalled >= 3, "the stall peer was not cut off by the budget: {windows:?}");
    let sv_included = windows.iter().filter(|(_, s)| s["included"].to_string().contains("default-sv")).count();
    assert!(sv_included >= 1, "the split-view miner's slice never reached the lead: {windows:?}");

    // Every honest node's saved state is exactly what the lead's aggregates name.
    assert_on_the_chain_of_v0(&dir, &model, &all);
    // Honest miners trained in every window they saw after joining (none stuck catching up).
    for (h, l) in &logs[2..] {
        let trained = l.matches("slice uploaded").count();
        let caught = l.lines().filter(|x| x.contains("catching up")).count();
        assert!(trained >= 4, "{h} uploaded {trained} slices:\n{all}");
        assert!(caught <= 1, "{h} fell behind {caught} times:\n{all}");
    }
    drop((stall, split));
}

/// Red team 3, F3 and F4 with the real binaries: a validator with the most stake whose
/// bucket endpoint stalls (it leads by stake), and eight miners at the lowest uids whose
/// endpoints stall. The honest validators offer and attest a fallback in the first window,
/// then skip the stalled lead; the stallers cost each collection its budget once and
/// never starve the honest miners after them; every honest node stays on one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalling_lead_and_eight_stalling_miners_cost_a_bounded_wait() {
    let _serial = ONE_NETWORK_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (net, chain, model) = network(&dir, hostile_validator_windows).await;

    // Eight stalling miners first (the lowest uids), then the stalling lead: 2500 stake
    // against the honest validators' 3000, so honest validators hold the majority.
    let stall = Endpoint::stall().await.unwrap();
    for i in 0..8 {
        let hk = format!("stall-{i}");
        chain.ensure_registered(1, &hk, 0).await.unwrap();
        chain.set_commitment(1, &hk, &stall.bucket_url(&format!("bucket-stall-{i}"))).await.unwrap();
    }
    chain.ensure_registered(1, "stalling-lead", 2500).await.unwrap();
    chain.set_commitment(1, "stalling-lead", &stall.bucket_url("bucket-lead")).await.unwrap();

    let mut children = [
        net.spawn("validator", "v0", Some("v0"), &["--devnet.stake", "2000", "--max-windows", "5"]),
        net.spawn("validator", "v1", Some("v1"), &["--devnet.stake", "1000", "--max-windows", "5"]),
        net.spawn("miner", "m1", Some("m1"), &["--max-windows", "7"]),
        net.spawn("miner", "m2", Some("m2"), &["--max-windows", "7"]),
    ];
    let (logs, all) = net.finish(&mut children, Duration::from_secs(300)).await;
    for (h, l) in &logs {
        assert!(!l.contains("fork detected") && !l.contains("FORKED"), "{h} forked:\n{all}");
        // The stalled lead is waited for at most once per node, then skipped.
        assert!(l.matches("skipping this validator").count() <= 1, "{h} skipped more than once:\n{all}");
    }
    // The windows the validators processed got an update (the first one through the
    // fallback), and the honest miners were collected despite the eight stallers before them.
    // Under load v0 can miss the acceptance of its own first fallback (v1's attestation
    // lands after v0's cut-off, with the stalled lead's stake counting against): it then
    // catches up with the attested state in the next window (`catch_up_to_attested`),
    // which costs that window its update; one in five local runs, so 3 of 5 at least.
    let windows: Vec<(u64, serde_json::Value)> =
        (0..100).filter_map(|w| accepted_set(&dir.join("s3"), "bucket-v0", w).map(|s| (w, s))).collect();
    assert!(windows.len() >= 3, "v0 holds {} aggregates:\n{all}", windows.len());
    let with_honest = windows
        .iter()
        .filter(|(_, s)| {
            let inc = s["included"].to_string();
            inc.contains("default-m1") && inc.contains("default-m2")
        })
        .count();
    assert!(with_honest >= 3, "honest miners were included in {with_honest} windows: {windows:?}");
    for (_, s) in &windows {
        // Only the stallers time out (the stalling validator too: its endpoint is listed
        // like a miner's and never answers); no honest miner ever does.
        let honest_timeouts = s["excluded"].as_array().map_or(0, |x| {
            x.iter()
                .filter(|e| e["reason"] == "timeout" && e["hotkey"].as_str().is_some_and(|h| h.starts_with("default-")))
                .count()
        });
        assert_eq!(honest_timeouts, 0, "an honest miner timed out behind the stallers: {s}");
    }
    assert!(logs[2].1.matches("applied the accepted set").count() >= 3, "m1 applied too little:\n{all}");
    // Every honest node's saved state is what v0's published history names.
    assert_on_the_chain_of_v0(&dir, &model, &all);
}

/// Red team 3, F1 with the real binaries: the validator with the most stake (2500 against
/// the honest validators' 3000) serves every aggregate it publishes with one value changed,
/// so peers read a well-formed aggregate that passes the cheap checks and is not what its
/// slices give. The honest validators audit it and dispute it; no honest node applies it;
/// a fallback carries the window, the disputed lead is skipped, and every honest node stays
/// on one chain with the honest miners training.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_serving_a_tampered_aggregate_moves_nothing() {
    let _serial = ONE_NETWORK_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (net, chain, model) = network(&dir, hostile_validator_windows).await;

    let mut children = [
        net.spawn("validator", "v0", Some("v0"), &["--devnet.stake", "2000", "--max-windows", "5"]),
        net.spawn("validator", "v1", Some("v1"), &["--devnet.stake", "1000", "--max-windows", "5"]),
        net.spawn("miner", "m1", Some("m1"), &["--max-windows", "7"]),
        net.spawn("miner", "m2", Some("m2"), &["--max-windows", "7"]),
        net.spawn("validator", "lie", Some("lie"), &["--devnet.stake", "2500", "--max-windows", "7"]),
    ];
    // Once the liar has committed its real bucket, peers read that bucket through the
    // tampering endpoint instead.
    let tamper = Endpoint::tamper(dir.join("s3").join("bucket-lie")).await.unwrap();
    redirect_once_joined(&chain, "default-lie", &tamper.bucket_url("bucket-lie")).await;
    let (logs, all) = net.finish(&mut children, Duration::from_secs(300)).await;
    let all = format!("{all}\n===== lie\n{}", net.log("lie"));
    for (h, l) in &logs {
        assert!(!l.contains("fork detected") && !l.contains("FORKED"), "{h} forked:\n{all}");
        assert!(!l.contains("applied the accepted set of default-lie"), "{h} applied a tampered aggregate:\n{all}");
    }
    // The liar did publish, and the honest validators disputed it.
    let lie_published = (0..100).filter(|w| accepted_set(&dir.join("s3"), "bucket-lie", *w).is_some()).count();
    let disputed = logs[..2].iter().filter(|(_, l)| l.contains("disputed by a stake majority")).count();
    assert!(
        lie_published >= 1 || net.log("lie").contains("published the accepted set"),
        "the liar never published:\n{all}"
    );
    assert_eq!(disputed, 2, "both honest validators skip the disputed lead:\n{all}");
    // Every window the validators processed got an update, through a fallback and then the
    // next lead, with both honest miners in it.
    let windows: Vec<(u64, serde_json::Value)> =
        (0..100).filter_map(|w| accepted_set(&dir.join("s3"), "bucket-v0", w).map(|s| (w, s))).collect();
    assert!(windows.len() >= 4, "v0 holds {} aggregates:\n{all}", windows.len());
    for (h, l) in &logs[2..] {
        assert!(l.matches("slice uploaded").count() >= 4, "{h} trained too little:\n{all}");
        assert!(l.matches("applied the accepted set").count() >= 3, "{h} applied too little:\n{all}");
    }
    assert_on_the_chain_of_v0(&dir, &model, &all);
    drop(tamper);
}

/// Shared verification (protocol v5) with the real binaries on real S3, at live pace:
/// four validators, r = 2, no audits. Each recomputes its share and publishes signed
/// verdicts; the lead reads the others' sheets within its budgets and includes the slice
/// it did not recompute on them (`verified_by` in its aggregates: two miners take one deck
/// of four verifiers, so the lead verifies exactly one of them). Every honest node stays
/// on one chain and both honest miners train every window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_verification_between_real_validators() {
    let _serial = ONE_NETWORK_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (net, _chain, model) = network(&dir, |h| {
        h.blocks_per_window = 5;
        h.verifiers_per_miner = 2;
        h.audit_share = 0.0;
    })
    .await;
    let mut children = [
        net.spawn("validator", "v0", Some("v0"), &["--devnet.stake", "2000", "--max-windows", "5"]),
        net.spawn("validator", "v1", Some("v1"), &["--devnet.stake", "1000", "--max-windows", "5"]),
        net.spawn("miner", "m1", Some("m1"), &["--max-windows", "7"]),
        net.spawn("miner", "m2", Some("m2"), &["--max-windows", "7"]),
        net.spawn("validator", "v2", Some("v2"), &["--devnet.stake", "1000", "--max-windows", "7"]),
        net.spawn("validator", "v3", Some("v3"), &["--devnet.stake", "1000", "--max-windows", "7"]),
    ];
    let (logs, all) = net.finish(&mut children, Duration::from_secs(300)).await;
    let all = format!("{all}\n===== v2\n{}\n===== v3\n{}", net.log("v2"), net.log("v3"));
    for (h, l) in &logs {
        assert!(!l.contains("fork detected") && !l.contains("FORKED"), "{h} forked:\n{all}");
    }
    // Every validator published verdict sheets.
    for v in ["v0", "v1", "v2", "v3"] {
        let sheets = std::fs::read_dir(dir.join("s3").join(format!("bucket-{v}")))
            .map(|d| {
                d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("verdicts-")).count()
            })
            .unwrap_or(0);
        assert!(sheets >= 3, "{v} published {sheets} verdict sheets:\n{all}");
    }
    // The lead included slices on the other validators' verdicts, and both honest miners
    // in every window it decided once they had joined.
    let windows: Vec<(u64, serde_json::Value)> =
        (0..100).filter_map(|w| accepted_set(&dir.join("s3"), "bucket-v0", w).map(|s| (w, s))).collect();
    assert!(windows.len() >= 4, "v0 holds {} aggregates:\n{all}", windows.len());
    let on_verdicts = windows
        .iter()
        .filter(|(_, s)| s["included"].as_array().is_some_and(|i| i.iter().any(|x| x.get("verified_by").is_some())))
        .count();
    assert!(
        on_verdicts + 1 >= windows.len(),
        "{on_verdicts} of {} windows included a slice on verdicts: {windows:?}\n{all}",
        windows.len()
    );
    for (h, l) in &logs[2..] {
        assert!(l.matches("slice uploaded").count() >= 4, "{h} trained too little:\n{all}");
    }
    assert_on_the_chain_of_v0(&dir, &model, &all);
}
