//! Combining accepted slices into the shared update.
//!
//! Every node computes `theta_{w+1}` from `theta_w` and the accepted slices of window `w`
//! with this code, so it is deterministic: contributions are sorted by hotkey, each
//! coordinate is computed in f64 in that fixed order, and the result does not depend on
//! the order in which slices arrived or on thread scheduling.
//!
//! The update works in the *delta* domain: a slice `s = theta_w[I] - eta * g[I]` gives
//! `d = theta_w[I] - s = eta * g[I]` (exact in f64), the rule combines the `d`s
//! coordinate-wise, and `theta_{w+1}[I] = theta_w[I] - combined`. With the mean this is
//! exactly the original's "average the weight slices", and N identical honest slices give
//! exactly the single miner's update.

use rayon::prelude::*;

use crate::hparams::Aggregation;

/// One accepted slice: the uploader's hotkey and its values per parameter.
#[derive(Clone, Debug)]
pub struct Contribution {
    /// The uploader.
    pub hotkey: String,
    /// Slice values per parameter (canonical order, index order).
    pub values: Vec<Vec<f32>>,
}

/// The result of aggregating a window's slices.
#[derive(Clone, Debug)]
pub struct Aggregate {
    /// New parameter values at the slice indices.
    pub values: Vec<Vec<f32>>,
    /// Hotkeys whose slices were combined, sorted.
    pub used: Vec<String>,
    /// Hotkeys rejected as norm outliers, with their update norm and the median norm.
    pub outliers: Vec<(String, f64, f64)>,
}

/// `||theta - s||_2` over all coordinates: the norm of the update `eta * g` a slice implies.
pub fn update_norm(theta_at_i: &[Vec<f32>], values: &[Vec<f32>]) -> f64 {
    theta_at_i
        .iter()
        .zip(values)
        .map(|(t, s)| t.iter().zip(s).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]) }
}

/// Combine `contributions` over `theta_at_i` (the current values at the slice indices).
///
/// With `outlier_factor > 0` and at least 3 contributions, a slice whose update norm is
/// above `outlier_factor` times the median norm is left out (reported in `outliers`).
/// With no contribution left, the values are unchanged.
pub fn aggregate(
    theta_at_i: &[Vec<f32>],
    contributions: &[Contribution],
    rule: &Aggregation,
    outlier_factor: f64,
) -> Aggregate {
    let mut sorted: Vec<&Contribution> = contributions.iter().collect();
    sorted.sort_by(|a, b| a.hotkey.cmp(&b.hotkey));
    sorted.dedup_by(|a, b| a.hotkey == b.hotkey);
    let mut outliers = Vec::new();
    if outlier_factor > 0.0 && sorted.len() >= 3 {
        let norms: Vec<f64> = sorted.iter().map(|c| update_norm(theta_at_i, &c.values)).collect();
        let mut ns = norms.clone();
        ns.sort_by(f64::total_cmp);
        let med = median(&ns);
        let keep: Vec<bool> = norms.iter().map(|&n| n <= outlier_factor * med).collect();
        for (c, (&n, &k)) in sorted.iter().zip(norms.iter().zip(&keep)) {
            if !k {
                outliers.push((c.hotkey.clone(), n, med));
            }
        }
        sorted = sorted.into_iter().zip(keep).filter(|(_, k)| *k).map(|(c, _)| c).collect();
    }
    let used: Vec<String> = sorted.iter().map(|c| c.hotkey.clone()).collect();
    if sorted.is_empty() {
        return Aggregate { values: theta_at_i.to_vec(), used, outliers };
    }
    let values = theta_at_i
        .par_iter()
        .enumerate()
        .map(|(p, theta)| {
            let mut deltas = vec![0f64; sorted.len()];
            theta
                .iter()
                .enumerate()
                .map(|(j, &t)| {
                    let t64 = t as f64;
                    for (d, c) in deltas.iter_mut().zip(&sorted) {
                        *d = t64 - c.values[p][j] as f64;
                    }
                    (t64 - combine(&mut deltas, rule)) as f32
                })
                .collect()
        })
        .collect();
    Aggregate { values, used, outliers }
}

fn combine(deltas: &mut [f64], rule: &Aggregation) -> f64 {
    let n = deltas.len();
    match rule {
        Aggregation::Mean => deltas.iter().sum::<f64>() / n as f64,
        Aggregation::TrimmedMean { trim } => {
            deltas.sort_by(f64::total_cmp);
            let cut = ((n as f64) * trim).floor() as usize;
            let kept = &deltas[cut.min(n / 2)..n - cut.min(n / 2)];
            if kept.is_empty() { median(deltas) } else { kept.iter().sum::<f64>() / kept.len() as f64 }
        }
        Aggregation::Median => {
            deltas.sort_by(f64::total_cmp);
            median(deltas)
        }
    }
}
