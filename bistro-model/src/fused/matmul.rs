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

/// A pointer to the output that the column bands write through, each to its own columns.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);

// SAFETY: the bands write disjoint elements (see `cpu_run`) and the buffer outlives them.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as for `Send`.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

fn cpu_run<T: candle_core::WithDType>(
    a: &[T],
    b: &[T],
    d: Bmnk,
    ((ars, acs), (brs, bcs)): ((isize, isize), (isize, isize)),
) -> Vec<T> {
    let (mk, kn, mn) = (d.m * d.k, d.k * d.n, d.m * d.n);
    if mn == 0 || d.k == 0 {
        return vec![T::zero(); d.batch * mn];
    }
    // The product overwrites every element of `c` (read_dst = false), so `c` is not zeroed
    // first: that memset was ~3% of a `small` training step.
    let mut c: Vec<T> = Vec::with_capacity(d.batch * mn);
    let threads = rayon::current_num_threads();
    let one = |a: &[T], b: &[T], c: &mut [std::mem::MaybeUninit<T>], par: gemm::Parallelism| {
        // SAFETY: `a`, `b` and `c` hold one [m,k], [k,n] and [m,n] matrix each under the
        // strides given (checked by `dims`); `c` is only written (read_dst = false), every
        // element of it, as k > 0.
        unsafe {
            gemm::gemm(
                d.m,
                d.n,
                d.k,
                c.as_mut_ptr().cast::<T>(),
                1,
                d.n as isize,
                false,
                a.as_ptr(),
                acs,
                ars,
                b.as_ptr(),
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
    };
    let spare = &mut c.spare_capacity_mut()[..d.batch * mn];
    if d.batch == 1 && threads > 1 && d.n >= 64 * threads {
        // One product: its columns split into one band per thread, each a single-threaded
        // gemm. gemm's own threading synchronises its threads at every block, and a thread
        // of a shared VM that is descheduled there stalls the others; the split needs one
        // join. Measured on the `small` step (AVX-512 Xeon, interleaved runs):
        // median 0.912 -> 0.893 s, lower quartile 0.888 -> 0.864 s (30 steps each).
        let width = d.n.div_ceil(threads).next_multiple_of(16);
        let bands = d.n.div_ceil(width);
        let c_ptr = SendPtr(spare.as_mut_ptr().cast::<T>());
        (0..bands).into_par_iter().for_each(|i| {
            let c0 = i * width;
            let w = width.min(d.n - c0);
            // SAFETY: the band writes columns c0..c0 + w of every row of C (row stride n),
            // which no other band touches, and reads columns c0..c0 + w of op(B); every
            // element of C is written (read_dst = false, k > 0).
            unsafe {
                gemm::gemm(
                    d.m,
                    w,
                    d.k,
                    c_ptr.get().add(c0),
                    1,
                    d.n as isize,
                    false,
                    a.as_ptr(),
                    acs,
                    ars,
                    b.as_ptr().offset(c0 as isize * bcs),
                    bcs,
                    brs,
                    T::zero(),
                    T::one(),
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
    } else if d.batch >= 2 * threads && threads > 1 {
        spare
            .par_chunks_mut(mn)
            .enumerate()
            .for_each(|(i, ci)| one(&a[i * mk..(i + 1) * mk], &b[i * kn..(i + 1) * kn], ci, gemm::Parallelism::None));
    } else {
        let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        for (i, ci) in spare.chunks_mut(mn).enumerate() {
            one(&a[i * mk..(i + 1) * mk], &b[i * kn..(i + 1) * kn], ci, par);
        }
    }
    // SAFETY: every one of the batch * mn elements was written by `gemm` above.
    unsafe { c.set_len(d.batch * mn) };
    c
}

impl Kernels<2> for MatMulOp {
    fn name(&self) -> &'static str {
        "bistro-matmul"
    }

    fn cpu(&self, [(s1, l1), (s2, l2)]: [Cpu<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        let (d, shape) = self.dims(l1, l2)?;
        let st = self.strides(d);
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(cpu_run(slice::<f32>(s1, l1, "matmul")?, slice(s2, l2, "matmul")?, d, st))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(cpu_run(slice::<f64>(s1, l1, "matmul")?, slice(s2, l2, "matmul")?, d, st))
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
        let mm = |x: &Tensor, y: &Tensor, ta: bool, tb: bool| x.apply_op2_no_bwd(y, &Fused(MatMulOp { ta, tb }));
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
    a.contiguous()?.apply_op2(&b.contiguous()?, Fused(MatMulOp { ta, tb }))
}

#[cfg(test)]
mod tests {
    use super::{Bmnk, MatMulOp, cpu_run};

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
        // multiple of 16), a batch run one gemm per entry, and a batch of one narrow product.
        let shapes = [(1, 37, 301, 19), (6, 9, 11, 7), (1, 5, 40, 3)];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut rng = bistro_kernels::rng::XorShift::new(7);
        for (batch, m, n, k) in shapes {
            let d = Bmnk { batch, m, n, k };
            let a: Vec<f64> = (0..batch * m * k).map(|_| rng.uniform() - 0.5).collect();
            let b: Vec<f64> = (0..batch * k * n).map(|_| rng.uniform() - 0.5).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let op = MatMulOp { ta, tb };
                let want = naive(&a, &b, d, op);
                for threads in [&pool, &rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap()] {
                    let got = threads.install(|| cpu_run(&a, &b, d, op.strides(d)));
                    for (x, y) in got.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-12, "{batch}x{m}x{n}x{k} {op:?}: {x} vs {y}");
                    }
                }
            }
        }
    }
}
