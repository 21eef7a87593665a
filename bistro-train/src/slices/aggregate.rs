//! Combining accepted slices into the shared update.
//!
//! Every node computes the window's update from the accepted slices with this code, so it
//! is deterministic: contributions are sorted by hotkey, each coordinate is computed in f64
//! in that fixed order, and the result does not depend on the order in which slices
//! arrived or on thread scheduling.
//!
//! The rule combines the slices' decoded gradients coordinate-wise (mean, trimmed mean or
//! median); the result is the gradient the public AdamW applies at the window's indices
//! ([`crate::public_adam`]). With the mean and N identical slices it is exactly that slice.

use rayon::prelude::*;

use crate::hparams::Aggregation;

/// One accepted slice: the uploader's hotkey and its decoded values per parameter.
#[derive(Clone, Debug)]
pub struct Contribution {
    /// The uploader.
    pub hotkey: String,
    /// Decoded gradient values per parameter (canonical order, index order).
    pub values: Vec<Vec<f32>>,
}

/// The result of aggregating a window's slices.
#[derive(Clone, Debug)]
pub struct Aggregate {
    /// The combined gradient at the slice indices.
    pub values: Vec<Vec<f32>>,
    /// Hotkeys whose slices were combined, sorted.
    pub used: Vec<String>,
}

/// `||values||_2` over all coordinates: the norm of a slice's decoded gradient (its
/// "update norm", the quantity listed, clipped and bounded by the lead's rules).
pub fn update_norm(values: &[Vec<f32>]) -> f64 {
    values.iter().map(|s| s.iter().map(|&b| (b as f64).powi(2)).sum::<f64>()).sum::<f64>().sqrt()
}

/// The factor an update of norm `norm` is scaled by when it is clipped to `clip` and
/// weighted by `weight`: `weight * min(1, clip / norm)` (`weight` for a zero update).
pub fn bounded_factor(norm: f64, clip: f64, weight: f64) -> f64 {
    if norm > clip { weight * clip / norm } else { weight }
}

/// A slice's values scaled by `factor` ([`bounded_factor`]), in f64 then rounded to f32,
/// the same on every node.
pub fn scaled_update(values: &[Vec<f32>], factor: f64) -> Vec<Vec<f32>> {
    values.iter().map(|s| s.iter().map(|&b| (factor * b as f64) as f32).collect()).collect()
}

/// The median of a sorted, non-empty slice (the mean of the middle two for an even length).
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { sorted[n / 2] } else { 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]) }
}

/// Combine `contributions` (each with `lengths[p]` values for parameter `p`).
///
/// Which slices are included is the lead's decision; this is only the arithmetic. With no
/// contribution the result is all zeros (and nodes apply no step at all: see
/// [`crate::history::apply_checked`]).
pub fn aggregate(lengths: &[usize], contributions: &[Contribution], rule: &Aggregation) -> Aggregate {
    let mut sorted: Vec<&Contribution> = contributions.iter().collect();
    sorted.sort_by(|a, b| a.hotkey.cmp(&b.hotkey));
    sorted.dedup_by(|a, b| a.hotkey == b.hotkey);
    let used: Vec<String> = sorted.iter().map(|c| c.hotkey.clone()).collect();
    if sorted.is_empty() {
        return Aggregate { values: lengths.iter().map(|&n| vec![0.0; n]).collect(), used };
    }
    let values = lengths
        .par_iter()
        .enumerate()
        .map(|(p, &n)| {
            let mut column = vec![0f64; sorted.len()];
            (0..n)
                .map(|j| {
                    for (d, c) in column.iter_mut().zip(&sorted) {
                        *d = c.values[p][j] as f64;
                    }
                    combine(&mut column, rule) as f32
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
