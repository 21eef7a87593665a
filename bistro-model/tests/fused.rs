//! The fused cross-entropy matches the composed reference in value and gradient.

use bistro_model::ops::causal_lm_loss_sum;
use candle_core::{DType, Device, Tensor, Var};

fn check(b: usize, t: usize, v: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let logits: Vec<f32> = (0..b * t * v).map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0).collect();
    let labels: Vec<i64> = (0..b * t).map(|i| if i % 7 == 3 { -100 } else { (next() % v as u64) as i64 }).collect();
    let labels = Tensor::from_vec(labels, (b, t), &Device::Cpu).unwrap();
    // Fused: f32 on the CPU.
    let l32 = Var::from_tensor(&Tensor::from_vec(logits.clone(), (b, t, v), &Device::Cpu).unwrap()).unwrap();
    let (s32, n32) = causal_lm_loss_sum(l32.as_tensor(), &labels).unwrap();
    let g32 = s32.backward().unwrap().get(l32.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
    // Composed reference: the same in f64.
    let l64 = Var::from_tensor(&l32.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
    let (s64, n64) = causal_lm_loss_sum(l64.as_tensor(), &labels).unwrap();
    let g64 = s64.backward().unwrap().get(l64.as_tensor()).unwrap().clone();
    assert_eq!(n32, n64);
    let (a, r) = (s32.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(), s64.to_scalar::<f64>().unwrap());
    assert!((a - r).abs() <= 1e-5 * r.abs(), "loss {a} vs {r} ({b}x{t}x{v})");
    let diff = (&g32 - &g64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let norm = g64.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    assert!(diff <= 1e-5 * norm, "gradient differs by {diff} (norm {norm}) at {b}x{t}x{v}");
    // Ignored targets and the last position get no gradient.
    let g = g32.to_vec3::<f64>().unwrap();
    for bi in 0..b {
        assert!(g[bi][t - 1].iter().all(|&z| z == 0.0));
    }
}

#[test]
fn fused_cross_entropy_matches_the_composed_reference() {
    for (b, t, v, s) in [(1, 2, 3, 1), (2, 5, 17, 2), (3, 9, 101, 3), (2, 33, 1000, 4), (1, 4, 8192, 5)] {
        check(b, t, v, s);
    }
}
