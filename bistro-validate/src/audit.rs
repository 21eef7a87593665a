//! A validator's check of another validator's aggregate against its own view of the window
//! (its collection and its recomputations), before it attests or disputes it.
//!
//! What is checked:
//! * the aggregate applies to this validator's state (else it abstains: it cannot judge);
//! * every included hotkey is a miner of the window, listed once;
//! * every included slice this validator holds with the same digest has the listed norm;
//! * no miner the lead says it recomputed and found honest is one this validator
//!   recomputed and found dishonest (a miner included on its record is the rules' bounded
//!   bet, not a lie: it enters clipped and weighted);
//! * the record clip is the median of the recomputed slices' listed norms (or, with none,
//!   a finite number);
//! * the arithmetic: with every included slice in hand, the aggregate is recomputed bit for
//!   bit; with some missing here (a slice served to the lead only), under the mean rule the
//!   part they contribute must fit within their listed norms, and the validator abstains
//!   when it holds fewer than half of them or the rule is not the mean;
//! * the state it names is the state its values produce.

use bistro_model::Params;
use bistro_train::accepted::{AggregateObject, state_hash};
use bistro_train::hparams::{Aggregation, HParams};
use bistro_train::lineage::{self, Produced};
use bistro_train::public_adam::{AdamStep, PublicAdam};
use bistro_train::slices::{self, Contribution, update_norm};
use bistro_train::sync::WindowSlices;

use crate::recompute::MinerResult;

/// What a validator says of an aggregate after checking it.
#[derive(Clone, Debug, PartialEq)]
pub enum Audit {
    /// Consistent with everything this validator can check.
    Attest,
    /// Wrong: a stable reason code, a colon, and details.
    Dispute(String),
    /// This validator cannot judge it (too little of the window in hand).
    Abstain(String),
    /// The aggregate applies to another state than this validator's: either of them is
    /// off the accepted state (the follow tells which); this validator does not judge it.
    OffState,
}

/// Check `obj` (an aggregate of `ws.window`) against this validator's collection `ws`, its
/// recomputations `results` and its state (`params` and `adam`, hash `own_state`).
/// `params` and `adam` hold the same values again when this returns.
pub fn audit(
    obj: &AggregateObject,
    ws: &WindowSlices,
    results: &[MinerResult],
    params: &Params,
    adam: &mut PublicAdam,
    own_state: &str,
    h: &HParams,
) -> Audit {
    let set = &obj.set;
    if set.parent != own_state {
        return Audit::OffState;
    }
    if !(set.record_clip.is_finite() && set.record_clip >= 0.0) {
        return Audit::Dispute("record-clip: not a finite non-negative number".into());
    }
    let mut seen = std::collections::HashSet::new();
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for inc in &set.included {
        if !seen.insert(inc.hotkey.as_str()) {
            return Audit::Dispute(format!("duplicate: {} is included twice", inc.hotkey));
        }
        let Some(peer) = ws.peers.iter().find(|p| p.hotkey == inc.hotkey) else {
            return Audit::Dispute(format!("unknown-miner: {} is not a miner of this window", inc.hotkey));
        };
        if inc.e.is_some()
            && let Some(r) = results.iter().find(|r| r.hotkey == inc.hotkey && r.recomputed)
            && r.e > h.honest_tolerance
        {
            return Audit::Dispute(format!(
                "dishonest-included: {} has e = {:.3e} > {} here",
                inc.hotkey, r.e, h.honest_tolerance
            ));
        }
        match (&peer.outcome, &peer.sha256) {
            (Ok(slice), Some(sha)) if *sha == inc.sha256 => {
                let values = &slice.values;
                let norm = update_norm(values);
                if (norm - inc.norm).abs() > 1e-9 * norm.max(inc.norm) + 1e-15 {
                    return Audit::Dispute(format!(
                        "norm: {} has update norm {norm:.6e}, the aggregate lists {:.6e}",
                        inc.hotkey, inc.norm
                    ));
                }
                let f = set.factor(inc);
                let values = if f != 1.0 { slices::aggregate::scaled_update(values, f) } else { values.clone() };
                known.push(Contribution { hotkey: inc.hotkey.clone(), values });
            }
            _ => unknown.push(inc),
        }
    }
    if let Some(m) = set.recomputed_median()
        && m.to_bits() != set.record_clip.to_bits()
    {
        return Audit::Dispute(format!(
            "record-clip: {:.6e} is not the recomputed slices' median norm {m:.6e}",
            set.record_clip
        ));
    }
    if unknown.is_empty() {
        let agg = slices::aggregate(&ws.indices.lengths(), &known, &h.aggregation);
        let same = agg
            .values
            .iter()
            .zip(&obj.values)
            .all(|(a, b)| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        if !same {
            return Audit::Dispute("arithmetic: the values are not the aggregate of the slices it lists".into());
        }
    } else {
        if 2 * unknown.len() > set.included.len() || !matches!(h.aggregation, Aggregation::Mean) {
            return Audit::Abstain(format!(
                "cannot-check: {} of {} included slices are not in hand here",
                unknown.len(),
                set.included.len()
            ));
        }
        // Under the mean, n * values - (the slices in hand) is the sum of the missing
        // slices: no longer than the sum of their listed norms.
        let n = set.included.len() as f64;
        let mut rest_sq = 0f64;
        let mut scale_sq = 0f64;
        for (p, combined) in obj.values.iter().enumerate() {
            for (j, &g) in combined.iter().enumerate() {
                let total = n * g as f64;
                let in_hand: f64 = known.iter().map(|c| c.values[p][j] as f64).sum();
                rest_sq += (total - in_hand).powi(2);
                scale_sq += (g as f64).powi(2);
            }
        }
        let allowed: f64 = unknown.iter().map(|i| i.norm * set.factor(i)).sum();
        // f32 rounding of the written values, times n.
        let slack = n * scale_sq.sqrt() * 2f64.powi(-23);
        if rest_sq.sqrt() > allowed * (1.0 + 1e-9) + slack {
            return Audit::Dispute(format!(
                "arithmetic: the slices not in hand would contribute {:.4e}, their listed norms allow {allowed:.4e}",
                rest_sq.sqrt()
            ));
        }
    }
    match produced_state(params, adam, ws, obj, h) {
        Ok(p) if p.id == set.state && p.link.as_ref().and_then(|l| l.full.as_ref()) == set.full.as_ref() => {
            Audit::Attest
        }
        Ok(p) if p.id == set.state => Audit::Dispute(format!(
            "full: the aggregate names full state {}, the values produce {}",
            set.full.as_deref().map_or("none", |f| &f[..12]),
            p.link.as_ref().and_then(|l| l.full.as_deref()).map_or("none", |f| &f[..12])
        )),
        Ok(p) => Audit::Dispute(format!(
            "state: the values produce {}, the aggregate names {}",
            &p.id[..12],
            &set.state[..12]
        )),
        Err(e) => Audit::Abstain(format!("cannot hash the state: {e}")),
    }
}

/// The identity ([`bistro_train::lineage`]) `obj` produces from `params` and `adam` (the
/// state of `ws.window`, named `obj.set.parent`). Outside an anchor window only the
/// aggregate's values are hashed. At an anchor the public AdamW step with its values at the
/// window's indices (none when nothing was included) is written, the full state hashed,
/// and the step undone before returning.
pub(crate) fn produced_state(
    params: &Params,
    adam: &mut PublicAdam,
    ws: &WindowSlices,
    obj: &AggregateObject,
    h: &HParams,
) -> bistro_model::Result<Produced> {
    let included = !obj.set.included.is_empty();
    let full = if !lineage::is_anchor(h, ws.window) {
        None
    } else if !included {
        Some(state_hash(params, adam)?)
    } else {
        let before = adam.read(&ws.theta_at_i, &ws.indices);
        let after = adam.step_at(&ws.theta_at_i, &obj.values, &ws.indices, &AdamStep::of(h, ws.window));
        let written = adam.write(params, &ws.indices, &after);
        let full = written.and_then(|()| state_hash(params, adam));
        adam.write(params, &ws.indices, &before)?;
        Some(full?)
    };
    Ok(lineage::produce(&obj.set.parent, ws.window, included, &obj.values, full))
}
