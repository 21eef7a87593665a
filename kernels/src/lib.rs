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

/// Coordinates per block of the CPU's deterministic reduction. Long blocks keep each
/// miner's slice a long sequential read: 8 miners of the `1b` slice ran at 18.9-20.0 GiB/s
/// with 16 Ki blocks, 26.8-27.4 GiB/s with 256 Ki (copy bandwidth 22.1-22.9 GiB/s).
pub const BLOCK: usize = 256 * 1024;

/// Coordinates per thread block of the CUDA reduction (small, so a GPU gets many blocks).
pub const CUDA_BLOCK: usize = 16 * 1024;

/// Errors of the kernels.
#[derive(Debug, thiserror::Error)]
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
