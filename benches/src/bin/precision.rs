//! How far an honest gradient computed another way lands from the validator's: the
//! relative error `e = ||g - g_v|| / ||g_v||` that the protocol's `honest_tolerance` must
//! admit, measured on the CPU on a real window (the embedded corpus, the devnet's
//! hyper-parameters) at genesis and after training.
//!
//! `g_v` is the validator's gradient: [`bistro_train::step::window_gradient`], f32, fused
//! ops, micro-batches of `--micro-rows` rows. The other ways:
//!
//! * `f64`: the exact gradient (f64 model, composed ops): how far f32 itself is from exact;
//! * `f32-order`: f32 with micro-batches of one row (another accumulation order);
//! * `f32-composed`: f32 through the composed reference ops (other kernels, as another
//!   implementation or device would have);
//! * `bf16`: matmuls and activations in bf16 with f32 master weights (a bf16-autocast
//!   miner), composed ops (the CPU has no fused bf16 kernels);
//! * with `--device cuda`: `device-f32` and `device-bf16`, the miner's step on the GPU
//!   (fused CUDA kernels, f32 with TF32 off as Candle defaults, and bf16 autocast) against
//!   the CPU validator: cross-hardware honesty (`benches/gpu/run.sh` runs this).
//!
//! Prints one JSON line per (state, way) and a closing line with the largest `e` per way.
//! `cargo run --release -p bistro-benches --bin precision -- --model tiny --windows 30`

use std::collections::HashMap;

use bistro_model::{Llama, ModelConfig, Params};
use bistro_train::HParams;
use bistro_train::data::{Dataset, TextTokenizer, WindowBatch};
use bistro_train::slices::{self, SliceIndices};
use bistro_train::step::window_gradient;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// All gradients flattened to one f64 vector (canonical order).
fn flat(grads: &[Tensor]) -> BoxResult<Vec<f64>> {
    let mut out = Vec::new();
    for g in grads {
        out.extend(g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
    }
    Ok(out)
}

/// `||a - b|| / ||b||`.
fn rel(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| y * y).sum();
    (d / n.max(1e-300)).sqrt()
}

/// The mean-loss gradient of `batch` through `model` over `vars` (one pass, no micro-batches).
fn gradient_over(model: &Llama, vars: &[Var], batch: &WindowBatch, dev: &Device) -> BoxResult<Vec<f64>> {
    let (ids, labels) = batch.tensors(0..batch.rows, dev)?;
    let (sum, n) = model.loss_sum(&ids, &labels)?;
    let g = (sum / n as f64)?.backward()?;
    let mut grads = Vec::with_capacity(vars.len());
    for v in vars {
        grads.push(g.get(v.as_tensor()).ok_or("a parameter received no gradient")?.clone());
    }
    flat(&grads)
}

/// A copy of `params` in `dtype` (its own variables) and the model over it.
fn model_in(params: &Params, dtype: DType, dev: &Device) -> BoxResult<(Llama, Vec<Var>)> {
    let mut map = HashMap::new();
    let mut vars = Vec::new();
    for (s, v) in params.specs().iter().zip(params.vars()) {
        let var = Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)?;
        map.insert(s.name.clone(), var.as_tensor().clone());
        vars.push(var);
    }
    let model = Llama::load(VarBuilder::from_tensors(map, dtype, dev), params.config())?
        .with_compute_dtype(dtype)
        .with_fused_ops(false);
    Ok((model, vars))
}

fn main() -> BoxResult<()> {
    let get = bistro_benches::arg;
    let preset = get("--model", "tiny");
    let windows: u64 = get("--windows", "30").parse()?;
    let every: u64 = get("--every", "10").parse()?;
    let micro_rows: usize = get("--micro-rows", "8").parse()?;
    let device = bistro_model::parse_device(&get("--device", "cpu"))?;
    let h = HParams::default();
    let dev = Device::Cpu;
    let cfg = ModelConfig::preset(&preset)?;
    let params = Params::genesis(&cfg, h.genesis_seed, &dev)?;
    let mut adam = bistro_train::public_adam::PublicAdam::zeros(params.specs());
    let dataset = Dataset::open(&h.dataset, h.rows_per_page)?;
    let tokenizer = TextTokenizer::open(&h.tokenizer)?;
    let f32_model = Llama::new(&params)?;
    let composed = Llama::new(&params)?.with_fused_ops(false);
    // The largest `e` of each way, in the order the ways are measured.
    let mut worst: Vec<(&str, f64)> = Vec::new();
    for w in 0..=windows {
        let pages = dataset.pages(&h.network, "precision", w, h.pages_per_window);
        let batch = dataset.window_batch(&tokenizer, &pages, h.seq_len)?;
        let gv = window_gradient(&f32_model, &params, &batch, micro_rows, &dev, || true)?;
        if w % every == 0 {
            let g_v = flat(&gv.grads)?;
            let g_norm = g_v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let mut ways = vec![
                ("f64", {
                    let (m, vars) = model_in(&params, DType::F64, &dev)?;
                    gradient_over(&m, &vars, &batch, &dev)
                }),
                ("f32-order", flat(&window_gradient(&f32_model, &params, &batch, 1, &dev, || true)?.grads)),
                ("f32-composed", flat(&window_gradient(&composed, &params, &batch, micro_rows, &dev, || true)?.grads)),
                ("bf16", {
                    let (m, vars) = model_in(&params, DType::BF16, &dev)?;
                    gradient_over(&m, &vars, &batch, &dev)
                }),
            ];
            if !device.is_cpu() {
                let tensors = params.vars().iter().map(|v| v.as_tensor().clone()).collect();
                let on_device = Params::from_tensors(&cfg, tensors, &device)?;
                for (way, dtype) in [("device-f32", DType::F32), ("device-bf16", DType::BF16)] {
                    let m = Llama::new(&on_device)?.with_compute_dtype(dtype);
                    ways.push((
                        way,
                        flat(&window_gradient(&m, &on_device, &batch, micro_rows, &device, || true)?.grads),
                    ));
                }
            }
            // Protocol v4 checks codes, not the gradient: the validator's f32 gradient at the
            // window's coordinates against each way's codes under a miner's public dithers.
            let seed = w.to_le_bytes();
            let indices = SliceIndices::select(params.specs(), &seed, h.compression);
            let at_i = |flat: &[f64]| -> Vec<Vec<f32>> {
                let mut start = 0;
                params
                    .specs()
                    .iter()
                    .zip(indices.all())
                    .map(|(s, ids)| {
                        let v = ids.iter().map(|&i| flat[start + i as usize] as f32).collect();
                        start += s.numel();
                        v
                    })
                    .collect()
            };
            let v_at_i = at_i(&g_v);
            let codec = h.codec();
            let dithers = slices::dithers(&seed, "precision", &indices);
            for (way, g) in ways {
                let g = g?;
                let e = rel(&g, &g_v);
                let w_at_i = at_i(&g);
                let codes = slices::encode_gradient(&codec, &w_at_i, &dithers);
                let tol = h.code_tolerance();
                let (mut bins, mut c) = (0f64, slices::quant::Consistency::default());
                for ((v, x), (q, u)) in v_at_i.iter().zip(&w_at_i).zip(codes.iter().zip(&dithers)) {
                    bins = bins.max(codec.max_bin_deviation(v, x));
                    c.merge(&codec.check(v, q, u, tol));
                }
                let codes_e = c.relative_error();
                match worst.iter_mut().find(|(n, _)| *n == way) {
                    Some(slot) => slot.1 = slot.1.max(e),
                    None => worst.push((way, e)),
                }
                println!(
                    r#"{{"what":"honest_e","model":"{preset}","window":{w},"loss":{:.4},"grad_norm":{g_norm:.3e},"way":"{way}","e":{e:.3e},"tolerance":{},"bins":{bins:.3e},"bins_tolerance":{},"codes_e":{codes_e:.3e}}}"#,
                    gv.loss, h.honest_tolerance, h.code_tolerance_bins
                );
            }
        }
        // Train on as the protocol does with one honest miner: its codes at the window's slice
        // coordinates I, decoded, through the public AdamW step; the rest unchanged.
        let seed = w.to_le_bytes();
        let indices = SliceIndices::select(params.specs(), &seed, h.compression);
        let g_at_i = slices::gather_grads(&gv.grads, &indices)?;
        let codec = h.codec();
        let codes = slices::encode_gradient(&codec, &g_at_i, &slices::dithers(&seed, "precision", &indices));
        let decoded: Vec<Vec<f32>> = codes.iter().map(|q| codec.decode(q)).collect();
        adam.apply(&params, &indices, &decoded, &bistro_train::public_adam::AdamStep::of(&h, w))?;
    }
    let summary: Vec<String> = worst.iter().map(|(n, e)| format!(r#""{n}":{e:.3e}"#)).collect();
    println!(r#"{{"what":"honest_e_max","model":"{preset}","windows":{windows},{}}}"#, summary.join(","));
    Ok(())
}
