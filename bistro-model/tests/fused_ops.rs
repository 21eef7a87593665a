//! Each fused op matches its composed reference in value and gradient, in f64 (tight) and
//! f32 (float tolerance), over many shapes including odd ones; the model with fused ops
//! matches the model without them.

mod common;

use bistro_model::fused::{self, NO_TARGET};
use bistro_model::{Llama, ModelConfig, Params, ops};
use candle_core::{D, DType, Device, Tensor, Var};

fn rand_vec(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut rng = bistro_kernels::rng::XorShift::new(seed);
    (0..n).map(|_| rng.symmetric(scale)).collect()
}

fn rand_t(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rand_vec(n, seed, scale), shape, &Device::Cpu).unwrap()
}

/// Largest absolute difference relative to the reference's largest magnitude.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let scale = b.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Runs `f` on the inputs as variables of `dtype`, and returns the output and the
/// gradients of `sum(out * r)` for a fixed random `r`.
fn value_and_grads(inputs: &[Tensor], dtype: DType, f: &dyn Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let r = rand_t(out.dims(), 99, 1.0).to_dtype(out.dtype()).unwrap();
    let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = ts.iter().map(|t| grads.get(t).cloned().unwrap_or_else(|| t.zeros_like().unwrap())).collect();
    (out, g)
}

/// The fused op in f64 matches the composed op in f64 to `1e-12`, and in f32 to `tol32`.
fn check(
    what: &str,
    inputs: &[Tensor],
    fused: &dyn Fn(&[Tensor]) -> Tensor,
    composed: &dyn Fn(&[Tensor]) -> Tensor,
    tol32: f64,
) {
    let (ref_out, ref_g) = value_and_grads(inputs, DType::F64, composed);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, tol32)] {
        let (out, g) = value_and_grads(inputs, dtype, fused);
        let e = rel_err(&out, &ref_out);
        assert!(e <= tol, "{what} {dtype:?}: value differs by {e:e}");
        for (i, (a, b)) in g.iter().zip(&ref_g).enumerate() {
            let e = rel_err(a, b);
            assert!(e <= tol, "{what} {dtype:?}: gradient of input {i} differs by {e:e}");
        }
    }
}

#[test]
fn rms_norm_matches_composed() {
    for (i, shape) in [vec![1, 3], vec![3, 7], vec![2, 5, 33], vec![4, 3, 257], vec![70, 64]].into_iter().enumerate() {
        let d = *shape.last().unwrap();
        let x = rand_t(&shape, i as u64 + 1, 2.0);
        let w = (rand_t(&[d], i as u64 + 50, 0.5) + 1.0).unwrap();
        check(
            &format!("rms_norm {shape:?}"),
            &[x, w],
            &|t| fused::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            &|t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            2e-6,
        );
    }
}

#[test]
fn rope_matches_composed() {
    for (i, (b, t, h, d, extra)) in
        [(1, 1, 1, 2, 0), (2, 5, 3, 8, 3), (1, 17, 2, 66, 1), (3, 9, 4, 64, 0)].into_iter().enumerate()
    {
        let x = rand_t(&[b, t, h, d], i as u64 + 7, 1.5);
        let (cos, sin) = ops::rope_tables(d, 10_000.0, t + extra, &Device::Cpu).unwrap();
        check(
            &format!("rope {:?}", (b, t, h, d)),
            &[x],
            &|v| fused::rope_bthd(&v[0], &cos, &sin).unwrap(),
            &|v| {
                ops::apply_rope(
                    &v[0].transpose(1, 2).unwrap().contiguous().unwrap(),
                    &cos.to_dtype(v[0].dtype()).unwrap(),
                    &sin.to_dtype(v[0].dtype()).unwrap(),
                )
                .unwrap()
            },
            1e-6,
        );
    }
}

/// The composed causal softmax: scale, an explicit `-inf` mask, softmax.
fn composed_causal_softmax(s: &Tensor, scale: f64) -> Tensor {
    let d = s.dims();
    let (tq, tk) = (d[d.len() - 2], d[d.len() - 1]);
    let mask: Vec<f64> =
        (0..tq).flat_map(|i| (0..tk).map(move |j| if j > i + tk - tq { f64::NEG_INFINITY } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask, (tq, tk), &Device::Cpu).unwrap().to_dtype(s.dtype()).unwrap();
    ops::softmax_last(&(s * scale).unwrap().broadcast_add(&mask).unwrap()).unwrap()
}

#[test]
fn causal_softmax_matches_composed() {
    for (i, shape) in [vec![1, 1], vec![2, 3, 5, 5], vec![7, 7], vec![2, 1, 3, 9], vec![1, 2, 130, 130], vec![3, 1, 1]]
        .into_iter()
        .enumerate()
    {
        let s = rand_t(&shape, i as u64 + 11, 6.0);
        let scale = 0.125 + i as f64 * 0.1;
        check(
            &format!("causal_softmax {shape:?}"),
            &[s],
            &|v| fused::causal_softmax(&v[0], scale).unwrap(),
            &|v| composed_causal_softmax(&v[0], scale),
            2e-6,
        );
    }
    assert!(fused::causal_softmax(&rand_t(&[2, 2], 1, 1.0), -1.0).is_err());
    assert!(fused::causal_softmax(&rand_t(&[3, 2], 1, 1.0), 1.0).is_err(), "Tk < Tq is refused");
}

#[test]
fn swiglu_matches_composed() {
    for (i, shape) in [vec![1], vec![3, 7], vec![2, 1025], vec![5, 8000]].into_iter().enumerate() {
        let g = rand_t(&shape, i as u64 + 21, 8.0);
        let u = rand_t(&shape, i as u64 + 31, 2.0);
        check(
            &format!("swiglu {shape:?}"),
            &[g, u],
            &|t| fused::swiglu(&t[0], &t[1]).unwrap(),
            &|t| (ops::silu(&t[0]).unwrap() * &t[1]).unwrap(),
            2e-6,
        );
    }
}

#[test]
fn cross_entropy_matches_composed() {
    for (i, (n, v)) in [(1, 1), (1, 3), (5, 17), (33, 1000), (4, 8192), (3, 70_001)].into_iter().enumerate() {
        let logits = rand_t(&[n, v], i as u64 + 41, 8.0);
        let targets: Vec<u32> =
            (0..n).map(|r| if r % 4 == 3 { NO_TARGET } else { ((r * 7919 + i) % v) as u32 }).collect();
        let tt = Tensor::from_vec(targets.clone(), n, &Device::Cpu).unwrap();
        let idx = Tensor::from_vec(
            targets.iter().map(|&t| if t == NO_TARGET { 0 } else { t }).collect::<Vec<u32>>(),
            (n, 1),
            &Device::Cpu,
        )
        .unwrap();
        let mask: Vec<f64> = targets.iter().map(|&t| if t == NO_TARGET { 0.0 } else { 1.0 }).collect();
        let mask = Tensor::from_vec(mask, n, &Device::Cpu).unwrap();
        check(
            &format!("cross_entropy {n}x{v}"),
            &[logits],
            &|t| fused::cross_entropy(&t[0], &tt).unwrap(),
            &|t| {
                let lp = ops::log_softmax_last(&t[0]).unwrap().gather(&idx, 1).unwrap().squeeze(1).unwrap();
                (lp.neg().unwrap() * mask.to_dtype(t[0].dtype()).unwrap()).unwrap()
            },
            5e-6,
        );
    }
}

#[test]
fn causal_lm_loss_fused_equals_composed() {
    let (b, t, v) = (3, 9, 101);
    let logits = rand_t(&[b, t, v], 5, 4.0);
    let labels: Vec<i64> = (0..b * t).map(|i| if i % 5 == 2 { -100 } else { (i * 31 % v) as i64 }).collect();
    let labels = Tensor::from_vec(labels, (b, t), &Device::Cpu).unwrap();
    check(
        "causal_lm_loss_sum",
        &[logits],
        &|x| fused::causal_lm_loss_sum(&x[0], &labels).unwrap().0,
        &|x| ops::causal_lm_loss_sum(&x[0], &labels).unwrap().0,
        2e-6,
    );
    assert_eq!(
        fused::causal_lm_loss_sum(&rand_t(&[b, t, v], 5, 4.0), &labels).unwrap().1,
        ops::causal_lm_loss_sum(&rand_t(&[b, t, v], 5, 4.0), &labels).unwrap().1
    );
    let bad = Tensor::from_vec(vec![0i64, v as i64], (1, 2), &Device::Cpu).unwrap();
    assert!(
        fused::causal_lm_loss_sum(&rand_t(&[1, 2, v], 1, 1.0), &bad).is_err(),
        "a label outside the vocabulary is an error"
    );
}

#[test]
fn exp_polynomial_is_used_within_tolerance_at_extremes() {
    // Very negative scores (masked-like) and large spreads stay finite and normalised.
    let s = Tensor::from_vec(vec![-1e4f32, 0.0, 80.0, -80.0, 1e4, 3.0], (1, 6), &Device::Cpu).unwrap();
    let p = fused::causal_softmax(
        &s.reshape((1, 1, 6)).unwrap().broadcast_as((1, 6, 6)).unwrap().contiguous().unwrap(),
        1.0,
    )
    .unwrap();
    let rows = p.sum(D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for r in rows {
        assert!((r - 1.0).abs() < 1e-6, "row sums to {r}");
    }
}

fn model_logits_and_grads(cfg: &ModelConfig, dtype: DType, fused_ops: bool) -> (Tensor, Vec<Tensor>) {
    let params = Params::genesis(cfg, 3, &Device::Cpu).unwrap();
    let mut map = std::collections::HashMap::new();
    let mut vars = Vec::new();
    for (s, v) in params.specs().iter().zip(params.vars()) {
        let var = Var::from_tensor(&v.as_tensor().to_dtype(dtype).unwrap()).unwrap();
        map.insert(s.name.clone(), var.as_tensor().clone());
        vars.push(var);
    }
    let vb = candle_nn::VarBuilder::from_tensors(map, dtype, &Device::Cpu);
    let model = Llama::load(vb, cfg).unwrap().with_compute_dtype(dtype).with_fused_ops(fused_ops);
    let ids = common::tokens(2, 11, cfg.vocab_size, 4);
    let labels = common::labels_of(&ids);
    let logits = model.forward(&ids).unwrap();
    let grads = model.loss(&ids, &labels).unwrap().backward().unwrap();
    (logits, vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect())
}

#[test]
fn model_with_fused_ops_matches_model_without() {
    for cfg in [common::micro_gqa(), ModelConfig::new(61, 24, 40, 2, 2, 2, 16, 1e-6)] {
        let (ref_logits, ref_grads) = model_logits_and_grads(&cfg, DType::F64, false);
        for (dtype, tol) in [(DType::F64, 1e-11), (DType::F32, 2e-5)] {
            let (logits, grads) = model_logits_and_grads(&cfg, dtype, true);
            let e = rel_err(&logits, &ref_logits);
            assert!(e <= tol, "{dtype:?} logits differ by {e:e}");
            for (i, (a, b)) in grads.iter().zip(&ref_grads).enumerate() {
                let e = rel_err(a, b);
                assert!(e <= tol, "{dtype:?} gradient of parameter {i} differs by {e:e}");
            }
        }
    }
}

#[test]
fn matmul_op_matches_candle_matmul_for_every_transpose() {
    let t = |x: &Tensor, yes: bool| if yes { x.transpose(D::Minus2, D::Minus1).unwrap() } else { x.clone() };
    for (i, (batch, m, k, n)) in
        [(vec![], 1, 1, 1), (vec![], 7, 5, 3), (vec![2, 3], 9, 17, 4), (vec![5], 33, 8, 65)].into_iter().enumerate()
    {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let mut sa = batch.clone();
            sa.extend(if ta { [k, m] } else { [m, k] });
            let mut sb = batch.clone();
            sb.extend(if tb { [n, k] } else { [k, n] });
            check(
                &format!("matmul {batch:?} {m}x{k}x{n} ta={ta} tb={tb}"),
                &[rand_t(&sa, 60 + i as u64, 1.0), rand_t(&sb, 70 + i as u64, 1.0)],
                &|x| fused::matmul(&x[0], &x[1], ta, tb).unwrap(),
                &|x| t(&x[0], ta).matmul(&t(&x[1], tb)).unwrap(),
                2e-6,
            );
        }
    }
    assert!(
        fused::matmul(&rand_t(&[2, 3], 1, 1.0), &rand_t(&[4, 5], 2, 1.0), false, false).is_err(),
        "inner dimensions must agree"
    );
}

#[test]
fn head_split_merge_and_flat_rope_match_composed() {
    for (i, (b, t, h, d)) in [(1, 1, 1, 2), (2, 5, 3, 8), (3, 9, 4, 64)].into_iter().enumerate() {
        let x = rand_t(&[b * t, h * d], 80 + i as u64, 1.0);
        let composed_split =
            |x: &Tensor| x.reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        check(
            &format!("split_heads {:?}", (b, t, h, d)),
            std::slice::from_ref(&x),
            &|v| fused::split_heads(&v[0], t, h).unwrap(),
            &|v| composed_split(&v[0]),
            1e-7,
        );
        let y = rand_t(&[b, h, t, d], 90 + i as u64, 1.0);
        check(
            &format!("merge_heads {:?}", (b, t, h, d)),
            &[y],
            &|v| fused::merge_heads(&v[0]).unwrap(),
            &|v| v[0].transpose(1, 2).unwrap().contiguous().unwrap().reshape((b * t, h * d)).unwrap(),
            1e-7,
        );
        let (cos, sin) = ops::rope_tables(d, 10_000.0, t, &Device::Cpu).unwrap();
        check(
            &format!("rope_to_heads {:?}", (b, t, h, d)),
            &[x],
            &|v| fused::rope_to_heads(&v[0], t, h, &cos, &sin).unwrap(),
            &|v| {
                ops::apply_rope(
                    &composed_split(&v[0]),
                    &cos.to_dtype(v[0].dtype()).unwrap(),
                    &sin.to_dtype(v[0].dtype()).unwrap(),
                )
                .unwrap()
            },
            1e-6,
        );
    }
    assert!(fused::split_heads(&rand_t(&[10, 6], 1, 1.0), 3, 2).is_err(), "10 rows do not split into sequences of 3");
}
