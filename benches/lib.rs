//! Shared helpers for BISTRO's criterion benchmarks (`cargo bench -p bistro-benches`).

use candle_core::{DType, Device, Tensor};

/// A deterministic `[b, t]` batch of token ids below `vocab`, with labels equal to the ids.
pub fn synthetic_batch(b: usize, t: usize, vocab: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let mut rng = bistro_kernels::rng::XorShift::new(0);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let labels = ids.to_dtype(DType::I64)?;
    Ok((ids, labels))
}

/// This machine's CPU as `/proc/cpuinfo` names it: model name, family and model numbers, and
/// the widest f32 SIMD the kernels can use (`avx512f`, `avx2+fma`, or neither), with the core
/// count. Benchmarks print it: results depend on it.
pub fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    #[cfg(target_arch = "x86_64")]
    let simd = if is_x86_feature_detected!("avx512f") {
        "avx512f"
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        "avx2+fma"
    } else {
        "no avx2"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let simd = std::env::consts::ARCH;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{} (family {}, model {}), {cores} cores, {simd}", field("model name"), field("cpu family"), field("model"))
}

/// The value after flag `name` on this program's command line (`--steps 5`), else `default`.
/// The bench binaries take a few such flags each; they are tools, not a product CLI.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

/// Training FLOPs per token of `cfg` at sequence length `seq` (PaLM, appendix B): 6 N (N
/// without the embedding table) plus 12 L H T for the attention products.
pub fn flops_per_token(cfg: &bistro_model::ModelConfig, seq: usize) -> f64 {
    let n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size;
    6.0 * n as f64 + 12.0 * (cfg.num_hidden_layers * cfg.hidden_size * seq) as f64
}
