//! Differentiable building blocks.
//!
//! Candle 0.11's fused `rms_norm`, `softmax_last_dim`, `rope` and `sdpa` are applied
//! without a backward pass and silently stop gradients. Everything here is composed
//! from ops that Candle can differentiate.

use candle_core::{D, DType, Device, Result, Tensor};

/// Label value that the loss ignores (Hugging Face's `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// The dtype statistics are accumulated in: f64 stays f64, everything else uses f32.
pub fn accum_dtype(d: DType) -> DType {
    if d == DType::F64 { DType::F64 } else { DType::F32 }
}

/// RMSNorm over the last dimension, computed in f32 (f64 for an f64 model): `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let in_dtype = x.dtype();
    let x = x.to_dtype(accum_dtype(in_dtype))?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    let y = x.broadcast_mul(&inv)?;
    y.to_dtype(in_dtype)?.broadcast_mul(&weight.to_dtype(in_dtype)?)
}

/// Softmax over the last dimension, numerically stable; the max is a constant for autograd.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Log-softmax over the last dimension (the max is a constant for autograd).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// SiLU `x * sigmoid(x)`: Candle's unary op, which has a backward pass.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// Rotary tables `(cos, sin)`, each `[seq_len, head_dim / 2]` in f32, as Hugging Face
/// computes them: `inv_freq[i] = 1 / theta^(2i / head_dim)` in f32.
pub fn rope_tables(head_dim: usize, theta: f64, seq_len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half).map(|i| 1f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
    let mut cos = Vec::with_capacity(seq_len * half);
    let mut sin = Vec::with_capacity(seq_len * half);
    for p in 0..seq_len {
        for &f in &inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((Tensor::from_vec(cos, (seq_len, half), device)?, Tensor::from_vec(sin, (seq_len, half), device)?))
}

/// Apply rotary embeddings, Hugging Face's "rotate half" layout, to `x: [B, H, T, D]`
/// with tables `[T, D/2]`. Differentiable.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, _h, t, d) = x.dims4()?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.narrow(0, 0, t)?.to_dtype(x.dtype())?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.narrow(0, 0, t)?.to_dtype(x.dtype())?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Additive causal mask `[Tq, Tk]` (`Tk >= Tq`): query `i` sees keys `j <= i + Tk - Tq`
/// (0 there), -inf elsewhere. For `Tq == Tk`: 0 on and below the diagonal.
pub fn causal_mask(tq: usize, tk: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    if tk < tq {
        candle_core::bail!("causal mask: {tk} keys for {tq} queries");
    }
    let mask: Vec<f32> =
        (0..tq).flat_map(|i| (0..tk).map(move |j| if j > i + (tk - tq) { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (tq, tk), device)?.to_dtype(dtype)
}

/// The targets of a causal LM for `labels: [B, T]`: position `t` predicts `labels[t + 1]`;
/// the last position of each row and ignored labels (negative) get `None`. Also returns the
/// number of counted targets. Labels at or above `vocab` are an error.
pub fn shifted_targets(labels: &Tensor, vocab: usize) -> Result<(Vec<Option<u32>>, usize)> {
    let (b, t) = labels.dims2()?;
    let host = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut out = Vec::with_capacity(b * t);
    let mut count = 0usize;
    for row in &host {
        for i in 0..t {
            let next = if i + 1 < t { row[i + 1] } else { -1 };
            if next >= 0 && (next as usize) < vocab {
                out.push(Some(next as u32));
                count += 1;
            } else if next >= 0 {
                candle_core::bail!("label {next} is outside the vocabulary of {vocab} tokens");
            } else {
                out.push(None);
            }
        }
    }
    Ok((out, count))
}

/// Sum of the causal-LM cross-entropy and the number of counted targets, composed from
/// differentiable Candle ops (the reference for the fused
/// [`crate::fused::causal_lm_loss_sum`], which the model uses).
///
/// `logits: [B, T, V]`, `labels: [B, T]` (i64, aligned with the inputs as in Hugging Face:
/// position `t` predicts `labels[t + 1]`); labels equal to [`IGNORE_INDEX`] (or any
/// negative value) are not counted. The sum is a scalar in the accumulation dtype.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    let (targets, count) = shifted_targets(labels, v)?;
    let logits = logits.to_dtype(accum_dtype(logits.dtype()))?.reshape((b * t, v))?;
    let idx: Vec<u32> = targets.iter().map(|x| x.unwrap_or(0)).collect();
    let mask: Vec<f32> = targets.iter().map(|x| if x.is_some() { 1.0 } else { 0.0 }).collect();
    let n = idx.len();
    let idx = Tensor::from_vec(idx, (n, 1), logits.device())?;
    let mask = Tensor::from_vec(mask, n, logits.device())?.to_dtype(logits.dtype())?;
    let logp = log_softmax_last(&logits)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?;
    let sum = picked.mul(&mask)?.sum_all()?.neg()?;
    Ok((sum, count))
}
