//! The embedding table's gradient: the rows of `dx` summed into the rows of the tokens that
//! selected them, in parallel over the table.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Result, Shape, Tensor, bail};

use super::cpu::{Real, for_float, par_filled, rows_per_task, slice};
#[cfg(feature = "cuda")]
use super::op::Cuda;
use super::op::{Cpu, Fused, Kernels};

/// `d_table[v] = sum of dx[p] over positions p with ids[p] == v`, positions in increasing
/// order (the order `index_add` adds them in, so the result is the same to the bit).
fn grad_cpu<T: Real>(ids: &[u32], dx: &[T], vocab: usize, dim: usize) -> Vec<T> {
    // Positions grouped by id, in increasing order within each id (a counting sort).
    let mut start = vec![0usize; vocab + 1];
    for &id in ids {
        start[id as usize + 1] += 1;
    }
    for v in 0..vocab {
        start[v + 1] += start[v];
    }
    let mut next = start.clone();
    let mut order = vec![0usize; ids.len()];
    for (p, &id) in ids.iter().enumerate() {
        order[next[id as usize]] = p;
        next[id as usize] += 1;
    }
    let rows = rows_per_task(dim);
    par_filled(vocab * dim, rows * dim, |i, out| {
        for (r, row) in out.chunks_exact_mut(dim).enumerate() {
            let v = i * rows + r;
            for &p in &order[start[v]..start[v + 1]] {
                for (o, &g) in row.iter_mut().zip(&dx[p * dim..(p + 1) * dim]) {
                    *o += g;
                }
            }
        }
    })
}

/// `(ids [N] u32, dx [N, H]) -> [vocab, H]`: the embedding table's gradient, CPU only (see
/// [`grad`]); ids at or above `vocab` are an error.
#[derive(Clone, Copy, Debug)]
struct EmbeddingGrad {
    /// Rows of the table.
    vocab: usize,
}

impl Kernels<2> for EmbeddingGrad {
    fn name(&self) -> &'static str {
        "bistro-embedding-grad"
    }

    fn cpu(&self, [(s1, l1), (s2, l2)]: [Cpu<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        let (n, dim) = l2.shape().dims2()?;
        let ids = slice::<u32>(s1, l1, "embedding gradient")?;
        if ids.len() != n {
            bail!("embedding gradient: {} ids for {n} rows", ids.len());
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            bail!("embedding gradient: id {bad} outside the vocabulary of {}", self.vocab);
        }
        let out = for_float!(s2.dtype(), "embedding gradient", |T| grad_cpu(
            ids,
            slice::<T>(s2, l2, "embedding gradient")?,
            self.vocab,
            dim
        ));
        Ok((out, Shape::from((self.vocab, dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, _: [Cuda<'_>; 2]) -> Result<(candle_core::CudaStorage, Shape)> {
        bail!("{}: CPU only (elsewhere `index_add` runs)", self.name())
    }
}

/// The gradient `[vocab, H]` of an embedding lookup `table.index_select(ids, 0)` from the
/// gradient `dx: [N, H]` of its output; ids at or above `vocab` are an error.
pub(crate) fn grad(ids: &Tensor, dx: &Tensor, vocab: usize) -> Result<Tensor> {
    let (n, dim) = dx.dims2()?;
    let ids = ids.to_dtype(candle_core::DType::U32)?.flatten_all()?;
    if ids.elem_count() != n {
        bail!("embedding gradient: {} ids for {n} rows", ids.elem_count());
    }
    if !dx.device().is_cpu() {
        return Tensor::zeros((vocab, dim), dx.dtype(), dx.device())?.index_add(&ids, dx, 0);
    }
    ids.contiguous()?.apply_op2_no_bwd(&dx.contiguous()?, &Fused(EmbeddingGrad { vocab }))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn equals_index_add_to_the_bit() {
        let (vocab, dim, n) = (300, 24, 500);
        let mut rng = bistro_kernels::rng::XorShift::new(9);
        // Repeated ids (a small range) and unused rows.
        let ids: Vec<u32> = (0..n).map(|_| rng.below(40) as u32 * 7).collect();
        let dx: Vec<f32> = rng.vec_f32(n * dim, 1.0);
        let ids = Tensor::from_vec(ids, n, &Device::Cpu).unwrap();
        let dx = Tensor::from_vec(dx, (n, dim), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F64] {
            let dx = dx.to_dtype(dtype).unwrap();
            let got = super::grad(&ids, &dx, vocab).unwrap();
            let want = Tensor::zeros((vocab, dim), dtype, &Device::Cpu).unwrap().index_add(&ids, &dx, 0).unwrap();
            let (g, w) = (
                got.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                want.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            );
            assert_eq!(g, w, "{dtype:?}");
        }
        let bad = Tensor::new(&[1u32, 300], &Device::Cpu).unwrap();
        assert!(super::grad(&bad, &dx.narrow(0, 0, 2).unwrap(), vocab).is_err());
    }
}
