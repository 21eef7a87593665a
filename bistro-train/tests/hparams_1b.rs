//! The shipped `1b` settings (`hparams/1b-h100.toml`) hold the arithmetic their comments
//! state, computed with the code's own bounds: slice and aggregate sizes, the lead's
//! timeline after the upload deadline, and the window that must hold it.

use bistro_model::ModelConfig;
use bistro_train::HParams;
use bistro_train::accepted::AggregateExpectation;
use bistro_train::slices::{size_bound, slice_len};

const TEXT: &str = include_str!("../hparams/1b-h100.toml");

/// Subtensor's block time and how far behind the head finality runs (2-3 blocks).
const BLOCK_MS: u64 = 12_000;
const FINALITY_MS: u64 = 3 * BLOCK_MS;

fn settings() -> HParams {
    let h: HParams = toml::from_str(TEXT).expect("the 1b settings parse");
    h.validate().expect("the 1b settings are valid");
    h
}

#[test]
fn slices_and_aggregates_fit_their_bounds() {
    let h = settings();
    let cfg = ModelConfig::preset(&h.model).unwrap();
    let specs = bistro_model::param_specs(&cfg);
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let lengths: Vec<usize> = specs.iter().map(|s| slice_len(s.shape.iter().product(), h.compression)).collect();
    let coords: usize = lengths.iter().sum();
    // The largest honest slice is under the network's limit (scale-3: at compression 8 every
    // slice of 1b was over it).
    let slice = size_bound(&names, &lengths, &h.codec());
    assert!(slice <= h.max_slice_bytes, "slice bound {slice} over max_slice_bytes {}", h.max_slice_bytes);
    assert!((11_000_000..13_000_000).contains(&slice), "the file says 11.8 MB, the bound is {slice}");
    // The aggregate every node fetches: f32 at the same coordinates, as the comments say.
    let agg = AggregateExpectation {
        window: 0,
        names,
        lengths,
        hparams_hash: h.hash().unwrap(),
        model_hash: cfg.hash().unwrap(),
    }
    .max_bytes();
    assert!((150_000_000..160_000_000).contains(&agg), "the file says 151 MB, the bound is {agg}");
    assert!((37_600_000..37_700_000).contains(&coords), "the file says 37.65 M codes, a slice has {coords}");
    // The lead's download at 256 miners within its collect budget, in Gbit/s.
    let gbit = 256.0 * slice as f64 * 8.0 / (h.collect_budget_ms as f64 / 1000.0) / 1e9;
    assert!(gbit < 1.0, "the lead needs {gbit:.2} Gbit/s");
    // A window's tokens are what the pages hold.
    assert_eq!(h.max_window_tokens, h.pages_per_window * h.rows_per_page * h.seq_len);
}

#[test]
fn the_lead_timeline_fits_the_window() {
    let h = settings();
    // The slice seed is read once final; then the upload.
    assert!(h.upload_grace_secs * 1000 > FINALITY_MS + 5_000);
    // Shared verification draws from the block at the deadline, readable once final: the
    // verification budget starts then, and the verdicts, decision and publication need time
    // after it.
    assert!(h.verifiers_per_miner >= 2);
    let verify_from = h.collect_budget_ms.max(FINALITY_MS);
    assert!(verify_from + h.verify_budget_ms + 10_000 <= h.aggregate_wait_ms);
    // The window holds the wait, a follower's download and apply, a miner's step and upload.
    assert!(h.blocks_per_window * BLOCK_MS >= h.aggregate_wait_ms + 15_000);
    // set_weights at most once per 100 blocks.
    assert!(h.windows_per_weights * h.blocks_per_window >= 100);
    // Checkpoints (19.3 GB each) at most every 30 minutes.
    assert!(bistro_train::lineage::checkpoint_every(&h) * h.blocks_per_window * BLOCK_MS >= 30 * 60 * 1000);
}
