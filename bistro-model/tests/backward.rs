//! The model's own backward pass (`Llama::loss_grads`) against Candle's autograd.

mod common;

use bistro_model::{Llama, ModelConfig, Params};
use candle_core::{DType, Device, Tensor};
use common::model_in;

fn l2(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt()
}

/// Labels with some positions ignored (-100), so that rows without a target are covered.
fn labels_with_gaps(ids: &Tensor) -> Tensor {
    let mut rows = ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    for (r, row) in rows.iter_mut().enumerate() {
        for (c, x) in row.iter_mut().enumerate() {
            if (r * 7 + c * 3) % 5 == 0 {
                *x = -100;
            }
        }
    }
    Tensor::new(rows, &Device::Cpu).unwrap()
}

/// Checks the own backward of `cfg` against autograd through the composed reference ops in
/// `dtype`, to `rel` of each gradient's norm.
fn check(cfg: &ModelConfig, dtype: DType, rel: f64) {
    let params = Params::genesis(cfg, 3, &Device::Cpu).unwrap();
    let ids = common::tokens(3, 13, cfg.vocab_size, 11);
    let labels = labels_with_gaps(&ids);
    let scale = 0.37;
    let (own, own_vars) = model_in(&params, dtype, true);
    let ours = own.loss_grads(&ids, &labels, scale).unwrap();
    let (reference, ref_vars) = model_in(&params, dtype, false);
    let (sum, count) = reference.loss_sum(&ids, &labels).unwrap();
    assert_eq!(ours.count, count);
    let ref_sum = sum.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    assert!((ours.loss_sum - ref_sum).abs() <= rel * ref_sum.abs(), "loss {} vs {ref_sum}", ours.loss_sum);
    let theirs = (sum * scale).unwrap().backward().unwrap();
    for ((s, a), b) in params.specs().iter().zip(&own_vars).zip(&ref_vars) {
        let ga = ours.grads.get(a.as_tensor()).unwrap_or_else(|| panic!("{}: no gradient", s.name));
        let gb = theirs.get(b.as_tensor()).unwrap();
        assert_eq!(ga.dims(), s.shape.as_slice(), "{}", s.name);
        let diff = l2(&(ga.to_dtype(DType::F64).unwrap() - gb.to_dtype(DType::F64).unwrap()).unwrap());
        let norm = l2(gb);
        assert!(norm > 0.0, "{}: zero reference gradient", s.name);
        assert!(diff <= rel * norm, "{}: |own - autograd| = {diff:e}, |autograd| = {norm:e}", s.name);
    }
}

#[test]
fn own_backward_equals_autograd_in_f64() {
    // Grouped-query attention (4 query heads over 2 kv heads) and plain multi-head.
    check(&common::micro_gqa(), DType::F64, 1e-10);
    check(&ModelConfig::new(61, 24, 40, 3, 3, 3, 16, 1e-5), DType::F64, 1e-10);
}

#[test]
fn own_backward_equals_autograd_in_f32() {
    check(&common::micro_gqa(), DType::F32, 2e-5);
}

#[test]
fn own_backward_is_deterministic_and_scales() {
    let cfg = common::micro_gqa();
    let params = Params::genesis(&cfg, 5, &Device::Cpu).unwrap();
    let model = Llama::new(&params).unwrap();
    let ids = common::tokens(2, 16, cfg.vocab_size, 4);
    let labels = common::labels_of(&ids);
    let a = params.gradients(&model.loss_grads(&ids, &labels, 1.0).unwrap().grads).unwrap();
    let b = params.gradients(&model.loss_grads(&ids, &labels, 1.0).unwrap().grads).unwrap();
    let half = params.gradients(&model.loss_grads(&ids, &labels, 0.5).unwrap().grads).unwrap();
    for ((x, y), h) in a.iter().zip(&b).zip(&half) {
        // Bit-identical on a rerun, and linear in the scale (0.5 is exact in binary).
        assert_eq!(
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let twice = (h * 2.0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), twice);
    }
}

#[test]
fn own_backward_rejects_bad_lengths() {
    let cfg = common::micro_gqa();
    let params = Params::genesis(&cfg, 5, &Device::Cpu).unwrap();
    let model = Llama::new(&params).unwrap();
    let ids = common::tokens(1, cfg.max_position_embeddings + 1, cfg.vocab_size, 4);
    assert!(model.loss_grads(&ids, &common::labels_of(&ids), 1.0).is_err());
    let ids = common::tokens(1, 4, cfg.vocab_size, 4);
    let short = common::labels_of(&common::tokens(1, 3, cfg.vocab_size, 4));
    assert!(model.loss_grads(&ids, &short, 1.0).is_err());
}
