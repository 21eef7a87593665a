//! What the lab measures about verification: how far an honest miner's upload drifts from a
//! validator's replay through another f32 path, and whether the consistency check catches
//! each cheater.
//!
//! Every check is evaluated at a ladder of tolerances ([`TOLERANCES`], in bins); the report
//! then takes the smallest tolerance at least ten times the largest honest deviation seen.

use bistro_train::slices::quant::{Codec, Consistency, Quantised, Tolerance};
use serde::{Deserialize, Serialize};

use super::Flat;

/// Tolerances tried, in bins of the code grid (sparse selection: relative to the threshold).
pub const TOLERANCES: [f64; 6] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1];

/// Fraction of inconsistent codes above which a cheater counts as detected.
pub const DETECTED_ABOVE: f64 = 0.01;

/// The tolerance for `bins`: the scale's relative slack moves a position by at most as much.
pub fn tolerance(codec: &Codec, bins: f64) -> Tolerance {
    Tolerance { bins, scale_rtol: 2.0 * bins / (codec.levels() - 1) as f64 }
}

/// Check per-tensor codes against the validator's values.
pub fn check_dense(codec: &Codec, reference: &Flat, uploaded: &[Quantised], dithers: &Flat, bins: f64) -> Consistency {
    let mut c = Consistency::default();
    for ((x, q), u) in reference.iter().zip(uploaded).zip(dithers) {
        c.merge(&codec.check(x, q, u, tolerance(codec, bins)));
    }
    c
}

/// One honest replay's result at every tolerance.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HonestCheck {
    /// Largest deviation between the miner's and the replay's values, in bins.
    pub max_bin_deviation: f64,
    /// `||x_m - x_v|| / ||x_v||`.
    pub rel_error: f64,
    /// Codes checked.
    pub codes: usize,
    /// Inconsistent codes at each of [`TOLERANCES`].
    pub inconsistent: Vec<usize>,
    /// A consistent cheater's room at each tolerance, relative to the update's norm.
    pub room: Vec<f64>,
}

/// A cheater's result at every tolerance.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AdversaryCheck {
    /// Strategy name.
    pub name: String,
    /// Fraction of inconsistent codes at each of [`TOLERANCES`] (the cheater's best of
    /// sending its own scales or the honest ones).
    pub inconsistent_fraction: Vec<f64>,
    /// How far its decoded upload is from the honest one, relative to the honest norm.
    pub rel_distance: f64,
}

/// Everything the lab learned about verifying one arm.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The tolerance ladder the vectors below are indexed by.
    pub tolerances: Vec<f64>,
    /// Honest replays, one per check (round or window).
    pub honest: Vec<HonestCheck>,
    /// The cheaters, checked in one round.
    pub adversaries: Vec<AdversaryCheck>,
    /// Seconds the validator spent replaying miner 0.
    pub replay_seconds: f64,
    /// Seconds miner 0 spent computing what it uploaded.
    pub miner_seconds: f64,
}

impl VerifyReport {
    /// A report over [`TOLERANCES`].
    pub fn new() -> Self {
        VerifyReport { tolerances: TOLERANCES.to_vec(), ..Default::default() }
    }

    /// The largest honest deviation in bins over every check.
    pub fn max_bin_deviation(&self) -> f64 {
        self.honest.iter().map(|h| h.max_bin_deviation).fold(0.0, f64::max)
    }

    /// The largest honest relative error over every check.
    pub fn max_rel_error(&self) -> f64 {
        self.honest.iter().map(|h| h.rel_error).fold(0.0, f64::max)
    }

    /// Index in the ladder of the tolerance the rule picks: the smallest at least ten times
    /// the largest honest deviation (`None` when even the largest is too small).
    pub fn chosen(&self) -> Option<usize> {
        let need = 10.0 * self.max_bin_deviation();
        self.tolerances.iter().position(|&t| t >= need)
    }

    /// Honest inconsistent codes over every check at ladder index `i`.
    pub fn honest_inconsistent(&self, i: usize) -> usize {
        self.honest.iter().map(|h| h.inconsistent.get(i).copied().unwrap_or(0)).sum()
    }

    /// The largest room of a consistent cheater at ladder index `i`.
    pub fn room(&self, i: usize) -> f64 {
        self.honest.iter().map(|h| h.room.get(i).copied().unwrap_or(0.0)).fold(0.0, f64::max)
    }

    /// Whether every adversary is detected at ladder index `i`.
    pub fn all_detected(&self, i: usize) -> bool {
        !self.adversaries.is_empty()
            && self.adversaries.iter().all(|a| a.inconsistent_fraction.get(i).is_some_and(|&f| f > DETECTED_ABOVE))
    }
}

/// The honest check of `uploaded` (the miner's codes of `miner`) against the replay `reference`.
pub fn honest_check(
    codec: &Codec,
    miner: &Flat,
    reference: &Flat,
    uploaded: &[Quantised],
    dithers: &Flat,
) -> HonestCheck {
    let mut h = HonestCheck {
        max_bin_deviation: miner.iter().zip(reference).map(|(a, b)| codec.max_bin_deviation(a, b)).fold(0.0, f64::max),
        rel_error: super::norm(&super::sub(miner, reference)) / super::norm(reference).max(f64::MIN_POSITIVE),
        ..Default::default()
    };
    for &t in &TOLERANCES {
        let c = check_dense(codec, reference, uploaded, dithers, t);
        h.codes = c.codes;
        h.inconsistent.push(c.inconsistent);
        h.room.push(c.room());
    }
    h
}

/// A cheater that uploads `fake` in place of `honest`, encoded with the miner's dither, in
/// its best form: with its own block scales, or with the honest ones (which pass the scale
/// check), whichever the check at each tolerance accepts more of.
pub fn dense_adversary(
    name: &str,
    codec: &Codec,
    fake: &Flat,
    honest: &Flat,
    reference: &Flat,
    dithers: &Flat,
) -> AdversaryCheck {
    let own: Vec<Quantised> = fake.iter().zip(dithers).map(|(x, u)| codec.encode(x, u)).collect();
    let honest_q: Vec<Quantised> = honest.iter().zip(dithers).map(|(x, u)| codec.encode(x, u)).collect();
    let borrowed: Vec<Quantised> = fake
        .iter()
        .zip(dithers)
        .zip(&honest_q)
        // Codes of the fake values on the honest scales' grid.
        .map(|((x, u), hq)| codec.encode_on(x, u, hq.scales.clone()))
        .collect();
    let inconsistent_fraction = TOLERANCES
        .iter()
        .map(|&t| {
            let a = check_dense(codec, reference, &own, dithers, t).inconsistent_fraction();
            let b = check_dense(codec, reference, &borrowed, dithers, t).inconsistent_fraction();
            a.min(b)
        })
        .collect();
    let dec = |qs: &[Quantised]| -> Flat { qs.iter().map(|q| codec.decode(q)).collect() };
    let (dh, df) = (dec(&honest_q), dec(&own));
    AdversaryCheck {
        name: name.to_string(),
        inconsistent_fraction,
        rel_distance: super::norm(&super::sub(&df, &dh)) / super::norm(&dh).max(f64::MIN_POSITIVE),
    }
}

/// Uniform noise with the rms of `like`, from a public stream (a cheater that sends noise).
pub fn noise_like(like: &Flat, seed: &[u8]) -> Flat {
    let n: usize = like.iter().map(Vec::len).sum();
    let rms = (like.iter().flatten().map(|&x| (x as f64).powi(2)).sum::<f64>() / n.max(1) as f64).sqrt();
    // Uniform on [-a, a] has rms a / sqrt(3).
    let a = (rms * 3f64.sqrt()) as f32;
    like.iter()
        .enumerate()
        .map(|(p, x)| {
            bistro_train::slices::quant::dither(seed, "noise", p as u64, x.len())
                .iter()
                .map(|u| (2.0 * u - 1.0) * a)
                .collect()
        })
        .collect()
}
