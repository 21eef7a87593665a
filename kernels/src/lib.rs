//! # bistro-kernels
//!
//! The validator's hot loop: for a window's slice coordinates `I`, the validator holds
//! `theta_w[I]` and its recomputed gradient `g_v[I]`; each miner sent `s = theta_w[I] -
//! eta * g_m[I]`. This crate returns, for many miners in one pass over memory,
//!
//! * `||g_m - g_v||^2` per miner (from which `R = -||g_m - g_v||`), and
//! * `||g_v||^2` (for the relative error `e = ||g_m - g_v|| / ||g_v||`).
//!
//! It uses `eta * (g_m - g_v) = (theta - eta * g_v) - s`, so the inner loop is one
//! subtraction, one multiply and one add per coordinate and miner (plain f32 arithmetic:
//! `f32::mul_add` would call a slow software FMA on baseline x86-64).
//!
//! [`cpu::diff_norms`] is the default (vectorisable, multi-threaded, deterministic: fixed
//! blocks of [`BLOCK`] coordinates summed in f32 lanes, blocks combined in f64 in order).
//! With the `cuda` feature, `cuda::CudaDiffNorm` runs the same computation on a GPU
//! (NVRTC-compiled at run time, one thread block per chunk, fixed-order reduction).
//! This crate is a leaf: it knows nothing of models or networks.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod ptx;
pub mod rng;

/// Coordinates per block of the CPU's deterministic reduction. Long blocks keep each
/// miner's slice a long sequential read: 8 miners of the `1b` slice ran at 18.9-20.0 GiB/s
/// with 16 Ki blocks, 26.8-27.4 GiB/s with 256 Ki (copy bandwidth 22.1-22.9 GiB/s).
pub const BLOCK: usize = 256 * 1024;

/// Coordinates per thread block of the CUDA reduction (small, so a GPU gets many blocks).
pub const CUDA_BLOCK: usize = 16 * 1024;

/// Errors of the kernels.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// Inputs of different lengths.
    #[error("length mismatch: {0}")]
    Length(String),
    /// `eta` is not a positive finite number.
    #[error("learning rate must be positive and finite, got {0}")]
    Eta(f32),
    /// The GPU path failed.
    #[error("cuda: {0}")]
    Cuda(String),
}

/// The gradient-difference norm on the device the validator scores on: the CPU kernel, or
/// (feature `cuda`) the CUDA kernel, behind one call.
#[derive(Debug)]
#[non_exhaustive]
pub enum NormKernel {
    /// [`cpu::diff_norms`].
    Cpu,
    /// `cuda::CudaDiffNorm` on one device.
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaDiffNorm),
}

impl NormKernel {
    /// The kernel for a scoring device: the CPU for `None`, CUDA device `ordinal` otherwise
    /// (an error when this build has no `cuda` feature or the device cannot load it).
    pub fn for_device(cuda_ordinal: Option<usize>) -> Result<Self, KernelError> {
        match cuda_ordinal {
            None => Ok(NormKernel::Cpu),
            #[cfg(feature = "cuda")]
            Some(i) => Ok(NormKernel::Cuda(cuda::CudaDiffNorm::new(i)?)),
            #[cfg(not(feature = "cuda"))]
            Some(i) => {
                Err(KernelError::Cuda(format!("scoring on CUDA device {i} needs a build with the `cuda` feature")))
            }
        }
    }

    /// `cpu` or `cuda`.
    pub fn name(&self) -> &'static str {
        match self {
            NormKernel::Cpu => "cpu",
            #[cfg(feature = "cuda")]
            NormKernel::Cuda(_) => "cuda",
        }
    }

    /// Per-miner `||g_m - g_v||^2` and `||g_v||^2` (see [`cpu::diff_norms`]); the CUDA kernel
    /// copies the inputs to the device once and reduces in the same fixed order per chunk,
    /// so it matches the CPU result to f32 rounding within chunks (`kernels/tests/cuda.rs`).
    pub fn diff_norms(&self, theta: &[f32], gv: &[f32], eta: f32, slices: &[&[f32]]) -> Result<DiffNorms, KernelError> {
        match self {
            NormKernel::Cpu => cpu::diff_norms(theta, gv, eta, slices),
            #[cfg(feature = "cuda")]
            NormKernel::Cuda(k) => k.diff_norms(theta, gv, eta, slices),
        }
    }
}

/// Per-miner squared distances and the validator gradient's squared norm.
#[derive(Clone, Debug, PartialEq)]
pub struct DiffNorms {
    /// `||g_m - g_v||^2` for each miner, in input order.
    pub sq_dist: Vec<f64>,
    /// `||g_v||^2`.
    pub gv_sq: f64,
}

impl DiffNorms {
    /// `e = ||g_m - g_v|| / ||g_v||` for each miner (`inf` when `g_v` is zero and the distance is not).
    pub fn relative_errors(&self) -> Vec<f64> {
        let gv = self.gv_sq.sqrt();
        self.sq_dist
            .iter()
            .map(|&d| {
                if gv > 0.0 {
                    d.sqrt() / gv
                } else if d == 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            })
            .collect()
    }
}

pub(crate) fn check(theta: &[f32], gv: &[f32], eta: f32, slices: &[&[f32]]) -> Result<(), KernelError> {
    if !(eta > 0.0 && eta.is_finite()) {
        return Err(KernelError::Eta(eta));
    }
    if theta.len() != gv.len() {
        return Err(KernelError::Length(format!("theta {} vs g_v {}", theta.len(), gv.len())));
    }
    if let Some((i, s)) = slices.iter().enumerate().find(|(_, s)| s.len() != theta.len()) {
        return Err(KernelError::Length(format!("slice {i} has {} values, expected {}", s.len(), theta.len())));
    }
    Ok(())
}

#[cfg(test)]
mod norm_kernel_tests {
    use super::*;

    #[test]
    fn the_cpu_is_chosen_without_a_device_and_cuda_needs_the_feature() {
        let k = NormKernel::for_device(None).unwrap();
        assert_eq!(k.name(), "cpu");
        let theta = [1.0f32, 2.0, 3.0];
        let gv = [0.5f32, -1.0, 2.0];
        let s = [0.6f32, 2.1, 2.0];
        assert_eq!(k.diff_norms(&theta, &gv, 0.5, &[&s]).unwrap(), cpu::diff_norms(&theta, &gv, 0.5, &[&s]).unwrap());
        #[cfg(not(feature = "cuda"))]
        assert!(NormKernel::for_device(Some(0)).unwrap_err().to_string().contains("`cuda` feature"));
    }
}
