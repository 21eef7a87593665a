//! Cross-entropy over the vocabulary, per row, with its backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::cpu::{
    Real, assume_init, fill, for_float, map_sum, max_all, par_filled, par_written_pair, simd_dispatch, slice, sum_map,
    zeros,
};
#[cfg(feature = "cuda")]
use super::op::Cuda;
use super::op::{Cpu, Fused, Kernels};

/// Target value meaning "no target" for the fused cross-entropy ([`super::cross_entropy`]).
pub const NO_TARGET: u32 = u32::MAX;

/// Per-row cross-entropy `logsumexp(logits[r]) - logits[r, target[r]]` over `[N, V]` logits
/// and `[N]` u32 targets ([`NO_TARGET`] rows give 0 and no gradient). Rows run in parallel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CrossEntropyOp;

/// The backward op: `(logits, targets, [grad; loss] as [2, N]) -> (softmax(logits[r]) -
/// onehot(target[r])) * grad[r]`. The forward's loss gives `logsumexp = loss + logits[target]`,
/// so the backward reads each row twice instead of three times.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CrossEntropyBackward;

/// The forward and backward in one op, CPU only (see [`loss_and_grad`]): `(logits [N, V],
/// targets [N]) -> [N * V + N]`, the logits' gradient for a gradient `g` on every row's loss,
/// then the per-row losses.
#[derive(Clone, Copy, Debug)]
struct CrossEntropyLossGrad {
    /// The gradient of every row's loss.
    g: f64,
}

#[inline(always)]
fn logsumexp<T: Real>(row: &[T]) -> T {
    let max = max_all(row);
    max + sum_map(row, |x| (x - max).exp_()).ln_()
}

#[inline(always)]
fn fwd_rows<T: Real>(logits: &[T], targets: &[u32], out: &mut [T]) {
    let v = logits.len() / targets.len().max(1);
    for ((row, &t), o) in logits.chunks_exact(v).zip(targets).zip(out.iter_mut()) {
        *o = if t == NO_TARGET || t as usize >= v { T::ZERO } else { logsumexp(row) - row[t as usize] };
    }
}
simd_dispatch!(fwd_rows_dispatch => fwd_rows(logits: &[T], targets: &[u32], out: &mut [T]));

#[inline(always)]
fn bwd_row<T: Real>(row: &[T], target: u32, g: T, loss: T, out: &mut [T]) {
    if target == NO_TARGET || target as usize >= row.len() {
        for o in out.iter_mut() {
            *o = T::ZERO;
        }
        return;
    }
    let lse = loss + row[target as usize];
    for (o, &x) in out.iter_mut().zip(row) {
        *o = (x - lse).exp_() * g;
    }
    out[target as usize] -= g;
}
simd_dispatch!(bwd_row_dispatch => bwd_row(row: &[T], target: u32, g: T, loss: T, out: &mut [T]));

/// Forward and backward of rows in one go: `loss[r]` and `dl[r] = (softmax(logits[r]) -
/// onehot(target[r])) * g`. Each row's `exp` is computed once, written to `dl` while it is
/// summed, then scaled in place while the row is still in cache; the separate forward and
/// backward compute it twice and read the logits three times.
#[inline(always)]
fn loss_grad_rows<T: Real>(
    logits: &[T],
    targets: &[u32],
    g: T,
    dl: &mut [MaybeUninit<T>],
    loss: &mut [MaybeUninit<T>],
) {
    let v = logits.len() / targets.len().max(1);
    for (((row, &t), out), l) in logits.chunks_exact(v).zip(targets).zip(dl.chunks_exact_mut(v)).zip(loss.iter_mut()) {
        if t == NO_TARGET || t as usize >= v {
            fill(out, T::ZERO);
            l.write(T::ZERO);
            continue;
        }
        let max = max_all(row);
        let sum = map_sum(row, out, |x| (x - max).exp_());
        // SAFETY: `map_sum` wrote every element of `out` (`row` has its length).
        let out = unsafe { assume_init(out) };
        let inv = g / sum;
        for o in out.iter_mut() {
            *o *= inv;
        }
        out[t as usize] -= g;
        l.write(max + sum.ln_() - row[t as usize]);
    }
}
simd_dispatch!(loss_grad_rows_dispatch => loss_grad_rows(logits: &[T], targets: &[u32], g: T, dl: &mut [MaybeUninit<T>], loss: &mut [MaybeUninit<T>]));

/// Rows per task of the backward kernels: each row is a whole vocabulary.
const LOSS_GRAD_ROWS: usize = 4;

/// The logits' gradient `[N * V]` followed by the per-row losses `[N]`, in one vector.
fn loss_grad_cpu<T: Real>(logits: &[T], targets: &[u32], v: usize, g: f64) -> Vec<T> {
    let n = targets.len();
    // SAFETY: `loss_grad_rows` writes every element of its rows' gradient and losses, and
    // each task gets matching whole rows of both.
    unsafe {
        par_written_pair((n * v, LOSS_GRAD_ROWS * v), (n, LOSS_GRAD_ROWS), |i, dl, loss| {
            let r = i * LOSS_GRAD_ROWS..i * LOSS_GRAD_ROWS + loss.len();
            loss_grad_rows_dispatch(&logits[r.start * v..r.end * v], &targets[r], T::of(g), dl, loss)
        })
    }
}

/// The per-row losses `[N]` of [`super::cross_entropy`] and the logits' gradient `[N, V]` for
/// a gradient of `g` on every row's loss, in one pass on the CPU (the forward op and its
/// backward elsewhere). For the model's own backward pass, which needs both at once.
pub(crate) fn loss_and_grad(logits: &Tensor, targets: &Tensor, g: f64) -> Result<(Tensor, Tensor)> {
    let (n, v) = logits.dims2()?;
    let targets = targets.to_dtype(candle_core::DType::U32)?.contiguous()?;
    if !logits.device().is_cpu() {
        let loss = super::cross_entropy(logits, &targets)?;
        let grad = Tensor::full(g, n, logits.device())?.to_dtype(loss.dtype())?;
        let dl = super::backward::cross_entropy(logits, &targets, &loss, &grad)?;
        return Ok((loss, dl));
    }
    let both = logits.contiguous()?.apply_op2_no_bwd(&targets, &Fused(CrossEntropyLossGrad { g }))?;
    // The losses copied out, so that holding them does not keep the gradient's buffer.
    Ok((both.narrow(0, n * v, n)?.copy()?, both.narrow(0, 0, n * v)?.reshape((n, v))?))
}

fn rows_per_chunk(v: usize) -> usize {
    (65_536 / v.max(1)).max(1)
}

fn fwd_cpu<T: Real>(logits: &[T], targets: &[u32], v: usize) -> Vec<T> {
    let mut out = zeros(targets.len());
    let r = rows_per_chunk(v);
    out.par_chunks_mut(r)
        .zip(logits.par_chunks(r * v).zip(targets.par_chunks(r)))
        .for_each(|(o, (l, t))| fwd_rows_dispatch(l, t, o));
    out
}

fn bwd_cpu<T: Real>(logits: &[T], targets: &[u32], grad_loss: &[T], v: usize) -> Vec<T> {
    let n = targets.len();
    let (grad, loss) = grad_loss.split_at(n);
    par_filled(logits.len(), LOSS_GRAD_ROWS * v, |i, o| {
        for (j, o) in o.chunks_exact_mut(v).enumerate() {
            let r = LOSS_GRAD_ROWS * i + j;
            bwd_row_dispatch(&logits[r * v..(r + 1) * v], targets[r], grad[r], loss[r], o);
        }
    })
}

fn dims(ll: &Layout, lt: &Layout) -> Result<(usize, usize)> {
    let (n, v) = ll.shape().dims2()?;
    if lt.shape().dims() != [n] || v == 0 {
        bail!("cross-entropy: targets {:?} for logits {:?}", lt.shape(), ll.shape());
    }
    Ok((n, v))
}

impl Kernels<2> for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "bistro-cross-entropy"
    }

    fn cpu(&self, [(s1, l1), (s2, l2)]: [Cpu<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        let (n, v) = dims(l1, l2)?;
        let t = slice::<u32>(s2, l2, "cross-entropy")?;
        let out = for_float!(s1.dtype(), "cross-entropy", |T| fwd_cpu(slice::<T>(s1, l1, "cross-entropy")?, t, v));
        Ok((out, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [(s1, l1), (s2, l2)]: [Cuda<'_>; 2]) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, v) = dims(l1, l2)?;
        Ok((super::cuda::cross_entropy_fwd(s1, l1, s2, l2, n, v)?, Shape::from(n)))
    }

    fn backward(&self, [logits, targets]: [&Tensor; 2], loss: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let grad_loss = Tensor::stack(&[&grad.to_dtype(loss.dtype())?, &loss.detach()], 0)?;
        let g = logits.detach().apply_op3_no_bwd(targets, &grad_loss, &Fused(CrossEntropyBackward))?;
        Ok([Some(g), None])
    }
}

/// `(n, v)` of the backward's inputs, whose third is `[grad; loss]` as `[2, N]`.
fn bwd_dims(ll: &Layout, lt: &Layout, lg: &Layout) -> Result<(usize, usize)> {
    let (n, v) = dims(ll, lt)?;
    if lg.shape().dims() != [2, lt.shape().elem_count()] {
        bail!("cross-entropy backward: gradient and loss {:?} vs targets {:?}", lg.shape(), lt.shape());
    }
    Ok((n, v))
}

impl Kernels<3> for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "bistro-cross-entropy-backward"
    }

    fn cpu(&self, [(s1, l1), (s2, l2), (s3, l3)]: [Cpu<'_>; 3]) -> Result<(CpuStorage, Shape)> {
        let (_n, v) = bwd_dims(l1, l2, l3)?;
        let t = slice::<u32>(s2, l2, "cross-entropy")?;
        let out = for_float!(s1.dtype(), "cross-entropy backward", |T| bwd_cpu(
            slice::<T>(s1, l1, "cross-entropy")?,
            t,
            slice(s3, l3, "cross-entropy")?,
            v
        ));
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [(s1, l1), (s2, l2), (s3, l3)]: [Cuda<'_>; 3]) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, v) = bwd_dims(l1, l2, l3)?;
        super::cuda::cross_entropy_bwd(s1, l1, s2, l2, s3, l3, n, v)
    }
}

impl Kernels<2> for CrossEntropyLossGrad {
    fn name(&self) -> &'static str {
        "bistro-cross-entropy-loss-grad"
    }

    fn cpu(&self, [(s1, l1), (s2, l2)]: [Cpu<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        let (n, v) = dims(l1, l2)?;
        let t = slice::<u32>(s2, l2, "cross-entropy")?;
        let out = for_float!(s1.dtype(), "cross-entropy", |T| loss_grad_cpu(
            slice::<T>(s1, l1, "cross-entropy")?,
            t,
            v,
            self.g
        ));
        Ok((out, Shape::from(n * v + n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, _: [Cuda<'_>; 2]) -> Result<(candle_core::CudaStorage, Shape)> {
        bail!("{}: CPU only (elsewhere the forward and backward ops run)", self.name())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::{NO_TARGET, loss_and_grad};

    #[test]
    fn one_pass_equals_the_forward_and_backward_ops() {
        // 11 rows (not a multiple of the rows per task), two without a target.
        let (n, v) = (11, 37);
        let mut rng = bistro_kernels::rng::XorShift::new(5);
        let logits: Vec<f64> = (0..n * v).map(|_| 8.0 * (rng.uniform() - 0.5)).collect();
        let mut targets: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        targets[3] = NO_TARGET;
        targets[10] = NO_TARGET;
        for dtype in [DType::F64, DType::F32] {
            let l = Tensor::from_vec(logits.clone(), (n, v), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let t = Tensor::from_vec(targets.clone(), n, &Device::Cpu).unwrap();
            let (loss, dl) = loss_and_grad(&l, &t, 0.25).unwrap();
            let want_loss = crate::fused::cross_entropy(&l, &t).unwrap();
            let g = Tensor::full(0.25f64, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let want_dl = crate::fused::backward::cross_entropy(&l, &t, &want_loss, &g).unwrap();
            let tol = if dtype == DType::F64 { 1e-13 } else { 1e-6 };
            let flat = |x: &Tensor| x.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for (a, b) in flat(&loss).iter().zip(flat(&want_loss)) {
                assert!((a - b).abs() <= tol * b.abs().max(1.0), "{dtype:?} loss {a} vs {b}");
            }
            for (a, b) in flat(&dl).iter().zip(flat(&want_dl)) {
                assert!((a - b).abs() <= tol, "{dtype:?} gradient {a} vs {b}");
            }
            assert!(flat(&dl)[3 * v..4 * v].iter().all(|&x| x == 0.0), "a row without a target has no gradient");
        }
    }
}
