//! Commit-reveal weights: the timelock encryption against a real drand quicknet pulse, and
//! the devnet's commit-reveal path end to end (commit, reveal with the real decryption
//! code, weights on chain; wrong rounds, tampered commits and foreign payloads rejected).

use std::time::Duration;

use bistro_chain::commit_reveal::{self, WeightsTlockPayload};
use bistro_chain::devnet::Devnet;
use bistro_chain::{Chain, WeightsMode, WeightsSubmission, submit_weights};
use parity_scale_codec::{Decode, Encode};

/// Quicknet's round 1000 (from subtensor's drand pallet tests): a real beacon signature.
const ROUND_1000_SIGNATURE: &str =
    "b44679b9a59af2ec876b1a6b1ad52ea9b1615fc3982b19576350f93447cb1125e342b73a8dd2bacbe47e4b6b63ed5e39";
/// A well-formed G1 point that is not round 1000's signature (the pallet's "bad pulse").
const OTHER_SIGNATURE: &str =
    "b0a8b04e009cf72534321aca0f50048da596a3feec1172a0244d9a4a623a3123d0402da79854d4c705e94bc73224c341";

#[test]
fn quicknet_known_answer_round_1000() {
    let payload =
        WeightsTlockPayload { hotkey: vec![0xd4; 32], uids: vec![0, 1, 7], values: vec![65535, 12, 0], version_key: 2 };
    let pk = hex::decode(commit_reveal::QUICKNET_PUBLIC_KEY).unwrap();
    let commit = commit_reveal::commit_payload(&payload, 1000, &pk).unwrap();
    assert!(commit.len() <= commit_reveal::MAX_COMMIT_BYTES);
    let plain = commit_reveal::decrypt(&commit, &hex::decode(ROUND_1000_SIGNATURE).unwrap()).unwrap();
    assert_eq!(plain, payload.encode(), "byte for byte");
    assert_eq!(WeightsTlockPayload::decode(&mut &plain[..]).unwrap(), payload);
    // Another signature does not open it; neither does round 1000's signature open a commit to 1001.
    assert!(commit_reveal::decrypt(&commit, &hex::decode(OTHER_SIGNATURE).unwrap()).is_err());
    let later = commit_reveal::commit_payload(&payload, 1001, &pk).unwrap();
    assert!(commit_reveal::decrypt(&later, &hex::decode(ROUND_1000_SIGNATURE).unwrap()).is_err());
}

#[tokio::test]
async fn devnet_commit_reveal_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = Devnet::open_with_commit_reveal(dir.path(), Duration::from_millis(100), 4).unwrap();
    d.ensure_registered(1, "miner", 0).await.unwrap();
    d.ensure_registered(1, "val", 1000).await.unwrap();
    d.ensure_registered(1, "other-val", 500).await.unwrap();
    // set_weights is refused, as on subtensor.
    let e = d.set_weights(1, "val", &[0], &[65535], 1).await.unwrap_err().to_string();
    assert!(e.contains("CommitRevealEnabled"), "{e}");
    // Weights that do not pair up are refused before anything is committed (the chain would
    // only find out at the reveal, where nobody sees the error).
    let e = submit_weights(&d, 1, "val", &[0, 1], &[65535], 1).await.unwrap_err().to_string();
    assert!(e.contains("2 uids but 1 weights"), "{e}");
    // The validator's path: commit, nothing on chain yet, weights after the reveal.
    let WeightsMode::CommitReveal(params) = d.weights_mode(1).await.unwrap() else { panic!("commit-reveal is on") };
    let sub = submit_weights(&d, 1, "val", &[0], &[65535], 1).await.unwrap();
    let WeightsSubmission::Committed { reveal_block, .. } = sub else { panic!("{sub:?}") };
    assert!(reveal_block >= params.reveal_block);
    assert!(d.weights(1).await.unwrap().is_empty(), "weights visible before the reveal");
    // Hostile or broken commits, each due at the same time.
    let round = d.block_number().await.unwrap() + 4;
    let pk = params.beacon_public_key.clone();
    let payload =
        |hotkey: &str| WeightsTlockPayload { hotkey: hotkey.into(), uids: vec![0], values: vec![9], version_key: 1 };
    let wrong_round = commit_reveal::commit_payload(&payload("other-val"), round + 1, &pk).unwrap();
    d.commit_timelocked_weights(1, "other-val", &wrong_round, round, 4).await.unwrap();
    let mut tampered = commit_reveal::commit_payload(&payload("other-val"), round, &pk).unwrap();
    let n = tampered.len();
    tampered[n / 2] ^= 1;
    d.commit_timelocked_weights(1, "other-val", &tampered, round, 4).await.unwrap();
    let foreign = commit_reveal::commit_payload(&payload("val"), round, &pk).unwrap();
    d.commit_timelocked_weights(1, "other-val", &foreign, round, 4).await.unwrap();
    assert!(d.commit_timelocked_weights(1, "other-val", &foreign, round, 3).await.is_err(), "wrong version accepted");
    assert!(d.commit_timelocked_weights(1, "other-val", &foreign, 0, 4).await.is_err(), "past round accepted");
    d.wait_for_block(reveal_block.max(round) + 1, Duration::from_secs(10)).await.unwrap();
    let weights = d.weights(1).await.unwrap();
    assert_eq!(weights, vec![(1, vec![(0, 65535)])], "only the honest commit is applied");
    let reveals = d.reveals(1).unwrap();
    assert_eq!(reveals.iter().filter(|r| r.outcome == "applied").count(), 1, "{reveals:?}");
    let rejected: Vec<&str> = reveals.iter().filter(|r| r.hotkey == "other-val").map(|r| r.outcome.as_str()).collect();
    assert_eq!(rejected.len(), 3, "{reveals:?}");
    assert!(rejected.iter().filter(|o| o.contains("decryption failed")).count() == 2, "{rejected:?}");
    assert!(rejected.iter().any(|o| o.contains("another hotkey")), "{rejected:?}");
    assert!(d.metagraph(1).await.unwrap().neuron(0).unwrap().incentive > 0.99);
}
