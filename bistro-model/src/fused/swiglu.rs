//! SwiGLU `y = silu(g) * u` with its backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};

use std::mem::MaybeUninit;

use super::cpu::{Real, for_float, par_written, par_written_pair, simd_dispatch, slice};
#[cfg(feature = "cuda")]
use super::op::Cuda;
use super::op::{Cpu, Fused, Kernels};

/// `(g, u) -> silu(g) * u`, element-wise over equal shapes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SwiGluOp;

/// `(g, u, dy) -> [2, ..]` holding `dg` then `du`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SwiGluBackward;

const CHUNK: usize = 16_384;

#[inline(always)]
fn fwd_chunk<T: Real>(g: &[T], u: &[T], y: &mut [MaybeUninit<T>]) {
    for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
        o.write(a / (T::ONE + (-a).exp_()) * b);
    }
}
simd_dispatch!(fwd_chunk_dispatch => fwd_chunk(g: &[T], u: &[T], y: &mut [MaybeUninit<T>]));

#[inline(always)]
fn bwd_chunk<T: Real>(g: &[T], u: &[T], dy: &[T], dg: &mut [MaybeUninit<T>], du: &mut [MaybeUninit<T>]) {
    for ((((a, b), d), og), ou) in g.iter().zip(u).zip(dy).zip(dg.iter_mut()).zip(du.iter_mut()) {
        let s = T::ONE / (T::ONE + (-*a).exp_());
        og.write(*d * *b * s * (T::ONE + *a * (T::ONE - s)));
        ou.write(*d * *a * s);
    }
}
simd_dispatch!(bwd_chunk_dispatch => bwd_chunk(g: &[T], u: &[T], dy: &[T], dg: &mut [MaybeUninit<T>], du: &mut [MaybeUninit<T>]));

fn fwd_cpu<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    // SAFETY: `fwd_chunk` writes every element of its chunk (the inputs have its length).
    unsafe {
        par_written(g.len(), CHUNK, |i, yc| {
            let r = i * CHUNK..i * CHUNK + yc.len();
            fwd_chunk_dispatch(&g[r.clone()], &u[r], yc)
        })
    }
}

fn bwd_cpu<T: Real>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    // SAFETY: `bwd_chunk` writes every element of both chunks (the inputs have their length).
    unsafe {
        par_written_pair((g.len(), CHUNK), (g.len(), CHUNK), |i, dgc, duc| {
            let r = i * CHUNK..i * CHUNK + dgc.len();
            bwd_chunk_dispatch(&g[r.clone()], &u[r.clone()], &dy[r], dgc, duc)
        })
    }
}

fn same(a: &Layout, b: &Layout, what: &str) -> Result<()> {
    if a.shape() != b.shape() {
        bail!("swiglu: {what} {:?} vs {:?}", b.shape(), a.shape());
    }
    Ok(())
}

impl Kernels<2> for SwiGluOp {
    fn name(&self) -> &'static str {
        "bistro-swiglu"
    }

    fn cpu(&self, [(s1, l1), (s2, l2)]: [Cpu<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        same(l1, l2, "up")?;
        let out =
            for_float!(s1.dtype(), "swiglu", |T| fwd_cpu(slice::<T>(s1, l1, "swiglu")?, slice(s2, l2, "swiglu")?));
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [(s1, l1), (s2, l2)]: [Cuda<'_>; 2]) -> Result<(candle_core::CudaStorage, Shape)> {
        same(l1, l2, "up")?;
        Ok((super::cuda::swiglu_fwd(s1, l1, s2, l2)?, l1.shape().clone()))
    }

    fn backward(&self, [g, u]: [&Tensor; 2], _y: &Tensor, dy: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let both = g.detach().apply_op3_no_bwd(&u.detach(), &dy.contiguous()?, &Fused(SwiGluBackward))?;
        let dims = g.dims();
        let dg = both.narrow(0, 0, 1)?.reshape(dims)?;
        let du = both.narrow(0, 1, 1)?.reshape(dims)?;
        Ok([Some(dg), Some(du)])
    }
}

/// `[2, ..]`: the shape of `dg` and `du` stacked.
fn stacked(l: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(l.shape().dims());
    Shape::from(dims)
}

impl Kernels<3> for SwiGluBackward {
    fn name(&self) -> &'static str {
        "bistro-swiglu-backward"
    }

    fn cpu(&self, [(s1, l1), (s2, l2), (s3, l3)]: [Cpu<'_>; 3]) -> Result<(CpuStorage, Shape)> {
        same(l1, l2, "up")?;
        same(l1, l3, "gradient")?;
        let out = for_float!(s1.dtype(), "swiglu backward", |T| bwd_cpu(
            slice::<T>(s1, l1, "swiglu")?,
            slice(s2, l2, "swiglu")?,
            slice(s3, l3, "swiglu")?,
        ));
        Ok((out, stacked(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [(s1, l1), (s2, l2), (s3, l3)]: [Cuda<'_>; 3]) -> Result<(candle_core::CudaStorage, Shape)> {
        same(l1, l2, "up")?;
        same(l1, l3, "gradient")?;
        Ok((super::cuda::swiglu_bwd(s1, l1, s2, l2, s3, l3)?, stacked(l1)))
    }
}
