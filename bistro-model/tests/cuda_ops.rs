//! The fused ops' CUDA kernels (feature `cuda`): NVRTC compiles them (no GPU needed), and on
//! a GPU each op's value and gradients match the CPU kernels in f32 and bf16. Without a
//! usable CUDA device the GPU test prints why and returns.
#![cfg(feature = "cuda")]

use bistro_model::fused;
use bistro_model::ops;
use candle_core::{DType, Device, Tensor, Var};

#[test]
fn nvrtc_compiles_the_fused_kernels() {
    let ptx = fused::cuda_ptx().expect("NVRTC compiles the kernel source");
    for name in [
        "rms_fwd_f32",
        "rms_bwd_dx_bf16",
        "heads_bf16",
        "softmax_fwd_f32",
        "swiglu_bwd_bf16",
        "ce_bwd_f32",
        "adamw_f32",
    ] {
        assert!(ptx.contains(name), "{name} missing from the PTX");
    }
}

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIPPED the GPU comparison: no usable CUDA device ({e})");
            None
        }
    }
}

fn rand_t(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(bistro_kernels::rng::XorShift::new(seed).vec_f32(n, scale), shape, &Device::Cpu).unwrap()
}

/// Value and input gradients of `sum(f(inputs) * r)` on `dev` in `dtype`, back in f32 on the CPU.
fn run(dev: &Device, dtype: DType, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> =
        inputs.iter().map(|t| Var::from_tensor(&t.to_device(dev).unwrap().to_dtype(dtype).unwrap()).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let r = rand_t(out.dims(), 7, 1.0).to_device(dev).unwrap().to_dtype(out.dtype()).unwrap();
    let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut res = vec![out.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap()];
    for t in &ts {
        res.push(grads.get(t).unwrap().to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap());
    }
    res
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30)
}

fn compare(what: &str, dev: &Device, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, bf16_ok: bool) {
    let want = run(&Device::Cpu, DType::F32, inputs, f);
    let mut dtypes = vec![(DType::F32, 1e-4f32)];
    if bf16_ok {
        dtypes.push((DType::BF16, 5e-2));
    }
    for (dtype, tol) in dtypes {
        let got = run(dev, dtype, inputs, f);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = rel(g, w);
            assert!(e <= tol, "{what} {dtype:?}: output {i} differs by {e}");
        }
    }
}

#[test]
fn gpu_kernels_match_the_cpu_kernels() {
    let Some(dev) = gpu() else { return };
    let (b, t, h, d) = (2, 37, 3, 64);
    compare(
        "rms_norm",
        &dev,
        &[rand_t(&[b * t, 300], 1, 2.0), rand_t(&[300], 2, 1.0)],
        &|x| fused::rms_norm(&x[0], &x[1], 1e-5).unwrap(),
        true,
    );
    let (cos, sin) = ops::rope_tables(d, 10_000.0, t + 3, &Device::Cpu).unwrap();
    let (cos_d, sin_d) = (cos.to_device(&dev).unwrap(), sin.to_device(&dev).unwrap());
    compare(
        "rope",
        &dev,
        &[rand_t(&[b * t, h * d], 3, 1.0)],
        &|x| {
            let (c, s) = if x[0].device().is_cuda() { (&cos_d, &sin_d) } else { (&cos, &sin) };
            fused::rope_to_heads(&x[0], t, h, c, s).unwrap()
        },
        true,
    );
    compare(
        "split/merge heads",
        &dev,
        &[rand_t(&[b * t, h * d], 4, 1.0)],
        &|x| fused::merge_heads(&fused::split_heads(&x[0], t, h).unwrap()).unwrap(),
        true,
    );
    compare(
        "causal_softmax",
        &dev,
        &[rand_t(&[b, h, t, t], 5, 4.0)],
        &|x| fused::causal_softmax(&x[0], 0.125).unwrap(),
        true,
    );
    compare(
        "swiglu",
        &dev,
        &[rand_t(&[b * t, 333], 6, 4.0), rand_t(&[b * t, 333], 8, 1.0)],
        &|x| fused::swiglu(&x[0], &x[1]).unwrap(),
        true,
    );
    compare(
        "matmul nt",
        &dev,
        &[rand_t(&[b, h, t, d], 9, 1.0), rand_t(&[b, h, t, d], 10, 1.0)],
        &|x| fused::matmul(&x[0], &x[1], false, true).unwrap(),
        true,
    );
    let targets: Vec<u32> =
        (0..b * t).map(|i| if i % 5 == 0 { fused::NO_TARGET } else { (i * 97 % 1000) as u32 }).collect();
    let tt = Tensor::from_vec(targets, b * t, &Device::Cpu).unwrap();
    let tt_d = tt.to_device(&dev).unwrap();
    compare(
        "cross_entropy",
        &dev,
        &[rand_t(&[b * t, 1000], 11, 6.0)],
        &|x| fused::cross_entropy(&x[0], if x[0].device().is_cuda() { &tt_d } else { &tt }).unwrap(),
        false,
    );
}

#[test]
fn gpu_adamw_matches_the_cpu_adamw() {
    use bistro_model::optim::AdamW;
    use candle_nn::{Optimizer, ParamsAdamW};
    let Some(dev) = gpu() else { return };
    let params = ParamsAdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let init = rand_t(&[300, 77], 21, 1.0);
    let run = |d: &Device| {
        let var = Var::from_tensor(&init.to_device(d).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![var.clone()], params.clone()).unwrap();
        for step in 0..4 {
            let loss = (var.as_tensor().sqr().unwrap() * (1.0 + step as f64)).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        var.as_tensor().to_device(&Device::Cpu).unwrap()
    };
    let (cpu, gpu) = (run(&Device::Cpu), run(&dev));
    let e = rel(&gpu, &cpu);
    assert!(e <= 1e-5, "AdamW on the GPU differs by {e}");
}
