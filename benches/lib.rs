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
