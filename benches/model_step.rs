//! One training step (forward + backward) of the `tiny` and `small` presets on the CPU:
//! the model's own backward pass (the default), the fused ops through Candle's autograd,
//! and the composed reference ops.
//!
//! Criterion reports throughput in elements/s, where an element is one token, so the
//! figure is tokens/s. Batch shapes match `benches/torch_reference.py`
//! (tiny: 8x256, small: 4x256).

use bistro_model::{Llama, ModelConfig, Params};
use candle_core::Device;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

#[global_allocator]
static ALLOC: bistro_train::process::MiMalloc = bistro_train::process::MiMalloc;

fn step(c: &mut Criterion) {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { bistro_train::process::tune() };
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("train_step_fwd_bwd");
    group.sample_size(10);
    for (preset, b, t) in [("tiny", 8usize, 256usize), ("small", 4, 256)] {
        let cfg = ModelConfig::preset(preset).expect("preset");
        let params = Params::genesis(&cfg, 0, &dev).expect("genesis");
        let (ids, labels) = bistro_benches::synthetic_batch(b, t, cfg.vocab_size, &dev).expect("batch");
        group.throughput(Throughput::Elements((b * t) as u64));
        // The model's own backward pass (what miners and validators run), the fused ops
        // through Candle's autograd, and the composed reference ops through autograd.
        for (kind, fused, own) in [("own", true, true), ("fused", true, false), ("composed", false, false)] {
            let model = Llama::new(&params).expect("model").with_fused_ops(fused);
            let scale = 1.0 / (b * (t - 1)) as f64;
            group.bench_function(format!("{preset}_{b}x{t}_{kind}"), |bench| {
                bench.iter(|| {
                    let grads = if own {
                        model.loss_grads(&ids, &labels, scale).expect("loss and gradient").grads
                    } else {
                        model.loss(&ids, &labels).expect("loss").backward().expect("backward")
                    };
                    std::hint::black_box(grads);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
