//! Fused CPU kernels with a backward pass (Candle custom ops).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Target value meaning "no target" for [`CrossEntropy`].
pub const NO_TARGET: u32 = u32::MAX;

/// Per-row cross-entropy `logsumexp(logits[r]) - logits[r, target[r]]` over `[N, V]` f32
/// logits and `[N]` u32 targets ([`NO_TARGET`] rows give 0 and no gradient). The backward
/// pass is `(softmax(logits[r]) - onehot(target[r])) * grad[r]`. Rows run in parallel.
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropy;

fn rows<'a>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], usize, usize)> {
    let (n, v) = l.shape().dims2()?;
    let Some((start, end)) = l.contiguous_offsets() else { bail!("cross-entropy needs contiguous logits") };
    Ok((&s.as_slice::<f32>()?[start..end], n, v))
}

fn targets<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let Some((start, end)) = l.contiguous_offsets() else { bail!("cross-entropy needs contiguous targets") };
    Ok(&s.as_slice::<u32>()?[start..end])
}

fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    max + sum.ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "bistro-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, n, v) = rows(s1, l1)?;
        let t = targets(s2, l2)?;
        if t.len() != n {
            bail!("cross-entropy: {} targets for {n} rows", t.len());
        }
        let out: Vec<f32> = logits
            .par_chunks(v)
            .zip(t.par_iter())
            .map(|(row, &target)| {
                if target == NO_TARGET || target as usize >= v {
                    0.0
                } else {
                    logsumexp(row) - row[target as usize]
                }
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, targets_t: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = logits.dims2()?;
        let l = logits.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let t = targets_t.to_vec1::<u32>()?;
        let g = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v).zip(l.par_chunks(v)).zip(t.par_iter().zip(g.par_iter())).for_each(|((o, row), (&target, &gr))| {
            if target == NO_TARGET || target as usize >= v {
                return;
            }
            let lse = logsumexp(row);
            for (oi, &x) in o.iter_mut().zip(row) {
                *oi = (x - lse).exp() * gr;
            }
            o[target as usize] -= gr;
        });
        let grad_logits = Tensor::from_vec(out, (n, v), logits.device())?.to_dtype(logits.dtype())?;
        Ok((Some(grad_logits), None))
    }
}
