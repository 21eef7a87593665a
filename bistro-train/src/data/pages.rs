//! Page assignment: which rows a hotkey trains on in a window.
//!
//! A *page* is `rows_per_page` consecutive rows of one shard. `pages(network, hotkey,
//! window, n)` is the protocol's data assignment, computed identically by the miner and
//! every validator:
//!
//! 1. key = `sha256("bistro/pages/v1" || len(network) || network || len(hotkey) || hotkey || window)`,
//!    lengths and the window as little-endian `u64`, strings as UTF-8;
//! 2. a ChaCha20 generator (`rand_chacha` 0.9, stream 0) seeded with that key;
//! 3. every valid page start (shard `s`, row `r` with `r + rows_per_page <= rows(s)`) is
//!    numbered in shard order; each of the `n` pages is the start numbered
//!    `uniform_below(total)`, drawn with [`uniform_below`] (Lemire's method with rejection on
//!    `next_u64`), so pages are uniform over the whole dataset. Pages may repeat.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One page: `rows_per_page` rows of shard `shard` starting at `row_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Page {
    /// Index of the shard in the dataset's order.
    pub shard: usize,
    /// First row of the page.
    pub row_offset: u64,
}

impl std::fmt::Display for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.shard, self.row_offset)
    }
}

/// A uniform integer in `0..n` (`n > 0`) from a 64-bit generator, without bias:
/// Lemire's widening multiply, rejecting when the low word is below `(2^64 - n) mod n`.
pub fn uniform_below(rng: &mut impl RngCore, n: u64) -> u64 {
    debug_assert!(n > 0);
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = (rng.next_u64() as u128) * (n as u128);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// The 32-byte PRNG key for `(domain, network, hotkey, window)`.
pub fn protocol_key(domain: &[u8], network: &str, hotkey: &str, window: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(domain);
    h.update((network.len() as u64).to_le_bytes());
    h.update(network.as_bytes());
    h.update((hotkey.len() as u64).to_le_bytes());
    h.update(hotkey.as_bytes());
    h.update(window.to_le_bytes());
    h.finalize().into()
}

/// Draw `n` pages from a dataset whose shards have `page_starts[s]` valid start rows each.
pub fn draw_pages(page_starts: &[u64], network: &str, hotkey: &str, window: u64, n: usize) -> Vec<Page> {
    let total: u64 = page_starts.iter().sum();
    if total == 0 {
        return Vec::new();
    }
    let mut rng = ChaCha20Rng::from_seed(protocol_key(crate::protocol::tags::PAGES, network, hotkey, window));
    (0..n)
        .map(|_| {
            let mut x = uniform_below(&mut rng, total);
            let mut shard = 0;
            while x >= page_starts[shard] {
                x -= page_starts[shard];
                shard += 1;
            }
            Page { shard, row_offset: x }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_inputs_same_pages_and_inputs_matter() {
        let starts = [100, 50, 1000];
        let a = draw_pages(&starts, "devnet", "hk1", 7, 16);
        assert_eq!(a, draw_pages(&starts, "devnet", "hk1", 7, 16));
        assert_ne!(a, draw_pages(&starts, "devnet", "hk2", 7, 16));
        assert_ne!(a, draw_pages(&starts, "devnet", "hk1", 8, 16));
        assert_ne!(a, draw_pages(&starts, "finney", "hk1", 7, 16));
        // Prefix property: asking for more pages extends the list.
        assert_eq!(&draw_pages(&starts, "devnet", "hk1", 7, 32)[..16], &a[..]);
        for p in &a {
            assert!(p.row_offset < starts[p.shard]);
        }
    }

    #[test]
    fn pinned_vector() {
        // Changing the recipe changes which data every node trains on: pin it.
        // The key is checked against an independent sha256 (Python hashlib).
        let key = protocol_key(crate::protocol::tags::PAGES, "devnet", "alice", 0);
        assert_eq!(hex::encode(key), "21185e98a33887de6c7a085495b1c2c8606f46bfc2c294033d22c7a3e42036e4");
        let p = draw_pages(&[1000, 1000], "devnet", "alice", 0, 3);
        let at = |shard, row_offset| Page { shard, row_offset };
        assert_eq!(p, vec![at(0, 195), at(0, 150), at(0, 988)]);
    }

    #[test]
    fn coverage_is_roughly_uniform() {
        // Chi-square over 20 equal bins of the global page index, fixed seeds.
        let starts = [3000u64, 1000, 6000];
        let total: u64 = starts.iter().sum();
        let bins = 20usize;
        let mut counts = vec![0f64; bins];
        let mut draws = 0f64;
        for w in 0..400u64 {
            for p in draw_pages(&starts, "devnet", "hk", w, 50) {
                let global = starts[..p.shard].iter().sum::<u64>() + p.row_offset;
                counts[(global * bins as u64 / total) as usize] += 1.0;
                draws += 1.0;
            }
        }
        let expected = draws / bins as f64;
        let chi2: f64 = counts.iter().map(|c| (c - expected).powi(2) / expected).sum();
        // 19 degrees of freedom: the 99.9% quantile is 43.8.
        assert!(chi2 < 43.8, "chi-square {chi2} over bins {counts:?}");
    }

    #[test]
    fn uniform_below_is_in_range() {
        let mut rng = ChaCha20Rng::from_seed([1; 32]);
        for n in [1u64, 2, 3, 7, 1 << 40, u64::MAX] {
            for _ in 0..100 {
                assert!(uniform_below(&mut rng, n) < n);
            }
        }
    }
}
