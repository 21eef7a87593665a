//! Deterministic, unbiased quantisation with a public dither, and the check a validator runs
//! on a peer's codes against its own recomputation.
//!
//! Values are cut into blocks of [`BLOCK`]; each block is sent as one f32 scale
//! `s = max |x|` and one `bits`-bit code per value. Code `q` of `levels = 2^bits` stands for
//! the value `(2 q / (levels - 1) - 1) s`, so the grid spans `[-s, s]` evenly. A value's
//! *position* on the grid is `z = (x / s + 1) / 2 (levels - 1)`, in `[0, levels - 1]`, and
//! its code is `q = floor(z + u)` (clamped), with a dither `u` in `[0, 1)` that anybody can
//! recompute ([`dither`]): the round's seed, the uploader's hotkey and the tensor's position
//! key a ChaCha20 stream. So `E[q] = z` (the decoded value is unbiased) and nothing about the
//! code is private: given the same `x`, every node computes the same `q`.
//!
//! **The consistency check** ([`Codec::check`]). A validator that recomputed `x_v` accepts
//! the peer's code at a coordinate when it lies in `floor(z_v + u - tol) ..= floor(z_v + u +
//! tol)`: an honest peer whose numbers differ from the validator's by less than `tol` bins
//! is always consistent; a cheater can only choose between two codes at the coordinates
//! whose `z_v + u` lies within `tol` of a bin edge ([`Consistency::movable`]), which bounds
//! how far an undetected cheater moves the update ([`Consistency::room`]). Scales are
//! compared with a relative tolerance.
//!
//! Positions are computed in f64 from f32 inputs, by the same code on every node.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// Values per scale.
pub const BLOCK: usize = 64;

/// Domain-separation tag of the dither streams.
pub const DITHER_TAG: &[u8] = b"bistro/dither/v1";

/// Errors of the quantiser.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// Only 1, 2, 4 and 8 bits per code are supported.
    #[error("unsupported code width {0} bits (1, 2, 4 or 8)")]
    Bits(u8),
    /// An encoded buffer does not have the length its value count implies.
    #[error("encoded length {found} bytes, expected {expected} for {values} values")]
    Length {
        /// Bytes found.
        found: usize,
        /// Bytes expected.
        expected: usize,
        /// Number of values.
        values: usize,
    },
    /// A scale is negative or not finite.
    #[error("scale {index} is {value}: scales must be finite and non-negative")]
    Scale {
        /// Block index.
        index: usize,
        /// The value read.
        value: f32,
    },
}

/// Codes and scales of one tensor's values.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantised {
    /// One code per value, each below [`Codec::levels`].
    pub codes: Vec<u8>,
    /// One scale per [`BLOCK`] values (the last block may be shorter).
    pub scales: Vec<f32>,
}

/// A quantiser of a fixed code width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Codec {
    bits: u8,
}

/// How much a peer's codes may differ from the validator's recomputation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Slack in bins around the validator's dithered position.
    pub bins: f64,
    /// Relative slack on each block's scale.
    pub scale_rtol: f64,
}

/// What [`Codec::check`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Consistency {
    /// Codes checked.
    pub codes: usize,
    /// Codes outside the allowed range (including every code of a block whose scale failed).
    pub inconsistent: usize,
    /// Blocks whose scale differs from the validator's beyond the tolerance.
    pub bad_scales: usize,
    /// Coordinates where two codes are allowed: what a cheater may choose freely.
    pub movable: usize,
    /// Squared norm of one bin at every movable coordinate: `room.sqrt()` is how far a
    /// cheater that stays consistent can move the decoded values.
    pub room_sq: f64,
    /// Squared norm of the values decoded from the peer's codes.
    pub decoded_sq: f64,
    /// Squared distance from the peer's decoded values to the nearest values the check
    /// allows (0 when every code is consistent; a block whose scale failed counts its
    /// distance to the validator's own codes).
    pub excess_sq: f64,
    /// Squared norm of the validator's own values.
    pub reference_sq: f64,
}

impl Consistency {
    /// Fraction of codes that failed.
    pub fn inconsistent_fraction(&self) -> f64 {
        self.inconsistent as f64 / self.codes.max(1) as f64
    }

    /// How far a consistent cheater can move the decoded values, relative to their norm.
    pub fn room(&self) -> f64 {
        (self.room_sq / self.decoded_sq.max(f64::MIN_POSITIVE)).sqrt()
    }

    /// How far the peer's decoded values are from any consistent upload, relative to the
    /// norm of the validator's values: the `e` of protocol v4 (0 for an honest miner).
    pub fn relative_error(&self) -> f64 {
        if self.reference_sq > 0.0 {
            (self.excess_sq / self.reference_sq).sqrt()
        } else if self.excess_sq > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    }

    /// Add another tensor's result.
    pub fn merge(&mut self, o: &Consistency) {
        self.excess_sq += o.excess_sq;
        self.reference_sq += o.reference_sq;
        self.codes += o.codes;
        self.inconsistent += o.inconsistent;
        self.bad_scales += o.bad_scales;
        self.movable += o.movable;
        self.room_sq += o.room_sq;
        self.decoded_sq += o.decoded_sq;
    }
}

/// The public dither of `n` values: uniform in `[0, 1)` with 24 random bits each, from
/// ChaCha20 keyed by `sha256(DITHER_TAG || len(seed) || seed || len(hotkey) || hotkey ||
/// stream)` (lengths and `stream` as little-endian u64).
pub fn dither(seed: &[u8], hotkey: &str, stream: u64, n: usize) -> Vec<f32> {
    let mut h = Sha256::new();
    h.update(DITHER_TAG);
    h.update((seed.len() as u64).to_le_bytes());
    h.update(seed);
    h.update((hotkey.len() as u64).to_le_bytes());
    h.update(hotkey.as_bytes());
    h.update(stream.to_le_bytes());
    let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
    (0..n).map(|_| (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)).collect()
}

fn block_scale(xs: &[f32]) -> f32 {
    xs.iter().fold(0f32, |m, x| m.max(x.abs()))
}

impl Codec {
    /// 2-bit codes, the protocol's default.
    pub const TWO_BIT: Codec = Codec { bits: 2 };

    /// A codec of `bits` bits per code (1, 2, 4 or 8).
    pub fn new(bits: u8) -> Result<Self, QuantError> {
        match bits {
            1 | 2 | 4 | 8 => Ok(Codec { bits }),
            b => Err(QuantError::Bits(b)),
        }
    }

    /// Bits per code.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// The check's tolerance for `bins` of slack: scales may differ by a relative
    /// `2 bins / (levels - 1)` (a scale moves every position of its block by at most that).
    pub fn tolerance(&self, bins: f64) -> Tolerance {
        Tolerance { bins, scale_rtol: 2.0 * bins / self.top() }
    }

    /// Number of code values, `2^bits`.
    pub fn levels(&self) -> u32 {
        1 << self.bits
    }

    fn top(&self) -> f64 {
        (self.levels() - 1) as f64
    }

    /// The position of `x` on the grid of a block of scale `s` (0 when `s` is 0).
    pub fn position(&self, x: f32, s: f32) -> f64 {
        if s > 0.0 { ((x as f64 / s as f64).clamp(-1.0, 1.0) + 1.0) * 0.5 * self.top() } else { 0.0 }
    }

    fn code_at(&self, z: f64) -> u8 {
        z.floor().clamp(0.0, self.top()) as u8
    }

    /// The value code `q` stands for in a block of scale `s`.
    pub fn value(&self, q: u8, s: f32) -> f32 {
        ((2.0 * q as f64 / self.top() - 1.0) * s as f64) as f32
    }

    /// Quantise `values` with `dither` (one per value).
    ///
    /// # Panics
    /// If `dither` is shorter than `values`.
    pub fn encode(&self, values: &[f32], dither: &[f32]) -> Quantised {
        let scales = values.chunks(BLOCK).map(block_scale).collect();
        self.encode_on(values, dither, scales)
    }

    /// Quantise `values` with `dither` on the grid of the given block `scales` (one per
    /// [`BLOCK`]; [`Self::encode`] takes each block's `max |x|`). Values beyond a scale take
    /// the edge code.
    ///
    /// # Panics
    /// If `dither` is shorter than `values` or there are fewer scales than blocks.
    pub fn encode_on(&self, values: &[f32], dither: &[f32], scales: Vec<f32>) -> Quantised {
        assert!(dither.len() >= values.len(), "one dither value per value");
        assert!(scales.len() >= values.len().div_ceil(BLOCK), "one scale per block");
        let codes = values
            .chunks(BLOCK)
            .zip(dither.chunks(BLOCK))
            .zip(&scales)
            .flat_map(|((xs, us), &s)| {
                xs.iter().zip(us).map(move |(&x, &u)| self.code_at(self.position(x, s) + u as f64))
            })
            .collect();
        Quantised { codes, scales }
    }

    /// The values the codes stand for.
    pub fn decode(&self, q: &Quantised) -> Vec<f32> {
        q.codes.chunks(BLOCK).zip(&q.scales).flat_map(|(cs, &s)| cs.iter().map(move |&c| self.value(c, s))).collect()
    }

    /// Bytes of `n` values on the wire: the packed codes, then the f32 scales.
    pub fn encoded_len(&self, n: usize) -> usize {
        (n * self.bits as usize).div_ceil(8) + 4 * n.div_ceil(BLOCK)
    }

    /// The wire bytes: codes packed least-significant bits first, then the scales (f32 LE).
    pub fn to_bytes(&self, q: &Quantised) -> Vec<u8> {
        let b = self.bits as usize;
        let mut out = vec![0u8; (q.codes.len() * b).div_ceil(8)];
        for (i, &c) in q.codes.iter().enumerate() {
            let bit = i * b;
            out[bit / 8] |= (c & ((1u16 << b) - 1) as u8) << (bit % 8);
        }
        for s in &q.scales {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    /// Parse the wire bytes of `n` values; checks the length and every scale.
    pub fn from_bytes(&self, bytes: &[u8], n: usize) -> Result<Quantised, QuantError> {
        let expected = self.encoded_len(n);
        if bytes.len() != expected {
            return Err(QuantError::Length { found: bytes.len(), expected, values: n });
        }
        let b = self.bits as usize;
        let mask = ((1u16 << b) - 1) as u8;
        let packed = (n * b).div_ceil(8);
        let codes = (0..n).map(|i| (bytes[i * b / 8] >> (i * b % 8)) & mask).collect();
        let scales = bytes[packed..]
            .chunks_exact(4)
            .enumerate()
            .map(|(index, c)| {
                let value = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if value.is_finite() && value >= 0.0 { Ok(value) } else { Err(QuantError::Scale { index, value }) }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Quantised { codes, scales })
    }

    /// Check a peer's codes `q` against the validator's own values `reference`, with the
    /// same `dither` the peer had to use (see the module docs).
    pub fn check(&self, reference: &[f32], q: &Quantised, dither: &[f32], tol: Tolerance) -> Consistency {
        let mut c = Consistency { codes: reference.len(), ..Default::default() };
        if q.codes.len() != reference.len() || q.scales.len() != reference.len().div_ceil(BLOCK) {
            c.inconsistent = reference.len();
            c.bad_scales = reference.len().div_ceil(BLOCK);
            c.reference_sq = reference.iter().map(|&x| (x as f64).powi(2)).sum();
            c.excess_sq = f64::INFINITY;
            return c;
        }
        for (((xs, us), cs), &s) in
            reference.chunks(BLOCK).zip(dither.chunks(BLOCK)).zip(q.codes.chunks(BLOCK)).zip(&q.scales)
        {
            let sv = block_scale(xs);
            c.decoded_sq += cs.iter().map(|&k| (self.value(k, s) as f64).powi(2)).sum::<f64>();
            c.reference_sq += xs.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
            if !s.is_finite() || (s as f64 - sv as f64).abs() > tol.scale_rtol * sv as f64 + f64::MIN_POSITIVE {
                c.bad_scales += 1;
                c.inconsistent += xs.len();
                let sp = if s.is_finite() { s } else { f32::MAX };
                for ((&x, &u), &k) in xs.iter().zip(us).zip(cs) {
                    let own = self.value(self.code_at(self.position(x, sv) + u as f64), sv) as f64;
                    c.excess_sq += (self.value(k, sp) as f64 - own).powi(2);
                }
                continue;
            }
            let bin = 2.0 * s as f64 / self.top();
            for ((&x, &u), &k) in xs.iter().zip(us).zip(cs) {
                let z = self.position(x, s) + u as f64;
                let (lo, hi) = (self.code_at(z - tol.bins), self.code_at(z + tol.bins));
                if k < lo || k > hi {
                    c.inconsistent += 1;
                    let near = if k < lo { lo } else { hi };
                    c.excess_sq += (self.value(k, s) as f64 - self.value(near, s) as f64).powi(2);
                }
                if hi > lo {
                    c.movable += 1;
                    c.room_sq += bin * bin;
                }
            }
        }
        c
    }

    /// The largest difference, in bins, between the positions of `a` and `b` on the grid of
    /// `a`'s block scales: how far apart two computations of the same values are.
    pub fn max_bin_deviation(&self, a: &[f32], b: &[f32]) -> f64 {
        a.chunks(BLOCK)
            .zip(b.chunks(BLOCK))
            .map(|(xa, xb)| {
                let s = block_scale(xa);
                xa.iter().zip(xb).map(|(&p, &q)| (self.position(p, s) - self.position(q, s)).abs()).fold(0f64, f64::max)
            })
            .fold(0f64, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        dither(&seed.to_le_bytes(), "values", 0, n).iter().map(|u| (u - 0.5) * 3.0).collect()
    }

    #[test]
    fn codes_round_trip_through_bytes_for_every_width() {
        for bits in [1, 2, 4, 8] {
            let c = Codec::new(bits).unwrap();
            let x = values(1000, bits as u64);
            let q = c.encode(&x, &dither(b"s", "hk", 0, x.len()));
            assert!(q.codes.iter().all(|&k| (k as u32) < c.levels()));
            let bytes = c.to_bytes(&q);
            assert_eq!(bytes.len(), c.encoded_len(x.len()));
            assert_eq!(c.from_bytes(&bytes, x.len()).unwrap(), q);
            assert!(matches!(c.from_bytes(&bytes[1..], x.len()), Err(QuantError::Length { .. })));
        }
        assert_eq!(Codec::new(3), Err(QuantError::Bits(3)));
    }

    #[test]
    fn hostile_scales_are_rejected() {
        let c = Codec::new(2).unwrap();
        let q = Quantised { codes: vec![1; 10], scales: vec![f32::NAN] };
        let bytes = c.to_bytes(&q);
        assert!(matches!(c.from_bytes(&bytes, 10), Err(QuantError::Scale { index: 0, .. })));
        let q = Quantised { codes: vec![1; 10], scales: vec![-1.0] };
        assert!(matches!(c.from_bytes(&c.to_bytes(&q), 10), Err(QuantError::Scale { .. })));
    }

    #[test]
    fn dequantisation_is_unbiased_over_dithers() {
        // The mean over many independent dithers converges to the value itself.
        let c = Codec::new(2).unwrap();
        let x = values(64, 7);
        let rounds = 4000;
        let mut mean = vec![0f64; x.len()];
        for r in 0..rounds {
            let d = c.decode(&c.encode(&x, &dither(b"s", "hk", r, x.len())));
            for (m, v) in mean.iter_mut().zip(d) {
                *m += v as f64 / rounds as f64;
            }
        }
        let s = block_scale(&x) as f64;
        for (m, v) in mean.iter().zip(&x) {
            // Per-value standard error: at most one bin (2s/3) / sqrt(rounds) / 2.
            assert!((m - *v as f64).abs() < 4.0 * (s / 3.0) / (rounds as f64).sqrt(), "{m} vs {v}");
        }
    }

    #[test]
    fn dither_depends_on_every_input() {
        let d = dither(b"seed", "hk", 0, 16);
        assert_eq!(d, dither(b"seed", "hk", 0, 16));
        assert_ne!(d, dither(b"seed2", "hk", 0, 16));
        assert_ne!(d, dither(b"seed", "hk2", 0, 16));
        assert_ne!(d, dither(b"seed", "hk", 1, 16));
        assert!(d.iter().all(|u| (0.0..1.0).contains(u)));
    }

    #[test]
    fn honest_noise_is_consistent_and_cheating_is_not() {
        let c = Codec::new(2).unwrap();
        let x = values(10_000, 1);
        let u = dither(b"s", "hk", 0, x.len());
        let tol = Tolerance { bins: 1e-4, scale_rtol: 1e-5 };
        // An honest peer whose floats differ by far less than the tolerance.
        let noisy: Vec<f32> = x.iter().map(|v| v * (1.0 + 1e-7)).collect();
        let honest = c.check(&x, &c.encode(&noisy, &u), &u, tol);
        assert_eq!(honest.inconsistent, 0, "{honest:?}");
        assert_eq!(honest.relative_error(), 0.0);
        assert!(honest.movable < 10, "{honest:?}");
        assert!(honest.room() < 0.05);
        // Zeros with the honest scales: most codes fail.
        let mut zeros = c.encode(&vec![0.0; x.len()], &u);
        zeros.scales = c.encode(&x, &u).scales;
        assert!(c.check(&x, &zeros, &u, tol).inconsistent_fraction() > 0.3);
        assert!(c.check(&x, &zeros, &u, tol).relative_error() > 0.3);
        // Another dither (a private choice of codes): inconsistent.
        let other = c.encode(&x, &dither(b"s", "other", 0, x.len()));
        assert!(c.check(&x, &other, &u, tol).inconsistent_fraction() > 0.1);
        // A wrong scale fails its whole block.
        let mut scaled = c.encode(&x, &u);
        scaled.scales[3] *= 1.01;
        let r = c.check(&x, &scaled, &u, tol);
        assert_eq!((r.bad_scales, r.inconsistent), (1, BLOCK));
        assert!(r.relative_error() > 0.0 && r.relative_error() < 0.05, "{r:?}");
        // Wrong lengths fail everything.
        let short = Quantised { codes: vec![0; 10], scales: vec![1.0] };
        assert_eq!(c.check(&x, &short, &u, tol).inconsistent, x.len());
    }

    #[test]
    fn deviation_is_measured_in_bins() {
        let c = Codec::new(2).unwrap();
        let a = vec![1.0f32, -1.0, 0.0, 0.5];
        // One bin of a 4-level grid over [-1, 1] is 2/3 in value.
        let b = vec![1.0f32, -1.0, 1.0 / 3.0, 0.5];
        assert!((c.max_bin_deviation(&a, &b) - 0.5).abs() < 1e-6);
    }
}
