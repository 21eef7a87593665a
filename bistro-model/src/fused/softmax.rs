//! Causal softmax over attention scores: scale, causal mask and softmax in one pass, with
//! no mask tensor.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};

use std::mem::MaybeUninit;

use super::cpu::{
    Real, assume_init, fill, for_float, map_sum, max_all, par_written, rows_per_task, simd_dispatch, slice, sum_map2,
};
#[cfg(feature = "cuda")]
use super::op::Cuda;
use super::op::{Cpu, Fused, Kernels};

/// `p = softmax(scale * s)` over the last dimension of `s: [.., Tq, Tk]` (`Tk >= Tq`), where
/// query `i` sees keys `j <= i + Tk - Tq` and every other entry of `p` is 0.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CausalSoftmaxOp {
    /// The factor applied to the scores before the softmax (`1/sqrt(head_dim)`).
    pub scale: f64,
}

/// The backward op: `(p, dp) -> ds = scale * p * (dp - sum_j p dp)`, zero above the diagonal.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CausalSoftmaxBackward {
    /// The forward op's scale.
    pub scale: f64,
}

/// Rows of one or more `[Tq, Tk]` blocks; `row0` is the index of the first row overall.
#[inline(always)]
fn fwd_rows<T: Real>(s: &[T], p: &mut [MaybeUninit<T>], tq: usize, tk: usize, row0: usize, scale: T) {
    for (k, (sr, pr)) in s.chunks_exact(tk).zip(p.chunks_exact_mut(tk)).enumerate() {
        let visible = ((row0 + k) % tq) + (tk - tq) + 1;
        let (pv, rest) = pr.split_at_mut(visible);
        let sv = &sr[..visible];
        let max = max_all(sv) * scale;
        let sum = map_sum(sv, pv, |x| (x * scale - max).exp_());
        // SAFETY: `map_sum` wrote every element of `pv` (`sv` has its length).
        let pv = unsafe { assume_init(pv) };
        let inv = T::ONE / sum;
        for o in pv.iter_mut() {
            *o *= inv;
        }
        fill(rest, T::ZERO);
    }
}
simd_dispatch!(fwd_rows_dispatch => fwd_rows(s: &[T], p: &mut [MaybeUninit<T>], tq: usize, tk: usize, row0: usize, scale: T));

#[inline(always)]
fn bwd_rows<T: Real>(p: &[T], dp: &[T], ds: &mut [MaybeUninit<T>], tq: usize, tk: usize, row0: usize, scale: T) {
    for (k, ((pr, gr), dr)) in p.chunks_exact(tk).zip(dp.chunks_exact(tk)).zip(ds.chunks_exact_mut(tk)).enumerate() {
        let visible = ((row0 + k) % tq) + (tk - tq) + 1;
        let dot = sum_map2(&pr[..visible], &gr[..visible], |a, b| a * b);
        let (dv, rest) = dr.split_at_mut(visible);
        for ((o, &a), &b) in dv.iter_mut().zip(&pr[..visible]).zip(&gr[..visible]) {
            o.write(scale * a * (b - dot));
        }
        fill(rest, T::ZERO);
    }
}
simd_dispatch!(bwd_rows_dispatch => bwd_rows(p: &[T], dp: &[T], ds: &mut [MaybeUninit<T>], tq: usize, tk: usize, row0: usize, scale: T));

fn fwd_cpu<T: Real>(s: &[T], tq: usize, tk: usize, scale: f64) -> Vec<T> {
    let rows = rows_per_task(tk);
    let chunk = rows * tk;
    // SAFETY: `fwd_rows` writes every element of each whole row it is given, and chunks are
    // whole rows.
    unsafe {
        par_written(s.len(), chunk, |i, pc| {
            fwd_rows_dispatch(&s[i * chunk..][..pc.len()], pc, tq, tk, i * rows, T::of(scale))
        })
    }
}

fn bwd_cpu<T: Real>(p: &[T], dp: &[T], tq: usize, tk: usize, scale: f64) -> Vec<T> {
    let rows = rows_per_task(tk);
    let chunk = rows * tk;
    // SAFETY: `bwd_rows` writes every element of each whole row it is given, and chunks are
    // whole rows.
    unsafe {
        par_written(p.len(), chunk, |i, dc| {
            let r = i * chunk..i * chunk + dc.len();
            bwd_rows_dispatch(&p[r.clone()], &dp[r], dc, tq, tk, i * rows, T::of(scale))
        })
    }
}

fn dims(l: &Layout) -> Result<(usize, usize)> {
    let d = l.shape().dims();
    if d.len() < 2 || d[d.len() - 1] < d[d.len() - 2] || d[d.len() - 2] == 0 {
        bail!("causal softmax: scores {:?} must be [.., Tq, Tk] with Tk >= Tq >= 1", l.shape());
    }
    Ok((d[d.len() - 2], d[d.len() - 1]))
}

impl Kernels<1> for CausalSoftmaxOp {
    fn name(&self) -> &'static str {
        "bistro-causal-softmax"
    }

    fn cpu(&self, [(s, l)]: [Cpu<'_>; 1]) -> Result<(CpuStorage, Shape)> {
        let (tq, tk) = dims(l)?;
        let out = for_float!(s.dtype(), "causal softmax", |T| fwd_cpu(
            slice::<T>(s, l, "causal softmax")?,
            tq,
            tk,
            self.scale
        ));
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [(s, l)]: [Cuda<'_>; 1]) -> Result<(candle_core::CudaStorage, Shape)> {
        let (tq, tk) = dims(l)?;
        Ok((super::cuda::causal_softmax_fwd(s, l, tq, tk, self.scale)?, l.shape().clone()))
    }

    fn backward(&self, _s: [&Tensor; 1], p: &Tensor, dp: &Tensor) -> Result<[Option<Tensor>; 1]> {
        let ds = p.detach().apply_op2_no_bwd(&dp.contiguous()?, &Fused(CausalSoftmaxBackward { scale: self.scale }))?;
        Ok([Some(ds)])
    }
}

/// `(tq, tk)` of the backward's inputs `p` and `dp`, which must have one shape.
fn bwd_dims(lp: &Layout, ldp: &Layout) -> Result<(usize, usize)> {
    if lp.shape() != ldp.shape() {
        bail!("causal softmax backward: gradient {:?} vs output {:?}", ldp.shape(), lp.shape());
    }
    dims(lp)
}

impl Kernels<2> for CausalSoftmaxBackward {
    fn name(&self) -> &'static str {
        "bistro-causal-softmax-backward"
    }

    fn cpu(&self, [(s1, l1), (s2, l2)]: [Cpu<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        let (tq, tk) = bwd_dims(l1, l2)?;
        let out = for_float!(s1.dtype(), "causal softmax backward", |T| bwd_cpu(
            slice::<T>(s1, l1, "causal softmax")?,
            slice(s2, l2, "causal softmax")?,
            tq,
            tk,
            self.scale,
        ));
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [(s1, l1), (s2, l2)]: [Cuda<'_>; 2]) -> Result<(candle_core::CudaStorage, Shape)> {
        let (tq, tk) = bwd_dims(l1, l2)?;
        Ok((super::cuda::causal_softmax_bwd(s1, l1, s2, l2, tq, tk, self.scale)?, l1.shape().clone()))
    }
}
