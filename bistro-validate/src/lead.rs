//! The lead's decision (protocol v2): which of a window's slices enter the accepted set.
//!
//! A slice is included only when it arrived within the collection budget, passed the
//! format checks, and either
//! * the validator recomputed this miner's gradient this window and found it honest
//!   (`e <= honest_tolerance`), or
//! * it was not recomputed this window, but the hotkey has been scored honest before (no
//!   probation), its score EMA is at least `min_include_ema`, and its update norm is at most
//!   `outlier_norm_factor` times the median norm of the slices this validator recently
//!   recomputed and found honest (a bound that holds with any number of slices, one or two
//!   included; never the norms an aggregate reports). Such a slice is not taken as it is:
//!   its update is clipped to the median norm of this window's recomputed-honest slices (or
//!   the recent median when there are none) and enters a weighted mean with weight
//!   [`RECORD_WEIGHT`](bistro_train::protocol::RECORD_WEIGHT) against 1 for a recomputed
//!   slice ([`AcceptedSet::factor`]; red team 3, F6: an honest record bought full inclusion
//!   in every window the miner was not recomputed).
//!
//! Everything else is excluded with a stable reason code.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use bistro_model::Params;
use bistro_train::accepted::{self, AcceptedSet, AggregateObject, Excluded, Included};
use bistro_train::hparams::HParams;
use bistro_train::public_adam::PublicAdam;
use bistro_train::slices::{self, Contribution, update_norm};
use bistro_train::sync::WindowSlices;
use serde::{Deserialize, Serialize};

use crate::recompute::MinerResult;
use crate::score::{Scoreboard, honesty_score};
use crate::verification::{VerdictBook, Verified};

/// Update norms of the slices included in recent windows (the outlier bound's reference).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NormHistory {
    /// `(window, included norms)`, oldest first.
    pub windows: VecDeque<(u64, Vec<f64>)>,
}

impl NormHistory {
    /// Record the included norms of `window`, keeping the last `keep` windows.
    pub fn push(&mut self, window: u64, norms: Vec<f64>, keep: u64) {
        self.windows.retain(|(w, _)| *w != window);
        self.windows.push_back((window, norms));
        while self.windows.len() as u64 > keep.max(1) {
            self.windows.pop_front();
        }
    }

    /// The median of every recorded norm, if any.
    pub fn median(&self, extra: &[f64]) -> Option<f64> {
        let mut all: Vec<f64> =
            self.windows.iter().flat_map(|(_, n)| n.iter().copied()).chain(extra.iter().copied()).collect();
        if all.is_empty() {
            return None;
        }
        all.sort_by(f64::total_cmp);
        Some(slices::aggregate::median(&all))
    }

    /// Load from a JSON file (missing file: empty).
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| format!("corrupt norm history {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Save to a JSON file atomically.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let bytes = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        bistro_model::checkpoint::write_atomic(path, &bytes).map_err(|e| e.to_string())
    }
}

/// The decision for one window, before hashing.
#[derive(Clone, Debug, Default)]
pub struct Decision {
    /// Included slices' values (sorted by hotkey).
    pub contributions: Vec<Contribution>,
    /// Included slices as the aggregate names them.
    pub included: Vec<Included>,
    /// Excluded miners with reasons.
    pub excluded: Vec<Excluded>,
    /// Miners recomputed this window.
    pub scored: usize,
    /// What slices included on their record are clipped to ([`AcceptedSet::record_clip`]).
    pub record_clip: f64,
}

/// Decide a window's accepted set from the collected slices `ws`, this window's own
/// recomputations `results`, the assigned verifiers' counted verdicts `verdicts` (empty
/// without shared verification), the validator's `board` and recent included norms.
///
/// A miner this validator recomputed is judged by that alone. Otherwise, under shared
/// verification: included when every required verifier's counted verdict found it honest
/// (`e` the largest, `verified_by` the verifiers); excluded as `dishonest` when every one
/// found it dishonest, and as `disputed` when any did without the others agreeing (a
/// verifier that did not deliver, or one that disagrees). Anything else (verdicts missing,
/// none dishonest) falls to the record rule.
pub fn decide(
    ws: &WindowSlices,
    results: &[MinerResult],
    verdicts: &VerdictBook,
    board: &Scoreboard,
    history: &NormHistory,
    h: &HParams,
) -> Decision {
    let by_hotkey: BTreeMap<&str, &MinerResult> =
        results.iter().filter(|r| r.recomputed).map(|r| (r.hotkey.as_str(), r)).collect();
    let norms: BTreeMap<&str, f64> = ws
        .peers
        .iter()
        .filter_map(|p| p.outcome.as_ref().ok().map(|v| (p.hotkey.as_str(), update_norm(&v.values))))
        .collect();
    // Verdict-backed inclusions: no own recomputation, every required verifier's verdict
    // counted and honest.
    let backed = |hk: &str| -> Option<&Verified> {
        let v = verdicts.get(hk)?;
        (!by_hotkey.contains_key(hk) && v.vouched()).then_some(v)
    };
    // Norms of slices proven honest this window (here or by verdicts) join the reference.
    let honest_now: Vec<f64> = by_hotkey
        .iter()
        .filter(|(_, r)| r.e <= h.honest_tolerance)
        .map(|(hk, _)| *hk)
        .chain(verdicts.keys().map(String::as_str).filter(|hk| backed(hk).is_some()))
        .filter_map(|hk| norms.get(hk).copied())
        .collect();
    let reference = history.median(&honest_now);
    let record_clip = {
        let mut now = honest_now.clone();
        now.sort_by(f64::total_cmp);
        if now.is_empty() { reference.unwrap_or(0.0) } else { slices::aggregate::median(&now) }
    };
    let mut d = Decision {
        contributions: Vec::new(),
        included: Vec::new(),
        excluded: Vec::new(),
        scored: by_hotkey.len(),
        record_clip,
    };
    let mut peers: Vec<_> = ws.peers.iter().collect();
    peers.sort_by(|a, b| a.hotkey.cmp(&b.hotkey));
    for p in peers {
        let exclude =
            |reason: &str, detail: String| Excluded { hotkey: p.hotkey.clone(), reason: reason.into(), detail };
        let values = match &p.outcome {
            Ok(v) => &v.values,
            Err(r) => {
                d.excluded.push(exclude(r.code(), r.to_string()));
                continue;
            }
        };
        let norm = norms.get(p.hotkey.as_str()).copied().unwrap_or(f64::NAN);
        let mut verified_by = Vec::new();
        let verdict: Result<Option<f64>, Excluded> = match by_hotkey.get(p.hotkey.as_str()) {
            Some(r) if r.e <= h.honest_tolerance => Ok(Some(r.e)),
            Some(r) => Err(exclude(
                "dishonest",
                format!(
                    "e = {:.3e} > tolerance {} (score {:.3})",
                    r.e,
                    h.honest_tolerance,
                    honesty_score(r.e, h.honest_tolerance)
                ),
            )),
            None if backed(&p.hotkey).is_some() => {
                let v = backed(&p.hotkey).map(|v| v.honest_by.as_slice()).unwrap_or_default();
                verified_by = v.iter().map(|(who, _)| who.clone()).collect();
                Ok(Some(v.iter().map(|(_, e)| *e).fold(0.0, f64::max)))
            }
            None if verdicts.get(&p.hotkey).is_some_and(Verified::condemned) => {
                Err(exclude("dishonest", format!("verdicts: {}", describe(&verdicts[&p.hotkey]))))
            }
            None if verdicts.get(&p.hotkey).is_some_and(|v| !v.dishonest_by.is_empty()) => Err(exclude(
                "disputed",
                format!(
                    "a verdict found it dishonest ({}), not settled by a recomputation here",
                    describe(&verdicts[&p.hotkey])
                ),
            )),
            None => {
                let probation =
                    || exclude("probation", "not yet scored honest; waits for its first recomputation".into());
                match board.uids.values().find(|s| s.hotkey == p.hotkey) {
                    None => Err(probation()),
                    Some(s) if s.honest_windows == 0 => Err(probation()),
                    Some(s) if s.ema < h.min_include_ema => {
                        Err(exclude("low-ema", format!("score EMA {:.3} < {}", s.ema, h.min_include_ema)))
                    }
                    Some(_) => match reference {
                        None => Err(exclude("unverified", "no recent included norms to bound it by".into())),
                        Some(m) if norm.is_nan() || norm > h.outlier_norm_factor * m => Err(exclude(
                            "outlier",
                            format!("update norm {norm:.3e} > {} x recent median {m:.3e}", h.outlier_norm_factor),
                        )),
                        Some(_) => Ok(None),
                    },
                }
            }
        };
        match verdict {
            Ok(e) => {
                d.included.push(Included {
                    hotkey: p.hotkey.clone(),
                    sha256: p.sha256.clone().unwrap_or_default(),
                    norm,
                    e,
                    verified_by,
                });
                d.contributions.push(Contribution { hotkey: p.hotkey.clone(), values: values.clone() });
            }
            Err(x) => d.excluded.push(x),
        }
    }
    // Weights and clips need the whole included list: scale each slice by its factor.
    for (c, inc) in d.contributions.iter_mut().zip(&d.included) {
        let f = accepted::record_factor(&d.included, record_clip, inc);
        if f != 1.0 {
            c.values = slices::aggregate::scaled_update(&c.values, f);
        }
    }
    d
}

fn describe(v: &Verified) -> String {
    let side = |who: &[(String, f64)], what: &str| {
        who.iter().map(|(w, e)| format!("{w} {what} e = {e:.3e}")).collect::<Vec<_>>()
    };
    [side(&v.honest_by, "honest"), side(&v.dishonest_by, "dishonest")].concat().join(", ")
}

/// Build the aggregate of a decision over the state of `ws.window` (`params` and `adam`,
/// whose hash is `parent`): the combined gradient at the window's indices, and the state
/// its public AdamW step produces. The state is hashed by writing the step and undoing it
/// (only the window's coordinates change, so no copy of the whole state is needed);
/// `params` and `adam` hold the same values again, bit for bit, when this returns.
pub fn build(
    params: &Params,
    adam: &mut PublicAdam,
    parent: &str,
    ws: &WindowSlices,
    decision: &Decision,
    lead: &str,
    h: &HParams,
) -> bistro_model::Result<AggregateObject> {
    let agg = slices::aggregate(&ws.indices.lengths(), &decision.contributions, &h.aggregation);
    let set = AcceptedSet {
        window: ws.window,
        lead: lead.to_string(),
        parent: parent.to_string(),
        state: String::new(),
        full: None,
        included: decision.included.clone(),
        excluded: decision.excluded.clone(),
        scored: decision.scored,
        record_clip: decision.record_clip,
    };
    let mut obj = AggregateObject { set, values: agg.values };
    let produced = crate::audit::produced_state(params, adam, ws, &obj, h)?;
    obj.set.full = produced.link.and_then(|l| l.full);
    obj.set.state = produced.id;
    Ok(obj)
}
