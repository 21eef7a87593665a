//! The devnet across processes: two handles (as two processes would) see the same blocks,
//! registrations, commitments and weights; a torn or corrupt state file is a clear error.

mod conformance;

use std::time::Duration;

use bistro_chain::devnet::Devnet;
use bistro_chain::{Chain, ChainError};

#[tokio::test]
async fn two_handles_share_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let a = Devnet::open(dir.path(), Duration::from_millis(100)).unwrap();
    let b = Devnet::open(dir.path(), Duration::from_secs(99)).unwrap(); // keeps the existing block time
    assert_eq!(b.block_time(), Duration::from_millis(100));
    let n = a.wait_for_block(3, Duration::from_secs(5)).await.unwrap();
    assert_eq!(a.block_hash(n).await.unwrap(), b.block_hash(n).await.unwrap());
    let nb = b.block_number().await.unwrap();
    assert!(nb >= n && nb <= n + 2);
    a.ensure_registered(7, "miner-1", 0).await.unwrap();
    b.ensure_registered(7, "validator-1", 100).await.unwrap();
    b.set_commitment(7, "miner-1", "file:///x").await.unwrap();
    assert_eq!(a.commitment(7, "miner-1").await.unwrap().as_deref(), Some("file:///x"));
    let m = a.metagraph(7).await.unwrap();
    assert_eq!(m.uid_of("validator-1"), Some(1));
    b.set_weights(7, "validator-1", &[0], &[100], 1).await.unwrap();
    assert_eq!(a.weights(7).await.unwrap(), vec![(1, vec![(0, 100)])]);
}

#[test]
fn concurrent_registrations_from_many_threads_get_distinct_uids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    Devnet::open(&path, Duration::from_millis(100)).unwrap();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let p = path.clone();
            std::thread::spawn(move || {
                let d = Devnet::open(&p, Duration::from_millis(100)).unwrap();
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(d.ensure_registered(1, &format!("hk{i}"), 0)).unwrap()
            })
        })
        .collect();
    let mut uids: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    uids.sort();
    assert_eq!(uids, (0..16).collect::<Vec<u16>>());
}

#[tokio::test]
async fn corrupt_state_is_a_clear_error_and_leftovers_are_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let d = Devnet::open(dir.path(), Duration::from_millis(100)).unwrap();
    d.ensure_registered(1, "a", 0).await.unwrap();
    // A killed writer leaves at most a temporary file next to the state: still readable.
    std::fs::write(dir.path().join("state.json.tmp-999999"), b"{partial").unwrap();
    assert_eq!(d.metagraph(1).await.unwrap().neurons.len(), 1);
    std::fs::write(dir.path().join("state.json"), b"{\"version\": 1, \"genesis").unwrap();
    let e = Devnet::open(dir.path(), Duration::from_millis(100)).unwrap_err();
    assert!(matches!(e, ChainError::State { .. }), "{e}");
    assert!(e.to_string().contains("corrupt devnet state"), "{e}");
    assert!(d.metagraph(1).await.is_err());
}

#[tokio::test]
async fn new_blocks_streams_every_block_once_in_order() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let d = Devnet::open(dir.path(), Duration::from_millis(50)).unwrap();
    let blocks: Vec<u64> = d.new_blocks().take(4).map(|b| b.unwrap()).collect().await;
    assert_eq!(blocks.len(), 4);
    assert!(blocks.windows(2).all(|w| w[1] == w[0] + 1), "{blocks:?}");
}

#[tokio::test]
async fn devnet_passes_the_chain_conformance_suite() {
    for commit_reveal in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let d = if commit_reveal {
            Devnet::open_with_commit_reveal(dir.path(), Duration::from_millis(50), 3).unwrap()
        } else {
            Devnet::open(dir.path(), Duration::from_millis(50)).unwrap()
        };
        d.ensure_registered(1, "miner", 0).await.unwrap();
        d.ensure_registered(1, "val", 10).await.unwrap();
        conformance::run(&d, 1, "val").await;
    }
}

/// Red team 3, F11 (and Q1): the lead was read from the newest metagraph at different
/// moments by different roles, so a stake move in between gave two leads or none. The
/// registry read at a block never changes once that block exists: a change made during
/// block `b` takes effect at `b + 1`, as a transaction would.
#[tokio::test]
async fn f11_the_registry_at_a_block_never_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Devnet::open(dir.path(), Duration::from_millis(100)).unwrap();
    d.ensure_registered(1, "validator-a", 2000).await.unwrap();
    d.ensure_registered(1, "validator-b", 1000).await.unwrap();
    d.set_commitment(1, "validator-a", "s3://a").await.unwrap();
    let b = d.block_number().await.unwrap() + 1;
    d.wait_for_block(b, Duration::from_secs(5)).await.unwrap();
    let before = d.metagraph_at(1, b).await.unwrap();
    // The stake moves and the commitments change after block b exists.
    d.ensure_registered(1, "validator-b", 3000).await.unwrap();
    d.set_commitment(1, "validator-a", "s3://a-moved").await.unwrap();
    d.set_commitment(1, "validator-b", "s3://b").await.unwrap();
    let now = d.block_number().await.unwrap();
    assert_eq!(d.metagraph_at(1, b).await.unwrap(), before, "block {b} read again after the changes");
    let stake = |m: &bistro_chain::Metagraph, h: &str| m.neurons.iter().find(|n| n.hotkey == h).unwrap().stake;
    assert_eq!((stake(&before, "validator-a"), stake(&before, "validator-b")), (2000, 1000));
    assert_eq!(d.commitment_at(1, "validator-a", b).await.unwrap().as_deref(), Some("s3://a"));
    assert_eq!(d.commitment_at(1, "validator-b", b).await.unwrap(), None);
    let together = d.commitments_at(&before, b).await.unwrap();
    assert_eq!(together.values().collect::<Vec<_>>(), ["s3://a"], "{together:?}");
    // From the next block on, the changes are there.
    d.wait_for_block(now + 1, Duration::from_secs(5)).await.unwrap();
    let after = d.metagraph_at(1, now + 1).await.unwrap();
    assert_eq!(stake(&after, "validator-b"), 3000);
    assert_eq!(d.commitment_at(1, "validator-b", now + 1).await.unwrap().as_deref(), Some("s3://b"));
    assert_eq!(d.commitment(1, "validator-a").await.unwrap().as_deref(), Some("s3://a-moved"));
    // Before the first registration the subnet was empty.
    assert!(d.metagraph_at(1, 0).await.unwrap().neurons.is_empty());
}
