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

/// The factor an update of norm `norm` is scaled by when it is clipped to `clip` and
/// weighted by `weight`: `weight * min(1, clip / norm)` (`weight` for a zero update).
pub fn bounded_factor(norm: f64, clip: f64, weight: f64) -> f64 {
    if norm > clip { weight * clip / norm } else { weight }
}

/// A slice whose update `theta - s` is scaled by `factor` ([`bounded_factor`]): the values
/// `theta - factor * (theta - s)`, in f64 then rounded to f32, the same on every node.
pub fn scaled_update(theta_at_i: &[Vec<f32>], values: &[Vec<f32>], factor: f64) -> Vec<Vec<f32>> {
    theta_at_i
        .iter()
        .zip(values)
        .map(|(t, s)| t.iter().zip(s).map(|(&a, &b)| (a as f64 - factor * (a as f64 - b as f64)) as f32).collect())
        .collect()
}

/// The median of a sorted, non-empty slice (the mean of the middle two for an even length).
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { sorted[n / 2] } else { 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]) }
}

/// Combine `contributions` over `theta_at_i` (the current values at the slice indices).
///
/// Which slices are included is the lead's decision (protocol v2); this is only the
/// arithmetic. With no contribution, the values are unchanged.
pub fn aggregate(theta_at_i: &[Vec<f32>], contributions: &[Contribution], rule: &Aggregation) -> Aggregate {
    let mut sorted: Vec<&Contribution> = contributions.iter().collect();
    sorted.sort_by(|a, b| a.hotkey.cmp(&b.hotkey));
    sorted.dedup_by(|a, b| a.hotkey == b.hotkey);
    let used: Vec<String> = sorted.iter().map(|c| c.hotkey.clone()).collect();
    if sorted.is_empty() {
        return Aggregate { values: theta_at_i.to_vec(), used };
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
    Aggregate { values, used }
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
