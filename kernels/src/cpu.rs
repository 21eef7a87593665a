//! The CPU gradient-difference norm.

use rayon::prelude::*;

use crate::{BLOCK, DiffNorms, KernelError, check};

/// Sum of squares of `a - b` in 8 f32 lanes (the compiler vectorises this loop).
#[inline]
fn sq_diff_sum(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for k in 0..8 {
            let d = x[k] - y[k];
            lanes[k] += d * d;
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        let d = x - y;
        tail += d * d;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail
}

#[inline]
fn sq_sum(a: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    for x in ca {
        for k in 0..8 {
            lanes[k] += x[k] * x[k];
        }
    }
    let tail: f32 = ra.iter().map(|x| x * x).sum();
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail
}

/// `||g_m - g_v||^2` for every miner's slice and `||g_v||^2`, where
/// `g_m = (theta - s) / eta`; all slices are read in one pass over the coordinates.
///
/// Deterministic for given inputs whatever the thread count.
pub fn diff_norms(theta: &[f32], gv: &[f32], eta: f32, slices: &[&[f32]]) -> Result<DiffNorms, KernelError> {
    check(theta, gv, eta, slices)?;
    let m = slices.len();
    let n = theta.len();
    let blocks = n.div_ceil(BLOCK);
    // Per block: m partial squared distances (in units of eta^2) and the g_v partial.
    let partials: Vec<(Vec<f32>, f32)> = (0..blocks)
        .into_par_iter()
        .map_init(
            || vec![0f32; BLOCK],
            |target, b| {
                let lo = b * BLOCK;
                let hi = (lo + BLOCK).min(n);
                let t = &theta[lo..hi];
                let g = &gv[lo..hi];
                // target = theta - eta * g_v, so eta * (g_m - g_v) = target - s.
                let target = &mut target[..hi - lo];
                for ((o, &x), &y) in target.iter_mut().zip(t).zip(g) {
                    *o = x - eta * y;
                }
                let per_miner = slices.iter().map(|s| sq_diff_sum(target, &s[lo..hi])).collect();
                (per_miner, sq_sum(g))
            },
        )
        .collect();
    let inv = 1.0 / (eta as f64 * eta as f64);
    let mut sq_dist = vec![0f64; m];
    let mut gv_sq = 0f64;
    for (pm, g) in &partials {
        for (acc, &p) in sq_dist.iter_mut().zip(pm) {
            *acc += p as f64;
        }
        gv_sq += *g as f64;
    }
    for d in &mut sq_dist {
        *d *= inv;
    }
    Ok(DiffNorms { sq_dist, gv_sq })
}

/// The same quantities computed naively in f64 (the reference the fast paths are tested against).
pub fn diff_norms_reference(theta: &[f32], gv: &[f32], eta: f32, slices: &[&[f32]]) -> Result<DiffNorms, KernelError> {
    check(theta, gv, eta, slices)?;
    let sq_dist = slices
        .iter()
        .map(|s| {
            theta
                .iter()
                .zip(gv)
                .zip(s.iter())
                .map(|((&t, &g), &x)| {
                    let gm = (t as f64 - x as f64) / eta as f64;
                    (gm - g as f64).powi(2)
                })
                .sum()
        })
        .collect();
    let gv_sq = gv.iter().map(|&g| (g as f64).powi(2)).sum();
    Ok(DiffNorms { sq_dist, gv_sq })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, m: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
        let mut rng = crate::rng::XorShift::new(seed);
        let mut next = || rng.uniform() as f32 - 0.5;
        let theta: Vec<f32> = (0..n).map(|_| next() * 0.1).collect();
        let gv: Vec<f32> = (0..n).map(|_| next() * 0.01).collect();
        let slices = (0..m)
            .map(|k| theta.iter().zip(&gv).map(|(&t, &g)| t - 0.5 * (g + next() * 0.001 * k as f32)).collect())
            .collect();
        (theta, gv, slices)
    }

    #[test]
    fn matches_the_f64_reference_on_many_sizes() {
        for (n, m) in
            [(1, 1), (7, 3), (8, 2), (BLOCK - 1, 4), (BLOCK, 1), (BLOCK + 3, 5), (3 * BLOCK + 17, 8), (100_003, 2)]
        {
            let (t, g, s) = data(n, m, n as u64);
            let refs: Vec<&[f32]> = s.iter().map(Vec::as_slice).collect();
            let fast = diff_norms(&t, &g, 0.5, &refs).unwrap();
            let slow = diff_norms_reference(&t, &g, 0.5, &refs).unwrap();
            assert!((fast.gv_sq - slow.gv_sq).abs() <= 1e-5 * slow.gv_sq.max(1e-30), "n={n}");
            for (a, b) in fast.sq_dist.iter().zip(&slow.sq_dist) {
                // f32 differences of values near |theta| ~ 0.05 err by ~0.05 * 2^-23 = 6e-9 per
                // coordinate against differences >= 2.5e-4 (miner 1): ~5e-5 of the squared
                // distance. Miner 0 is honest: its distance is rounding noise, compared absolutely.
                assert!((a - b).abs() <= 1e-4 * b.max(slow.gv_sq * 1e-6), "n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn honest_is_near_zero_and_deterministic() {
        let (t, g, s) = data(50_000, 3, 1);
        let refs: Vec<&[f32]> = s.iter().map(Vec::as_slice).collect();
        let a = diff_norms(&t, &g, 0.5, &refs).unwrap();
        let b = diff_norms(&t, &g, 0.5, &refs).unwrap();
        assert_eq!(a, b);
        let e = a.relative_errors();
        assert!(e[0] < 1e-3, "{e:?}");
        assert!(e[1] > e[0] && e[2] > e[1]);
    }

    #[test]
    fn rejects_bad_inputs() {
        assert!(diff_norms(&[1.0], &[1.0, 2.0], 0.5, &[]).is_err());
        assert!(diff_norms(&[1.0], &[1.0], 0.0, &[]).is_err());
        assert!(diff_norms(&[1.0], &[1.0], 0.5, &[&[1.0, 2.0]]).is_err());
        let ok = diff_norms(&[], &[], 0.5, &[&[]]).unwrap();
        assert_eq!(ok.sq_dist, vec![0.0]);
    }
}
