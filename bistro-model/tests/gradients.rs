//! Gradients: every parameter gets one, and they match finite differences.

mod common;

use bistro_model::{Llama, ModelConfig, ParamKind, Params};
use candle_core::{DType, Device, Tensor, Var};

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    let cfg = common::micro_gqa();
    let params = Params::genesis(&cfg, 1, &Device::Cpu).unwrap();
    let model = Llama::new(&params).unwrap();
    let ids = common::tokens(3, 16, cfg.vocab_size, 9);
    let loss = model.loss(&ids, &common::labels_of(&ids)).unwrap();
    let grads = loss.backward().unwrap();
    let g = params.gradients(&grads).unwrap();
    for (s, g) in params.specs().iter().zip(g) {
        assert_eq!(g.dims(), s.shape.as_slice(), "{}", s.name);
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(norm > 0.0 && norm.is_finite(), "{} has gradient norm {norm}", s.name);
    }
}

#[test]
fn ignored_labels_do_not_count() {
    let cfg = common::micro_gqa();
    let params = Params::genesis(&cfg, 1, &Device::Cpu).unwrap();
    let model = Llama::new(&params).unwrap();
    let ids = common::tokens(1, 8, cfg.vocab_size, 2);
    let mut labels = ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    let (_, n_all) = model.loss_sum(&ids, &Tensor::new(labels.clone(), &Device::Cpu).unwrap()).unwrap();
    assert_eq!(n_all, 7);
    labels[0][3] = -100;
    labels[0][5] = -100;
    let (_, n) = model.loss_sum(&ids, &Tensor::new(labels.clone(), &Device::Cpu).unwrap()).unwrap();
    assert_eq!(n, 5);
    // Changing an ignored label does not change the loss.
    let a = model.loss(&ids, &Tensor::new(labels.clone(), &Device::Cpu).unwrap()).unwrap().to_scalar::<f32>().unwrap();
    labels[0][3] = -7;
    let b = model.loss(&ids, &Tensor::new(labels.clone(), &Device::Cpu).unwrap()).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(a, b);
    let all_ignored = Tensor::new(vec![vec![-100i64; 8]], &Device::Cpu).unwrap();
    assert!(model.loss(&ids, &all_ignored).is_err());
}

/// An f64 copy of the model (same weights), with its variables.
fn f64_model(params: &Params) -> (Llama, Vec<Var>) {
    common::model_in(params, DType::F64, true)
}

#[test]
fn gradients_match_central_finite_differences_in_f64() {
    let cfg = ModelConfig::new(41, 16, 24, 2, 4, 2, 16, 1e-5);
    let params = Params::genesis(&cfg, 4, &Device::Cpu).unwrap();
    // Non-trivial norm gains and larger weights so that every path matters.
    for (i, s) in params.specs().iter().enumerate() {
        let t = params.vars()[i].as_tensor();
        let new = if s.kind == ParamKind::Norm {
            Tensor::from_vec(
                (0..s.numel()).map(|j| 0.8 + 0.05 * (j % 7) as f32).collect::<Vec<_>>(),
                s.numel(),
                &Device::Cpu,
            )
            .unwrap()
        } else {
            (t * 20.0).unwrap()
        };
        params.vars()[i].set(&new).unwrap();
    }
    let (model, vars) = f64_model(&params);
    let ids = common::tokens(2, 12, cfg.vocab_size, 5);
    let labels = common::labels_of(&ids);
    let loss_at = |m: &Llama| m.loss(&ids, &labels).unwrap().to_scalar::<f64>().unwrap();
    // The production path: the model's own backward pass (checked against autograd in
    // tests/backward.rs; here against the loss itself).
    let (_, count) = model.loss_sum(&ids, &labels).unwrap();
    let grads = model.loss_grads(&ids, &labels, 1.0 / count as f64).unwrap().grads;
    let eps = 1e-6;
    let mut checked = 0;
    let mut kinds = std::collections::HashSet::new();
    for (pi, (s, var)) in params.specs().iter().zip(&vars).enumerate() {
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let n = s.numel();
        // A sample of coordinates in every tensor, including the largest-gradient one.
        let argmax = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
        let mut coords = vec![argmax, 0, n / 2, n - 1, (pi * 131) % n];
        coords.dedup();
        for &c in &coords {
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let mut plus = base.clone();
            plus[c] += eps;
            var.set(&Tensor::from_vec(plus, s.shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
            let lp = loss_at(&model);
            let mut minus = base.clone();
            minus[c] -= eps;
            var.set(&Tensor::from_vec(minus, s.shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
            let lm = loss_at(&model);
            var.set(&Tensor::from_vec(base, s.shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
            let fd = (lp - lm) / (2.0 * eps);
            let err = (fd - g[c]).abs();
            let tol = 1e-6 + 1e-5 * g[c].abs().max(fd.abs());
            assert!(err <= tol, "{}[{c}]: analytic {} vs finite difference {fd} (err {err})", s.name, g[c]);
            checked += 1;
        }
        kinds.insert(s.name.rsplit('.').nth(1).unwrap().to_string());
    }
    assert!(checked > 50);
    for k in [
        "embed_tokens",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
        "lm_head",
    ] {
        assert!(kinds.contains(k), "tensor kind {k} not checked");
    }
}

#[test]
fn f32_gradients_agree_with_f64() {
    let cfg = common::micro_gqa();
    let params = Params::genesis(&cfg, 8, &Device::Cpu).unwrap();
    let ids = common::tokens(2, 20, cfg.vocab_size, 1);
    let labels = common::labels_of(&ids);
    let m32 = Llama::new(&params).unwrap();
    let g32 = params.gradients(&m32.loss(&ids, &labels).unwrap().backward().unwrap()).unwrap();
    let (m64, vars) = f64_model(&params);
    let grads64 = m64.loss(&ids, &labels).unwrap().backward().unwrap();
    for ((s, a), v) in params.specs().iter().zip(g32).zip(&vars) {
        let b = grads64.get(v.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
        let diff = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let norm = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(diff <= 1e-4 * norm + 1e-9, "{}: |g32 - g64| = {diff}, |g64| = {norm}", s.name);
    }
}
