//! Index selection: which coordinates of each parameter a window's slice carries.
//!
//! Recipe (protocol version 1), from a window's slice seed (the 32-byte hash of the first
//! block of the next window):
//!
//! 1. key = `sha256("bistro/slice-indices/v1" || seed)`; one ChaCha20 generator
//!    (`rand_chacha` 0.9, stream 0) with that key serves every parameter in canonical order;
//! 2. for a parameter of `n` elements, `k = max(1, n / compression)` (integer division);
//!    if `k == n` every index is taken and nothing is drawn; otherwise Floyd's algorithm
//!    draws the set: for `j` in `n-k .. n`, `t = uniform_below(j + 1)` (Lemire on
//!    `next_u64`, see [`crate::data::pages::uniform_below`]); if `t` is already taken, take `j`;
//! 3. the set is listed in ascending order (this also makes gathers cache-friendly).

use bistro_model::ParamSpec;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use sha2::{Digest, Sha256};

use crate::data::pages::uniform_below;

/// The flat (row-major) indices of every parameter, in canonical parameter order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceIndices {
    per_param: Vec<Vec<u32>>,
}

/// Number of values a slice carries for a tensor of `numel` elements.
pub fn slice_len(numel: usize, compression: usize) -> usize {
    (numel / compression.max(1)).max(1).min(numel)
}

impl SliceIndices {
    /// Values per parameter.
    pub fn lengths(&self) -> Vec<usize> {
        self.per_param.iter().map(Vec::len).collect()
    }

    /// Indices given explicitly, one ascending list per parameter (tests and tools; the
    /// protocol's come from [`SliceIndices::select`]).
    pub fn from_lists(per_param: Vec<Vec<u32>>) -> Self {
        SliceIndices { per_param }
    }

    /// Select the indices for `specs` from `seed` at `compression` (see the module docs).
    ///
    /// # Panics
    /// Never for valid model configs; a tensor with more than `u32::MAX` elements is
    /// reported by `bistro_model`'s config validation long before.
    pub fn select(specs: &[ParamSpec], seed: &[u8], compression: usize) -> Self {
        let mut h = Sha256::new();
        h.update(crate::protocol::tags::SLICE_INDICES);
        h.update(seed);
        let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
        let per_param = specs
            .iter()
            .map(|s| {
                let n = s.numel();
                let k = slice_len(n, compression);
                if k == n {
                    return (0..n as u32).collect();
                }
                let mut taken = vec![0u64; n.div_ceil(64)];
                for j in (n - k)..n {
                    let t = uniform_below(&mut rng, j as u64 + 1) as usize;
                    let pick = if taken[t / 64] >> (t % 64) & 1 == 1 { j } else { t };
                    taken[pick / 64] |= 1 << (pick % 64);
                }
                let mut out = Vec::with_capacity(k);
                for (w, &word) in taken.iter().enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        let b = bits.trailing_zeros() as usize;
                        out.push((w * 64 + b) as u32);
                        bits &= bits - 1;
                    }
                }
                out
            })
            .collect();
        SliceIndices { per_param }
    }

    /// The indices of parameter `i` (canonical position), ascending.
    pub fn param(&self, i: usize) -> &[u32] {
        &self.per_param[i]
    }

    /// Indices of every parameter.
    pub fn all(&self) -> &[Vec<u32>] {
        &self.per_param
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.per_param.len()
    }

    /// True when there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.per_param.is_empty()
    }

    /// Total number of indices over all parameters.
    pub fn total(&self) -> usize {
        self.per_param.iter().map(Vec::len).sum()
    }
}
