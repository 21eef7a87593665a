//! Helpers shared by the model's integration tests.
#![allow(dead_code)]

use std::collections::HashMap;

use bistro_model::{Llama, ModelConfig, Params};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

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

/// A copy of the model's weights in `dtype` (its own variables, in canonical order), and the
/// model over them computing in `dtype`, with the fused ops or the composed reference.
pub(crate) fn model_in(params: &Params, dtype: DType, fused: bool) -> (Llama, Vec<Var>) {
    let mut map = HashMap::new();
    let mut vars = Vec::new();
    for (s, v) in params.specs().iter().zip(params.vars()) {
        let var = Var::from_tensor(&v.as_tensor().to_dtype(dtype).unwrap()).unwrap();
        map.insert(s.name.clone(), var.as_tensor().clone());
        vars.push(var);
    }
    let vb = VarBuilder::from_tensors(map, dtype, &Device::Cpu);
    let model = Llama::load(vb, params.config()).unwrap().with_compute_dtype(dtype).with_fused_ops(fused);
    (model, vars)
}
