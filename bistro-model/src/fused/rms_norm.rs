//! RMSNorm `y = x / sqrt(mean(x^2) + eps) * w` over the last dimension, with its backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::cpu::{Real, assume_init, fill, for_float, par_written, rows_per_task, simd_dispatch, slice, sum_map};
#[cfg(feature = "cuda")]
use super::op::Cuda;
use super::op::{Cpu, Fused, Kernels};

/// The forward op: `(x [.., D], w [D]) -> y [.., D]`; statistics in the input's float type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RmsNormOp {
    /// Added to the mean square before the square root.
    pub eps: f64,
}

/// The backward op: `(x [N, D], w [D], dy [N, D]) -> [N + 1, D]`, rows `0..N` holding `dx`
/// and row `N` holding `dw`. `dw` is summed over fixed groups of rows in a fixed order, so
/// the result does not depend on the thread count.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RmsNormBackward {
    /// The forward op's `eps`.
    pub eps: f64,
}

#[inline(always)]
fn rstd<T: Real>(x: &[T], eps: T) -> T {
    let ss = sum_map(x, |v| v * v);
    T::ONE / (ss / T::of(x.len() as f64) + eps).sqrt_()
}

#[inline(always)]
fn fwd_rows<T: Real>(x: &[T], w: &[T], y: &mut [MaybeUninit<T>], eps: T) {
    let d = w.len();
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let r = rstd(xr, eps);
        for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            yv.write(xv * r * wv);
        }
    }
}
simd_dispatch!(fwd_rows_dispatch => fwd_rows(x: &[T], w: &[T], y: &mut [MaybeUninit<T>], eps: T));

#[inline(always)]
fn bwd_rows<T: Real>(x: &[T], w: &[T], dy: &[T], dx: &mut [MaybeUninit<T>], dw: &mut [T], eps: T) {
    let d = w.len();
    let inv_d = T::ONE / T::of(d as f64);
    for ((xr, dyr), dxr) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
        let r = rstd(xr, eps);
        // sum(dy * w * x), as two passes of lane-split sums (w * x first, then the dot).
        let c = dot3(dyr, w, xr) * r * inv_d;
        for ((((o, &xv), &g), &wv), acc) in dxr.iter_mut().zip(xr).zip(dyr).zip(w).zip(dw.iter_mut()) {
            let xhat = xv * r;
            o.write(r * (g * wv - xhat * c));
            *acc += g * xhat;
        }
    }
}
/// `sum(a * b * c)` with lane accumulators.
#[inline(always)]
fn dot3<T: Real>(a: &[T], b: &[T], c: &[T]) -> T {
    let n = a.len();
    let mut acc = [T::ZERO; 8];
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        for l in 0..8 {
            acc[l] += a[i + l] * b[i + l] * c[i + l];
        }
    }
    let mut s = T::ZERO;
    for v in acc {
        s += v;
    }
    for i in full..n {
        s += a[i] * b[i] * c[i];
    }
    s
}
simd_dispatch!(bwd_rows_dispatch => bwd_rows(x: &[T], w: &[T], dy: &[T], dx: &mut [MaybeUninit<T>], dw: &mut [T], eps: T));

fn fwd_cpu<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let chunk = d * rows_per_task(d);
    // SAFETY: `fwd_rows` writes every element of the whole rows it is given, and chunks are
    // whole rows.
    unsafe { par_written(x.len(), chunk, |i, yc| fwd_rows_dispatch(&x[i * chunk..][..yc.len()], w, yc, T::of(eps))) }
}

fn bwd_cpu<T: Real>(x: &[T], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let n = x.len() / d;
    // `dx` is written in full by `bwd_rows`; only the `dw` row starts at zero.
    let mut out = Vec::with_capacity((n + 1) * d);
    let (dx, dw) = out.spare_capacity_mut()[..(n + 1) * d].split_at_mut(n * d);
    fill(dw, T::ZERO);
    // SAFETY: just filled.
    let dw = unsafe { assume_init(dw) };
    let chunk = d * rows_per_task(d);
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dxc, (xc, dyc))| {
            let mut part = vec![T::ZERO; d];
            bwd_rows_dispatch(xc, w, dyc, dxc, &mut part, T::of(eps));
            part
        })
        .collect();
    for part in partials {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
    // SAFETY: `bwd_rows` wrote every row of `dx` (the chunks are whole rows) and `dw` was
    // filled above.
    unsafe { out.set_len((n + 1) * d) };
    out
}

fn check_dims(lx: &Layout, lw: &Layout) -> Result<usize> {
    let d = lw.shape().elem_count();
    if lw.shape().rank() != 1 || lx.shape().dims().last() != Some(&d) || d == 0 {
        bail!("rms-norm: weight {:?} does not match input {:?}", lw.shape(), lx.shape());
    }
    Ok(d)
}

impl Kernels<2> for RmsNormOp {
    fn name(&self) -> &'static str {
        "bistro-rms-norm"
    }

    fn cpu(&self, [(s1, l1), (s2, l2)]: [Cpu<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        check_dims(l1, l2)?;
        let out = for_float!(s1.dtype(), "rms-norm", |T| fwd_cpu(
            slice::<T>(s1, l1, "rms-norm")?,
            slice(s2, l2, "rms-norm")?,
            self.eps
        ));
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [(s1, l1), (s2, l2)]: [Cuda<'_>; 2]) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = check_dims(l1, l2)?;
        super::cuda::rms_norm_fwd(s1, l1, s2, l2, d, self.eps)
    }

    fn backward(&self, [x, w]: [&Tensor; 2], _y: &Tensor, dy: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let d = w.elem_count();
        let dims = x.dims().to_vec();
        let n = x.elem_count() / d;
        let x2 = x.detach().reshape((n, d))?;
        let dy2 = dy.contiguous()?.reshape((n, d))?;
        let both = x2.apply_op3_no_bwd(&w.detach(), &dy2, &Fused(RmsNormBackward { eps: self.eps }))?;
        let dx = both.narrow(0, 0, n)?.reshape(dims)?;
        // `dw` copied out: it is kept until the optimizer step, and as a view it would keep
        // the whole `[N + 1, D]` buffer (all of `dx`) alive with it.
        let dw = both.narrow(0, n, 1)?.reshape(d)?.copy()?;
        Ok([Some(dx), Some(dw)])
    }
}

impl Kernels<3> for RmsNormBackward {
    fn name(&self) -> &'static str {
        "bistro-rms-norm-backward"
    }

    fn cpu(&self, [(s1, l1), (s2, l2), (s3, l3)]: [Cpu<'_>; 3]) -> Result<(CpuStorage, Shape)> {
        let d = check_dims(l1, l2)?;
        if l3.shape() != l1.shape() {
            bail!("rms-norm backward: gradient {:?} vs input {:?}", l3.shape(), l1.shape());
        }
        let n = l1.shape().elem_count() / d;
        let out = for_float!(s1.dtype(), "rms-norm backward", |T| bwd_cpu(
            slice::<T>(s1, l1, "rms-norm")?,
            slice(s2, l2, "rms-norm")?,
            slice(s3, l3, "rms-norm")?,
            self.eps,
        ));
        Ok((out, Shape::from((n + 1, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [(s1, l1), (s2, l2), (s3, l3)]: [Cuda<'_>; 3]) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = check_dims(l1, l2)?;
        super::cuda::rms_norm_bwd(s1, l1, s2, l2, s3, l3, d, self.eps)
    }
}
