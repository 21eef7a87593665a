//! The gradient-difference norm on a CUDA GPU (cudarc, NVRTC-compiled at run time).
//!
//! Why NVRTC: the kernel needs no CUDA toolkit at build time, errors show on first use
//! only, and the PTX targets the project's one baseline, [`crate::ptx::PTX_ARCH`]
//! (`compute_80`: A100 and newer), like the fused ops. The reduction is deterministic: each thread block reduces a
//! fixed chunk of coordinates with a fixed-shape shared-memory tree (f32), and the host sums
//! the per-chunk partials in chunk order in f64 ([`crate::CUDA_BLOCK`] coordinates per
//! chunk), so the CPU and GPU results differ only by f32 rounding inside chunks.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use crate::{CUDA_BLOCK as BLOCK, DiffNorms, KernelError, check};

const THREADS: u32 = 256;

const SOURCE: &str = r#"
extern "C" __global__ void bistro_diff_norms(
    const float* __restrict__ theta,
    const float* __restrict__ gv,
    const float* __restrict__ slices,   // [m][n], row-major
    const float eta,
    const unsigned long long n,
    const unsigned int m,
    const unsigned int chunk,
    float* __restrict__ partials)       // [blocks][m + 1]: m distances, then |gv|^2
{
    extern __shared__ float sh[];
    const unsigned int tid = threadIdx.x;
    const unsigned long long lo = (unsigned long long)blockIdx.x * chunk;
    const unsigned long long hi = (lo + chunk < n) ? lo + chunk : n;
    for (unsigned int k = 0; k <= m; ++k) {
        float acc = 0.0f;
        if (k < m) {
            const float* s = slices + (unsigned long long)k * n;
            for (unsigned long long i = lo + tid; i < hi; i += blockDim.x) {
                const float d = (theta[i] - eta * gv[i]) - s[i];
                acc += d * d;
            }
        } else {
            for (unsigned long long i = lo + tid; i < hi; i += blockDim.x) {
                acc += gv[i] * gv[i];
            }
        }
        sh[tid] = acc;
        __syncthreads();
        for (unsigned int step = blockDim.x / 2; step > 0; step >>= 1) {
            if (tid < step) sh[tid] += sh[tid + step];
            __syncthreads();
        }
        if (tid == 0) partials[(unsigned long long)blockIdx.x * (m + 1) + k] = sh[0];
        __syncthreads();
    }
}
"#;

fn err(e: impl std::fmt::Display) -> KernelError {
    KernelError::Cuda(e.to_string())
}

/// The kernel's PTX as NVRTC compiles it (needs libnvrtc, no GPU).
pub fn ptx() -> Result<String, KernelError> {
    let ptx = compile_ptx_with_opts(SOURCE, CompileOptions { arch: Some(crate::ptx::PTX_ARCH), ..Default::default() })
        .map_err(err)?;
    Ok(ptx.to_src())
}

/// The compiled kernel on one device.
#[derive(Debug)]
pub struct CudaDiffNorm {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    func: CudaFunction,
}

/// Inputs already on the device (to time the kernel without host transfers).
#[derive(Debug)]
pub struct DeviceInputs {
    theta: CudaSlice<f32>,
    gv: CudaSlice<f32>,
    slices: CudaSlice<f32>,
    n: usize,
    m: usize,
}

impl CudaDiffNorm {
    /// Compile the kernel with NVRTC and load it on device `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        let src = ptx()?;
        let ctx = CudaContext::new(ordinal).map_err(err)?;
        let src = match crate::ptx::driver_version() {
            Some(v) => crate::ptx::ptx_for_driver(&src, v).into_owned(),
            None => src,
        };
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(src)).map_err(err)?;
        let func = module.load_function("bistro_diff_norms").map_err(err)?;
        let stream = ctx.default_stream();
        Ok(CudaDiffNorm { ctx, stream, func })
    }

    /// The CUDA context (for benchmarks that time device copies).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Copy inputs to the device.
    pub fn upload(&self, theta: &[f32], gv: &[f32], slices: &[&[f32]]) -> Result<DeviceInputs, KernelError> {
        check(theta, gv, 1.0, slices)?;
        let flat: Vec<f32> = slices.iter().flat_map(|s| s.iter().copied()).collect();
        Ok(DeviceInputs {
            theta: self.stream.clone_htod(theta).map_err(err)?,
            gv: self.stream.clone_htod(gv).map_err(err)?,
            slices: self.stream.clone_htod(&flat).map_err(err)?,
            n: theta.len(),
            m: slices.len(),
        })
    }

    /// Run the kernel on device inputs.
    pub fn run(&self, inputs: &DeviceInputs, eta: f32) -> Result<DiffNorms, KernelError> {
        if !(eta > 0.0 && eta.is_finite()) {
            return Err(KernelError::Eta(eta));
        }
        let (n, m) = (inputs.n, inputs.m);
        if n == 0 {
            return Ok(DiffNorms { sq_dist: vec![0.0; m], gv_sq: 0.0 });
        }
        let blocks = n.div_ceil(BLOCK);
        let mut partials = self.stream.alloc_zeros::<f32>(blocks * (m + 1)).map_err(err)?;
        let cfg =
            LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: THREADS * 4 };
        let (n64, m32, chunk) = (n as u64, m as u32, BLOCK as u32);
        let mut launch = self.stream.launch_builder(&self.func);
        launch
            .arg(&inputs.theta)
            .arg(&inputs.gv)
            .arg(&inputs.slices)
            .arg(&eta)
            .arg(&n64)
            .arg(&m32)
            .arg(&chunk)
            .arg(&mut partials);
        // SAFETY: the argument list matches the kernel's signature; every buffer holds the
        // lengths the kernel indexes (n, m * n, blocks * (m + 1)).
        unsafe { launch.launch(cfg) }.map_err(err)?;
        let host = self.stream.clone_dtoh(&partials).map_err(err)?;
        let inv = 1.0 / (eta as f64 * eta as f64);
        let mut sq_dist = vec![0f64; m];
        let mut gv_sq = 0f64;
        for b in 0..blocks {
            let row = &host[b * (m + 1)..(b + 1) * (m + 1)];
            for (acc, &p) in sq_dist.iter_mut().zip(&row[..m]) {
                *acc += p as f64;
            }
            gv_sq += row[m] as f64;
        }
        for d in &mut sq_dist {
            *d *= inv;
        }
        Ok(DiffNorms { sq_dist, gv_sq })
    }

    /// Upload and run: the same contract as [`crate::cpu::diff_norms`].
    pub fn diff_norms(&self, theta: &[f32], gv: &[f32], eta: f32, slices: &[&[f32]]) -> Result<DiffNorms, KernelError> {
        check(theta, gv, eta, slices)?;
        let inputs = self.upload(theta, gv, slices)?;
        self.run(&inputs, eta)
    }
}
