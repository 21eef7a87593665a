//! Cross-entropy over the vocabulary, per row, with its backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::cpu::{Real, for_float, max_all, par_filled, simd_dispatch, slice, sum_map, zeros};
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
    // Four rows per task, as each row is a whole vocabulary.
    par_filled(logits.len(), 4 * v, |i, o| {
        for (j, o) in o.chunks_exact_mut(v).enumerate() {
            let r = 4 * i + j;
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
