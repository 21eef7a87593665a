//! The real binaries interoperate: two `miner` processes and a `validator` process on one
//! temporary devnet. The validator scores both miners as honest and sets weights on chain.

mod common;

use std::time::{Duration, Instant};

#[test]
fn miner_and_validator_binaries_work_together() {
    let miner = common::miner_binary();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    bistro_train::hparams::write_test_network(dir, |h| h.windows_per_weights = 1).unwrap();
    let validator = common::validator_binary();
    let mut v = common::spawn(&validator, dir, &["--max-windows", "3"], "validator.log");
    std::thread::sleep(Duration::from_millis(500));
    let mut m1 = common::spawn(&miner, dir, &["--wallet.hotkey", "m1", "--max-windows", "5"], "m1.log");
    let mut m2 = common::spawn(&miner, dir, &["--wallet.hotkey", "m2", "--max-windows", "5"], "m2.log");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = v.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(240), "validator did not finish");
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = m1.kill();
    let _ = m2.kill();
    let _ = (m1.wait(), m2.wait());
    let vlog = std::fs::read_to_string(dir.join("validator.log")).unwrap();
    assert!(status.success(), "validator failed:\n{vlog}");
    let scores: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(".bistro/validators/default-validator/scores.json")).unwrap(),
    )
    .unwrap();
    let uids = scores["uids"].as_object().unwrap();
    let hotkeys: Vec<&str> = uids.values().map(|s| s["hotkey"].as_str().unwrap()).collect();
    assert!(hotkeys.contains(&"default-m1") && hotkeys.contains(&"default-m2"), "{scores}\n{vlog}");
    // Both miners scored: at least one honest window each (score 1 folded into the EMA).
    for s in uids.values() {
        assert!(s["ema"].as_f64().unwrap() > 0.4, "{scores}\n{vlog}");
    }
    assert!(vlog.contains("set weights"), "{vlog}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("devnet/state.json")).unwrap()).unwrap();
    assert!(!state["subnets"]["1"]["weights"].as_object().unwrap().is_empty(), "no weights on chain: {state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_commits_weights_on_a_commit_reveal_devnet_and_they_appear_after_the_reveal() {
    use bistro_chain::Chain;
    let miner = common::miner_binary();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    bistro_train::hparams::write_test_network(dir, |h| h.windows_per_weights = 1).unwrap();
    // The devnet is created with commit-reveal on: reveals 4 blocks after each commit.
    let chain =
        bistro_chain::devnet::Devnet::open_with_commit_reveal(&dir.join("devnet"), Duration::from_secs(1), 4).unwrap();
    let validator = common::validator_binary();
    let mut v = common::spawn(&validator, dir, &["--max-windows", "3"], "validator.log");
    let mut m = common::spawn(&miner, dir, &["--wallet.hotkey", "m1", "--max-windows", "6"], "m1.log");
    let start = Instant::now();
    let committed_at = loop {
        let log = std::fs::read_to_string(dir.join("validator.log")).unwrap_or_default();
        if log.contains("committed weights") {
            break chain.block_number().await.unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the validator never committed:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Not on chain at once; on chain once the reveal round is due.
    let early = chain.weights(1).await.unwrap();
    chain.wait_for_block(committed_at + 6, Duration::from_secs(30)).await.unwrap();
    let late = chain.weights(1).await.unwrap();
    let _ = (v.kill(), m.kill());
    let _ = (v.wait(), m.wait());
    let log = std::fs::read_to_string(dir.join("validator.log")).unwrap_or_default();
    assert!(early.is_empty() || early != late, "weights were on chain before any reveal: {early:?}\n{log}");
    assert!(!late.is_empty(), "the committed weights never appeared on chain\n{log}");
    let reveals = chain.reveals(1).unwrap();
    assert!(reveals.iter().any(|r| r.outcome == "applied" && r.hotkey == "default-validator"), "{reveals:?}");
    assert!(log.contains("the chain reveals and applies them at block"), "{log}");
}
