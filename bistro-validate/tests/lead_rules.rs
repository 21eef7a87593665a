//! The lead's decision and another validator's audit of it, on hand-made window slices:
//! what a slice included on its record can move (red team 3, F6), and which lies an
//! auditor catches (F1).

use bistro_model::Params;
use bistro_train::accepted::state_hash;
use bistro_train::protocol::RECORD_WEIGHT;
use bistro_train::public_adam::PublicAdam;
use bistro_train::slices::{self, SliceIndices, update_norm};
use bistro_train::sync::{PeerSlice, WindowSlices};
use bistro_validate::audit::{Audit, audit};
use bistro_validate::lead::{self, NormHistory};
use bistro_validate::recompute::MinerResult;
use bistro_validate::score::Scoreboard;
use bistro_validate::verification::{VerdictBook, Verified};
use candle_core::Device;

struct Window {
    h: bistro_train::hparams::HParams,
    params: Params,
    adam: PublicAdam,
    parent: String,
    ws: WindowSlices,
    results: Vec<MinerResult>,
    board: Scoreboard,
    history: NormHistory,
}

/// A slice's decoded values without codes (the lead's rules and the audit read the values).
fn update(values: Vec<Vec<f32>>) -> slices::SliceUpdate {
    slices::SliceUpdate { codes: Vec::new(), values }
}

/// Two honest miners recomputed this window (gradients of norm 1 and 1.2 along one
/// direction) and a "patient" miner not recomputed, with an honest record, uploading the
/// opposite direction at 2.7 times the honest norm (inside the outlier bound of 3).
fn window(dir: &std::path::Path) -> Window {
    let (h, model) = bistro_train::hparams::write_test_network(dir, |_| {}).unwrap();
    let params = Params::genesis(&model, h.genesis_seed, &Device::Cpu).unwrap();
    let adam = PublicAdam::zeros(params.specs());
    let parent = state_hash(&params, &adam).unwrap();
    let indices = SliceIndices::select(params.specs(), &[7u8; 32], h.compression);
    let theta = slices::gather_params(&params, &indices).unwrap();
    let n: usize = theta.iter().map(Vec::len).sum();
    let unit = 1.0 / (n as f32).sqrt();
    let shifted = |k: f32| -> Vec<Vec<f32>> { theta.iter().map(|t| vec![k * unit; t.len()]).collect() };
    let peer = |uid: u16, hotkey: &str, values: Vec<Vec<f32>>| PeerSlice {
        uid,
        hotkey: hotkey.into(),
        outcome: Ok(update(values)),
        sha256: Some(format!("{uid:064x}")),
    };
    let ws = WindowSlices {
        window: 3,
        seed: [7u8; 32],
        indices,
        theta_at_i: theta.clone(),
        peers: vec![
            peer(1, "honest-a", shifted(1.0)),
            peer(2, "honest-b", shifted(1.2)),
            peer(3, "patient", shifted(-2.7)),
        ],
    };
    let result = |uid: u16, hotkey: &str| MinerResult {
        uid,
        hotkey: hotkey.into(),
        status: "ok".into(),
        r: -1e-9,
        e: 1e-7,
        recomputed: true,
    };
    let results = vec![result(1, "honest-a"), result(2, "honest-b")];
    let mut board = Scoreboard::default();
    for w in 0..3 {
        board.update(3, "patient", w, 1.0, h.ema_alpha);
    }
    let mut history = NormHistory::default();
    history.push(2, vec![1.0, 1.1], h.norm_history_windows);
    Window { h, params, adam, parent, ws, results, board, history }
}

/// Red team 3, F6: a miner with an honest record could push its whole update, up to the
/// outlier bound, in every window it was not recomputed. It now enters clipped to the
/// median recomputed norm and weighted 0.5 against the recomputed slices.
#[test]
fn f6_a_slice_included_on_its_record_is_clipped_and_weighted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = window(tmp.path());
    let d = lead::decide(&w.ws, &w.results, &VerdictBook::new(), &w.board, &w.history, &w.h);
    let included: Vec<(&str, Option<f64>)> = d.included.iter().map(|i| (i.hotkey.as_str(), i.e)).collect();
    assert_eq!(included, vec![("honest-a", Some(1e-7)), ("honest-b", Some(1e-7)), ("patient", None)]);
    let median = {
        let mut n: Vec<f64> = d.included[..2].iter().map(|i| i.norm).collect();
        n.sort_by(f64::total_cmp);
        slices::aggregate::median(&n)
    };
    assert_eq!(d.record_clip.to_bits(), median.to_bits(), "clipped to the median recomputed norm");
    let obj = lead::build(&w.params, &mut w.adam, &w.parent, &w.ws, &d, "lead", &w.h).unwrap();
    assert_eq!(state_hash(&w.params, &w.adam).unwrap(), w.parent, "building the aggregate left the state as it was");
    // The patient's share of the mean: weight 0.5 of 2.5, clipped to the median (1.1),
    // where unbounded it would have been a third of 2.7.
    let patient = &obj.set.included[2];
    let f = obj.set.factor(patient);
    let effective = patient.norm * f / 3.0;
    let bounded = RECORD_WEIGHT * median / (2.0 + RECORD_WEIGHT);
    assert!((effective - bounded).abs() < 1e-9, "patient moves {effective}, the rule allows {bounded}");
    assert!(effective < 0.25 * patient.norm / 3.0, "the clip and weight cut its push by less than 4x");
    // The aggregate still moves the model the honest way: the mean of the three signed
    // updates is positive along the honest direction.
    let moved = update_norm(&obj.values);
    assert!(moved > 0.5, "the honest update was cancelled: {moved}");
    // And an auditor with the same view attests it, and leaves its state as it was.
    assert_eq!(audit(&obj, &w.ws, &w.results, &w.params, &mut w.adam, &w.parent, &w.h), Audit::Attest);
    assert_eq!(state_hash(&w.params, &w.adam).unwrap(), w.parent);
}

/// Red team 3, F1: what an auditor holding the same slices catches.
#[test]
fn f1_an_auditor_disputes_each_kind_of_lie() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = window(tmp.path());
    let d = lead::decide(&w.ws, &w.results, &VerdictBook::new(), &w.board, &w.history, &w.h);
    let honest = lead::build(&w.params, &mut w.adam, &w.parent, &w.ws, &d, "lead", &w.h).unwrap();
    let check = |o: &bistro_train::accepted::AggregateObject| {
        audit(o, &w.ws, &w.results, &w.params, &mut w.adam.clone(), &w.parent, &w.h)
    };
    let code = |a: Audit| match a {
        Audit::Dispute(r) => r.split(':').next().unwrap_or_default().to_string(),
        other => format!("{other:?}"),
    };
    // Values that are not the aggregate of the listed slices.
    let mut lie = honest.clone();
    lie.values[0][0] += 1e-3;
    assert_eq!(code(check(&lie)), "arithmetic");
    // A listed norm that is not the slice's (the on-record one: a recomputed one would
    // also move the record clip, caught first).
    let mut lie = honest.clone();
    lie.set.included[2].norm *= 3.0;
    assert_eq!(code(check(&lie)), "norm");
    // A record clip that is not the recomputed median.
    let mut lie = honest.clone();
    lie.set.record_clip *= 2.0;
    assert_eq!(code(check(&lie)), "record-clip");
    // A state the values do not produce.
    let mut lie = honest.clone();
    lie.set.state = "a".repeat(64);
    assert_eq!(code(check(&lie)), "state");
    // A miner that is not in the window, and one listed twice.
    let mut lie = honest.clone();
    lie.set.included[0].hotkey = "nobody".into();
    assert_eq!(code(check(&lie)), "unknown-miner");
    let mut lie = honest.clone();
    lie.set.included[1] = lie.set.included[0].clone();
    assert_eq!(code(check(&lie)), "duplicate");
    // A slice the lead says it recomputed and found honest, found dishonest here.
    let mut results = w.results.clone();
    results[0].e = 1.0;
    assert!(
        matches!(audit(&honest, &w.ws, &results, &w.params, &mut w.adam.clone(), &w.parent, &w.h), Audit::Dispute(r) if r.starts_with("dishonest-included"))
    );
    // Another parent: this validator cannot judge it.
    let mut other = honest.clone();
    other.set.parent = "f".repeat(64);
    assert_eq!(check(&other), Audit::OffState);
    assert_eq!(check(&honest), Audit::Attest);
}

/// Red team 3, F9 and F13: on-record sybils uploading zero updates (or a lead listing small
/// norms) dragged the outlier reference to 0, so every unrecomputed honest slice was
/// excluded as an outlier. The reference is built from this validator's own recomputed,
/// honest slices only: the sybils' zeros do not move it.
#[test]
fn f9_f13_zero_norm_sybils_do_not_steer_the_outlier_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = window(tmp.path());
    // The "patient" slot becomes an honest miner on record at 2.5 times the recomputed
    // norm (inside the bound of 3), and five sybils with honest records upload zeros.
    let theta = w.ws.theta_at_i.clone();
    let n: usize = theta.iter().map(Vec::len).sum();
    let unit = 1.0 / (n as f32).sqrt();
    w.ws.peers[2].outcome = Ok(update(theta.iter().map(|t| vec![2.5 * unit; t.len()]).collect()));
    let zeros: Vec<Vec<f32>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
    for i in 0..5u16 {
        let hk = format!("sybil-{i}");
        let outcome = Ok(update(zeros.clone()));
        w.ws.peers.push(PeerSlice { uid: 10 + i, hotkey: hk.clone(), outcome, sha256: None });
        for x in 0..3 {
            w.board.update(10 + i, &hk, x, 1.0, w.h.ema_alpha);
        }
    }
    let d = lead::decide(&w.ws, &w.results, &VerdictBook::new(), &w.board, &w.history, &w.h);
    assert!(
        d.included.iter().any(|i| i.hotkey == "patient" && i.e.is_none()),
        "the honest on-record slice was excluded: {:?}",
        d.excluded
    );
    // The clip is the recomputed median, not pulled to 0 by the sybils.
    assert!(d.record_clip > 0.9, "record clip {}", d.record_clip);
}

/// Shared verification: a miner this validator did not recompute is included on one
/// counted honest verdict (weight 1, `verified_by` named, its norm in the record clip's
/// median), excluded on dishonest ones, and left out as `disputed` when verifiers disagree;
/// an own recomputation overrides every verdict; an auditor holding the same view attests.
#[test]
fn verdicts_decide_what_this_validator_did_not_recompute() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = window(tmp.path());
    // honest-b not recomputed here: v1 vouches for it; patient: v1 honest, v2 dishonest.
    w.results.retain(|r| r.hotkey != "honest-b");
    let mut book = VerdictBook::new();
    book.insert("honest-b".into(), Verified { honest_by: vec![("v1".into(), 2e-7)], ..Default::default() });
    book.insert(
        "patient".into(),
        Verified { honest_by: vec![("v1".into(), 0.0)], dishonest_by: vec![("v2".into(), 0.8)], ..Default::default() },
    );
    let d = lead::decide(&w.ws, &w.results, &book, &w.board, &w.history, &w.h);
    let inc: Vec<(&str, Option<f64>, Vec<String>)> =
        d.included.iter().map(|i| (i.hotkey.as_str(), i.e, i.verified_by.clone())).collect();
    assert_eq!(inc, vec![("honest-a", Some(1e-7), vec![]), ("honest-b", Some(2e-7), vec!["v1".to_string()])]);
    assert_eq!(d.excluded.len(), 1);
    assert_eq!((d.excluded[0].hotkey.as_str(), d.excluded[0].reason.as_str()), ("patient", "disputed"));
    // Both recomputed norms are in the clip's median, as an auditor computes it.
    let mut n: Vec<f64> = d.included.iter().map(|i| i.norm).collect();
    n.sort_by(f64::total_cmp);
    assert_eq!(d.record_clip.to_bits(), slices::aggregate::median(&n).to_bits());
    let obj = lead::build(&w.params, &mut w.adam, &w.parent, &w.ws, &d, "lead", &w.h).unwrap();
    assert_eq!(audit(&obj, &w.ws, &w.results, &w.params, &mut w.adam, &w.parent, &w.h), Audit::Attest);
    // Only dishonest verdicts: excluded as dishonest. Its own recomputation overrides them.
    book.insert("patient".into(), Verified { dishonest_by: vec![("v2".into(), 0.8)], ..Default::default() });
    let d = lead::decide(&w.ws, &w.results, &book, &w.board, &w.history, &w.h);
    assert!(d.excluded.iter().any(|x| x.hotkey == "patient" && x.reason == "dishonest"));
    book.insert("honest-a".into(), Verified { dishonest_by: vec![("v2".into(), 0.8)], ..Default::default() });
    let d = lead::decide(&w.ws, &w.results, &book, &w.board, &w.history, &w.h);
    assert!(d.included.iter().any(|i| i.hotkey == "honest-a" && i.verified_by.is_empty()));
    // One honest verdict while another verifier did not deliver: not vouched for; it falls
    // to the record rule (honest-b has no record: probation). One dishonest verdict while
    // another did not deliver: `disputed`, not `dishonest`.
    let silent = vec!["v3".to_string()];
    book.insert(
        "honest-b".into(),
        Verified { honest_by: vec![("v1".into(), 0.0)], missing: silent.clone(), ..Default::default() },
    );
    book.insert(
        "patient".into(),
        Verified { dishonest_by: vec![("v2".into(), 0.8)], missing: silent, ..Default::default() },
    );
    let d = lead::decide(&w.ws, &w.results, &book, &w.board, &w.history, &w.h);
    let reason = |hk: &str| d.excluded.iter().find(|x| x.hotkey == hk).map(|x| x.reason.clone());
    assert_eq!(reason("honest-b").as_deref(), Some("probation"));
    assert_eq!(reason("patient").as_deref(), Some("disputed"));
}
