//! One honest miner and many dishonest ones, scored by the real validator code over real
//! buckets and a real (local) chain: the honest miner's codes (computed through another f32
//! path than the validator's: other micro-batches) check out exactly (`e` = 0), every
//! cheater is clearly separated, and the weights follow.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bistro_chain::Chain;
use bistro_chain::devnet::Devnet;
use bistro_model::{Llama, Params};
use bistro_train::data::{Dataset, TextTokenizer};
use bistro_train::hparams::HParams;
use bistro_train::slices::{self, SliceIndices};
use bistro_train::step;
use bistro_train::storage::{Bucket, BucketOptions};
use bistro_train::sync::SyncContext;
use bistro_validate::recompute::{Scorer, miners_of};
use bistro_validate::score::{Scoreboard, fold_scores};
use bytes::Bytes;
use candle_core::Device;

const STRATEGIES: [&str; 10] =
    ["honest", "idle", "zeros", "noise", "copycat", "wrong-pages", "stale", "poison", "lazy", "nan"];

/// The state every slice here is built on (the validator holds the same).
const PARENT: &str = "the-shared-state";

struct World {
    chain: Arc<Devnet>,
    ctx: SyncContext,
    params: Params,
    dataset: Arc<Dataset>,
    tokenizer: Arc<TextTokenizer>,
    h: HParams,
    _dir: tempfile::TempDir,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    // The shared test network, with more pages so that `lazy` has half of them to skip.
    let (h, model) = bistro_train::hparams::write_test_network(dir.path(), |h| {
        h.pages_per_window = 4;
        h.compression = 4;
    })
    .unwrap();
    let chain = Arc::new(Devnet::open(&dir.path().join("devnet"), Duration::from_millis(100)).unwrap());
    let ctx = SyncContext {
        chain: chain.clone(),
        netuid: 1,
        hparams: h.clone(),
        hparams_hash: h.hash().unwrap(),
        model_hash: model.hash().unwrap(),
        bucket_options: BucketOptions::default(),
        allow_local_buckets: true,
        allow_private_endpoints: true,
        rosters: Default::default(),
    };
    let params = Params::genesis(&model, 0, &Device::Cpu).unwrap();
    World {
        chain,
        ctx,
        params,
        dataset: Arc::new(Dataset::embedded(h.rows_per_page).unwrap()),
        tokenizer: Arc::new(TextTokenizer::embedded().unwrap()),
        h,
        _dir: dir,
    }
}

impl World {
    /// A miner's gradient, in micro-batches of 3 rows (the validator's are 8).
    fn gradient(&self, hotkey: &str, window: u64, pages: usize) -> Vec<candle_core::Tensor> {
        let p = self.dataset.pages(&self.h.network, hotkey, window, self.h.pages_per_window);
        let batch = self.h.window_batch(&self.dataset, &self.tokenizer, &p[..pages]).unwrap();
        let model = Llama::new(&self.params).unwrap();
        step::window_gradient(&model, &self.params, &batch, 3, &Device::Cpu, || true).unwrap().grads
    }

    /// What each strategy uploads for `window` (None: nothing).
    fn slice_for(
        &self,
        strategy: &str,
        hotkey: &str,
        window: u64,
        idx: &SliceIndices,
        honest: Option<&slices::SliceUpdate>,
    ) -> Option<Vec<u8>> {
        let seed = w_seed(&self.ctx, window);
        let codec = self.h.codec();
        let names: Vec<String> = self.params.specs().iter().map(|s| s.name.clone()).collect();
        let meta = self.ctx.meta(window, hotkey, PARENT);
        let dithers = slices::dithers(&seed, hotkey, idx);
        let grad_of = |hk: &str, w: u64, pages: usize| slices::gather_grads(&self.gradient(hk, w, pages), idx).unwrap();
        let filled = |x: f32| -> Vec<Vec<f32>> { idx.all().iter().map(|i| vec![x; i.len()]).collect() };
        let values: Vec<Vec<f32>> = match strategy {
            "honest" | "nan" => grad_of(hotkey, window, self.h.pages_per_window),
            "idle" => return None,
            "zeros" => filled(0.0),
            "noise" => idx
                .all()
                .iter()
                .enumerate()
                .map(|(p, ids)| (0..ids.len()).map(|j| 1e-3 * (((p * 7919 + j) as f32) * 0.618).sin()).collect())
                .collect(),
            // Re-upload the honest miner's codes under this hotkey.
            "copycat" => {
                let codes = &honest.expect("the honest slice first").codes;
                return Some(slices::encode(&meta, &names, &codec, codes).unwrap());
            }
            "wrong-pages" => grad_of("someone-else", window, self.h.pages_per_window),
            // Last window's work relabelled as this window's.
            "stale" => grad_of(hotkey, window.saturating_sub(1), self.h.pages_per_window),
            "poison" => filled(-1e6),
            "lazy" => grad_of(hotkey, window, self.h.pages_per_window / 2),
            other => panic!("unknown strategy {other}"),
        };
        let mut codes = slices::encode_gradient(&codec, &values, &dithers);
        if strategy == "nan" {
            codes[0].scales[0] = f32::NAN;
        }
        Some(slices::encode(&meta, &names, &codec, &codes).unwrap())
    }
}

/// The window's seed (its next window's first block hash; that block exists).
fn w_seed(ctx: &SyncContext, window: u64) -> [u8; 32] {
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| rt.block_on(ctx.seed(window))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_miner_is_separated_from_every_cheater_and_earns_the_weight() {
    let w = world();
    let mut hotkeys = BTreeMap::new();
    for (i, s) in STRATEGIES.iter().enumerate() {
        let hk = format!("{i:02}-{s}");
        w.chain.ensure_registered(1, &hk, 0).await.unwrap();
        w.chain.set_commitment(1, &hk, &format!("memory://adv-{hk}")).await.unwrap();
        hotkeys.insert(s.to_string(), hk);
    }
    w.chain.ensure_registered(1, "validator", 1000).await.unwrap();
    let scorer = Scorer {
        hparams: w.h.clone(),
        dataset: w.dataset.clone(),
        tokenizer: w.tokenizer.clone(),
        device: Device::Cpu,
        micro_batch_rows: 8,
    };
    let mut board = Scoreboard::default();
    let mut all_e: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let start_window = w.h.window_of(w.chain.block_number().await.unwrap()) + 1;
    for window in start_window..start_window + 3 {
        // The seed exists once the next window's first block does.
        w.chain.wait_for_block(w.h.first_block(window + 1), Duration::from_secs(10)).await.unwrap();
        let seed = w.ctx.seed(window).await.unwrap();
        let idx = SliceIndices::select(w.params.specs(), &seed, w.h.compression);
        let honest = {
            let bytes = w.slice_for("honest", &hotkeys["honest"], window, &idx, None).unwrap();
            let meta = w.ctx.meta(window, &hotkeys["honest"], PARENT);
            let exp = slices::expectation(&w.params, &idx, meta, u64::MAX, w.h.codec());
            slices::decode(&bytes, &exp).unwrap()
        };
        for s in STRATEGIES {
            let hk = &hotkeys[s];
            if let Some(bytes) = w.slice_for(s, hk, window, &idx, Some(&honest)) {
                let bucket = Bucket::open(&format!("memory://adv-{hk}"), &BucketOptions::default()).unwrap();
                bucket.put(&bistro_train::protocol::slice_key(window, hk), Bytes::from(bytes)).await.unwrap();
            }
        }
        let ws = w.ctx.collect(&w.params, PARENT, window, "validator").await.unwrap();
        let mg = w.chain.metagraph(1).await.unwrap();
        let results = scorer.score(&w.params, &ws, &miners_of(&mg), &AtomicBool::new(false), None).unwrap();
        assert_eq!(results.len(), STRATEGIES.len());
        // The validator's own score -> EMA -> weights path.
        fold_scores(&mut board, &results, window, &mg, &miners_of(&mg), &w.h);
        for r in &results {
            all_e.entry(r.hotkey[3..].to_string()).or_default().push(r.e);
        }
        let status: BTreeMap<&str, &str> = results.iter().map(|r| (&r.hotkey[3..], r.status.as_str())).collect();
        assert_eq!(status["honest"], "ok");
        assert_eq!(status["idle"], "missing");
        assert_eq!(status["nan"], "nan");
    }
    let weights = board.weights(w.h.temperature);
    let share = |s: &str| {
        let uid = STRATEGIES.iter().position(|x| *x == s).unwrap() as u16;
        weights.iter().find(|(u, _)| *u == uid).map(|(_, x)| *x).unwrap_or(0.0)
    };
    let mut report = String::new();
    for s in STRATEGIES {
        report.push_str(&format!("{s:>12}: e = {:?}, weight {:.5}\n", all_e[s], share(s)));
    }
    eprintln!("{report}");
    let honest_max = all_e["honest"].iter().cloned().fold(0.0, f64::max);
    assert_eq!(honest_max, 0.0, "honest codes should check out exactly:\n{report}");
    for s in STRATEGIES.iter().filter(|s| **s != "honest") {
        let min_e = all_e[*s].iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(
            min_e > 100.0 * honest_max.max(1e-6) && min_e > 2.0 * w.h.honest_tolerance,
            "{s} not separated:\n{report}"
        );
        assert!(share(s) < 0.01, "{s} earns too much:\n{report}");
    }
    assert!(share("honest") > 0.95, "honest share too low:\n{report}");
}
