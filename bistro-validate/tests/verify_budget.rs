//! Red team 3, F10: sybil hotkeys with format-valid garbage cost a full recomputation each,
//! and a hotkey could upload only in windows whose (public) pages are long, so that the
//! validators overrun their verification budget. Miners on probation now take at most a
//! share of the budget before every established miner has had its turn, a recomputation
//! stops at the budget's end, and a window trains on at most `max_window_tokens` tokens.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bistro_model::Params;
use bistro_train::data::{Dataset, TextTokenizer, WindowBatch};
use bistro_train::slices::{self, SliceIndices};
use bistro_train::sync::{PeerSlice, WindowSlices};
use bistro_validate::recompute::{Budget, Scorer};
use candle_core::Device;

struct Window {
    scorer: Scorer,
    params: Params,
    ws: WindowSlices,
    miners: Vec<(u16, String)>,
    sybils: HashSet<String>,
}

/// Two established miners after six sybils in the recompute order, every slice well-formed.
fn window(dir: &std::path::Path) -> Window {
    let (h, model) = bistro_train::hparams::write_test_network(dir, |_| {}).unwrap();
    let params = Params::genesis(&model, h.genesis_seed, &Device::Cpu).unwrap();
    let indices = SliceIndices::select(params.specs(), &[7u8; 32], h.compression);
    let theta = slices::gather_params(&params, &indices).unwrap();
    let mut miners: Vec<(u16, String)> = (0..6).map(|i| (i, format!("sybil-{i}"))).collect();
    miners.extend([(6, "established-a".to_string()), (7, "established-b".to_string())]);
    let zeros: Vec<Vec<f32>> = indices.lengths().into_iter().map(|n| vec![0.0; n]).collect();
    let peers = miners
        .iter()
        .map(|(uid, hk)| {
            let codes = slices::encode_gradient(&h.codec(), &zeros, &slices::dithers(&[7u8; 32], hk, &indices));
            let outcome = Ok(slices::SliceUpdate { codes, values: zeros.clone() });
            PeerSlice { uid: *uid, hotkey: hk.clone(), outcome, sha256: None }
        })
        .collect();
    let ws = WindowSlices { window: 3, seed: [7u8; 32], indices, theta_at_i: theta, peers };
    let scorer = Scorer {
        dataset: Arc::new(Dataset::embedded(h.rows_per_page).unwrap()),
        tokenizer: Arc::new(TextTokenizer::embedded().unwrap()),
        hparams: h,
        device: Device::Cpu,
        micro_batch_rows: 8,
    };
    let sybils = miners.iter().filter(|(_, h)| h.starts_with("sybil")).map(|(_, h)| h.clone()).collect();
    Window { scorer, params, ws, miners, sybils }
}

#[test]
fn f10_miners_on_probation_wait_behind_established_ones_once_their_share_is_spent() {
    let tmp = tempfile::tempdir().unwrap();
    let w = window(tmp.path());
    // The probation share is already spent; the budget itself lasts.
    let now = Instant::now();
    let budget = Budget { end: now + Duration::from_secs(600), probation_end: now, probation: w.sybils.clone() };
    let out = w.scorer.score(&w.params, &w.ws, &w.miners, &AtomicBool::new(false), Some(&budget)).unwrap();
    let order: Vec<&str> = out.iter().map(|r| r.hotkey.as_str()).collect();
    assert_eq!(&order[..2], ["established-a", "established-b"], "established miners first: {order:?}");
    // With budget left over, the sybils are recomputed after them (and caught: garbage).
    assert_eq!(out.len(), 8, "{order:?}");
    assert!(out.iter().all(|r| r.recomputed));

    // Within the probation share, the private order stands as drawn.
    let budget = Budget::from_now(600_000, w.sybils.clone());
    let out = w.scorer.score(&w.params, &w.ws, &w.miners, &AtomicBool::new(false), Some(&budget)).unwrap();
    assert_eq!(out[0].hotkey, "sybil-0");
}

#[test]
fn f10_a_spent_budget_recomputes_nobody_and_leaves_them_unobserved() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = window(tmp.path());
    // One invalid slice still scores e = 1 (no recomputation needed); the rest are left out.
    w.ws.peers[0].outcome = Err(slices::Rejection::Malformed("garbage".into()));
    let now = Instant::now();
    let budget = Budget { end: now, probation_end: now, probation: HashSet::new() };
    let out = w.scorer.score(&w.params, &w.ws, &w.miners, &AtomicBool::new(false), Some(&budget)).unwrap();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(!out[0].recomputed && out[0].e == 1.0);
}

#[test]
fn f10_a_window_trains_on_at_most_max_window_tokens() {
    // Long documents are cut at the cap, whatever the pages hold.
    let docs = vec![vec![5u32; 10_000], vec![6u32; 10_000]];
    let b = WindowBatch::pack_capped(&docs, 0, 64, 1000).unwrap();
    assert_eq!(b.n_tokens, 1000);
    assert_eq!(b.n_targets, 999);
    assert_eq!(b.rows, 999usize.div_ceil(63));
    let last_row = &b.labels[(b.rows - 1) * 64..];
    assert_eq!(last_row.iter().filter(|&&l| l >= 0).count(), 1000 - (b.rows - 1) * 63, "the stream ends at the cap");
    // Under the cap, nothing changes.
    let short = vec![vec![5u32; 30], vec![6u32; 20]];
    assert_eq!(WindowBatch::pack_capped(&short, 0, 64, 1000).unwrap(), WindowBatch::pack(&short, 0, 64).unwrap());

    // The network's rule: miners and validators read a window through `HParams::window_batch`.
    let tmp = tempfile::tempdir().unwrap();
    let (mut h, _) = bistro_train::hparams::write_test_network(tmp.path(), |_| {}).unwrap();
    let ds = Dataset::embedded(h.rows_per_page).unwrap();
    let tok = TextTokenizer::embedded().unwrap();
    let pages = ds.pages(&h.network, "long-pages", 3, 8);
    let full = ds.window_batch(&tok, &pages, h.seq_len).unwrap();
    h.max_window_tokens = h.seq_len;
    assert!(full.n_tokens > h.seq_len, "the pages are longer than one row");
    assert_eq!(h.window_batch(&ds, &tok, &pages).unwrap().n_tokens, h.seq_len);
}
