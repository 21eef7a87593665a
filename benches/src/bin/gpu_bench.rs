//! The GPU benchmark (`benches/gpu/run.sh` runs it on a machine with no cargo): training
//! step tokens/s and MFU of `125m` and `1b` in bf16 (f32 master weights, AdamW), device
//! memory in use around the `1b` step, the gradient-difference-norm kernel's bandwidth next
//! to a device-to-device copy of the same bytes, and validator throughput (`1b` miners
//! scored per 24 s and 36 s window) at the f32 recompute the numeric contract requires
//! (TF32 off), with the bf16 figure beside it. Prints one JSON object per measurement.
//!
//! Build (on any machine, no GPU needed): `bash benches/gpu/build.sh`. `--cpu-smoke` runs the
//! step measurement on the CPU with `tiny` (any build), to check the harness itself.

use std::time::Instant;

use bistro_model::optim::AdamW;
use bistro_model::{Llama, ModelConfig, Params};
use candle_core::{DType, Device};
use candle_nn::{Optimizer, ParamsAdamW};

#[global_allocator]
static ALLOC: bistro_train::process::MiMalloc = bistro_train::process::MiMalloc;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// What one training-step measurement needs.
struct Run<'a> {
    dev: &'a Device,
    preset: &'a str,
    dtype: DType,
    batch: usize,
    seq: usize,
    steps: usize,
    peak_tflops: f64,
    /// Device memory in use, in bytes (0 where unknown).
    mem: &'a dyn Fn() -> u64,
}

/// Times `steps` full steps (after 2 warm-up steps), prints one JSON line, and returns the
/// median forward+backward time.
fn train(r: &Run) -> BoxResult<f64> {
    let cfg = ModelConfig::preset(r.preset)?;
    let params = Params::genesis(&cfg, 0, r.dev)?;
    let model = Llama::new(&params)?.with_compute_dtype(r.dtype);
    let (ids, labels) = bistro_benches::synthetic_batch(r.batch, r.seq, cfg.vocab_size, r.dev)?;
    let mut opt = AdamW::new(
        params.vars().to_vec(),
        ParamsAdamW { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 },
    )?;
    let base = (r.mem)();
    let (mut peak, mut times, mut fwd_bwd) = (0u64, Vec::new(), Vec::new());
    for i in 0..r.steps + 2 {
        r.dev.synchronize()?;
        let t0 = Instant::now();
        // The model's own backward pass where it applies (f32), else Candle's autograd.
        let n = (r.batch * (r.seq - 1)) as f64;
        let grads = model.loss_grads(&ids, &labels, 1.0 / n)?.grads;
        r.dev.synchronize()?;
        peak = peak.max((r.mem)());
        let t_fb = t0.elapsed().as_secs_f64();
        opt.step(&grads)?;
        drop(grads);
        r.dev.synchronize()?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
            fwd_bwd.push(t_fb);
        }
    }
    times.sort_by(f64::total_cmp);
    fwd_bwd.sort_by(f64::total_cmp);
    let (wall, fb) = (times[times.len() / 2], fwd_bwd[fwd_bwd.len() / 2]);
    let tokens = (r.batch * r.seq) as f64;
    let flops = bistro_benches::flops_per_token(&cfg, r.seq);
    let mfu = tokens / wall * flops / (r.peak_tflops * 1e12);
    println!(
        r#"{{"what":"train_step","impl":"bistro","model":"{}","dtype":"{:?}","batch":{},"seq":{},"step_s":{wall:.4},"tokens_per_s":{:.0},"mfu":{mfu:.4},"fwd_bwd_s":{fb:.4},"device_mem_in_use_gb":{:.2},"device_mem_before_gb":{:.2},"flops_per_token":{flops:.0}}}"#,
        r.preset,
        r.dtype,
        r.batch,
        r.seq,
        tokens / wall,
        peak as f64 / 1e9,
        base as f64 / 1e9
    );
    Ok(fb)
}

fn main() -> BoxResult<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { bistro_train::process::tune() };
    if std::env::args().any(|a| a == "--cpu-smoke") {
        let run = Run {
            dev: &Device::Cpu,
            preset: "tiny",
            dtype: DType::F32,
            batch: 2,
            seq: 32,
            steps: 1,
            peak_tflops: 1.0,
            mem: &|| 0,
        };
        train(&run)?;
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    return gpu::main();
    #[cfg(not(feature = "cuda"))]
    {
        eprintln!("gpu_bench was built without the `cuda` feature; build it with benches/gpu/build.sh");
        std::process::exit(2);
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::time::Instant;

    use bistro_kernels::cuda::CudaDiffNorm;
    use bistro_model::ModelConfig;
    use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
    use candle_core::{DType, Device};

    use super::{BoxResult, Run, train};
    use bistro_benches::arg;

    fn used_bytes() -> u64 {
        mem_get_info().map(|(free, total)| (total - free) as u64).unwrap_or(0)
    }

    /// The norm kernel over `miners` slices of `n` values, and a device-to-device copy of
    /// the same bytes; returns the kernel time per miner.
    fn diff_norm(miners: usize, n: usize) -> BoxResult<f64> {
        let k = CudaDiffNorm::new(0)?;
        let theta: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 1e-3).collect();
        let gv: Vec<f32> = (0..n).map(|i| (i % 89) as f32 * 1e-4).collect();
        let slices: Vec<Vec<f32>> =
            (0..miners).map(|m| (0..n).map(|i| ((i + m) % 83) as f32 * 1e-3).collect()).collect();
        let refs: Vec<&[f32]> = slices.iter().map(|s| s.as_slice()).collect();
        let inputs = k.upload(&theta, &gv, &refs)?;
        let stream = k.context().default_stream();
        let reps = 20;
        k.run(&inputs, 0.01)?;
        stream.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..reps {
            k.run(&inputs, 0.01)?;
        }
        stream.synchronize()?;
        let t_kernel = t0.elapsed().as_secs_f64() / reps as f64;
        let bytes = ((miners + 2) * n * 4) as f64;
        let src = stream.alloc_zeros::<f32>((miners + 2) * n)?;
        let mut dst = stream.alloc_zeros::<f32>((miners + 2) * n)?;
        stream.memcpy_dtod(&src, &mut dst)?;
        stream.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..reps {
            stream.memcpy_dtod(&src, &mut dst)?;
        }
        stream.synchronize()?;
        let t_copy = t0.elapsed().as_secs_f64() / reps as f64;
        // A copy reads and writes every byte; the kernel only reads.
        let (kernel_gbs, copy_gbs) = (bytes / t_kernel / 1e9, 2.0 * bytes / t_copy / 1e9);
        println!(
            r#"{{"what":"diff_norm","miners":{miners},"params":{n},"kernel_s":{t_kernel:.5},"kernel_read_gb_per_s":{kernel_gbs:.0},"d2d_copy_gb_per_s":{copy_gbs:.0},"ratio":{:.3}}}"#,
            kernel_gbs / copy_gbs
        );
        Ok(t_kernel / miners as f64)
    }

    pub(crate) fn main() -> BoxResult<()> {
        let dev = Device::new_cuda(0)?;
        // `mem_get_info` reads the context current on this thread.
        dev.as_cuda_device()?.cuda_stream().context().bind_to_thread()?;
        let peak_tflops: f64 = arg("--peak-tflops", "989.4").parse()?;
        let steps: usize = arg("--steps", "5").parse()?;
        let seq: usize = arg("--seq", "2048").parse()?;
        let b125: usize = arg("--batch-125m", "16").parse()?;
        let b1b: usize = arg("--batch-1b", "4").parse()?;
        let mem = || used_bytes();
        let run =
            |preset, batch| Run { dev: &dev, preset, dtype: DType::BF16, batch, seq, steps, peak_tflops, mem: &mem };
        train(&run("125m", b125))?;
        let fb_1b = train(&run("1b", b1b))?;
        // The numeric contract: a validator recomputes in f32 with TF32 off (a bf16 or TF32
        // gradient lands at e of 0.006-0.011, above the honest tolerance), so its
        // throughput is the f32 step's, not the bf16 step's above.
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(false);
        let fb_1b_f32 = train(&Run { dtype: DType::F32, ..run("1b", b1b) })?;
        let n_1b = ModelConfig::preset("1b")?.num_params();
        // The validator scores a miner by one forward+backward on its pages and one pass of
        // the difference norm over its slice (here the whole parameter vector, the worst case).
        let per_miner_norm = diff_norm(8, n_1b)?;
        for (dtype, fb) in [("f32", fb_1b_f32), ("bf16", fb_1b)] {
            let per_miner = fb + per_miner_norm;
            println!(
                r#"{{"what":"validator","model":"1b","dtype":"{dtype}","contract":{},"batch":{b1b},"seq":{seq},"recompute_s":{fb:.4},"norm_s":{per_miner_norm:.5},"miners_per_24s_window":{:.1},"miners_per_36s_window":{:.1}}}"#,
                dtype == "f32",
                24.0 / per_miner,
                36.0 / per_miner
            );
        }
        Ok(())
    }
}
