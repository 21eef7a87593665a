//! Shared verification's public draw: which validators recompute which miners of a window.
//!
//! After the upload deadline, the hash of the window's *assignment block* (the first block
//! at or after the deadline, [`assignment_block`]) seeds a draw every validator makes
//! alike. The miners (registered, no permit, a committed bucket) are sorted and shuffled;
//! the verifiers (a permit and a committed bucket at the window's seed block) are dealt
//! from a deck of freshly shuffled copies of their list: each miner in turn takes the next
//! `r` distinct verifiers off the deck (one already taken for this miner waits for the
//! next). Every miner gets `min(r, V)` distinct verifiers, every verifier about `N·r/V`
//! miners (a fixed share: within one of each other but for the rare set-aside), and who
//! verifies with whom changes from miner to miner, so no pair of colluding verifiers holds
//! a whole share. No miner can know before it uploads who will check it.

use std::collections::BTreeMap;

use bistro_train::data::pages::uniform_below;
use bistro_train::hparams::HParams;
use bistro_train::protocol::tags;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use sha2::{Digest, Sha256};

/// The block whose hash seeds window `window`'s assignment: the first block at or after the
/// upload deadline (`upload_grace_secs` after the next window's first block), for blocks of
/// `block_ms`. Its hash does not exist before the deadline.
pub fn assignment_block(h: &HParams, window: u64, block_ms: u64) -> u64 {
    h.first_block(window + 1) + (h.upload_grace_secs * 1000).div_ceil(block_ms.max(1))
}

/// A window's assignment of miners to verifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// Hex of the randomness it was drawn from (named in every verdict sheet).
    pub randomness: String,
    by_miner: BTreeMap<String, Vec<String>>,
}

impl Assignment {
    /// Draw the assignment of `miners` to `r` of `verifiers` each from `randomness`.
    pub fn draw(randomness: &[u8], miners: &[String], verifiers: &[String], r: usize) -> Self {
        let mut h = Sha256::new();
        h.update(tags::ASSIGNMENT);
        h.update((randomness.len() as u64).to_le_bytes());
        h.update(randomness);
        let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
        let mut m: Vec<String> = miners.to_vec();
        m.sort();
        m.dedup();
        let mut v: Vec<String> = verifiers.to_vec();
        v.sort();
        v.dedup();
        shuffle(&mut m, &mut rng);
        let r = r.min(v.len());
        let mut deck: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
        let mut by_miner = BTreeMap::new();
        for miner in m {
            let mut chosen: Vec<usize> = Vec::with_capacity(r);
            let mut aside = Vec::new();
            while chosen.len() < r {
                if deck.is_empty() {
                    let mut copy: Vec<usize> = (0..v.len()).collect();
                    shuffle(&mut copy, &mut rng);
                    deck.extend(copy);
                }
                let Some(x) = deck.pop_front() else { break };
                if chosen.contains(&x) { aside.push(x) } else { chosen.push(x) }
            }
            for x in aside.into_iter().rev() {
                deck.push_front(x);
            }
            by_miner.insert(miner, chosen.into_iter().map(|i| v[i].clone()).collect());
        }
        Assignment { randomness: hex::encode(randomness), by_miner }
    }

    /// The verifiers of `miner` (empty for a miner not in the draw).
    pub fn verifiers_of(&self, miner: &str) -> &[String] {
        self.by_miner.get(miner).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether `verifier` is one of `miner`'s.
    pub fn assigned(&self, miner: &str, verifier: &str) -> bool {
        self.verifiers_of(miner).iter().any(|v| v == verifier)
    }

    /// The miners assigned to `verifier`, sorted.
    pub fn share_of(&self, verifier: &str) -> Vec<String> {
        self.by_miner.iter().filter(|(_, vs)| vs.iter().any(|v| v == verifier)).map(|(m, _)| m.clone()).collect()
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut ChaCha20Rng) {
    let n = v.len();
    for i in 0..n.saturating_sub(1) {
        let j = i + uniform_below(rng, (n - i) as u64) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{p}{i:03}")).collect()
    }

    #[test]
    fn every_miner_gets_r_distinct_verifiers_and_every_verifier_a_fixed_share() {
        for (n, v, r) in [(37, 8, 2), (256, 16, 2), (5, 8, 2), (10, 3, 2), (9, 1, 2), (12, 4, 1)] {
            let a = Assignment::draw(&[7; 32], &names("m", n), &names("v", v), r);
            for m in names("m", n) {
                let vs = a.verifiers_of(&m);
                assert_eq!(vs.len(), r.min(v), "{m}");
                let distinct: std::collections::HashSet<_> = vs.iter().collect();
                assert_eq!(distinct.len(), vs.len(), "{m}: {vs:?}");
            }
            let shares: Vec<usize> = names("v", v).iter().map(|x| a.share_of(x).len()).collect();
            let total = n * r.min(v);
            assert_eq!(shares.iter().sum::<usize>(), total);
            let (lo, hi) = (total / v, total.div_ceil(v));
            let (min, max) = (*shares.iter().min().unwrap(), *shares.iter().max().unwrap());
            assert!(min + 1 >= lo && max <= hi + 1, "{n} miners, {v} verifiers, r {r}: {shares:?}");
        }
    }

    #[test]
    fn the_draw_depends_on_the_randomness_only_not_on_the_order_given() {
        let (m, v) = (names("m", 40), names("v", 8));
        let a = Assignment::draw(&[1; 32], &m, &v, 2);
        let mut m2 = m.clone();
        m2.reverse();
        let mut v2 = v.clone();
        v2.rotate_left(3);
        assert_eq!(a, Assignment::draw(&[1; 32], &m2, &v2, 2));
        let b = Assignment::draw(&[2; 32], &m, &v, 2);
        assert_ne!(a.by_miner, b.by_miner);
        // Over many draws each verifier meets each miner about r/V of the time.
        let mut hits = 0;
        for s in 0..400u32 {
            let d = Assignment::draw(&s.to_le_bytes(), &m, &v, 2);
            hits += d.assigned("m000", "v003") as usize;
        }
        assert!((70..=130).contains(&hits), "{hits} of 400 (expected 100)");
    }

    #[test]
    fn partners_change_from_miner_to_miner() {
        // With 8 verifiers and r = 2, a verifier's share is not checked by one fixed partner.
        let a = Assignment::draw(&[3; 32], &names("m", 40), &names("v", 8), 2);
        for x in names("v", 8) {
            let partners: std::collections::HashSet<&String> =
                a.share_of(&x).iter().flat_map(|m| a.verifiers_of(m)).filter(|p| **p != x).collect();
            assert!(partners.len() >= 3, "{x}'s share is checked by {partners:?} only");
        }
    }

    #[test]
    fn the_assignment_block_comes_at_or_after_the_deadline() {
        let h = HParams::default();
        let b = assignment_block(&h, 10, 1000);
        assert_eq!(b, h.first_block(11) + h.upload_grace_secs);
        assert_eq!(assignment_block(&h, 10, 1500), h.first_block(11) + (h.upload_grace_secs * 1000).div_ceil(1500));
    }
}
