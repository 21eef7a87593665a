//! Training works end to end: AdamW on a small fixed text drives the loss down by > 90%.

use bistro_model::{Llama, ModelConfig, Params};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

#[test]
fn adamw_overfits_a_fixed_text() {
    let text = b"the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!";
    let vocab = 128;
    let cfg = ModelConfig::new(vocab, 48, 96, 2, 4, 2, 128, 1e-5);
    let params = Params::genesis(&cfg, 123, &Device::Cpu).unwrap();
    let model = Llama::new(&params).unwrap();
    let ids: Vec<u32> = text.iter().map(|&b| b as u32).collect();
    let t = ids.len();
    let input = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
    let labels = input.to_dtype(DType::I64).unwrap();
    let mut opt = AdamW::new(
        params.vars().to_vec(),
        ParamsAdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 },
    )
    .unwrap();
    let first = model.loss(&input, &labels).unwrap().to_scalar::<f32>().unwrap();
    let mut last = first;
    for _ in 0..300 {
        let loss = model.loss(&input, &labels).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        opt.backward_step(&loss).unwrap();
    }
    assert!((first - (vocab as f32).ln()).abs() < 0.5, "initial loss {first} should be near ln(vocab)");
    assert!(last < 0.1 * first, "loss went from {first} to {last}: not a 90% drop");
}
