//! Rotary position embedding ("rotate half", as in Hugging Face's Llama) fused with the
//! `[B, T, H, D] -> [B, H, T, D]` transpose that attention needs anyway.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::cpu::{Real, simd_dispatch, slice};

/// Rotary embedding of `x: [B, T, H, D]` with tables `cos, sin: [T', D/2]` (`T' >= T`),
/// written as `[B, H, T, D]`. With `backward` set it applies the inverse rotation to a
/// gradient `[B, H, T, D]` and writes `[B, T, H, D]`.
#[derive(Clone, Copy, Debug)]
pub struct RopeOp {
    /// Apply the transposed (inverse) rotation and the inverse transpose.
    pub backward: bool,
}

/// Rotates one head vector: `sign = 1` for the forward rotation, `-1` for its inverse.
#[inline(always)]
fn rotate<T: Real>(src: &[T], dst: &mut [T], cos: &[T], sin: &[T], sign: T) {
    let half = cos.len();
    let (x1, x2) = src.split_at(half);
    let (y1, y2) = dst.split_at_mut(half);
    for i in 0..half {
        let (c, s) = (cos[i], sign * sin[i]);
        y1[i] = x1[i] * c - x2[i] * s;
        y2[i] = x2[i] * c + x1[i] * s;
    }
}

/// One `(b, h)` plane of the forward direction: reads `x[b, :, h, :]`, writes `y[b, h]`.
#[inline(always)]
fn fwd_plane<T: Real>(x: &[T], y: &mut [T], cos: &[T], sin: &[T], hd: usize, heads: usize, h: usize) {
    let half = hd / 2;
    for (t, yv) in y.chunks_exact_mut(hd).enumerate() {
        let src = &x[(t * heads + h) * hd..(t * heads + h + 1) * hd];
        rotate(src, yv, &cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half], T::ONE);
    }
}
simd_dispatch!(fwd_plane_dispatch => fwd_plane(x: &[T], y: &mut [T], cos: &[T], sin: &[T], hd: usize, heads: usize, h: usize));

/// One `(b, t)` row of the backward direction: reads `g[b, :, t, :]`, writes `dx[b, t]`.
#[inline(always)]
fn bwd_row<T: Real>(g: &[T], dx: &mut [T], cos: &[T], sin: &[T], hd: usize, seq: usize, t: usize) {
    for (h, out) in dx.chunks_exact_mut(hd).enumerate() {
        let src = &g[(h * seq + t) * hd..(h * seq + t + 1) * hd];
        rotate(src, out, cos, sin, -T::ONE);
    }
}
simd_dispatch!(bwd_row_dispatch => bwd_row(g: &[T], dx: &mut [T], cos: &[T], sin: &[T], hd: usize, seq: usize, t: usize));

fn run<T: Real>(x: &[T], cos: &[T], sin: &[T], dims: [usize; 4], backward: bool) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    if !backward {
        let [_b, t, h, d] = dims;
        let per_batch = t * h * d;
        y.par_chunks_mut(t * d).enumerate().for_each(|(bh, plane)| {
            let (bi, hi) = (bh / h, bh % h);
            let xb = &x[bi * per_batch..(bi + 1) * per_batch];
            fwd_plane_dispatch(xb, plane, cos, sin, d, h, hi);
        });
    } else {
        let [_b, h, t, d] = dims;
        let half = d / 2;
        let per_batch = h * t * d;
        y.par_chunks_mut(h * d).enumerate().for_each(|(bt, row)| {
            let (bi, ti) = (bt / t, bt % t);
            let gb = &x[bi * per_batch..(bi + 1) * per_batch];
            bwd_row_dispatch(gb, row, &cos[ti * half..(ti + 1) * half], &sin[ti * half..(ti + 1) * half], d, t, ti);
        });
    }
    y
}

impl RopeOp {
    /// Checks shapes; returns the input dims and the output shape.
    fn dims(&self, lx: &Layout, lc: &Layout, ls: &Layout) -> Result<([usize; 4], Shape)> {
        let (a, b, c, d) = lx.shape().dims4()?;
        let seq = if self.backward { c } else { b };
        let (tc, half) = lc.shape().dims2()?;
        if lc.shape() != ls.shape() || d % 2 != 0 || half * 2 != d || tc < seq {
            bail!("rope: tables {:?}/{:?} do not fit input {:?}", lc.shape(), ls.shape(), lx.shape());
        }
        Ok(([a, b, c, d], Shape::from((a, c, b, d))))
    }
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        if self.backward { "bistro-rope-backward" } else { "bistro-rope" }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dims, out_shape) = self.dims(l1, l2, l3)?;
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(run(slice::<f32>(s1, l1, "rope")?, slice(s2, l2, "rope")?, slice(s3, l3, "rope")?, dims, self.backward)),
            DType::F64 => CpuStorage::F64(run(slice::<f64>(s1, l1, "rope")?, slice(s2, l2, "rope")?, slice(s3, l3, "rope")?, dims, self.backward)),
            d => bail!("rope: no CPU kernel for {d:?}"),
        };
        Ok((out, out_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (dims, out_shape) = self.dims(l1, l2, l3)?;
        let out = super::cuda::rope(s1, l1, s2, l2, s3, l3, dims, self.backward)?;
        Ok((out, out_shape))
    }

    fn bwd(&self, _x: &Tensor, cos: &Tensor, sin: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = RopeOp { backward: !self.backward };
        let dx = dy.contiguous()?.apply_op3_no_bwd(&cos.detach(), &sin.detach(), &op)?;
        Ok((Some(dx), None, None))
    }
}
