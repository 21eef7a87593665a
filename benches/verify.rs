//! What checking one miner costs a validator per window, protocol v3 against v4, on the
//! `tiny` model and a real devnet window (2 pages of 2 documents, 128-token rows):
//!
//! * `v3_recompute_and_norm`: the window gradient, gathered at a random 1/8 of the
//!   coordinates, and the relative error of the slice's implied gradient (the CPU norm
//!   kernel), as the validator did under protocol v3;
//! * `v4_recompute_and_code_check`: the same gradient, gathered at a random 1/24, the
//!   miner's public dithers and the code-by-code check (`recompute::check_codes`);
//! * the two checks alone, without the gradient.

use bistro_model::{Llama, ModelConfig, Params};
use bistro_train::data::{Dataset, TextTokenizer};
use bistro_train::hparams::HParams;
use bistro_train::slices::{self, SliceIndices};
use bistro_train::step;
use candle_core::Device;
use criterion::{Criterion, criterion_group, criterion_main};

fn verify(c: &mut Criterion) {
    let h = HParams::default();
    let cfg = ModelConfig::preset("tiny").expect("preset");
    let params = Params::genesis(&cfg, 0, &Device::Cpu).expect("genesis");
    let dataset = Dataset::embedded(h.rows_per_page).expect("corpus");
    let tokenizer = TextTokenizer::embedded().expect("tokenizer");
    let pages = dataset.pages(&h.network, "bench-miner", 3, h.pages_per_window);
    let batch = h.window_batch(&dataset, &tokenizer, &pages).expect("batch");
    let model = Llama::new(&params).expect("model");
    let seed = [9u8; 32];
    let gradient = || step::window_gradient(&model, &params, &batch, 8, &Device::Cpu, || true).expect("gradient");
    let g = gradient();
    // v3: the slice is `theta - eta g` at 1/8; the check is the relative error of its
    // implied gradient.
    let idx3 = SliceIndices::select(params.specs(), &seed, 8);
    let theta3: Vec<f32> = slices::gather_params(&params, &idx3).expect("gather").into_iter().flatten().collect();
    let g3: Vec<f32> = slices::gather_grads(&g.grads, &idx3).expect("gather").into_iter().flatten().collect();
    let eta = 0.5f32;
    let slice3: Vec<f32> = theta3.iter().zip(&g3).map(|(t, x)| t - eta * x).collect();
    // v4: the codes of the gradient at 1/24 under the miner's dithers.
    let idx4 = SliceIndices::select(params.specs(), &seed, h.compression);
    let g4 = slices::gather_grads(&g.grads, &idx4).expect("gather");
    let codec = h.codec();
    let codes = slices::encode_gradient(&codec, &g4, &slices::dithers(&seed, "bench-miner", &idx4));
    let slice4 = slices::SliceUpdate { values: codes.iter().map(|q| codec.decode(q)).collect(), codes };
    let check4 =
        |gv: &[Vec<f32>]| bistro_validate::recompute::check_codes(&h, &seed, "bench-miner", &idx4, gv, &slice4);
    assert_eq!(check4(&g4).relative_error(), 0.0);

    let mut grp = c.benchmark_group("verify_one_miner_tiny");
    grp.sample_size(10);
    grp.bench_function("v3_recompute_and_norm", |b| {
        b.iter(|| {
            let gv = gradient();
            let gv: Vec<f32> = slices::gather_grads(&gv.grads, &idx3).expect("gather").into_iter().flatten().collect();
            bistro_kernels::cpu::diff_norms(&theta3, &gv, eta, &[&slice3]).expect("norms")
        })
    });
    grp.bench_function("v4_recompute_and_code_check", |b| {
        b.iter(|| {
            let gv = gradient();
            check4(&slices::gather_grads(&gv.grads, &idx4).expect("gather"))
        })
    });
    grp.bench_function("v3_norm_only", |b| {
        b.iter(|| bistro_kernels::cpu::diff_norms(&theta3, &g3, eta, &[&slice3]).expect("norms"))
    });
    grp.bench_function("v4_code_check_only", |b| b.iter(|| check4(&g4)));
    grp.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
