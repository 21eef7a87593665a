//! Logits parity with an independent implementation: candle-transformers' Llama on the
//! same weights.

mod common;

use bistro_model::{Llama, ModelConfig, Params};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::llama as reference;

fn reference_model(params: &Params) -> (reference::Llama, reference::Config) {
    let hf: reference::LlamaConfig = serde_json::from_value(params.config().to_hf_json()).unwrap();
    let cfg = hf.into_config(false);
    let model = reference::Llama::load(params.var_builder(), &cfg).unwrap();
    (model, cfg)
}

fn check_parity(cfg: &ModelConfig, seed: u64, prefixes: &[usize]) {
    let dev = Device::Cpu;
    let params = Params::genesis(cfg, seed, &dev).unwrap();
    // Genesis norms are all ones; perturb them so RMSNorm gains are exercised too.
    for (i, s) in params.specs().iter().enumerate() {
        if s.kind == bistro_model::ParamKind::Norm {
            let v: Vec<f32> = (0..s.numel()).map(|j| 1.0 + 0.1 * ((j * 7 + i) % 5) as f32 - 0.2).collect();
            params.vars()[i].set(&Tensor::from_vec(v, s.numel(), &dev).unwrap()).unwrap();
        }
    }
    // Scale weights up so logits are far from uniform and differences would show.
    for v in params.vars() {
        v.set(&(v.as_tensor() * 10.0).unwrap()).unwrap();
    }
    let ours = Llama::new(&params).unwrap();
    let (theirs, rcfg) = reference_model(&params);
    let max_t = *prefixes.iter().max().unwrap();
    let ids = common::tokens(2, max_t, cfg.vocab_size, seed);
    let logits = ours.forward(&ids).unwrap();
    for &t in prefixes {
        let mut cache = reference::Cache::new(false, DType::F32, &rcfg, &dev).unwrap();
        let prefix = ids.narrow(1, 0, t).unwrap();
        let expected = theirs.forward(&prefix, 0, &mut cache).unwrap(); // [B, V], last position
        let ours_prefix = ours.forward(&prefix).unwrap().i((.., t - 1, ..)).unwrap();
        let full = logits.i((.., t - 1, ..)).unwrap();
        let diff = (ours_prefix - &expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(scale > 1.0, "logits too flat to be a meaningful comparison: {scale}");
        assert!(diff < 1e-4 * scale.max(1.0), "prefix {t}: max |diff| {diff} (scale {scale})");
        // Causality: position t-1 of the full sequence equals the prefix's last position.
        let diff_full = (full - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff_full < 1e-4 * scale.max(1.0), "causal mask leaks at prefix {t}: {diff_full}");
    }
}

#[test]
fn logits_match_candle_transformers_llama_mha() {
    let cfg = ModelConfig::new(101, 64, 96, 2, 4, 4, 64, 1e-5);
    check_parity(&cfg, 3, &[1, 2, 5, 17, 40]);
}

#[test]
fn logits_match_candle_transformers_llama_gqa() {
    check_parity(&common::micro_gqa(), 11, &[1, 3, 8, 31]);
}

#[test]
fn logits_match_on_the_tiny_preset() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    check_parity(&cfg, 5, &[1, 9, 64]);
}
