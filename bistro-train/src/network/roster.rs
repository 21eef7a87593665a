//! The network as every node reads it for one window: the registry (uids, hotkeys, stake,
//! permits) and the committed bucket URLs at the window's **seed block** (the first block of
//! the next window). Every role reads a window's lead, publishers and miners from here, so
//! a stake move or a new commitment while the window is being decided gives every node the
//! same answer (red team 3, F11 and Q1), and a node reads the chain for it once per window,
//! not once per role.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bistro_chain::{Chain, ChainError, Metagraph};

/// The registry and commitments of one window, as of its seed block.
#[derive(Clone, Debug, PartialEq)]
pub struct Roster {
    /// The window.
    pub window: u64,
    /// The block read: the window's seed block, or the newest block while the seed block
    /// does not exist yet (then the roster is provisional and not kept).
    pub block: u64,
    /// Whether `block` is the seed block (every node reads the same).
    pub settled: bool,
    /// The registry at `block`.
    pub metagraph: Metagraph,
    /// Committed bucket URLs at `block`, by uid.
    pub commitments: HashMap<u16, String>,
}

impl Roster {
    /// Read `window`'s roster from `chain`: at `seed_block` when it exists, else at the
    /// newest block (provisional).
    pub async fn read(chain: &dyn Chain, netuid: u16, window: u64, seed_block: u64) -> Result<Self, ChainError> {
        let newest = chain.block_number().await?;
        let (block, settled) = if seed_block <= newest { (seed_block, true) } else { (newest, false) };
        let metagraph = chain.metagraph_at(netuid, block).await?;
        let commitments = chain.commitments_at(&metagraph, block).await?;
        Ok(Roster { window, block, settled, metagraph, commitments })
    }

    /// The committed URL of `hotkey`, if it is registered and committed.
    pub fn commitment_of(&self, hotkey: &str) -> Option<&str> {
        self.metagraph.uid_of(hotkey).and_then(|uid| self.commitments.get(&uid)).map(String::as_str)
    }
}

/// The settled rosters of the last windows read (a node reads the current window's and,
/// now and then, the previous one's), shared by a node's clones of its context.
#[derive(Clone, Debug, Default)]
pub struct Rosters {
    kept: Arc<Mutex<Vec<Arc<Roster>>>>,
}

/// Rosters kept.
const KEPT: usize = 2;

impl Rosters {
    /// The kept roster of `window`, if any.
    pub fn get(&self, window: u64) -> Option<Arc<Roster>> {
        self.kept.lock().ok()?.iter().find(|r| r.window == window).cloned()
    }

    /// Keep `roster` when it is settled (a provisional one is read again next time).
    pub fn keep(&self, roster: &Arc<Roster>) {
        if roster.settled
            && let Ok(mut k) = self.kept.lock()
        {
            k.retain(|r| r.window != roster.window);
            k.push(roster.clone());
            k.sort_by_key(|r| r.window);
            let excess = k.len().saturating_sub(KEPT);
            k.drain(..excess);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bistro_chain::devnet::Devnet;
    use std::time::Duration;

    #[tokio::test]
    async fn a_window_read_before_its_seed_block_is_provisional_and_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = Devnet::open(dir.path(), Duration::from_millis(50)).unwrap();
        d.ensure_registered(1, "v", 10).await.unwrap();
        d.set_commitment(1, "v", "s3://v").await.unwrap();
        let now = d.block_number().await.unwrap();
        let early = Arc::new(Roster::read(&d, 1, 5, now + 1000).await.unwrap());
        assert!(!early.settled);
        let rosters = Rosters::default();
        rosters.keep(&early);
        assert!(rosters.get(5).is_none());
        d.wait_for_block(now + 2, Duration::from_secs(5)).await.unwrap();
        let r = Arc::new(Roster::read(&d, 1, 6, now + 2).await.unwrap());
        assert!(r.settled && r.block == now + 2);
        assert_eq!(r.commitment_of("v"), Some("s3://v"));
        rosters.keep(&r);
        assert_eq!(rosters.get(6).as_deref(), Some(&*r));
        assert!(rosters.get(7).is_none());
        // The last two windows are kept.
        for w in [7, 8] {
            rosters.keep(&Arc::new(Roster { window: w, ..(*r).clone() }));
        }
        assert!(rosters.get(6).is_none() && rosters.get(7).is_some() && rosters.get(8).is_some());
    }
}
