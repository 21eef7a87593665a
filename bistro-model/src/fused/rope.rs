//! Moving attention heads between the token-major layout `[B, T, H, D]` (what a linear
//! layer produces, also seen flat as `[B*T, H*D]`) and the head-major layout `[B, H, T, D]`
//! (what batched attention products need), optionally applying the rotary embedding
//! ("rotate half", as Hugging Face's Llama) on the way. One pass, one graph node.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};

use super::cpu::{Real, for_float, par_filled, simd_dispatch, slice};
#[cfg(feature = "cuda")]
use super::op::Cuda;
use super::op::{Cpu, Fused, Kernels};

/// The geometry of the fused rotary embedding and head split/merge ([`super::rope_to_heads`], [`super::split_heads`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadLayout {
    /// Sequence length `T`.
    pub seq: usize,
    /// Number of heads `H`.
    pub heads: usize,
    /// The token-major side is flat `[B*T, H*D]` (else `[B, T, H, D]`).
    pub flat: bool,
}

impl HeadLayout {
    /// `[B, T, H, D]` from a token-major shape.
    fn token_major_dims(&self, s: &Shape) -> Result<[usize; 4]> {
        match *s.dims() {
            [bt, hd] if self.flat && self.seq > 0 && self.heads > 0 && bt % self.seq == 0 && hd % self.heads == 0 => {
                Ok([bt / self.seq, self.seq, self.heads, hd / self.heads])
            }
            [b, t, h, d] if !self.flat && t == self.seq && h == self.heads => Ok([b, t, h, d]),
            _ => bail!("heads: token-major shape {s:?} does not fit {self:?}"),
        }
    }

    /// `[B, T, H, D]` from a head-major shape `[B, H, T, D]`.
    fn head_major_dims(&self, s: &Shape) -> Result<[usize; 4]> {
        match *s.dims() {
            [b, h, t, d] if t == self.seq && h == self.heads => Ok([b, t, h, d]),
            _ => bail!("heads: head-major shape {s:?} does not fit {self:?}"),
        }
    }

    fn token_major_shape(&self, [b, t, h, d]: [usize; 4]) -> Shape {
        if self.flat { Shape::from((b * t, h * d)) } else { Shape::from((b, t, h, d)) }
    }
}

/// Rotary embedding: token-major in, head-major out; with `backward` set, the inverse
/// rotation of a head-major gradient, token-major out. Tables `cos, sin: [T', D/2]`, `T' >= T`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RopeOp {
    /// The token-major geometry.
    pub layout: HeadLayout,
    /// Apply the inverse rotation, head-major to token-major.
    pub backward: bool,
}

/// Token-major to head-major (`merge == false`) or back, a plain transposing copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadsOp {
    /// The token-major geometry.
    pub layout: HeadLayout,
    /// Head-major to token-major.
    pub merge: bool,
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

/// One `(b, h)` plane, token-major to head-major: reads `x[b, :, h, :]`, writes `y[b, h]`.
#[inline(always)]
fn to_heads_plane<T: Real>(x: &[T], y: &mut [T], cos: &[T], sin: &[T], hd: usize, heads: usize, h: usize) {
    let half = hd / 2;
    for (t, yv) in y.chunks_exact_mut(hd).enumerate() {
        let src = &x[(t * heads + h) * hd..(t * heads + h + 1) * hd];
        if cos.is_empty() {
            yv.copy_from_slice(src);
        } else {
            rotate(src, yv, &cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half], T::ONE);
        }
    }
}
simd_dispatch!(to_heads_dispatch => to_heads_plane(x: &[T], y: &mut [T], cos: &[T], sin: &[T], hd: usize, heads: usize, h: usize));

/// One `(b, t)` row, head-major to token-major: reads `g[b, :, t, :]`, writes `dx[b, t]`.
#[inline(always)]
fn to_tokens_row<T: Real>(g: &[T], dx: &mut [T], cos: &[T], sin: &[T], hd: usize, seq: usize, t: usize) {
    for (h, out) in dx.chunks_exact_mut(hd).enumerate() {
        let src = &g[(h * seq + t) * hd..(h * seq + t + 1) * hd];
        if cos.is_empty() {
            out.copy_from_slice(src);
        } else {
            rotate(src, out, cos, sin, -T::ONE);
        }
    }
}
simd_dispatch!(to_tokens_dispatch => to_tokens_row(g: &[T], dx: &mut [T], cos: &[T], sin: &[T], hd: usize, seq: usize, t: usize));

/// Token-major `x` (`[B, T, H, D]` in memory) to head-major, rotating when tables are given.
fn to_heads<T: Real>(x: &[T], cos: &[T], sin: &[T], [_b, t, h, d]: [usize; 4]) -> Vec<T> {
    let per_batch = t * h * d;
    par_filled(x.len(), t * d, |bh, plane| {
        let (bi, hi) = (bh / h, bh % h);
        to_heads_dispatch(&x[bi * per_batch..(bi + 1) * per_batch], plane, cos, sin, d, h, hi);
    })
}

/// Head-major `g` to token-major, applying the inverse rotation when tables are given.
fn to_tokens<T: Real>(g: &[T], cos: &[T], sin: &[T], [_b, t, h, d]: [usize; 4]) -> Vec<T> {
    let half = d / 2;
    let per_batch = h * t * d;
    par_filled(g.len(), h * d, |bt, row| {
        let (bi, ti) = (bt / t, bt % t);
        let (c, s) = if cos.is_empty() {
            (cos, sin)
        } else {
            (&cos[ti * half..(ti + 1) * half], &sin[ti * half..(ti + 1) * half])
        };
        to_tokens_dispatch(&g[bi * per_batch..(bi + 1) * per_batch], row, c, s, d, t, ti);
    })
}

fn check_tables(lc: &Layout, ls: &Layout, [_b, t, _h, d]: [usize; 4]) -> Result<()> {
    let (tc, half) = lc.shape().dims2()?;
    if lc.shape() != ls.shape() || d % 2 != 0 || half * 2 != d || tc < t {
        bail!("rope: tables {:?}/{:?} do not fit heads of size {d} over {t} positions", lc.shape(), ls.shape());
    }
    Ok(())
}

impl RopeOp {
    fn geometry(&self, l: &Layout) -> Result<([usize; 4], Shape)> {
        if self.backward {
            let dims = self.layout.head_major_dims(l.shape())?;
            Ok((dims, self.layout.token_major_shape(dims)))
        } else {
            let [b, t, h, d] = self.layout.token_major_dims(l.shape())?;
            Ok(([b, t, h, d], Shape::from((b, h, t, d))))
        }
    }
}

impl Kernels<3> for RopeOp {
    fn name(&self) -> &'static str {
        if self.backward { "bistro-rope-backward" } else { "bistro-rope" }
    }

    fn cpu(&self, [(s1, l1), (s2, l2), (s3, l3)]: [Cpu<'_>; 3]) -> Result<(CpuStorage, Shape)> {
        let (dims, out_shape) = self.geometry(l1)?;
        check_tables(l2, l3, dims)?;
        fn go<T: Real>(x: &[T], c: &[T], s: &[T], dims: [usize; 4], backward: bool) -> Vec<T> {
            if backward { to_tokens(x, c, s, dims) } else { to_heads(x, c, s, dims) }
        }
        let out = for_float!(s1.dtype(), "rope", |T| go(
            slice::<T>(s1, l1, "rope")?,
            slice(s2, l2, "rope")?,
            slice(s3, l3, "rope")?,
            dims,
            self.backward,
        ));
        Ok((out, out_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [(s1, l1), (s2, l2), (s3, l3)]: [Cuda<'_>; 3]) -> Result<(candle_core::CudaStorage, Shape)> {
        let (dims, out_shape) = self.geometry(l1)?;
        check_tables(l2, l3, dims)?;
        Ok((super::cuda::heads(s1, l1, Some((s2, l2, s3, l3)), dims, self.backward)?, out_shape))
    }

    fn backward(&self, [_x, cos, sin]: [&Tensor; 3], _y: &Tensor, dy: &Tensor) -> Result<[Option<Tensor>; 3]> {
        let op = Fused(RopeOp { backward: !self.backward, ..*self });
        Ok([Some(dy.contiguous()?.apply_op3_no_bwd(&cos.detach(), &sin.detach(), &op)?), None, None])
    }
}

impl HeadsOp {
    fn geometry(&self, l: &Layout) -> Result<([usize; 4], Shape)> {
        if self.merge {
            let dims = self.layout.head_major_dims(l.shape())?;
            Ok((dims, self.layout.token_major_shape(dims)))
        } else {
            let [b, t, h, d] = self.layout.token_major_dims(l.shape())?;
            Ok(([b, t, h, d], Shape::from((b, h, t, d))))
        }
    }
}

impl Kernels<1> for HeadsOp {
    fn name(&self) -> &'static str {
        if self.merge { "bistro-merge-heads" } else { "bistro-split-heads" }
    }

    fn cpu(&self, [(s, l)]: [Cpu<'_>; 1]) -> Result<(CpuStorage, Shape)> {
        let (dims, out_shape) = self.geometry(l)?;
        fn go<T: Real>(x: &[T], dims: [usize; 4], merge: bool) -> Vec<T> {
            if merge { to_tokens(x, &[], &[], dims) } else { to_heads(x, &[], &[], dims) }
        }
        let out = for_float!(s.dtype(), "heads", |T| go(slice::<T>(s, l, "heads")?, dims, self.merge));
        Ok((out, out_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [(s, l)]: [Cuda<'_>; 1]) -> Result<(candle_core::CudaStorage, Shape)> {
        let (dims, out_shape) = self.geometry(l)?;
        Ok((super::cuda::heads(s, l, None, dims, self.merge)?, out_shape))
    }

    fn backward(&self, _x: [&Tensor; 1], _y: &Tensor, dy: &Tensor) -> Result<[Option<Tensor>; 1]> {
        let op = Fused(HeadsOp { merge: !self.merge, ..*self });
        Ok([Some(dy.contiguous()?.apply_op1_no_bwd(&op)?)])
    }
}
