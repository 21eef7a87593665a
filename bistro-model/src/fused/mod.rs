//! Fused ops with a backward pass, as Candle custom ops.
//!
//! Candle's own fused `rms_norm`, `softmax_last_dim`, `rope` and `sdpa` have no backward,
//! so a model built from them cannot be trained. Each op here is one pass over memory in
//! both directions, multi-threaded (rayon) and vectorised (AVX2+FMA chosen at run time) on
//! the CPU for f32 and f64, and a CUDA kernel for f32 and bf16 under the `cuda` feature.
//! The functions below fall back to the composed ops of [`crate::ops`] for any other
//! device or dtype, so they are always safe to call; `tests/fused_ops.rs` checks each
//! against its composed reference in value and gradient.

mod cpu;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod embedding;
mod matmul;
mod op;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;

use candle_core::{DType, Device, Result, Tensor, bail};

pub use cpu::exp_f32;
pub(crate) use cpu::{has_avx2_fma, on_pool};
use cross_entropy::CrossEntropyOp;
pub use cross_entropy::NO_TARGET;
#[cfg(feature = "cuda")]
pub use cuda::{SOURCE as CUDA_SOURCE, ptx as cuda_ptx};
pub use matmul::{Causal, causal_matmul, matmul};
use op::Fused;
use rms_norm::RmsNormOp;
pub use rope::HeadLayout;
use rope::{HeadsOp, RopeOp};
use softmax::CausalSoftmaxOp;
use swiglu::SwiGluOp;

use crate::ops;

/// Whether the fused kernels run for tensors like `t` (CPU f32/f64; CUDA f32/bf16 when
/// built with the `cuda` feature). Otherwise the functions here use the composed ops.
pub fn supported(t: &Tensor) -> bool {
    match t.device() {
        Device::Cpu => matches!(t.dtype(), DType::F32 | DType::F64),
        Device::Cuda(_) => cfg!(feature = "cuda") && matches!(t.dtype(), DType::F32 | DType::BF16),
        _ => false,
    }
}

/// RMSNorm over the last dimension (see [`ops::rms_norm`]), fused.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !supported(x) {
        return ops::rms_norm(x, weight, eps);
    }
    x.contiguous()?.apply_op2(&weight.to_dtype(x.dtype())?.contiguous()?, Fused(RmsNormOp { eps }))
}

/// Rotary embedding of `x: [B, T, H, D]` with `(cos, sin): [T', D/2]` (from
/// [`ops::rope_tables`]), returned transposed to `[B, H, T, D]`: the same as
/// `ops::apply_rope(&x.transpose(1, 2)?.contiguous()?, cos, sin)`, in one pass.
pub fn rope_bthd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, t, h, _d) = x.dims4()?;
    rope_op(x, HeadLayout { seq: t, heads: h, flat: false }, cos, sin)
}

/// Rotary embedding of the flat token-major `x: [B*T, H*D]` (a projection's output) into
/// head-major `[B, H, T, D]`, in one pass.
pub fn rope_to_heads(x: &Tensor, seq: usize, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_op(x, HeadLayout { seq, heads, flat: true }, cos, sin)
}

fn rope_op(x: &Tensor, layout: HeadLayout, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !supported(x) {
        return ops::apply_rope(&split_heads_composed(x, layout)?, cos, sin);
    }
    let table_dtype = if x.device().is_cpu() { x.dtype() } else { DType::F32 };
    let cos = cos.to_dtype(table_dtype)?.contiguous()?;
    let sin = sin.to_dtype(table_dtype)?.contiguous()?;
    x.contiguous()?.apply_op3(&cos, &sin, Fused(RopeOp { layout, backward: false }))
}

fn split_heads_composed(x: &Tensor, l: HeadLayout) -> Result<Tensor> {
    let x = if l.flat {
        let (bt, hd) = x.dims2()?;
        if l.seq == 0 || l.heads == 0 || bt % l.seq != 0 || hd % l.heads != 0 {
            bail!("heads: {:?} does not split into {} positions x {} heads", x.shape(), l.seq, l.heads);
        }
        x.reshape((bt / l.seq, l.seq, l.heads, hd / l.heads))?
    } else {
        x.clone()
    };
    x.transpose(1, 2)?.contiguous()
}

/// The flat token-major `x: [B*T, H*D]` as head-major `[B, H, T, D]`.
pub fn split_heads(x: &Tensor, seq: usize, heads: usize) -> Result<Tensor> {
    let layout = HeadLayout { seq, heads, flat: true };
    if !supported(x) {
        return split_heads_composed(x, layout);
    }
    x.contiguous()?.apply_op1(Fused(HeadsOp { layout, merge: false }))
}

/// Head-major `y: [B, H, T, D]` as the flat token-major `[B*T, H*D]`.
pub fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = y.dims4()?;
    if !supported(y) {
        return y.transpose(1, 2)?.contiguous()?.reshape((b * t, h * d));
    }
    y.contiguous()?.apply_op1(Fused(HeadsOp { layout: HeadLayout { seq: t, heads: h, flat: true }, merge: true }))
}

/// `softmax(scale * scores)` over the last dimension of `scores: [.., Tq, Tk]` under the
/// causal mask (query `i` sees keys `j <= i + Tk - Tq`); masked entries are 0. Statistics
/// are computed in f32 (f64 for f64); the result has the input's dtype.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    if !(scale > 0.0 && scale.is_finite()) {
        bail!("causal softmax: scale must be positive, got {scale}");
    }
    if !supported(scores) {
        let (tq, tk) = {
            let d = scores.dims();
            if d.len() < 2 {
                bail!("causal softmax: scores {:?} must be [.., Tq, Tk]", scores.shape());
            }
            (d[d.len() - 2], d[d.len() - 1])
        };
        let acc = ops::accum_dtype(scores.dtype());
        let mask = ops::causal_mask(tq, tk, acc, scores.device())?;
        let s = (scores.to_dtype(acc)? * scale)?.broadcast_add(&mask)?;
        return ops::softmax_last(&s)?.to_dtype(scores.dtype());
    }
    scores.contiguous()?.apply_op1(Fused(CausalSoftmaxOp { scale }))
}

/// SwiGLU `silu(gate) * up`, fused.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !supported(gate) || gate.dtype() != up.dtype() {
        return ops::silu(gate)? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Fused(SwiGluOp))
}

/// Per-row cross-entropy of `logits: [N, V]` (f32/f64) against `targets: [N]` (u32,
/// [`NO_TARGET`] for rows that do not count); `[N]` in the logits' dtype.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let ok = supported(logits) && logits.dtype() != DType::BF16;
    if !ok {
        bail!("cross-entropy: no fused kernel for {:?} on {:?}", logits.dtype(), logits.device().location());
    }
    logits.contiguous()?.apply_op2(&targets.to_dtype(DType::U32)?.contiguous()?, Fused(CrossEntropyOp))
}

/// The target of every position of `labels: [B, T]` for [`cross_entropy`], flat `[B*T]`
/// ([`NO_TARGET`] where none: the last position of each row and ignored labels), and the
/// number of counted targets; labels outside `0..vocab` are an error.
pub(crate) fn loss_targets(labels: &Tensor, vocab: usize, device: &Device) -> Result<(Tensor, usize)> {
    let (targets, count) = ops::shifted_targets(labels, vocab)?;
    let targets: Vec<u32> = targets.into_iter().map(|x| x.unwrap_or(NO_TARGET)).collect();
    let n = targets.len();
    Ok((Tensor::from_vec(targets, n, device)?, count))
}

/// Sum of the causal-LM cross-entropy and the number of counted targets, as
/// [`ops::causal_lm_loss_sum`] but through the fused [`cross_entropy`]: the logits are used
/// in place (no shifted copy), the last position of each row simply has no target.
/// `logits` is `[B, T, V]` or flat `[B*T, V]`.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t) = labels.dims2()?;
    let v = *logits.dims().last().unwrap_or(&0);
    if logits.elem_count() != b * t * v || logits.rank() < 2 {
        bail!("loss: logits {:?} do not match labels {:?}", logits.shape(), labels.shape());
    }
    if !(supported(logits) && logits.dtype() != DType::BF16) {
        return ops::causal_lm_loss_sum(&logits.reshape((b, t, v))?, labels);
    }
    let (targets, count) = loss_targets(labels, v, logits.device())?;
    let flat = if logits.rank() == 2 { logits.clone() } else { logits.reshape((b * t, v))? };
    let per_row = cross_entropy(&flat, &targets)?;
    Ok((per_row.sum_all()?, count))
}

/// The backward passes of the ops above, for the model's own backward pass
/// ([`crate::model::Llama::loss_grads`]). Each takes what its forward op saw (inputs and
/// output) and the output's gradient, and runs the same kernels Candle's autograd runs
/// through the ops' `backward`; the caller has checked [`supported`].
pub(crate) mod backward {
    use candle_core::{Result, Tensor};

    use super::op::Kernels;
    use super::{CausalSoftmaxOp, CrossEntropyOp, HeadLayout, HeadsOp, RmsNormOp, RopeOp, SwiGluOp};

    fn one<const N: usize>(grads: [Option<Tensor>; N], i: usize, what: &str) -> Result<Tensor> {
        grads.into_iter().nth(i).flatten().ok_or_else(|| candle_core::Error::Msg(format!("{what}: no gradient")))
    }

    fn both([a, b]: [Option<Tensor>; 2], what: &str) -> Result<(Tensor, Tensor)> {
        let missing = || candle_core::Error::Msg(format!("{what}: no gradient"));
        Ok((a.ok_or_else(missing)?, b.ok_or_else(missing)?))
    }

    /// `(dx, dw)` of [`super::rms_norm`] at input `x`, gain `w`.
    pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        both(RmsNormOp { eps }.backward([x, w], dy, dy)?, "rms-norm backward")
    }

    /// The flat `[B*T, H*D]` gradient of [`super::rope_to_heads`]'s input from the
    /// head-major gradient `dy: [B, H, T, D]`.
    pub(crate) fn rope_to_heads(dy: &Tensor, seq: usize, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let op = RopeOp { layout: HeadLayout { seq, heads, flat: true }, backward: false };
        one(op.backward([dy, cos, sin], dy, dy)?, 0, "rope backward")
    }

    /// The flat `[B*T, H*D]` gradient of [`super::split_heads`]'s input.
    pub(crate) fn split_heads(dy: &Tensor, seq: usize, heads: usize) -> Result<Tensor> {
        let op = HeadsOp { layout: HeadLayout { seq, heads, flat: true }, merge: false };
        one(op.backward([dy], dy, dy)?, 0, "split-heads backward")
    }

    /// The head-major `[B, H, T, D]` gradient of [`super::merge_heads`]'s input.
    pub(crate) fn merge_heads(dy: &Tensor, seq: usize, heads: usize) -> Result<Tensor> {
        let op = HeadsOp { layout: HeadLayout { seq, heads, flat: true }, merge: true };
        one(op.backward([dy], dy, dy)?, 0, "merge-heads backward")
    }

    /// The scores' gradient of [`super::causal_softmax`] from its output `p` and `dp`.
    pub(crate) fn causal_softmax(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Tensor> {
        one(CausalSoftmaxOp { scale }.backward([p], p, dp)?, 0, "causal softmax backward")
    }

    /// `(dgate, dup)` of [`super::swiglu`].
    pub(crate) fn swiglu(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        both(SwiGluOp.backward([gate, up], dy, dy)?, "swiglu backward")
    }

    pub(crate) use super::cross_entropy::loss_and_grad as cross_entropy_with_loss;
    pub(crate) use super::embedding::grad as embedding;

    /// The logits' gradient of [`super::cross_entropy`] given the per-row losses it returned
    /// and their gradient `grad: [N]`.
    pub(crate) fn cross_entropy(logits: &Tensor, targets: &Tensor, loss: &Tensor, grad: &Tensor) -> Result<Tensor> {
        one(CrossEntropyOp.backward([logits, targets], loss, grad)?, 0, "cross-entropy backward")
    }
}
