//! Batched matrix products with optional transposes, as one op with a backward pass.
//!
//! `C = op(A) op(B)` where `op` transposes the last two dimensions or not. Through Candle
//! ops a product with a transposed weight costs a transpose node, two reshape nodes and a
//! matmul node, and every node costs a zero-filled buffer and an addition in the backward
//! pass; this op is one node. On the CPU, batched products (attention) run one gemm per
//! batch entry in parallel, where Candle runs them one after another.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::cpu::slice;
#[cfg(feature = "cuda")]
use super::op::Cuda;
use super::op::{Cpu, Fused, Kernels};

/// `C = op(A) op(B)`: `A: [.., M, K]` (`[.., K, M]` when `ta`), `B: [.., K, N]` (`[.., N,
/// K]` when `tb`) with the same leading (batch) dimensions, `C: [.., M, N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MatMulOp {
    /// Use the transpose of the last two dimensions of `A`.
    pub ta: bool,
    /// Use the transpose of the last two dimensions of `B`.
    pub tb: bool,
    /// Which part of a causal-attention product to compute (CPU; CUDA computes all of it).
    pub causal: Causal,
}

/// The part of a square causal-attention product that is computed, in row blocks
/// (`Causal::block`): the rest is known to be zero or is never read, so skipping it saves
/// up to half of the product without changing what is read downstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causal {
    /// All of it.
    Full,
    /// `C` (`T x T`) is only read on and below its diagonal (by the causal softmax and its
    /// backward): blocks wholly above it are zeroed instead of computed. `Q Kᵀ`, `dO Vᵀ`.
    OutLower,
    /// `op(A)` (`T x T`) is zero above its diagonal (attention probabilities and their
    /// gradient): row block `r` sums over the first `r + 1` blocks only. `P V`, `dS K`.
    ALower,
    /// `op(A)` (`T x T`) is zero below its diagonal (their transposes): row block `r` sums
    /// from block `r` on. `Pᵀ dO`, `dSᵀ Q`.
    AUpper,
}

impl Causal {
    /// Rows per block. Measured on `[4, 8, 256, 64]` attention products (AVX-512 Xeon,
    /// fastest of 40): `P V` 0.86 ms in full, 0.54 ms with blocks of 32, 0.75 with 64;
    /// `Q Kᵀ` (`k = 64`, so little work per skipped block) 0.97 ms in full, 1.04 with blocks
    /// of 32, 0.97 with 128.
    fn block(self) -> usize {
        match self {
            Causal::OutLower => 128,
            _ => 32,
        }
    }
}

/// The shape of one product: `batch` products of `[m, k] x [k, n]`.
#[derive(Clone, Copy, Debug)]
struct Bmnk {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
}

impl MatMulOp {
    fn dims(&self, la: &Layout, lb: &Layout) -> Result<(Bmnk, Shape)> {
        let (da, db) = (la.shape().dims(), lb.shape().dims());
        let r = da.len();
        if r < 2 || db.len() != r || da[..r - 2] != db[..r - 2] {
            bail!("matmul: shapes {:?} and {:?} do not batch together", la.shape(), lb.shape());
        }
        let (m, k) = if self.ta { (da[r - 1], da[r - 2]) } else { (da[r - 2], da[r - 1]) };
        let (k2, n) = if self.tb { (db[r - 1], db[r - 2]) } else { (db[r - 2], db[r - 1]) };
        if k != k2 {
            bail!("matmul: inner dimensions differ: {:?} x {:?} ({self:?})", la.shape(), lb.shape());
        }
        let square = match self.causal {
            Causal::Full => true,
            Causal::OutLower => m == n,
            Causal::ALower | Causal::AUpper => m == k,
        };
        if !square {
            bail!(
                "matmul: {:?} needs a square causal matrix, got {:?} x {:?} ({self:?})",
                self.causal,
                la.shape(),
                lb.shape()
            );
        }
        let batch = da[..r - 2].iter().product();
        let mut out = da[..r - 2].to_vec();
        out.extend([m, n]);
        Ok((Bmnk { batch, m, n, k }, Shape::from(out)))
    }

    /// Row and column strides of the logical `op(A)` `[m, k]` and `op(B)` `[k, n]`.
    fn strides(&self, d: Bmnk) -> ((isize, isize), (isize, isize)) {
        let a = if self.ta { (1, d.m as isize) } else { (d.k as isize, 1) };
        let b = if self.tb { (1, d.k as isize) } else { (d.n as isize, 1) };
        (a, b)
    }
}

/// `C = op(A) op(B)` for one `m x n x k` product through gemm, `C` row-major with row
/// stride `c_rs`, `A` and `B` under the (row, column) strides given; `C` is only written.
///
/// # Safety
/// `c`, `a` and `b` must hold the matrices under those strides, and no one else may access
/// the written elements of `C` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_at<T: candle_core::WithDType>(
    (m, n, k): (usize, usize, usize),
    c: *mut T,
    c_rs: usize,
    a: *const T,
    (ars, acs): (isize, isize),
    b: *const T,
    (brs, bcs): (isize, isize),
    par: gemm::Parallelism,
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            false,
            a,
            acs,
            ars,
            b,
            bcs,
            brs,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// One (batch entry's) product of shape `d` into `c`, all of it or the [`Causal`] part.
///
/// # Safety
/// As for [`gemm_at`], with `C` of `m x n` and `op(A)`, `op(B)` of `m x k`, `k x n`; the
/// causal variants need the square shapes [`MatMulOp::dims`] checks.
unsafe fn product<T: candle_core::WithDType>(
    d: Bmnk,
    c: *mut T,
    a: *const T,
    b: *const T,
    op: MatMulOp,
    par: gemm::Parallelism,
) {
    let ((sa, sb), causal) = (op.strides(d), op.causal);
    if causal == Causal::Full {
        // SAFETY: forwarded to the caller.
        unsafe { gemm_at((d.m, d.n, d.k), c, d.n, a, sa, b, sb, par) };
        return;
    }
    for r0 in (0..d.m).step_by(causal.block()) {
        let r1 = (r0 + causal.block()).min(d.m);
        let rows = r1 - r0;
        // SAFETY: row block r0..r1 of C and of op(A) lies inside the matrices, and so do the
        // columns 0..r1 of C (OutLower: C is m x m) and the inner ranges 0..r1 (ALower) and
        // r0..k (AUpper) of op(A) and op(B) (op(A) is m x m).
        unsafe {
            let c_r = c.add(r0 * d.n);
            let a_r = a.offset(r0 as isize * sa.0);
            match causal {
                Causal::OutLower => {
                    gemm_at((rows, r1, d.k), c_r, d.n, a_r, sa, b, sb, par);
                    for r in 0..rows {
                        std::ptr::write_bytes(c_r.add(r * d.n + r1), 0, d.n - r1);
                    }
                }
                Causal::ALower => gemm_at((rows, d.n, r1), c_r, d.n, a_r, sa, b, sb, par),
                Causal::AUpper => {
                    let (a_k, b_k) = (a_r.offset(r0 as isize * sa.1), b.offset(r0 as isize * sb.0));
                    gemm_at((rows, d.n, d.k - r0), c_r, d.n, a_k, sa, b_k, sb, par)
                }
                Causal::Full => unreachable!("handled above"),
            }
        }
    }
}

/// gemm on the calling thread alone.
const SERIAL: gemm::Parallelism = gemm::Parallelism::None;

/// A pointer to the output that parallel tasks write through, each to its own elements.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);

// SAFETY: the tasks write disjoint elements (see `cpu_run`) and the buffer outlives them.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as for `Send`.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

fn cpu_run<T: candle_core::WithDType>(a: &[T], b: &[T], d: Bmnk, op: MatMulOp) -> Vec<T> {
    let (sa, sb) = op.strides(d);
    let (mk, kn, mn) = (d.m * d.k, d.k * d.n, d.m * d.n);
    if mn == 0 || d.k == 0 {
        return vec![T::zero(); d.batch * mn];
    }
    // The product overwrites every element of `c` (read_dst = false; the causal variants
    // zero what they skip), so `c` is not zeroed first: that memset was ~3% of a `small`
    // training step.
    let mut c: Vec<T> = Vec::with_capacity(d.batch * mn);
    let threads = rayon::current_num_threads();
    let c_ptr = SendPtr(c.spare_capacity_mut().as_mut_ptr().cast::<T>());
    // One product: split into one band per thread, each a single-threaded gemm. gemm's own
    // threading synchronises its threads at every block, and a thread of a shared VM that is
    // descheduled there stalls the others; the split needs one join. Measured on the `small`
    // step (AVX-512 Xeon, interleaved runs): median 0.912 -> 0.893 s, lower quartile 0.888
    // -> 0.864 s (30 steps each). The bands are column bands, except for products with a
    // transposed `A` (the weight gradients `dYᵀ X`), whose row bands measured 7-14% faster
    // in isolation (`[512|1376|8192, 512] x 1024`) and 1-3% on the `small` step (with gemm's
    // AVX2 kernels, built without `x86-v4`: the same step time or up to 2% faster).
    let rows = op.ta && d.m >= 64 * threads;
    let banded = d.batch == 1 && threads > 1 && op.causal == Causal::Full && (rows || d.n >= 64 * threads);
    if banded {
        let extent = if rows { d.m } else { d.n };
        let size = extent.div_ceil(threads).next_multiple_of(16);
        (0..extent.div_ceil(size)).into_par_iter().for_each(|i| {
            let (start, len) = (i * size, size.min(extent - i * size));
            // SAFETY: a row band writes rows start..start + len of C and reads the same rows
            // of op(A); a column band writes columns start..start + len of every row of C
            // (row stride n) and reads the same columns of op(B). No other band touches them.
            unsafe {
                if rows {
                    let a_r = a.as_ptr().offset(start as isize * sa.0);
                    gemm_at((len, d.n, d.k), c_ptr.get().add(start * d.n), d.n, a_r, sa, b.as_ptr(), sb, SERIAL)
                } else {
                    let b_c = b.as_ptr().offset(start as isize * sb.1);
                    gemm_at((d.m, len, d.k), c_ptr.get().add(start), d.n, a.as_ptr(), sa, b_c, sb, SERIAL)
                }
            }
        });
    } else {
        // Batched products (attention) run one gemm per batch entry in parallel.
        let (par, each) = if d.batch >= 2 * threads && threads > 1 {
            (true, SERIAL)
        } else if threads > 1 {
            (false, gemm::Parallelism::Rayon(threads))
        } else {
            (false, SERIAL)
        };
        let run = |i: usize| {
            // SAFETY: entry i's matrices are the i-th [m,k], [k,n] and [m,n] blocks (checked
            // by `dims`); each entry writes only its own block of C.
            unsafe { product(d, c_ptr.get().add(i * mn), a[i * mk..].as_ptr(), b[i * kn..].as_ptr(), op, each) }
        };
        if par {
            (0..d.batch).into_par_iter().for_each(run);
        } else {
            (0..d.batch).for_each(run);
        }
    }
    // SAFETY: every one of the batch * mn elements was written above.
    unsafe { c.set_len(d.batch * mn) };
    c
}

impl Kernels<2> for MatMulOp {
    fn name(&self) -> &'static str {
        "bistro-matmul"
    }

    fn cpu(&self, [(s1, l1), (s2, l2)]: [Cpu<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        let (d, shape) = self.dims(l1, l2)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(cpu_run(slice::<f32>(s1, l1, "matmul")?, slice(s2, l2, "matmul")?, d, *self))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(cpu_run(slice::<f64>(s1, l1, "matmul")?, slice(s2, l2, "matmul")?, d, *self))
            }
            _ => bail!("matmul: no CPU kernel for {:?} x {:?}", s1.dtype(), s2.dtype()),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [(s1, l1), (s2, l2)]: [Cuda<'_>; 2]) -> Result<(candle_core::CudaStorage, Shape)> {
        let (d, shape) = self.dims(l1, l2)?;
        let ((ars, acs), (brs, bcs)) = self.strides(d);
        // Candle's cuBLAS path takes the transposes as strides of rank-3 layouts.
        let la = Layout::new(
            Shape::from((d.batch, d.m, d.k)),
            vec![d.m * d.k, ars as usize, acs as usize],
            l1.start_offset(),
        );
        let lb = Layout::new(
            Shape::from((d.batch, d.k, d.n)),
            vec![d.k * d.n, brs as usize, bcs as usize],
            l2.start_offset(),
        );
        if !l1.is_contiguous() || !l2.is_contiguous() {
            bail!("matmul: inputs must be contiguous");
        }
        Ok((s1.matmul(s2, (d.batch, d.m, d.n, d.k), &la, &lb)?, shape))
    }

    fn backward(&self, [a, b]: [&Tensor; 2], _c: &Tensor, dc: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let (a, b, dc) = (a.detach(), b.detach(), dc.contiguous()?);
        // Full products: correct whichever part the forward computed (the gradient of a
        // causal product's skipped part is zero, or is never used).
        let mm = |x: &Tensor, y: &Tensor, ta: bool, tb: bool| {
            x.apply_op2_no_bwd(y, &Fused(MatMulOp { ta, tb, causal: Causal::Full }))
        };
        let da = match (self.ta, self.tb) {
            (false, false) => mm(&dc, &b, false, true)?,
            (false, true) => mm(&dc, &b, false, false)?,
            (true, false) => mm(&b, &dc, false, true)?,
            (true, true) => mm(&b, &dc, true, true)?,
        };
        let db = match (self.ta, self.tb) {
            (false, false) => mm(&a, &dc, true, false)?,
            (true, false) => mm(&a, &dc, false, false)?,
            (false, true) => mm(&dc, &a, true, false)?,
            (true, true) => mm(&dc, &a, true, true)?,
        };
        Ok([Some(da), Some(db)])
    }
}

/// `op(a) op(b)` through the fused matmul op where it has a kernel (CPU f32/f64, CUDA), else
/// Candle's `matmul` on transposed views.
pub fn matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    let fused = super::supported(a) && a.dtype() == b.dtype() && (a.device().is_cuda() || a.dtype() != DType::BF16);
    if !fused {
        let t = |x: &Tensor, yes: bool| {
            if yes { x.transpose(candle_core::D::Minus2, candle_core::D::Minus1) } else { Ok(x.clone()) }
        };
        return t(a, ta)?.matmul(&t(b, tb)?);
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Fused(MatMulOp { ta, tb, causal: Causal::Full }))
}

/// [`matmul`] of a causal-attention product that computes only the [`Causal`] part on the
/// CPU (all of it elsewhere, and for dtypes without a fused kernel). Its backward pass runs
/// full products.
pub fn causal_matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool, causal: Causal) -> Result<Tensor> {
    if causal == Causal::Full || !(super::supported(a) && a.device().is_cpu() && a.dtype() == b.dtype()) {
        return matmul(a, b, ta, tb);
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Fused(MatMulOp { ta, tb, causal }))
}

#[cfg(test)]
mod tests {
    use super::{Bmnk, Causal, MatMulOp, cpu_run};

    /// `op(A) op(B)` the slow way, in f64.
    fn naive(a: &[f64], b: &[f64], d: Bmnk, op: MatMulOp) -> Vec<f64> {
        let mut c = vec![0.0; d.batch * d.m * d.n];
        for bi in 0..d.batch {
            let (a, b) = (&a[bi * d.m * d.k..], &b[bi * d.k * d.n..]);
            for i in 0..d.m {
                for j in 0..d.n {
                    let mut s = 0.0;
                    for p in 0..d.k {
                        let x = if op.ta { a[p * d.m + i] } else { a[i * d.k + p] };
                        let y = if op.tb { b[j * d.k + p] } else { b[p * d.n + j] };
                        s += x * y;
                    }
                    c[bi * d.m * d.n + i * d.n + j] = s;
                }
            }
        }
        c
    }

    #[test]
    fn every_threading_path_gives_the_product() {
        // One product wide enough for the column bands (n >= 64 x threads, and not a
        // multiple of 16), one tall enough for the row bands (m >= 64 x threads, taken when A
        // is transposed), a batch run one gemm per entry, and a batch of one narrow product.
        let shapes = [(1, 37, 301, 19), (1, 301, 37, 19), (6, 9, 11, 7), (1, 5, 40, 3)];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut rng = bistro_kernels::rng::XorShift::new(7);
        for (batch, m, n, k) in shapes {
            let d = Bmnk { batch, m, n, k };
            let a: Vec<f64> = (0..batch * m * k).map(|_| rng.uniform() - 0.5).collect();
            let b: Vec<f64> = (0..batch * k * n).map(|_| rng.uniform() - 0.5).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let op = MatMulOp { ta, tb, causal: Causal::Full };
                let want = naive(&a, &b, d, op);
                for threads in [&pool, &rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap()] {
                    let got = threads.install(|| cpu_run(&a, &b, d, op));
                    for (x, y) in got.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-12, "{batch}x{m}x{n}x{k} {op:?}: {x} vs {y}");
                    }
                }
            }
        }
    }

    #[test]
    fn causal_products_equal_the_full_product_where_it_is_read() {
        // T = 150: two full blocks and a partial one; batch 5 (per-entry threads) and 1.
        let t = 150;
        let mut rng = bistro_kernels::rng::XorShift::new(3);
        for batch in [1, 5] {
            for (causal, k_or_n) in [(Causal::OutLower, 20), (Causal::ALower, 20), (Causal::AUpper, 20)] {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let op = MatMulOp { ta, tb, causal };
                    let d = match causal {
                        Causal::OutLower => Bmnk { batch, m: t, n: t, k: k_or_n },
                        _ => Bmnk { batch, m: t, n: k_or_n, k: t },
                    };
                    let mut a: Vec<f64> = (0..batch * d.m * d.k).map(|_| rng.uniform() - 0.5).collect();
                    let b: Vec<f64> = (0..batch * d.k * d.n).map(|_| rng.uniform() - 0.5).collect();
                    // op(A) triangular as the variant promises: zero above (ALower) or below
                    // (AUpper) its diagonal.
                    if causal != Causal::OutLower {
                        for bi in 0..batch {
                            for i in 0..t {
                                for p in 0..t {
                                    let zero = if causal == Causal::ALower { p > i } else { p < i };
                                    let at = if ta { p * t + i } else { i * t + p };
                                    if zero {
                                        a[bi * t * t + at] = 0.0;
                                    }
                                }
                            }
                        }
                    }
                    let want = naive(&a, &b, d, op);
                    let got = cpu_run(&a, &b, d, op);
                    for (idx, (x, y)) in got.iter().zip(&want).enumerate() {
                        let (i, j) = ((idx / d.n) % d.m, idx % d.n);
                        if causal == Causal::OutLower && j > i {
                            assert!(x.is_finite(), "{op:?}: unread entry ({i}, {j}) is {x}");
                            continue;
                        }
                        assert!((x - y).abs() < 1e-12, "{op:?} batch {batch} ({i}, {j}): {x} vs {y}");
                    }
                }
            }
        }
    }
}
