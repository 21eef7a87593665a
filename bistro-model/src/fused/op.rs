//! One adaptor from the fused kernels to Candle's custom-op traits.
//!
//! Candle has a trait per arity (`CustomOp1`, `CustomOp2`, `CustomOp3`), each with its own
//! long parameter lists. Each fused op here implements [`Kernels`] instead — its inputs as
//! one array of (storage, layout) pairs, the same for every arity — and is applied through
//! [`Fused`], which implements Candle's traits once for all of them.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};

/// One CPU input of a kernel: its storage and layout.
pub(crate) type Cpu<'a> = (&'a CpuStorage, &'a Layout);

/// One CUDA input of a kernel: its storage and layout.
#[cfg(feature = "cuda")]
pub(crate) type Cuda<'a> = (&'a candle_core::CudaStorage, &'a Layout);

/// A fused op of `N` inputs: a CPU kernel, a CUDA kernel, and (for the forward ops) a
/// backward built from other fused ops. Each kernel checks its inputs' shapes and returns
/// the output with its shape.
pub(crate) trait Kernels<const N: usize>: Send + Sync {
    /// Candle's name for the op (shown in its errors).
    fn name(&self) -> &'static str;

    /// The CPU kernel.
    fn cpu(&self, inputs: [Cpu<'_>; N]) -> Result<(CpuStorage, Shape)>;

    /// The CUDA kernel.
    #[cfg(feature = "cuda")]
    fn cuda(&self, inputs: [Cuda<'_>; N]) -> Result<(candle_core::CudaStorage, Shape)>;

    /// The inputs' gradients given the output `out` and its gradient `grad` (`None`: none).
    fn backward(&self, _inputs: [&Tensor; N], _out: &Tensor, _grad: &Tensor) -> Result<[Option<Tensor>; N]> {
        bail!("{}: no backward", self.name())
    }
}

/// Candle's view of a [`Kernels`] op: `x.apply_op2(&y, Fused(op))`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fused<K>(pub(crate) K);

impl<K: Kernels<1>> CustomOp1 for Fused<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.cpu([(s, l)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.cuda([(s, l)])
    }

    fn bwd(&self, x: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [dx] = self.0.backward([x], out, grad)?;
        Ok(dx)
    }
}

impl<K: Kernels<2>> CustomOp2 for Fused<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.cpu([(s1, l1), (s2, l2)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.cuda([(s1, l1), (s2, l2)])
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dy] = self.0.backward([x, y], out, grad)?;
        Ok((dx, dy))
    }
}

impl<K: Kernels<3>> CustomOp3 for Fused<K> {
    fn name(&self) -> &'static str {
        self.0.name()
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
        self.0.cpu([(s1, l1), (s2, l2), (s3, l3)])
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
        self.0.cuda([(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        z: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dy, dz] = self.0.backward([x, y, z], out, grad)?;
        Ok((dx, dy, dz))
    }
}
