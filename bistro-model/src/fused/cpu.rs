//! CPU helpers shared by the fused kernels: a float trait, a vectorisable `exp`, slices of
//! contiguous storage, and runtime dispatch to AVX2+FMA code.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout, Result, WithDType, bail};
use rayon::prelude::*;

/// Runs `f` on a thread of Rayon's global pool, or inline when already on one.
///
/// Each parallel kernel hands its tasks to the pool. From a thread outside the pool that
/// means sleeping until the pool's threads are done and being woken for the next serial
/// bit, a round trip per kernel (hundreds per training step); from a pool thread the
/// caller runs one of the tasks itself. Measured on the `small` step (AVX-512 Xeon, two
/// threads, interleaved runs of 30 steps): median 0.835 -> 0.809 s, context switches
/// 11,200 -> 4,300.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::join(f, || ()).0
}

/// Rows handed to one rayon task at a time (enough work to amortise scheduling).
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// The float types the CPU kernels are written for (f32 and f64).
pub(crate) trait Real:
    WithDType
    + Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// `e^x`; for f32 a branch-free polynomial that vectorises (about 1 ulp).
    fn exp_(self) -> Self;
    /// Square root.
    fn sqrt_(self) -> Self;
    /// Natural logarithm.
    fn ln_(self) -> Self;
    /// The larger of two values (NaN-propagating is not required).
    fn max_(self, o: Self) -> Self;
    /// Conversion from f64.
    fn of(x: f64) -> Self;
}

/// `Real` for a float type; `$exp` is its `e^x`.
macro_rules! impl_real {
    ($t:ty, $exp:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn exp_(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn sqrt_(self) -> Self {
                self.sqrt()
            }
            #[inline(always)]
            fn ln_(self) -> Self {
                self.ln()
            }
            #[inline(always)]
            fn max_(self, o: Self) -> Self {
                if self > o { self } else { o }
            }
            #[inline(always)]
            fn of(x: f64) -> Self {
                x as $t
            }
        }
    };
}
impl_real!(f32, exp_f32);
impl_real!(f64, f64::exp);

/// `e^x` in f32 without branches or table lookups, so loops over it vectorise: Cody-Waite
/// range reduction `x = n ln2 + r` and Cephes' degree-6 polynomial for `e^r`. Inputs below
/// -87.3 give about 1e-38 instead of 0 (harmless in softmax sums); NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to an integer
    let x = x.clamp(-87.336_54, 88.376_26);
    // y = ROUND + n with n = round(x log2 e): same exponent as ROUND, so y - ROUND is exact.
    let y = x * LOG2E + ROUND;
    let n = y - ROUND;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // 2^n built from y's bits, which are ROUND's plus n: integer arithmetic on the bits
    // vectorises, where `n as i32` (a saturating cast) became per-lane scalar code in every
    // loop over this function (softmax, SwiGLU, cross-entropy).
    let scale = f32::from_bits(y.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    e * scale
}

/// Lanes of the hand-split reductions below: floating-point sums and maxima are only
/// vectorised by the compiler when written as independent accumulators.
const LANES: usize = 8;

/// The largest element of a non-empty slice.
#[inline(always)]
pub(crate) fn max_all<T: Real>(x: &[T]) -> T {
    let mut acc = [x[0]; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max_(c[i]);
        }
    }
    let mut m = acc[0];
    for &a in &acc[1..] {
        m = m.max_(a);
    }
    for &v in rest {
        m = m.max_(v);
    }
    m
}

/// `sum(f(x))` with independent lane accumulators.
#[inline(always)]
pub(crate) fn sum_map<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    let mut s = T::ZERO;
    for a in acc {
        s += a;
    }
    for &v in rest {
        s += f(v);
    }
    s
}

/// `sum(f(a, b))` over two slices of equal length with independent lane accumulators.
#[inline(always)]
pub(crate) fn sum_map2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; LANES];
    let full = n / LANES * LANES;
    for (ca, cb) in a[..full].chunks_exact(LANES).zip(b[..full].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += f(ca[i], cb[i]);
        }
    }
    let mut s = T::ZERO;
    for v in acc {
        s += v;
    }
    for i in full..n {
        s += f(a[i], b[i]);
    }
    s
}

/// Writes `dst[i] = f(src[i])` for every `i` (`dst` may be uninitialised) and returns
/// `sum(dst)`, with lane accumulators.
#[inline(always)]
pub(crate) fn map_sum<T: Real>(src: &[T], dst: &mut [MaybeUninit<T>], f: impl Fn(T) -> T) -> T {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    let mut acc = [T::ZERO; LANES];
    let full = n / LANES * LANES;
    for (cs, cd) in src[..full].chunks_exact(LANES).zip(dst[..full].chunks_exact_mut(LANES)) {
        for i in 0..LANES {
            let v = f(cs[i]);
            cd[i].write(v);
            acc[i] += v;
        }
    }
    let mut s = T::ZERO;
    for v in acc {
        s += v;
    }
    for i in full..n {
        let v = f(src[i]);
        dst[i].write(v);
        s += v;
    }
    s
}

/// `x` as initialised.
///
/// # Safety
/// Every element of `x` must have been written.
#[inline(always)]
pub(crate) unsafe fn assume_init<T>(x: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, and the caller vouches that every
    // element is initialised.
    unsafe { &mut *(x as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Writes `v` to every element of `x`.
#[inline(always)]
pub(crate) fn fill<T: Copy>(x: &mut [MaybeUninit<T>], v: T) {
    for o in x {
        o.write(v);
    }
}

/// The contiguous elements of `s` under layout `l`, as `&[T]`.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else { bail!("{what}: the input must be contiguous") };
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// A vector of `n` zeros for a kernel's output, zeroed in parallel when large: a serial
/// memset of the step's large outputs (up to 32 MB for `small`'s logits gradient) would leave
/// the other cores idle before every parallel kernel.
pub(crate) fn zeros<T: Real>(n: usize) -> Vec<T> {
    const CHUNK: usize = 1 << 16;
    if n < 4 * CHUNK {
        return vec![T::ZERO; n];
    }
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut().par_chunks_mut(CHUNK).for_each(|c| {
        for x in c {
            x.write(T::ZERO);
        }
    });
    // SAFETY: all `n` elements were written just above.
    unsafe { v.set_len(n) };
    v
}

/// A kernel's output of `n` elements, filled in parallel: `fill(i, out)` writes chunk `i`
/// (elements `i * chunk ..`, `chunk` long but the last). Each chunk is zeroed by the task that
/// fills it, just before: the zeros stay in that core's cache and the kernel overwrites them
/// there, where a separate zero-fill pass over the whole output ([`zeros`]) streamed it
/// through memory twice (~5% of a `small` training step). Kernels that write every element
/// use [`par_written`] and skip the zeros.
pub(crate) fn par_filled<T: Real>(n: usize, chunk: usize, fill: impl Fn(usize, &mut [T]) + Sync + Send) -> Vec<T> {
    // SAFETY: every chunk is initialised (zeroed) before `fill` sees it.
    unsafe {
        par_written(n, chunk, |i, c| {
            self::fill(c, T::ZERO);
            fill(i, assume_init(c))
        })
    }
}

/// A kernel's output of `n` elements, written in parallel by `write(i, out)` for chunk `i`
/// (elements `i * chunk ..`), with no zeroing pass.
///
/// # Safety
/// `write` must write every element of every chunk it is given.
pub(crate) unsafe fn par_written<T: Send>(
    n: usize,
    chunk: usize,
    write: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| write(i, c));
    // SAFETY: the caller's `write` wrote every element of every chunk, and the chunks
    // cover all `n`.
    unsafe { v.set_len(n) };
    v
}

/// Two outputs of `len_a` and `len_b` elements, written together in matching chunks
/// (`chunk_a` and `chunk_b` elements, the same number of chunks) by `write(i, a_i, b_i)`,
/// returned one after the other in one vector of `len_a + len_b`.
///
/// # Safety
/// `write` must write every element of both chunks it is given.
pub(crate) unsafe fn par_written_pair<T: Send>(
    (len_a, chunk_a): (usize, usize),
    (len_b, chunk_b): (usize, usize),
    write: impl Fn(usize, &mut [MaybeUninit<T>], &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let (chunk_a, chunk_b) = (chunk_a.max(1), chunk_b.max(1));
    assert_eq!(len_a.div_ceil(chunk_a), len_b.div_ceil(chunk_b), "par_written_pair: chunk counts differ");
    let mut v = Vec::with_capacity(len_a + len_b);
    let (a, b) = v.spare_capacity_mut()[..len_a + len_b].split_at_mut(len_a);
    a.par_chunks_mut(chunk_a).zip(b.par_chunks_mut(chunk_b)).enumerate().for_each(|(i, (ca, cb))| write(i, ca, cb));
    // SAFETY: the caller's `write` wrote both parts in full.
    unsafe { v.set_len(len_a + len_b) };
    v
}

/// Whether this CPU runs the AVX2+FMA versions of the kernels.
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *YES.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `fn $name<T: Real>(args)` that runs `$inner::<T>(args)` compiled for AVX2+FMA
/// when the CPU has them, and the baseline build otherwise. `$inner` must be
/// `#[inline(always)]` so that it is compiled inside the feature-enabled wrapper.
macro_rules! simd_dispatch {
    ($name:ident => $inner:ident ($($arg:ident : $ty:ty),* $(,)?)) => {
        fn $name<T: $crate::fused::cpu::Real>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<T: $crate::fused::cpu::Real>($($arg: $ty),*) {
                    $inner::<T>($($arg),*)
                }
                if $crate::fused::cpu::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                    unsafe { avx2::<T>($($arg),*) };
                    return;
                }
            }
            $inner::<T>($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// `CpuStorage::F32(body)` or `CpuStorage::F64(body)` with `$t` the matching float type,
/// by `$dtype`; any other dtype is an error naming the op.
macro_rules! for_float {
    ($dtype:expr, $what:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                candle_core::CpuStorage::F32($body)
            }
            candle_core::DType::F64 => {
                type $t = f64;
                candle_core::CpuStorage::F64($body)
            }
            d => candle_core::bail!("{}: no CPU kernel for {d:?}", $what),
        }
    };
}
pub(crate) use for_float;

#[cfg(test)]
mod tests {
    use super::{exp_f32, par_filled, zeros};

    #[test]
    fn zeros_are_zeros_on_both_paths() {
        for n in [0, 1, 1000, 4 << 16, (4 << 16) + 7, 1_000_003] {
            let v = zeros::<f32>(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0), "n = {n}");
        }
        assert!(zeros::<f64>(300_001).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn par_filled_hands_every_chunk_out_once_and_zeroed() {
        for (n, chunk) in [(0, 4), (1, 4), (10, 3), (1 << 16, 1000), (12, 12), (5, 0)] {
            let v = par_filled::<f64>(n, chunk, |i, c| {
                assert!(c.iter().all(|&x| x == 0.0));
                for (j, x) in c.iter_mut().enumerate() {
                    *x += (i * chunk.max(1) + j) as f64;
                }
            });
            assert_eq!(v, (0..n).map(|x| x as f64).collect::<Vec<_>>(), "n = {n}, chunk = {chunk}");
        }
    }

    #[test]
    fn fast_exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        // The exponent from y's bits is the rounded integer itself: the same result, bit for
        // bit, as scaling by 2^(n as i32).
        let by_cast = |x: f32| {
            let x = x.clamp(-87.336_54, 88.376_26);
            let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
            let mut p = 1.987_569_1e-4_f32;
            for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
                p = p * r + c;
            }
            (p * r * r + r + 1.0) * f32::from_bits(((n as i32 + 127) as u32) << 23)
        };
        let mut x = -100.0f32;
        while x < 100.0 {
            assert_eq!(exp_f32(x).to_bits(), by_cast(x).to_bits(), "x = {x}");
            x += 0.0071;
        }
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
