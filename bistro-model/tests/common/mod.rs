//! Helpers shared by the model's integration tests.
#![allow(dead_code)]

use bistro_model::ModelConfig;
use candle_core::{Device, Tensor};

/// A micro model with grouped-query attention (4 query heads, 2 kv heads).
pub(crate) fn micro_gqa() -> ModelConfig {
    ModelConfig::new(97, 32, 48, 2, 4, 2, 32, 1e-5)
}

/// Deterministic pseudo-random token ids `[b, t]` below `vocab`.
pub(crate) fn tokens(b: usize, t: usize, vocab: usize, salt: u64) -> Tensor {
    let mut rng = bistro_kernels::rng::XorShift::new(salt);
    let v: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// Labels equal to the inputs (Hugging Face convention), as i64.
pub(crate) fn labels_of(ids: &Tensor) -> Tensor {
    ids.to_dtype(candle_core::DType::I64).unwrap()
}
