//! One suite of `Chain` properties, run against every implementation (the devnet in
//! `devnet.rs`, the subtensor client over recorded responses in `subtensor_golden.rs`), as
//! object_store runs one suite against every store.
#![allow(dead_code)]

use bistro_chain::{Chain, ChainError, WeightsMode};

/// What the suite needs to know about the chain under test: a subnet with `registered`
/// (registered, holding a validator permit).
pub(crate) async fn run(chain: &dyn Chain, netuid: u16, registered: &str) {
    assert!(!chain.describe().is_empty());
    assert!(chain.block_time().as_millis() > 0);
    // Blocks: the newest has a hash; one far in the future is FutureBlock, never a guess.
    let b = chain.block_number().await.expect("block number");
    chain.block_hash(b).await.expect("hash of the newest block");
    assert!(matches!(chain.block_hash(b + 1_000_000).await, Err(ChainError::FutureBlock(_))));
    // The metagraph: uids unique and sorted, hotkeys unique, lookups consistent.
    let mg = chain.metagraph(netuid).await.expect("metagraph");
    assert_eq!(mg.netuid, netuid);
    assert!(mg.neurons.windows(2).all(|w| w[0].uid < w[1].uid), "neurons sorted by uid");
    let mut hotkeys: Vec<&str> = mg.neurons.iter().map(|n| n.hotkey.as_str()).collect();
    hotkeys.sort_unstable();
    hotkeys.dedup();
    assert_eq!(hotkeys.len(), mg.neurons.len(), "hotkeys unique");
    let uid = mg.uid_of(registered).expect("the registered hotkey is in the metagraph");
    assert_eq!(mg.neuron(uid).map(|n| n.hotkey.as_str()), Some(registered));
    assert!(mg.neurons.iter().all(|n| (0.0..=1.0).contains(&n.incentive)), "incentive in [0, 1]");
    // The registry at an existing block is a metagraph too; at a future block it is an
    // error, never the newest registry passed off as that block's.
    let at = chain.metagraph_at(netuid, b).await.expect("metagraph at a block");
    assert_eq!(at.netuid, netuid);
    assert!(at.neurons.windows(2).all(|w| w[0].uid < w[1].uid), "neurons sorted by uid");
    assert!(matches!(chain.metagraph_at(netuid, b + 1_000_000).await, Err(ChainError::FutureBlock(_))));
    let one = chain.commitment_at(netuid, registered, b).await.expect("commitment read at a block");
    let all = chain.commitments_at(&at, b).await.expect("commitments read together");
    assert_eq!(at.uid_of(registered).and_then(|u| all.get(&u)), one.as_ref(), "read together as one by one");
    assert!(matches!(chain.commitment_at(netuid, registered, b + 1_000_000).await, Err(ChainError::FutureBlock(_))));
    // Registration is idempotent and agrees with the metagraph.
    assert_eq!(chain.ensure_registered(netuid, registered, 0).await.expect("registered"), uid);
    // A commitment read never fails for a registered hotkey.
    chain.commitment(netuid, registered).await.expect("commitment read");
    // How the subnet takes weights is known, and a commit-reveal subnet says to what.
    if let WeightsMode::CommitReveal(p) = chain.weights_mode(netuid).await.expect("weights mode") {
        assert!(p.reveal_block > b, "the reveal lies ahead");
        assert!(!p.beacon_public_key.is_empty());
    }
    assert!(!chain.account_bytes(registered).expect("account bytes").is_empty());
}
