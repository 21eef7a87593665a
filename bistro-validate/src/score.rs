//! From gradient distances to weights: the reward rule, the EMA and the softmax.
//!
//! Honest recomputation differs from the miner's gradient only at float-noise level, while
//! gradients of the same model on *other* pages are correlated (a copycat or a miner on the
//! wrong pages can reach `e` of 0.3-0.6, not 1). So the per-window score is a function of
//! the relative error `e = ||g_m - g_v|| / ||g_v||` that is flat below the honest tolerance
//! and falls steeply above it: `score(e) = 1 / (1 + (e / tol)^8)` (1 at `e = 0`, 0.5 at
//! `e = tol`, < 0.004 at `e = 2 tol`). A softmax over raw `R` would reward gradient scale,
//! not honesty.

use std::collections::{BTreeMap, HashSet};

use bistro_chain::Metagraph;
use bistro_train::hparams::HParams;
use serde::{Deserialize, Serialize};

use crate::recompute::MinerResult;

/// The per-window score of a relative error `e` with honest tolerance `tol`.
pub fn honesty_score(e: f64, tol: f64) -> f64 {
    if !e.is_finite() {
        return 0.0;
    }
    1.0 / (1.0 + (e / tol.max(1e-12)).powi(bistro_train::protocol::HONESTY_EXPONENT))
}

/// One uid's running score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UidScore {
    /// The hotkey the EMA belongs to (a new hotkey on the uid resets it).
    pub hotkey: String,
    /// The exponential moving average of the window scores.
    pub ema: f64,
    /// The last window scored.
    pub last_window: u64,
    /// Windows in which it was scored honest (`score >= 0.5`): zero means probation.
    #[serde(default)]
    pub honest_windows: u64,
    /// Until this window (exclusive) every score counts as 0: set when a recomputed slice
    /// proved dishonest.
    #[serde(default)]
    pub penalty_until: u64,
}

/// Scores of every uid, persisted across restarts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scoreboard {
    /// By uid.
    pub uids: BTreeMap<u16, UidScore>,
}

impl Scoreboard {
    /// Fold a window score into the uid's EMA: `ema = alpha * ema + (1 - alpha) * score`;
    /// a uid whose hotkey changed starts again from 0 (and on probation).
    pub fn update(&mut self, uid: u16, hotkey: &str, window: u64, score: f64, alpha: f64) -> f64 {
        let fresh = || UidScore {
            hotkey: hotkey.to_string(),
            ema: 0.0,
            last_window: window,
            honest_windows: 0,
            penalty_until: 0,
        };
        let entry = self.uids.entry(uid).or_insert_with(fresh);
        if entry.hotkey != hotkey {
            *entry = fresh();
        }
        let score = if window < entry.penalty_until { 0.0 } else { score };
        entry.ema = alpha * entry.ema + (1.0 - alpha) * score;
        entry.last_window = window;
        if score >= 0.5 {
            entry.honest_windows += 1;
        }
        entry.ema
    }

    /// A recomputed slice of `uid` proved dishonest in `window` (`e` above the tolerance, far
    /// above any honest noise): its EMA drops to 0, it goes back on probation, and its
    /// scores count as 0 until `window + penalty_windows`. Downtime (a missing slice) is
    /// not penalised this way; only a wrong gradient is.
    pub fn penalize(&mut self, uid: u16, hotkey: &str, window: u64, penalty_windows: u64) {
        let e = self.uids.entry(uid).or_insert_with(|| UidScore {
            hotkey: hotkey.to_string(),
            ema: 0.0,
            last_window: window,
            honest_windows: 0,
            penalty_until: 0,
        });
        if e.hotkey != hotkey {
            e.hotkey = hotkey.to_string();
        }
        e.ema = 0.0;
        e.honest_windows = 0;
        e.penalty_until = window + penalty_windows;
    }

    /// The hotkeys of `miners` on probation: never scored honest here (new hotkeys, and
    /// hotkeys whose recomputed slice proved dishonest).
    pub fn on_probation(&self, miners: &[(u16, String)]) -> HashSet<String> {
        miners
            .iter()
            .filter(|(uid, hk)| self.uids.get(uid).is_none_or(|s| &s.hotkey != hk || s.honest_windows == 0))
            .map(|(_, hk)| hk.clone())
            .collect()
    }

    /// Weights = softmax(temperature * ema) over scored uids, as `(uid, weight)` summing to 1.
    pub fn weights(&self, temperature: f64) -> Vec<(u16, f64)> {
        if self.uids.is_empty() {
            return Vec::new();
        }
        let max = self.uids.values().map(|s| s.ema).fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<(u16, f64)> = self.uids.iter().map(|(&u, s)| (u, (temperature * (s.ema - max)).exp())).collect();
        let sum: f64 = exps.iter().map(|(_, x)| x).sum();
        exps.into_iter().map(|(u, x)| (u, x / sum)).collect()
    }

    /// Load from a JSON file (missing file: empty board).
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        match std::fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| format!("corrupt scores file {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Save to a JSON file atomically.
    pub fn save(&self, path: &std::path::Path) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        bistro_model::checkpoint::write_atomic(path, &bytes).map_err(|e| e.to_string())
    }
}

/// Quantise weights to u16 for `set_weights`: the largest becomes 65535.
pub fn quantize(weights: &[(u16, f64)]) -> (Vec<u16>, Vec<u16>) {
    let max = weights.iter().map(|(_, w)| *w).fold(0.0, f64::max);
    weights.iter().map(|&(u, w)| (u, if max > 0.0 { (w / max * 65535.0).round() as u16 } else { 0 })).unzip()
}

/// One miner's result in one window.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ScoreRow {
    /// The miner's uid.
    pub uid: u16,
    /// The miner's hotkey.
    pub hotkey: String,
    /// `ok`, or the rejection code (`missing`, `late`, `nan`, ...).
    pub status: String,
    /// `R = -||g_m - g_v||`.
    pub r: f64,
    /// `e = ||g_m - g_v|| / ||g_v||`.
    pub e: f64,
    /// The window score `honesty_score(e)`.
    pub score: f64,
    /// The EMA after this window.
    pub ema: f64,
    /// The weight share after this window.
    pub weight: f64,
}

/// Turn a window's results into score rows: fold each into `board`'s EMA (honesty score
/// of `e` with the network's tolerance; a recomputed slice above the tolerance is penalised,
/// see [`Scoreboard::penalize`]), forget uids whose hotkey left `mg` or that did not
/// act as miners, and fill in the weight shares. The one score -> EMA -> weights path of the
/// validator, the devnet and the tests.
pub fn fold_scores(
    board: &mut Scoreboard,
    results: &[MinerResult],
    window: u64,
    mg: &Metagraph,
    miners: &[(u16, String)],
    h: &HParams,
) -> (Vec<ScoreRow>, Vec<(u16, f64)>) {
    let mut rows = Vec::with_capacity(results.len());
    for r in results {
        let (e, score, ema) = if r.observed() {
            let score = honesty_score(r.e, h.honest_tolerance);
            if r.recomputed && r.e > h.honest_tolerance {
                board.penalize(r.uid, &r.hotkey, window, h.penalty_windows);
            }
            (r.e, score, board.update(r.uid, &r.hotkey, window, score, h.ema_alpha))
        } else {
            // Not observed: the EMA, the record and any penalty stay as they were.
            let ema = board.uids.get(&r.uid).filter(|s| s.hotkey == r.hotkey).map_or(0.0, |s| s.ema);
            (f64::NAN, f64::NAN, ema)
        };
        rows.push(ScoreRow {
            uid: r.uid,
            hotkey: r.hotkey.clone(),
            status: r.status.clone(),
            r: r.r,
            e,
            score,
            ema,
            weight: 0.0,
        });
    }
    board
        .uids
        .retain(|uid, s| mg.neuron(*uid).is_some_and(|n| n.hotkey == s.hotkey) && miners.iter().any(|(u, _)| u == uid));
    let weights = board.weights(h.temperature);
    for row in &mut rows {
        row.weight = weights.iter().find(|(u, _)| *u == row.uid).map(|(_, w)| *w).unwrap_or(0.0);
        bistro_train::telemetry::miner_score(&row.hotkey, row.e, row.score, row.ema, row.weight);
    }
    (rows, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_is_flat_then_steep() {
        assert!(honesty_score(0.0, 0.05) > 0.999_999);
        assert!(honesty_score(0.01, 0.05) > 0.999);
        assert!((honesty_score(0.05, 0.05) - 0.5).abs() < 1e-12);
        assert!(honesty_score(0.1, 0.05) < 0.004);
        assert!(honesty_score(0.3, 0.05) < 1e-6);
        assert_eq!(honesty_score(f64::NAN, 0.05), 0.0);
    }

    /// Red team 3, F4: a download that ran out of the validator's budget is not observed:
    /// no score, no EMA decay, no penalty; a missing slice still scores 0.
    #[test]
    fn f4_a_timeout_is_not_observed() {
        let neuron = |uid: u16, hotkey: &str| bistro_chain::Neuron {
            uid,
            hotkey: hotkey.into(),
            stake: 0,
            validator_permit: false,
            incentive: 0.0,
        };
        let mg = Metagraph { netuid: 1, block: 0, neurons: vec![neuron(0, "slow"), neuron(1, "gone")] };
        let miners = vec![(0u16, "slow".to_string()), (1, "gone".to_string())];
        let h = HParams::default();
        let result = |uid: u16, hotkey: &str, status: &str, e: f64| MinerResult {
            uid,
            hotkey: hotkey.into(),
            status: status.into(),
            r: f64::NAN,
            e,
            recomputed: false,
        };
        let mut board = Scoreboard::default();
        let honest = [result(0, "slow", "ok", 1e-7), result(1, "gone", "ok", 1e-7)];
        fold_scores(&mut board, &honest, 0, &mg, &miners, &h);
        let before = board.uids[&0].clone();
        let window = [result(0, "slow", "timeout", 1.0), result(1, "gone", "missing", 1.0)];
        let (rows, _) = fold_scores(&mut board, &window, 1, &mg, &miners, &h);
        assert_eq!(board.uids[&0], before, "a timeout changed the record");
        assert!(rows[0].score.is_nan() && rows[0].ema == before.ema, "{:?}", rows[0]);
        assert!(board.uids[&1].ema < before.ema, "a missing slice still counts");
    }

    #[test]
    fn ema_resets_on_a_new_hotkey_and_weights_follow() {
        let mut b = Scoreboard::default();
        for w in 0..10 {
            b.update(0, "honest", w, 1.0, 0.5);
            b.update(1, "cheat", w, 0.0, 0.5);
        }
        let ws = b.weights(10.0);
        assert!(ws[0].1 > 0.9999, "{ws:?}");
        b.update(0, "newcomer", 10, 0.0, 0.5);
        assert_eq!(b.uids[&0].ema, 0.0);
        let (uids, q) = quantize(&b.weights(10.0));
        assert_eq!(uids, vec![0, 1]);
        assert_eq!(q, vec![65535, 65535]);
    }
}
