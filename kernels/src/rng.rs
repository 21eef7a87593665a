//! A small seeded pseudo-random generator for tests, benchmarks and simulated peers.
//!
//! Marsaglia's xorshift64 (shifts 13, 7, 17): fast, reproducible from one `u64`, the same
//! on every platform. Not for anything an adversary must not predict (keys, the
//! validator's private sample order): those use a cryptographic source.

/// xorshift64 seeded from one `u64` (any seed, zero included, gives a non-zero state).
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed`; equal seeds give equal sequences.
    pub fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[-scale, scale)`.
    pub fn symmetric(&mut self, scale: f64) -> f64 {
        (self.uniform() - 0.5) * 2.0 * scale
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is below `n / 2^64`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// `n` values uniform in `[-scale, scale)`, as f32.
    pub fn vec_f32(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.symmetric(scale as f64) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_in_range() {
        let (mut a, mut b) = (XorShift::new(7), XorShift::new(7));
        let xs: Vec<f64> = (0..1000).map(|_| a.symmetric(2.0)).collect();
        let ys: Vec<f64> = (0..1000).map(|_| b.symmetric(2.0)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (-2.0..2.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / 1000.0;
        assert!(mean.abs() < 0.2, "mean {mean}");
        assert_ne!(XorShift::new(0).next_u64(), 0);
        assert!((0..100).all(|_| a.below(5) < 5));
        assert_ne!(XorShift::new(1).next_u64(), XorShift::new(2).next_u64());
    }
}
