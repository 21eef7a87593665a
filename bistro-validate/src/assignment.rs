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
//! a whole share. No miner can know before it uploads who will check it. The expected lead
//! (the first verifier in stake order), which also audits a share of the others' miners,
//! is dealt fewer ([`lead_quota`]) so that its whole load matches the others'.

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

/// How many miners the expected lead is dealt when it also audits `audit_share` of the
/// miners outside its share: the number that makes its whole load (share plus audits) equal
/// to every other verifier's share, `s = N (r/(V-1) - a) / (1 - a + 1/(V-1))`, rounded and
/// clamped to `0..=ceil(N r / V)`. With `a = 0` it is the plain share `N r / V`.
pub fn lead_quota(miners: usize, verifiers: usize, r: usize, audit_share: f64) -> usize {
    let (n, v) = (miners as f64, verifiers as f64);
    let r = r.min(verifiers) as f64;
    let fair = (n * r / v.max(1.0)).ceil();
    if verifiers < 2 {
        return fair as usize;
    }
    let a = audit_share.clamp(0.0, 1.0);
    let s = n * (r / (v - 1.0) - a) / (1.0 - a + 1.0 / (v - 1.0));
    s.round().clamp(0.0, fair) as usize
}

impl Assignment {
    /// Draw the assignment of `miners` to `r` of `verifiers` each from `randomness`, every
    /// verifier dealt a fair share.
    pub fn draw(randomness: &[u8], miners: &[String], verifiers: &[String], r: usize) -> Self {
        Self::draw_balanced(randomness, miners, verifiers, r, None)
    }

    /// [`Assignment::draw`] with `lead = Some((hotkey, quota))`: that verifier is dealt at
    /// most `quota` miners ([`lead_quota`]), the others share the rest. The expected lead
    /// audits a private sample of the others' miners on top of its share; dealing it less
    /// keeps its whole load level with the others' (at 240 miners and 16 validators the lead
    /// otherwise recomputed 56 where the others did 30).
    pub fn draw_balanced(
        randomness: &[u8],
        miners: &[String],
        verifiers: &[String],
        r: usize,
        lead: Option<(&str, usize)>,
    ) -> Self {
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
        let light = lead.and_then(|(hk, q)| v.iter().position(|x| x == hk).map(|i| (i, q)));
        // The light verifier leaves the decks once dealt its quota, while enough others
        // remain to give every miner r distinct verifiers.
        let mut dealt_light = 0usize;
        let can_drop = v.len() > r;
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
                if let Some((l, quota)) = light
                    && x == l
                    && can_drop
                    && dealt_light >= quota
                {
                    continue;
                }
                if chosen.contains(&x) {
                    aside.push(x)
                } else {
                    if light.is_some_and(|(l, _)| l == x) {
                        dealt_light += 1;
                    }
                    chosen.push(x)
                }
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
    fn the_expected_lead_is_dealt_its_quota_and_the_load_levels() {
        // Share plus audits of the rest equals every other verifier's share.
        for (n, v, r, a) in
            [(240usize, 16usize, 2usize, 0.125f64), (11, 8, 2, 0.125), (64, 16, 2, 0.125), (30, 8, 2, 0.0)]
        {
            let q = lead_quota(n, v, r, a);
            let lead_load = q as f64 + a * (n - q) as f64;
            let other = (n * r - q) as f64 / (v - 1) as f64;
            assert!((lead_load - other).abs() <= 1.0, "{n} {v} {r} {a}: quota {q}, lead {lead_load}, others {other}");
            let a_ = Assignment::draw_balanced(&[9; 32], &names("m", n), &names("v", v), r, Some(("v003", q)));
            assert!(a_.share_of("v003").len() <= q, "{n} {v}: {} > {q}", a_.share_of("v003").len());
            let rest = n * r - a_.share_of("v003").len();
            for x in names("v", v).iter().filter(|x| *x != "v003") {
                let share = a_.share_of(x).len();
                assert!(share + 1 >= rest / (v - 1) && share <= rest.div_ceil(v - 1) + 1, "{n} {v}: {x} has {share}");
            }
            for m in names("m", n) {
                let vs = a_.verifiers_of(&m);
                assert_eq!(vs.len(), r, "{m}");
                assert_ne!(vs[0], vs[1]);
            }
        }
        assert_eq!(lead_quota(240, 16, 2, 0.125), 2);
        assert_eq!(lead_quota(30, 8, 2, 0.0), 8, "without audits the lead takes a fair share");
        // Too few verifiers to leave the lead out: every miner still gets r.
        let a = Assignment::draw_balanced(&[3; 32], &names("m", 10), &names("v", 2), 2, Some(("v000", 0)));
        assert!(names("m", 10).iter().all(|m| a.verifiers_of(m).len() == 2));
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
