//! The learning lab's smoke test: a few windows of the replayable arms, end to end (pages,
//! inner steps, quantised uploads over the wire format, the outer step, the validator's
//! replay through another f32 path and the cheaters). The full lab is
//! `scripts/learning-lab.sh`; its results are in `docs/learning/`.

use bistro_examples::learning::arm::{BUDGET_BITS, d1_compression, d3_density};
use bistro_examples::learning::verify::DETECTED_ABOVE;
use bistro_examples::learning::{ArmReport, ArmSpec, Lab, LabOptions, run_arm};
use bistro_train::slices::quant::Codec;

fn lab(windows: u64) -> Lab {
    Lab::new(LabOptions { windows, eval_every: windows, heldout_pages: 4, ..LabOptions::default() }).expect("lab")
}

fn detected(r: &ArmReport, name: &str) -> f64 {
    let v = r.verify.as_ref().expect("verified");
    let i = v.chosen().expect("a tolerance fits the honest deviation");
    let a = v.adversaries.iter().find(|a| a.name == name).unwrap_or_else(|| panic!("{name} was checked"));
    a.inconsistent_fraction[i]
}

#[test]
fn held_out_pages_are_never_trained_on() {
    let lab = lab(6);
    let held = lab.dataset.pages(&lab.opts.network, "bistro/held-out", u64::MAX, lab.opts.heldout_pages);
    let rows = lab.hparams.rows_per_page as u64;
    for (w, per_miner) in lab.pages.iter().enumerate() {
        for (m, pages) in per_miner.iter().enumerate() {
            assert_eq!(pages.len(), lab.hparams.pages_per_window, "window {w} miner {m}");
            for p in pages {
                assert!(
                    !held.iter().any(|h| h.shard == p.shard && h.row_offset.abs_diff(p.row_offset) < rows),
                    "window {w} miner {m} trains on held-out page {p}"
                );
            }
        }
    }
}

#[test]
fn budgets_fit_todays_slice() {
    // D1: bits per value plus one f32 scale per 64 values, at 1/c of the coordinates.
    for bits in [1u8, 2, 4] {
        let c = d1_compression(bits) as f64;
        assert!((bits as f64 + 0.5) / c <= BUDGET_BITS, "{bits}-bit at c={c}");
        assert!((bits as f64 + 0.5) / (c - 1.0) > BUDGET_BITS, "c={c} is not the smallest");
    }
    // D3: indices, codes and scales over h windows.
    let d = d3_density(2, 8);
    assert!((2.0 + 12.0 + 0.5) * d / 8.0 <= BUDGET_BITS);
    assert_eq!(ArmSpec::parse("d2:h=32,bits=2", 3e-3).unwrap().label(), "D2 H=32 2-bit (outer 1, μ 0)");
    assert!(ArmSpec::parse("d2:h=32,colour=2", 3e-3).is_err());
    assert!(ArmSpec::parse("d9", 3e-3).is_err());
}

#[test]
fn replayable_diloco_learns_verifies_and_catches_cheaters() {
    let lab = lab(4);
    let spec = ArmSpec::parse("d2:h=2,bits=2", 3e-3).expect("spec");
    let r = run_arm(&lab, &spec, true, |_, _| {}).expect("arm runs");
    let (first, last) = (r.curve[0].1, r.final_loss());
    assert!(last.is_finite() && last < first, "held-out loss {first} -> {last}");
    // Two rounds of dense 2-bit codes: the measured wire bytes, per window.
    let n = lab.config.num_params();
    let codec = Codec::new(2).unwrap();
    let lower = codec.encoded_len(n) as f64 / 2.0;
    assert!(r.upload_bytes_per_window >= lower && r.upload_bytes_per_window < lower * 1.01);
    let v = r.verify.as_ref().expect("verified");
    assert_eq!(v.honest.len(), 2, "one replay per round");
    let i = v.chosen().expect("a tolerance fits");
    assert_eq!(v.honest_inconsistent(i), 0, "an honest miner is consistent: {v:?}");
    for cheat in ["zeros", "noise", "wrong-pages", "copycat", "stale", "lazy"] {
        assert!(detected(&r, cheat) > DETECTED_ABOVE, "{cheat} passes the check: {v:?}");
    }
}

/// D3's replay through another f32 path is close but not exact (the full lab finds honest
/// inconsistencies at every tolerance: near-ties at the top-k threshold and scales of
/// noise-level blocks), so this smoke test asserts what holds: it learns, the validator's
/// error feedback follows the miner's, and at 0.01 bins the cheaters fail on far more codes
/// than the honest miner.
#[test]
fn sparse_error_feedback_learns_and_cheaters_stand_out() {
    let lab = lab(4);
    let spec = ArmSpec::parse("d3:h=2,bits=2,e=2", 3e-3).expect("spec");
    let r = run_arm(&lab, &spec, true, |_, _| {}).expect("arm runs");
    assert!(r.final_loss().is_finite() && r.final_loss() < r.curve[0].1);
    let v = r.verify.as_ref().expect("verified");
    let i = v.tolerances.iter().position(|&t| t == 1e-2).expect("1e-2 on the ladder");
    let honest = v.honest_inconsistent(i) as f64 / v.honest.iter().map(|h| h.codes).sum::<usize>() as f64;
    assert!(honest < 1e-3, "honest inconsistent fraction {honest}: {v:?}");
    for cheat in ["zeros", "noise", "wrong-pages", "copycat"] {
        let a = v.adversaries.iter().find(|a| a.name == cheat).expect("checked");
        assert!(a.inconsistent_fraction[i] > 0.3, "{cheat} passes the check: {v:?}");
    }
}
